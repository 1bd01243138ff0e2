//! The `fieldsyncd` binary: parses arguments, loads the configuration, and runs the
//! library's daemon, logging the whole cause chain of a fatal error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fieldsyncd::config::{self, EXIT_BAD_CONFIG};

/// fieldsync daemon: offline store, outbox and UI socket for inspection handhelds.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file; `config.d/*.toml` beside it are merged in sorted order.
    /// Without it, built-in defaults apply (state in ./fieldsync-state).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the configuration, print the settings, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match config::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fieldsyncd: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if args.check_config {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }
    limit_malloc_arenas();
    let log_level = fieldsyncd::logging::init(&settings.log_level, settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // A handheld has few cores; two workers plus the store's writer thread are plenty.
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let reload = fieldsyncd::Reload {
        config: args.config,
        log_level,
    };
    match runtime.block_on(fieldsyncd::run(settings, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain = cause_chain(&e);
            tracing::error!(error = %chain, "fieldsyncd failed");
            eprintln!("fieldsyncd: {chain}");
            if e.is_config() {
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// glibc gives each thread that allocates its own arena and rarely hands freed memory
/// back; with the runtime's workers, the store's writer and blocking tasks, a drain left
/// the daemon several MiB larger for good. One arena keeps memory flat (promise 7) at no
/// measurable cost for a daemon whose threads mostly wait. `MALLOC_ARENA_MAX` in the
/// environment still wins, for anyone measuring otherwise.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before any other thread exists; mallopt only sets a parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// "outer: inner: root cause", so one log line says everything.
fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
