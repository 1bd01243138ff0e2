//! The application layer between the UI socket and the store: each protocol request
//! becomes one store transaction, and what changed goes out as events to subscribers.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;

use tokio::sync::broadcast;
use ui_bridge::{Event, Item, Request, Response, Status, WorkOrderChange, PROTOCOL_VERSION};

mod expiry;
mod sync;

pub use sync::{ChunkOutcome, Download, SyncStatus, CANNOT_SERVE, HELD};

use crate::config::Settings;
use crate::domain::work_orders::{self, WorkOrderDoc};
use crate::domain::{items, journal, outbox, settings, DomainError};
use crate::schedule::{Switches, Trigger, Triggers};
use crate::store::Store;

/// How many events a slow subscriber may fall behind before it is told to re-read.
const EVENT_BACKLOG: usize = 1024;
/// Journal rows at which a capture folds the journal at once. Below it the fold waits
/// for a pause: a burst of captures then commits one small row each, and one larger
/// fold (which shares index pages between more records) follows. Small enough that a
/// fold stays short on the handheld (about 15 ms on the build machine).
const FOLD_AT_MOST: u64 = 1024;
/// How long captures must pause before the journal is folded in the background. Any
/// read or other change folds it first anyway.
const FOLD_WHEN_QUIET: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a free-space reading is trusted for a small capture.
const SPACE_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    events: broadcast::Sender<Event>,
    /// Swapped whole by a reload (SIGHUP); read through [`Service::settings`].
    settings: std::sync::RwLock<Arc<Settings>>,
    /// The settings the daemon started with: what a restart-only key is compared to,
    /// so that a second reload still says a first one's change waits for a restart.
    started: Arc<Settings>,
    damaged_store: Option<String>,
    /// Set by captures, cleared by folds: whether the journal may hold rows.
    journal_dirty: AtomicBool,
    /// Held across a fold, so that a reader who finds the flag cleared by a fold still
    /// under way waits for its commit instead of reading without its rows.
    folding: tokio::sync::Mutex<()>,
    /// The background fold after a pause: captures note when they came, and wake it
    /// once per burst.
    quiet_fold: QuietFold,
    /// What the uplink reports: broker state, last upload and download, last error.
    sync: std::sync::Mutex<SyncStatus>,
    /// Requests for a sync, for the uplink's scheduler.
    triggers: Triggers,
    /// A resync asked for the full state since the uplink last looked: a session
    /// already connected asks the back office at once.
    resync_now: AtomicBool,
    /// When this process started, for the diagnostics report.
    started_ms: i64,
    /// Wakes the uplink within a sync already running: a window slot or a photo's
    /// operation was freed.
    more_to_send: tokio::sync::Notify,
    /// The inspector's sync switches.
    switches: std::sync::Mutex<Switches>,
    /// The last free-space reading and when it was taken.
    free_space: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Held by an attach from its copy of the file to its commit, and by a delete from
    /// its commit to the removal of the files it left unnamed: equal photos share one
    /// file, and a delete must not remove the file an attach of the same bytes has
    /// just found in place and not yet named.
    photo_files: tokio::sync::Mutex<()>,
    /// Taken for the read-change-save of the sync switches: two apps each setting one
    /// switch at once must not save over each other's.
    switches_change: tokio::sync::Mutex<()>,
    /// Why attachments do not download, by SHA-256, as the uplink found: for the app.
    attachment_problems: std::sync::Mutex<HashMap<String, String>>,
    /// Photo files this process failed to remove: left to the next start.
    unremovable_photos: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// When the last capture came, for the fold that waits for a pause.
struct QuietFold {
    start: std::time::Instant,
    last_capture_us: AtomicU64,
    /// A wait for a pause is under way.
    armed: AtomicBool,
}

impl Default for QuietFold {
    fn default() -> QuietFold {
        QuietFold {
            start: std::time::Instant::now(),
            last_capture_us: AtomicU64::new(0),
            armed: AtomicBool::new(false),
        }
    }
}

