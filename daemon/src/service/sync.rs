//! The service's side of synchronisation: what the uplink asks of the store, and what it
//! reports back (broker state, last upload and download, errors) for the app, `fieldctl
//! status` and systemd's status line.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use ui_bridge::{Event, WorkOrderChange};

use super::Service;
use crate::config::UplinkSettings;
use crate::domain::outbox::{self, PendingOp, StateChange};
use crate::domain::work_orders::WorkOrderDoc;
use crate::domain::{journal, photos, settings, work_orders, DomainError};
use crate::link::{LinkClass, LinkState};
use crate::schedule::{Switches, Triggers};
use crate::store::now_ms;
use crate::uplink::wire::{Acks, PhotoAck, Refusal, WorkOrderPush, WIRE_VERSION};

/// The refusal code for "not applied: an earlier operation of this work order in the
/// same batch was refused".
pub const HELD: &str = "held";

/// What the app is told of an attachment the device has no room for yet.
const WAITS_FOR_SPACE: &str = "waits for free space on the device";

/// How the app is told that the back office answered it cannot serve an attachment.
pub const CANNOT_SERVE: &str = "the back office cannot serve it";

/// An attachment to fetch, and how much of it is on the device.
#[derive(Debug, Clone)]
pub struct Download {
    pub sha256: String,
    pub size: u64,
    pub work_order_id: String,
    pub attachment_id: String,
    pub received: u64,
}

/// What a downloaded chunk did.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Bytes on the device now.
    Grew(u64),
    /// Not the next bytes (a repeat, or a gap after a loss); the device has this many.
    NotNext(u64),
    /// The last bytes arrived and the SHA-256 checks out.
    Complete,
    /// The whole file arrived but its SHA-256 does not match: thrown away.
    Mismatch,
}

/// The uplink's state as the app shows it.
#[derive(Debug, Clone)]
pub struct SyncStatus {
    /// `not_configured`, `connecting`, `up`, `down`.
    pub broker: &'static str,
    pub link: LinkState,
    pub last_upload_ms: Option<i64>,
    pub last_download_ms: Option<i64>,
    pub last_error: Option<String>,
    /// When a sync last finished with nothing left that the link allowed.
    pub last_sync_ms: Option<i64>,
    /// Why the last sync did or did not happen, for the app's offline banner.
    pub note: Option<String>,
    /// Downlink messages that could not be used, since start.
    pub bad_downlink: u64,
}

impl Default for SyncStatus {
    fn default() -> SyncStatus {
        SyncStatus {
            broker: "not_configured",
            link: LinkState::unknown("starting"),
            last_upload_ms: None,
            last_download_ms: None,
            last_error: None,
            last_sync_ms: None,
            note: None,
            bad_downlink: 0,
        }
    }
}

impl SyncStatus {
    /// One line for systemd's `STATUS=`: what an operator running `systemctl status`
    /// wants to know first.
    fn status_line(&self) -> String {
        let link = match self.link.class {
            LinkClass::Offline => format!("offline ({})", self.link.detail),
            LinkClass::Unknown => "link unknown".to_owned(),
            c => format!("{} ({})", c.as_str(), self.link.detail),
        };
        let broker = match self.broker {
            "up" => "broker connected".to_owned(),
            "connecting" => "connecting to the broker".to_owned(),
            "not_configured" => "no broker configured".to_owned(),
            _ => format!(
                "broker down ({})",
                self.last_error.as_deref().unwrap_or("not reached")
            ),
        };
        match &self.note {
            Some(note) => format!("{link}; {broker}; {note}"),
            None => format!("{link}; {broker}"),
        }
    }
}

