//! The capture journal: new records are acknowledged once a single row is durable in
//! `captures`, and folded into `items` and `outbox` later, many at a time.
//!
//! Why: a capture that also updated the items and outbox tables and their indexes wrote
//! about ten database pages per fsync; one journal row writes one. Folding happens in
//! the writer thread before any other change and before reads, so everyone else sees
//! the folded tables; a fold is one transaction, so a crash leaves a capture either in
//! the journal or folded, never both or neither.

use rusqlite::{params, Connection};
use ui_bridge::{Item, RecordBody, SyncState};

use super::DomainError;
use crate::store::now_ms;

/// Writes a validated record to the journal with its item and operation ids.
pub fn stage(
    conn: &Connection,
    work_order_id: &str,
    record: &RecordBody,
) -> Result<Item, DomainError> {
    let invalid = |e: serde_json::Error| DomainError::InvalidRecord(e.to_string());
    let body = serde_json::to_value(record).map_err(invalid)?;
    // Into a buffer, not through `Display`, which feeds the formatter one piece at a
    // time: that was half of what a capture's job cost. Same text either way.
    let text = serde_json::to_string(&body).map_err(invalid)?;
    let id = uuid::Uuid::now_v7().to_string();
    let op_id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO captures (item_id, work_order_id, kind, body, op_id, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id,
        work_order_id,
        record.kind().as_str(),
        text,
        op_id,
        now
    ])?;
    Ok(Item {
        id,
        work_order_id: work_order_id.to_owned(),
        kind: record.kind(),
        record_id: None,
        body,
        state: SyncState::Waiting,
        reason: None,
        created_ms: now,
        updated_ms: now,
    })
}

/// Captures still in the journal.
pub fn staged(conn: &Connection) -> Result<u64, DomainError> {
    // The journal is only ever emptied whole, so its rowids run 1..=n without gaps and
    // the largest is the count: a b-tree lookup instead of a scan on every capture.
    let n: i64 = conn
        .prepare_cached("SELECT coalesce(max(seq), 0) FROM captures")?
        .query_row([], |r| r.get(0))?;
    Ok(n as u64)
}

/// Moves every journal row into `items` and `outbox`, in capture order (the creation's
/// payload is the item's body, stored once). Returns how many moved.
pub fn fold(conn: &Connection) -> Result<usize, DomainError> {
    if staged(conn)? == 0 {
        return Ok(0);
    }
    conn.prepare_cached(
        "INSERT INTO items (id, work_order_id, kind, body, sync_state, created_ms, updated_ms)
         SELECT item_id, work_order_id, kind, body, 'waiting', created_ms, created_ms
         FROM captures ORDER BY seq",
    )?
    .execute([])?;
    conn.prepare_cached(
        "INSERT INTO outbox (op_id, item_id, work_order_id, item_kind, action, state, created_ms)
         SELECT op_id, item_id, work_order_id, kind, 'create', 'waiting', created_ms
         FROM captures ORDER BY seq",
    )?
    .execute([])?;
    Ok(conn.prepare_cached("DELETE FROM captures")?.execute([])?)
}

/// The figure the app shows: operations in the outbox plus captures in the journal.
pub fn unsent(conn: &Connection) -> Result<u64, DomainError> {
    Ok(super::outbox::unsent_count(conn)? + staged(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ui_bridge::ItemKind;

    #[test]
    fn folding_keeps_capture_order_and_ids() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        conn.execute(
            "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
             VALUES ('W', 1, 't', 'new', '[\"new\"]', '{}', 0)",
            [],
        )
        .unwrap();
        let a = stage(&conn, "W", &RecordBody::Note { text: "a".into() }).unwrap();
        let b = stage(&conn, "W", &RecordBody::Note { text: "b".into() }).unwrap();
        assert_eq!(unsent(&conn).unwrap(), 2);
        assert_eq!(fold(&conn).unwrap(), 2);
        assert_eq!(staged(&conn).unwrap(), 0);
        assert_eq!(unsent(&conn).unwrap(), 2);
        let ops = super::super::outbox::list(&conn, None).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.item_id.clone()).collect::<Vec<_>>(),
            [a.id, b.id]
        );
        assert!(ops.iter().all(|o| o.item_kind == ItemKind::Note));
    }
}
