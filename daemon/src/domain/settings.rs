//! What the device keeps of its own in the store's settings, so that it outlives a
//! restart: the inspector's sync switches as set from the app (the config file gives
//! only their defaults), and a full state asked for and not yet received.

use rusqlite::{params, Connection};

use super::DomainError;
use crate::schedule::Switches;

const AUTO_SYNC: &str = "sync.auto_sync";
const ON_VISIT_COMPLETED: &str = "sync.on_visit_completed";
const FILES_ON_WIFI_ONLY: &str = "sync.files_on_wifi_only";

/// `defaults` with what the app set on top.
pub fn load_switches(conn: &Connection, defaults: &Switches) -> Result<Switches, DomainError> {
    let mut s = defaults.clone();
    let mut stmt = conn.prepare("SELECT key, value FROM settings WHERE key LIKE 'sync.%'")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (key, value) = row?;
        // Written only by save_switches; anything else is ignored, not fatal.
        let on = value == "true";
        match key.as_str() {
            AUTO_SYNC => s.auto_sync = on,
            ON_VISIT_COMPLETED => s.on_visit_completed = on,
            FILES_ON_WIFI_ONLY => s.files_on_wifi_only = on,
            _ => {}
        }
    }
    Ok(s)
}

pub fn save_switches(conn: &Connection, s: &Switches) -> Result<(), DomainError> {
    let mut stmt = conn.prepare("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)")?;
    for (key, on) in [
        (AUTO_SYNC, s.auto_sync),
        (ON_VISIT_COMPLETED, s.on_visit_completed),
        (FILES_ON_WIFI_ONLY, s.files_on_wifi_only),
    ] {
        stmt.execute(params![key, if on { "true" } else { "false" }])?;
    }
    Ok(())
}

const FULL_STATE_WANTED: &str = "resync.full_state_wanted";

/// Notes that the back office's full state is wanted (a resync), or that it came.
pub fn want_full_state(conn: &Connection, wanted: bool) -> Result<(), DomainError> {
    if wanted {
        conn.prepare_cached("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, 'true')")?
            .execute([FULL_STATE_WANTED])?;
    } else {
        conn.prepare_cached("DELETE FROM settings WHERE key = ?1")?
            .execute([FULL_STATE_WANTED])?;
    }
    Ok(())
}

pub fn full_state_wanted(conn: &Connection) -> Result<bool, DomainError> {
    Ok(conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM settings WHERE key = ?1)")?
        .query_row([FULL_STATE_WANTED], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_round_trip_over_the_defaults() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let defaults = Switches::default();
        assert_eq!(load_switches(&conn, &defaults).unwrap(), defaults);
        let set = Switches {
            auto_sync: false,
            files_on_wifi_only: true,
            ..defaults.clone()
        };
        save_switches(&conn, &set).unwrap();
        assert_eq!(load_switches(&conn, &defaults).unwrap(), set);
    }
}