impl Service {
    pub fn sync_status(&self) -> SyncStatus {
        match self.inner.sync.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn update_sync(&self, f: impl FnOnce(&mut SyncStatus)) -> SyncStatus {
        let mut s = match self.inner.sync.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        f(&mut s);
        s.clone()
    }

    /// Tells the app and systemd; called when the link, the broker or the note changed.
    fn announce(&self, now: &SyncStatus) {
        self.emit(Event::Link {
            link: now.link.class.as_str().into(),
            broker: now.broker.into(),
            note: now.note.clone(),
        });
        crate::systemd::status(&now.status_line());
    }

    /// The broker session changed state; `error` says why when it went down.
    pub fn set_broker(&self, state: &'static str, error: Option<String>) {
        let before = self.sync_status().broker;
        let now = self.update_sync(|s| {
            s.broker = state;
            if error.is_some() {
                s.last_error = error;
            } else if state == "up" {
                // A working session starts the banner afresh: why the last one failed
                // is no news once the next one works.
                s.last_error = None;
            }
        });
        if before != state {
            self.announce(&now);
        }
    }

    /// Shows the link watcher's word in the status until `shutdown`, for a daemon whose
    /// uplink does not run (no broker, or a broker setting it cannot use).
    pub async fn follow_link(
        self,
        mut link: tokio::sync::watch::Receiver<LinkState>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            self.set_link(link.borrow_and_update().clone());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = link.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The link watcher's latest word.
    pub fn set_link(&self, link: LinkState) {
        let before = self.sync_status().link;
        if before == link {
            return;
        }
        let class_changed = before.class != link.class;
        let now = self.update_sync(|s| s.link = link);
        if class_changed {
            self.announce(&now);
        } else {
            // The app's event carries the class only: a new detail (another access
            // point, a better technology) is news for `systemctl status` alone.
            crate::systemd::status(&now.status_line());
        }
    }

    /// Why the last sync did or did not happen; `finished` marks a sync that sent all
    /// the link allowed.
    pub fn set_sync_note(&self, note: impl Into<String>, finished: bool) {
        let note = note.into();
        let before = self.sync_status().note;
        let now = self.update_sync(|s| {
            if finished {
                s.last_sync_ms = Some(now_ms());
            }
            s.note = Some(note.clone());
        });
        if before.as_deref() != Some(note.as_str()) {
            tracing::info!(note = %note, "sync");
            self.announce(&now);
        }
    }

    /// Changes stored and not yet confirmed by the back office.
    pub async fn unsent(&self) -> Result<u64, DomainError> {
        self.inner.store.read(journal::unsent).await
    }

    /// Requests for a sync from the socket and the downlink.
    pub fn triggers(&self) -> &Triggers {
        &self.inner.triggers
    }

    /// The inspector's sync switches as they are now.
    pub fn switches(&self) -> Switches {
        match self.inner.switches.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(super) fn set_switches(&self, s: Switches) {
        let now = {
            let mut current = match self.inner.switches.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            *current = s;
            self.sync_status()
        };
        self.announce(&now);
    }

    /// Puts the switches the app set (kept in the store) over the config's defaults.
    pub async fn load_switches(&self) -> Result<(), DomainError> {
        let defaults = self.settings().sync.switches.clone();
        let s = self
            .inner
            .store
            .read(move |c| crate::domain::settings::load_switches(c, &defaults))
            .await?;
        *match self.inner.switches.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        } = s;
        Ok(())
    }

    /// Resolves when a running sync may have more to send: acknowledgements freed the
    /// window or a photo finished.
    pub async fn more_to_send(&self) {
        self.inner.more_to_send.notified().await
    }

    /// A downlink message that could not be used: logged with its reason and counted;
    /// nothing stored changes.
    pub fn count_bad_downlink(&self, topic: &str, why: &str) {
        let s = self.update_sync(|s| {
            s.bad_downlink += 1;
            s.last_error = Some(format!("bad {topic} message from the back office: {why}"));
        });
        tracing::warn!(
            topic,
            reason = why,
            count = s.bad_downlink,
            "downlink message ignored"
        );
    }

    /// The next attachment a work order names that is not on the device yet, skipping
    /// `skip` and anything that would eat into the free-space reserve kept for captures.
    /// Whether a cached work order still names the attachment `sha256`.
    pub async fn attachment_named(&self, sha256: &str) -> Result<bool, DomainError> {
        let sha256 = sha256.to_owned();
        let named = self.inner.store.read(work_orders::attachments).await?;
        Ok(named.iter().any(|(_, a)| a.sha256 == sha256))
    }

    pub async fn next_download(&self, skip: Vec<String>) -> Result<Option<Download>, DomainError> {
        let named = self.inner.store.read(work_orders::attachments).await?;
        let files = self.store().attachments();
        let reserve = self.settings().min_free_bytes;
        for (work_order_id, a) in named {
            if skip.contains(&a.sha256) || files.is_complete(&a.sha256) {
                continue;
            }
            let mut received = files.received(&a.sha256);
            if received > a.size {
                // Longer than the back office says the file is: start again.
                files.remove(&a.sha256);
                received = 0;
            }
            if received == a.size {
                // Whole but never checked: killed between its last chunk and the check,
                // or an empty file, for which no chunk ever comes. Asked for again, no
                // byte would come and the lane would wait on it for ever.
                let d = Download {
                    sha256: a.sha256.clone(),
                    size: a.size,
                    work_order_id: work_order_id.clone(),
                    attachment_id: a.id.clone(),
                    received,
                };
                match self.check_whole_attachment(&d).await {
                    Ok(true) => continue,
                    Ok(false) if a.size > 0 => received = 0,
                    Ok(false) => {
                        self.count_bad_downlink(
                            "attachment",
                            &format!(
                                "attachment {} is empty, and that is not what its SHA-256 names",
                                a.sha256
                            ),
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(sha256 = %a.sha256, error = %e, "cannot check a downloaded attachment; it waits");
                        continue;
                    }
                }
            }
            // Downloads stop well short of the captures' reserve: a file that can be
            // fetched again must never be why the next photo is refused.
            let floor = reserve
                .saturating_mul(2)
                .saturating_add(self.settings().max_photo_bytes);
            if self.free_space(true) < (a.size - received).saturating_add(floor) {
                tracing::warn!(sha256 = %a.sha256, size = a.size, "an attachment waits: it would eat into the space kept for captures");
                self.set_attachment_problem(
                    Some(&work_order_id),
                    &a.sha256,
                    Some(WAITS_FOR_SPACE.into()),
                );
                continue;
            }
            // Tried again: what held it back is no longer the story, except the back
            // office's word that it cannot serve the file, which stays until the file
            // comes or a new answer replaces it (a request that reaches nobody must not
            // make the inspector think the file is on its way).
            if self
                .attachment_problem(&a.sha256)
                .is_some_and(|p| !p.starts_with(CANNOT_SERVE))
            {
                self.set_attachment_problem(Some(&work_order_id), &a.sha256, None);
            }
            return Ok(Some(Download {
                sha256: a.sha256,
                size: a.size,
                work_order_id,
                attachment_id: a.id,
                received,
            }));
        }
        Ok(None)
    }

    /// Checks an attachment whose bytes are all on the device; returns whether it matched
    /// (a mismatch is thrown away).
    async fn check_whole_attachment(&self, d: &Download) -> std::io::Result<bool> {
        let store = self.store().clone();
        let (sha, empty) = (d.sha256.clone(), d.size == 0);
        let matched = tokio::task::spawn_blocking(move || {
            let files = store.attachments();
            if empty {
                files.append(&sha, 0, &[])?;
            }
            files.finish(&sha)
        })
        .await
        .map_err(std::io::Error::other)??;
        if matched {
            self.attachment_complete(d);
        }
        Ok(matched)
    }

    fn attachment_complete(&self, d: &Download) {
        tracing::info!(sha256 = %d.sha256, size = d.size, work_order_id = %d.work_order_id, attachment_id = %d.attachment_id, "attachment downloaded and verified");
        self.update_sync(|s| s.last_download_ms = Some(now_ms()));
        self.emit(Event::WorkOrder {
            work_order_id: d.work_order_id.clone(),
            change: WorkOrderChange::Changed,
        });
    }

    /// Appends a chunk of `d` and, once the file is whole, checks it.
    pub async fn attachment_chunk(
        &self,
        d: &Download,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<ChunkOutcome, DomainError> {
        if offset.saturating_add(data.len() as u64) > d.size {
            return Ok(ChunkOutcome::NotNext(d.received));
        }
        let store = self.store().clone();
        let (sha, size) = (d.sha256.clone(), d.size);
        let outcome = tokio::task::spawn_blocking(move || {
            use crate::store::attachments::Appended;
            let files = store.attachments();
            Ok::<_, std::io::Error>(match files.append(&sha, offset, &data)? {
                Appended::NotNext { have } => ChunkOutcome::NotNext(have),
                Appended::Grew(n) if n < size => ChunkOutcome::Grew(n),
                Appended::Grew(_) if files.finish(&sha)? => ChunkOutcome::Complete,
                Appended::Grew(_) => ChunkOutcome::Mismatch,
            })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| crate::store::PhotoError::Io {
            path: self.store().state_dir().join("attachments"),
            source,
        })?;
        if outcome == ChunkOutcome::Complete {
            self.attachment_complete(d);
        }
        Ok(outcome)
    }

    /// Removes attachment files no cached work order names any more.
    pub async fn sweep_attachments(&self) -> Result<(), DomainError> {
        let named: HashSet<String> = self
            .inner
            .store
            .read(work_orders::attachments)
            .await?
            .into_iter()
            .map(|(_, a)| a.sha256)
            .collect();
        let files = self.store().attachments();
        for sha in files.list() {
            if !named.contains(&sha) {
                tracing::info!(sha256 = %sha, "attachment no longer named by a work order removed");
                files.remove(&sha);
            }
        }
        self.forget_attachment_problems_but(&named);
        Ok(())
    }

    pub async fn requeue_in_flight(&self) -> Result<usize, DomainError> {
        self.change(outbox::requeue_in_flight).await
    }

    /// The next batch of operations to send, already marked as leaving the device,
    /// durably, before it is published (see [`outbox::take_batch`]).
    pub async fn take_batch(
        &self,
        settings: &UplinkSettings,
    ) -> Result<Vec<PendingOp>, DomainError> {
        // A batch never needs more bodies than one message can carry; the uplink cuts
        // what the envelope still makes too large.
        let max_bytes = settings.batch_max_bytes.min(settings.max_message_bytes);
        let max_ops = settings.batch_max_ops;
        self.fold().await?;
        self.inner
            .store
            .write(move |c| outbox::take_batch(c, max_ops, max_bytes))
            .await
    }

    /// Puts back what [`Service::take_batch`] took and the uplink did not publish. Need
    /// not be durable: lost in a crash, they are sent again like any unacknowledged
    /// operation.
    pub async fn put_back(&self, seqs: Vec<i64>) -> Result<(), DomainError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.inner
            .store
            .write_lazy(move |c| outbox::put_back(c, &seqs))
            .await
    }

    /// Refuses, on the device, a change it cannot send at all, as the back office would
    /// refuse one: it turns red with `reason` and holds back only its work order until
    /// it is edited or discarded.
    pub async fn refuse_on_device(
        &self,
        op_id: String,
        code: &str,
        reason: String,
    ) -> Result<(), DomainError> {
        self.apply_acks(Acks {
            v: WIRE_VERSION,
            acks: Vec::new(),
            unreadable: Vec::new(),
            refused: vec![Refusal {
                id: op_id,
                code: code.to_owned(),
                reason,
                work_order: None,
            }],
        })
        .await
    }

    /// Applies acknowledgements and refusals. They need no fsync of their own: lost in a
    /// power cut, the operations are simply sent again and acknowledged again.
    pub async fn apply_acks(&self, acks: Acks) -> Result<(), DomainError> {
        let Acks {
            acks: ids,
            refused,
            unreadable,
            ..
        } = acks;
        for why in unreadable {
            self.count_bad_downlink("acks", &why);
        }
        let acked = ids.len();
        let (changes, unknown, unsent, wo_changes) = self
            .inner
            .store
            .write_lazy(move |c| {
                let (mut changes, unknown) = outbox::acknowledge(c, &ids)?;
                let mut wo_changes = Vec::new();
                let mut bad_docs = Vec::new();
                for r in &refused {
                    if r.code == HELD {
                        // Not applied because an earlier change of its work order was
                        // refused: it waits behind that one, it is not wrong itself.
                        if let Some(change) = outbox::requeue_op(c, &r.id)? {
                            changes.push(change);
                        }
                        continue;
                    }
                    let reason = if r.reason.is_empty() {
                        r.code.clone()
                    } else {
                        format!("{}: {}", r.code, r.reason)
                    };
                    let refused_wo = outbox::refuse(c, &r.id, &reason)?.map(|change| {
                        let wo = change.work_order_id.clone();
                        changes.push(change);
                        wo
                    });
                    // The back office's current version of the work order, so the
                    // inspector sees what changed.
                    // A broken one is left out: the refusal itself must still be kept,
                    // or the same batch would come back and be refused for ever. So is
                    // one of another work order: a refusal is no way to hand one out.
                    if let Some(doc) = &r.work_order {
                        let doc = serde_json::from_value::<WorkOrderDoc>(doc.clone())
                            .map_err(|e| e.to_string())
                            .and_then(|doc| {
                                doc.validate().map(|()| doc).map_err(|e| e.to_string())
                            });
                        match (doc, &refused_wo) {
                            (Ok(doc), Some(wo)) if doc.id == *wo => {
                                if let Some(ch) = work_orders::refresh_from_refusal(c, &doc)? {
                                    wo_changes.push((doc.id.clone(), ch));
                                }
                            }
                            (Ok(doc), Some(wo)) => bad_docs.push(format!(
                                "the refusal of {} (work order {wo}) carries work order {}: ignored",
                                r.id, doc.id
                            )),
                            // Not ours (any more): nothing to say which work order it
                            // is about.
                            (Ok(_), None) => {}
                            (Err(e), _) => bad_docs.push(format!("work order in a refusal: {e}")),
                        }
                    }
                }
                // A withdrawn work order whose last change this was goes now.
                let settled = work_orders::remove_settled(c)?;
                // Asked here, in the transaction, rather than by a read of its own
                // after every acknowledgement message of a drain.
                let photos_gone = photos::gone_count(c)?;
                Ok::<_, DomainError>((
                    changes,
                    unknown,
                    journal::unsent(c)?,
                    (wo_changes, bad_docs, settled, photos_gone),
                ))
            })
            .await?;
        let (wo_changes, bad_docs, settled, photos_gone) = wo_changes;
        for why in bad_docs {
            self.count_bad_downlink("acks", &why);
        }
        if !unknown.is_empty() {
            tracing::info!(count = unknown.len(), first = %unknown[0], "acknowledgements for operations no longer in the outbox (repeats) ignored");
        }
        for ch in &changes {
            if ch.state == Some(ui_bridge::SyncState::Refused) {
                tracing::warn!(item_id = %ch.item_id, work_order_id = %ch.work_order_id, reason = ?ch.reason, "a change was refused; it holds back its work order");
            }
            self.emit_change(ch);
        }
        for (work_order_id, change) in wo_changes {
            self.emit(Event::WorkOrder {
                work_order_id,
                change,
            });
        }
        self.after_removed(settled).await;
        // An acknowledged deletion may have taken a photo's last row. Notes of files
        // that could not be removed stay for the next start; they alone ask for nothing.
        if photos_gone > self.unremovable_photos().len() {
            self.remove_gone_photos().await;
        }
        self.emit(Event::Unsent { count: unsent });
        if acked > 0 {
            self.update_sync(|s| s.last_upload_ms = Some(now_ms()));
        }
        Ok(())
    }

    fn emit_change(&self, ch: &StateChange) {
        self.emit(Event::ItemState {
            item_id: ch.item_id.clone(),
            work_order_id: ch.work_order_id.clone(),
            kind: ch.kind,
            state: ch.state,
            reason: ch.reason.clone(),
        });
    }

    /// Work orders from the dispatcher: into the cache, out as events.
    pub async fn apply_push(&self, push: WorkOrderPush) -> Result<(), DomainError> {
        let (v, docs, remove, full) = match push {
            WorkOrderPush::Upsert { v, work_orders } => (v, work_orders, Vec::new(), false),
            WorkOrderPush::Remove { v, ids, .. } => (v, Vec::new(), ids, false),
            WorkOrderPush::Full { v, work_orders, .. } => (v, work_orders, Vec::new(), true),
        };
        if v != WIRE_VERSION {
            return Err(DomainError::InvalidWorkOrder(format!(
                "protocol version {v} is not spoken here"
            )));
        }
        // Named in a full state, even if broken: never removed for being unreadable.
        let listed: HashSet<String> = docs.iter().map(|d| d.id.clone()).collect();
        // A broken work order is refused on its own; the rest of the message is kept.
        let docs: Vec<_> = docs
            .into_iter()
            .filter(|doc| match doc.validate() {
                Ok(()) => true,
                Err(e) => {
                    self.count_bad_downlink("work-orders", &e.to_string());
                    false
                }
            })
            .collect();
        let changes = self
            .change(move |c| {
                let mut changes = Vec::new();
                for doc in &docs {
                    if let Some(ch) = work_orders::upsert(c, doc)? {
                        changes.push((doc.id.clone(), ch));
                    }
                }
                let mut gone = remove;
                if full {
                    settings::want_full_state(c, false)?;
                    gone.extend(
                        work_orders::ids(c)?
                            .into_iter()
                            .filter(|id| !listed.contains(id)),
                    );
                }
                for id in gone {
                    match work_orders::remove(c, &id)? {
                        work_orders::Removal::Removed => {
                            changes.push((id, WorkOrderChange::Removed))
                        }
                        work_orders::Removal::Withdrawn => {
                            changes.push((id, WorkOrderChange::Withdrawn))
                        }
                        work_orders::Removal::Unchanged => {}
                    }
                }
                Ok(changes)
            })
            .await?;
        for (work_order_id, change) in &changes {
            tracing::info!(work_order_id = %work_order_id, change = ?change, "work order from the dispatcher");
            self.emit(Event::WorkOrder {
                work_order_id: work_order_id.clone(),
                change: *change,
            });
        }
        self.update_sync(|s| s.last_download_ms = Some(now_ms()));
        if changes
            .iter()
            .any(|(_, ch)| *ch == WorkOrderChange::Removed)
        {
            // Its photos went with it.
            self.remove_gone_photos().await;
        }
        if !changes.is_empty() {
            // A changed or removed work order may have let go of attachments.
            if let Err(e) = self.sweep_attachments().await {
                tracing::warn!(error = %e, "cannot sweep attachment files");
            }
        }
        // A full state too: it usually lands after the sync its connection started has
        // finished, and the attachments of the work orders it brings are fetched in a
        // sync.
        if !changes.is_empty() {
            self.inner.triggers.fire(crate::schedule::Trigger::Push);
        }
        Ok(())
    }

    pub async fn next_upload(
        &self,
        except: Vec<String>,
    ) -> Result<Option<photos::Upload>, DomainError> {
        self.fold().await?;
        self.inner
            .store
            .read(move |c| photos::next_upload(c, &except))
            .await
    }

    /// What is wrong with this device's own copy of a photo, if it is damaged or gone
    /// for good: sending such a file again cannot help. A file that could not be read
    /// just now is not damaged (it is logged, and tried again later).
    pub async fn photo_damage_here(&self, sha256: &str) -> Option<String> {
        let store = self.inner.store.clone();
        let sha = sha256.to_owned();
        let check = tokio::task::spawn_blocking(move || store.photos().verify(&sha)).await;
        match check {
            Ok(Err(crate::store::photos::Check::Damaged(why))) => Some(why),
            Ok(Err(crate::store::photos::Check::Unreadable(why))) => {
                tracing::warn!(sha256, problem = %why, "cannot check a photo's file");
                None
            }
            Ok(Ok(())) | Err(_) => None,
        }
    }

    /// Refuses, on the device, every operation that carries photo `sha256`, with `code`
    /// and `reason`: its item turns red, and the inspector attaches the photo again or
    /// discards it. Returns how many were refused.
    pub async fn refuse_photo_on_device(
        &self,
        sha256: &str,
        code: &str,
        reason: String,
    ) -> Result<usize, DomainError> {
        let sha = sha256.to_owned();
        let ops = self
            .inner
            .store
            .read(move |c| photos::unrefused_ops(c, &sha))
            .await?;
        for op in &ops {
            self.refuse_on_device(op.clone(), code, reason.clone())
                .await?;
        }
        Ok(ops.len())
    }

    /// Reads part of a stored photo for upload.
    pub async fn read_photo(
        &self,
        sha256: String,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let path = self.inner.store.photos().path_of(&sha256);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(path)?;
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                let n = file.read_at(&mut buf[got..], offset + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            Ok(buf)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The back office's progress on a photo. Needs no fsync: lost, the upload resumes a
    /// little earlier; a start over does (see below). Returns false when the device is
    /// not uploading that photo.
    pub async fn photo_progress(&self, ack: PhotoAck) -> Result<bool, DomainError> {
        let PhotoAck {
            sha256,
            received,
            complete,
            error,
            ..
        } = ack;
        let bad = error.clone();
        let known = if error.is_some() {
            // Durable: the back office has thrown its bytes away. Lost to a power cut,
            // the restart would leave this device resuming past bytes the back office
            // no longer holds, and its answers (received 0) would never move it on.
            self.inner
                .store
                .write(move |c| photos::restart(c, &sha256))
                .await?
        } else {
            self.inner
                .store
                .write_lazy(move |c| photos::record_progress(c, &sha256, received, complete))
                .await?
        };
        if let Some(why) = bad {
            tracing::warn!(reason = %why, "the back office found a photo damaged; it is sent again from the start");
        }
        if complete && known {
            self.update_sync(|s| s.last_upload_ms = Some(now_ms()));
            // The photo's own operation can go now.
            self.inner.more_to_send.notify_one();
        }
        Ok(known)
    }

    /// Whether the cache is empty, so the full state should be asked for.
    pub async fn needs_full_state(&self) -> bool {
        self.inner
            .store
            .read(|c| {
                Ok::<_, DomainError>(
                    work_orders::ids(c)?.is_empty() || settings::full_state_wanted(c)?,
                )
            })
            .await
            .unwrap_or(false)
    }

    /// Whether a resync asked for the full state since the last call: a connected
    /// session asks at once (a new one asks anyway, through [`Service::needs_full_state`]).
    pub fn take_resync_now(&self) -> bool {
        self.inner.resync_now.swap(false, Ordering::AcqRel)
    }

    /// Support's full resync. The wish for the full state is stored first, so that it
    /// survives a restart until the state comes; nothing is dropped before then, so an
    /// inspector whose back office never answers keeps the cache. Downloaded
    /// attachments are read again and checked against their SHA-256: one that fails is
    /// removed, and the next sync fetches it again. Returns (checked, refetched).
    pub async fn resync(&self) -> Result<(u32, u32), DomainError> {
        self.inner
            .store
            .write(|c| settings::want_full_state(c, true))
            .await?;
        let named = self.inner.store.read(work_orders::attachments).await?;
        let files = self.store().attachments().clone();
        let (checked, refetched) = tokio::task::spawn_blocking(move || {
            let mut seen = HashSet::new();
            let (mut checked, mut refetched) = (0u32, 0u32);
            for (work_order_id, a) in named {
                if !seen.insert(a.sha256.clone()) || !files.is_complete(&a.sha256) {
                    continue;
                }
                checked += 1;
                match files.verify(&a.sha256) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(work_order_id = %work_order_id, attachment_id = %a.id, sha256 = %a.sha256, "a downloaded attachment no longer matches its SHA-256; it is fetched again");
                        files.remove(&a.sha256);
                        refetched += 1;
                    }
                    Err(e) => {
                        tracing::warn!(work_order_id = %work_order_id, attachment_id = %a.id, sha256 = %a.sha256, error = %e, "a downloaded attachment cannot be read; it is fetched again");
                        files.remove(&a.sha256);
                        refetched += 1;
                    }
                }
            }
            (checked, refetched)
        })
        .await
        .map_err(|e| DomainError::Internal(format!("the attachment check failed: {e}")))?;
        tracing::info!(
            attachments_checked = checked,
            attachments_refetched = refetched,
            "full resync asked for"
        );
        self.inner.resync_now.store(true, Ordering::Release);
        self.inner.triggers.fire(crate::schedule::Trigger::SyncNow);
        Ok((checked, refetched))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkSource;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attachment_whole_but_unchecked_or_empty_is_checked_not_asked_for() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(dir.path()).unwrap();
        let settings = crate::config::load(None).unwrap();
        let service = Service::new(store.clone(), settings, None);
        let drawing = b"a drawing".to_vec();
        let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
        let push: WorkOrderPush = serde_json::from_value(serde_json::json!({
            "v": 1, "type": "upsert", "work_orders": [{
                "id": "WO-A", "version": 1, "title": "t", "stage": "new", "workflow": ["new"],
                "attachments": [
                    {"id": "d", "name": "d.pdf", "size": drawing.len(), "sha256": sha(&drawing)},
                    {"id": "e", "name": "empty.txt", "size": 0, "sha256": sha(b"")},
                ]
            }]
        }))
        .unwrap();
        service.apply_push(push).await.unwrap();
        // Every byte came, and the daemon was killed before it checked them.
        let files = store.attachments();
        files.append(&sha(&drawing), 0, &drawing).unwrap();
        assert!(service.next_download(Vec::new()).await.unwrap().is_none());
        assert!(files.is_complete(&sha(&drawing)));
        assert!(files.is_complete(&sha(b"")));
        store.close();
    }

    #[tokio::test]
    async fn the_app_hears_of_a_link_only_when_its_class_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(dir.path()).unwrap();
        let settings = crate::config::load(None).unwrap();
        let service = Service::new(store, settings, None);
        let mut events = service.subscribe();

        // What the watcher says when it has nothing to watch: still "unknown".
        service.set_link(LinkState::unknown("link watching is off"));
        assert!(events.try_recv().is_err());
        assert_eq!(service.sync_status().link.detail, "link watching is off");

        let wifi = |detail: &str| LinkState {
            class: LinkClass::Wifi,
            source: LinkSource::NetworkManager,
            connection: Some("/c/1".into()),
            detail: detail.into(),
        };
        service.set_link(wifi("Wi-Fi"));
        assert!(matches!(
            events.try_recv(),
            Ok(Event::Link { ref link, .. }) if link == "wifi"
        ));
        service.set_link(wifi("Wi-Fi, another access point"));
        assert!(events.try_recv().is_err());
    }

    /// A refusal may bring the back office's version of the refused operation's work
    /// order; one that names another work order is not stored.
    #[tokio::test]
    async fn a_refusal_carrying_another_work_order_changes_no_work_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service) = crate::service::tests::with_work_order_w(dir.path()).await;
        let doc = |id: &str, version: i64, title: &str| {
            serde_json::json!({"id": id, "version": version, "title": title,
                               "stage": "new", "workflow": ["new", "done"]})
        };
        let capture = ui_bridge::Request::AddRecord {
            work_order_id: "W".into(),
            record: ui_bridge::RecordBody::Note { text: "n".into() },
        };
        service.handle(capture, None).await.unwrap();
        service.fold().await.unwrap();
        let ops = store
            .read_blocking(|c| outbox::next_batch(c, 10, 1 << 20))
            .unwrap();
        let refusal = |wo: serde_json::Value| Acks {
            v: 1,
            acks: Vec::new(),
            refused: vec![Refusal {
                id: ops[0].op_id.clone(),
                code: "conflict".into(),
                reason: "changed in the office".into(),
                work_order: Some(wo),
            }],
            unreadable: Vec::new(),
        };
        service
            .apply_acks(refusal(doc("OTHER", 5, "not asked for")))
            .await
            .unwrap();
        let known: Vec<String> = store
            .read_blocking(|c| {
                let mut s = c.prepare("SELECT id FROM work_orders ORDER BY id")?;
                let ids = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok::<_, DomainError>(ids)
            })
            .unwrap();
        assert_eq!(known, ["W"], "no work order made from another's refusal");
        assert_eq!(service.sync_status().bad_downlink, 1);

        // Its own work order's version is taken.
        service
            .apply_acks(refusal(doc("W", 2, "second")))
            .await
            .unwrap();
        let title: String = store
            .read_blocking(|c| {
                c.query_row("SELECT title FROM work_orders WHERE id = 'W'", [], |r| {
                    r.get(0)
                })
                .map_err(DomainError::from)
            })
            .unwrap();
        assert_eq!(title, "second");
    }

    /// Work order W with a note waiting, then removed by the dispatcher: withdrawn.
    /// Returns the note and the id of its operation; `events` subscribed before.
    async fn withdrawn_w(
        dir: &std::path::Path,
    ) -> (
        crate::store::Store,
        Service,
        tokio::sync::broadcast::Receiver<Event>,
        ui_bridge::Item,
        String,
    ) {
        let (store, service) = crate::service::tests::with_work_order_w(dir).await;
        let events = service.subscribe();
        let capture = ui_bridge::Request::AddRecord {
            work_order_id: "W".into(),
            record: ui_bridge::RecordBody::Note { text: "n".into() },
        };
        let item = match service.handle(capture, None).await.unwrap() {
            ui_bridge::Response::Item(i) => i,
            other => panic!("{other:?}"),
        };
        service.fold().await.unwrap();
        service
            .apply_push(WorkOrderPush::Remove {
                v: WIRE_VERSION,
                ids: vec!["W".into()],
                reason: Some("reassigned".into()),
            })
            .await
            .unwrap();
        let op = store
            .read_blocking(|c| outbox::next_batch(c, 10, 1 << 20))
            .unwrap()[0]
            .op_id
            .clone();
        (store, service, events, item, op)
    }

    fn answer(acks: Vec<String>, refused: Vec<Refusal>) -> Acks {
        Acks {
            v: 1,
            acks,
            refused,
            unreadable: Vec::new(),
        }
    }

    /// Whether a `work_order` event with `change` is among those received so far.
    fn heard(
        events: &mut tokio::sync::broadcast::Receiver<Event>,
        change: WorkOrderChange,
    ) -> bool {
        let mut seen = false;
        while let Ok(e) = events.try_recv() {
            seen |= matches!(e, Event::WorkOrder { change: c, .. } if c == change);
        }
        seen
    }

    /// Removed by the dispatcher while a change of it waits, a work order stays,
    /// withdrawn, and goes when that change is acknowledged.
    #[tokio::test]
    async fn a_withdrawn_work_order_goes_with_its_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service, mut events, _, op) = withdrawn_w(dir.path()).await;
        assert!(store.read_blocking(work_orders::list).unwrap()[0].withdrawn);
        assert!(heard(&mut events, WorkOrderChange::Withdrawn));
        service
            .apply_acks(answer(vec![op], Vec::new()))
            .await
            .unwrap();
        assert!(store.read_blocking(work_orders::list).unwrap().is_empty());
        assert!(heard(&mut events, WorkOrderChange::Removed));
    }

    /// The dispatcher sends a withdrawn work order again (assigned back): it stays once
    /// its changes are delivered.
    #[tokio::test]
    async fn a_withdrawn_work_order_sent_again_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service, _, _, op) = withdrawn_w(dir.path()).await;
        // The same version as the device has (the row made by `with_work_order_w`).
        let again: WorkOrderDoc = serde_json::from_value(serde_json::json!({
            "id": "W", "version": 1, "title": "t", "stage": "new", "workflow": ["new"]
        }))
        .unwrap();
        service
            .apply_push(WorkOrderPush::Upsert {
                v: WIRE_VERSION,
                work_orders: vec![again],
            })
            .await
            .unwrap();
        service
            .apply_acks(answer(vec![op], Vec::new()))
            .await
            .unwrap();
        let list = store.read_blocking(work_orders::list).unwrap();
        assert_eq!(list.len(), 1);
        assert!(!list[0].withdrawn);
    }

    /// The back office refuses the last change of a withdrawn work order and sends its
    /// version with the refusal: still withdrawn, it goes when the change is discarded.
    #[tokio::test]
    async fn a_refusal_does_not_assign_a_withdrawn_work_order_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service, _, item, op) = withdrawn_w(dir.path()).await;
        let refusal = Refusal {
            id: op,
            code: "conflict".into(),
            reason: "cancelled".into(),
            work_order: Some(serde_json::json!({"id": "W", "version": 2, "title": "t",
                "stage": "new", "workflow": ["new"]})),
        };
        service
            .apply_acks(answer(Vec::new(), vec![refusal]))
            .await
            .unwrap();
        let list = store.read_blocking(work_orders::list).unwrap();
        assert!(list[0].withdrawn, "{list:?}");
        service
            .handle(ui_bridge::Request::Discard { item_id: item.id }, None)
            .await
            .unwrap();
        assert!(store.read_blocking(work_orders::list).unwrap().is_empty());
    }
}
