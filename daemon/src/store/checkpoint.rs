//! Checkpoints off the commit path. SQLite's own automatic checkpoint runs inside the
//! COMMIT that makes the log long enough: that capture, and every capture queued behind
//! it, waits while hundreds of pages are copied into the database and the database is
//! synced. Here the write connection only notes how long the log is after each commit,
//! and a thread of its own copies the log back while captures go on. It takes the write
//! connection only for a second, short pass over what was committed during the first,
//! so that the log is copied whole and the next commit starts it over from its
//! beginning instead of letting it grow.
//!
//! Durability does not depend on any of this: a commit is durable once its frames are
//! synced in the log (promise 1); a checkpoint only moves them into the database file.

use std::cell::Cell;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Weak;

use rusqlite::hooks::Wal;
use rusqlite::Connection;

use super::Inner;

/// Pages in the log after which it is copied back (SQLite's own default threshold).
pub(super) const START_AT: i32 = 1000;
/// Pages after which the writer copies the log back itself: the thread is behind, or
/// could not be started.
pub(super) const INLINE_AT: i32 = 8 * START_AT;

thread_local! {
    /// The log's length after the last commit made on this thread. SQLite calls the hook
    /// inside COMMIT, on the committing thread, which reads it right after.
    static LOG_PAGES: Cell<i32> = const { Cell::new(0) };
}

/// Makes `conn`'s commits note the log's length, which also turns SQLite's automatic
/// checkpoint off for it (that checkpoint is itself such a hook).
pub(super) fn watch(conn: &Connection) {
    conn.wal_hook(Some(note_pages));
}

fn note_pages(_: &Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    LOG_PAGES.with(|p| p.set(pages));
    Ok(())
}

/// The log's length after the last commit on this thread, then forgotten.
pub(super) fn take_pages() -> i32 {
    LOG_PAGES.with(|p| p.replace(0))
}

/// Copies what the log holds into the database, as far as no reader still needs it,
/// without waiting for anyone. Returns the pages in the log and those copied.
pub(super) fn passive(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// When to wake the thread: once the log is long, and again only after it has grown by
/// a quarter more, so that a log that cannot start over (a reader holds it) is not
/// copied for every single commit.
#[derive(Default)]
pub(super) struct Wakes {
    last: i32,
}

impl Wakes {
    pub(super) fn due(&mut self, pages: i32) -> bool {
        if pages < self.last {
            // The log started over.
            self.last = 0;
        }
        if pages >= START_AT && pages >= self.last + START_AT / 4 {
            self.last = pages;
            return true;
        }
        false
    }
}

/// Starts the thread on a connection of its own. `None` (logged) when that connection
/// cannot be opened: the writer then checkpoints on its own, as SQLite would.
pub(super) fn start(
    db: &Path,
    store: Weak<Inner>,
) -> Option<(SyncSender<()>, std::thread::JoinHandle<()>)> {
    let conn = match open(db) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a connection for checkpoints; commits make them");
            return None;
        }
    };
    let (wake, woken) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || run(conn, woken, store));
    match thread {
        Ok(t) => Some((wake, t)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the checkpoint thread; commits make them");
            None
        }
    }
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(db)?;
    // FULL: the log is synced before it is copied, the database after.
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA cache_size=-256;")?;
    Ok(conn)
}

fn run(conn: Connection, woken: Receiver<()>, store: Weak<Inner>) {
    // Ends when the store is closed or dropped: the sender goes with the writer.
    while woken.recv().is_ok() {
        // The bulk, while captures commit.
        if let Err(e) = passive(&conn) {
            tracing::warn!(error = %e, "checkpoint failed; retried when the log grows");
            continue;
        }
        let Some(inner) = store.upgrade() else {
            return;
        };
        {
            // What came meanwhile, with no commit coming in between, so the log is
            // copied whole and starts over at the next commit.
            let writer = match inner.writer.lock() {
                Ok(w) => w,
                Err(poisoned) => poisoned.into_inner(),
            };
            if writer.conn.is_none() {
                return;
            }
            if let Err(e) = passive(&conn) {
                tracing::warn!(error = %e, "checkpoint failed; retried when the log grows");
            }
        }
        // Jobs queued while the writer was held found it taken and left their commit to
        // whoever held it.
        inner.commit_queued();
    }
}
