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

/// What an operation carries to the back office.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The item's body as it stands when the operation leaves: stored once, in the item.
    Body,
    /// Something else (a deletion's empty object, a photo's body with its record).
    Own(&'a serde_json::Value),
}

/// The payload an operation leaves with (see [`Payload`]).
pub(crate) const PAYLOAD_COLUMN: &str =
    "coalesce(outbox.payload, (SELECT body FROM items WHERE items.id = outbox.item_id))";

/// Appends an operation with a fresh, stable id.
pub fn append(
    conn: &Connection,
    item_id: &str,
    work_order_id: &str,
    kind: ItemKind,
    action: Action,
    payload: Payload<'_>,
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
            match payload {
                Payload::Body => None,
                Payload::Own(v) => Some(v.to_string()),
            },
            now_ms()
        ])?;
    Ok(op_id)
}

/// Lets an edit's content into every operation of the item that never left the device
/// or was refused, and makes them waiting again; returns how many there were (none: the
/// edit needs an operation of its own). Call [`freeze_sent`] first.
///
/// All of them, not the newest only: after a refused creation, an update queued behind
/// it would otherwise keep the old content and the refused creation the old mistake,
/// and the work order would stay held with the item looking fine. Never one that was
/// sent and not refused: the back office may have applied its id already and would
/// take the new content for a repeat, so the edit would be lost.
///
/// Each goes under a fresh id: copies of a refused or held operation sent before may
/// still wait at the broker, and judged again after the fix, an old copy applied under
/// the shared id would make the fixed one a repeat. An id names one content for ever.
pub fn fold_edit(conn: &Connection, item_id: &str) -> Result<usize, DomainError> {
    let seqs: Vec<i64> = conn
        .prepare_cached(
            "UPDATE outbox SET payload = NULL, state = 'waiting', reason = NULL
             WHERE item_id = ?1 AND action != 'delete'
               AND (state = 'refused' OR (state = 'waiting' AND attempts = 0))
             RETURNING seq",
        )?
        .query_map([item_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for &seq in &seqs {
        renew_id(conn, seq)?;
    }
    Ok(seqs.len())
}

/// Gives an operation a fresh id before it goes again with a content or a judgement
/// the old id may already have had.
pub fn renew_id(conn: &Connection, seq: i64) -> Result<(), DomainError> {
    conn.prepare_cached("UPDATE outbox SET op_id = ?2 WHERE seq = ?1")?
        .execute(params![seq, uuid::Uuid::now_v7().to_string()])?;
    Ok(())
}

/// Before an item's body changes: operations that may have reached the back office keep
/// the body they were sent with, so that sending one again repeats it exactly.
pub fn freeze_sent(conn: &Connection, item_id: &str) -> Result<(), DomainError> {
    conn.prepare_cached(
        "UPDATE outbox SET payload = (SELECT body FROM items WHERE id = ?1)
         WHERE item_id = ?1 AND payload IS NULL AND attempts > 0 AND state != 'refused'",
    )?
    .execute([item_id])?;
    Ok(())
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
    /// The operation of the same work order that must be applied before this one: the
    /// latest earlier one still unacknowledged. `None` when all earlier ones were.
    pub prev: Option<String>,
}

/// The next operations to send, oldest first, at most `max_ops` of them and about
/// `max_bytes` of payload. Skipped: operations already sent and unacknowledged, every work
/// order held back by a refusal, and photos whose bytes the back office has not verified
/// yet or whose record it does not have yet (their bytes travel in their own lane, so
/// records never wait for photos; a photo's operation needs no predecessor). A photo's
/// deletion waits until the back office has settled the photo's creation: with no
/// predecessor to name, it could overtake a creation the back office left for later,
/// which would then bring the deleted photo back.
pub fn next_batch(
    conn: &Connection,
    max_ops: usize,
    max_bytes: usize,
) -> Result<Vec<PendingOp>, DomainError> {
    // Every row is read in seq order from the oldest, so each operation's predecessor in
    // its work order has been seen by the time it comes: no lookup per operation. What
    // can go now is told by its payload, NULL for the rest.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT seq, op_id, item_id, work_order_id, item_kind, action, created_ms,
                CASE WHEN state = 'waiting'
                      AND work_order_id NOT IN (SELECT work_order_id FROM outbox WHERE state = 'refused')
                      AND (item_kind != 'photo' OR action != 'create' OR EXISTS (
                           SELECT 1 FROM items i JOIN photo_uploads p ON p.sha256 = i.photo_sha256
                           WHERE i.id = outbox.item_id AND p.complete = 1
                             AND NOT EXISTS (SELECT 1 FROM outbox r
                                             WHERE r.item_id = i.record_id AND r.action = 'create')))
                      AND (item_kind != 'photo' OR action != 'delete' OR NOT EXISTS (
                           SELECT 1 FROM outbox c WHERE c.item_id = outbox.item_id AND c.seq < outbox.seq))
                     THEN {PAYLOAD_COLUMN} END
         FROM outbox ORDER BY seq"
    ))?;
    // No `LIMIT ?`: SQLite re-prepares a statement whenever a LIMIT parameter is bound
    // again. The rows come lazily in table order, so stopping early reads no more.
    let mut rows = stmt.query([])?;
    // Per work order, the latest operation seen that is not a photo's.
    let mut latest: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut out = Vec::new();
    let mut bytes = 0;
    while let Some(r) = rows.next()? {
        let work_order_id = text(r, 3)?;
        let op_id = text(r, 1)?;
        let is_photo = text(r, 4)? == "photo";
        let payload = r.get::<_, Option<String>>(7)?;
        let prev = match (is_photo, latest.get_mut(work_order_id)) {
            // A photo's operation needs no predecessor and is none.
            (true, _) => None,
            // Most rows read are in flight or held: their id only replaces the one kept,
            // in place; one that goes takes the kept id as its predecessor.
            (false, Some(seen)) if payload.is_some() => {
                Some(std::mem::replace(seen, op_id.to_owned()))
            }
            (false, Some(seen)) => {
                seen.clear();
                seen.push_str(op_id);
                None
            }
            (false, None) => {
                latest.insert(work_order_id.to_owned(), op_id.to_owned());
                None
            }
        };
        let Some(payload) = payload else {
            continue;
        };
        if out.len() >= max_ops || (!out.is_empty() && bytes + payload.len() > max_bytes) {
            break;
        }
        bytes += payload.len();
        out.push(PendingOp {
            seq: r.get(0)?,
            op_id: op_id.to_owned(),
            item_id: r.get(2)?,
            work_order_id: work_order_id.to_owned(),
            item_kind: r.get(4)?,
            action: r.get(5)?,
            payload,
            created_ms: r.get(6)?,
            prev,
        });
    }
    Ok(out)
}

