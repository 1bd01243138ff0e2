//! The messages between the device and the back office, as `docs/protocol.md` describes
//! them: topics, the JSON bodies, and the optional zstd compression of a message.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::domain::outbox::PendingOp;
use crate::domain::work_orders::WorkOrderDoc;

/// The version of the back-office protocol in every message's `v`.
pub const WIRE_VERSION: u32 = 1;

/// zstd frames start with these bytes; a JSON message starts with `{`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The bytes of a QoS 1 PUBLISH packet carrying `payload` bytes on a topic of
/// `topic` bytes: what a broker's packet limit counts (Mosquitto's `max_packet_size`,
/// rumqttd's `max_payload_size`), not the payload alone.
pub fn packet_bytes(topic: usize, payload: usize) -> usize {
    // Topic length, topic, packet id.
    let rest = 2 + topic + 2 + payload;
    let length_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + rest
}

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str) -> Topics {
        Topics {
            base: format!("{prefix}/{device_id}"),
        }
    }
    /// Device -> back office: batches of operations.
    pub fn ops(&self) -> String {
        format!("{}/up/ops", self.base)
    }
    /// Device -> back office: a request for the full state of the device's work orders.
    pub fn resync(&self) -> String {
        format!("{}/up/resync", self.base)
    }
    /// Retained online/offline marker, also the last will.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    /// Back office -> device: everything under `down/`.
    pub fn downlink_filter(&self) -> String {
        format!("{}/down/#", self.base)
    }
    pub fn acks(&self) -> String {
        format!("{}/down/acks", self.base)
    }
    pub fn work_orders(&self) -> String {
        format!("{}/down/work-orders", self.base)
    }
    /// Device -> back office: chunks of one photo.
    pub fn photo(&self, sha256: &str) -> String {
        format!("{}/up/photo/{sha256}", self.base)
    }
    /// The device asks for a range of an attachment's bytes.
    pub fn attachment_requests(&self) -> String {
        format!("{}/up/attachments", self.base)
    }

    /// Where the back office sends an attachment's bytes; the topic ends in its SHA-256.
    pub fn attachment_prefix(&self) -> String {
        format!("{}/down/attachment/", self.base)
    }

    pub fn attachment_errors(&self) -> String {
        format!("{}/down/attachment-errors", self.base)
    }

    pub fn photo_acks(&self) -> String {
        format!("{}/down/photo-acks", self.base)
    }
}

/// Bytes before a photo chunk's data: its offset and the photo's total size, each a
/// big-endian u64.
pub const CHUNK_HEADER: usize = 16;

pub fn photo_chunk(offset: u64, total: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + data.len());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a chunk (photo or attachment) into its offset, the file's total size and data.
pub fn parse_chunk(payload: &[u8]) -> Option<(u64, u64, &[u8])> {
    let offset = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
    let total = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((offset, total, &payload[CHUNK_HEADER..]))
}

/// "Send me these bytes of this attachment."
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct AttachmentRequest {
    pub v: u32,
    pub sha256: String,
    pub work_order_id: String,
    pub attachment_id: String,
    pub offset: u64,
    pub length: u64,
}

/// The back office cannot serve an attachment.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct AttachmentError {
    pub v: u32,
    pub sha256: String,
    pub error: String,
}

/// The back office's progress on one photo.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct PhotoAck {
    pub v: u32,
    pub sha256: String,
    /// Bytes received in order from the start of the photo; 0 when left out (an answer
    /// that only says `error`).
    #[serde(default, deserialize_with = "crate::domain::null_as_default")]
    pub received: u64,
    /// Set once the whole photo arrived and its size and SHA-256 check out.
    #[serde(default, deserialize_with = "crate::domain::null_as_default")]
    pub complete: bool,
    /// Set when the bytes did not check out; the device starts the photo over.
    #[serde(default)]
    pub error: Option<String>,
}

/// One operation as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireOp<'a> {
    /// The operation's id: the back office applies each id once.
    pub id: &'a str,
    /// The work order; operations of one work order are applied in `seq` order.
    pub wo: &'a str,
    pub item: &'a str,
    pub kind: &'a str,
    /// `create`, `update` or `delete`.
    pub act: &'a str,
    /// When the change was made on the device (ms since the Unix epoch).
    pub at: i64,
    /// The operation of the same work order to apply before this one, if it may not
    /// have been applied yet.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prev: Option<&'a str>,
    #[serde(borrow)]
    pub body: &'a RawValue,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OpsBatch<'a> {
    pub v: u32,
    #[serde(borrow)]
    pub ops: Vec<WireOp<'a>>,
}

