//! Settings: one TOML file plus `config.d/*.toml` drop-ins beside it, merged in sorted
//! order, validated once at start into [`Settings`]. Every default is written here and in
//! `daemon/config/fieldsyncd.toml`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Exit code for a configuration the daemon refuses (sysexits' EX_CONFIG); the service
/// unit lists it in `RestartPreventExitStatus=` so a bad file is not restarted in a loop.
pub const EXIT_BAD_CONFIG: i32 = 78;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}: `{key}` {problem}", where_set(.file))]
    Invalid {
        key: String,
        problem: String,
        /// The file that set the key last, when one did.
        file: Option<PathBuf>,
    },
}

fn where_set(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!("config file {}", f.display()),
        None => "config".into(),
    }
}

/// The validated settings the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub socket_path: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub allowed_uids: BTreeSet<u32>,
    pub allowed_gids: BTreeSet<u32>,
    pub max_photo_bytes: u64,
    pub min_free_bytes: u64,
    pub log_level: String,
    pub log_format: LogFormat,
    pub seed_work_orders: Option<PathBuf>,
    /// `None`: no broker configured; the daemon stays offline and keeps everything.
    pub uplink: Option<UplinkSettings>,
    /// A device id made at this start, for a configuration that names none: the daemon
    /// keeps it in [`DEVICE_ID_FILE`] before it first connects, so that it never changes.
    pub new_device_id: Option<String>,
    pub sync: SyncSettings,
    /// When downloaded work orders leave the cache; `None`: never.
    pub expiry: Option<Expiry>,
}

/// The administrator's expiry of downloaded work orders (`[work_orders]`). Only the
/// cache expires: what the inspector captured stays until it is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// The age, from the download of the version the device has.
    pub after: std::time::Duration,
    /// How long before that the app is told (a `work_order` event, `expiring`).
    pub warn_before: std::time::Duration,
}

/// The file in the state folder that holds the device id when the configuration names
/// none.
pub const DEVICE_ID_FILE: &str = "device-id";

/// When to sync and what the link may carry.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSettings {
    /// The inspector's switches as they are at start.
    pub switches: crate::schedule::Switches,
    /// Follow NetworkManager and ModemManager on the system bus; off, the broker is
    /// simply tried and the link class is "unknown".
    pub watch_network_manager: bool,
}

/// How to reach the back office.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSettings {
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsFiles>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The MQTT client id and the device's segment in every topic.
    pub device_id: String,
    pub topic_prefix: String,
    pub keep_alive: std::time::Duration,
    pub batch_max_ops: usize,
    pub batch_max_bytes: usize,
    /// Batches sent and not yet acknowledged by the back office.
    pub window: usize,
    pub ack_timeout: std::time::Duration,
    pub reconnect_min: std::time::Duration,
    pub reconnect_max: std::time::Duration,
    pub max_downlink_bytes: usize,
    /// The largest message the broker takes from the device. Batches are cut to fit; a
    /// single change larger than this is refused on the device.
    pub max_message_bytes: usize,
    pub compression_level: i32,
    pub photo_chunk_bytes: usize,
    /// Photo chunks sent and not yet confirmed.
    pub photo_window: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// Client certificate and key, for brokers that require them (production).
    pub client: Option<(PathBuf, PathBuf)>,
    /// ALPN protocol names offered in the handshake (AWS IoT Core takes MQTT with a
    /// client certificate on port 443 only under `x-amzn-mqtt-ca`).
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// journald when `JOURNAL_STREAM` says stderr goes to the journal, text otherwise.
    Auto,
    Journald,
    Text,
}

