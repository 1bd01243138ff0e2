//! Work orders as the back office sends them, cached on the device, and the one-step
//! stage rule.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use ui_bridge::{
    Attachment, ChecklistItem, Item, ItemKind, WorkOrderChange, WorkOrderDetail, WorkOrderSummary,
};

use super::items::{insert_item, load_items_of};
use super::outbox::{self, Action};
use super::{next_stage, DomainError};
use crate::clock::Stamp;

/// A work order as the dispatcher sends it. Fields this version does not know are
/// ignored, so that a newer back office can add some without breaking older devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkOrderDoc {
    pub id: String,
    /// Grows with every change on the back office's side.
    pub version: i64,
    pub title: String,
    pub stage: String,
    /// Every stage in order; `advance_stage` moves one step along it.
    pub workflow: Vec<String>,
    #[serde(default)]
    pub scheduled_for: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default, deserialize_with = "super::null_as_default")]
    pub checklist: Vec<ChecklistItem>,
    #[serde(default, deserialize_with = "super::null_as_default")]
    pub attachments: Vec<Attachment>,
}

impl WorkOrderDoc {
    /// A document with no checklist, for validating records that do not look at it.
    pub fn placeholder(id: &str) -> WorkOrderDoc {
        WorkOrderDoc {
            id: id.to_owned(),
            version: 0,
            title: String::new(),
            stage: String::new(),
            workflow: Vec::new(),
            scheduled_for: None,
            description: None,
            site: None,
            checklist: Vec::new(),
            attachments: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), DomainError> {
        let bad = |m: String| Err(DomainError::InvalidWorkOrder(m));
        if self.id.is_empty() || self.id.len() > 128 {
            return bad(format!("id {:?} must be 1 to 128 bytes", self.id));
        }
        if self.workflow.is_empty() {
            return bad(format!("{}: the workflow is empty", self.id));
        }
        let mut seen = std::collections::HashSet::new();
        if !self.workflow.iter().all(|s| seen.insert(s)) {
            return bad(format!("{}: the workflow repeats a stage", self.id));
        }
        if !self.workflow.contains(&self.stage) {
            return bad(format!(
                "{}: stage {:?} is not in its workflow",
                self.id, self.stage
            ));
        }
        let mut ids = std::collections::HashSet::new();
        if !self.checklist.iter().all(|c| ids.insert(&c.id)) {
            return bad(format!("{}: the checklist repeats an item id", self.id));
        }
        if let Some(c) = self
            .checklist
            .iter()
            .find(|c| !matches!(c.answer.as_str(), "bool" | "number" | "text"))
        {
            return bad(format!(
                "{}: checklist item {} has answer type {:?}; expected bool, number or text",
                self.id, c.id, c.answer
            ));
        }
        // The hash names the file on the device: nothing but a SHA-256 may get there.
        if let Some(a) = self.attachments.iter().find(|a| {
            a.id.is_empty()
                || a.sha256.len() != 64
                || !a
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }) {
            return bad(format!(
                "{}: attachment {:?} needs an id and a SHA-256 of 64 lowercase hex digits, not {:?}",
                self.id, a.id, a.sha256
            ));
        }
        Ok(())
    }
}

/// Stores a work order from the back office. Returns what changed, or `None` when the
/// device already has this version or a newer one.
pub fn upsert(
    conn: &Connection,
    doc: &WorkOrderDoc,
) -> Result<Option<WorkOrderChange>, DomainError> {
    store_doc(conn, doc, true)
}

/// Stores the back office's version of a work order that came with a refusal. Unlike a
/// push, it is no word from the dispatcher that the work order is assigned here again:
/// one withdrawn stays withdrawn.
pub fn refresh_from_refusal(
    conn: &Connection,
    doc: &WorkOrderDoc,
) -> Result<Option<WorkOrderChange>, DomainError> {
    store_doc(conn, doc, false)
}

fn store_doc(
    conn: &Connection,
    doc: &WorkOrderDoc,
    assigned_again: bool,
) -> Result<Option<WorkOrderChange>, DomainError> {
    doc.validate()?;
    let existing: Option<(i64, String, bool)> = conn
        .query_row(
            "SELECT version, stage, withdrawn FROM work_orders WHERE id = ?1",
            [&doc.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let doc_json =
        serde_json::to_string(doc).map_err(|e| DomainError::InvalidWorkOrder(e.to_string()))?;
    let workflow = serde_json::to_string(&doc.workflow)
        .map_err(|e| DomainError::InvalidWorkOrder(e.to_string()))?;
    match existing {
        None => {
            let at = Stamp::now();
            conn.execute(
                "INSERT INTO work_orders (id, version, title, stage, workflow, scheduled_for, doc,
                                          received_ms, received_boot, received_since_boot_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    doc.id,
                    doc.version,
                    doc.title,
                    doc.stage,
                    workflow,
                    doc.scheduled_for,
                    doc_json,
                    at.wall_ms,
                    at.boot,
                    at.since_boot_ms
                ],
            )?;
            Ok(Some(WorkOrderChange::Added))
        }
        // Sent again after a removal (assigned back): no longer withdrawn.
        Some((version, _, true)) if version >= doc.version && assigned_again => {
            conn.execute(
                "UPDATE work_orders SET withdrawn = 0 WHERE id = ?1",
                [&doc.id],
            )?;
            Ok(Some(WorkOrderChange::Changed))
        }
        Some((version, _, _)) if version >= doc.version => Ok(None),
        Some((_, local_stage, _)) => {
            // A stage move made offline and not yet delivered stays ahead of the back
            // office's view until it is delivered or refused.
            let pending_stage_move: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM outbox WHERE work_order_id = ?1 AND item_kind = 'stage')",
                [&doc.id],
                |r| r.get(0),
            )?;
            let local_ahead = pending_stage_move
                && position(&doc.workflow, &local_stage) > position(&doc.workflow, &doc.stage);
            let stage = if local_ahead {
                &local_stage
            } else {
                &doc.stage
            };
            let at = Stamp::now();
            conn.execute(
                "UPDATE work_orders SET version = ?2, title = ?3, stage = ?4, workflow = ?5,
                        scheduled_for = ?6, doc = ?7, received_ms = ?8,
                        withdrawn = withdrawn AND NOT ?9,
                        received_boot = ?10, received_since_boot_ms = ?11
                 WHERE id = ?1",
                params![
                    doc.id,
                    doc.version,
                    doc.title,
                    stage,
                    workflow,
                    doc.scheduled_for,
                    doc_json,
                    at.wall_ms,
                    assigned_again,
                    at.boot,
                    at.since_boot_ms
                ],
            )?;
            Ok(Some(WorkOrderChange::Changed))
        }
    }
}

