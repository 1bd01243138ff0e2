//! Logging through tracing: to the journal when stderr is connected to it
//! (`JOURNAL_STREAM`), compact text on stderr otherwise. The level can be changed while
//! running (SIGHUP re-reads `log.level`). The latest warnings and errors are also kept
//! in memory for the diagnostics report, which support reads even where the journal is
//! out of reach.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the level of the installed subscriber.
#[derive(Clone)]
pub struct LogLevel {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogLevel {
    /// A handle that changes nothing, for a daemon run without [`init`] (tests).
    pub fn fixed() -> LogLevel {
        LogLevel { handle: None }
    }

    /// Applies `level` unless `RUST_LOG` was set at start, which keeps precedence.
    pub fn set(&self, level: &str) {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let (Some(handle), Ok(filter)) = (&self.handle, EnvFilter::try_new(level)) else {
            return;
        };
        if let Err(e) = handle.reload(filter) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}

/// Whether stderr is the journal stream systemd set up. `JOURNAL_STREAM` is inherited by
/// children and survives a redirection (`fieldsyncd 2>file` from a unit's shell), so the
/// variable alone does not say it; its device and inode must be stderr's own.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    journal_stream_matches(
        value.to_str(),
        nix::sys::stat::fstat(std::io::stderr()).ok(),
    )
}

// `st_dev` and `st_ino` are narrower than u64 on some 32-bit targets.
#[allow(clippy::unnecessary_cast)]
fn journal_stream_matches(value: Option<&str>, stderr: Option<nix::sys::stat::FileStat>) -> bool {
    let (Some((dev, ino)), Some(stat)) = (value.and_then(|v| v.split_once(':')), stderr) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev as u64)
        && ino.parse::<u64>().ok() == Some(stat.st_ino as u64)
}

/// How many warnings and errors the diagnostics report keeps, newest last.
const RECENT_PROBLEMS: usize = 100;

/// A warning or an error as it was logged.
pub type Problem = ui_bridge::LoggedProblem;

fn problems() -> &'static std::sync::Mutex<std::collections::VecDeque<Problem>> {
    static PROBLEMS: std::sync::OnceLock<std::sync::Mutex<std::collections::VecDeque<Problem>>> =
        std::sync::OnceLock::new();
    PROBLEMS.get_or_init(Default::default)
}

/// The latest warnings and errors, oldest first.
pub fn recent_problems() -> Vec<Problem> {
    problems()
        .lock()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default()
}

/// Keeps warnings and errors for [`recent_problems`].
struct KeepProblems;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for KeepProblems {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        struct Fields {
            message: String,
            rest: Vec<String>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.message = format!("{value:?}");
                } else {
                    self.rest.push(format!("{}={value:?}", field.name()));
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.message = value.to_owned();
                } else {
                    self.rest.push(format!("{}={value}", field.name()));
                }
            }
        }
        let mut fields = Fields {
            message: String::new(),
            rest: Vec::new(),
        };
        event.record(&mut fields);
        let problem = Problem {
            time_ms: crate::store::now_ms(),
            level: if level == tracing::Level::ERROR {
                "ERROR".into()
            } else {
                "WARN".into()
            },
            target: event.metadata().target().to_owned(),
            message: fields.message,
            fields: fields.rest,
        };
        if let Ok(mut p) = problems().lock() {
            if p.len() == RECENT_PROBLEMS {
                p.pop_front();
            }
            p.push_back(problem);
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init(level: &str, format: LogFormat) -> LogLevel {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let level = LogLevel {
        handle: Some(handle),
    };
    let want_journal = match format {
        LogFormat::Journald => true,
        LogFormat::Text => false,
        LogFormat::Auto => stderr_is_journal(),
    };
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(KeepProblems);
    if want_journal {
        match tracing_journald::layer() {
            Ok(journald) => {
                let _ = registry.with(journald).try_init();
                return level;
            }
            Err(e) => eprintln!("fieldsyncd: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .compact()
                // Colours only for a person at a terminal, not in a log file.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .try_init();
    level
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_stream_counts_only_when_it_names_stderr() {
        let file = std::fs::File::open("/").unwrap();
        let stat = nix::sys::stat::fstat(&file).unwrap();
        let own = format!("{}:{}", stat.st_dev, stat.st_ino);
        assert!(journal_stream_matches(Some(&own), Some(stat)));
        let other = format!("{}:{}", stat.st_dev, stat.st_ino + 1);
        assert!(!journal_stream_matches(Some(&other), Some(stat)));
        assert!(!journal_stream_matches(Some("garbage"), Some(stat)));
        assert!(!journal_stream_matches(Some(&own), None));
        assert!(!journal_stream_matches(None, Some(stat)));
    }
}
