//! Logging through tracing: to the journal when stderr is connected to it
//! (`JOURNAL_STREAM`), compact text on stderr otherwise.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal = match format {
        LogFormat::Journald => true,
        LogFormat::Text => false,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if want_journal {
        match tracing_journald::layer() {
            Ok(journald) => {
                let _ = registry.with(journald).try_init();
                return;
            }
            Err(e) => eprintln!("fieldsyncd: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .compact()
                .with_writer(std::io::stderr),
        )
        .try_init();
}
