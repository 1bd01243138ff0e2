//! Downloaded work orders that expire after the administrator's age
//! (`[work_orders]`): the app is told ahead (a `work_order` event, `expiring`), then the
//! work order leaves the cache. Only downloaded data expires: a work order with changes
//! still on the device stays until they are delivered or discarded.
//!
//! Nothing polls: the task sleeps until the next warning or expiry is due, and looks
//! again when a work order changes or an item's change leaves the device (a push, a
//! delivery, a delete). Only a wall clock that has not been set yet is looked at once
//! a minute.
//!
//! The age counts from when the work order came as the clock reads once it is right:
//! one that came before NTP or the modem set the clock is not older by the step
//! (`crate::clock`), and one stamped by a clock never set, in an earlier boot, counts
//! from the first look after the clock was set.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use ui_bridge::{Event, SyncState, WorkOrderChange};

use super::Service;
use crate::clock::{self, Stamp};
use crate::config::Expiry;
use crate::domain::{work_orders, DomainError};
use crate::store::now_ms;

/// How long a burst of changes (a drain's deliveries) is let settle before a look.
const SETTLE: Duration = Duration::from_millis(500);
/// After a failed look (the store busy or failing), the next one.
const RETRY: Duration = Duration::from_secs(60);
/// While the wall clock has not been set, the next look.
const CLOCK_UNSET: Duration = Duration::from_secs(60);
/// With nothing due, only a change wakes the task; this is a look for good measure.
const IDLE: Duration = Duration::from_secs(24 * 3600);

/// Whether `event` may bring a warning or an expiry closer: a work order that came,
/// changed or went, or an item whose change left the device (delivered, deleted,
/// discarded), which may free its work order. A capture only holds one back.
fn may_move_expiry(event: &Event) -> bool {
    match event {
        Event::WorkOrder { change, .. } => *change != WorkOrderChange::Expiring,
        Event::ItemState { state, .. } => matches!(state, None | Some(SyncState::Delivered)),
        _ => false,
    }
}

impl Service {
    /// Runs the expiry until `shutdown`; returns at once when none is configured.
    pub async fn expire_work_orders(self, shutdown: CancellationToken) {
        let Some(expiry) = self.inner.started.expiry else {
            return;
        };
        let mut events = self.subscribe();
        // Warned of, by id and the download the warning was about.
        let mut warned: HashSet<(String, i64)> = HashSet::new();
        loop {
            let wait = match self.expiry_round(expiry, &mut warned).await {
                Ok(Some(due_ms)) => Some(Duration::from_millis(
                    due_ms.saturating_sub(now_ms()).max(0) as u64,
                )),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for expired work orders; trying again later");
                    Some(RETRY)
                }
            };
            // Until the next one is due, or something changes that may move it.
            let sleep = tokio::time::sleep(wait.unwrap_or(IDLE));
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut sleep => break,
                    event = events.recv() => match event {
                        Ok(e) if !may_move_expiry(&e) => {}
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(SETTLE) => {}
                            }
                            events = events.resubscribe();
                            break;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Warns of and removes what is due; returns when the next warning or expiry is.
    async fn expiry_round(
        &self,
        expiry: Expiry,
        warned: &mut HashSet<(String, i64)>,
    ) -> Result<Option<i64>, DomainError> {
        let after = expiry.after.as_millis() as i64;
        let notice = expiry.warn_before.as_millis() as i64;
        // A clock that has not been set would age nothing right: wait for it.
        if !clock::is_set() {
            return Ok(Some(now_ms() + CLOCK_UNSET.as_millis() as i64));
        }
        let now = now_ms();
        // Not through the fold: `received` reads the capture journal too, and a look
        // must not fold a burst of captures the fold is waiting out.
        let cached = self.inner.store.read(work_orders::received).await?;
        let mut next: Option<i64> = None;
        let mut due = |at: i64| next = Some(next.map_or(at, |n| n.min(at)));
        let mut expired = Vec::new();
        // Arrivals to write down as the clock now reads them: after it was set in this
        // boot, or, stamped by a clock not yet set in another, as arriving now.
        let mut restamped = Vec::new();
        for work_orders::Received { id, at, pending } in cached {
            let received_ms = match at.wall_now() {
                Some(ms) if ms == at.wall_ms => ms,
                Some(ms) => {
                    tracing::info!(work_order_id = %id, was_ms = at.wall_ms, now_ms = ms, "the clock was set since the work order came: its age counts from when it came");
                    let fixed = Stamp {
                        wall_ms: ms,
                        ..at.clone()
                    };
                    restamped.push((id.clone(), at.wall_ms, fixed));
                    ms
                }
                None => {
                    tracing::info!(work_order_id = %id, was_ms = at.wall_ms, "the work order came while the clock was not set: its age counts from now");
                    let fixed = Stamp::now();
                    let ms = fixed.wall_ms;
                    restamped.push((id.clone(), at.wall_ms, fixed));
                    ms
                }
            };
            let expires = received_ms.saturating_add(after);
            if now >= expires {
                // What the inspector captured is never dropped: it waits for delivery,
                // which wakes this task again.
                if !pending {
                    expired.push(id);
                }
                continue;
            }
            let warn_at = expires - notice;
            if now >= warn_at {
                if warned.insert((id.clone(), received_ms)) {
                    tracing::info!(work_order_id = %id, expires_ms = expires, "work order expires soon");
                    self.emit(Event::WorkOrder {
                        work_order_id: id,
                        change: WorkOrderChange::Expiring,
                    });
                }
                due(expires);
            } else {
                due(warn_at);
            }
        }
        if !restamped.is_empty() {
            self.inner
                .store
                .write(move |c| {
                    for (id, was_ms, at) in &restamped {
                        work_orders::restamp(c, id, *was_ms, at)?;
                    }
                    Ok::<_, DomainError>(())
                })
                .await?;
        }
        if !expired.is_empty() {
            let removed = self
                .change(move |c| {
                    let mut removed = Vec::new();
                    for id in expired {
                        // Looked at again inside the write: a capture may have come.
                        if work_orders::remove_unless_pending(c, &id)? {
                            removed.push(id);
                        }
                    }
                    Ok(removed)
                })
                .await?;
            for id in &removed {
                tracing::info!(work_order_id = %id, "work order expired and left the cache");
                self.emit(Event::WorkOrder {
                    work_order_id: id.clone(),
                    change: WorkOrderChange::Removed,
                });
            }
            warned.retain(|(id, _)| !removed.contains(id));
            if !removed.is_empty() {
                // Its delivered photos and attachments went with it.
                self.remove_gone_photos().await;
                if let Err(e) = self.sweep_attachments().await {
                    tracing::warn!(error = %e, "cannot sweep attachment files");
                }
            }
        }
        Ok(next)
    }
}
