//! Versioned schema migrations, tracked in `PRAGMA user_version`. Append new steps;
//! never edit a released one, since devices in the field already ran it.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: work order cache, captured items, the outbox.
    "
    CREATE TABLE work_orders (
        id            TEXT PRIMARY KEY,
        version       INTEGER NOT NULL,
        title         TEXT NOT NULL,
        -- The stage as the device knows it: the back office's, or further when the
        -- inspector advanced it offline.
        stage         TEXT NOT NULL,
        workflow      TEXT NOT NULL,   -- JSON array of stages, in order
        scheduled_for TEXT,
        doc           TEXT NOT NULL,   -- the work order as the back office sent it
        received_ms   INTEGER NOT NULL
    );

    CREATE TABLE items (
        id            TEXT PRIMARY KEY,
        work_order_id TEXT NOT NULL REFERENCES work_orders(id),
        kind          TEXT NOT NULL,
        record_id     TEXT REFERENCES items(id),
        body          TEXT NOT NULL,
        photo_sha256  TEXT,
        sync_state    TEXT NOT NULL,
        reason        TEXT,
        -- Set when a delete is waiting to reach the back office; the item is hidden.
        deleted       INTEGER NOT NULL DEFAULT 0,
        -- Set once any operation of the item has left the device: from then on a
        -- delete has to be sent rather than simply forgotten.
        sent          INTEGER NOT NULL DEFAULT 0,
        created_ms    INTEGER NOT NULL,
        updated_ms    INTEGER NOT NULL
    );
    CREATE INDEX items_by_work_order ON items(work_order_id, created_ms);
    CREATE INDEX items_by_record ON items(record_id) WHERE record_id IS NOT NULL;
    CREATE INDEX items_by_photo ON items(photo_sha256) WHERE photo_sha256 IS NOT NULL;

    -- Delivered operations leave this table; what is here is unsent.
    CREATE TABLE outbox (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        op_id         TEXT NOT NULL UNIQUE,
        item_id       TEXT NOT NULL,
        work_order_id TEXT NOT NULL,
        item_kind     TEXT NOT NULL,
        action        TEXT NOT NULL,   -- create | update | delete
        payload       TEXT NOT NULL,   -- JSON sent to the back office
        state         TEXT NOT NULL,   -- waiting | in_progress | refused
        reason        TEXT,
        attempts      INTEGER NOT NULL DEFAULT 0,
        created_ms    INTEGER NOT NULL
    );
    CREATE INDEX outbox_by_item ON outbox(item_id);
    -- The uplink's queries: waiting operations in order, and the work orders held back
    -- by a refusal; without them each batch would scan the whole outbox.
    CREATE INDEX outbox_by_state ON outbox(state, seq);

    -- New records land here first: one row per capture and no index to maintain, so
    -- the fsync that acknowledges a capture writes as little as possible. They are
    -- folded into items and outbox in batches (domain::journal).
    CREATE TABLE captures (
        seq           INTEGER PRIMARY KEY,
        item_id       TEXT NOT NULL,
        work_order_id TEXT NOT NULL,
        kind          TEXT NOT NULL,
        body          TEXT NOT NULL,
        op_id         TEXT NOT NULL,
        created_ms    INTEGER NOT NULL
    );

    -- The unsent count is read after every capture; keeping it here makes that O(1)
    -- however long the queue grows.
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters VALUES ('unsent', 0);
    CREATE TRIGGER outbox_counted_in AFTER INSERT ON outbox
        BEGIN UPDATE counters SET value = value + 1 WHERE name = 'unsent'; END;
    CREATE TRIGGER outbox_counted_out AFTER DELETE ON outbox
        BEGIN UPDATE counters SET value = value - 1 WHERE name = 'unsent'; END;
    CREATE INDEX outbox_by_work_order ON outbox(work_order_id, seq);
    ",
    // 2: photo upload progress, so an upload resumes where the back office stopped
    // acknowledging.
    "
    CREATE TABLE photo_uploads (
        sha256   TEXT PRIMARY KEY,
        size     INTEGER NOT NULL,
        -- Bytes the back office has confirmed, from the start of the file.
        acked    INTEGER NOT NULL DEFAULT 0,
        -- The back office verified size and SHA-256.
        complete INTEGER NOT NULL DEFAULT 0
    );
    ",
    // 3: the inspector's choices that outlive a restart (the sync switches).
    "
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    ",
    // 4: an operation whose payload is its item's body keeps no copy of it (payload
    // NULL), so a record's body is stored once and the outbox rows that every send and
    // acknowledgement rewrites stay small. SQLite cannot relax NOT NULL in place: the
    // table is rebuilt, keeping seq, its AUTOINCREMENT high-water mark, and the rows.
    // Copies that equal the body are dropped on the way, except for operations that may
    // have left the device, whose payload stays as it was sent.
    "
    CREATE TABLE outbox_v4 (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        op_id         TEXT NOT NULL UNIQUE,
        item_id       TEXT NOT NULL,
        work_order_id TEXT NOT NULL,
        item_kind     TEXT NOT NULL,
        action        TEXT NOT NULL,   -- create | update | delete
        payload       TEXT,            -- JSON sent to the back office; NULL: the item's body
        state         TEXT NOT NULL,   -- waiting | in_progress | refused
        reason        TEXT,
        attempts      INTEGER NOT NULL DEFAULT 0,
        created_ms    INTEGER NOT NULL
    );
    INSERT INTO outbox_v4 (seq, op_id, item_id, work_order_id, item_kind, action, payload,
                           state, reason, attempts, created_ms)
        SELECT seq, op_id, item_id, work_order_id, item_kind, action,
               CASE WHEN state != 'in_progress' AND attempts = 0
                         AND payload = (SELECT body FROM items WHERE id = outbox.item_id)
                    THEN NULL ELSE payload END,
               state, reason, attempts, created_ms
        FROM outbox ORDER BY seq;
    DELETE FROM sqlite_sequence WHERE name = 'outbox_v4';
    UPDATE sqlite_sequence SET name = 'outbox_v4' WHERE name = 'outbox';
    DROP TABLE outbox;
    ALTER TABLE outbox_v4 RENAME TO outbox;
    CREATE INDEX outbox_by_item ON outbox(item_id);
    CREATE INDEX outbox_by_state ON outbox(state, seq);
    CREATE INDEX outbox_by_work_order ON outbox(work_order_id, seq);
    CREATE TRIGGER outbox_counted_in AFTER INSERT ON outbox
        BEGIN UPDATE counters SET value = value + 1 WHERE name = 'unsent'; END;
    CREATE TRIGGER outbox_counted_out AFTER DELETE ON outbox
        BEGIN UPDATE counters SET value = value - 1 WHERE name = 'unsent'; END;
    ",
    // 5: every send and every acknowledgement moved each operation's entry in an index
    // on its state. The sender reads the outbox in seq order, which the table itself
    // keeps; only the two rare lookups by state get indexes, partial ones that hold just
    // their rows (refused operations; photos, whose uploads run apart from the records),
    // so sending a record touches no index at all.
    "
    DROP INDEX outbox_by_state;
    CREATE INDEX outbox_refused ON outbox(work_order_id) WHERE state = 'refused';
    CREATE INDEX outbox_photos ON outbox(seq) WHERE item_kind = 'photo' AND action = 'create';
    ",
    // 6: a photo's file goes when the last row naming it does, whatever removed the row
    // (a delete, the acknowledgement of one, a discard, a work order taken off the
    // device). The trigger notes the photo in the same transaction, with its upload
    // progress gone; the daemon removes the file after the commit, then the note
    // (Service::remove_gone_photos), so a crash in between leaves the note for the next
    // start, never a row without its file. Photos attached again are struck off.
    "
    CREATE TABLE photos_gone (sha256 TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TRIGGER items_photo_gone AFTER DELETE ON items
        WHEN OLD.photo_sha256 IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM items WHERE photo_sha256 = OLD.photo_sha256)
        BEGIN
            INSERT OR IGNORE INTO photos_gone VALUES (OLD.photo_sha256);
            DELETE FROM photo_uploads WHERE sha256 = OLD.photo_sha256;
        END;
    CREATE TRIGGER items_photo_back AFTER INSERT ON items
        WHEN NEW.photo_sha256 IS NOT NULL
        BEGIN DELETE FROM photos_gone WHERE sha256 = NEW.photo_sha256; END;
    -- Rows removed before this version left their files and upload progress behind.
    INSERT OR IGNORE INTO photos_gone
        SELECT sha256 FROM photo_uploads
        WHERE sha256 NOT IN (SELECT photo_sha256 FROM items WHERE photo_sha256 IS NOT NULL);
    DELETE FROM photo_uploads WHERE sha256 IN (SELECT sha256 FROM photos_gone);
    ",
    // 7: a work order the dispatcher took off the device while changes of it still
    // waited is remembered as withdrawn, and goes once they are delivered or discarded.
    "
    ALTER TABLE work_orders ADD COLUMN withdrawn INTEGER NOT NULL DEFAULT 0;
    ",
    // 8: the work order's version a stage move was made on, so that discarding a refused
    // one can tell whether the back office has said where the work order stands since.
    "
    ALTER TABLE items ADD COLUMN base_version INTEGER;
    ",
    // 9: a work order's arrival also by the time since boot, so that the clock being set
    // after it came (NTP, the modem) does not age it by the step (crate::clock).
    "
    ALTER TABLE work_orders ADD COLUMN received_boot TEXT;
    ALTER TABLE work_orders ADD COLUMN received_since_boot_ms INTEGER;
    ",
];