/// A text column, borrowed from the row.
fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(index)?.as_str().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Records that these operations are about to leave the device. Durable before the
/// publish: from here on a delete must be sent rather than forgotten.
pub fn mark_sent(conn: &Connection, seqs: &[i64]) -> Result<(), DomainError> {
    // Only the outbox rows change; an item shows "in progress" from them (see
    // items::ITEM_COLUMNS), which keeps this write small.
    conn.prepare_cached(
        "UPDATE outbox SET state = 'in_progress', attempts = attempts + 1
         WHERE seq IN rarray(?1) AND state = 'waiting'",
    )?
    .execute([&seq_array(seqs)])?;
    Ok(())
}

/// Takes the next batch ([`next_batch`]) and marks it as leaving the device
/// ([`mark_sent`]) in one transaction. Read apart from the marking, an edit or a delete
/// committed between the two would change an operation the message already holds: the
/// old content would go out under an id the edit then claims, or a creation the device
/// forgot would reach the back office.
pub fn take_batch(
    conn: &Connection,
    max_ops: usize,
    max_bytes: usize,
) -> Result<Vec<PendingOp>, DomainError> {
    let batch = next_batch(conn, max_ops, max_bytes)?;
    let seqs: Vec<i64> = batch.iter().map(|o| o.seq).collect();
    mark_sent(conn, &seqs)?;
    Ok(batch)
}

