//! The ui-bridge wire protocol, version 1: the requests the touchscreen app sends, the
//! responses and events the daemon sends back. `docs/ui-protocol.md` is the prose version
//! of this file; keep the two in step.
//!
//! Every frame is one JSON object on one line (`\n`-terminated). A photo travels as an
//! open file descriptor (SCM_RIGHTS) sent together with the bytes of the `attach_photo`
//! frame, so the daemon never opens a path a client names.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A daemon answers a frame with another `v`
/// with `unsupported_version` and keeps the connection.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame (request or response line) the daemon accepts unless configured otherwise.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// A client's request frame: `{"v":1,"id":7,"request":{"type":"status"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    pub v: u32,
    /// Chosen by the client, echoed in the response; events carry none.
    pub id: u64,
    pub request: Request,
}

/// What a client may ask for. The `type` field names the request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Daemon and sync state: the unsent count, link, last upload and download.
    Status {},
    /// The cached work orders, newest scheduled first.
    ListWorkOrders {},
    /// One work order with everything captured for it and each item's sync state.
    GetWorkOrder { work_order_id: String },
    /// Capture a record on a work order.
    AddRecord {
        work_order_id: String,
        record: RecordBody,
    },
    /// Replace an undelivered record's content (the kind must stay the same).
    EditRecord { item_id: String, record: RecordBody },
    /// Delete an undelivered record or photo; nothing is ever sent for it if it has not
    /// gone out yet.
    DeleteItem { item_id: String },
    /// Attach the photo whose descriptor travels with this frame to a record.
    AttachPhoto {
        record_id: String,
        #[serde(default)]
        mime: Option<String>,
        #[serde(default)]
        caption: Option<String>,
    },
    /// Move a work order exactly one stage forward in its workflow.
    AdvanceStage { work_order_id: String, to: String },
    /// The operations that wait for delivery, oldest first.
    Outbox {
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Start receiving events on this connection.
    Subscribe {},
    /// Send a change the back office refused again, as it is.
    Retry { item_id: String },
    /// Drop a change the back office refused.
    Discard { item_id: String },
    /// Sync now: connect at once if the broker is away, send what waits.
    SyncNow {},
    /// Open a downloaded attachment: the answer carries a read-only descriptor of the
    /// file (SCM_RIGHTS), as `attach_photo` carries the photo the other way.
    OpenAttachment {
        work_order_id: String,
        attachment_id: String,
    },
    /// Everything captured in a time range, for support's export to a file: one page,
    /// oldest first. Ask again with `after` set to the answer's `next` until it is null.
    Export {
        /// From this time on (Unix milliseconds), when given.
        #[serde(default)]
        since_ms: Option<i64>,
        /// Before this time (Unix milliseconds), when given.
        #[serde(default)]
        until_ms: Option<i64>,
        #[serde(default)]
        after: Option<ExportCursor>,
        /// Items per page: 1 to 1000, 100 when left out.
        #[serde(default)]
        limit: Option<u32>,
    },
    /// What support needs to see first: the status, the store's figures, changes the
    /// back office refused, and the latest warnings and errors the daemon logged.
    Diagnostics {},
    /// Support's full resync: check the downloaded attachments against their SHA-256
    /// (a file that fails is fetched again), send what waits, and ask the back office
    /// for the whole state, which replaces the work-order cache when it comes. Unsent
    /// work is never lost: a work order it belongs to stays until it is delivered.
    Resync {},
    /// Change the inspector's sync switches; a field left out keeps its value. Kept
    /// across restarts. Answered with `status`.
    SetSyncSwitches {
        #[serde(default)]
        auto_sync: Option<bool>,
        #[serde(default)]
        sync_on_visit_completed: Option<bool>,
        #[serde(default)]
        files_on_wifi_only: Option<bool>,
    },
}

impl Request {
    /// Every request `type`, so a frame with another one is told `unknown_request`
    /// rather than a generic parse error.
    pub const TYPES: &'static [&'static str] = &[
        "status",
        "list_work_orders",
        "get_work_order",
        "add_record",
        "edit_record",
        "delete_item",
        "attach_photo",
        "advance_stage",
        "outbox",
        "subscribe",
        "retry",
        "discard",
        "sync_now",
        "set_sync_switches",
        "open_attachment",
        "export",
        "resync",
        "diagnostics",
    ];
}

/// The content of a record, by kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RecordBody {
    /// Work done, with the materials used.
    CompletedWork {
        description: String,
        #[serde(default)]
        duration_minutes: Option<u32>,
        #[serde(default)]
        materials: Vec<Material>,
    },
    /// Answers to items of the work order's checklist template.
    Checklist { answers: Vec<ChecklistAnswer> },
    /// A defect found on site.
    Defect {
        title: String,
        #[serde(default)]
        description: String,
        severity: Severity,
        #[serde(default)]
        location: Option<String>,
    },
    /// Free text.
    Note { text: String },
}