/// zstd contexts kept from one message to the next: making one allocates and clears
/// more memory than a batch holds, which cost more than compressing it.
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Codec {
    /// `level` is zstd's, from 1 to 19 (the configuration checks it).
    pub fn new(level: i32) -> Codec {
        let mut compressor = zstd::bulk::Compressor::default();
        if let Err(e) = compressor.set_compression_level(level) {
            tracing::warn!(level, error = %e, "zstd refused the compression level; using its default");
        }
        Codec {
            compressor,
            decompressor: zstd::bulk::Decompressor::default(),
        }
    }

    /// Encodes a batch: JSON, compressed when that makes it smaller.
    pub fn encode_batch(&mut self, ops: &[PendingOp]) -> Result<Vec<u8>, WireError> {
        let json = batch_json(ops)?;
        Ok(self.compress(json))
    }

    /// Compresses with zstd unless that would not save anything (already compressed or
    /// random data), so the wire never carries more than the JSON itself.
    pub fn compress(&mut self, json: Vec<u8>) -> Vec<u8> {
        match self.compressor.compress(&json) {
            Ok(z) if z.len() < json.len() => z,
            _ => json,
        }
    }

    /// Reads a message body: zstd or plain JSON, at most `limit` bytes once decompressed.
    pub fn decode(&mut self, payload: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
        if !payload.starts_with(&ZSTD_MAGIC) {
            if payload.len() > limit {
                return Err(WireError::TooLarge {
                    size: payload.len(),
                    limit,
                });
            }
            return Ok(payload.to_vec());
        }
        // A frame that states its size gets a buffer of that size rather than one of the
        // limit: acknowledgements are a few KiB, the limit a MiB. A frame whose content
        // is larger than it states fails to decompress.
        let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(size)) if size > limit as u64 => {
                return Err(WireError::TooLarge {
                    size: usize::try_from(size).unwrap_or(usize::MAX),
                    limit,
                })
            }
            Ok(Some(size)) => size as usize,
            _ => limit,
        };
        self.decompressor
            .decompress(payload, capacity)
            .map_err(|e| WireError::Decode(format!("zstd: {e}")))
    }

    /// Decodes and parses a downlink message.
    pub fn parse<T: serde::de::DeserializeOwned>(
        &mut self,
        payload: &[u8],
        limit: usize,
    ) -> Result<T, WireError> {
        let json = self.decode(payload, limit)?;
        serde_json::from_slice(&json).map_err(|e| WireError::Decode(e.to_string()))
    }
}

