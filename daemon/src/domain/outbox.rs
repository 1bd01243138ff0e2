//! The outbox: one row per change waiting for the back office, in the order the changes
//! were made. An operation leaves the table only when the back office acknowledges its
//! id; until it is sent, later edits fold into it.

use rusqlite::{params, Connection, OptionalExtension};
use ui_bridge::{ItemKind, Operation, SyncState};

use crate::store::now_ms;

use super::DomainError;

/// `create`, `update` or `delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// Appends an operation with a fresh, stable id.
pub fn append(
    conn: &Connection,
    item_id: &str,
    work_order_id: &str,
    kind: ItemKind,
    action: Action,
    payload: &serde_json::Value,
) -> Result<String, DomainError> {
    // Version 7 ids sort by creation time, which keeps them readable in logs.
    let op_id = uuid::Uuid::now_v7().to_string();
    conn.prepare_cached(
        "INSERT INTO outbox (op_id, item_id, work_order_id, item_kind, action, payload, state, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'waiting', ?7)",
    )?
    .execute(params![
            op_id,
            item_id,
            work_order_id,
            kind.as_str(),
            action.as_str(),
            payload.to_string(),
            now_ms()
        ])?;
    Ok(op_id)
}

/// The newest operation of an item if it has not been sent (waiting, or refused and so
/// not applied): an edit may still fold into it.
pub fn foldable_op(conn: &Connection, item_id: &str) -> Result<Option<i64>, DomainError> {
    let newest: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, state FROM outbox WHERE item_id = ?1 ORDER BY seq DESC LIMIT 1",
            [item_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(newest
        .filter(|(_, state)| state == "waiting" || state == "refused")
        .map(|(seq, _)| seq))
}

/// Operations still waiting for delivery, the figure the app shows.
pub fn unsent_count(conn: &Connection) -> Result<u64, DomainError> {
    let n: i64 = conn
        .prepare_cached("SELECT value FROM counters WHERE name = 'unsent'")?
        .query_row([], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

pub fn list(conn: &Connection, limit: Option<u32>) -> Result<Vec<Operation>, DomainError> {
    let mut stmt = conn.prepare(
        "SELECT op_id, item_id, work_order_id, item_kind, action, state, reason, created_ms
         FROM outbox ORDER BY seq LIMIT ?1",
    )?;
    let limit = limit.map(i64::from).unwrap_or(-1);
    let rows = stmt.query_map([limit], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, Option<String>>(6)?,
            r.get::<_, i64>(7)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (op_id, item_id, work_order_id, kind, action, state, reason, created_ms) = row?;
        out.push(Operation {
            op_id,
            item_id,
            work_order_id,
            item_kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
            action,
            state: SyncState::parse(&state).unwrap_or(SyncState::Waiting),
            reason,
            created_ms,
        });
    }
    Ok(out)
}

/// An operation on its way to the back office.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingOp {
    pub seq: i64,
    pub op_id: String,
    pub item_id: String,
    pub work_order_id: String,
    pub item_kind: String,
    pub action: String,
    pub payload: String,
    pub created_ms: i64,
}

/// The next operations to send, oldest first, at most `max_ops` of them and about
/// `max_bytes` of payload. Skipped: photos whose bytes the back office has not verified
/// yet or whose record it does not have yet (their bytes travel in their own lane, so
/// records never wait for photos), work orders in
/// `busy` (a batch of theirs is unacknowledged, and a work order's operations must arrive
/// in order), and every work order held back by a refused operation.
pub fn next_batch(
    conn: &Connection,
    busy: &std::collections::HashSet<String>,
    max_ops: usize,
    max_bytes: usize,
) -> Result<Vec<PendingOp>, DomainError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, op_id, item_id, work_order_id, item_kind, action, payload, created_ms
         FROM outbox
         WHERE state = 'waiting'
           AND work_order_id NOT IN (SELECT work_order_id FROM outbox WHERE state = 'refused')
           AND (item_kind != 'photo' OR action != 'create' OR EXISTS (
                SELECT 1 FROM items i JOIN photo_uploads p ON p.sha256 = i.photo_sha256
                WHERE i.id = outbox.item_id AND p.complete = 1
                  AND NOT EXISTS (SELECT 1 FROM outbox r
                                  WHERE r.item_id = i.record_id AND r.action = 'create')))
         ORDER BY seq LIMIT ?1",
    )?;
    // Look a little past a batch so a busy work order at the head does not starve the
    // others.
    let scan = (max_ops * 4) as i64;
    let rows = stmt.query_map([scan], |r| {
        Ok(PendingOp {
            seq: r.get(0)?,
            op_id: r.get(1)?,
            item_id: r.get(2)?,
            work_order_id: r.get(3)?,
            item_kind: r.get(4)?,
            action: r.get(5)?,
            payload: r.get(6)?,
            created_ms: r.get(7)?,
        })
    })?;
    let mut out = Vec::new();
    let mut bytes = 0;
    for row in rows {
        let op = row?;
        if busy.contains(&op.work_order_id) {
            continue;
        }
        if !out.is_empty() && bytes + op.payload.len() > max_bytes {
            break;
        }
        bytes += op.payload.len();
        out.push(op);
        if out.len() >= max_ops {
            break;
        }
    }
    Ok(out)
}