/// Puts back operations [`take_batch`] took that were not published after all (cut from
/// the message): waiting again, and open to edits again unless an earlier connection
/// sent them.
pub fn put_back(conn: &Connection, seqs: &[i64]) -> Result<(), DomainError> {
    conn.prepare_cached(
        "UPDATE outbox SET state = 'waiting', attempts = max(attempts - 1, 0)
         WHERE seq IN rarray(?1) AND state = 'in_progress'",
    )?
    .execute([&seq_array(seqs)])?;
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

/// Applies the back office's acknowledgements, a whole message at a time. Unknown ids
/// (already acknowledged, or never ours) are returned so they can be logged and counted.
pub fn acknowledge(
    conn: &Connection,
    op_ids: &[String],
) -> Result<(Vec<StateChange>, Vec<String>), DomainError> {
    if op_ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let ids = id_array(op_ids);
    // One pass finds and removes them: what was removed is what was ours.
    let mut known: Vec<(i64, String, String, String, String, String)> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "DELETE FROM outbox WHERE op_id IN rarray(?1)
             RETURNING seq, op_id, item_id, work_order_id, item_kind, action",
        )?;
        let rows = stmt.query_map([&ids], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        for row in rows {
            known.push(row?);
        }
    }
    // RETURNING gives no order; events follow the order of the changes.
    known.sort_unstable_by_key(|k| k.0);
    let found: std::collections::HashSet<&str> = known.iter().map(|k| k.1.as_str()).collect();
    let unknown = op_ids
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .cloned()
        .collect();
    // A deleted item goes for good once nothing of it is left to acknowledge. Every
    // acknowledged item is looked at, not only those whose deletion this is: the
    // deletion's acknowledgement may come before that of an earlier change (one sent
    // again after a cut).
    let items = id_array(known.iter().map(|k| &k.2));
    forget_deleted(conn, &items)?;
    // What is left in the outbox of these items, in one statement for the whole
    // message: the latest operation of each item gives its state. An item with nothing
    // left reads as delivered (items::ITEM_COLUMNS): its row is not rewritten here.
    let mut left: std::collections::HashMap<String, (i64, String)> =
        std::collections::HashMap::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT item_id, seq, state FROM outbox WHERE item_id IN rarray(?1)")?;
        let mut rows = stmt.query([&items])?;
        while let Some(r) = rows.next()? {
            let (item_id, seq, state): (String, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            if left.get(&item_id).is_none_or(|(latest, _)| *latest < seq) {
                left.insert(item_id, (seq, state));
            }
        }
    }
    if !left.is_empty() {
        // More changes of these items wait: they stay blue, and they have been sent.
        let still = id_array(left.keys());
        conn.prepare_cached("UPDATE items SET sent = 1 WHERE id IN rarray(?1)")?
            .execute([&still])?;
    }
    let mut changes = Vec::with_capacity(known.len());
    let mut seen = std::collections::HashSet::new();
    for (_, _, item_id, work_order_id, kind, action) in known.into_iter().rev() {
        if !seen.insert(item_id.clone()) {
            continue;
        }
        let state = match left.get(&item_id) {
            Some((_, s)) => Some(SyncState::parse(s).unwrap_or(SyncState::Waiting)),
            None if action == "delete" => None,
            None => Some(SyncState::Delivered),
        };
        changes.push(StateChange {
            item_id,
            work_order_id,
            kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
            state,
            reason: None,
        });
    }
    changes.reverse();
    Ok((changes, unknown))
}