/// The file format. Every section and key is optional; unknown keys are errors so a typo
/// does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    ui: UiSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    dev: DevSection,
    #[serde(default)]
    uplink: UplinkSection,
    #[serde(default)]
    sync: SyncSection,
    #[serde(default)]
    work_orders: WorkOrdersSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkOrdersSection {
    expire_after_secs: Option<u64>,
    warn_before_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncSection {
    auto_sync: Option<bool>,
    sync_on_visit_completed: Option<bool>,
    files_on_wifi_only: Option<bool>,
    interval_secs: Option<u64>,
    network_manager: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkSection {
    broker: Option<String>,
    device_id: Option<String>,
    topic_prefix: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    alpn: Option<Vec<String>>,
    keep_alive_secs: Option<u64>,
    batch_max_ops: Option<usize>,
    batch_max_bytes: Option<usize>,
    window: Option<usize>,
    ack_timeout_secs: Option<u64>,
    reconnect_min_ms: Option<u64>,
    reconnect_max_secs: Option<u64>,
    max_downlink_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    compression_level: Option<i32>,
    photo_chunk_bytes: Option<usize>,
    photo_window: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    state_dir: Option<PathBuf>,
    max_photo_bytes: Option<u64>,
    min_free_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UiSection {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    max_frame_bytes: Option<usize>,
    max_connections: Option<usize>,
    allowed_uids: Option<Vec<u32>>,
    allowed_gids: Option<Vec<u32>>,
    allowed_groups: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevSection {
    seed_work_orders: Option<PathBuf>,
}

/// Reads `path` (when given) and the `config.d/*.toml` beside it, later files overriding
/// earlier ones key by key, then validates. Without a path the built-in defaults apply:
/// state in `$STATE_DIRECTORY` or `./fieldsync-state`, no root needed.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    let mut merged = toml::Table::new();
    // Which file set each key last, so that a value found wrong names its drop-in.
    let mut sources = std::collections::HashMap::new();
    let mut files = Vec::new();
    if let Some(path) = path {
        files.push(path.to_owned());
        let dropins = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("config.d");
        // No drop-in folder is fine; one that cannot be read is not: the settings it
        // holds (a broker, credentials) would be missing without a word.
        match std::fs::read_dir(&dropins) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    path: dropins,
                    source,
                })
            }
            Ok(entries) => {
                let mut extra = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|source| ConfigError::Read {
                        path: dropins.clone(),
                        source,
                    })?;
                    let p = entry.path();
                    if p.extension().is_some_and(|x| x == "toml") {
                        extra.push(p);
                    }
                }
                extra.sort();
                files.extend(extra);
            }
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: file.clone(),
            message: e.message().to_owned() + &span_hint(&text, e.span()),
        })?;
        // Check each file on its own so the error names the file, line and key that
        // are wrong.
        toml::from_str::<File>(&text).map_err(|e| ConfigError::Parse {
            path: file.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        note_sources(&table, "", file, &mut sources);
        merge(&mut merged, table);
    }
    let file = File::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Parse {
        path: files.last().cloned().unwrap_or_default(),
        message: e.message().to_owned(),
    })?;
    let base_dir = path
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new("."));
    validate(file, base_dir).map_err(|e| match e {
        ConfigError::Invalid { key, problem, .. } => ConfigError::Invalid {
            file: sources.get(&key).cloned(),
            key,
            problem,
        },
        other => other,
    })
}

fn note_sources(
    table: &toml::Table,
    prefix: &str,
    file: &Path,
    into: &mut std::collections::HashMap<String, PathBuf>,
) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => note_sources(t, &key, file, into),
            _ => {
                into.insert(key, file.to_owned());
            }
        }
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
        file: None,
    }
}

