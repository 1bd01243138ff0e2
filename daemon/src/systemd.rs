//! systemd glue: readiness, status lines and the watchdog. Every call is a no-op when the
//! daemon was not started by systemd (`NOTIFY_SOCKET` unset).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `Type=notify` units that reload say so, and say `READY=1` again when done.
pub fn reloading() {
    notify(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// While it lives, asks systemd every 10 s for 30 s more to get ready
/// (`EXTEND_TIMEOUT_USEC`), so that long start-up work is not killed by the unit's start
/// timeout; a wedged start still is, 30 s after it stopped asking.
pub struct ExtendWhile {
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl ExtendWhile {
    pub fn start() -> ExtendWhile {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return ExtendWhile { stop: None };
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("extend-start".into())
            .spawn(move || loop {
                notify(&[NotifyState::ExtendTimeoutUsec(30_000_000)]);
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            });
        match spawned {
            Ok(_) => ExtendWhile { stop: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the start-timeout extender");
                ExtendWhile { stop: None }
            }
        }
    }
}

impl Drop for ExtendWhile {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Pings the watchdog at half its period, but only while the store's writer answers a
/// trivial transaction: a wedged writer or event loop stops the pings and systemd
/// restarts the daemon.
pub async fn watchdog(store: Store, shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return;
    }
    // A period systemd would never set (WATCHDOG_USEC=1) must not spin the store.
    let timeout = Duration::from_micros(usec);
    if timeout < Duration::from_secs(1) {
        tracing::warn!(
            watchdog_usec = usec,
            "WATCHDOG_USEC is under a second; fed every quarter second"
        );
    }
    let timeout = timeout.max(Duration::from_secs(1));
    // Fed on a steady beat of a quarter of the timeout, each probe given an eighth of it:
    // a slow answer cannot push a feed past the timeout itself, and one probe that waits
    // behind a long fsync (cheap flash during a burst of photos) leaves two more beats
    // before systemd would act. At half the timeout, a single missed probe put the next
    // feed right at the deadline.
    let mut beat = tokio::time::interval(timeout / 4);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let period = timeout / 8;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beat.tick() => {}
        }
        let probe = store.write(|c| {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map_err(crate::store::StoreError::from)
        });
        match tokio::time::timeout(period, probe).await {
            Ok(Ok(_)) if store.is_alive() => notify(&[NotifyState::Watchdog]),
            Ok(Err(e)) => tracing::error!(error = %e, "store check failed; watchdog not fed"),
            _ => tracing::error!("store writer did not answer; watchdog not fed"),
        }
    }
}
