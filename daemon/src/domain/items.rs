//! What the inspector captures: records (completed work, checklist answers, defects,
//! notes), photos attached to them, and stage moves; their edits and deletes while they
//! are not yet delivered.

use rusqlite::{params, Connection, OptionalExtension};
use ui_bridge::{ExportCursor, Item, ItemKind, RecordBody, SyncState};

use super::outbox::{self, Action};
use super::work_orders::{self, WorkOrderDoc};
use super::DomainError;
use crate::store::now_ms;
use crate::store::photos::StoredPhoto;

/// An item's sync state as SQL. It follows the item's operations: "in progress" while
/// one is out and unacknowledged, "delivered" once none is left; sending and
/// acknowledging touch only the outbox. A stored `refused` (or `delivered`, from
/// before) stands as it is. A macro, so that queries can be built from it at compile
/// time.
macro_rules! item_state {
    () => {
        "CASE WHEN sync_state != 'waiting' THEN sync_state
         WHEN NOT EXISTS (SELECT 1 FROM outbox o WHERE o.item_id = items.id) THEN 'delivered'
         WHEN EXISTS (SELECT 1 FROM outbox o
              WHERE o.item_id = items.id AND o.state = 'in_progress') THEN 'in_progress'
         ELSE 'waiting' END"
    };
}
/// An item's columns, its sync state among them.
pub(crate) const ITEM_COLUMNS: &str = concat!(
    "id, work_order_id, kind, record_id, body, ",
    item_state!(),
    ", reason, created_ms, updated_ms"
);

/// Items on the device by sync state, and the refused ones (at most `refused_max`).
pub fn census(
    conn: &Connection,
    refused_max: u32,
) -> Result<
    (
        std::collections::BTreeMap<String, u64>,
        Vec<ui_bridge::RefusedItem>,
    ),
    DomainError,
> {
    let mut by_state = std::collections::BTreeMap::new();
    let mut stmt = conn.prepare(concat!(
        "SELECT state, count(*) FROM (SELECT ",
        item_state!(),
        " AS state FROM items WHERE deleted = 0) GROUP BY state"
    ))?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (state, n) = row?;
        by_state.insert(state, n as u64);
    }
    let mut stmt = conn.prepare(
        "SELECT id, work_order_id, kind, reason FROM items
         WHERE deleted = 0 AND sync_state = 'refused' ORDER BY updated_ms LIMIT ?1",
    )?;
    let refused = stmt
        .query_map([refused_max], |r| {
            let kind: String = r.get(2)?;
            Ok(ui_bridge::RefusedItem {
                item_id: r.get(0)?,
                work_order_id: r.get(1)?,
                kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
                reason: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((by_state, refused))
}

fn item_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    let kind: String = r.get(2)?;
    let body: String = r.get(4)?;
    let state: String = r.get(5)?;
    Ok(Item {
        id: r.get(0)?,
        work_order_id: r.get(1)?,
        kind: ItemKind::parse(&kind).unwrap_or(ItemKind::Note),
        record_id: r.get(3)?,
        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        state: SyncState::parse(&state).unwrap_or(SyncState::Waiting),
        reason: r.get(6)?,
        created_ms: r.get(7)?,
        updated_ms: r.get(8)?,
    })
}

pub fn load_item(conn: &Connection, id: &str) -> Result<Item, DomainError> {
    conn.prepare_cached(&format!(
        "SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1 AND deleted = 0"
    ))?
    .query_row([id], item_row)
    .optional()?
    .ok_or_else(|| DomainError::UnknownItem(id.to_owned()))
}

pub fn load_items_of(conn: &Connection, work_order_id: &str) -> Result<Vec<Item>, DomainError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {ITEM_COLUMNS} FROM items WHERE work_order_id = ?1 AND deleted = 0 ORDER BY created_ms, id"
    ))?;
    let items = stmt
        .query_map([work_order_id], item_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(items)
}

/// The most an export page may carry: a page is one frame on the socket.
pub const EXPORT_PAGE_MAX: u32 = 1000;

/// One page of the items captured in `[since_ms, until_ms)` that are still on the
/// device, by creation time then id, starting after `after`; and where the next page
/// starts, when this one is full.
pub fn export_page(
    conn: &Connection,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    after: Option<&ExportCursor>,
    limit: Option<u32>,
) -> Result<(Vec<Item>, Option<ExportCursor>), DomainError> {
    let limit = limit.unwrap_or(100);
    if !(1..=EXPORT_PAGE_MAX).contains(&limit) {
        return Err(DomainError::BadRequest(format!(
            "export: limit must be from 1 to {EXPORT_PAGE_MAX}, not {limit}"
        )));
    }
    if let (Some(since), Some(until)) = (since_ms, until_ms) {
        if since > until {
            return Err(DomainError::BadRequest(format!(
                "export: the range ends ({until}) before it starts ({since})"
            )));
        }
    }
    let (after_ms, after_id) = after.map_or((i64::MIN, ""), |c| (c.created_ms, c.id.as_str()));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ITEM_COLUMNS} FROM items
         WHERE deleted = 0 AND created_ms >= ?1 AND created_ms < ?2
           AND (created_ms > ?3 OR (created_ms = ?3 AND id > ?4))
         ORDER BY created_ms, id LIMIT ?5"
    ))?;
    let items = stmt
        .query_map(
            params![
                since_ms.unwrap_or(i64::MIN),
                until_ms.unwrap_or(i64::MAX),
                after_ms,
                after_id,
                limit
            ],
            item_row,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let next = (items.len() == limit as usize)
        .then(|| items.last())
        .flatten()
        .map(|last| ExportCursor {
            created_ms: last.created_ms,
            id: last.id.clone(),
        });
    Ok((items, next))
}