fn validate(file: File, base_dir: &Path) -> Result<Settings, ConfigError> {
    // Relative paths in a file are relative to that file's folder, so a config can be
    // moved with its data.
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base_dir.join(p) };
    let state_dir = match file.store.state_dir {
        Some(p) => resolve(p),
        None => std::env::var_os("STATE_DIRECTORY")
            .map(|s| PathBuf::from(s.to_string_lossy().split(':').next().unwrap_or("")))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("fieldsync-state")),
    };
    let socket_path = match file.ui.socket {
        Some(p) => resolve(p),
        None => std::env::var_os("RUNTIME_DIRECTORY")
            .map(|s| PathBuf::from(s.to_string_lossy().split(':').next().unwrap_or("")))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| state_dir.clone())
            .join("ui.sock"),
    };
    // sun_path holds 108 bytes including the terminating NUL.
    if socket_path.as_os_str().len() > 107 {
        return Err(invalid(
            "ui.socket",
            format!(
                "is {} bytes long; a Unix socket path may have at most 107",
                socket_path.as_os_str().len()
            ),
        ));
    }
    let socket_mode = match file.ui.socket_mode.as_deref() {
        None => 0o660,
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "ui.socket_mode",
                    format!("must be an octal mode like \"0660\", not {s:?}"),
                )
            })?,
    };
    let max_frame_bytes = file
        .ui
        .max_frame_bytes
        .unwrap_or(ui_bridge::DEFAULT_MAX_FRAME_BYTES);
    if !(1024..=16 * 1024 * 1024).contains(&max_frame_bytes) {
        return Err(invalid(
            "ui.max_frame_bytes",
            "must be between 1024 and 16777216",
        ));
    }
    let max_connections = file.ui.max_connections.unwrap_or(16);
    if max_connections == 0 {
        return Err(invalid("ui.max_connections", "must be at least 1"));
    }
    // The daemon's own user (field support's fieldctl) and root are always allowed.
    let mut allowed_uids: BTreeSet<u32> = file
        .ui
        .allowed_uids
        .unwrap_or_default()
        .into_iter()
        .collect();
    allowed_uids.insert(0);
    allowed_uids.insert(nix::unistd::getuid().as_raw());
    let mut allowed_gids: BTreeSet<u32> = file
        .ui
        .allowed_gids
        .unwrap_or_default()
        .into_iter()
        .collect();
    for name in file.ui.allowed_groups.unwrap_or_default() {
        let group = nix::unistd::Group::from_name(&name)
            .ok()
            .flatten()
            .ok_or_else(|| invalid("ui.allowed_groups", format!("names no group {name:?}")))?;
        allowed_gids.insert(group.gid.as_raw());
    }
    if let Some(name) = &file.ui.socket_group {
        if nix::unistd::Group::from_name(name).ok().flatten().is_none() {
            return Err(invalid(
                "ui.socket_group",
                format!("names no group {name:?}"),
            ));
        }
    }
    let max_photo_bytes = file.store.max_photo_bytes.unwrap_or(25 * 1024 * 1024);
    if max_photo_bytes == 0 {
        return Err(invalid("store.max_photo_bytes", "must be above 0"));
    }
    let log_level = file.log.level.unwrap_or_else(|| "info".into());
    if !is_log_filter(&log_level) || tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(invalid(
            "log.level",
            format!(
                "{log_level:?} is not a level or filter (try \"info\" or \"fieldsyncd=debug\")"
            ),
        ));
    }
    let (uplink, new_device_id) = match uplink(file.uplink, &resolve, &state_dir)? {
        Some((u, new)) => {
            let made = new.then(|| u.device_id.clone());
            (Some(u), made)
        }
        None => (None, None),
    };
    Ok(Settings {
        state_dir,
        socket_path,
        socket_mode,
        socket_group: file.ui.socket_group,
        max_frame_bytes,
        max_connections,
        allowed_uids,
        allowed_gids,
        max_photo_bytes,
        min_free_bytes: file.store.min_free_bytes.unwrap_or(64 * 1024 * 1024),
        log_level,
        log_format: file.log.format.unwrap_or(LogFormat::Auto),
        seed_work_orders: file.dev.seed_work_orders.clone().map(resolve),
        uplink,
        new_device_id,
        sync: sync(file.sync)?,
        expiry: expiry(&file.work_orders)?,
    })
}

