//! The uplink: one MQTT 3.1.1 session to the back office's broker (rumqttc), through
//! which the outbox drains and work orders and acknowledgements arrive.
//!
//! rumqttc is the transport only. It keeps its queue in memory, so durability stays with
//! the outbox: an operation is delivered when the back office acknowledges its id, not
//! on the broker's PUBACK. Each connection gets a fresh rumqttc client; whatever was in
//! flight on the previous one is sent again from the outbox, in order.

pub mod mqtt;
mod parking;
mod pump;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use pump::Pump;
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use crate::config::UplinkSettings;
use crate::domain::outbox::PendingOp;
use crate::link::policy::{self, Traffic};
use crate::link::{LinkClass, LinkState};
use crate::schedule::{Switches, Trigger, TriggerSet};
use crate::service::{ChunkOutcome, Service};
use wire::{Acks, Topics, WorkOrderPush, WIRE_VERSION};

/// A batch published and not yet acknowledged by the back office.
struct InFlight {
    /// Operation ids still waiting for their acknowledgement.
    waiting: HashSet<String>,
    sent_at: Instant,
}

/// The photo whose bytes are going out on this connection.
struct PhotoLane {
    current: Option<crate::domain::photos::Upload>,
    /// Next byte to send; `current.acked` is the first byte not yet confirmed.
    next: u64,
    /// Photos whose file could not be read, or that the back office found damaged too
    /// often, left for the next connection.
    skip: Vec<String>,
    /// Times on this connection the back office found each photo damaged, or confirmed
    /// all its bytes and never said whether they check out.
    damaged: HashMap<String, u32>,
    /// When the back office last confirmed bytes of the current photo, or it started.
    progress_at: Instant,
}

impl PhotoLane {
    /// Whether chunks of the current photo are out beyond what the back office
    /// confirmed.
    fn bytes_out(&self) -> bool {
        self.current.as_ref().is_some_and(|u| self.next > u.acked)
    }

    /// Whether every byte of the current photo is confirmed and the back office has not
    /// said whether they check out.
    fn awaits_verdict(&self) -> bool {
        self.current.as_ref().is_some_and(|u| u.acked >= u.size)
    }

    /// Whether an answer is owed and nothing came for `timeout`.
    fn stalled(&self, timeout: Duration) -> bool {
        (self.bytes_out() || self.awaits_verdict()) && self.progress_at.elapsed() > timeout
    }

    /// Sends the current photo again from the last byte the back office confirmed; when
    /// it confirmed them all, its last byte once more, which it answers `complete` (or
    /// `error`) as it does any chunk of a photo it holds whole.
    fn rewind(&mut self) {
        if let Some(u) = &self.current {
            tracing::warn!(sha256 = %u.sha256, from = u.acked, sent_to = self.next, "photo chunks went unconfirmed; sending them again");
            self.next = if u.acked >= u.size {
                u.size.saturating_sub(1)
            } else {
                u.acked
            };
            self.progress_at = Instant::now();
        }
    }
}

/// The attachment whose bytes are coming in on this connection. The device pulls: it
/// asks for a window of bytes from where its file ends, and asks again when they are in
/// or when they stop coming (the back office sends them at QoS 0, so nothing stale is
/// queued for the device while it is away).
struct DownloadLane {
    current: Option<crate::service::Download>,
    /// The end of the bytes asked for so far.
    asked_to: u64,
    asked_at: Instant,
    /// Attachments the back office cannot serve, or that failed their check too often.
    skip: Vec<String>,
    mismatches: HashMap<String, u32>,
}

/// Photo or attachment bytes handed to the client or asked for, and not yet settled:
/// only a new connection is sure to leave them behind when the link stops allowing files.
fn files_in_flight(photos: &PhotoLane, downloads: &DownloadLane) -> bool {
    photos.bytes_out() || downloads.in_flight()
}

impl DownloadLane {
    /// Bytes asked for and not yet in.
    fn in_flight(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|d| self.asked_to > d.received)
    }
}

/// After this many downloads that fail their SHA-256 on one connection, an attachment
/// rests ([`Resting`]); so does a photo the back office finds damaged this many times.
const MAX_MISMATCHES: u32 = 3;
/// How long a file that failed [`MAX_MISMATCHES`] times on a connection rests before it
/// is tried again, doubled at each rest up to [`REST_MAX`].
const REST_FIRST: Duration = Duration::from_secs(10 * 60);
const REST_MAX: Duration = Duration::from_secs(6 * 60 * 60);

/// Files that failed their check too often (an attachment whose bytes never match its
/// SHA-256, a photo the back office keeps calling damaged though it is intact here):
/// they rest, longer each time, instead of going again whole on every new connection,
/// which on a link that comes and goes would be all day. Kept in memory: a restart of
/// the daemon tries them again.
#[derive(Default)]
struct Resting {
    files: HashMap<String, (u32, Instant)>,
}

impl Resting {
    fn rest(&mut self, sha: &str) -> Duration {
        let (times, until) = self
            .files
            .entry(sha.to_owned())
            .or_insert((0, Instant::now()));
        *times += 1;
        let rest = REST_FIRST
            .saturating_mul(1 << (*times - 1).min(16))
            .min(REST_MAX);
        *until = Instant::now() + rest;
        tracing::warn!(sha256 = %sha, rest_s = rest.as_secs(), "a file failed too often on this connection; it rests before it is tried again");
        rest
    }

    /// The files resting now.
    fn now(&self) -> Vec<String> {
        let now = Instant::now();
        self.files
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(sha, _)| sha.clone())
            .collect()
    }
}

/// How one connection ended.
enum Ended {
    Shutdown,
    /// The link went away or changed under the session: connect again at once (or
    /// wait for a link), without backoff.
    LinkChanged(String),
    Lost(String),
    /// Batches went unanswered for `ack_timeout`: the back office is down or its answers
    /// do not reach the device. However long it lasted, the session did not work.
    Unanswered(String),
    /// The broker took the connection but refused what a session needs: trying again
    /// soon would not help, so the backoff goes on growing.
    Refused(String),
    /// The store could not take what the broker delivered (busy past its timeout, full,
    /// an I/O error). Left unacknowledged, it comes again on the next connection; the
    /// backoff goes on growing, as the store may need a while.
    StoreFailed(String),
}

/// Refusal codes of changes the device cannot send at all (docs/ui-protocol.md): too
/// large for the broker, or unreadable in the store.
const TOO_LARGE: &str = "too_large";
const UNREADABLE: &str = "unreadable";
/// A photo whose file on the device no longer matches its SHA-256.
const PHOTO_DAMAGED: &str = "photo_damaged";