/// Removes the items among `ids` that were deleted and have nothing left to deliver. A
/// record whose photo stays (refused, waiting for the inspector) stays hidden with it, as
/// the photo's row names it; photos going in the same statement do not hold it, and a
/// record that waited only for the photos that went here goes after them.
pub fn forget_deleted(
    conn: &Connection,
    ids: &rusqlite::vtab::array::Array,
) -> Result<(), DomainError> {
    let parents = conn
        .prepare_cached(
            "DELETE FROM items WHERE id IN rarray(?1) AND deleted = 1
               AND NOT EXISTS (SELECT 1 FROM outbox WHERE item_id = items.id)
               AND NOT EXISTS (SELECT 1 FROM items c WHERE c.record_id = items.id
                                 AND NOT (c.id IN rarray(?1) AND c.deleted = 1
                                          AND NOT EXISTS (SELECT 1 FROM outbox WHERE item_id = c.id)))
             RETURNING record_id",
        )?
        .query_map([ids], |r| r.get::<_, Option<String>>(0))?
        .filter_map(|r| r.transpose())
        .collect::<Result<Vec<String>, _>>()?;
    if !parents.is_empty() {
        forget_deleted(conn, &id_array(parents.iter()))?;
    }
    Ok(())
}

/// Sequence numbers as an array for `rarray(?)`.
fn seq_array(seqs: &[i64]) -> rusqlite::vtab::array::Array {
    std::rc::Rc::new(
        seqs.iter()
            .map(|s| rusqlite::types::Value::Integer(*s))
            .collect(),
    )
}

/// A list of ids bound as one parameter (`rarray`), so a whole message is one statement.
pub(crate) fn id_array<'a>(
    ids: impl IntoIterator<Item = &'a String>,
) -> rusqlite::vtab::array::Array {
    std::rc::Rc::new(
        ids.into_iter()
            .map(|s| rusqlite::types::Value::Text(s.clone()))
            .collect(),
    )
}