fn expiry(w: &WorkOrdersSection) -> Result<Option<Expiry>, ConfigError> {
    let after = match w.expire_after_secs {
        None | Some(0) => {
            if w.warn_before_secs.is_some() {
                return Err(invalid(
                    "work_orders.warn_before_secs",
                    "has no effect without work_orders.expire_after_secs",
                ));
            }
            return Ok(None);
        }
        Some(n) if n > 100 * 365 * 86_400 => {
            return Err(invalid(
                "work_orders.expire_after_secs",
                format!("{n} is more than a hundred years; leave it out (or 0) for never"),
            ))
        }
        Some(n) => n,
    };
    // A day's notice by default, but never from the moment a work order arrives.
    let warn = w.warn_before_secs.unwrap_or((after / 2).min(86_400));
    if warn >= after {
        return Err(invalid(
            "work_orders.warn_before_secs",
            format!("{warn} is not less than work_orders.expire_after_secs ({after}): every work order would be expiring from the moment it arrives"),
        ));
    }
    Ok(Some(Expiry {
        after: std::time::Duration::from_secs(after),
        warn_before: std::time::Duration::from_secs(warn),
    }))
}

fn sync(s: SyncSection) -> Result<SyncSettings, ConfigError> {
    let defaults = crate::schedule::Switches::default();
    let interval = match s.interval_secs {
        None => defaults.interval,
        Some(0) => None,
        Some(n) if n < 10 => {
            return Err(invalid(
                "sync.interval_secs",
                format!("{n} is too often for a device on a cellular link; use at least 10, or 0 to turn the timer off"),
            ))
        }
        Some(n) => Some(std::time::Duration::from_secs(n)),
    };
    Ok(SyncSettings {
        switches: crate::schedule::Switches {
            auto_sync: s.auto_sync.unwrap_or(defaults.auto_sync),
            on_visit_completed: s
                .sync_on_visit_completed
                .unwrap_or(defaults.on_visit_completed),
            files_on_wifi_only: s.files_on_wifi_only.unwrap_or(defaults.files_on_wifi_only),
            interval,
        },
        watch_network_manager: s.network_manager.unwrap_or(true),
    })
}