/// A batch made ready for the broker.
enum Fitted {
    /// The batch's first operations, as many as fit, and their message.
    Message(Vec<PendingOp>, Vec<u8>),
    /// The batch's first operation alone makes a message of this many bytes, more than
    /// the broker takes.
    TooLarge(PendingOp, usize),
}

pub struct Uplink {
    service: Service,
    settings: UplinkSettings,
    topics: Topics,
    link: watch::Receiver<LinkState>,
    /// When the uplink started: it waits at most [`crate::link::FIRST_WORD`] from here
    /// for the link watcher's first answer.
    started: Instant,
    codec: std::sync::Mutex<wire::Codec>,
    /// The broker has delivered something to this session (an acknowledgement, a
    /// push): the connection works both ways.
    heard: bool,
    resting: std::sync::Mutex<Resting>,
}

/// A new link cuts the reconnect backoff short at most this often.
const LINK_RETRY: Duration = Duration::from_secs(10);

/// A session that lasts this long counts as working even if nothing came back.
const WORKING_SESSION: Duration = Duration::from_secs(30);

/// A session that heard from the broker counts as working only after this long. Some
/// brokers (AWS IoT Core, HiveMQ) close the connection on a publish their rules forbid,
/// right after handing over what was queued: counted as working, it would be called
/// again every `reconnect_min_ms`, faster than such a broker lets a client connect.
const HEARD_SESSION: Duration = Duration::from_secs(5);

/// What one session is doing about sync.
struct Sync {
    /// The trigger of the sync under way; `None` between syncs.
    running: Option<Trigger>,
    /// The switches as they were when the last trigger was weighed.
    switches: Switches,
}

impl Uplink {
    pub fn new(
        service: Service,
        settings: UplinkSettings,
        link: watch::Receiver<LinkState>,
    ) -> Uplink {
        let topics = Topics::new(&settings.topic_prefix, &settings.device_id);
        let codec = std::sync::Mutex::new(wire::Codec::new(settings.compression_level));
        Uplink {
            service,
            settings,
            topics,
            link,
            started: Instant::now(),
            codec,
            heard: false,
            resting: std::sync::Mutex::new(Resting::default()),
        }
    }

    /// Encodes `batch`, cut down from the end until its packet fits in
    /// `max_message_bytes`.
    fn fit(&self, mut batch: Vec<PendingOp>) -> Result<Fitted, wire::WireError> {
        let topic = self.topics.ops().len();
        loop {
            let payload = self.codec().encode_batch(&batch)?;
            let size = wire::packet_bytes(topic, payload.len());
            if size <= self.settings.max_message_bytes {
                return Ok(Fitted::Message(batch, payload));
            }
            if batch.len() == 1 {
                return Ok(Fitted::TooLarge(batch.remove(0), size));
            }
            // Halving: a few tries even from hundreds of operations, where compression
            // makes the size of a part hard to guess.
            batch.truncate(batch.len() / 2);
        }
    }

    /// What a lane leaves out now: what this connection gave up on, and what rests.
    fn skipping(&self, lane: &[String]) -> Vec<String> {
        let mut skip = lane.to_vec();
        skip.extend(self.resting().now());
        skip
    }

