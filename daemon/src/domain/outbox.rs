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