/// The uplink's settings, and whether its device id was made now (none configured, none
/// kept yet).
fn uplink(
    u: UplinkSection,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    state_dir: &Path,
) -> Result<Option<(UplinkSettings, bool)>, ConfigError> {
    let Some(broker) = u.broker else {
        return Ok(None);
    };
    let (tls, rest) = if let Some(rest) = broker.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = broker.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(invalid(
            "uplink.broker",
            format!("{broker:?} must start with mqtt:// or mqtts://"),
        ));
    };
    let rest = rest.trim_end_matches('/');
    // host, host:port, [v6], [v6]:port
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
            let port = p.parse::<u16>().map_err(|_| {
                invalid(
                    "uplink.broker",
                    format!("port {p:?} is not a number from 1 to 65535"),
                )
            })?;
            (h, port)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(invalid(
            "uplink.broker",
            format!("{broker:?} names no host and port"),
        ));
    }
    if let Some(names) = &u.alpn {
        if !tls {
            return Err(invalid(
                "uplink.alpn",
                "is set but the broker is mqtt://; ALPN is part of TLS, use mqtts://",
            ));
        }
        if let Some(bad) = names.iter().find(|n| n.is_empty() || n.len() > 255) {
            return Err(invalid(
                "uplink.alpn",
                format!("{bad:?} is not a protocol name (1 to 255 bytes)"),
            ));
        }
    }
    if u.password_file.is_some() && u.username.is_none() {
        return Err(invalid(
            "uplink.password_file",
            "is set without uplink.username; MQTT sends a password only with a user name",
        ));
    }
    let alpn = u.alpn.unwrap_or_default();
    let tls = match (tls, u.ca_file, u.cert_file, u.key_file) {
        (false, None, None, None) => None,
        (false, ..) => {
            return Err(invalid(
                "uplink.ca_file",
                "TLS files are set but the broker is mqtt://; use mqtts:// for TLS",
            ))
        }
        (true, None, ..) => {
            return Err(invalid(
                "uplink.ca_file",
                "is required with an mqtts:// broker",
            ))
        }
        (true, Some(ca), cert, key) => {
            let client = match (cert, key) {
                (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "uplink.cert_file",
                        "cert_file and key_file go together",
                    ))
                }
            };
            Some(TlsFiles {
                ca: resolve(ca),
                client,
                alpn,
            })
        }
    };
    let kept = state_dir.join(DEVICE_ID_FILE);
    let (device_id, from_file, new) = match u.device_id {
        Some(id) => (id, false, false),
        None => match std::fs::read_to_string(&kept) {
            Ok(id) => (id.trim().to_owned(), true, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (new_device_id(), false, true),
            Err(e) => {
                return Err(invalid(
                    "uplink.device_id",
                    format!(
                        "is not set, and the one kept in {} cannot be read: {e}",
                        kept.display()
                    ),
                ))
            }
        },
    };
    if !is_device_id(&device_id) {
        let problem = if from_file {
            format!(
                "is not set, and {} holds {device_id:?}; a device id is 1 to 64 letters, digits, '-', '_' or '.'",
                kept.display()
            )
        } else {
            format!("{device_id:?} must be 1 to 64 letters, digits, '-', '_' or '.'")
        };
        return Err(invalid("uplink.device_id", problem));
    }
    let topic_prefix = u.topic_prefix.unwrap_or_else(|| "fieldsync/v1".into());
    if topic_prefix.is_empty()
        || topic_prefix.contains(['+', '#'])
        || topic_prefix.starts_with('/')
        || topic_prefix.ends_with('/')
    {
        return Err(invalid(
            "uplink.topic_prefix",
            "must be a topic without wildcards and without a leading or trailing '/'",
        ));
    }
    let positive = |key: &str, v: usize| -> Result<usize, ConfigError> {
        if v == 0 {
            Err(invalid(key, "must be at least 1"))
        } else {
            Ok(v)
        }
    };
    let secs = std::time::Duration::from_secs;
    let level = u.compression_level.unwrap_or(3);
    if !(1..=19).contains(&level) {
        return Err(invalid("uplink.compression_level", "must be from 1 to 19"));
    }
    // 128 KiB: what the strictest common broker (AWS IoT Core) takes.
    let max_message_bytes = u.max_message_bytes.unwrap_or(128 * 1024);
    if max_message_bytes < MIN_MESSAGE_BYTES {
        return Err(invalid(
            "uplink.max_message_bytes",
            format!("must be at least {MIN_MESSAGE_BYTES}"),
        ));
    }
    let photo_chunk_bytes = positive(
        "uplink.photo_chunk_bytes",
        u.photo_chunk_bytes.unwrap_or(32 * 1024),
    )?;
    // A chunk's packet: its header, the photo's topic, the MQTT header around them.
    let photo_topic = crate::uplink::wire::Topics::new(&topic_prefix, &device_id)
        .photo(&"0".repeat(64))
        .len();
    let chunk_packet =
        crate::uplink::wire::packet_bytes(photo_topic, photo_chunk_bytes + PHOTO_CHUNK_HEADER);
    if chunk_packet > max_message_bytes {
        return Err(invalid(
            "uplink.photo_chunk_bytes",
            format!(
                "a chunk makes a {chunk_packet}-byte packet (its {PHOTO_CHUNK_HEADER}-byte header, the photo's topic and MQTT's header included), more than uplink.max_message_bytes ({max_message_bytes})"
            ),
        ));
    }
    Ok(Some((
        UplinkSettings {
            host: host.to_owned(),
            port,
            tls,
            username: u.username,
            password_file: u.password_file.map(resolve),
            device_id,
            topic_prefix,
            keep_alive: secs(keep_alive(u.keep_alive_secs.unwrap_or(30))?),
            batch_max_ops: positive("uplink.batch_max_ops", u.batch_max_ops.unwrap_or(200))?,
            batch_max_bytes: positive(
                "uplink.batch_max_bytes",
                u.batch_max_bytes.unwrap_or(64 * 1024),
            )?,
            window: positive("uplink.window", u.window.unwrap_or(4))?,
            ack_timeout: secs(positive(
                "uplink.ack_timeout_secs",
                u.ack_timeout_secs.unwrap_or(30) as usize,
            )? as u64),
            reconnect_min: std::time::Duration::from_millis(
                u.reconnect_min_ms.unwrap_or(100).max(10),
            ),
            reconnect_max: secs(positive(
                "uplink.reconnect_max_secs",
                u.reconnect_max_secs.unwrap_or(60) as usize,
            )? as u64),
            max_downlink_bytes: positive(
                "uplink.max_downlink_bytes",
                u.max_downlink_bytes.unwrap_or(1024 * 1024),
            )?,
            max_message_bytes,
            compression_level: level,
            photo_chunk_bytes,
            photo_window: positive("uplink.photo_window", u.photo_window.unwrap_or(4))?,
        },
        new,
    )))
}