fn position(workflow: &[String], stage: &str) -> Option<usize> {
    workflow.iter().position(|s| s == stage)
}

struct Row {
    id: String,
    version: i64,
    title: String,
    stage: String,
    workflow: Vec<String>,
    scheduled_for: Option<String>,
    doc: String,
    withdrawn: bool,
    received: Stamp,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let workflow: String = r.get(4)?;
    Ok(Row {
        id: r.get(0)?,
        version: r.get(1)?,
        title: r.get(2)?,
        stage: r.get(3)?,
        workflow: serde_json::from_str(&workflow).unwrap_or_default(),
        scheduled_for: r.get(5)?,
        doc: r.get(6)?,
        withdrawn: r.get(7)?,
        received: Stamp {
            wall_ms: r.get(8)?,
            boot: r.get(9)?,
            since_boot_ms: r.get(10)?,
        },
    })
}

const COLUMNS: &str = "id, version, title, stage, workflow, scheduled_for, doc, withdrawn,
     received_ms, received_boot, received_since_boot_ms";

fn summary(conn: &Connection, row: &Row) -> Result<WorkOrderSummary, DomainError> {
    let unsent: i64 = conn.query_row(
        "SELECT count(*) FROM outbox WHERE work_order_id = ?1",
        [&row.id],
        |r| r.get(0),
    )?;
    Ok(WorkOrderSummary {
        id: row.id.clone(),
        version: row.version,
        title: row.title.clone(),
        stage: row.stage.clone(),
        next_stage: next_stage(&row.workflow, &row.stage).map(String::from),
        scheduled_for: row.scheduled_for.clone(),
        unsent: unsent as u64,
        withdrawn: row.withdrawn,
        // As the clock reads now, should it have been set since (crate::clock).
        received_ms: row.received.wall_now().unwrap_or(row.received.wall_ms),
        // The service knows the administrator's expiry.
        expires_ms: None,
    })
}