pub(super) fn insert_item(
    conn: &Connection,
    work_order_id: &str,
    kind: ItemKind,
    record_id: Option<&str>,
    body: &serde_json::Value,
    photo_sha256: Option<&str>,
) -> Result<Item, DomainError> {
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO items (id, work_order_id, kind, record_id, body, photo_sha256, sync_state, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'waiting', ?7, ?7)",
    )?
    .execute(params![id, work_order_id, kind.as_str(), record_id, body.to_string(), photo_sha256, now])?;
    Ok(Item {
        id,
        work_order_id: work_order_id.to_owned(),
        kind,
        record_id: record_id.map(String::from),
        body: body.clone(),
        state: SyncState::Waiting,
        reason: None,
        created_ms: now,
        updated_ms: now,
    })
}

fn body_json(record: &RecordBody) -> Result<serde_json::Value, DomainError> {
    serde_json::to_value(record).map_err(|e| DomainError::InvalidRecord(e.to_string()))
}

/// Whether `text` shows anything: not only spaces, control characters or invisible
/// format characters (zero-width space and joiners, the byte-order mark, a soft hyphen).
fn shows_something(text: &str) -> bool {
    text.chars().any(|c| {
        !(c.is_whitespace()
            || c.is_control()
            || matches!(c, '\u{00AD}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'))
    })
}

/// Integers beyond this lose digits as JSON numbers in many back offices (JavaScript's
/// doubles), so a checklist answer is refused rather than stored and sent rounded.
const SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Checks a record against its work order (checklist answers name template items and
/// have the right type) and against common sense (no empty text).
pub fn validate_record(doc: &WorkOrderDoc, record: &RecordBody) -> Result<(), DomainError> {
    let bad = |m: String| Err(DomainError::InvalidRecord(m));
    match record {
        RecordBody::CompletedWork {
            description,
            materials,
            ..
        } => {
            if !shows_something(description) {
                return bad("completed work needs a description".into());
            }
            for m in materials {
                if !shows_something(&m.name)
                    || !shows_something(&m.unit)
                    || !m.quantity.is_finite()
                    || !(0.0..=SAFE_INTEGER).contains(&m.quantity)
                {
                    return bad(format!(
                        "material {:?}: needs a name, a unit and a quantity of zero or more",
                        m.name
                    ));
                }
            }
        }
        RecordBody::Checklist { answers } => {
            if answers.is_empty() {
                return bad("a checklist record needs at least one answer".into());
            }
            let mut seen = std::collections::HashSet::new();
            for a in answers {
                let Some(item) = doc.checklist.iter().find(|c| c.id == a.item_id) else {
                    return bad(format!(
                        "work order {} has no checklist item {:?}",
                        doc.id, a.item_id
                    ));
                };
                if !seen.insert(&a.item_id) {
                    return bad(format!("checklist item {:?} is answered twice", a.item_id));
                }
                let fits = match item.answer.as_str() {
                    "bool" => a.value.is_boolean(),
                    "number" => a
                        .value
                        .as_f64()
                        .is_some_and(|n| n.is_finite() && n.abs() <= SAFE_INTEGER),
                    _ => a.value.as_str().is_some_and(shows_something),
                };
                if !fits {
                    return bad(format!(
                        "checklist item {:?} takes a {} answer, not {}",
                        a.item_id, item.answer, a.value
                    ));
                }
            }
        }
        RecordBody::Defect { title, .. } => {
            if !shows_something(title) {
                return bad("a defect needs a title".into());
            }
        }
        RecordBody::Note { text } => {
            if !shows_something(text) {
                return bad("a note needs some text".into());
            }
        }
    }
    Ok(())
}

/// Captures a record: validated now, acknowledged once its journal row is durable.
pub fn add_record(
    conn: &Connection,
    work_order_id: &str,
    record: &RecordBody,
) -> Result<Item, DomainError> {
    // Only checklist answers need the work order's document; the other kinds need only
    // to know it exists, which keeps the capture path short.
    if matches!(record, RecordBody::Checklist { .. }) {
        validate_record(&work_orders::doc(conn, work_order_id)?, record)?;
    } else {
        work_orders::ensure_exists(conn, work_order_id)?;
        validate_record(&WorkOrderDoc::placeholder(work_order_id), record)?;
    }
    super::journal::stage(conn, work_order_id, record)
}

/// Replaces an undelivered record's content. If its operations have not been sent, the
/// edit folds into them (a refused one becomes waiting again: that is the resend);
/// otherwise an update operation follows them.
pub fn edit_record(
    conn: &Connection,
    item_id: &str,
    record: &RecordBody,
) -> Result<Item, DomainError> {
    let item = load_item(conn, item_id)?;
    if !item.kind.is_record() {
        return Err(DomainError::NotEditable(format!(
            "item {item_id} is a {}; only records can be edited",
            item.kind.as_str()
        )));
    }
    if record.kind() != item.kind {
        return Err(DomainError::InvalidRecord(format!(
            "item {item_id} is a {} record; an edit cannot make it a {}",
            item.kind.as_str(),
            record.kind().as_str()
        )));
    }
    if item.state == SyncState::Delivered {
        return Err(DomainError::AlreadyDelivered(item_id.to_owned()));
    }
    let doc = work_orders::doc(conn, &item.work_order_id)?;
    validate_record(&doc, record)?;
    let body = body_json(record)?;
    outbox::freeze_sent(conn, item_id)?;
    if outbox::fold_edit(conn, item_id)? == 0 {
        outbox::append(
            conn,
            item_id,
            &item.work_order_id,
            item.kind,
            Action::Update,
            outbox::Payload::Body,
        )?;
    }
    conn.execute(
        "UPDATE items SET body = ?2, sync_state = 'waiting', reason = NULL, updated_ms = ?3 WHERE id = ?1",
        params![item_id, body.to_string(), now_ms()],
    )?;
    load_item(conn, item_id)
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq)]
pub struct Deleted {
    pub item: Item,
    /// True when nothing about the item ever left the device, so nothing will be sent.
    pub sent_nothing: bool,
    /// Items removed with it (the photos of a deleted record).
    pub also_removed: Vec<Item>,
}