impl QuietFold {
    fn since_start_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

impl Service {
    pub fn new(store: Store, settings: Settings, damaged_store: Option<String>) -> Service {
        let uplink_configured = settings.uplink.is_some();
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Service {
            inner: Arc::new(Inner {
                store,
                events,
                damaged_store,
                journal_dirty: AtomicBool::new(true),
                folding: tokio::sync::Mutex::new(()),
                quiet_fold: QuietFold::default(),
                free_space: std::sync::Mutex::new(None),
                photo_files: tokio::sync::Mutex::new(()),
                switches_change: tokio::sync::Mutex::new(()),
                attachment_problems: std::sync::Mutex::new(HashMap::new()),
                unremovable_photos: std::sync::Mutex::new(Default::default()),
                sync: std::sync::Mutex::new(SyncStatus {
                    broker: if uplink_configured {
                        "connecting"
                    } else {
                        "not_configured"
                    },
                    ..SyncStatus::default()
                }),
                triggers: Triggers::default(),
                resync_now: AtomicBool::new(false),
                started_ms: crate::store::now_ms(),
                more_to_send: tokio::sync::Notify::new(),
                switches: std::sync::Mutex::new(settings.sync.switches.clone()),
                started: Arc::new(settings.clone()),
                settings: std::sync::RwLock::new(Arc::new(settings)),
            }),
        }
    }

    /// A change: the journal is folded first in the same transaction, so the change
    /// sees (and orders after) every capture before it.
    async fn change<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DomainError> + Send + 'static,
    ) -> Result<T, DomainError> {
        self.inner
            .store
            .write(move |c| {
                journal::fold(c)?;
                f(c)
            })
            .await
    }