/// Below this, a batch could not hold even a small change.
const MIN_MESSAGE_BYTES: usize = 4096;
const PHOTO_CHUNK_HEADER: usize = crate::uplink::wire::CHUNK_HEADER;

fn is_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// An id for a device whose configuration names none: systemd's machine id, else a
/// random one. Made once and then kept in the state folder: on a read-only root the
/// machine id is made again at every boot, and an A/B update brings a new one, while the
/// back office knows the device by this id (and the broker keeps its session under it).
/// The host name is no candidate: images often give every device the same one.
fn new_device_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned())
        // "uninitialized" stands in until the first boot completes.
        .filter(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}

/// A log filter made of levels and `target=level` directives only. tracing's own parser
/// takes a bare word it does not know ("verbose", "inf") for a target's name, which turns
/// every other target off: the daemon would run with an empty log.
fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    filter.split(',').all(|part| match part.split_once('=') {
        Some((target, l)) => !target.trim().is_empty() && level(l),
        None => level(part),
    })
}

/// MQTT carries the keepalive in 16 bits: a longer one would go out as another value.
fn keep_alive(secs: u64) -> Result<u64, ConfigError> {
    if secs == 0 || secs > u64::from(u16::MAX) {
        return Err(invalid(
            "uplink.keep_alive_secs",
            format!("{secs} must be from 1 to 65535 (MQTT's limit)"),
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_need_no_file() {
        let s = load(None).unwrap();
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.max_frame_bytes, 64 * 1024);
        assert!(s.allowed_uids.contains(&0));
    }

    #[test]
    fn dropins_override_in_sorted_order_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "f.toml",
            "[store]\nstate_dir = \"s\"\nmax_photo_bytes = 10\n",
        );
        write(
            dir.path(),
            "config.d/20-b.toml",
            "[store]\nmax_photo_bytes = 30\n",
        );
        write(
            dir.path(),
            "config.d/10-a.toml",
            "[store]\nmax_photo_bytes = 20\n[ui]\nmax_connections = 3\n",
        );
        let s = load(Some(&main)).unwrap();
        assert_eq!(s.max_photo_bytes, 30);
        assert_eq!(s.max_connections, 3);
        assert_eq!(s.state_dir, dir.path().join("s"));
    }

    #[test]
    fn a_log_level_that_would_silence_the_log_and_a_keepalive_mqtt_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, key) in [
            ("[log]\nlevel = \"verbose\"\n", "log.level"),
            ("[log]\nlevel = \"inf\"\n", "log.level"),
            ("[log]\nlevel = \"fieldsyncd=loud\"\n", "log.level"),
            (
                "[uplink]\nbroker = \"mqtt://b\"\ndevice_id = \"d\"\nkeep_alive_secs = 86400\n",
                "uplink.keep_alive_secs",
            ),
        ] {
            let main = write(dir.path(), "f.toml", text);
            let e = load(Some(&main)).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        for good in [
            "debug",
            "WARN",
            "fieldsyncd=debug,info",
            "info,rumqttc=warn",
        ] {
            let main = write(
                dir.path(),
                "f.toml",
                &format!("[log]\nlevel = \"{good}\"\n"),
            );
            assert_eq!(load(Some(&main)).unwrap().log_level, good);
        }
    }

    #[test]
    fn a_device_id_left_unset_is_made_once_and_then_read_from_the_state_folder() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "f.toml",
            "[store]\nstate_dir = \"s\"\n[uplink]\nbroker = \"mqtt://b\"\n",
        );
        let first = load(Some(&main)).unwrap();
        let made = first.new_device_id.clone().expect("a new id to keep");
        assert_eq!(first.uplink.as_ref().unwrap().device_id, made);
        assert!(is_device_id(&made), "{made}");
        // Kept (the daemon writes it at start), it is the id from then on.
        std::fs::create_dir(dir.path().join("s")).unwrap();
        std::fs::write(dir.path().join("s").join(DEVICE_ID_FILE), "handheld-17\n").unwrap();
        let later = load(Some(&main)).unwrap();
        assert_eq!(later.new_device_id, None);
        assert_eq!(later.uplink.unwrap().device_id, "handheld-17");
        // A configured id wins over the kept one.
        let named = write(
            dir.path(),
            "named.toml",
            "[store]\nstate_dir = \"s\"\n[uplink]\nbroker = \"mqtt://b\"\ndevice_id = \"hh-3\"\n",
        );
        let s = load(Some(&named)).unwrap();
        assert_eq!(
            (s.uplink.unwrap().device_id, s.new_device_id),
            ("hh-3".into(), None)
        );
        // A kept file that holds no id is an error naming it, never silently replaced.
        std::fs::write(dir.path().join("s").join(DEVICE_ID_FILE), "two words\n").unwrap();
        let e = load(Some(&main)).unwrap_err().to_string();
        assert!(
            e.contains("uplink.device_id") && e.contains(DEVICE_ID_FILE),
            "{e}"
        );
        // No broker, no id.
        let offline = write(dir.path(), "offline.toml", "[store]\nstate_dir = \"t\"\n");
        assert_eq!(load(Some(&offline)).unwrap().new_device_id, None);
    }

    #[test]
    fn work_order_expiry_is_off_by_default_and_its_notice_shorter_than_the_age() {
        let dir = tempfile::tempdir().unwrap();
        let none = write(dir.path(), "a.toml", "[store]\nstate_dir = \"s\"\n");
        assert_eq!(load(Some(&none)).unwrap().expiry, None);
        let day = std::time::Duration::from_secs(86_400);
        let fortnight = write(
            dir.path(),
            "b.toml",
            "[store]\nstate_dir = \"s\"\n[work_orders]\nexpire_after_secs = 1209600\n",
        );
        assert_eq!(
            load(Some(&fortnight)).unwrap().expiry,
            Some(Expiry {
                after: day * 14,
                warn_before: day
            })
        );
        for (text, key) in [
            (
                "expire_after_secs = 600\nwarn_before_secs = 600\n",
                "work_orders.warn_before_secs",
            ),
            ("warn_before_secs = 60\n", "work_orders.warn_before_secs"),
            ("expire_after_secs = -1\n", "expire_after_secs"),
            ("expire_after = 5\n", "expire_after"),
        ] {
            let f = write(
                dir.path(),
                "c.toml",
                &format!("[store]\nstate_dir = \"s\"\n[work_orders]\n{text}"),
            );
            let e = load(Some(&f)).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_value_found_wrong_names_the_dropin_that_set_it() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "f.toml", "[sync]\ninterval_secs = 600\n");
        let dropin = write(
            dir.path(),
            "config.d/50-site.toml",
            "[sync]\ninterval_secs = 5\n",
        );
        let e = load(Some(&main)).unwrap_err().to_string();
        assert!(
            e.contains(&dropin.display().to_string()) && e.contains("sync.interval_secs"),
            "{e}"
        );
    }

    #[test]
    fn a_dropin_folder_that_cannot_be_read_is_an_error_not_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "f.toml", "");
        // A file where the folder belongs: reading it fails as an unreadable folder does.
        write(dir.path(), "config.d", "not a folder");
        let e = load(Some(&main)).unwrap_err().to_string();
        assert!(e.contains("config.d"), "{e}");
    }

    #[test]
    fn sync_switches_and_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "f.toml",
            "[sync]\nauto_sync = false\nfiles_on_wifi_only = true\ninterval_secs = 0\nnetwork_manager = false\n",
        );
        let s = load(Some(&main)).unwrap().sync;
        assert!(!s.switches.auto_sync && s.switches.on_visit_completed);
        assert!(s.switches.files_on_wifi_only && !s.watch_network_manager);
        assert_eq!(s.switches.interval, None);
        assert_eq!(
            load(None).unwrap().sync.switches.interval,
            Some(std::time::Duration::from_secs(120))
        );
        let main = write(dir.path(), "g.toml", "[sync]\ninterval_secs = 2\n");
        let err = load(Some(&main)).unwrap_err().to_string();
        assert!(err.contains("sync.interval_secs"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "f.toml", "[store]\nstate_dri = \"x\"\n");
        let err = load(Some(&main)).unwrap_err().to_string();
        assert!(err.contains("f.toml"), "{err}");
        assert!(err.contains("state_dri"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "f.toml", "");
        write(
            dir.path(),
            "config.d/x.toml",
            "[ui]\nmax_connections = \"many\"\n",
        );
        let err = load(Some(&main)).unwrap_err().to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(
            err.contains("max_connections") || err.contains("integer"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, key) in [
            ("[ui]\nsocket_mode = \"999\"\n", "ui.socket_mode"),
            ("[ui]\nmax_connections = 0\n", "ui.max_connections"),
            (
                "[ui]\nallowed_groups = [\"no-such-group-xyz\"]\n",
                "ui.allowed_groups",
            ),
            ("[log]\nlevel = \"loud[\"\n", "log.level"),
            (
                "[uplink]\nbroker = \"mqtt://b\"\nmax_message_bytes = 100\n",
                "uplink.max_message_bytes",
            ),
            // A photo chunk could never be sent.
            (
                "[uplink]\nbroker = \"mqtt://b\"\nmax_message_bytes = 65536\nphoto_chunk_bytes = 65536\n",
                "uplink.photo_chunk_bytes",
            ),
            // The chunk and its header fit; with the topic and MQTT's header they do
            // not, and a broker that counts packets would drop every one.
            (
                "[uplink]\nbroker = \"mqtt://b\"\nmax_message_bytes = 20480\nphoto_chunk_bytes = 20464\n",
                "uplink.photo_chunk_bytes",
            ),
            ("[uplink]\nbroker = \"mqtt://b\"\nalpn = [\"x-amzn-mqtt-ca\"]\n", "uplink.alpn"),
            (
                "[uplink]\nbroker = \"mqtts://b:443\"\nca_file = \"ca.pem\"\nalpn = [\"\"]\n",
                "uplink.alpn",
            ),
            (
                "[uplink]\nbroker = \"mqtt://b\"\npassword_file = \"secret\"\n",
                "uplink.password_file",
            ),
        ] {
            let main = write(dir.path(), "f.toml", text);
            let err = load(Some(&main)).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