pub fn delete_item(conn: &Connection, item_id: &str) -> Result<Deleted, DomainError> {
    let item = load_item(conn, item_id)?;
    if item.kind == ItemKind::Stage {
        return Err(DomainError::NotEditable(
            "a stage move cannot be deleted".into(),
        ));
    }
    if item.state == SyncState::Delivered {
        return Err(DomainError::AlreadyDelivered(item_id.to_owned()));
    }
    let mut also_removed = Vec::new();
    if item.kind.is_record() {
        let mut stmt = conn.prepare(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE record_id = ?1 AND deleted = 0"
        ))?;
        let photos = stmt
            .query_map([item_id], item_row)?
            .collect::<Result<Vec<_>, _>>()?;
        for photo in photos {
            forget_or_send_delete(conn, &photo)?;
            also_removed.push(photo);
        }
    }
    let sent_nothing = forget_or_send_delete(conn, &item)?;
    Ok(Deleted {
        item,
        sent_nothing,
        also_removed,
    })
}

/// An item nothing of which has left the device is removed with its operations. One that
/// may have reached the back office keeps a hidden row and gets a delete operation.
/// Returns whether nothing was ever sent.
fn forget_or_send_delete(conn: &Connection, item: &Item) -> Result<bool, DomainError> {
    // Sent: acknowledged once, or an operation went out (acknowledged or not).
    let sent: bool = conn.query_row(
        "SELECT sent OR EXISTS (SELECT 1 FROM outbox WHERE item_id = ?1 AND attempts > 0)
         FROM items WHERE id = ?1",
        [&item.id],
        |r| r.get(0),
    )?;
    if !sent {
        conn.execute("DELETE FROM outbox WHERE item_id = ?1", [&item.id])?;
        conn.execute("DELETE FROM items WHERE id = ?1", [&item.id])?;
        return Ok(true);
    }
    // Operations not yet sent are superseded by the delete; one in flight stays so its
    // acknowledgement still finds it.
    conn.execute(
        "DELETE FROM outbox WHERE item_id = ?1 AND state != 'in_progress'",
        [&item.id],
    )?;
    outbox::append(
        conn,
        &item.id,
        &item.work_order_id,
        item.kind,
        Action::Delete,
        outbox::Payload::Own(&serde_json::json!({})),
    )?;
    conn.execute(
        "UPDATE items SET deleted = 1, sync_state = 'waiting', updated_ms = ?2 WHERE id = ?1",
        params![item.id, now_ms()],
    )?;
    Ok(false)
}

