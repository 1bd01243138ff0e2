//! A test back office written from `docs/protocol.md` alone: a real MQTT client on the
//! real broker that applies each operation id once, in order per work order, answers
//! with acknowledgements (or refusals, on demand), plays the dispatcher, and records
//! everything so tests can check exactly-once and order. The demo's back office
//! (`src/bin/demo-backoffice.rs`) is this one with an observer that prints what happens.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};

pub const PREFIX: &str = "fieldsync/v1";

/// An operation as the back office applied it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub device: String,
    pub id: String,
    pub wo: String,
    pub item: String,
    pub kind: String,
    pub act: String,
    pub body: Value,
}

/// Decides whether to refuse an operation: `Some((code, reason))` refuses it.
pub type RefusePolicy = Box<dyn Fn(&Applied) -> Option<(String, String)> + Send>;

/// What the back office just did or saw, as it happens.
#[derive(Debug)]
pub enum Happened<'a> {
    /// Connected to the broker and subscribed (again, after a loss).
    Connected,
    /// The broker connection failed; the back office keeps trying.
    Lost {
        error: String,
    },
    /// A device's retained status: `online` or `offline`.
    Status {
        device: &'a str,
        state: &'a str,
    },
    Applied(&'a Applied),
    /// An operation already applied came again: acknowledged again, not applied.
    Repeat(&'a Applied),
    /// Refused, `held` included.
    Refused {
        op: &'a Applied,
        code: &'a str,
        reason: &'a str,
    },
    /// A photo's bytes all arrived and their SHA-256 matches.
    PhotoComplete {
        device: &'a str,
        sha256: &'a str,
        size: u64,
    },
    /// A photo's bytes did not match their SHA-256; they were discarded.
    PhotoMismatch {
        device: &'a str,
        sha256: &'a str,
    },
    /// A device asked for its full state and got this many work orders.
    Resync {
        device: &'a str,
        work_orders: usize,
    },
}

/// Called under the state's lock for everything that happens.
pub type Observer = Box<dyn Fn(&Happened<'_>) + Send>;

/// Where the back office connects and what it serves.
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub port: u16,
    /// The devices' `uplink.topic_prefix`.
    pub prefix: String,
    /// Serve this device only; `None`: every device under the prefix.
    pub device: Option<String>,
    pub client_id: String,
    /// How long to keep trying the first connection before giving up.
    pub connect_timeout: Duration,
    /// User name and password, for brokers that require a login.
    pub login: Option<(String, String)>,
}

impl Options {
    /// Every device under the default prefix, on a broker on this machine.
    pub fn local(port: u16) -> Options {
        Options {
            host: "127.0.0.1".into(),
            port,
            prefix: PREFIX.into(),
            device: None,
            client_id: format!("backoffice-{}", std::process::id()),
            connect_timeout: Duration::from_secs(10),
            login: None,
        }
    }
}

#[derive(Default)]
pub struct State {
    /// In the order applied.
    pub applied: Vec<Applied>,
    seen: HashSet<String>,
    /// Operations received again after they were applied (expected after cuts).
    pub duplicates: u64,
    pub batches: u64,
    /// Bytes of `up/ops` payloads as they came off the wire.
    pub wire_bytes: u64,
    /// The largest `up/ops` payload seen.
    pub largest_batch: usize,
    /// Bytes of those payloads once decompressed (the JSON).
    pub json_bytes: u64,
    pub refused: Vec<String>,
    /// The items of those operations, in the same order.
    pub refused_items: Vec<String>,
    pub resync_requests: u64,
    /// Times it connected and subscribed, the first included.
    pub connections: u64,
    pub first_batch_at: Option<Instant>,
    pub last_applied_at: Option<Instant>,
    /// The dispatcher's work orders per device, for full-state answers. A device with
    /// no entry here is not answered.
    pub work_orders: HashMap<String, Vec<Value>>,
    pub refuse: Option<RefusePolicy>,
    /// Note texts whose first operation is left unanswered, for later (docs/protocol.md
    /// allows it): the device sends it again after its ack timeout.
    pub defer_once: HashSet<String>,
    /// Times an operation was answered `held`.
    pub held_answers: u64,
    /// Photos (by SHA-256) whose bytes are confirmed and never given a verdict, as by a
    /// back office that lost it.
    pub no_verdict: HashSet<String>,
    /// Photos being received or received, by SHA-256.
    pub photos: HashMap<String, PhotoRx>,
    /// Wait this long before confirming photo chunks (to make uploads slow enough to cut).
    pub photo_ack_delay: Duration,
    /// Lose the chunk at this offset once, unanswered, as a back office that failed
    /// halfway through handling it would.
    pub lose_photo_chunk_at: Option<u64>,
    /// Wait this long before acknowledging a batch (to make a drain slow enough to cut).
    pub ops_ack_delay: Duration,
    pub observer: Option<Observer>,
    /// Attachment files the dispatcher serves, by SHA-256.
    pub attachment_files: HashMap<String, Vec<u8>>,
    /// Attachment bytes sent, by SHA-256 (more than the size after cuts).
    pub attachment_bytes_sent: HashMap<String, u64>,
    /// Serve these attachments with one byte changed, to see the device refuse them.
    pub corrupt_attachments: HashSet<String>,
    /// Wait this long before answering each attachment request (to make a download
    /// slow enough to cut).
    pub attachment_delay: Duration,
}

impl State {
    fn tell(&self, what: Happened<'_>) {
        if let Some(f) = &self.observer {
            f(&what);
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct PhotoRx {
    pub data: Vec<u8>,
    pub total: u64,
    /// Bytes that arrived a second time (after a cut).
    pub resent: u64,
    pub chunks: u64,
    pub complete: bool,
}

pub struct BackOffice {
    pub state: Arc<Mutex<State>>,
    client: AsyncClient,
    prefix: String,
    task: tokio::task::JoinHandle<()>,
}

fn decode(payload: &[u8]) -> Option<Vec<u8>> {
    if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(payload).ok()
    } else {
        Some(payload.to_vec())
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(v).expect("json");
    if json.len() > 512 {
        zstd::bulk::compress(&json, 3).expect("zstd")
    } else {
        json
    }
}

impl BackOffice {
    /// Connects to the broker on `port` and starts serving.
    pub async fn start(port: u16) -> BackOffice {
        BackOffice::connect(Options::local(port), None)
            .await
            .unwrap_or_else(|e| panic!("back office: {e}"))
    }

    /// Connects and starts serving, with `observer` told of everything from the start.
    /// Fails when the broker cannot be reached within `options.connect_timeout`.
    pub async fn connect(
        options: Options,
        observer: Option<Observer>,
    ) -> Result<BackOffice, String> {
        let mut o = MqttOptions::new(
            options.client_id.clone(),
            options.host.clone(),
            options.port,
        );
        o.set_keep_alive(Duration::from_secs(5));
        o.set_clean_session(false);
        if let Some((user, password)) = &options.login {
            o.set_credentials(user, password);
        }
        o.set_max_packet_size(64 << 20, 64 << 20);
        o.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(o, 10_000);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let state = Arc::new(Mutex::new(State {
            observer,
            ..State::default()
        }));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let last_error = Arc::new(Mutex::new(None::<String>));
        let st = state.clone();
        let c = client.clone();
        let prefix = options.prefix.clone();
        let device = options.device.clone().unwrap_or_else(|| "+".into());
        let error_slot = last_error.clone();
        let task = tokio::spawn(async move {
            let mut connected = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        c.try_subscribe_many([
                            rumqttc::SubscribeFilter::new(
                                format!("{prefix}/{device}/up/#"),
                                QoS::AtLeastOnce,
                            ),
                            rumqttc::SubscribeFilter::new(
                                format!("{prefix}/{device}/status"),
                                QoS::AtLeastOnce,
                            ),
                        ])
                        .expect("subscribe");
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        connected = true;
                        let mut st = st.lock().unwrap();
                        st.connections += 1;
                        st.tell(Happened::Connected);
                        drop(st);
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if std::env::var_os("BO_TRACE").is_some() {
                            eprintln!(
                                "{:?} BO got {} ({} bytes)",
                                std::time::SystemTime::now(),
                                p.topic,
                                p.payload.len()
                            );
                        }
                        handle(&st, &c, &prefix, &p.topic, &p.payload);
                        if std::env::var_os("BO_TRACE").is_some() {
                            eprintln!("{:?} BO handled", std::time::SystemTime::now());
                        }
                    }
                    Ok(_) => {}
                    // The broker went away (tests restart it): try again shortly.
                    Err(e) => {
                        if connected {
                            connected = false;
                            st.lock().unwrap().tell(Happened::Lost {
                                error: e.to_string(),
                            });
                        }
                        *error_slot.lock().unwrap() = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                }
            }
        });
        match tokio::time::timeout(options.connect_timeout, ready_rx).await {
            Ok(Ok(())) => Ok(BackOffice {
                state,
                client,
                prefix: options.prefix,
                task,
            }),
            _ => {
                task.abort();
                let why = last_error
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap_or_else(|| "no answer".into());
                Err(format!(
                    "cannot reach the broker at {}:{} within {:?}: {why}",
                    options.host, options.port, options.connect_timeout
                ))
            }
        }
    }

    pub fn applied(&self) -> Vec<Applied> {
        self.state.lock().unwrap().applied.clone()
    }

    pub fn set_refuse(&self, policy: Option<RefusePolicy>) {
        self.state.lock().unwrap().refuse = policy;
    }

    pub fn set_observer(&self, observer: Option<Observer>) {
        self.state.lock().unwrap().observer = observer;
    }

    /// Waits until `n` operations were applied, or panics after `timeout`.
    pub async fn wait_applied(&self, n: usize, timeout: Duration) -> Vec<Applied> {
        let deadline = Instant::now() + timeout;
        loop {
            // Counted under the lock, copied only once: copying every poll would cost
            // the back office more than applying.
            let count = self.state.lock().unwrap().applied.len();
            if count >= n {
                return self.applied();
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {n} operations applied in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The dispatcher pushes new or changed work orders to a device.
    pub async fn push_work_orders(&self, device: &str, work_orders: Vec<Value>) {
        {
            let mut st = self.state.lock().unwrap();
            let list = st.work_orders.entry(device.to_owned()).or_default();
            for wo in &work_orders {
                list.retain(|w| w["id"] != wo["id"]);
                list.push(wo.clone());
            }
        }
        let msg = json!({"v": 1, "type": "upsert", "work_orders": work_orders});
        self.publish_down(device, "work-orders", encode(&msg)).await;
    }

    /// Publishes raw bytes on a device's downlink topic (bad-input tests).
    pub async fn publish_down(&self, device: &str, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(
                format!("{}/{device}/down/{topic}", self.prefix),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
    }
}

impl Drop for BackOffice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A refusal of `op` as it goes on the wire, told to the observer on the way.
/// An `up/ops` message as docs/protocol.md describes it.
#[derive(serde::Deserialize)]
struct OpsMessage<'a> {
    #[serde(borrow)]
    ops: Vec<WireOp<'a>>,
}

#[derive(serde::Deserialize)]
struct WireOp<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    wo: Cow<'a, str>,
    #[serde(borrow)]
    item: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    act: Cow<'a, str>,
    #[serde(borrow, default)]
    prev: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

fn refusal(st: &State, op: &Applied, code: &str, reason: &str) -> Value {
    st.tell(Happened::Refused { op, code, reason });
    json!({"id": op.id, "code": code, "reason": reason})
}

fn handle(
    state: &Arc<Mutex<State>>,
    client: &AsyncClient,
    prefix: &str,
    topic: &str,
    payload: &[u8],
) {
    // <prefix>/<device>/up/<what>[/<sha256>] or <prefix>/<device>/status
    let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() == 2 && parts[1] == "status" {
        let msg = decode(payload).and_then(|j| serde_json::from_slice::<Value>(&j).ok());
        let st = state.lock().unwrap();
        if let Some(s) = msg.as_ref().and_then(|m| m["state"].as_str()) {
            st.tell(Happened::Status {
                device: parts[0],
                state: s,
            });
        }
        return;
    }
    if parts.len() < 3 || parts[1] != "up" {
        return;
    }
    let device = parts[0].to_owned();
    let prefix = prefix.to_owned();
    let json = if parts[2] == "photo" {
        Vec::new()
    } else {
        let Some(json) = decode(payload) else {
            return;
        };
        json
    };
    // Operations are read into borrowed fields, as a back office that keeps up with a
    // draining fleet would; everything else is small and read as a `Value`.
    let msg = if matches!(parts[2], "photo" | "ops") {
        Value::Null
    } else {
        let Ok(msg) = serde_json::from_slice::<Value>(&json) else {
            return;
        };
        msg
    };
    match parts[2] {
        "ops" => {
            let Ok(batch) = serde_json::from_slice::<OpsMessage>(&json) else {
                return;
            };
            let mut st = state.lock().unwrap();
            st.json_bytes += json.len() as u64;
            st.batches += 1;
            st.wire_bytes += payload.len() as u64;
            st.largest_batch = st.largest_batch.max(payload.len());
            st.first_batch_at.get_or_insert_with(Instant::now);
            let mut acks = Vec::with_capacity(batch.ops.len());
            let mut refused = Vec::new();
            for op in batch.ops {
                let a = Applied {
                    device: device.clone(),
                    id: op.id.into_owned(),
                    wo: op.wo.into_owned(),
                    item: op.item.into_owned(),
                    kind: op.kind.into_owned(),
                    act: op.act.into_owned(),
                    body: serde_json::from_str(op.body.get()).unwrap_or(Value::Null),
                };
                if st.seen.contains(&a.id) {
                    st.duplicates += 1;
                    st.tell(Happened::Repeat(&a));
                    acks.push(a.id);
                    continue;
                }
                // Order per work order (rule 2 of docs/protocol.md): the predecessor the
                // device names must be applied first; otherwise this one waits (the
                // device sends it again). Photo operations name none and are judged.
                if let Some(text) = a.body["text"].as_str() {
                    if st.defer_once.remove(text) {
                        continue;
                    }
                }
                if op.prev.is_some_and(|p| !st.seen.contains(p.as_ref())) {
                    st.held_answers += 1;
                    let reason = "an earlier change of this work order is not applied yet";
                    refused.push(refusal(&st, &a, "held", reason));
                    continue;
                }
                // A photo's operation comes only after its bytes were verified.
                if a.kind == "photo" && a.act == "create" {
                    let sha = a.body["sha256"].as_str().unwrap_or_default();
                    if !st.photos.get(sha).is_some_and(|p| p.complete) {
                        refused.push(refusal(&st, &a, "validation", "photo bytes missing"));
                        continue;
                    }
                }
                if let Some((code, reason)) = st.refuse.as_ref().and_then(|f| f(&a)) {
                    st.refused.push(a.id.clone());
                    st.refused_items.push(a.item.clone());
                    refused.push(refusal(&st, &a, &code, &reason));
                    continue;
                }
                st.seen.insert(a.id.clone());
                acks.push(a.id.clone());
                st.tell(Happened::Applied(&a));
                st.applied.push(a);
                st.last_applied_at = Some(Instant::now());
            }
            let delay = st.ops_ack_delay;
            drop(st);
            let msg = json!({"v": 1, "acks": acks, "refused": refused});
            let topic = format!("{prefix}/{device}/down/acks");
            if delay.is_zero() {
                let _ = client.try_publish(topic, QoS::AtLeastOnce, false, encode(&msg));
            } else {
                let client = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = client
                        .publish(topic, QoS::AtLeastOnce, false, encode(&msg))
                        .await;
                });
            }
        }
        "photo" if parts.len() == 4 => {
            let sha = parts[3].to_owned();
            if payload.len() < 16 {
                return;
            }
            let offset = u64::from_be_bytes(payload[0..8].try_into().unwrap());
            let total = u64::from_be_bytes(payload[8..16].try_into().unwrap());
            let data = &payload[16..];
            let mut st = state.lock().unwrap();
            if st.lose_photo_chunk_at == Some(offset) {
                st.lose_photo_chunk_at = None;
                return;
            }
            let delay = st.photo_ack_delay;
            let withhold = st.no_verdict.contains(&sha);
            let rx = st.photos.entry(sha.clone()).or_default();
            rx.total = total;
            rx.chunks += 1;
            let have = rx.data.len() as u64;
            if offset == have {
                rx.data.extend_from_slice(data);
            } else if offset < have {
                rx.resent += data.len() as u64;
            }
            let mut ack = json!({"v": 1, "sha256": sha, "received": rx.data.len()});
            let mut verdict = None;
            if rx.data.len() as u64 == total && !rx.complete && !withhold {
                use sha2::Digest;
                if hex::encode(sha2::Sha256::digest(&rx.data)) == sha {
                    rx.complete = true;
                    verdict = Some(true);
                } else {
                    rx.data.clear();
                    ack["received"] = json!(0);
                    ack["error"] = json!("hash_mismatch");
                    verdict = Some(false);
                }
            }
            if rx.complete {
                ack["complete"] = json!(true);
            }
            match verdict {
                Some(true) => st.tell(Happened::PhotoComplete {
                    device: &device,
                    sha256: &sha,
                    size: total,
                }),
                Some(false) => st.tell(Happened::PhotoMismatch {
                    device: &device,
                    sha256: &sha,
                }),
                None => {}
            }
            drop(st);
            let topic = format!("{prefix}/{device}/down/photo-acks");
            let client = client.clone();
            let body = encode(&ack);
            if delay.is_zero() {
                let _ = client.try_publish(topic, QoS::AtLeastOnce, false, body);
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = client.publish(topic, QoS::AtLeastOnce, false, body).await;
                });
            }
        }
        "attachments" => {
            // Serves the range asked for in 32 KiB chunks at QoS 0, as docs/protocol.md
            // says: the device asks again for what does not arrive.
            let sha = msg["sha256"].as_str().unwrap_or_default().to_owned();
            let offset = msg["offset"].as_u64().unwrap_or(0);
            let length = msg["length"].as_u64().unwrap_or(0);
            let st = state.lock().unwrap();
            let Some(file) = st.attachment_files.get(&sha).cloned() else {
                drop(st);
                let err = json!({"v": 1, "sha256": sha, "error": "unknown attachment"});
                let _ = client.try_publish(
                    format!("{prefix}/{device}/down/attachment-errors"),
                    QoS::AtLeastOnce,
                    false,
                    encode(&err),
                );
                return;
            };
            let mut file = file;
            if st.corrupt_attachments.contains(&sha) {
                if let Some(b) = file.last_mut() {
                    *b ^= 0xff;
                }
            }
            let total = file.len() as u64;
            let end = offset.saturating_add(length).min(total);
            let delay = st.attachment_delay;
            drop(st);
            let topic = format!("{prefix}/{device}/down/attachment/{sha}");
            let (state, client) = (state.clone(), client.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut at = offset.min(total);
                while at < end {
                    let next = (at + 32 * 1024).min(end);
                    let mut chunk = Vec::with_capacity(16 + (next - at) as usize);
                    chunk.extend_from_slice(&at.to_be_bytes());
                    chunk.extend_from_slice(&total.to_be_bytes());
                    chunk.extend_from_slice(&file[at as usize..next as usize]);
                    *state
                        .lock()
                        .unwrap()
                        .attachment_bytes_sent
                        .entry(sha.clone())
                        .or_default() += next - at;
                    let _ = client.try_publish(topic.clone(), QoS::AtMostOnce, false, chunk);
                    at = next;
                }
            });
        }
        "resync" => {
            let mut st = state.lock().unwrap();
            st.resync_requests += 1;
            // A device the dispatcher gave nothing gets no answer, rather than a full
            // state that would empty the cache a test seeded directly.
            let Some(list) = st.work_orders.get(&device).cloned() else {
                return;
            };
            st.tell(Happened::Resync {
                device: &device,
                work_orders: list.len(),
            });
            drop(st);
            let msg =
                json!({"v": 1, "type": "full", "request": msg["request"], "work_orders": list});
            let _ = client.try_publish(
                format!("{prefix}/{device}/down/work-orders"),
                QoS::AtLeastOnce,
                false,
                encode(&msg),
            );
        }
        _ => {}
    }
}