/// A cached work order as its expiry sees it.
pub struct Received {
    pub id: String,
    /// When its last version arrived.
    pub at: Stamp,
    /// Whether changes of it still wait on the device.
    pub pending: bool,
}

/// The cached work orders that are not withdrawn.
pub fn received(conn: &Connection) -> Result<Vec<Received>, DomainError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, received_ms, received_boot, received_since_boot_ms,
                EXISTS(SELECT 1 FROM outbox WHERE outbox.work_order_id = work_orders.id)
             OR EXISTS(SELECT 1 FROM captures WHERE captures.work_order_id = work_orders.id)
         FROM work_orders WHERE withdrawn = 0",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Received {
                id: r.get(0)?,
                at: Stamp {
                    wall_ms: r.get(1)?,
                    boot: r.get(2)?,
                    since_boot_ms: r.get(3)?,
                },
                pending: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Writes down when a work order arrived, as the clock now says it did, unless its
/// last version arrived since `was_ms`.
pub fn restamp(conn: &Connection, id: &str, was_ms: i64, at: &Stamp) -> Result<(), DomainError> {
    conn.execute(
        "UPDATE work_orders SET received_ms = ?3, received_boot = ?4, received_since_boot_ms = ?5
         WHERE id = ?1 AND received_ms = ?2",
        params![id, was_ms, at.wall_ms, at.boot, at.since_boot_ms],
    )?;
    Ok(())
}

pub fn list(conn: &Connection) -> Result<Vec<WorkOrderSummary>, DomainError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM work_orders ORDER BY scheduled_for DESC, id"
    ))?;
    let rows: Vec<Row> = stmt.query_map([], row)?.collect::<Result<_, _>>()?;
    rows.iter().map(|r| summary(conn, r)).collect()
}

fn load(conn: &Connection, id: &str) -> Result<Row, DomainError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM work_orders WHERE id = ?1"),
        [id],
        row,
    )
    .optional()?
    .ok_or_else(|| DomainError::UnknownWorkOrder(id.to_owned()))
}

pub fn ensure_exists(conn: &Connection, id: &str) -> Result<(), DomainError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM work_orders WHERE id = ?1")?
        .exists([id])?;
    if found {
        Ok(())
    } else {
        Err(DomainError::UnknownWorkOrder(id.to_owned()))
    }
}

/// The work order's cached document, for rules that look at its checklist.
pub fn doc(conn: &Connection, id: &str) -> Result<WorkOrderDoc, DomainError> {
    let r = load(conn, id)?;
    serde_json::from_str(&r.doc).map_err(|e| DomainError::InvalidWorkOrder(e.to_string()))
}

pub fn get(conn: &Connection, id: &str) -> Result<WorkOrderDetail, DomainError> {
    let r = load(conn, id)?;
    let doc: WorkOrderDoc =
        serde_json::from_str(&r.doc).map_err(|e| DomainError::InvalidWorkOrder(e.to_string()))?;
    Ok(WorkOrderDetail {
        summary: summary(conn, &r)?,
        workflow: r.workflow,
        checklist: doc.checklist,
        attachments: doc.attachments,
        description: doc.description,
        site: doc.site,
        items: load_items_of(conn, id)?,
    })
}

/// Moves a work order exactly one stage forward, recorded as a stage item with its
/// operation.
pub fn advance(conn: &Connection, id: &str, to: &str) -> Result<Item, DomainError> {
    let r = load(conn, id)?;
    let next = next_stage(&r.workflow, &r.stage);
    if next != Some(to) {
        return Err(DomainError::StageJump {
            work_order_id: id.to_owned(),
            stage: r.stage.clone(),
            next: next.map_or_else(
                || "none (the workflow has ended)".into(),
                |n| format!("{n:?}"),
            ),
            to: to.to_owned(),
        });
    }
    conn.execute(
        "UPDATE work_orders SET stage = ?2 WHERE id = ?1",
        params![id, to],
    )?;
    let body = serde_json::json!({ "from": r.stage, "to": to });
    let item = insert_item(conn, id, ItemKind::Stage, None, &body, None)?;
    // The version the move was made on: a discard of it later tells from this whether
    // the back office has sent a newer one since (see items::discard).
    conn.execute(
        "UPDATE items SET base_version = ?2 WHERE id = ?1",
        params![item.id, r.version],
    )?;
    outbox::append(
        conn,
        &item.id,
        id,
        ItemKind::Stage,
        Action::Create,
        outbox::Payload::Body,
    )?;
    Ok(item)
}