    fn resting(&self) -> std::sync::MutexGuard<'_, Resting> {
        // A panic while holding it leaves a map worth keeping.
        self.resting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The zstd contexts. Only this task uses them; the lock is never contended.
    fn codec(&self) -> std::sync::MutexGuard<'_, wire::Codec> {
        // A panic while compressing leaves nothing half-done in a context worth refusing.
        self.codec.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects while a link is up, drains when the scheduler says so, reconnects with
    /// backoff, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let options = match mqtt::options(&self.settings, &self.topics) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "the uplink cannot start; captures keep being stored");
                self.service.set_broker("down", Some(e.to_string()));
                self.service.clone().follow_link(self.link, shutdown).await;
                return;
            }
        };
        let mut delay = self.settings.reconnect_min;
        // When a new link last cut a backoff short.
        let mut link_retry_at: Option<Instant> = None;
        let mut pending = TriggerSet::default();
        loop {
            if !self.wait_for_link(&shutdown).await {
                return;
            }
            self.service.set_broker("connecting", None);
            let (client, mut eventloop) = AsyncClient::new(options.clone(), 64);
            eventloop.set_network_options(mqtt::network_options(&self.settings));
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = eventloop.poll() => r,
            };
            let failure = match connected {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    tracing::info!(
                        broker = %format!("{}:{}", self.settings.host, self.settings.port),
                        session_present = ack.session_present,
                        "connected to the broker"
                    );
                    let mut pump = Pump::start(eventloop);
                    let began = Instant::now();
                    self.heard = false;
                    let ended = self
                        .session(
                            &client,
                            &mut pump,
                            &shutdown,
                            &mut pending,
                            ack.session_present,
                        )
                        .await;
                    // A broker that takes the connection and then drops it (a packet over
                    // its limit, its rules) would otherwise be called every 100 ms for
                    // ever: the backoff starts over only after a session that worked.
                    let worked = worked(self.heard, began.elapsed(), &ended);
                    match ended {
                        Ended::Shutdown => {
                            self.say_goodbye(&client, &mut pump).await;
                            return;
                        }
                        Ended::LinkChanged(why) => {
                            tracing::info!(reason = %why, "broker session closed");
                            self.service.set_broker("down", None);
                            delay = self.settings.reconnect_min;
                            continue;
                        }
                        Ended::Lost(why) | Ended::Unanswered(why) => {
                            if worked {
                                delay = self.settings.reconnect_min;
                            }
                            // The connection's own failure, when there is one, is the
                            // cause; a publish that could not go is only how it showed.
                            format!("broker: {}", pump.failure().unwrap_or(why))
                        }
                        Ended::Refused(why) => format!("broker: {why}"),
                        Ended::StoreFailed(why) => why,
                    }
                }
                Ok(other) => format!("broker: unexpected first packet {other:?}"),
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    format!("broker: {}", mqtt::refusal_hint(code))
                }
                Err(e) => format!("broker: {e}"),
            };
            tracing::warn!(error = %failure, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
            self.service.set_broker("down", Some(failure));
            drop(client);
            // Jitter keeps a fleet that lost the same broker from returning in step.
            let jittered = delay.mul_f64(0.5 + rand_unit());
            self.service.set_sync_note(
                format!(
                    "the broker is not reached; next try in {} s",
                    jittered.as_secs_f64().ceil()
                ),
                false,
            );
            let retry_at = tokio::time::Instant::now() + jittered;
            delay = (delay * 2).min(self.settings.reconnect_max);
            let failed_on = self.link.borrow().clone();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(retry_at) => break,
                    changed = self.link.changed() => {
                        if changed.is_err() {
                            shutdown.cancelled().await;
                            return;
                        }
                        // A new link is a new chance: no reason to wait out the backoff.
                        // Not a new detail of the same one (a modem stepping between LTE
                        // and HSPA), and not more than once per LINK_RETRY: a modem
                        // flapping between LTE and EDGE in fringe coverage would
                        // otherwise call a broker that is down every few seconds.
                        let now = self.link.borrow_and_update().clone();
                        if now.class == failed_on.class && now.connection == failed_on.connection {
                            continue;
                        }
                        if link_retry_at.is_some_and(|at| at.elapsed() < LINK_RETRY) {
                            continue;
                        }
                        link_retry_at = Some(Instant::now());
                        delay = self.settings.reconnect_min;
                        break;
                    }
                    _ = self.service.triggers().fired() => {
                        pending = pending.union(self.service.triggers().take());
                        if pending.contains(Trigger::SyncNow) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Waits while the link watcher says there is no link: nothing runs meanwhile, no
    /// timer and no reconnect attempt (promise 7). Returns false on shutdown.
    async fn wait_for_link(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            let link = self.link.borrow_and_update().clone();
            self.service.set_link(link.clone());
            let waited = self.started.elapsed();
            let asking = link.is_asking() && waited < crate::link::FIRST_WORD;
            if !asking {
                if link.class != LinkClass::Offline {
                    return true;
                }
                self.service.set_broker("down", None);
                self.service.set_sync_note(
                    format!(
                        "offline ({}): everything is kept and goes when a link appears",
                        link.detail
                    ),
                    false,
                );
            }
            let first_word = crate::link::FIRST_WORD.saturating_sub(waited);
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = self.link.changed() => {
                    if changed.is_err() {
                        shutdown.cancelled().await;
                        return false;
                    }
                }
                _ = tokio::time::sleep(first_word), if asking => {}
            }
        }
    }

    /// Weighs the pending triggers against the switches: starts a sync when one of
    /// them may, says why not otherwise.
    fn weigh(&self, pending: &mut TriggerSet, sync: &mut Sync) -> bool {
        let set = std::mem::take(pending).union(self.service.triggers().take());
        if set.is_empty() {
            return false;
        }
        sync.switches = self.service.switches();
        match sync.switches.first_start(set) {
            Some(t) => {
                if sync.running.is_none() {
                    tracing::debug!(trigger = t.as_str(), "sync starts");
                    sync.running = Some(t);
                    self.service
                        .set_sync_note(format!("sending (after {})", t.as_str()), false);
                }
                true
            }
            None => {
                if sync.running.is_none() {
                    self.service
                        .set_sync_note("auto-sync is off: changes wait for \"sync now\"", false);
                }
                false
            }
        }
    }

    /// Asks the back office for the device's whole state (`up/resync`). A request that
    /// cannot be handed to the client now is asked again at the next connection, for as
    /// long as the store still wants the state or the cache is empty.
    fn ask_full_state(&self, client: &AsyncClient) {
        let req =
            serde_json::json!({"v": WIRE_VERSION, "request": uuid::Uuid::now_v7().to_string()});
        if let Err(e) = client.try_publish(
            self.topics.resync(),
            QoS::AtLeastOnce,
            false,
            req.to_string(),
        ) {
            tracing::warn!(error = %e, "cannot ask for the full state now; asked again at the next connection");
        }
    }

    /// One connected session: subscribe, announce, then keep `window` batches in flight
    /// while a sync runs, within what the link policy allows. `session_present`: the
    /// broker still had the device's session, and with it what was queued for it.
    async fn session(
        &mut self,
        client: &AsyncClient,
        pump: &mut Pump,
        shutdown: &CancellationToken,
        pending: &mut TriggerSet,
        session_present: bool,
    ) -> Ended {
        if let Err(e) = client.try_subscribe(self.topics.downlink_filter(), QoS::AtLeastOnce) {
            return Ended::Lost(format!("subscribe: {e}"));
        }
        let online = serde_json::json!({"v": WIRE_VERSION, "state": "online"}).to_string();
        if let Err(e) = client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, online) {
            return Ended::Lost(format!("status: {e}"));
        }
        if let Err(e) = self.service.requeue_in_flight().await {
            return Ended::Lost(format!("store: {e}"));
        }
        // A broker without the device's session (restarted without persistence, or it
        // expired while the device was away) dropped the work orders queued for it: only
        // the full state brings back what was pushed or removed meanwhile.
        // A resync asked for before this session is in the store's wish, read below.
        self.service.take_resync_now();
        if !session_present || self.service.needs_full_state().await {
            tracing::info!(session_present, "asking the back office for the full state");
            self.ask_full_state(client);
        }
        self.service.set_broker("up", None);

        let mut link = self.link.borrow_and_update().clone();
        // It may have changed since the wait for a link looked.
        self.service.set_link(link.clone());
        let mut sync = Sync {
            running: None,
            switches: self.service.switches(),
        };
        pending.insert(Trigger::LinkUp);
        self.weigh(pending, &mut sync);

        let mut photos = PhotoLane {
            current: None,
            next: 0,
            skip: Vec::new(),
            damaged: HashMap::new(),
            progress_at: Instant::now(),
        };
        let mut downloads = DownloadLane {
            current: None,
            asked_to: 0,
            asked_at: Instant::now(),
            skip: Vec::new(),
            mismatches: HashMap::new(),
        };
        let mut downloads_more = true;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut op_batch: HashMap<String, usize> = HashMap::new();
        let mut parking = parking::Parking::default();
        let mut more = true;
        // Acknowledgements being written to the store.
        let mut recording: tokio::task::JoinSet<Result<(), crate::domain::DomainError>> =
            tokio::task::JoinSet::new();
        // Whether a photo may be waiting for its bytes to go; kept apart from `more`,
        // which the operations' lane clears when it finds nothing.
        let mut photos_more = true;
        let mut timeout_check = tokio::time::interval(self.settings.ack_timeout / 2);
        timeout_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The periodic sync; its first tick is one interval away, not now.
        let mut period = sync.switches.interval.unwrap_or(Duration::from_secs(3600));
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A period changed by a reload counts from now, without waiting for a new
            // connection.
            let wanted = sync.switches.interval.unwrap_or(Duration::from_secs(3600));
            if wanted != period {
                period = wanted;
                timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let files_ok =
                policy::allows(link.class, Traffic::Files, sync.switches.files_on_wifi_only);
            if sync.running.is_some() {
                // Fill the window from the outbox.
                while more && in_flight.len() < self.settings.window {
                    // Batches go out back to back: each operation names its predecessor
                    // in its work order, so the back office keeps the order even across
                    // cuts.
                    let batch = match self.service.take_batch(&self.settings).await {
                        Ok(b) => b,
                        Err(e) => return Ended::Lost(format!("store: {e}")),
                    };
                    if batch.is_empty() {
                        more = false;
                        break;
                    }
                    let taken: Vec<i64> = batch.iter().map(|o| o.seq).collect();
                    let (batch, payload) = match self.fit(batch) {
                        Ok(Fitted::Message(batch, payload)) => (batch, payload),
                        Ok(Fitted::TooLarge(op, size)) => {
                            // Sent, it would be dropped by the broker or the client, the
                            // session with it, and the same change would come first again
                            // on the next: nothing behind it would ever go.
                            let limit = self.settings.max_message_bytes;
                            tracing::warn!(op_id = %op.op_id, item_id = %op.item_id, work_order_id = %op.work_order_id, size, limit, "a change is larger than the broker takes; refused on the device");
                            let reason = format!(
                                "this change takes {} KiB to send and the broker takes at most {} KiB (uplink.max_message_bytes): shorten it or discard it",
                                size.div_ceil(1024),
                                limit / 1024
                            );
                            // All back, this one to be refused at once.
                            if let Err(e) = self.service.put_back(taken).await {
                                return Ended::Lost(format!("store: {e}"));
                            }
                            if let Err(e) = self
                                .service
                                .refuse_on_device(op.op_id, TOO_LARGE, reason)
                                .await
                            {
                                return Ended::Lost(format!("store: {e}"));
                            }
                            continue;
                        }
                        Err(wire::WireError::Payload { op_id, error }) => {
                            // Only a damaged row can hold this; left first in line, it
                            // would hold back everything behind it.
                            tracing::error!(op_id = %op_id, error = %error, "an operation in the store cannot be read; refused on the device");
                            let reason = format!(
                                "this change could not be read back from the device's store ({error}): edit it again or discard it"
                            );
                            if let Err(e) = self.service.put_back(taken).await {
                                return Ended::Lost(format!("store: {e}"));
                            }
                            if let Err(e) = self
                                .service
                                .refuse_on_device(op_id, UNREADABLE, reason)
                                .await
                            {
                                return Ended::Lost(format!("store: {e}"));
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a batch; it stays in the outbox");
                            if let Err(e) = self.service.put_back(taken).await {
                                return Ended::Lost(format!("store: {e}"));
                            }
                            more = false;
                            break;
                        }
                    };
                    // What the message does not carry (a prefix of the batch is kept)
                    // goes back to waiting for the next.
                    if let Err(e) = self.service.put_back(taken[batch.len()..].to_vec()).await {
                        return Ended::Lost(format!("store: {e}"));
                    }
                    if let Err(e) =
                        client.try_publish(self.topics.ops(), QoS::AtLeastOnce, false, payload)
                    {
                        return Ended::Lost(format!("publish: {e}"));
                    }
                    tracing::debug!(ops = batch.len(), first_op = %batch[0].op_id, "batch sent");
                    let index = in_flight.len();
                    for op in &batch {
                        op_batch.insert(op.op_id.clone(), index);
                        parking.sent(&op.op_id, op.prev.as_deref());
                    }
                    in_flight.push_back(InFlight {
                        waiting: batch.iter().map(|o| o.op_id.clone()).collect(),
                        sent_at: Instant::now(),
                    });
                }
                // Promise 5: no photo byte is handed to the client on a link the policy
                // keeps them off.
                if files_ok {
                    match self
                        .send_photo_chunks(client, &mut photos, photos_more)
                        .await
                    {
                        Ok(found) => photos_more = found,
                        Err(why) => return Ended::Lost(why),
                    }
                    match self
                        .ask_for_attachment(client, &mut downloads, downloads_more)
                        .await
                    {
                        Ok(found) => downloads_more = found,
                        Err(why) => return Ended::Lost(why),
                    }
                }
                let photos_done = !files_ok || (!photos_more && photos.current.is_none());
                let downloads_done = !files_ok || (!downloads_more && downloads.current.is_none());
                if !more
                    && in_flight.is_empty()
                    && recording.is_empty()
                    && photos_done
                    && downloads_done
                {
                    self.finish_sync(&link, &sync).await;
                    sync.running = None;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                _ = self.service.triggers().fired() => {
                    if self.service.take_resync_now() {
                        tracing::info!("asking the back office for the full state (resync)");
                        self.ask_full_state(client);
                    }
                    if self.weigh(pending, &mut sync) {
                        more = true;
                        photos_more = true;
                        downloads_more = true;
                    }
                    let files_now = policy::allows(link.class, Traffic::Files, sync.switches.files_on_wifi_only);
                    if !files_now && files_in_flight(&photos, &downloads) {
                        return Ended::LinkChanged("photos may not go on this link any more (\"Wi-Fi only for files\")".into());
                    }
                }
                Some(recorded) = recording.join_next(), if !recording.is_empty() => {
                    match recorded {
                        // Refused changes held behind another may be waiting again.
                        Ok(Ok(())) => more = true,
                        // Not recorded: the operations stay in flight in the store, and
                        // a new connection sends them again; the back office acknowledges
                        // repeats.
                        Ok(Err(e)) => return Ended::Lost(format!("cannot record acknowledgements: {e}")),
                        Err(e) => return Ended::Lost(format!("cannot record acknowledgements: {e}")),
                    }
                }
                _ = self.service.more_to_send() => {
                    more = true;
                    photos_more = true;
                }
                _ = timer.tick(), if sync.switches.interval.is_some() => {
                    pending.insert(Trigger::Timer);
                    if self.weigh(pending, &mut sync) {
                        more = true;
                        photos_more = true;
                        downloads_more = true;
                    }
                }
                changed = self.link.changed() => {
                    if changed.is_err() {
                        return Ended::Shutdown;
                    }
                    let mut new = self.link.borrow_and_update().clone();
                    self.service.set_link(new.clone());
                    if new.class == LinkClass::Offline {
                        return Ended::LinkChanged(format!("the link went away ({})", new.detail));
                    }
                    if new.connection.is_some() && link.connection.is_some() && new.connection != link.connection {
                        return Ended::LinkChanged(format!("the link moved to another connection ({})", new.detail));
                    }
                    let files_now = policy::allows(new.class, Traffic::Files, sync.switches.files_on_wifi_only);
                    if !files_now && files_in_flight(&photos, &downloads) {
                        // Chunks handed to the client may still be in its queue: only a
                        // new connection is sure to leave them behind.
                        return Ended::LinkChanged(format!("photos may not go on {} ({})", new.class.as_str(), new.detail));
                    }
                    if files_now && !files_ok {
                        pending.insert(Trigger::LinkUp);
                        if self.weigh(pending, &mut sync) {
                            photos_more = true;
                            downloads_more = true;
                        }
                    }
                    // A moment naming no connection (between the old one going and the
                    // new one coming) must not hide that the session's connection is
                    // gone when the next names another.
                    if new.connection.is_none() {
                        new.connection = link.connection.take();
                    }
                    link = new;
                }
                _ = timeout_check.tick() => {
                    if downloads.in_flight() && downloads.asked_at.elapsed() > self.settings.ack_timeout / 2 {
                        // Bytes asked for did not come (QoS 0 may drop them): ask again
                        // from where the file ends.
                        downloads.asked_to = 0;
                    }
                    if photos.stalled(self.settings.ack_timeout) {
                        let unsettled = photos
                            .current
                            .as_ref()
                            .filter(|_| photos.awaits_verdict())
                            .map(|u| u.sha256.clone());
                        if let Some(sha) = unsettled.filter(|sha| self.strike(sha, &mut photos)) {
                            // Every byte confirmed, never a verdict: it rests rather
                            // than holding the lane, and the photos behind it go.
                            tracing::warn!(sha256 = %sha, "the back office confirms every byte of a photo and never says whether they check out");
                            photos.current = None;
                            photos_more = true;
                        } else {
                            // Chunks went unconfirmed (the back office dropped one and
                            // now ignores those beyond the gap): send them again from the
                            // last byte it confirmed.
                            photos.rewind();
                        }
                    }
                    if in_flight.front().is_some_and(|b| b.sent_at.elapsed() > self.settings.ack_timeout) {
                        // The back office has not answered: start over on a new
                        // connection, which sends everything unacknowledged again.
                        return Ended::Unanswered("no acknowledgement from the back office in time".into());
                    }
                }
                event = pump.next() => match event {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        self.heard = true;
                        if p.topic == self.topics.acks() {
                            // Unreadable ones are counted as bad; acknowledgements that
                            // come twice settle unknown ids, counted and ignored.
                            if let Some(mut acks) = self.read_acks(&p.payload) {
                                let settled = acks.settled();
                                parking.answer(&mut acks, |id| op_batch.contains_key(id));
                                // Recorded beside the sending rather than before it: the
                                // window moves on at once, and the store groups several
                                // messages' worth into one commit.
                                let service = self.service.clone();
                                recording.spawn(async move { service.apply_acks(acks).await });
                                for id in settled {
                                    if let Some(&i) = op_batch.get(&id) {
                                        if let Some(b) = in_flight.get_mut(i) {
                                            b.waiting.remove(&id);
                                        }
                                        op_batch.remove(&id);
                                    }
                                }
                                // Batches finish in any order; drop finished ones and renumber.
                                if in_flight.iter().any(|b| b.waiting.is_empty()) {
                                    in_flight.retain(|b| !b.waiting.is_empty());
                                    op_batch.clear();
                                    for (i, b) in in_flight.iter().enumerate() {
                                        for id in &b.waiting {
                                            op_batch.insert(id.clone(), i);
                                        }
                                    }
                                    more = true;
                                }
                                if in_flight.is_empty() && !parking.is_empty() {
                                    // Nothing they could wait for is out any more.
                                    let released = parking.release_all();
                                    let service = self.service.clone();
                                    recording.spawn(async move { service.apply_acks(released).await });
                                    more = true;
                                }
                            }
                        } else if p.topic == self.topics.photo_acks() {
                            match self.on_photo_ack(&p.payload, &mut photos).await {
                                Ok(true) => {
                                    more = true;
                                    photos_more = true;
                                }
                                Ok(false) => {}
                                Err(why) => {
                                    self.heard = false;
                                    return Ended::StoreFailed(why);
                                }
                            }
                        } else if p.topic == self.topics.work_orders() {
                            // Acknowledgements read before this push are recorded first:
                            // a back office that acknowledges the last changes of a work
                            // order and then removes it, or moves its stage, must find
                            // them delivered, not still pending.
                            while let Some(recorded) = recording.join_next().await {
                                match recorded {
                                    Ok(Ok(())) => more = true,
                                    Ok(Err(e)) => return Ended::Lost(format!("cannot record acknowledgements: {e}")),
                                    Err(e) => return Ended::Lost(format!("cannot record acknowledgements: {e}")),
                                }
                            }
                            if let Err(why) = self.on_work_orders(&p.payload).await {
                                // Not a session that worked: the backoff goes on growing.
                                self.heard = false;
                                return Ended::StoreFailed(why);
                            }
                            // The attachment being fetched may belong to nothing any more
                            // (its work order removed or changed): the rest of it is not
                            // asked for.
                            if let Some(sha) = downloads.current.as_ref().map(|d| d.sha256.clone()) {
                                if let Ok(false) = self.service.attachment_named(&sha).await {
                                    tracing::info!(sha256 = %sha, "attachment no longer named by a work order; its download stops");
                                    downloads.current = None;
                                    downloads_more = true;
                                }
                            }
                        } else if let Some(sha) = p.topic.strip_prefix(&self.topics.attachment_prefix()) {
                            if self.on_attachment_chunk(sha, &p.payload, &mut downloads).await {
                                downloads_more = true;
                            }
                        } else if p.topic == self.topics.attachment_errors() {
                            self.on_attachment_error(&p.payload, &mut downloads);
                        } else {
                            tracing::warn!(topic = %p.topic, "message on an unknown downlink topic ignored");
                        }
                        // Handled: a push is in the store. Not acknowledged when the
                        // session ends first, so the broker delivers it again. One the
                        // broker never hears back about would stay in its window for
                        // the device, so a failure ends the session.
                        if let Err(e) = client.try_ack(&p) {
                            return Ended::Lost(format!("acknowledging to the broker: {e}"));
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(ack)))
                        if ack.return_codes.contains(&rumqttc::SubscribeReasonCode::Failure) =>
                    {
                        // No acknowledgement could ever arrive: every operation would go
                        // again and again for nothing. Retried with backoff, in case the
                        // broker's rules change.
                        return Ended::Refused(format!(
                            "the broker refused the subscription to {}: its access rules must let this device read there",
                            self.topics.downlink_filter()
                        ));
                    }
                    Ok(Event::Incoming(Incoming::SubAck(ack)))
                        if ack.return_codes.contains(&rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)) =>
                    {
                        // It works, but the broker may drop what it sends: acknowledgements
                        // come again as operations are sent again; a push would be lost.
                        tracing::warn!(filter = %self.topics.downlink_filter(), "the broker grants only QoS 0 for the downlink: work orders it pushes may be lost on a cut; its configuration should allow QoS 1");
                    }
                    Ok(_) => {}
                    Err(e) => return Ended::Lost(e),
                },
            }
        }
    }

    /// A sync sent everything the link allows: says so, and what still waits.
    async fn finish_sync(&self, link: &LinkState, sync: &Sync) {
        let held = policy::files_held_because(link.class, sync.switches.files_on_wifi_only);
        let photos_wait = match held {
            Some(_) => matches!(self.service.next_upload(Vec::new()).await, Ok(Some(_))),
            None => false,
        };
        let unsent = self.service.unsent().await.unwrap_or(0);
        let note = match (held, unsent) {
            (Some(why), _) if photos_wait => format!("synced records; {why}"),
            (_, 0) => "synced: nothing left to send".to_owned(),
            // What is left waits behind a refusal (or is a photo's change waiting for its
            // bytes): the app shows the red items.
            (_, n) => format!("synced what could go; {n} changes wait behind a refused change"),
        };
        tracing::debug!(trigger = ?sync.running.map(Trigger::as_str), "sync finished");
        self.service.set_sync_note(note, true);
    }

    /// Reads an acknowledgement message; `None` (counted as bad) when it cannot be used.
    fn read_acks(&self, payload: &[u8]) -> Option<Acks> {
        let acks: Acks = match self
            .codec()
            .parse(payload, self.settings.max_downlink_bytes)
        {
            Ok(a) => a,
            Err(e) => {
                self.service.count_bad_downlink("acks", &e.to_string());
                return None;
            }
        };
        if acks.v != WIRE_VERSION {
            self.service
                .count_bad_downlink("acks", &wire::WireError::Version(acks.v).to_string());
            return None;
        }
        tracing::debug!(
            acks = acks.acks.len(),
            refused = acks.refused.len(),
            "acknowledgements received"
        );
        Some(acks)
    }

    /// Keeps up to `photo_window` chunks of the current photo unconfirmed; picks the
    /// next photo when there is none and `look_for_new`. Returns whether a photo is
    /// (still) under way.
    async fn send_photo_chunks(
        &self,
        client: &AsyncClient,
        lane: &mut PhotoLane,
        look_for_new: bool,
    ) -> Result<bool, String> {
        if lane.current.is_none() {
            if !look_for_new {
                return Ok(false);
            }
            match self.service.next_upload(self.skipping(&lane.skip)).await {
                Ok(Some(u)) => {
                    tracing::debug!(sha256 = %u.sha256, size = u.size, from = u.acked, "photo upload starts");
                    lane.next = u.acked;
                    lane.current = Some(u);
                    lane.progress_at = Instant::now();
                }
                Ok(None) => return Ok(false),
                Err(e) => return Err(format!("store: {e}")),
            }
        }
        if let Some(u) = lane.current.take_if(|u| u.size == 0) {
            // No chunk would go, no answer would come, and every photo behind it would
            // wait. Only a store written before empty photos were refused holds one.
            let reason = "the photo is empty (0 bytes): attach it again, or discard this one";
            if let Err(e) = self
                .service
                .refuse_photo_on_device(&u.sha256, PHOTO_DAMAGED, reason.into())
                .await
            {
                tracing::error!(sha256 = %u.sha256, error = %e, "cannot refuse an empty photo; it waits for the next connection");
                lane.skip.push(u.sha256);
            }
            return Ok(true);
        }
        let chunk = self.settings.photo_chunk_bytes as u64;
        let window = chunk * self.settings.photo_window as u64;
        while let Some(u) = &lane.current {
            if lane.next >= u.size || lane.next.saturating_sub(u.acked) >= window {
                break;
            }
            let len = chunk.min(u.size - lane.next) as usize;
            let data = match self
                .service
                .read_photo(u.sha256.clone(), lane.next, len)
                .await
            {
                Ok(d) if d.len() == len => d,
                other => {
                    let sha = u.sha256.clone();
                    lane.current = None;
                    // Gone or cut short for good, or only this read failed?
                    if !self.refuse_if_damaged(&sha, lane).await {
                        tracing::error!(sha256 = %sha, result = ?other.map(|d| d.len()), "cannot read a photo for upload; it waits");
                        lane.skip.push(sha);
                    }
                    break;
                }
            };
            let payload = wire::photo_chunk(lane.next, u.size, &data);
            client
                .try_publish(
                    self.topics.photo(&u.sha256),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| format!("publish: {e}"))?;
            lane.next += len as u64;
        }
        Ok(lane.current.is_some())
    }

    /// Keeps a window of the current attachment's bytes asked for; picks the next
    /// attachment when there is none and `look_for_new`. Returns whether one is under way.
    async fn ask_for_attachment(
        &self,
        client: &AsyncClient,
        lane: &mut DownloadLane,
        look_for_new: bool,
    ) -> Result<bool, String> {
        if lane.current.is_none() {
            if !look_for_new {
                return Ok(false);
            }
            match self.service.next_download(self.skipping(&lane.skip)).await {
                Ok(Some(d)) => {
                    tracing::debug!(sha256 = %d.sha256, size = d.size, from = d.received, "attachment download starts");
                    lane.asked_to = 0;
                    lane.current = Some(d);
                }
                Ok(None) => return Ok(false),
                Err(e) => return Err(format!("store: {e}")),
            }
        }
        let Some(d) = &lane.current else {
            return Ok(false);
        };
        if lane.asked_to > d.received {
            return Ok(true);
        }
        let window = (self.settings.photo_chunk_bytes * self.settings.photo_window) as u64;
        let length = window.min(d.size - d.received);
        let request = wire::AttachmentRequest {
            v: WIRE_VERSION,
            sha256: d.sha256.clone(),
            work_order_id: d.work_order_id.clone(),
            attachment_id: d.attachment_id.clone(),
            offset: d.received,
            length,
        };
        let body = serde_json::to_vec(&request).map_err(|e| format!("encode: {e}"))?;
        client
            .try_publish(
                self.topics.attachment_requests(),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .map_err(|e| format!("publish: {e}"))?;
        lane.asked_to = d.received + length;
        lane.asked_at = Instant::now();
        Ok(true)
    }

    /// Takes a chunk of the attachment being downloaded; returns true when the lane is
    /// free for the next one.
    async fn on_attachment_chunk(
        &self,
        sha: &str,
        payload: &[u8],
        lane: &mut DownloadLane,
    ) -> bool {
        let Some(d) = lane.current.as_mut().filter(|d| d.sha256 == sha) else {
            // A late chunk of something no longer asked for: QoS 0, nothing to answer.
            return false;
        };
        let Some((offset, total, data)) = wire::parse_chunk(payload) else {
            self.service
                .count_bad_downlink("attachment", "a chunk shorter than its header");
            return false;
        };
        if total != d.size {
            self.service.count_bad_downlink(
                "attachment",
                &format!("attachment {sha} is {total} bytes by the back office's chunk, {} by its work order", d.size),
            );
            self.service.set_attachment_problem(
                Some(&d.work_order_id),
                sha,
                Some(format!(
                    "the back office's file is {total} bytes, the work order says {}",
                    d.size
                )),
            );
            lane.skip.push(sha.to_owned());
            lane.current = None;
            return true;
        }
        match self
            .service
            .attachment_chunk(d, offset, data.to_vec())
            .await
        {
            Ok(ChunkOutcome::Grew(n)) => {
                d.received = n;
                // Bytes still coming on a slow link are not bytes that stopped coming.
                lane.asked_at = Instant::now();
                false
            }
            Ok(ChunkOutcome::NotNext(have)) => {
                // Shorter than it was: swept, its work order gone or changed since.
                if have < d.received
                    && matches!(self.service.attachment_named(sha).await, Ok(false))
                {
                    tracing::info!(sha256 = %sha, "attachment no longer named by a work order; its download stops");
                    lane.current = None;
                    return true;
                }
                d.received = have;
                false
            }
            Ok(ChunkOutcome::Complete) => {
                self.service
                    .set_attachment_problem(Some(&d.work_order_id), sha, None);
                lane.current = None;
                true
            }
            Ok(ChunkOutcome::Mismatch) => {
                let n = lane.mismatches.entry(sha.to_owned()).or_default();
                *n += 1;
                self.service.count_bad_downlink(
                    "attachment",
                    &format!("attachment {sha} does not match its SHA-256 (try {n}); fetched again from the start"),
                );
                let mut problem =
                    format!("its bytes did not match its SHA-256 ({n} of {MAX_MISMATCHES} tries)");
                if *n >= MAX_MISMATCHES {
                    lane.skip.push(sha.to_owned());
                    let rest = self.resting().rest(sha);
                    problem = format!(
                        "its bytes did not match its SHA-256 {n} times; tried again in {} min",
                        rest.as_secs().div_ceil(60)
                    );
                }
                self.service
                    .set_attachment_problem(Some(&d.work_order_id), sha, Some(problem));
                lane.current = None;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, sha256 = %sha, "cannot store an attachment chunk; it waits");
                self.service.set_attachment_problem(
                    Some(&d.work_order_id),
                    sha,
                    Some(format!("cannot be stored on the device: {e}")),
                );
                lane.skip.push(sha.to_owned());
                lane.current = None;
                true
            }
        }
    }

    fn on_attachment_error(&self, payload: &[u8], lane: &mut DownloadLane) {
        let err = match self
            .codec()
            .parse::<wire::AttachmentError>(payload, self.settings.max_downlink_bytes)
        {
            Ok(e) if e.v == WIRE_VERSION => e,
            Ok(e) => {
                self.service.count_bad_downlink(
                    "attachment-errors",
                    &wire::WireError::Version(e.v).to_string(),
                );
                return;
            }
            Err(e) => {
                self.service
                    .count_bad_downlink("attachment-errors", &e.to_string());
                return;
            }
        };
        tracing::warn!(sha256 = %err.sha256, error = %err.error, "the back office cannot serve an attachment; it waits for the next connection");
        let work_order_id = lane
            .current
            .as_ref()
            .filter(|d| d.sha256 == err.sha256)
            .map(|d| d.work_order_id.clone());
        self.service.set_attachment_problem(
            work_order_id.as_deref(),
            &err.sha256,
            // The back office's words, shown to the inspector: a line, not a page.
            Some(format!(
                "{}: {}",
                crate::service::CANNOT_SERVE,
                err.error.chars().take(200).collect::<String>()
            )),
        );
        lane.skip.push(err.sha256.clone());
        if lane
            .current
            .as_ref()
            .is_some_and(|d| d.sha256 == err.sha256)
        {
            lane.current = None;
        }
    }

    /// The back office found the bytes of a photo damaged, and its upload starts over. A
    /// file damaged on the device would only be sent again and again: its operations are
    /// refused on the device instead. An intact one goes again, up to
    /// [`MAX_MISMATCHES`] times on one connection.
    async fn on_photo_damaged(&self, sha: &str, lane: &mut PhotoLane) {
        if self.refuse_if_damaged(sha, lane).await {
            return;
        }
        if self.strike(sha, lane) {
            tracing::warn!(sha256 = %sha, "the back office keeps finding a photo damaged that is intact on this device");
        }
    }

    /// Counts one more time the back office could not settle a photo on this
    /// connection; at [`MAX_MISMATCHES`] the photo rests and is left for later. Returns
    /// whether it now rests.
    fn strike(&self, sha: &str, lane: &mut PhotoLane) -> bool {
        let n = lane.damaged.entry(sha.to_owned()).or_default();
        *n += 1;
        if *n < MAX_MISMATCHES {
            return false;
        }
        lane.skip.push(sha.to_owned());
        self.resting().rest(sha);
        true
    }

    /// Checks this device's copy of a photo; if it is damaged (or gone), refuses the
    /// photo's operations on the device, since sending it cannot help. Returns whether
    /// it was damaged.
    async fn refuse_if_damaged(&self, sha: &str, lane: &mut PhotoLane) -> bool {
        let Some(problem) = self.service.photo_damage_here(sha).await else {
            return false;
        };
        tracing::error!(sha256 = %sha, problem = %problem, "a photo's file on this device is damaged; it is not sent");
        let reason = format!(
            "the photo's file on this device is damaged ({problem}): attach the photo again, or discard this one"
        );
        if let Err(e) = self
            .service
            .refuse_photo_on_device(sha, PHOTO_DAMAGED, reason)
            .await
        {
            tracing::error!(sha256 = %sha, error = %e, "cannot refuse the operations of a damaged photo; it waits for the next connection");
            lane.skip.push(sha.to_owned());
        }
        true
    }

    /// Handles the back office's progress on a photo; returns true when the photo is
    /// done (its operation may go, and the next photo may start).
    ///
    /// An answer the store could not take is an error: left unacknowledged to the broker,
    /// it comes again on the next connection. One that starts a photo over must not be
    /// lost, and the others cost nothing to hear twice.
    async fn on_photo_ack(&self, payload: &[u8], lane: &mut PhotoLane) -> Result<bool, String> {
        let ack = match self
            .codec()
            .parse::<wire::PhotoAck>(payload, self.settings.max_downlink_bytes)
        {
            Ok(a) if a.v == WIRE_VERSION => a,
            Ok(a) => {
                self.service
                    .count_bad_downlink("photo-acks", &wire::WireError::Version(a.v).to_string());
                return Ok(false);
            }
            Err(e) => {
                self.service
                    .count_bad_downlink("photo-acks", &e.to_string());
                return Ok(false);
            }
        };
        let is_current = lane
            .current
            .as_ref()
            .is_some_and(|u| u.sha256 == ack.sha256);
        let (received, complete, failed) = (ack.received, ack.complete, ack.error.is_some());
        let sha = ack.sha256.clone();
        match self.service.photo_progress(ack).await {
            Ok(true) => {}
            Ok(false) => {
                self.service.count_bad_downlink(
                    "photo-acks",
                    &format!("acknowledgement for photo {sha}, which this device is not sending"),
                );
                return Ok(false);
            }
            Err(e) if e.is_store_unavailable() => {
                return Err(format!(
                    "the store could not take the back office's answer on photo {sha} ({e}); the broker delivers it again on the next connection"
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record photo progress");
                return Ok(false);
            }
        }
        if failed {
            self.on_photo_damaged(&sha, lane).await;
        }
        if !is_current {
            return Ok(complete);
        }
        if complete || failed {
            lane.current = None;
            return Ok(true);
        }
        if let Some(u) = lane.current.as_mut() {
            let received = received.min(u.size);
            if received > u.acked {
                u.acked = received;
                lane.progress_at = Instant::now();
            }
            lane.next = lane.next.max(u.acked);
        }
        Ok(false)
    }

    /// Stores a push from the dispatcher. A broken one is counted and dropped; one the
    /// store could not take is an error, so that it is not acknowledged to the broker.
    async fn on_work_orders(&self, payload: &[u8]) -> Result<(), String> {
        let push: WorkOrderPush = match self
            .codec()
            .parse(payload, self.settings.max_downlink_bytes)
        {
            Ok(p) => p,
            Err(e) => {
                self.service
                    .count_bad_downlink("work-orders", &e.to_string());
                return Ok(());
            }
        };
        match self.service.apply_push(push).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_store_unavailable() => Err(format!(
                "the store could not take work orders from the dispatcher ({e}); the broker delivers them again on the next connection"
            )),
            Err(e) => {
                self.service
                    .count_bad_downlink("work-orders", &e.to_string());
                Ok(())
            }
        }
    }

    /// A clean stop says "offline" itself, so the back office need not wait for the
    /// broker to notice a missing keepalive.
    async fn say_goodbye(&self, client: &AsyncClient, pump: &mut Pump) {
        let offline = serde_json::json!({"v": WIRE_VERSION, "state": "offline"}).to_string();
        let _ = client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, offline);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = pump.next().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        self.service.set_broker("down", None);
    }
}