impl RecordBody {
    pub fn kind(&self) -> ItemKind {
        match self {
            RecordBody::CompletedWork { .. } => ItemKind::CompletedWork,
            RecordBody::Checklist { .. } => ItemKind::Checklist,
            RecordBody::Defect { .. } => ItemKind::Defect,
            RecordBody::Note { .. } => ItemKind::Note,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Material {
    #[serde(default)]
    pub code: Option<String>,
    pub name: String,
    pub quantity: f64,
    pub unit: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChecklistAnswer {
    /// The `id` of an item of the work order's checklist template.
    pub item_id: String,
    /// `true`/`false`, a number or text, as the template item asks.
    pub value: serde_json::Value,
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// What an item is: one of the record kinds, a photo, or a stage transition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    CompletedWork,
    Checklist,
    Defect,
    Note,
    Photo,
    Stage,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::CompletedWork => "completed_work",
            ItemKind::Checklist => "checklist",
            ItemKind::Defect => "defect",
            ItemKind::Note => "note",
            ItemKind::Photo => "photo",
            ItemKind::Stage => "stage",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "completed_work" => ItemKind::CompletedWork,
            "checklist" => ItemKind::Checklist,
            "defect" => ItemKind::Defect,
            "note" => ItemKind::Note,
            "photo" => ItemKind::Photo,
            "stage" => ItemKind::Stage,
            _ => return None,
        })
    }

    /// Records are what `edit_record` may change; photos and stage moves are not edited.
    pub fn is_record(self) -> bool {
        !matches!(self, ItemKind::Photo | ItemKind::Stage)
    }
}

/// An item's sync state, as the app colours it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Blue: stored on the device, not yet sent.
    Waiting,
    /// Blue: sent, the back office has not confirmed it yet.
    InProgress,
    /// Green: the back office confirmed it.
    Delivered,
    /// Red: the back office refused it; `reason` says why.
    Refused,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Waiting => "waiting",
            SyncState::InProgress => "in_progress",
            SyncState::Delivered => "delivered",
            SyncState::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => SyncState::Waiting,
            "in_progress" => SyncState::InProgress,
            "delivered" => SyncState::Delivered,
            "refused" => SyncState::Refused,
            _ => return None,
        })
    }
}

/// A server frame: either the response to one request or an event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    Response(ResponseFrame),
    Event(EventFrame),
}

/// `{"v":1,"id":7,"ok":{...}}` or `{"v":1,"id":7,"error":{"code":"...","message":"..."}}`.
/// `id` is null when the request was too broken to read one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub v: u32,
    pub id: Option<u64>,
    #[serde(flatten)]
    pub result: ResponseResult,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseResult {
    // Boxed: responses are large next to errors and events.
    Ok(Box<Response>),
    Error(ErrorBody),
}

/// The successful answer to each request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    WorkOrders {
        work_orders: Vec<WorkOrderSummary>,
    },
    WorkOrder(WorkOrderDetail),
    /// The item after an add, edit or attach.
    Item(Item),
    /// The item was deleted; `sent_nothing` is true when nothing about it ever left the
    /// device.
    Deleted {
        item_id: String,
        sent_nothing: bool,
    },
    Outbox {
        operations: Vec<Operation>,
    },
    Subscribed,
    /// After `open_attachment`; the file's descriptor comes with this frame.
    Attachment(Attachment),
    /// After `discard`: the item as it is now, or null when it is gone.
    Discarded {
        item_id: String,
        item: Option<Item>,
    },
    /// After `sync_now`.
    SyncStarted,
    /// After `resync`: the full state is asked for (now if the broker is connected,
    /// else at the next connection, even after a restart).
    ResyncStarted {
        /// Downloaded attachments whose bytes were checked.
        attachments_checked: u32,
        /// Of those, the ones that failed and will be fetched again.
        attachments_refetched: u32,
    },
    Diagnostics(Box<Diagnostics>),
    /// One page of an export; `next` is null on the last one.
    Exported {
        items: Vec<Item>,
        next: Option<ExportCursor>,
    },
}