/// Fails with [`StoreError::TooNew`] if the database at `path` was written by a newer
/// fieldsyncd, without reading its schema (`user_version` lives in the file's header).
/// A missing or empty file, or one whose header cannot be read, passes: the checks at
/// open say what is wrong with it. Read-only, so that closing this connection neither
/// copies the log into the file nor deletes it, and an empty file's log survives.
pub fn refuse_newer(path: &Path) -> Result<(), StoreError> {
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(());
    }
    let found = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)));
    match found {
        Ok(found) => too_new(found),
        Err(_) => Ok(()),
    }
}

fn too_new(found: i64) -> Result<(), StoreError> {
    if found < 0 || found as usize > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found,
            known: MIGRATIONS.len(),
        });
    }
    Ok(())
}

/// Brings the database to the newest schema; returns the version it is at.
pub fn migrate(conn: &mut Connection) -> Result<usize, StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    too_new(current)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.execute_batch(sql)
            .and_then(|_| tx.pragma_update(None, "user_version", version as i64))
            .and_then(|_| tx.commit())
            .map_err(|source| StoreError::Migrate { version, source })?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(MIGRATIONS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len());
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len());
    }

    #[test]
    fn the_outbox_rebuild_keeps_every_operation_and_its_sequence() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute_batch(
            "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
                 VALUES ('W', 1, 't', 'new', '[\"new\"]', '{}', 0);
             INSERT INTO items (id, work_order_id, kind, body, sync_state, created_ms, updated_ms)
                 VALUES ('a', 'W', 'note', '{\"text\":\"a2\"}', 'waiting', 0, 0),
                        ('b', 'W', 'note', '{\"text\":\"b\"}', 'waiting', 0, 0);
             INSERT INTO outbox (seq, op_id, item_id, work_order_id, item_kind, action, payload, state, attempts, created_ms)
                 VALUES (7, 'op-sent', 'a', 'W', 'note', 'create', '{\"text\":\"a1\"}', 'in_progress', 1, 0),
                        (8, 'op-edit', 'a', 'W', 'note', 'update', '{\"text\":\"a2\"}', 'waiting', 0, 0),
                        (9, 'op-b', 'b', 'W', 'note', 'create', '{\"text\":\"b\"}', 'waiting', 0, 0),
                        (10, 'op-gone', 'b', 'W', 'note', 'update', '{}', 'waiting', 0, 0);
             DELETE FROM outbox WHERE seq = 10;",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(i64, String, Option<String>)> = conn
            .prepare("SELECT seq, op_id, payload FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            [
                (7, "op-sent".into(), Some("{\"text\":\"a1\"}".into())),
                (8, "op-edit".into(), None),
                (9, "op-b".into(), None),
            ]
        );
        // Numbering goes on after the highest number ever used, and the count follows.
        conn.execute(
            "INSERT INTO outbox (op_id, item_id, work_order_id, item_kind, action, state, created_ms)
             VALUES ('op-new', 'b', 'W', 'note', 'delete', 'waiting', 0)",
            [],
        )
        .unwrap();
        let seq: i64 = conn
            .query_row("SELECT seq FROM outbox WHERE op_id = 'op-new'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(seq, 11);
        let unsent: i64 = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'unsent'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unsent, 4, "three rows before (four in, one out), one after");
    }

    #[test]
    fn the_lookups_by_state_read_only_their_partial_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let plan = |sql: &str| -> String {
            conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let held = plan("SELECT work_order_id FROM outbox WHERE state = 'refused'");
        assert!(held.contains("outbox_refused"), "{held}");
        let photos = plan(
            "SELECT seq FROM outbox WHERE item_kind = 'photo' AND action = 'create'
               AND state = 'waiting' ORDER BY seq",
        );
        assert!(photos.contains("outbox_photos"), "{photos}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::TooNew { .. })));
    }
}