/// Whether a session worked, so that the backoff may start over: the broker delivered
/// something and the session lasted [`HEARD_SESSION`], or it lasted [`WORKING_SESSION`]
/// with its batches answered.
fn worked(heard: bool, lasted: Duration, ended: &Ended) -> bool {
    (heard && lasted >= HEARD_SESSION)
        || (lasted >= WORKING_SESSION && !matches!(ended, Ended::Unanswered(_)))
}

/// A number in [0, 1), for jitter.
fn rand_unit() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_starts_over_only_after_a_session_that_worked() {
        let long = WORKING_SESSION + Duration::from_secs(15);
        let short = Duration::from_secs(1);
        let lost = || Ended::Lost("cut".into());
        let unanswered = || Ended::Unanswered("no answer".into());
        assert!(worked(true, HEARD_SESSION, &lost()));
        // Handed what was queued, then closed at once (a publish the broker's rules
        // forbid): not a session that worked.
        assert!(!worked(true, short, &lost()));
        assert!(worked(false, long, &lost()));
        assert!(!worked(false, short, &lost()));
        // A back office that is down: every session lasts the ack timeout, and not one
        // of them worked.
        assert!(!worked(false, long, &unanswered()));
        assert!(worked(true, long, &unanswered()));
    }

    /// A back office that confirms every byte of a photo and never says `complete` (its
    /// verdict lost, or forgotten) must not hold the photo lane for the connection.
    #[test]
    fn a_photo_confirmed_whole_without_a_verdict_is_asked_again() {
        let mut lane = PhotoLane {
            current: Some(crate::domain::photos::Upload {
                sha256: "ab".repeat(32),
                size: 100_000,
                acked: 100_000,
            }),
            next: 100_000,
            skip: Vec::new(),
            damaged: HashMap::new(),
            progress_at: Instant::now() - Duration::from_secs(60),
        };
        assert!(lane.stalled(Duration::from_secs(30)));
        assert!(
            !lane.bytes_out(),
            "none out: a link change need not end the session"
        );
        lane.rewind();
        assert_eq!(lane.next, 99_999, "its last byte goes once more");
        assert!(
            !lane.stalled(Duration::from_secs(30)),
            "then it waits again"
        );
        assert!(lane.awaits_verdict());
        // Halfway, with nothing out beyond the confirmed bytes, nothing is owed.
        if let Some(u) = lane.current.as_mut() {
            u.acked = 50_000;
        }
        lane.next = 50_000;
        assert!(!lane.bytes_out() && !lane.awaits_verdict());
    }
}