/// The back office refused an operation: it stays on the device, red with the reason,
/// and holds back the later operations of its work order until it is fixed or discarded.
pub fn refuse(
    conn: &Connection,
    op_id: &str,
    reason: &str,
) -> Result<Option<StateChange>, DomainError> {
    let found: Option<(String, String, String, bool, String)> = conn
        .query_row(
            "SELECT o.item_id, o.work_order_id, o.item_kind, coalesce(i.deleted, 0), o.action
             FROM outbox o LEFT JOIN items i ON i.id = o.item_id WHERE o.op_id = ?1",
            [op_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((item_id, work_order_id, kind, deleted, action)) = found else {
        return Ok(None);
    };
    if deleted && action == "delete" {
        // The deletion itself was refused: the back office keeps the item, so the
        // inspector must see it again, red with the reason, to retry or discard.
        conn.execute("UPDATE items SET deleted = 0 WHERE id = ?1", [&item_id])?;
    } else if deleted {
        // The inspector deleted the item: a change of it that was not applied is one
        // less to undo, not one to fix. Turned red, it would hold back its work order
        // behind an item nobody can see.
        conn.execute("DELETE FROM outbox WHERE op_id = ?1", [op_id])?;
        forget_deleted(conn, &id_array([&item_id]))?;
        return Ok(None);
    }
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

/// Turns a refused deletion into an update of the item as it stands, with a fresh id, in
/// the deletion's place in the order.
pub fn resend_as_update(conn: &Connection, seq: i64) -> Result<(), DomainError> {
    conn.execute(
        "UPDATE outbox SET op_id = ?2, action = 'update', payload = NULL, state = 'waiting',
                reason = NULL, attempts = 0
         WHERE seq = ?1",
        params![seq, uuid::Uuid::now_v7().to_string()],
    )?;
    Ok(())
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
    // Held is the one answer that says the back office did not apply it and did not
    // keep its id: as far as anyone knows it was never sent, so an edit folds into it
    // (rather than a fix going out first and this older content after it). A body an
    // edit froze while it was out goes too: it would follow the fix with the old content,
    // and since its content changes, so does its id (an id names one content for ever).
    conn.execute(
        "UPDATE outbox SET state = 'waiting', attempts = 0,
                op_id = CASE WHEN payload IS NOT NULL AND action != 'delete'
                                  AND item_kind != 'photo' THEN ?2 ELSE op_id END,
                payload = CASE WHEN action != 'delete' AND item_kind != 'photo' THEN NULL
                               ELSE payload END
         WHERE op_id = ?1 AND state = 'in_progress'",
        params![op_id, uuid::Uuid::now_v7().to_string()],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(conn: &Connection, wo: &str, kind: ItemKind, action: Action) -> String {
        let body = serde_json::json!({"n": 1});
        append(conn, "item", wo, kind, action, Payload::Own(&body)).unwrap()
    }

    fn batch(conn: &Connection) -> Vec<(String, Option<String>)> {
        next_batch(conn, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|o| (o.op_id, o.prev))
            .collect()
    }

    #[test]
    fn each_operation_names_the_latest_unacknowledged_one_of_its_work_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let a1 = op(&conn, "A", ItemKind::Note, Action::Create);
        // A photo's bytes are not there: it waits, and it is nobody's predecessor.
        let _photo = op(&conn, "A", ItemKind::Photo, Action::Create);
        let a2 = op(&conn, "A", ItemKind::Defect, Action::Create);
        let b1 = op(&conn, "B", ItemKind::Note, Action::Create);
        let b2 = op(&conn, "B", ItemKind::Note, Action::Update);
        assert_eq!(
            batch(&conn),
            [
                (a1.clone(), None),
                (a2.clone(), Some(a1.clone())),
                (b1.clone(), None),
                (b2.clone(), Some(b1.clone())),
            ]
        );

        // Sent and not yet acknowledged, a1 is still a2's predecessor.
        let seq: i64 = conn
            .query_row("SELECT seq FROM outbox WHERE op_id = ?1", [&a1], |r| {
                r.get(0)
            })
            .unwrap();
        mark_sent(&conn, &[seq]).unwrap();
        assert_eq!(batch(&conn)[0], (a2.clone(), Some(a1.clone())));

        // Acknowledged, it is no one's.
        acknowledge(&conn, std::slice::from_ref(&a1)).unwrap();
        assert_eq!(batch(&conn)[0], (a2.clone(), None));

        // A refusal holds back its work order only.
        refuse(&conn, &b1, "conflict: stale").unwrap();
        assert_eq!(batch(&conn), [(a2, None)]);
    }

    #[test]
    fn a_photos_deletion_waits_until_its_creation_is_settled() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let body = serde_json::json!({"n": 1});
        let create = append(
            &conn,
            "p1",
            "A",
            ItemKind::Photo,
            Action::Create,
            Payload::Own(&body),
        )
        .unwrap();
        let seq: i64 = conn
            .query_row("SELECT seq FROM outbox WHERE op_id = ?1", [&create], |r| {
                r.get(0)
            })
            .unwrap();
        mark_sent(&conn, &[seq]).unwrap();
        let delete = append(
            &conn,
            "p1",
            "A",
            ItemKind::Photo,
            Action::Delete,
            Payload::Own(&body),
        )
        .unwrap();
        assert_eq!(batch(&conn), [], "sent while its creation is unsettled");
        acknowledge(&conn, std::slice::from_ref(&create)).unwrap();
        assert_eq!(batch(&conn), [(delete, None)]);
    }
}

#[cfg(test)]
mod plan_tests {
    use rusqlite::Connection;

    /// The plan SQLite picks, one line per step.
    fn plan(conn: &Connection, sql: &str) -> String {
        let ids: rusqlite::vtab::array::Array = std::rc::Rc::new(Vec::new());
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map([&ids], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows.join("\n")
    }

    #[test]
    fn acknowledging_looks_items_up_by_index_not_by_scanning_the_outbox() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let left = plan(
            &conn,
            "SELECT item_id, seq, state FROM outbox WHERE item_id IN rarray(?1)",
        );
        assert!(left.contains("USING INDEX outbox_by_item"), "{left}");
        let sent = plan(&conn, "UPDATE items SET sent = 1 WHERE id IN rarray(?1)");
        assert!(!sent.contains("SCAN items"), "{sent}");
    }
}