    /// A read of the folded tables.
    async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DomainError> + Send + 'static,
    ) -> Result<T, DomainError> {
        self.fold().await?;
        self.inner.store.read(f).await
    }

    /// Folds the journal if captures may be waiting in it. Needs no fsync of its own: the
    /// captures are already durable in the journal.
    pub async fn fold(&self) -> Result<(), DomainError> {
        let _folding = self.inner.folding.lock().await;
        if self.inner.journal_dirty.swap(false, Ordering::AcqRel) {
            let result = self.inner.store.write_lazy(journal::fold).await;
            if result.is_err() {
                self.inner.journal_dirty.store(true, Ordering::Release);
            }
            result?;
        }
        Ok(())
    }

    async fn fold_logged(&self) {
        if let Err(e) = self.fold().await {
            tracing::warn!(error = %e, "folding the capture journal failed; retried later");
        }
    }

    /// Notes a capture for the background fold, and starts the fold's wait unless it is
    /// already waiting: one wake-up per burst, not one per capture.
    fn fold_after_pause(&self) {
        let quiet = &self.inner.quiet_fold;
        quiet
            .last_capture_us
            .store(quiet.since_start_us(), Ordering::Release);
        if quiet.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        // The task holds the service weakly, so a dropped service is not kept alive.
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let q = &inner.quiet_fold;
                // A capture may note its time between the two readings: saturate.
                let last = q.last_capture_us.load(Ordering::Acquire);
                let since = q.since_start_us().saturating_sub(last);
                let quiet_for = FOLD_WHEN_QUIET.as_micros() as u64;
                if since < quiet_for {
                    drop(inner);
                    tokio::time::sleep(std::time::Duration::from_micros(quiet_for - since)).await;
                    continue;
                }
                // Disarm before folding: a capture that comes during the fold starts a
                // new wait, so none is left unfolded.
                q.armed.store(false, Ordering::Release);
                Service { inner }.fold_logged().await;
                return;
            }
        });
    }

    /// A downloaded attachment and a read-only descriptor of its file.
    pub async fn open_attachment(
        &self,
        work_order_id: &str,
        attachment_id: &str,
    ) -> Result<(ui_bridge::Attachment, OwnedFd), DomainError> {
        let wo = work_order_id.to_owned();
        let doc = self
            .inner
            .store
            .read(move |c| work_orders::doc(c, &wo))
            .await?;
        let Some(mut a) = doc.attachments.into_iter().find(|a| a.id == attachment_id) else {
            return Err(DomainError::AttachmentUnavailable(format!(
                "work order {work_order_id} has no attachment {attachment_id:?}"
            )));
        };
        let path = self.inner.store.attachments().path_of(&a.sha256);
        let file = std::fs::File::open(&path).map_err(|_| {
            DomainError::AttachmentUnavailable(format!(
                "attachment {attachment_id:?} of {work_order_id} is not downloaded yet"
            ))
        })?;
        a.downloaded = true;
        a.problem = None;
        Ok((a, file.into()))
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        match self.inner.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Takes what can change without a restart from `new` (SIGHUP): the store's limits,
    /// the sync switches' defaults (the app's own choices still win) and the timer.
    /// Returns the keys that changed but need a restart.
    pub async fn reload(&self, new: Settings) -> Vec<&'static str> {
        let old = self.inner.started.clone();
        let mut need_restart = Vec::new();
        let checks: [(&'static str, bool); 7] = [
            ("store.state_dir", old.state_dir != new.state_dir),
            (
                "ui",
                (
                    &old.socket_path,
                    old.socket_mode,
                    &old.socket_group,
                    old.max_frame_bytes,
                    old.max_connections,
                    &old.allowed_uids,
                    &old.allowed_gids,
                ) != (
                    &new.socket_path,
                    new.socket_mode,
                    &new.socket_group,
                    new.max_frame_bytes,
                    new.max_connections,
                    &new.allowed_uids,
                    &new.allowed_gids,
                ),
            ),
            ("uplink", old.uplink != new.uplink),
            (
                "sync.network_manager",
                old.sync.watch_network_manager != new.sync.watch_network_manager,
            ),
            ("log.format", old.log_format != new.log_format),
            (
                "dev.seed_work_orders",
                old.seed_work_orders != new.seed_work_orders,
            ),
            ("work_orders", old.expiry != new.expiry),
        ];
        for (key, changed) in checks {
            if changed {
                need_restart.push(key);
            }
        }
        match self.inner.settings.write() {
            Ok(mut s) => *s = Arc::new(new),
            Err(p) => *p.into_inner() = Arc::new(new),
        }
        if let Err(e) = self.load_switches().await {
            tracing::warn!(error = %e, "cannot read the sync switches the app set");
        }
        self.set_switches(self.switches());
        // The uplink weighs the switches again.
        self.inner.triggers.fire(Trigger::Capture);
        need_restart
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: nobody is looking.
        let _ = self.inner.events.send(event);
    }

    fn attachment_problems(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.inner
            .attachment_problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Says why an attachment of `work_order_id` does not download (`None`: it does, or
    /// it is in); the app hears of a change through a `work_order` event and re-reads.
    pub fn set_attachment_problem(
        &self,
        work_order_id: Option<&str>,
        sha256: &str,
        problem: Option<String>,
    ) {
        let changed = {
            let mut problems = self.attachment_problems();
            match problem {
                Some(p) => problems.insert(sha256.to_owned(), p.clone()) != Some(p),
                None => problems.remove(sha256).is_some(),
            }
        };
        if let (true, Some(work_order_id)) = (changed, work_order_id) {
            self.emit(Event::WorkOrder {
                work_order_id: work_order_id.to_owned(),
                change: WorkOrderChange::Changed,
            });
        }
    }

    fn attachment_problem(&self, sha256: &str) -> Option<String> {
        self.attachment_problems().get(sha256).cloned()
    }

    /// Drops what is known about attachments no work order names any more.
    fn forget_attachment_problems_but(&self, named: &std::collections::HashSet<String>) {
        self.attachment_problems()
            .retain(|sha, _| named.contains(sha));
    }

    /// Withdrawn work orders that went with the change just made: announced, and their
    /// attachments let go.
    async fn after_removed(&self, removed: Vec<String>) {
        if removed.is_empty() {
            return;
        }
        for work_order_id in removed {
            tracing::info!(work_order_id = %work_order_id, "withdrawn work order removed: nothing of it waits any more");
            self.emit(Event::WorkOrder {
                work_order_id,
                change: WorkOrderChange::Removed,
            });
        }
        if let Err(e) = self.sweep_attachments().await {
            tracing::warn!(error = %e, "cannot sweep attachment files");
        }
    }

    fn emit_item(&self, item: &Item, gone: bool) {
        self.emit(Event::ItemState {
            item_id: item.id.clone(),
            work_order_id: item.work_order_id.clone(),
            kind: item.kind,
            state: if gone { None } else { Some(item.state) },
            reason: item.reason.clone(),
        });
    }

    /// Removes the files of photos no row names any more, which the store notes in
    /// `photos_gone` whatever removed the last row (schema migration 6). The notes are
    /// taken in a durable commit first: a note may come from a lazy commit (an
    /// acknowledgement), which a power cut could still undo, bringing the row back
    /// without its file. A crash after the commit and before the files go leaves them to
    /// the sweep of the next start, which follows every unclean stop.
    pub async fn remove_gone_photos(&self) {
        let files = self.inner.photo_files.lock().await;
        self.remove_gone_photos_held(&files).await;
    }

    async fn remove_gone_photos_held(&self, _files: &tokio::sync::MutexGuard<'_, ()>) {
        let store = &self.inner.store;
        let noted = store
            .read(|c| {
                c.prepare_cached("SELECT sha256 FROM photos_gone")?
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
                    .map_err(crate::store::StoreError::from)
            })
            .await;
        let noted = match noted {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read which photo files have no row left");
                return;
            }
        };
        // A file this process could not remove waits for the next start: tried at every
        // acknowledgement, it would cost a sync each time.
        let fresh: Vec<String> = {
            let unremovable = self.unremovable_photos();
            noted
                .into_iter()
                .filter(|sha| !unremovable.contains(sha))
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let gone = store
            .write(move |c| {
                c.prepare_cached(
                    "DELETE FROM photos_gone WHERE sha256 IN rarray(?1) RETURNING sha256",
                )?
                .query_map([&crate::domain::outbox::id_array(fresh.iter())], |r| {
                    r.get::<_, String>(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(crate::store::StoreError::from)
            })
            .await;
        let gone = match gone {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the list of photo files to remove");
                return;
            }
        };
        let kept: Vec<String> = gone
            .iter()
            .filter(|sha| !store.photos().remove(sha))
            .cloned()
            .collect();
        tracing::info!(
            count = gone.len() - kept.len(),
            "photo files no row names removed"
        );
        if kept.is_empty() {
            return;
        }
        // Noted again for the next start; a clean stop would not sweep them.
        self.unremovable_photos().extend(kept.iter().cloned());
        let noted = store
            .write_lazy(move |c| {
                for sha in &kept {
                    c.execute("INSERT OR IGNORE INTO photos_gone VALUES (?1)", [sha])?;
                }
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
        if let Err(e) = noted {
            tracing::warn!(error = %e, "cannot note photo files left to remove");
        }
    }

    fn unremovable_photos(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.inner
            .unremovable_photos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one request. `fd` is the descriptor that came with the frame, if any.
    pub async fn handle(
        &self,
        request: Request,
        fd: Option<OwnedFd>,
    ) -> Result<Response, DomainError> {
        let store = &self.inner.store;
        match request {
            Request::Status {} => Ok(Response::Status(self.status().await?)),
            Request::ListWorkOrders {} => {
                let mut work_orders = self.query(work_orders::list).await?;
                work_orders.iter_mut().for_each(|w| self.set_expiry(w));
                Ok(Response::WorkOrders { work_orders })
            }
            Request::GetWorkOrder { work_order_id } => {
                // Through the fold, like every read: a capture just answered is listed.
                let mut wo = self
                    .query(move |c| work_orders::get(c, &work_order_id))
                    .await?;
                self.set_expiry(&mut wo.summary);
                let problems = self.attachment_problems();
                for a in &mut wo.attachments {
                    a.downloaded = store.attachments().is_complete(&a.sha256);
                    // The device's word only, whatever the back office's document holds.
                    a.problem = problems.get(&a.sha256).cloned().filter(|_| !a.downloaded);
                }
                drop(problems);
                Ok(Response::WorkOrder(wo))
            }
            Request::AddRecord {
                work_order_id,
                record,
            } => {
                self.check_space(0)?;
                let (item, unsent, staged) = store
                    .write(move |c| {
                        let item = items::add_record(c, &work_order_id, &record)?;
                        let staged = journal::staged(c)?;
                        Ok::<_, DomainError>((item, outbox::unsent_count(c)? + staged, staged))
                    })
                    .await?;
                self.inner.journal_dirty.store(true, Ordering::Release);
                tracing::info!(item_id = %item.id, work_order_id = %item.work_order_id, kind = item.kind.as_str(), "record captured");
                self.after_change(&item, unsent);
                // Left unfolded, the journal costs nothing but a longer fold later; the
                // next read or change folds it, and so do a pause and a full journal.
                if staged >= FOLD_AT_MOST {
                    let this = self.clone();
                    tokio::spawn(async move { this.fold_logged().await });
                } else {
                    self.fold_after_pause();
                }
                Ok(Response::Item(item))
            }
            Request::EditRecord { item_id, record } => {
                let (item, unsent) = self
                    .change(move |c| {
                        let item = items::edit_record(c, &item_id, &record)?;
                        Ok((item, journal::unsent(c)?))
                    })
                    .await?;
                tracing::info!(item_id = %item.id, "record edited");
                self.after_change(&item, unsent);
                Ok(Response::Item(item))
            }
            Request::DeleteItem { item_id } => {
                let _files = self.inner.photo_files.lock().await;
                let (deleted, unsent) = self
                    .change(move |c| {
                        let d = items::delete_item(c, &item_id)?;
                        // Its last waiting change may have been this one.
                        let removed = work_orders::remove_settled(c)?;
                        Ok(((d, removed), journal::unsent(c)?))
                    })
                    .await?;
                let (deleted, removed) = deleted;
                // The rows are gone for good now; their files may follow.
                self.remove_gone_photos_held(&_files).await;
                tracing::info!(item_id = %deleted.item.id, sent_nothing = deleted.sent_nothing, "item deleted");
                for item in std::iter::once(&deleted.item).chain(&deleted.also_removed) {
                    self.emit_item(item, true);
                }
                self.after_removed(removed).await;
                self.emit(Event::Unsent { count: unsent });
                self.inner.triggers.fire(Trigger::Capture);
                Ok(Response::Deleted {
                    item_id: deleted.item.id,
                    sent_nothing: deleted.sent_nothing,
                })
            }
            Request::AttachPhoto {
                record_id,
                mime,
                caption,
            } => {
                let fd = fd.ok_or(DomainError::MissingDescriptor)?;
                self.attach_photo(record_id, fd, mime, caption).await
            }
            Request::AdvanceStage { work_order_id, to } => {
                self.check_space(0)?;
                let (item, unsent, visit_done) = self
                    .change(move |c| {
                        let item = work_orders::advance(c, &work_order_id, &to)?;
                        let ended = work_orders::get(c, &work_order_id)?
                            .summary
                            .next_stage
                            .is_none();
                        Ok((item, journal::unsent(c)?, ended || to == "completed"))
                    })
                    .await?;
                tracing::info!(item_id = %item.id, work_order_id = %item.work_order_id, visit_done, "stage advanced");
                if visit_done {
                    self.inner.triggers.fire(Trigger::VisitCompleted);
                }
                self.emit(Event::WorkOrder {
                    work_order_id: item.work_order_id.clone(),
                    change: WorkOrderChange::Changed,
                });
                self.after_change(&item, unsent);
                Ok(Response::Item(item))
            }
            Request::Export {
                since_ms,
                until_ms,
                after,
                limit,
            } => {
                let (items, next) = self
                    .query(move |c| {
                        items::export_page(c, since_ms, until_ms, after.as_ref(), limit)
                    })
                    .await?;
                Ok(Response::Exported { items, next })
            }
            Request::Outbox { limit } => {
                let operations = self.query(move |c| outbox::list(c, limit)).await?;
                Ok(Response::Outbox { operations })
            }
            // The bridge answers `subscribe` itself; it owns the connection.
            Request::Subscribe {} => Ok(Response::Subscribed),
            Request::Retry { item_id } => {
                let ((item, hidden), unsent) = self
                    .change(move |c| {
                        let item = items::retry(c, &item_id)?;
                        let hidden = items::is_hidden(c, &item.id)?;
                        Ok(((item, hidden), journal::unsent(c)?))
                    })
                    .await?;
                tracing::info!(item_id = %item.id, "refused change sent again");
                // A deletion sent again: the item is gone from the app's lists.
                self.emit_item(&item, hidden);
                self.emit(Event::Unsent { count: unsent });
                self.inner.triggers.fire(Trigger::Capture);
                Ok(Response::Item(item))
            }
            Request::Discard { item_id } => {
                let id = item_id.clone();
                let (d, unsent) = self
                    .change(move |c| {
                        let d = items::discard(c, &id)?;
                        let removed = work_orders::remove_settled(c)?;
                        Ok(((d, removed), journal::unsent(c)?))
                    })
                    .await?;
                let (d, removed) = d;
                tracing::info!(item_id = %item_id, "refused change discarded");
                match &d.item {
                    Some(item) => self.emit_item(item, false),
                    None => self.emit(Event::ItemState {
                        item_id: item_id.clone(),
                        work_order_id: d.work_order_id.clone(),
                        kind: d.kind,
                        state: None,
                        reason: None,
                    }),
                }
                for photo in &d.also_removed {
                    self.emit_item(photo, true);
                }
                self.remove_gone_photos().await;
                if d.stage_reverted {
                    self.emit(Event::WorkOrder {
                        work_order_id: d.work_order_id.clone(),
                        change: WorkOrderChange::Changed,
                    });
                }
                self.after_removed(removed).await;
                self.emit(Event::Unsent { count: unsent });
                // Later changes of the work order were waiting behind this one.
                self.inner.triggers.fire(Trigger::Capture);
                Ok(Response::Discarded {
                    item_id,
                    item: d.item,
                })
            }
            Request::Diagnostics {} => {
                Ok(Response::Diagnostics(Box::new(self.diagnostics().await?)))
            }
            Request::Resync {} => {
                let (checked, refetched) = self.resync().await?;
                Ok(Response::ResyncStarted {
                    attachments_checked: checked,
                    attachments_refetched: refetched,
                })
            }
            Request::SyncNow {} => {
                self.inner.triggers.fire(Trigger::SyncNow);
                Ok(Response::SyncStarted)
            }
            // The socket server answers it: the answer carries a descriptor.
            Request::OpenAttachment {
                work_order_id,
                attachment_id,
            } => self
                .open_attachment(&work_order_id, &attachment_id)
                .await
                .map(|(a, _)| Response::Attachment(a)),
            Request::SetSyncSwitches {
                auto_sync,
                sync_on_visit_completed,
                files_on_wifi_only,
            } => {
                let _one_at_a_time = self.inner.switches_change.lock().await;
                let mut s = self.switches();
                s.auto_sync = auto_sync.unwrap_or(s.auto_sync);
                s.on_visit_completed = sync_on_visit_completed.unwrap_or(s.on_visit_completed);
                s.files_on_wifi_only = files_on_wifi_only.unwrap_or(s.files_on_wifi_only);
                let saved = s.clone();
                self.change(move |c| settings::save_switches(c, &saved))
                    .await?;
                tracing::info!(
                    auto_sync = s.auto_sync,
                    on_visit_completed = s.on_visit_completed,
                    files_on_wifi_only = s.files_on_wifi_only,
                    "sync switches set"
                );
                self.set_switches(s);
                // The uplink weighs the switches again: one switched on may start a
                // sync, "Wi-Fi only for files" may stop a photo.
                self.inner.triggers.fire(Trigger::Capture);
                Ok(Response::Status(self.status().await?))
            }
        }
    }

    async fn attach_photo(
        &self,
        record_id: String,
        fd: OwnedFd,
        mime: Option<String>,
        caption: Option<String>,
    ) -> Result<Response, DomainError> {
        let store = self.inner.store.clone();
        let limit = self.settings().max_photo_bytes;
        // Refuse before copying when the file alone would eat the reserve.
        let size = nix::sys::stat::fstat(&fd)
            .map(|s| s.st_size.max(0) as u64)
            .unwrap_or(0);
        let _files = self.inner.photo_files.lock().await;
        // Measured once the attaches before this one have written their files, or each
        // of several at once would pass against the same free space.
        self.check_space(size)?;
        let copy_store = store.clone();
        let photo = tokio::task::spawn_blocking(move || copy_store.photos().ingest(fd, limit))
            .await
            .map_err(|e| DomainError::Internal(format!("the photo copy did not finish: {e}")))??;
        let sha = photo.sha256.clone();
        let result = self
            .change(move |c| {
                let item = items::attach_photo(
                    c,
                    &record_id,
                    &photo,
                    mime.as_deref(),
                    caption.as_deref(),
                )?;
                Ok((item, journal::unsent(c)?))
            })
            .await;
        match result {
            Ok((item, unsent)) => {
                tracing::info!(item_id = %item.id, sha256 = %sha, "photo attached");
                self.after_change(&item, unsent);
                Ok(Response::Item(item))
            }
            // The store failed (an I/O error at COMMIT may have left the row in the
            // log, to come back at the next start): the file stays, and the sweep at the
            // next start removes it if no row names it then.
            Err(e @ DomainError::Store(_)) => Err(e),
            Err(e) => {
                // Refused by the job itself, so nothing was stored: the file is on disk
                // but no row names it; drop it unless another item uses the same bytes.
                let named = store
                    .read(move |c| {
                        c.query_row(
                            "SELECT EXISTS(SELECT 1 FROM items WHERE photo_sha256 = ?1)",
                            [&sha],
                            |r| r.get::<_, bool>(0),
                        )
                        .map_err(DomainError::from)
                        .map(|named| (named, sha))
                    })
                    .await;
                if let Ok((false, sha)) = named {
                    store.photos().remove(&sha);
                }
                Err(e)
            }
        }
    }

    fn after_change(&self, item: &Item, unsent: u64) {
        self.emit_item(item, false);
        self.emit(Event::Unsent { count: unsent });
        self.inner.triggers.fire(Trigger::Capture);
    }

    /// Refuses new captures while free space is under the reserve (promise 2): what is
    /// stored keeps its room to sync, and the inspector gets a clear error.
    fn check_space(&self, extra: u64) -> Result<(), DomainError> {
        let needed = self.settings().min_free_bytes;
        if needed == 0 && extra == 0 {
            // No reserve: nothing to measure, and a statfs per capture is not free.
            return Ok(());
        }
        let free = self.free_space(extra > 0);
        if free < needed.saturating_add(extra) {
            return Err(DomainError::StorageLow { free, needed });
        }
        Ok(())
    }

    /// Free bytes under the store, measured at most every [`SPACE_RECHECK`] for small
    /// captures: a burst of them cannot eat a reserve of megabytes in that time, and a
    /// statfs per capture showed up in profiles.
    fn free_space(&self, fresh: bool) -> u64 {
        let mut cached = match self.inner.free_space.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        match *cached {
            Some((at, free)) if !fresh && at.elapsed() < SPACE_RECHECK => free,
            _ => {
                let free = free_bytes(self.inner.store.state_dir());
                *cached = Some((std::time::Instant::now(), free));
                free
            }
        }
    }

    pub async fn status(&self) -> Result<Status, DomainError> {
        let (unsent, resync_pending) = self
            .inner
            .store
            .read(|c| Ok::<_, DomainError>((journal::unsent(c)?, settings::full_state_wanted(c)?)))
            .await?;
        let free = free_bytes(self.inner.store.state_dir());
        let sync = self.sync_status();
        let switches = self.switches();
        Ok(Status {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            unsent,
            link: sync.link.class.as_str().into(),
            link_detail: sync.link.detail,
            link_source: sync.link.source.as_str().into(),
            broker: sync.broker.into(),
            last_upload_ms: sync.last_upload_ms,
            last_download_ms: sync.last_download_ms,
            last_error: sync.last_error,
            last_sync_ms: sync.last_sync_ms,
            sync_note: sync.note,
            auto_sync: switches.auto_sync,
            sync_on_visit_completed: switches.on_visit_completed,
            files_on_wifi_only: switches.files_on_wifi_only,
            // An unknown figure is "plenty" inside; an app reading JSON numbers as
            // doubles or signed 64-bit integers must still read it exactly.
            storage_free_bytes: free.min((1 << 53) - 1),
            storage_low: free < self.settings().min_free_bytes,
            damaged_store: self.inner.damaged_store.clone(),
            resync_pending,
        })
    }

    /// Fills in when the work order expires, under the administrator's expiry.
    fn set_expiry(&self, w: &mut ui_bridge::WorkOrderSummary) {
        // A withdrawn one goes when its changes are delivered, whatever its age.
        w.expires_ms = self
            .inner
            .started
            .expiry
            .filter(|_| !w.withdrawn)
            .map(|e| w.received_ms.saturating_add(e.after.as_millis() as i64));
    }

    /// The report `fieldctl diagnostics` saves for support.
    pub async fn diagnostics(&self) -> Result<ui_bridge::Diagnostics, DomainError> {
        let status = self.status().await?;
        let (schema_version, work_orders, (items, refused)) = self
            .query(|c| {
                let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                let work_orders: i64 =
                    c.query_row("SELECT count(*) FROM work_orders", [], |r| r.get(0))?;
                Ok((version, work_orders as u64, items::census(c, 100)?))
            })
            .await?;
        let settings = self.settings();
        let db = self.inner.store.state_dir().join(crate::store::DB_FILE);
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let uplink = settings.uplink.as_ref();
        Ok(ui_bridge::Diagnostics {
            status,
            started_ms: self.inner.started_ms,
            device_id: uplink.map(|u| u.device_id.clone()),
            broker_address: uplink.map(|u| format!("{}:{}", u.host, u.port)),
            state_dir: self.inner.store.state_dir().display().to_string(),
            schema_version,
            database_bytes: size(&db),
            log_bytes: size(&db.with_extension("db-wal")),
            work_orders,
            items,
            refused,
            bad_downlink_messages: self.sync_status().bad_downlink,
            recent_problems: crate::logging::recent_problems(),
        })
    }

    /// Loads work orders from a JSON file (an array, as the dispatcher sends them) into
    /// the cache: the self-contained demo and tests use it in place of a back office.
    pub async fn seed_work_orders(&self, path: &Path) -> Result<usize, SeedError> {
        let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
            path: path.to_owned(),
            source,
        })?;
        let docs: Vec<WorkOrderDoc> =
            serde_json::from_str(&text).map_err(|e| SeedError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        for doc in &docs {
            doc.validate().map_err(|e| SeedError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
        let changes = self
            .change(move |c| {
                let mut changes = Vec::new();
                for doc in &docs {
                    if let Some(change) = work_orders::upsert(c, doc)? {
                        changes.push((doc.id.clone(), change));
                    }
                }
                Ok(changes)
            })
            .await
            .map_err(SeedError::Store)?;
        for (work_order_id, change) in &changes {
            self.emit(Event::WorkOrder {
                work_order_id: work_order_id.clone(),
                change: *change,
            });
        }
        Ok(changes.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read work orders from {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("work orders in {path}: {message}")]
    Parse {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot store the work orders: {0}")]
    Store(DomainError),
}

/// Bytes an unprivileged writer may still use where the store lives.
pub fn free_bytes(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        // The field types are narrower on some 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64),
        // Unknown is treated as plenty: the write itself will report a full disk.
        Err(_) => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_that_needs_a_restart_is_said_at_every_reload_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service) = with_work_order_w(dir.path()).await;
        let mut new = crate::config::load(None).unwrap();
        new.log_format = crate::config::LogFormat::Journald;
        assert_eq!(service.reload(new.clone()).await, ["log.format"]);
        // Reloaded again unchanged: still not what runs.
        assert_eq!(service.reload(new).await, ["log.format"]);
        store.close();
    }

    /// A store in `dir` holding work order `W` (version 1), and a service over it.
    pub(super) async fn with_work_order_w(dir: &Path) -> (Store, Service) {
        let (store, _) = Store::open(dir).unwrap();
        let service = Service::new(store.clone(), crate::config::load(None).unwrap(), None);
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
                     VALUES ('W', 1, 't', 'new', '[\"new\"]', '{}', 0)",
                    [],
                )
                .map_err(DomainError::from)
            })
            .await
            .unwrap();
        (store, service)
    }

    /// Two apps each setting a different sync switch at once both get theirs: neither
    /// saves the switches as they were before the other's change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switches_set_at_once_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, service) = with_work_order_w(dir.path()).await;
        let set = |auto_sync: Option<bool>, files_on_wifi_only: Option<bool>| {
            ui_bridge::Request::SetSyncSwitches {
                auto_sync,
                sync_on_visit_completed: None,
                files_on_wifi_only,
            }
        };
        for round in 0..20 {
            let on = round % 2 == 0;
            let (a, b) = (service.clone(), service.clone());
            let (x, y) = tokio::join!(
                tokio::spawn(async move { a.handle(set(Some(on), None), None).await }),
                tokio::spawn(async move { b.handle(set(None, Some(on)), None).await }),
            );
            x.unwrap().unwrap();
            y.unwrap().unwrap();
            let s = service.switches();
            assert_eq!(
                (s.auto_sync, s.files_on_wifi_only),
                (on, on),
                "round {round}"
            );
        }
    }

    /// A reader who comes while another caller's fold waits for the writer must wait
    /// for that fold too; reading at once would miss the captures it moves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_waits_for_a_fold_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service) = with_work_order_w(dir.path()).await;
        service.fold().await.unwrap();
        let capture = Request::AddRecord {
            work_order_id: "W".into(),
            record: ui_bridge::RecordBody::Note { text: "n".into() },
        };
        service.handle(capture, None).await.unwrap();

        // Someone else holds the writer, so the next fold waits in its queue.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let busy = store.clone();
        let writer = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(busy.write(move |_| {
                    let _ = released.recv();
                    Ok::<_, DomainError>(())
                }))
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let first = tokio::spawn({
            let service = service.clone();
            async move { service.fold().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let listing = tokio::spawn({
            let service = service.clone();
            async move { service.handle(Request::Outbox { limit: None }, None).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        release.send(()).unwrap();
        writer.join().unwrap().unwrap();
        first.await.unwrap().unwrap();
        match listing.await.unwrap().unwrap() {
            Response::Outbox { operations } => assert_eq!(operations.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    /// A burst of captures commits journal rows only; the fold follows once captures
    /// pause, with no read to ask for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn captures_are_folded_after_a_pause_not_during_a_burst() {
        let dir = tempfile::tempdir().unwrap();
        let (store, service) = with_work_order_w(dir.path()).await;
        let staged = || store.read_blocking(journal::staged).unwrap();
        for i in 0..20 {
            let capture = Request::AddRecord {
                work_order_id: "W".into(),
                record: ui_bridge::RecordBody::Note {
                    text: format!("n{i}"),
                },
            };
            service.handle(capture, None).await.unwrap();
        }
        // (Not asserted to be all 20: a loaded machine may pause mid-burst.)
        assert!(
            staged() > 0,
            "the last capture of the burst is not folded yet"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while staged() > 0 {
            assert!(std::time::Instant::now() < deadline, "never folded");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let in_outbox: i64 = store
            .read_blocking(|c| {
                c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
                    .map_err(DomainError::from)
            })
            .unwrap();
        assert_eq!(in_outbox, 20);
    }
}