/// Records that these operations are about to leave the device. Durable before the
/// publish: from here on a delete must be sent rather than forgotten.
pub fn mark_sent(conn: &Connection, seqs: &[i64]) -> Result<(), DomainError> {
    let mut op = conn.prepare_cached(
        "UPDATE outbox SET state = 'in_progress', attempts = attempts + 1 WHERE seq = ?1 AND state = 'waiting'",
    )?;
    let mut item = conn.prepare_cached(
        "UPDATE items SET sync_state = 'in_progress', sent = 1
         WHERE id = (SELECT item_id FROM outbox WHERE seq = ?1)",
    )?;
    for seq in seqs {
        op.execute([seq])?;
        item.execute([seq])?;
    }
    Ok(())
}

/// Operations sent on an earlier connection go again, in order, on the next one (the
/// back office treats a repeated id as already applied).
pub fn requeue_in_flight(conn: &Connection) -> Result<usize, DomainError> {
    Ok(conn.execute(
        "UPDATE outbox SET state = 'waiting' WHERE state = 'in_progress'",
        [],
    )?)
}

/// An item whose sync state changed, for events.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub item_id: String,
    pub work_order_id: String,
    pub kind: ItemKind,
    /// `None`: the item is gone (its deletion was delivered).
    pub state: Option<SyncState>,
    pub reason: Option<String>,
}

/// Applies the back office's acknowledgements. Unknown ids (already acknowledged, or
/// never ours) are returned so they can be logged and counted.
pub fn acknowledge(
    conn: &Connection,
    op_ids: &[String],
) -> Result<(Vec<StateChange>, Vec<String>), DomainError> {
    let mut changes = Vec::new();
    let mut unknown = Vec::new();
    for op_id in op_ids {
        let found: Option<(String, String, String, String)> = conn
            .prepare_cached(
                "SELECT item_id, work_order_id, item_kind, action FROM outbox WHERE op_id = ?1",
            )?
            .query_row([op_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((item_id, work_order_id, kind, action)) = found else {
            unknown.push(op_id.clone());
            continue;
        };
        conn.prepare_cached("DELETE FROM outbox WHERE op_id = ?1")?
            .execute([op_id])?;
        let kind = ItemKind::parse(&kind).unwrap_or(ItemKind::Note);
        let next: Option<String> = conn
            .prepare_cached(
                "SELECT state FROM outbox WHERE item_id = ?1 ORDER BY seq DESC LIMIT 1",
            )?
            .query_row([&item_id], |r| r.get(0))
            .optional()?;
        let state = match next {
            Some(s) => SyncState::parse(&s).unwrap_or(SyncState::Waiting),
            None if action == "delete" => {
                conn.prepare_cached("DELETE FROM items WHERE id = ?1")?
                    .execute([&item_id])?;
                changes.push(StateChange {
                    item_id,
                    work_order_id,
                    kind,
                    state: None,
                    reason: None,
                });
                continue;
            }
            None => SyncState::Delivered,
        };
        conn.prepare_cached(
            "UPDATE items SET sync_state = ?2, reason = NULL, updated_ms = ?3 WHERE id = ?1",
        )?
        .execute(params![item_id, state.as_str(), now_ms()])?;
        changes.push(StateChange {
            item_id,
            work_order_id,
            kind,
            state: Some(state),
            reason: None,
        });
    }
    Ok((changes, unknown))
}

/// The back office refused an operation: it stays on the device, red with the reason,
/// and holds back the later operations of its work order until it is fixed or discarded.
pub fn refuse(
    conn: &Connection,
    op_id: &str,
    reason: &str,
) -> Result<Option<StateChange>, DomainError> {
    let found: Option<(String, String, String)> = conn
        .query_row(
            "SELECT item_id, work_order_id, item_kind FROM outbox WHERE op_id = ?1",
            [op_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((item_id, work_order_id, kind)) = found else {
        return Ok(None);
    };
    conn.execute(
        "UPDATE outbox SET state = 'refused', reason = ?2 WHERE op_id = ?1",
        params![op_id, reason],
    )?;
    conn.execute(
        "UPDATE items SET sync_state = 'refused', reason = ?2, updated_ms = ?3 WHERE id = ?1",
        params![item_id, reason, now_ms()],
    )?;
    Ok(Some(StateChange {
        item_id,
        work_order_id,
        kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
        state: Some(SyncState::Refused),
        reason: Some(reason.to_owned()),
    }))
}

/// Puts a sent operation back to waiting: it was not applied and will go again.
pub fn requeue_op(conn: &Connection, op_id: &str) -> Result<Option<StateChange>, DomainError> {
    let found: Option<(String, String, String)> = conn
        .query_row(
            "SELECT item_id, work_order_id, item_kind FROM outbox WHERE op_id = ?1",
            [op_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((item_id, work_order_id, kind)) = found else {
        return Ok(None);
    };
    conn.execute(
        "UPDATE outbox SET state = 'waiting' WHERE op_id = ?1 AND state = 'in_progress'",
        [op_id],
    )?;
    conn.execute(
        "UPDATE items SET sync_state = 'waiting' WHERE id = ?1 AND sync_state = 'in_progress'",
        [&item_id],
    )?;
    Ok(Some(StateChange {
        item_id,
        work_order_id,
        kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
        state: Some(SyncState::Waiting),
        reason: None,
    }))
}
