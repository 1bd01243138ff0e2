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
    #[error("config: `{key}` {problem}")]
    Invalid { key: String, problem: String },
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
    let mut files = Vec::new();
    if let Some(path) = path {
        files.push(path.to_owned());
        let dropins = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("config.d");
        if let Ok(entries) = std::fs::read_dir(&dropins) {
            let mut extra: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            extra.sort();
            files.extend(extra);
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
        merge(&mut merged, table);
    }
    let file = File::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Parse {
        path: files.last().cloned().unwrap_or_default(),
        message: e.message().to_owned(),
    })?;
    let base_dir = path
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new("."));
    validate(file, base_dir)
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
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(invalid(
            "log.level",
            format!(
                "{log_level:?} is not a level or filter (try \"info\" or \"fieldsyncd=debug\")"
            ),
        ));
    }
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
        seed_work_orders: file.dev.seed_work_orders.map(resolve),
    })
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
        ] {
            let main = write(dir.path(), "f.toml", text);
            let err = load(Some(&main)).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
