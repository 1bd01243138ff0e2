//! The inspector's sync switches as set from the app, kept in the store so that they
//! outlive a restart; the config file gives only their defaults.

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
