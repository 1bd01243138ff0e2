//! fieldsyncd: keeps an inspection handheld useful with no signal.
//!
//! - [`config`]: settings from TOML and drop-ins, validated once.
//! - [`clock`]: stamps of the wall clock that survive its being set.
//! - [`store`]: SQLite (WAL, full sync, group commit) and photo files.
//! - [`domain`]: work orders, records, photos, stages, and the outbox.
//! - [`service`]: protocol requests turned into store transactions and events.
//! - [`bridge`]: the UI socket the touchscreen app speaks to.
//! - [`link`]: the link class from NetworkManager and ModemManager, and the policy of
//!   what may go on it.
//! - [`schedule`]: when to sync (triggers and the inspector's switches).
//! - [`uplink`]: the MQTT session to the back office.
//! - [`systemd`], [`logging`]: the service's glue to its host.

pub mod bridge;
pub mod clock;
pub mod config;
pub mod domain;
pub mod link;
pub mod logging;
pub mod schedule;
pub mod service;
pub mod store;
pub mod systemd;
pub mod uplink;

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::service::Service;
use crate::store::Store;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store")]
    Store(#[from] store::StoreError),
    #[error("cannot serve the UI socket")]
    Bridge(#[from] bridge::BridgeError),
    #[error("cannot load the seed work orders")]
    Seed(#[from] service::SeedError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("the database failed its integrity check; the next start sets it aside")]
    DamagedStore,
    #[error("cannot keep the device id in {path}")]
    DeviceId {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// Problems an operator fixes in the configuration, as opposed to the machine.
    pub fn is_config(&self) -> bool {
        // A seed file that cannot be read or parsed is the operator's to fix; a store
        // that fails while loading it is not, and systemd should restart the daemon.
        matches!(
            self,
            RunError::Seed(service::SeedError::Read { .. } | service::SeedError::Parse { .. })
        )
    }
}

/// What SIGHUP needs to apply a changed configuration.
pub struct Reload {
    /// The file to read again (its `config.d/` with it); `None`: the built-in defaults.
    pub config: Option<std::path::PathBuf>,
    pub log_level: logging::LogLevel,
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads what can change without a
/// restart.
pub async fn run(settings: Settings, reload: Reload) -> Result<(), RunError> {
    let started = std::time::Instant::now();
    let settings = Arc::new(settings);
    // Opening may check the whole database and migrate it: seconds on a large store and
    // slow flash. systemd is told to wait, rather than the start timeout ending it.
    let (store, report) = {
        let _extend = systemd::ExtendWhile::start();
        Store::open(&settings.state_dir)?
    };
    let check_deferred = report.check_deferred;
    // Kept before the first connection: the back office knows the device by it.
    if let Some(id) = &settings.new_device_id {
        let path = settings.state_dir.join(config::DEVICE_ID_FILE);
        store::write_durably(&path, format!("{id}\n").as_bytes()).map_err(|source| {
            RunError::DeviceId {
                path: path.clone(),
                source,
            }
        })?;
        tracing::info!(device_id = %id, path = %path.display(), "no uplink.device_id configured: this device's id was made and kept");
    }
    let service = Service::new(
        store.clone(),
        (*settings).clone(),
        report.damaged_moved_to.map(|p| p.display().to_string()),
    );
    if let Err(e) = service.load_switches().await {
        tracing::warn!(error = %e, "cannot read the sync switches the app set; the config's apply");
    }
    if let Some(seed) = &settings.seed_work_orders {
        let changed = service.seed_work_orders(seed).await?;
        tracing::info!(path = %seed.display(), changed, "seed work orders loaded");
    }
    // Notes a crash left between a row's removal and its photo file's.
    service.remove_gone_photos().await;
    if let Err(e) = service.sweep_attachments().await {
        tracing::warn!(error = %e, "cannot sweep attachment files");
    }
    let (listener, origin) = bridge::listen(&settings)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    spawn_reload_handler(service.clone(), reload, shutdown.clone())?;

    let status = service.status().await.map(|s| s.unsent).unwrap_or(0);
    let where_ = match &origin {
        bridge::Origin::Systemd => "socket from systemd".to_owned(),
        bridge::Origin::Bound(p) => p.display().to_string(),
    };
    tracing::info!(
        state_dir = %settings.state_dir.display(),
        socket = %where_,
        unsent = status,
        startup_ms = started.elapsed().as_millis() as u64,
        "fieldsyncd ready"
    );
    systemd::ready(&format!("offline; {status} changes waiting"));
    let watchdog = tokio::spawn(systemd::watchdog(store.clone(), shutdown.clone()));
    tokio::spawn(service.clone().expire_work_orders(shutdown.clone()));
    let link = link::spawn(settings.sync.watch_network_manager, shutdown.clone());
    let uplink = match settings.uplink.clone() {
        Some(u) => {
            tokio::spawn(uplink::Uplink::new(service.clone(), u, link).run(shutdown.clone()))
        }
        // No broker: the app's banner still shows the link.
        None => tokio::spawn(service.clone().follow_link(link, shutdown.clone())),
    };

    // After a clean stop the whole-database check runs now, beside the work, instead of
    // delaying ready; a failure stops the daemon so that the next start, which checks
    // first, sets the file aside (promise: a damaged store is reported, never used).
    let damaged = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if check_deferred {
        let (store, shutdown, damaged) = (store.clone(), shutdown.clone(), damaged.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || store.check()).await {
                Ok(Ok(())) => tracing::info!(
                    check_ms = started.elapsed().as_millis() as u64,
                    "database checked after a clean start: ok"
                ),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the database failed its check; stopping so that the next start sets it aside");
                    damaged.store(true, std::sync::atomic::Ordering::Release);
                    shutdown.cancel();
                }
                Err(e) => tracing::warn!(error = %e, "the database check did not run"),
            }
        });
    }

    bridge::serve(listener, service, settings.clone(), shutdown.clone()).await;

    systemd::stopping();
    tracing::info!("stopping: UI connections closed, closing the store");
    let _ = watchdog.await;
    let _ = uplink.await;
    // The writer finishes the jobs already queued, then checkpoints.
    tokio::task::spawn_blocking(move || store.close())
        .await
        .ok();
    if let bridge::Origin::Bound(path) = origin {
        let _ = std::fs::remove_file(path);
    }
    if damaged.load(std::sync::atomic::Ordering::Acquire) {
        return Err(RunError::DamagedStore);
    }
    Ok(())
}

/// SIGHUP (`systemctl reload`): reads the configuration again and applies what can
/// change while running. A file that does not validate changes nothing: the daemon
/// goes on with what it has and says why.
fn spawn_reload_handler(
    service: Service,
    reload: Reload,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            systemd::reloading();
            match config::load(reload.config.as_deref()) {
                Ok(new) => {
                    reload.log_level.set(&new.log_level);
                    let need_restart = service.reload(new).await;
                    if need_restart.is_empty() {
                        tracing::info!("configuration reloaded");
                    } else {
                        tracing::warn!(
                            keys = %need_restart.join(", "),
                            "configuration reloaded; these changes take effect at the next restart"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration not reloaded: the running settings stay");
                }
            }
            systemd::ready("configuration reloaded");
        }
    });
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}