/// The diagnostics report (`diagnostics`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Diagnostics {
    pub status: Status,
    /// When this daemon process started.
    pub started_ms: i64,
    pub device_id: Option<String>,
    /// `host:port`, or null when no broker is configured.
    pub broker_address: Option<String>,
    pub state_dir: String,
    pub schema_version: i64,
    /// Sizes of the database file and of its log (`-wal`).
    pub database_bytes: u64,
    pub log_bytes: u64,
    pub work_orders: u64,
    /// Items on the device by sync state (`waiting`, `in_progress`, `delivered`,
    /// `refused`).
    pub items: std::collections::BTreeMap<String, u64>,
    /// Changes the back office refused, with its reason codes and words (at most 100).
    pub refused: Vec<RefusedItem>,
    /// Downlink messages ignored as unreadable since start.
    pub bad_downlink_messages: u64,
    /// The latest warnings and errors the daemon logged (at most 100), oldest first.
    pub recent_problems: Vec<LoggedProblem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefusedItem {
    pub item_id: String,
    pub work_order_id: String,
    pub kind: ItemKind,
    pub reason: Option<String>,
}

/// A warning or an error as the daemon logged it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoggedProblem {
    pub time_ms: i64,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The part of the daemon that logged it.
    pub target: String,
    pub message: String,
    /// The event's other fields as `key=value`: the error, the item, the operation.
    pub fields: Vec<String>,
}

/// Where an export's next page starts: after this item, in the export's order (by
/// creation time, then id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportCursor {
    pub created_ms: i64,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// Words for a person; the app may show them as they are.
    pub message: String,
}

/// Stable error codes; the app branches on these, never on the message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    UnsupportedVersion,
    UnknownRequest,
    BadRequest,
    FrameTooLarge,
    Unauthorized,
    Busy,
    UnknownWorkOrder,
    UnknownItem,
    InvalidRecord,
    StageJump,
    AlreadyDelivered,
    NotEditable,
    MissingDescriptor,
    NotRegularFile,
    PhotoTooLarge,
    StorageLow,
    StorageUnavailable,
    /// No such attachment on the work order, or it is not downloaded yet.
    AttachmentUnavailable,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub daemon_version: String,
    pub protocol: u32,
    /// Operations stored on the device and not yet confirmed by the back office.
    pub unsent: u64,
    /// Link class: `offline`, `2g`, `cellular`, `metered`, `wifi`, `ethernet`, or
    /// `unknown` when NetworkManager is not followed (the broker is simply tried).
    pub link: String,
    /// The link in words: "LTE", "EDGE", "Wi-Fi, metered (guessed)", ...
    #[serde(default)]
    pub link_detail: String,
    /// Who says: `networkmanager`, or `none`.
    #[serde(default)]
    pub link_source: String,
    /// Broker session: `not_configured`, `connecting`, `up`, `down`.
    pub broker: String,
    pub last_upload_ms: Option<i64>,
    pub last_download_ms: Option<i64>,
    pub last_error: Option<String>,
    /// When a sync last sent everything the link allowed.
    #[serde(default)]
    pub last_sync_ms: Option<i64>,
    /// Why the last sync did or did not happen ("auto-sync is off: ...", "offline: ...",
    /// "photos wait for a faster link than 2G", ...), for the offline banner.
    #[serde(default)]
    pub sync_note: Option<String>,
    /// The sync switches in force.
    #[serde(default)]
    pub auto_sync: bool,
    #[serde(default)]
    pub sync_on_visit_completed: bool,
    #[serde(default)]
    pub files_on_wifi_only: bool,
    /// Free bytes where the store lives, and whether new captures are being refused.
    pub storage_free_bytes: u64,
    pub storage_low: bool,
    /// Set when a damaged database was found at start and moved aside to this path.
    pub damaged_store: Option<String>,
    /// A `resync` asked for the back office's full state and it has not come yet.
    #[serde(default)]
    pub resync_pending: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkOrderSummary {
    pub id: String,
    pub version: i64,
    pub title: String,
    pub stage: String,
    /// The one stage `advance_stage` accepts now; null at the end of the workflow.
    pub next_stage: Option<String>,
    pub scheduled_for: Option<String>,
    /// Operations of this work order still waiting for delivery.
    pub unsent: u64,
    /// The dispatcher took the work order off the device (cancelled or reassigned)
    /// while changes of it were still waiting: it goes once they are delivered or
    /// discarded, unless the dispatcher sends it again.
    #[serde(default)]
    pub withdrawn: bool,
    /// When the device received the version it has.
    #[serde(default)]
    pub received_ms: i64,
    /// When the device leaves the work order out of its cache, where the administrator
    /// set downloaded work orders to expire (`work_orders.expire_after_secs`); null
    /// otherwise. One with changes still undelivered stays until they are delivered.
    #[serde(default)]
    pub expires_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkOrderDetail {
    #[serde(flatten)]
    pub summary: WorkOrderSummary,
    pub workflow: Vec<String>,
    pub checklist: Vec<ChecklistItem>,
    pub attachments: Vec<Attachment>,
    pub description: Option<String>,
    pub site: Option<String>,
    pub items: Vec<Item>,
}

/// One item of a work order's checklist template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChecklistItem {
    pub id: String,
    pub text: String,
    /// `bool`, `number` or `text`.
    #[serde(default = "ChecklistItem::default_answer")]
    pub answer: String,
}