/// Records a photo already stored durably by [`crate::store::PhotoDir::ingest`] as an
/// item of `record_id`.
pub fn attach_photo(
    conn: &Connection,
    record_id: &str,
    photo: &StoredPhoto,
    mime: Option<&str>,
    caption: Option<&str>,
) -> Result<Item, DomainError> {
    let record = load_item(conn, record_id)?;
    if !record.kind.is_record() {
        return Err(DomainError::NotEditable(format!(
            "photos attach to records; item {record_id} is a {}",
            record.kind.as_str()
        )));
    }
    let body = serde_json::json!({
        "sha256": photo.sha256,
        "size": photo.size,
        "mime": mime.unwrap_or("image/jpeg"),
        "caption": caption,
    });
    let item = insert_item(
        conn,
        &record.work_order_id,
        ItemKind::Photo,
        Some(record_id),
        &body,
        Some(&photo.sha256),
    )?;
    let mut payload = body;
    payload["record_id"] = serde_json::Value::String(record_id.to_owned());
    outbox::append(
        conn,
        &item.id,
        &record.work_order_id,
        ItemKind::Photo,
        Action::Create,
        outbox::Payload::Own(&payload),
    )?;
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::work_orders::{advance, upsert};
    use ui_bridge::{ChecklistAnswer, ChecklistItem, Severity};

    fn conn_with_work_order() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let doc = WorkOrderDoc {
            id: "WO-1".into(),
            version: 1,
            title: "Pump".into(),
            stage: "new".into(),
            workflow: vec!["new".into(), "accepted".into(), "done".into()],
            scheduled_for: None,
            description: None,
            site: None,
            checklist: vec![ChecklistItem {
                id: "c1".into(),
                text: "Valve closed?".into(),
                answer: "bool".into(),
            }],
            attachments: vec![],
        };
        upsert(&conn, &doc).unwrap();
        conn
    }

    /// Rows in `items`, hidden ones included.
    fn item_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap()
    }

    /// The id of `item`'s operation doing `action`.
    fn op_of(conn: &Connection, item: &str, action: &str) -> String {
        conn.query_row(
            "SELECT op_id FROM outbox WHERE item_id = ?1 AND action = ?2",
            [item, action],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// A record with a photo attached, whose bytes are named by `hex` repeated.
    fn record_with_photo(conn: &Connection, hex: &str) -> (Item, Item) {
        let record = add_record(conn, "WO-1", &note("a")).unwrap();
        let photo = StoredPhoto {
            sha256: hex.repeat(32),
            size: 3,
        };
        let p = attach_photo(conn, &record.id, &photo, None, None).unwrap();
        (record, p)
    }

    fn note(t: &str) -> RecordBody {
        RecordBody::Note { text: t.into() }
    }

    /// A capture as the rest of the daemon sees it: folded out of the journal.
    fn add_record(conn: &Connection, wo: &str, r: &RecordBody) -> Result<Item, DomainError> {
        let item = super::add_record(conn, wo, r)?;
        crate::domain::journal::fold(conn)?;
        Ok(item)
    }

    /// Marks every queued operation as having left the device.
    fn send_all(conn: &Connection) {
        let seqs: Vec<i64> = conn
            .prepare("SELECT seq FROM outbox")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        outbox::mark_sent(conn, &seqs).unwrap();
    }

    /// Action, state and what each operation would carry, oldest first.
    fn ops(conn: &Connection) -> Vec<(String, String, String)> {
        conn.prepare(&format!(
            "SELECT action, state, {} FROM outbox ORDER BY seq",
            outbox::PAYLOAD_COLUMN
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    #[test]
    fn an_edit_after_a_refused_creation_fixes_it_and_the_update_behind_it() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("first")).unwrap();
        // The creation leaves, an edit queues an update behind it, the creation is refused.
        send_all(&conn);
        edit_record(&conn, &item.id, &note("second")).unwrap();
        let create_id: String = conn
            .query_row(
                "SELECT op_id FROM outbox WHERE action = 'create'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        outbox::refuse(&conn, &create_id, "validation: text too vague").unwrap();
        assert_eq!(
            load_item(&conn, &item.id).unwrap().state,
            SyncState::Refused
        );

        let fixed = edit_record(&conn, &item.id, &note("third, precise")).unwrap();
        assert_eq!(fixed.state, SyncState::Waiting);
        let all = ops(&conn);
        assert_eq!(all.len(), 2, "{all:?}");
        for (action, state, payload) in &all {
            assert_eq!(state, "waiting", "{action}");
            assert!(payload.contains("third, precise"), "{action}: {payload}");
        }
    }

    #[test]
    fn an_edit_folds_into_the_waiting_operation() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        edit_record(&conn, &item.id, &note("b")).unwrap();
        let all = ops(&conn);
        assert_eq!(all.len(), 1);
        assert!(all[0].2.contains("\"b\""), "{all:?}");
        // The body is stored once, in the item.
        let copies: i64 = conn
            .query_row(
                "SELECT count(*) FROM outbox WHERE payload IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(copies, 0);
    }

    #[test]
    fn an_edit_after_a_lost_connection_never_rewrites_what_was_sent() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        // Sent, then the connection dropped before the acknowledgement: the creation
        // waits to go again, and the back office may already have applied it.
        send_all(&conn);
        outbox::requeue_in_flight(&conn).unwrap();
        edit_record(&conn, &item.id, &note("b")).unwrap();
        let all = ops(&conn);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].0, "create");
        assert!(all[0].2.contains("\"a\""), "resent as it was sent: {all:?}");
        assert_eq!(all[1].0, "update");
        assert!(all[1].2.contains("\"b\""), "{all:?}");
    }

    #[test]
    fn acknowledged_items_read_as_delivered() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        let ids: Vec<String> = outbox::list(&conn, None)
            .unwrap()
            .into_iter()
            .map(|o| o.op_id)
            .collect();
        let (changes, unknown) = outbox::acknowledge(&conn, &ids).unwrap();
        assert!(unknown.is_empty());
        assert_eq!(changes[0].state, Some(SyncState::Delivered));
        assert_eq!(
            load_item(&conn, &item.id).unwrap().state,
            SyncState::Delivered
        );
        assert!(matches!(
            edit_record(&conn, &item.id, &note("b")),
            Err(DomainError::AlreadyDelivered(_))
        ));
    }

    #[test]
    fn an_edit_after_sending_appends_an_update() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        conn.execute("UPDATE outbox SET state = 'in_progress'", [])
            .unwrap();
        conn.execute("UPDATE items SET sent = 1", []).unwrap();
        edit_record(&conn, &item.id, &note("b")).unwrap();
        let ops = outbox::list(&conn, None).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.action.as_str()).collect::<Vec<_>>(),
            ["create", "update"]
        );
    }

    #[test]
    fn deleting_an_unsent_record_sends_nothing_and_takes_its_photos() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        let photo = StoredPhoto {
            sha256: "ab".repeat(32),
            size: 3,
        };
        attach_photo(&conn, &item.id, &photo, None, None).unwrap();
        let d = delete_item(&conn, &item.id).unwrap();
        assert!(d.sent_nothing);
        assert_eq!(d.also_removed.len(), 1);
        let gone: String = conn
            .query_row("SELECT sha256 FROM photos_gone", [], |r| r.get(0))
            .unwrap();
        assert_eq!(gone, "ab".repeat(32));
        assert_eq!(outbox::unsent_count(&conn).unwrap(), 0);
    }

    /// The last row naming a photo notes its file for removal and drops its upload
    /// progress; a photo still named elsewhere, or attached again, is not noted.
    #[test]
    fn a_photo_is_noted_gone_with_its_last_row_only() {
        let conn = conn_with_work_order();
        let gone = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn.prepare("SELECT sha256 FROM photos_gone").unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let (first, _) = record_with_photo(&conn, "cd");
        let (twin, _) = record_with_photo(&conn, "cd");
        conn.execute(
            "INSERT INTO photo_uploads (sha256, size, acked, complete) VALUES (?1, 3, 3, 1)",
            ["cd".repeat(32)],
        )
        .unwrap();
        delete_item(&conn, &first.id).unwrap();
        assert!(gone(&conn).is_empty(), "its twin still names it");
        delete_item(&conn, &twin.id).unwrap();
        assert_eq!(gone(&conn), vec!["cd".repeat(32)]);
        let uploads: i64 = conn
            .query_row("SELECT count(*) FROM photo_uploads", [], |r| r.get(0))
            .unwrap();
        assert_eq!(uploads, 0, "a later attach uploads the bytes again");
        record_with_photo(&conn, "cd");
        assert!(gone(&conn).is_empty(), "attached again, it stays");
    }

    #[test]
    fn deleting_a_sent_record_queues_a_delete() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        conn.execute("UPDATE outbox SET state = 'in_progress'", [])
            .unwrap();
        conn.execute("UPDATE items SET sent = 1", []).unwrap();
        let d = delete_item(&conn, &item.id).unwrap();
        assert!(!d.sent_nothing);
        let ops = outbox::list(&conn, None).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.action.as_str()).collect::<Vec<_>>(),
            ["create", "delete"]
        );
        assert!(matches!(
            load_item(&conn, &item.id),
            Err(DomainError::UnknownItem(_))
        ));

        // The deletion's acknowledgement may come first (the creation went again after a
        // cut): the hidden row goes only with the last one.
        let id_of = |action: &str| {
            ops.iter()
                .find(|o| o.action == action)
                .unwrap()
                .op_id
                .clone()
        };
        outbox::acknowledge(&conn, &[id_of("delete")]).unwrap();
        assert_eq!(item_rows(&conn), 1);
        outbox::acknowledge(&conn, &[id_of("create")]).unwrap();
        assert_eq!(item_rows(&conn), 0);
    }

    #[test]
    fn a_deleted_record_waits_for_its_refused_photo_and_goes_with_it() {
        let conn = conn_with_work_order();
        let (record, p) = record_with_photo(&conn, "cd");
        // Both creations went out; then the inspector deleted the record (and with it
        // the photo), and the deletions went out too.
        conn.execute("UPDATE outbox SET state = 'in_progress', attempts = 1", [])
            .unwrap();
        delete_item(&conn, &record.id).unwrap();
        conn.execute(
            "UPDATE outbox SET state = 'in_progress', attempts = 1 WHERE action = 'delete'",
            [],
        )
        .unwrap();
        let id = |item: &str, action: &str| op_of(&conn, item, action);
        // The record's acknowledgements come first: its row cannot go while the
        // photo's, which names it, stays.
        outbox::acknowledge(&conn, &[id(&record.id, "create"), id(&record.id, "delete")])
            .expect("acknowledged");
        assert_eq!(item_rows(&conn), 2);
        // Then the photo's: both go.
        outbox::acknowledge(&conn, &[id(&p.id, "create"), id(&p.id, "delete")]).unwrap();
        assert_eq!(item_rows(&conn), 0);
    }

    #[test]
    fn a_refused_change_of_a_deleted_item_is_dropped_not_held() {
        let conn = conn_with_work_order();
        let (record, p) = record_with_photo(&conn, "ef");
        conn.execute("UPDATE outbox SET state = 'in_progress', attempts = 1", [])
            .unwrap();
        delete_item(&conn, &record.id).unwrap();
        let id = |item: &str, action: &str| op_of(&conn, item, action);
        // The back office refuses the photo and acknowledges the rest, the deletion of
        // the photo it never applied included.
        assert_eq!(
            outbox::refuse(&conn, &id(&p.id, "create"), "forbidden: no").unwrap(),
            None
        );
        outbox::acknowledge(
            &conn,
            &[
                id(&record.id, "create"),
                id(&record.id, "delete"),
                id(&p.id, "delete"),
            ],
        )
        .unwrap();
        let left: i64 = conn
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        // Nothing refused is left to hold the work order back.
        assert_eq!(outbox::unsent_count(&conn).unwrap(), 0);
    }

    /// What a taken batch carries under an operation's id is what the device keeps for
    /// that id, whatever is edited or deleted once it is taken.
    #[test]
    fn a_taken_batch_is_what_its_ids_carry_from_then_on() {
        let conn = conn_with_work_order();
        let kept = add_record(&conn, "WO-1", &note("first")).unwrap();
        let gone = add_record(&conn, "WO-1", &note("to delete")).unwrap();
        let batch = outbox::take_batch(&conn, 10, 1 << 20).unwrap();
        assert_eq!(batch.len(), 2);
        edit_record(&conn, &kept.id, &note("second")).unwrap();
        let deleted = delete_item(&conn, &gone.id).unwrap();
        assert!(!deleted.sent_nothing, "its creation is in a message");
        let now = ops(&conn);
        assert_eq!(
            now[0].2, batch[0].payload,
            "the creation keeps what was sent"
        );
        assert_eq!(now[1].2, batch[1].payload);
        assert!(
            now.iter()
                .any(|(a, _, p)| a == "update" && p.contains("second")),
            "{now:?}"
        );
        assert!(now.iter().any(|(a, _, _)| a == "delete"), "{now:?}");
    }

    /// Taken and cut from the message, an operation is open to edits again.
    #[test]
    fn an_operation_put_back_takes_edits_again() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("first")).unwrap();
        let batch = outbox::take_batch(&conn, 10, 1 << 20).unwrap();
        outbox::put_back(&conn, &[batch[0].seq]).unwrap();
        edit_record(&conn, &item.id, &note("second")).unwrap();
        let now = ops(&conn);
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!(now[0].1, "waiting");
        assert!(now[0].2.contains("second"));
    }

    /// The creation is refused and the update behind it, out with a body an edit froze,
    /// is held: the update follows the fix with the fixed content, not the frozen one.
    #[test]
    fn a_held_update_frozen_while_out_follows_the_fix() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("first")).unwrap();
        send_all(&conn);
        edit_record(&conn, &item.id, &note("second")).unwrap();
        send_all(&conn);
        let all = outbox::list(&conn, None).unwrap();
        let (create, update) = (all[0].op_id.clone(), all[1].op_id.clone());
        outbox::refuse(&conn, &create, "validation: no").unwrap();
        // Fixed before the update's answer comes: its body is frozen as sent.
        edit_record(&conn, &item.id, &note("fixed")).unwrap();
        outbox::requeue_op(&conn, &update).unwrap();
        let batch = outbox::next_batch(&conn, 10, 1 << 20).unwrap();
        let payloads: Vec<&str> = batch.iter().map(|o| o.payload.as_str()).collect();
        assert!(payloads.iter().all(|p| p.contains("fixed")), "{payloads:?}");
        // Its content changed, so its id did too.
        assert!(batch.iter().all(|o| o.op_id != update), "{batch:?}");
    }

    /// A refused stage move discarded takes the moves queued behind it along and puts
    /// the work order at the back office's stage (here one the refusal brought), so
    /// the inspector can move on from where the office stands.
    #[test]
    fn a_discarded_stage_move_takes_the_later_ones_and_the_office_stage() {
        let conn = conn_with_work_order();
        let first = crate::domain::work_orders::advance(&conn, "WO-1", "accepted").unwrap();
        let second = crate::domain::work_orders::advance(&conn, "WO-1", "done").unwrap();
        send_all(&conn);
        outbox::refuse(
            &conn,
            &op_of(&conn, &first.id, "create"),
            "conflict: closed",
        )
        .unwrap();
        // The refusal's version of the work order: the office put it back to "new" at v2.
        conn.execute(
            "UPDATE work_orders SET version = 2, doc = json_set(doc, '$.stage', 'new', '$.version', 2)",
            [],
        )
        .unwrap();
        let d = discard(&conn, &first.id).unwrap();
        assert!(d.stage_reverted);
        assert_eq!(
            d.also_removed
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            [second.id.as_str()]
        );
        let stage: String = conn
            .query_row("SELECT stage FROM work_orders WHERE id = 'WO-1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stage, "new");
        assert_eq!(outbox::unsent_count(&conn).unwrap(), 0);
        assert_eq!(item_rows(&conn), 0);
    }

    /// With no newer version since the move (the one before it delivered, no push
    /// after), a discarded stage move goes back to where it started, not to the stage
    /// of the last version pushed.
    #[test]
    fn a_discarded_stage_move_with_no_newer_version_goes_back_to_its_start() {
        let conn = conn_with_work_order();
        let first = crate::domain::work_orders::advance(&conn, "WO-1", "accepted").unwrap();
        send_all(&conn);
        outbox::acknowledge(&conn, &[op_of(&conn, &first.id, "create")]).unwrap();
        let second = crate::domain::work_orders::advance(&conn, "WO-1", "done").unwrap();
        send_all(&conn);
        outbox::refuse(&conn, &op_of(&conn, &second.id, "create"), "validation: no").unwrap();
        discard(&conn, &second.id).unwrap();
        let stage: String = conn
            .query_row("SELECT stage FROM work_orders WHERE id = 'WO-1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stage, "accepted");
    }

    /// The back office refuses a deletion (it keeps the item): the item shows again,
    /// red, instead of vanishing from the device alone. Sent again, it hides again;
    /// discarded, it stays and its content goes once more, in the deletion's place.
    #[test]
    fn a_refused_deletion_brings_the_item_back_red() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("sent")).unwrap();
        send_all(&conn);
        delete_item(&conn, &item.id).unwrap();
        send_all(&conn);
        let delete = op_of(&conn, &item.id, "delete");
        outbox::acknowledge(&conn, &[op_of(&conn, &item.id, "create")]).unwrap();
        outbox::refuse(&conn, &delete, "forbidden: the job is closed").unwrap();
        let shown = load_item(&conn, &item.id).expect("shown again");
        assert_eq!(shown.state, SyncState::Refused);
        let retried = retry(&conn, &item.id).unwrap();
        assert_eq!(retried.state, SyncState::Waiting);
        assert!(
            load_item(&conn, &item.id).is_err(),
            "hidden while its deletion goes"
        );
        let again = op_of(&conn, &item.id, "delete");
        assert_ne!(again, delete, "retried under a fresh id");
        assert_eq!(
            outbox::refuse(&conn, &delete, "forbidden: a late copy").unwrap(),
            None,
            "a late copy of the first refusal turns nothing red"
        );
        let delete = again;
        send_all(&conn);
        outbox::refuse(&conn, &delete, "forbidden: still closed").unwrap();
        let later = add_record(&conn, "WO-1", &note("captured after")).unwrap();
        let d = discard(&conn, &item.id).unwrap();
        // Its content goes once more, so that the office has what the device shows,
        // before what was captured after the deletion.
        assert_eq!(d.item.map(|i| i.state), Some(SyncState::Waiting));
        let batch = outbox::next_batch(&conn, 10, 1 << 20).unwrap();
        assert_eq!(
            batch.iter().map(|o| o.item_id.as_str()).collect::<Vec<_>>(),
            [item.id.as_str(), later.id.as_str()]
        );
        assert_ne!(batch[0].op_id, delete, "a new id: the refused one is spent");
        outbox::acknowledge(&conn, &[batch[1].op_id.clone()]).unwrap();
        assert_eq!(
            ops(&conn)
                .iter()
                .map(|(a, _, p)| (a.as_str(), p.contains("sent")))
                .collect::<Vec<_>>(),
            [("update", true)]
        );
        assert!(load_item(&conn, &item.id).is_ok());
    }

    /// A refused edit discarded while a later one is out: the item follows that one,
    /// and turns delivered with its acknowledgement instead of staying in progress.
    #[test]
    fn a_discarded_edit_leaves_the_item_following_its_operations() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("first")).unwrap();
        send_all(&conn);
        edit_record(&conn, &item.id, &note("second")).unwrap();
        send_all(&conn);
        outbox::acknowledge(&conn, &[op_of(&conn, &item.id, "create")]).unwrap();
        let update = op_of(&conn, &item.id, "update");
        outbox::refuse(&conn, &update, "validation: no").unwrap();
        edit_record(&conn, &item.id, &note("third")).unwrap();
        // The fix went into the refused update; a later edit makes one more.
        send_all(&conn);
        edit_record(&conn, &item.id, &note("fourth")).unwrap();
        send_all(&conn);
        // The fix went under a fresh id: the old one may have been judged already.
        let ops = outbox::list(&conn, None).unwrap();
        assert!(ops.iter().all(|o| o.op_id != update));
        let refused = ops.iter().find(|o| o.action == "update").unwrap();
        outbox::refuse(&conn, &refused.op_id, "validation: still no").unwrap();
        let d = discard(&conn, &item.id).unwrap();
        assert_eq!(d.item.unwrap().state, SyncState::InProgress);
        let left: Vec<String> = outbox::list(&conn, None)
            .unwrap()
            .into_iter()
            .map(|o| o.op_id)
            .collect();
        outbox::acknowledge(&conn, &left).unwrap();
        assert_eq!(
            load_item(&conn, &item.id).unwrap().state,
            SyncState::Delivered
        );
    }

    #[test]
    fn a_fix_after_a_refusal_reaches_the_held_update_too() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("first")).unwrap();
        let seqs = |conn: &Connection| -> Vec<i64> {
            let mut stmt = conn
                .prepare("SELECT seq FROM outbox WHERE state = 'waiting'")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        outbox::mark_sent(&conn, &seqs(&conn)).unwrap();
        edit_record(&conn, &item.id, &note("second")).unwrap();
        outbox::mark_sent(&conn, &seqs(&conn)).unwrap();
        let ops = outbox::list(&conn, None).unwrap();
        let (create, update) = (ops[0].op_id.clone(), ops[1].op_id.clone());
        // The back office refuses the creation and holds the update behind it.
        outbox::refuse(&conn, &create, "validation: no").unwrap();
        outbox::requeue_op(&conn, &update).unwrap();
        // Editing a refused item sends it again as it stands.
        edit_record(&conn, &item.id, &note("fixed")).unwrap();
        let batch = outbox::next_batch(&conn, 10, 1 << 20).unwrap();
        assert_eq!(batch.len(), 2);
        for op in &batch {
            assert!(op.payload.contains("fixed"), "{}: {}", op.op_id, op.payload);
        }
    }

    #[test]
    fn delivered_items_do_not_change() {
        let conn = conn_with_work_order();
        let item = add_record(&conn, "WO-1", &note("a")).unwrap();
        conn.execute("DELETE FROM outbox", []).unwrap();
        conn.execute("UPDATE items SET sync_state = 'delivered'", [])
            .unwrap();
        assert!(matches!(
            edit_record(&conn, &item.id, &note("b")),
            Err(DomainError::AlreadyDelivered(_))
        ));
        assert!(matches!(
            delete_item(&conn, &item.id),
            Err(DomainError::AlreadyDelivered(_))
        ));
    }

    /// Text that shows nothing, a material without a unit, and numbers a back office
    /// would round are refused.
    #[test]
    fn invisible_text_and_numbers_that_would_be_rounded_are_refused() {
        let doc = WorkOrderDoc {
            checklist: vec![
                ChecklistItem {
                    id: "n".into(),
                    text: "Vibration".into(),
                    answer: "number".into(),
                },
                ChecklistItem {
                    id: "t".into(),
                    text: "Remarks".into(),
                    answer: "text".into(),
                },
            ],
            ..WorkOrderDoc::placeholder("WO-1")
        };
        let answer = |id: &str, value: serde_json::Value| RecordBody::Checklist {
            answers: vec![ChecklistAnswer {
                item_id: id.into(),
                value,
                comment: None,
            }],
        };
        for text in ["\u{200B}", "\u{0}", " \u{FEFF}\t", "\u{00AD}"] {
            assert!(validate_record(&doc, &note(text)).is_err(), "{text:?}");
            assert!(
                validate_record(&doc, &answer("t", text.into())).is_err(),
                "{text:?}"
            );
        }
        assert!(validate_record(&doc, &note("ok \u{200B}")).is_ok());
        let big: serde_json::Value =
            serde_json::from_str("123456789012345678901234567890").unwrap();
        assert!(validate_record(&doc, &answer("n", big)).is_err());
        assert!(validate_record(&doc, &answer("n", 9_007_199_254_740_993u64.into())).is_err());
        assert!(validate_record(&doc, &answer("n", 4.5.into())).is_ok());
        let material = |unit: &str, quantity: f64| RecordBody::CompletedWork {
            description: "Valve replaced".into(),
            duration_minutes: None,
            materials: vec![ui_bridge::Material {
                code: None,
                name: "Gasket".into(),
                quantity,
                unit: unit.into(),
            }],
        };
        assert!(validate_record(&doc, &material("pcs", 2.0)).is_ok());
        assert!(validate_record(&doc, &material(" ", 2.0)).is_err());
        assert!(validate_record(&doc, &material("pcs", 1e300)).is_err());
    }

    #[test]
    fn checklist_answers_follow_the_template() {
        let conn = conn_with_work_order();
        let ok = RecordBody::Checklist {
            answers: vec![ChecklistAnswer {
                item_id: "c1".into(),
                value: true.into(),
                comment: None,
            }],
        };
        add_record(&conn, "WO-1", &ok).unwrap();
        let wrong_type = RecordBody::Checklist {
            answers: vec![ChecklistAnswer {
                item_id: "c1".into(),
                value: "yes".into(),
                comment: None,
            }],
        };
        assert!(matches!(
            add_record(&conn, "WO-1", &wrong_type),
            Err(DomainError::InvalidRecord(_))
        ));
        let unknown = RecordBody::Checklist {
            answers: vec![ChecklistAnswer {
                item_id: "zz".into(),
                value: true.into(),
                comment: None,
            }],
        };
        assert!(matches!(
            add_record(&conn, "WO-1", &unknown),
            Err(DomainError::InvalidRecord(_))
        ));
        let defect = RecordBody::Defect {
            title: "Leak".into(),
            description: String::new(),
            severity: Severity::High,
            location: None,
        };
        edit_record(
            &conn,
            &add_record(&conn, "WO-1", &defect).unwrap().id,
            &defect,
        )
        .unwrap();
    }

    #[test]
    fn stages_move_one_step_at_a_time() {
        let conn = conn_with_work_order();
        assert!(matches!(
            advance(&conn, "WO-1", "done"),
            Err(DomainError::StageJump { .. })
        ));
        advance(&conn, "WO-1", "accepted").unwrap();
        advance(&conn, "WO-1", "done").unwrap();
        assert!(matches!(
            advance(&conn, "WO-1", "done"),
            Err(DomainError::StageJump { .. })
        ));
        assert!(matches!(
            advance(&conn, "WO-9", "x"),
            Err(DomainError::UnknownWorkOrder(_))
        ));
    }

    #[test]
    fn a_newer_work_order_version_keeps_an_offline_stage_move() {
        let conn = conn_with_work_order();
        advance(&conn, "WO-1", "accepted").unwrap();
        let mut doc = work_orders::doc(&conn, "WO-1").unwrap();
        doc.version = 2;
        doc.stage = "new".into();
        doc.title = "Pump 2".into();
        upsert(&conn, &doc).unwrap();
        let wo = work_orders::get(&conn, "WO-1").unwrap();
        assert_eq!(wo.summary.stage, "accepted");
        assert_eq!(wo.summary.title, "Pump 2");
    }
}