/// A batch as JSON. The bodies are checked and copied once, into the message.
fn batch_json(ops: &[PendingOp]) -> Result<Vec<u8>, WireError> {
    let raws: Vec<&RawValue> = ops
        .iter()
        .map(|op| {
            serde_json::from_str::<&RawValue>(&op.payload).map_err(|e| WireError::Payload {
                op_id: op.op_id.clone(),
                error: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    let batch = OpsBatch {
        v: WIRE_VERSION,
        ops: ops
            .iter()
            .zip(&raws)
            .map(|(op, raw)| WireOp {
                id: &op.op_id,
                wo: &op.work_order_id,
                item: &op.item_id,
                kind: &op.item_kind,
                act: &op.action,
                at: op.created_ms,
                prev: op.prev.as_deref(),
                body: raw,
            })
            .collect(),
    };
    serde_json::to_vec(&batch).map_err(|e| WireError::Encode(e.to_string()))
}

/// The back office's answer to operations.
///
/// Read entry by entry: one malformed entry must not void the answers beside it, or the
/// device would send the whole batch again for ever and get the same answer each time.
/// What cannot be read is kept in `unreadable`, for the log and the bad-message count.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(from = "AcksOnWire")]
pub struct Acks {
    pub v: u32,
    pub acks: Vec<String>,
    pub refused: Vec<Refusal>,
    pub unreadable: Vec<String>,
}

/// [`Acks`] as it arrives, before each entry is checked.
#[derive(Deserialize)]
struct AcksOnWire {
    v: u32,
    #[serde(default, deserialize_with = "crate::domain::null_as_default")]
    acks: Vec<serde_json::Value>,
    #[serde(default, deserialize_with = "crate::domain::null_as_default")]
    refused: Vec<serde_json::Value>,
}

impl From<AcksOnWire> for Acks {
    fn from(raw: AcksOnWire) -> Acks {
        let mut unreadable = Vec::new();
        let acks = raw
            .acks
            .into_iter()
            .filter_map(|a| match a {
                serde_json::Value::String(id) => Some(id),
                other => {
                    unreadable.push(format!("an acknowledged id that is not a string: {other}"));
                    None
                }
            })
            .collect();
        let refused = raw
            .refused
            .into_iter()
            .filter_map(|r| match serde_json::from_value::<Refusal>(r.clone()) {
                Ok(refusal) => Some(refusal),
                Err(e) => {
                    unreadable.push(format!("a refusal that cannot be read ({e}): {r}"));
                    None
                }
            })
            .collect();
        Acks {
            v: raw.v,
            acks,
            refused,
            unreadable,
        }
    }
}

impl Acks {
    /// Every operation id the message settles, acknowledged or refused.
    pub fn settled(&self) -> Vec<String> {
        let refused = self.refused.iter().map(|r| r.id.clone());
        self.acks.iter().cloned().chain(refused).collect()
    }
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct Refusal {
    pub id: String,
    /// `conflict`, `validation`, `forbidden`, or another word the back office chooses.
    pub code: String,
    /// Words for the inspector; the code alone when the back office gave none.
    #[serde(default, deserialize_with = "crate::domain::null_as_default")]
    pub reason: String,
    /// The back office's current version of the work order, when it has one. Read on
    /// its own later: a broken one is dropped, and the refusal it came with still holds.
    #[serde(default)]
    pub work_order: Option<serde_json::Value>,
}

/// What the dispatcher sends about work orders.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkOrderPush {
    /// New or changed work orders for this device.
    Upsert {
        v: u32,
        #[serde(default, deserialize_with = "crate::domain::null_as_default")]
        work_orders: Vec<WorkOrderDoc>,
    },
    /// Work orders taken off this device (cancelled, reassigned).
    Remove {
        v: u32,
        #[serde(default, deserialize_with = "crate::domain::null_as_default")]
        ids: Vec<String>,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The answer to a resync request: every work order the device should have.
    Full {
        v: u32,
        #[serde(default)]
        request: Option<String>,
        // Required, as a full state names everything; `null` is an empty one.
        #[serde(deserialize_with = "crate::domain::null_as_default")]
        work_orders: Vec<WorkOrderDoc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("operation {op_id} holds no valid JSON: {error}")]
    Payload { op_id: String, error: String },
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("message of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("protocol version {0} is not spoken here (this daemon speaks {WIRE_VERSION})")]
    Version(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_reads_as_left_out() {
        let mut codec = Codec::new(3);
        let acks: Acks = codec
            .parse(br#"{"v":1,"acks":["a"],"refused":null}"#, 1 << 20)
            .unwrap();
        assert_eq!(acks.settled(), ["a"]);
        let acks: Acks = codec
            .parse(
                br#"{"v":1,"acks":null,"refused":[{"id":"b","code":"validation","reason":null}]}"#,
                1 << 20,
            )
            .unwrap();
        assert!(acks.unreadable.is_empty(), "{:?}", acks.unreadable);
        assert_eq!(acks.refused[0].reason, "");
        let ack: PhotoAck = codec
            .parse(
                br#"{"v":1,"sha256":"ab","error":"hash_mismatch","complete":null}"#,
                1 << 20,
            )
            .unwrap();
        assert_eq!((ack.received, ack.complete), (0, false));
        let push: WorkOrderPush = codec
            .parse(
                br#"{"v":1,"type":"upsert","work_orders":[{"id":"W","version":1,"title":"t","stage":"a","workflow":["a"],"checklist":null,"attachments":null,"site":null}]}"#,
                1 << 20,
            )
            .unwrap();
        let WorkOrderPush::Upsert { work_orders, .. } = push else {
            panic!("an upsert")
        };
        assert!(work_orders[0].checklist.is_empty() && work_orders[0].attachments.is_empty());
        // A full state must say what it holds; `null` holds nothing.
        assert!(codec
            .parse::<WorkOrderPush>(br#"{"v":1,"type":"full"}"#, 1 << 20)
            .is_err());
        let push: WorkOrderPush = codec
            .parse(br#"{"v":1,"type":"full","work_orders":null}"#, 1 << 20)
            .unwrap();
        assert!(matches!(push, WorkOrderPush::Full { work_orders, .. } if work_orders.is_empty()));
    }

    #[test]
    fn a_packet_is_counted_as_the_mqtt_client_writes_it() {
        for (topic, payload) in [
            (10, 0),
            (20, 100),
            (40, 16_000),
            (40, 16_400),
            (70, 131_072),
            (30, 2_100_000),
        ] {
            let mut p = rumqttc::Publish::new(
                "t".repeat(topic),
                rumqttc::QoS::AtLeastOnce,
                vec![0u8; payload],
            );
            p.pkid = 1;
            assert_eq!(
                packet_bytes(topic, payload),
                p.size(),
                "topic {topic}, payload {payload}"
            );
        }
    }

    fn op(i: usize, body: &str) -> PendingOp {
        PendingOp {
            seq: i as i64,
            op_id: format!("op-{i}"),
            item_id: format!("item-{i}"),
            work_order_id: "WO-1".into(),
            item_kind: "note".into(),
            action: "create".into(),
            payload: body.into(),
            created_ms: 1,
            prev: None,
        }
    }

    #[test]
    fn a_batch_round_trips_and_shrinks_when_it_can() {
        let ops: Vec<_> = (0..50)
            .map(|i| {
                op(
                    i,
                    r#"{"kind":"note","text":"valve checked, no leak found, pressure nominal"}"#,
                )
            })
            .collect();
        let mut codec = Codec::new(3);
        let wire = codec.encode_batch(&ops).unwrap();
        let json = codec.decode(&wire, 1 << 20).unwrap();
        let batch: OpsBatch<'_> = serde_json::from_slice(&json).unwrap();
        assert_eq!(batch.ops.len(), 50);
        assert_eq!(batch.ops[7].id, "op-7");
        assert!(
            wire.len() * 4 < json.len(),
            "{} vs {}",
            wire.len(),
            json.len()
        );
    }

    #[test]
    fn a_batch_names_the_operation_it_cannot_read() {
        let ops = [op(1, r#"{"text":"fine"}"#), op(2, r#"{"text": "#)];
        match Codec::new(3).encode_batch(&ops) {
            Err(WireError::Payload { op_id, .. }) => assert_eq!(op_id, "op-2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn incompressible_data_is_sent_as_is() {
        let body = serde_json::to_string(&serde_json::json!({"kind":"note","text": "x"})).unwrap();
        let mut codec = Codec::new(3);
        let wire = codec.compress(body.clone().into_bytes());
        assert_eq!(wire, body.as_bytes());
        assert_eq!(codec.decode(&wire, 100).unwrap(), body.as_bytes());
    }

    #[test]
    fn oversize_and_broken_messages_are_refused() {
        let mut codec = Codec::new(3);
        let big = codec.compress(vec![b' '; 10_000]);
        assert!(matches!(
            codec.decode(&big, 100),
            Err(WireError::TooLarge { size: 10_000, .. })
        ));
        assert!(codec
            .decode(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], 100)
            .is_err());
        // A frame that does not state its size is held to the limit as it is read.
        let mut unsized_frame = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut unsized_frame, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &[b' '; 10_000]).unwrap();
        encoder.finish().unwrap();
        assert!(codec.decode(&unsized_frame, 100).is_err());
        assert_eq!(codec.decode(&unsized_frame, 10_000).unwrap().len(), 10_000);
    }

    #[test]
    fn a_malformed_entry_does_not_void_the_answers_beside_it() {
        let message = br#"{"v":1,"acks":["a",7,"b"],"refused":[
            {"id":"c","code":"conflict"},
            {"code":"validation","reason":"no id"},
            {"id":"d","code":"validation","reason":"bad","work_order":{"id":5}}]}"#;
        let acks: Acks = Codec::new(3).parse(message, 10_000).unwrap();
        assert_eq!(acks.acks, ["a", "b"]);
        let refused: Vec<_> = acks.refused.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(refused, ["c", "d"]);
        assert_eq!(acks.refused[0].reason, "");
        // The broken work order travels on as it came; the service drops it alone.
        assert!(acks.refused[1].work_order.is_some());
        assert_eq!(acks.unreadable.len(), 2, "{:?}", acks.unreadable);
        assert!(acks.unreadable[1].contains("missing field `id`"));
        assert_eq!(acks.settled(), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_newer_back_office_may_add_fields_to_work_orders() {
        let push = br#"{"type":"upsert","v":1,"work_orders":[{"id":"WO-9","version":2,
            "title":"Valve","stage":"new","workflow":["new","done"],"priority":"high",
            "checklist":[{"id":"a","text":"A?","answer":"bool","photo_required":true}]}]}"#;
        match Codec::new(3).parse::<WorkOrderPush>(push, 10_000).unwrap() {
            WorkOrderPush::Upsert { work_orders, .. } => assert_eq!(work_orders[0].id, "WO-9"),
            other => panic!("{other:?}"),
        }
    }
}