impl ChecklistItem {
    fn default_answer() -> String {
        "bool".into()
    }
}

/// A file attached to a work order by the back office (drawings, manuals).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default)]
    pub downloaded: bool,
    /// Why the download does not go on, when it does not: the back office cannot serve
    /// the file, or its bytes keep failing their SHA-256. Set by the device only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Something captured on the device, with its sync state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub work_order_id: String,
    pub kind: ItemKind,
    /// For a photo: the record it belongs to.
    pub record_id: Option<String>,
    /// The record's content; for a photo `{sha256,size,mime,caption}`; for a stage move
    /// `{from,to}`.
    pub body: serde_json::Value,
    pub state: SyncState,
    /// Why the back office refused it, when `state` is `refused`.
    pub reason: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// One operation of the outbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Operation {
    pub op_id: String,
    pub item_id: String,
    pub work_order_id: String,
    pub item_kind: ItemKind,
    /// `create`, `update` or `delete`.
    pub action: String,
    pub state: SyncState,
    pub reason: Option<String>,
    pub created_ms: i64,
}

/// `{"v":1,"event":{"type":"unsent","count":3}}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventFrame {
    pub v: u32,
    pub event: Event,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An item was added, changed state, or was deleted (`state` null).
    ItemState {
        item_id: String,
        work_order_id: String,
        kind: ItemKind,
        state: Option<SyncState>,
        reason: Option<String>,
    },
    /// The number of operations waiting for delivery changed.
    Unsent { count: u64 },
    /// A work order was added to the cache, changed (including its stage), or removed.
    WorkOrder {
        work_order_id: String,
        change: WorkOrderChange,
    },
    /// The link class, the broker session or the sync note changed.
    Link {
        link: String,
        broker: String,
        #[serde(default)]
        note: Option<String>,
    },
    /// This subscriber fell behind and missed `missed` events: read the state again.
    Lagged { missed: u64 },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkOrderChange {
    Added,
    Changed,
    /// Taken off the device by the dispatcher, but kept until its waiting changes are
    /// delivered or discarded (`withdrawn` in its summary).
    Withdrawn,
    Removed,
    /// It expires soon (`expires_ms` in its summary): the administrator set an age
    /// after which downloaded work orders leave the device.
    Expiring,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frame_round_trips() {
        let frame = RequestFrame {
            v: 1,
            id: 3,
            request: Request::AddRecord {
                work_order_id: "WO-1".into(),
                record: RecordBody::Note { text: "ok".into() },
            },
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"id":3,"request":{"type":"add_record","work_order_id":"WO-1","record":{"kind":"note","text":"ok"}}}"#
        );
        let back: RequestFrame = serde_json::from_str(&text).unwrap();
        assert_eq!(back.request, frame.request);
    }

    #[test]
    fn every_request_type_is_listed() {
        for req in [
            Request::Status {},
            Request::ListWorkOrders {},
            Request::Subscribe {},
            Request::Outbox { limit: None },
            Request::Resync {},
            Request::Diagnostics {},
            Request::Export {
                since_ms: None,
                until_ms: None,
                after: None,
                limit: None,
            },
            Request::DeleteItem {
                item_id: "x".into(),
            },
        ] {
            let v = serde_json::to_value(&req).unwrap();
            assert!(Request::TYPES.contains(&v["type"].as_str().unwrap()));
        }
    }

    #[test]
    fn server_frames_tell_responses_from_events() {
        let ok: ServerFrame =
            serde_json::from_str(r#"{"v":1,"id":2,"ok":{"type":"subscribed"}}"#).unwrap();
        assert!(matches!(ok, ServerFrame::Response(_)));
        let err: ServerFrame = serde_json::from_str(
            r#"{"v":1,"id":null,"error":{"code":"malformed_json","message":"x"}}"#,
        )
        .unwrap();
        assert!(matches!(
            err,
            ServerFrame::Response(ResponseFrame {
                result: ResponseResult::Error(_),
                ..
            })
        ));
        let ev: ServerFrame =
            serde_json::from_str(r#"{"v":1,"event":{"type":"unsent","count":4}}"#).unwrap();
        assert!(matches!(ev, ServerFrame::Event(_)));
    }

    #[test]
    fn unknown_record_fields_are_refused() {
        let r: Result<RecordBody, _> =
            serde_json::from_str(r#"{"kind":"note","text":"a","colour":"red"}"#);
        assert!(r.is_err());
    }
}