/// The refused operation of an item, which `retry` and `discard` act on.
fn refused_op(conn: &Connection, item: &Item) -> Result<(i64, String), DomainError> {
    conn.query_row(
        "SELECT seq, action FROM outbox WHERE item_id = ?1 AND state = 'refused' ORDER BY seq LIMIT 1",
        [&item.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .ok_or_else(|| {
        DomainError::NotEditable(format!(
            "item {} has no refused change (it is {})",
            item.id,
            item.state.as_str()
        ))
    })
}

/// Sends a refused change again as it is (the cause was fixed on the back office's side).
pub fn retry(conn: &Connection, item_id: &str) -> Result<Item, DomainError> {
    let item = load_item(conn, item_id)?;
    let (seq, action) = refused_op(conn, &item)?;
    if action == "delete" {
        // Hidden again while its deletion goes once more, as after the first delete.
        conn.execute("UPDATE items SET deleted = 1 WHERE id = ?1", [item_id])?;
    }
    conn.execute(
        "UPDATE outbox SET state = 'waiting', reason = NULL WHERE seq = ?1",
        [seq],
    )?;
    // A late copy of the refusal, or of the operation judged again, then names an id
    // the device no longer has, and cannot turn the retried change red again.
    outbox::renew_id(conn, seq)?;
    conn.execute(
        "UPDATE items SET sync_state = 'waiting', reason = NULL, updated_ms = ?2 WHERE id = ?1",
        params![item_id, now_ms()],
    )?;
    // Hidden or not.
    Ok(conn.query_row(
        &format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1"),
        [item_id],
        item_row,
    )?)
}

/// Whether the item is deleted and kept only until its deletion is delivered.
pub fn is_hidden(conn: &Connection, item_id: &str) -> Result<bool, DomainError> {
    Ok(conn
        .query_row("SELECT deleted FROM items WHERE id = ?1", [item_id], |r| {
            r.get::<_, bool>(0)
        })
        .optional()?
        .unwrap_or(true))
}

/// What discarding a refused change did.
#[derive(Debug, Clone, PartialEq)]
pub struct Discarded {
    /// The item afterwards; `None` when it is gone (a refused creation).
    pub item: Option<Item>,
    /// What kind of item it was, for the event that says it is gone.
    pub kind: ItemKind,
    pub work_order_id: String,
    /// Items removed with it: the photos of a record whose creation was refused, the
    /// stage moves queued behind a refused one.
    pub also_removed: Vec<Item>,
    /// Set when a refused stage move was undone.
    pub stage_reverted: bool,
}

/// Drops a refused change. The back office never applied it, so: a refused creation
/// removes the item (and its photos) from the device; a refused edit or deletion leaves
/// the item as the back office has it; a refused stage move puts the stage back.
pub fn discard(conn: &Connection, item_id: &str) -> Result<Discarded, DomainError> {
    let item = conn
        .query_row(
            &format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1"),
            [item_id],
            item_row,
        )
        .optional()?
        .ok_or_else(|| DomainError::UnknownItem(item_id.to_owned()))?;
    let (seq, action) = refused_op(conn, &item)?;
    if action == "delete" && !matches!(item.kind, ItemKind::Photo | ItemKind::Stage) {
        // The item stays, as the back office has it, but an edit made before the delete
        // went with the delete's unsent update: its content goes once more, so that the
        // office and the device agree, in the deletion's place in the work order's order
        // (not after the changes that waited behind it).
        outbox::resend_as_update(conn, seq)?;
    } else {
        conn.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
    }
    let mut also_removed = Vec::new();
    let mut stage_reverted = false;
    if action == "create" {
        let mut stmt = conn.prepare(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE record_id = ?1"
        ))?;
        also_removed = stmt
            .query_map([item_id], item_row)?
            .collect::<Result<Vec<_>, _>>()?;
        if item.kind == ItemKind::Stage {
            // The stage moves made after this one build on it and wait behind it: they
            // go with it, or the back office could get "on site" with no "accepted"
            // before it, and the inspector could make the move again beside them.
            let mut stmt = conn.prepare(&format!(
                "SELECT {ITEM_COLUMNS} FROM items WHERE kind = 'stage' AND work_order_id = ?1
                   AND id IN (SELECT item_id FROM outbox WHERE work_order_id = ?1 AND seq > ?2)"
            ))?;
            also_removed.extend(
                stmt.query_map(params![item.work_order_id, seq], item_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            );
            // Back to where the back office has the work order: the stage this move
            // started from, unless a newer version came since (a refusal may bring one),
            // whose stage is the back office's word.
            conn.execute(
                "UPDATE work_orders SET stage = CASE
                     WHEN version > (SELECT base_version FROM items WHERE id = ?3)
                     THEN coalesce(json_extract(doc, '$.stage'), ?2)
                     ELSE coalesce(?2, stage) END
                 WHERE id = ?1",
                params![
                    item.work_order_id,
                    item.body.get("from").and_then(|f| f.as_str()),
                    item.id
                ],
            )?;
            stage_reverted = true;
        }
        for gone in &also_removed {
            conn.execute("DELETE FROM outbox WHERE item_id = ?1", [&gone.id])?;
            conn.execute("DELETE FROM items WHERE id = ?1", [&gone.id])?;
        }
        conn.execute("DELETE FROM outbox WHERE item_id = ?1", [item_id])?;
        conn.execute("DELETE FROM items WHERE id = ?1", [item_id])?;
        // A deleted record that stayed hidden only for this photo goes with it.
        if let Some(record_id) = &item.record_id {
            outbox::forget_deleted(conn, &outbox::id_array([record_id]))?;
        }
        return Ok(Discarded {
            item: None,
            kind: item.kind,
            work_order_id: item.work_order_id,
            also_removed,
            stage_reverted,
        });
    }
    // Another refused change of the item keeps it red; otherwise its state follows its
    // operations again (items::ITEM_COLUMNS reads 'waiting' that way). Stored as seen
    // now, "in progress" would stay after the acknowledgement.
    let still_refused: Option<Option<String>> = conn
        .query_row(
            "SELECT reason FROM outbox WHERE item_id = ?1 AND state = 'refused' ORDER BY seq LIMIT 1",
            [item_id],
            |r| r.get(0),
        )
        .optional()?;
    let (state, reason) = match still_refused {
        Some(reason) => ("refused", reason),
        None => ("waiting", None),
    };
    conn.execute(
        "UPDATE items SET sync_state = ?2, reason = ?3, deleted = 0, updated_ms = ?4 WHERE id = ?1",
        params![item_id, state, reason, now_ms()],
    )?;
    Ok(Discarded {
        item: Some(load_item(conn, item_id)?),
        kind: item.kind,
        work_order_id: item.work_order_id,
        also_removed,
        stage_reverted,
    })
}