/// Every attachment the cached work orders name, with the work order naming it, in the
/// order the work orders are scheduled.
pub fn attachments(conn: &Connection) -> Result<Vec<(String, Attachment)>, DomainError> {
    let mut stmt = conn.prepare(
        "SELECT id, doc FROM work_orders ORDER BY scheduled_for IS NULL, scheduled_for, id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, doc) = row?;
        // Stored only after validation; one that no longer parses has nothing to fetch.
        if let Ok(doc) = serde_json::from_str::<WorkOrderDoc>(&doc) {
            out.extend(doc.attachments.into_iter().map(|a| (id.clone(), a)));
        }
    }
    Ok(out)
}

pub fn ids(conn: &Connection) -> Result<Vec<String>, DomainError> {
    let mut stmt = conn.prepare_cached("SELECT id FROM work_orders ORDER BY id")?;
    let ids = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

/// What became of a work order the dispatcher removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Gone from the device, with what was captured for it and delivered.
    Removed,
    /// Changes of it still wait: kept, marked withdrawn, until they are delivered or
    /// discarded ([`remove_settled`]). What the inspector captured is never dropped.
    Withdrawn,
    /// Withdrawn already, or not on the device: nothing changed.
    Unchanged,
}

/// Takes a work order off the device (cancelled or reassigned by the dispatcher).
pub fn remove(conn: &Connection, id: &str) -> Result<Removal, DomainError> {
    let Some(withdrawn) = conn
        .query_row(
            "SELECT withdrawn FROM work_orders WHERE id = ?1",
            [id],
            |r| r.get::<_, bool>(0),
        )
        .optional()?
    else {
        return Ok(Removal::Unchanged);
    };
    if has_pending(conn, id)? {
        if withdrawn {
            return Ok(Removal::Unchanged);
        }
        tracing::warn!(work_order_id = %id, "work order removed by the dispatcher still has unsent changes; kept until they are delivered");
        conn.execute("UPDATE work_orders SET withdrawn = 1 WHERE id = ?1", [id])?;
        return Ok(Removal::Withdrawn);
    }
    conn.execute("DELETE FROM items WHERE work_order_id = ?1", [id])?;
    conn.execute("DELETE FROM work_orders WHERE id = ?1", [id])?;
    Ok(Removal::Removed)
}

/// Removes a work order from the cache unless changes of it still wait on the device;
/// returns whether it went.
pub fn remove_unless_pending(conn: &Connection, id: &str) -> Result<bool, DomainError> {
    Ok(!has_pending(conn, id)? && remove(conn, id)? == Removal::Removed)
}

/// Whether changes of the work order still wait on the device: operations in the
/// outbox, or captures not folded yet.
fn has_pending(conn: &Connection, id: &str) -> Result<bool, DomainError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM outbox WHERE work_order_id = ?1)
                 OR EXISTS(SELECT 1 FROM captures WHERE work_order_id = ?1)",
        )?
        .query_row([id], |r| r.get(0))?)
}

/// Removes the withdrawn work orders whose last waiting change has just been delivered
/// or discarded; returns their ids.
pub fn remove_settled(conn: &Connection) -> Result<Vec<String>, DomainError> {
    let withdrawn: Vec<String> = conn
        .prepare_cached("SELECT id FROM work_orders WHERE withdrawn = 1")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut removed = Vec::new();
    for id in withdrawn {
        if remove(conn, &id)? == Removal::Removed {
            removed.push(id);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_hash_names_a_file_so_nothing_else_passes() {
        let mut doc = WorkOrderDoc::placeholder("WO-1");
        doc.stage = "new".into();
        doc.workflow = vec!["new".into()];
        let attachment = |sha: &str| Attachment {
            id: "dwg".into(),
            name: "layout.pdf".into(),
            size: 10,
            sha256: sha.into(),
            downloaded: false,
            problem: None,
        };
        doc.attachments = vec![attachment(&"ab".repeat(32))];
        assert!(doc.validate().is_ok());
        for bad in ["../../etc/passwd", &"AB".repeat(32), &"ab".repeat(31), ""] {
            doc.attachments = vec![attachment(bad)];
            assert!(doc.validate().is_err(), "{bad:?} accepted");
        }
    }
}
