//! The durable store: one SQLite database in WAL mode with `synchronous=FULL`, with one
//! write connection shared by group commit (concurrent captures share one transaction
//! and one fsync), a separate read connection, and the photo files beside it
//! ([`photos`]).
//!
//! Group commit without a writer thread: a job is queued, then its caller tries to take
//! the write connection; whoever holds it commits everything queued, its own job and
//! those of callers that arrived meanwhile. A lone capture thus commits on the thread
//! that read its request, with no hand-off between threads on the hot path. The log is
//! copied back into the database by a thread of its own (`checkpoint.rs`), not inside
//! the commit of whichever capture makes it long.
//!
//! Promise 1 lives here: a write's future resolves only after its transaction's COMMIT
//! returned, and SQLite with `synchronous=FULL` in WAL mode fsyncs the log before COMMIT
//! returns.

pub mod attachments;
mod checkpoint;
pub mod photos;
mod schema;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub use photos::{PhotoDir, PhotoError};

/// Most jobs one transaction takes, so one huge burst still replies in slices.
const MAX_GROUP: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state folder {path} is not writable: {source}")]
    NotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot move the damaged database {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database migration to version {version} failed: {source}")]
    Migrate {
        version: usize,
        source: rusqlite::Error,
    },
    #[error(
        "the database was written by a newer fieldsyncd (schema {found}, this one knows {known})"
    )]
    TooNew { found: i64, known: usize },
    #[error("the storage is full")]
    Full,
    #[error("the storage is read-only")]
    ReadOnly,
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store is shut down")]
    Closed,
    #[error("cannot switch the database to full sync, so nothing is written")]
    SyncMode,
    #[error("another fieldsyncd is using the state folder {path} (it holds {lock}); one daemon per state folder")]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("cannot take the state folder's lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the database {path} can be read but not written by this user (check its owner and mode)"
    )]
    DatabaseReadOnly { path: PathBuf },
}

impl StoreError {
    /// Whether the store failed for a reason of its own (busy past the timeout, full,
    /// read-only, an I/O error, shut down) rather than because of what was written: the
    /// same write may well succeed later.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Full
            | StoreError::ReadOnly
            | StoreError::Closed
            | StoreError::SyncMode
            | StoreError::NotWritable { .. } => true,
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    C::DatabaseBusy
                        | C::DatabaseLocked
                        | C::DiskFull
                        | C::SystemIoFailure
                        | C::ReadOnly
                        | C::CannotOpen
                        | C::OutOfMemory
                        | C::PermissionDenied
                        | C::FileLockingProtocolFailed
                )
            ),
            _ => false,
        }
    }

    /// Sorts a SQLite failure into the cases the UI reports differently.
    fn classify(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(C::DiskFull) => StoreError::Full,
            Some(C::ReadOnly) | Some(C::CannotOpen) => StoreError::ReadOnly,
            _ => StoreError::Sqlite(e),
        }
    }
}

/// What [`Store::open`] found on the way.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Where a damaged database was moved, if one was.
    pub damaged_moved_to: Option<PathBuf>,
    pub schema_version: usize,
    /// The last stop was clean and the database is as it was left: the full check was
    /// not run before ready; run [`Store::check`] in the background.
    pub check_deferred: bool,
}

/// Left by a clean stop: the database's size and modification time at that moment.
/// A start that finds it with the database unchanged trusts it enough to be ready at
/// once and checks it in the background; any other start (a crash, a power cut, a file
/// touched while stopped) checks the whole database before it serves anyone. The file
/// is removed, durably, before the database is used, so a crash later can never leave
/// a stale one behind.
const CLEAN_STOP: &str = "clean-stop";

fn fingerprint(db: &Path) -> Option<String> {
    let meta = std::fs::metadata(db).ok()?;
    let modified = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    let wal = std::fs::metadata(format!("{}-wal", db.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    Some(format!("{} {} {wal}", meta.len(), modified.as_nanos()))
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Runs the job on the connection, or, given none, only prepares its answer: a job that
/// cannot run (its group could not begin) must not touch the database at all.
type RunFn = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;

/// One unit of work for the writer thread.
struct Job {
    /// Whether the caller waits for its commit to reach stable storage.
    durable: bool,
    run: RunFn,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Jobs waiting for the next group; `None` once the store is closed.
    queue: Mutex<Option<VecDeque<Job>>>,
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
    /// The thread that copies the log back into the database ([`checkpoint`]).
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub photos: PhotoDir,
    attachments: attachments::AttachmentDir,
    state_dir: PathBuf,
    /// Set while a deferred check has not passed (not run yet, under way, or failed):
    /// a stop then must not count as clean, or the next start would defer it again.
    suspect: std::sync::atomic::AtomicBool,
    /// Held for the life of the store: a second daemon on the same folder would sweep
    /// photo files this one is about to name and migrate its database under it.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

pub const DB_FILE: &str = "fieldsync.db";
/// The state folder's lock file ([`Store::open`]).
pub const LOCK_FILE: &str = "lock";

impl Store {
    /// Opens (or creates) the store in `state_dir`: checks the database, moves a damaged
    /// one aside, migrates, sweeps photo files no row names, and starts the writer.
    pub fn open(state_dir: &Path) -> Result<(Store, OpenReport), StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        check_writable(state_dir)?;
        // First, before anything in the folder is touched.
        let lock = lock_folder(state_dir)?;
        let db_path = state_dir.join(DB_FILE);
        // Before anything parses the schema or changes the folder: a newer fieldsyncd's
        // schema may use what this SQLite cannot read, and would then look damaged and
        // be set aside, with the inspector's work in it, after an image is rolled back.
        schema::refuse_newer(&db_path)?;
        let mut report = OpenReport::default();
        let marker = state_dir.join(CLEAN_STOP);
        let left = std::fs::read_to_string(&marker).ok();
        if left.is_some() {
            std::fs::remove_file(&marker)
                .and_then(|_| photos::fsync_dir(state_dir))
                .map_err(|source| StoreError::NotWritable {
                    path: marker.clone(),
                    source,
                })?;
        }
        report.check_deferred =
            left.is_some() && left.as_deref().map(str::trim) == fingerprint(&db_path).as_deref();
        if log_without_database(&db_path) {
            // SQLite would take an empty or missing database file for a new one and
            // delete the log beside it, and with it every change the log still holds.
            let moved = move_aside(&db_path)?;
            tracing::error!(
                database = %db_path.display(),
                moved_to = %moved.display(),
                "the database file is empty or missing but its log is not; both were moved aside and a new database started"
            );
            report.damaged_moved_to = Some(moved);
            report.check_deferred = false;
        }
        let conn = match open_checked(&db_path, !report.check_deferred) {
            Ok(conn) => conn,
            // Busy, an I/O error, no memory: the file may be fine, and moving it aside
            // would leave its work behind. The start fails and says why.
            Err(problem) if !is_damage(&problem) => {
                return Err(StoreError::Open {
                    path: db_path.clone(),
                    source: problem,
                })
            }
            Err(problem) => {
                let moved = move_aside(&db_path)?;
                tracing::error!(
                    database = %db_path.display(),
                    moved_to = %moved.display(),
                    problem = %problem,
                    "the database is damaged; it was moved aside and a new one started"
                );
                report.damaged_moved_to = Some(moved);
                report.check_deferred = false;
                open_checked(&db_path, true).map_err(|e| StoreError::Open {
                    path: db_path.clone(),
                    source: e,
                })?
            }
        };
        let mut conn = conn;
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            // SQLite opens a file it may not write read-only, without an error: every
            // change would fail later, behind a daemon that said it was ready.
            return Err(StoreError::DatabaseReadOnly { path: db_path });
        }
        if report.damaged_moved_to.is_none() {
            // Reported at every start until support has taken it away: what it holds
            // was never delivered, and a restart must not make the store look whole.
            report.damaged_moved_to = moved_aside_before(state_dir);
        }
        report.schema_version = schema::migrate(&mut conn)?;
        let photos = PhotoDir::open(&state_dir.join("photos")).map_err(|e| match e {
            PhotoError::Io { path, source } => StoreError::NotWritable { path, source },
            other => StoreError::NotWritable {
                path: state_dir.join("photos"),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        // Photo files no row names are left by captures that never committed. Not
        // swept before a deferred check has vouched for the rows that name them (a
        // damaged database sets its photos aside with it, and starts with none).
        if !report.check_deferred {
            sweep_unreferenced_photos(&conn, &photos)?;
        }
        let attachments_dir = state_dir.join("attachments");
        let attachments = attachments::AttachmentDir::open(&attachments_dir).map_err(|source| {
            StoreError::NotWritable {
                path: attachments_dir,
                source,
            }
        })?;

        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: db_path.clone(),
            source,
        })?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.execute_batch("PRAGMA cache_size=-1024;")?;
        rusqlite::vtab::array::load_module(&reader)?;

        checkpoint::watch(&conn);
        let store = Store {
            inner: Arc::new(Inner {
                queue: Mutex::new(Some(VecDeque::new())),
                writer: Mutex::new(Writer {
                    conn: Some(conn),
                    full_sync: true,
                    wake: None,
                    wakes: checkpoint::Wakes::default(),
                }),
                reader: Mutex::new(reader),
                checkpointer: Mutex::new(None),
                photos,
                attachments,
                state_dir: state_dir.to_owned(),
                suspect: std::sync::atomic::AtomicBool::new(report.check_deferred),
                _lock: lock,
            }),
        };
        if let Some((wake, thread)) = checkpoint::start(&db_path, Arc::downgrade(&store.inner)) {
            if let (Ok(mut w), Ok(mut t)) =
                (store.inner.writer.lock(), store.inner.checkpointer.lock())
            {
                w.wake = Some(wake);
                *t = Some(thread);
            }
        }
        if !report.check_deferred {
            // The check before ready is done; a deferred one trims when it ends.
            give_back_freed_memory();
        }
        Ok((store, report))
    }

    pub fn photos(&self) -> &PhotoDir {
        &self.inner.photos
    }

    pub fn attachments(&self) -> &attachments::AttachmentDir {
        &self.inner.attachments
    }

    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Runs `f` inside a write transaction, possibly together with other writers' jobs.
    /// Resolves after the commit is durable. If `f` fails, only its own changes are
    /// rolled back (it runs inside a savepoint).
    pub async fn write<T, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(true, f).await
    }

    /// Like [`Store::write`], for housekeeping that must be atomic but need not be
    /// durable on its own: its commit skips the fsync, and the next durable commit (or
    /// a checkpoint) carries it to disk. A power cut before then rolls it back whole.
    pub async fn write_lazy<T, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(false, f).await
    }

    async fn submit<T, E>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, E>>();
        let run: RunFn = Box::new(move |conn| {
            let result = conn.map(f);
            let ok = result.as_ref().is_some_and(|r| r.is_ok());
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(match (commit, result) {
                    (Ok(()), Some(result)) => result,
                    (Err(e), _) => Err(e.into()),
                    // Never ran, in a group that committed: its savepoint could not
                    // be made.
                    (Ok(()), None) => Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                        Some("the change could not start in its transaction".into()),
                    ))
                    .into()),
                });
            });
            (ok, reply)
        });
        {
            let mut queue = self.inner.queue.lock().map_err(|_| StoreError::Closed)?;
            queue
                .as_mut()
                .ok_or(StoreError::Closed)?
                .push_back(Job { durable, run });
        }
        // Commit here if nobody else is committing; otherwise the one who is will take
        // this job in its next group. The commit blocks this worker thread for one
        // fsync, which is the capture's latency anyway.
        self.inner.commit_queued();
        rx.await.map_err(|_| E::from(StoreError::Closed))?
    }

    /// Runs `f` on the read connection, off the async threads.
    pub async fn read<T, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().map_err(|_| StoreError::Closed)?;
            f(&conn)
        })
        .await
        .map_err(|_| E::from(StoreError::Closed))?
    }

    /// Like [`Store::read`] but on the calling thread (start-up, tests).
    pub fn read_blocking<T, E>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        f(&conn)
    }

    /// Commits what is queued, then closes the write connection after a checkpoint, so
    /// the database is left tidy. Later writes fail with [`StoreError::Closed`].
    pub fn close(&self) {
        // The checkpoint thread first: a checkpoint of its own running beside the last
        // one below would make that one fail. Dropping its waker ends it.
        if let Ok(mut w) = self.inner.writer.lock() {
            w.wake = None;
        }
        let thread = self
            .inner
            .checkpointer
            .lock()
            .ok()
            .and_then(|mut t| t.take());
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::warn!("the checkpoint thread panicked");
            }
        }
        let leftover = self.inner.queue.lock().ok().and_then(|mut q| q.take());
        let mut writer = match self.inner.writer.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(jobs) = leftover {
            if !jobs.is_empty() {
                writer.run(jobs.into_iter().collect());
            }
        }
        if let Some(conn) = writer.conn.take() {
            match conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                Err(e) => tracing::warn!(error = %e, "checkpoint at shutdown failed"),
                Ok(())
                    if !self
                        .inner
                        .suspect
                        .load(std::sync::atomic::Ordering::Acquire) =>
                {
                    drop(conn);
                    self.leave_clean_stop();
                }
                Ok(()) => {}
            }
        }
    }

    fn leave_clean_stop(&self) {
        let dir = &self.inner.state_dir;
        let Some(print) = fingerprint(&dir.join(DB_FILE)) else {
            return;
        };
        if let Err(e) = write_durably(&dir.join(CLEAN_STOP), print.as_bytes()) {
            // Only costs the next start a full check.
            tracing::warn!(error = %e, "cannot note the clean stop");
        }
    }

    /// SQLite's quick_check over the whole database, on a connection of its own, for a
    /// start that deferred it. Blocking. A failure marks the store so that this stop is
    /// not taken for a clean one: the next start checks first and sets the file aside.
    pub fn check(&self) -> Result<(), StoreError> {
        let db = self.inner.state_dir.join(DB_FILE);
        // A writer holding the log's index for a moment is no sign of damage: wait it out.
        let result =
            Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).and_then(|c| {
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                quick_check(&c)
            });
        self.inner
            .suspect
            .store(result.is_err(), std::sync::atomic::Ordering::Release);
        give_back_freed_memory();
        result.map_err(|source| StoreError::Open { path: db, source })
    }

    /// Whether the store still takes writes (the watchdog asks).
    pub fn is_alive(&self) -> bool {
        self.inner
            .queue
            .lock()
            .map(|q| q.is_some())
            .unwrap_or(false)
    }
}

impl Inner {
    /// Runs queued jobs in groups while this caller can hold the write connection.
    fn commit_queued(&self) {
        loop {
            let mut writer = match self.writer.try_lock() {
                Ok(w) => w,
                // Someone is committing and will find our job when it looks again.
                Err(TryLockError::WouldBlock) => return,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
            };
            let batch: Vec<Job> = match self.queue.lock() {
                Ok(mut q) => match q.as_mut() {
                    Some(q) => {
                        let n = q.len().min(MAX_GROUP);
                        q.drain(..n).collect()
                    }
                    None => return,
                },
                Err(_) => return,
            };
            if batch.is_empty() {
                return;
            }
            writer.run(batch);
            drop(writer);
            // A job queued while we committed may have found the connection taken:
            // look again now that it is free.
            let more = self
                .queue
                .lock()
                .map(|q| q.as_ref().is_some_and(|q| !q.is_empty()))
                .unwrap_or(false);
            if !more {
                return;
            }
        }
    }
}

/// The write connection and the sync mode it is in.
struct Writer {
    /// `None` after [`Store::close`].
    conn: Option<Connection>,
    full_sync: bool,
    /// Wakes the checkpoint thread; `None` without one, or once closing.
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    wakes: checkpoint::Wakes,
}

impl Writer {
    fn run(&mut self, batch: Vec<Job>) {
        let Some(conn) = self.conn.as_ref() else {
            // Dropping a job drops its reply channel: its caller gets `Closed`.
            drop(batch);
            return;
        };
        // A group with nothing durable in it commits without an fsync of its own.
        let durable = batch.iter().any(|j| j.durable);
        if durable != self.full_sync {
            let mode = if durable { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => self.full_sync = durable,
                Err(e) => tracing::error!(error = %e, "cannot switch synchronous mode"),
            }
        }
        if durable && !self.full_sync {
            // Never commit a durable job without FULL: fail the group rather than lie.
            for job in batch {
                let (_, reply) = fail_job(job);
                reply(Err(StoreError::SyncMode));
            }
            return;
        }
        run_group(conn, batch);
        let pages = checkpoint::take_pages();
        let inline = match self.wake {
            Some(_) => pages >= checkpoint::INLINE_AT,
            None => pages >= checkpoint::START_AT,
        };
        if inline {
            match checkpoint::passive(conn) {
                // The thread is at it.
                Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint failed; retried after the next commit")
                }
                Ok(_) => {}
            }
        } else if let Some(wake) = &self.wake {
            if self.wakes.due(pages) {
                // Full: it is woken already.
                let _ = wake.try_send(());
            }
        }
    }
}

fn check_writable(dir: &Path) -> Result<(), StoreError> {
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|source| StoreError::NotWritable {
            path: dir.to_owned(),
            source,
        })
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // `rarray()`: a whole batch of ids as one statement parameter.
    rusqlite::vtab::array::load_module(conn)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    // A modest page cache: the working set is the tail of a few tables, and a handheld's
    // memory is better left to the app.
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         PRAGMA foreign_keys=ON;
         PRAGMA temp_store=MEMORY;
         PRAGMA cache_size=-2048;",
    )
}

/// Opens the database and runs SQLite's quick check; any failure means damaged.
/// Opens the database; `full` runs SQLite's quick_check over all of it, otherwise only
/// the header and schema are read.
fn open_checked(path: &Path, full: bool) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    if full {
        quick_check(&conn)?;
        // The check filled the page cache with the whole database's pages, which the
        // daemon at rest has no use for.
        conn.execute_batch("PRAGMA shrink_memory")?;
    } else {
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
    }
    Ok(conn)
}

/// Whether opening or checking the database failed because the file is damaged, rather
/// than for a reason of the moment.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

fn quick_check(conn: &Connection) -> Result<(), rusqlite::Error> {
    let verdict: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(verdict),
        ));
    }
    Ok(())
}

/// A log with frames in it beside a database file that is missing or empty: the file
/// system lost the database (SQLite never leaves it empty once its log is in use).
fn log_without_database(db: &Path) -> bool {
    let log = std::fs::metadata(format!("{}-wal", db.display())).map_or(0, |m| m.len());
    let database = std::fs::metadata(db).map_or(0, |m| m.len());
    log > 0 && database == 0
}

/// Hands the heap freed by a whole-database check back to the kernel: glibc keeps
/// freed memory below the top of its heap resident, and a check frees megabytes (its
/// page cache) that the daemon at rest would otherwise carry for good.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes the state folder's lock without waiting: a second daemon fails at once.
fn lock_folder(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::Lock {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                StoreError::InUse {
                    path: dir.to_owned(),
                    lock: path.clone(),
                }
            } else {
                StoreError::Lock {
                    path: path.clone(),
                    source: errno.into(),
                }
            }
        },
    )
}

/// The newest database an earlier start moved aside, if it is still there.
fn moved_aside_before(dir: &Path) -> Option<PathBuf> {
    let prefix = format!("{DB_FILE}.damaged-");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stamp: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((stamp, e.path()))
        })
        .max()
        .map(|(_, path)| path)
}

/// Renames the database and its WAL and SHM files to `<name>.damaged-<unix time>`; never
/// deletes them, since they may hold work support can still recover.
fn move_aside(db: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let target = db.with_extension(format!("db.damaged-{stamp}"));
    // The photos its rows name go with it: left in place, the first sweep of the new
    // database, which names none of them, would remove them all.
    if let Some(dir) = db.parent() {
        let photos = dir.join("photos");
        if photos.is_dir() {
            let to = dir.join(format!("photos.damaged-{stamp}"));
            std::fs::rename(&photos, &to).map_err(|source| StoreError::MoveAside {
                path: photos.clone(),
                source,
            })?;
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", target.display()));
            std::fs::rename(&from, &to).map_err(|source| StoreError::MoveAside {
                path: from.clone(),
                source,
            })?;
        }
    }
    if let Some(dir) = db.parent() {
        photos::fsync_dir(dir).map_err(|source| StoreError::MoveAside {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(target)
}

/// A photo file no row names was written by a capture that never committed (power cut
/// between rename and COMMIT): it was never acknowledged, so it goes.
fn sweep_unreferenced_photos(conn: &Connection, photos: &PhotoDir) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT 1 FROM items WHERE photo_sha256 = ?1 LIMIT 1")?;
    let mut removed = 0usize;
    let listed = match photos.list() {
        Ok(listed) => listed,
        // Housekeeping: a folder that cannot be read (failing flash after a power cut)
        // must not keep the daemon from syncing what it can.
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the photo files to sweep; they stay");
            return Ok(());
        }
    };
    for sha in listed {
        if !stmt.exists([&sha])? {
            photos.remove(&sha);
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed photo files of captures that never committed"
        );
    }
    Ok(())
}

/// Runs a statement from the connection's statement cache: the transaction verbs run
/// several times per capture and need not be parsed each time.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn run_group(conn: &Connection, batch: Vec<Job>) {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let e = StoreError::classify(e);
        tracing::error!(error = %e, "cannot begin a write transaction");
        let msg = cause(&e);
        for job in batch {
            // The job still has to answer; run nothing and fail it.
            let (_, reply) = fail_job(job);
            reply(Err(same_kind(&e, &msg)));
        }
        return;
    }
    let mut replies = Vec::with_capacity(batch.len());
    // A job alone needs no savepoint: the transaction is its own. A savepoint costs two
    // statements and a copy of every page the job changes, for the chance to roll back.
    let alone = batch.len() == 1;
    let mut jobs = batch.into_iter();
    while let Some(job) = jobs.next() {
        if alone {
            let (ok, reply) = (job.run)(Some(conn));
            if !ok {
                if let Err(e) = exec(conn, "ROLLBACK") {
                    tracing::error!(error = %e, "rollback failed");
                }
                // Nothing was stored; the job answers with its own error.
                reply(Ok(()));
                return;
            }
            replies.push((ok, reply));
            continue;
        }
        if exec(conn, "SAVEPOINT job").is_err() {
            let (_, reply) = fail_job(job);
            replies.push((false, reply));
            continue;
        }
        let (ok, reply) = (job.run)(Some(conn));
        let end = if ok {
            exec(conn, "RELEASE job")
        } else {
            exec(conn, "ROLLBACK TO job").and_then(|_| exec(conn, "RELEASE job"))
        };
        // A failed job whose savepoint cannot be rolled back leaves its half-done
        // change in the transaction, where COMMIT would store it behind an error
        // answer: the whole group goes instead, as below.
        let undo_failed = !ok && end.is_err();
        if undo_failed {
            if let Err(e) = &end {
                tracing::error!(error = %e, "cannot undo a failed change; its group is rolled back");
            }
            if !conn.is_autocommit() {
                if let Err(e) = exec(conn, "ROLLBACK") {
                    tracing::error!(error = %e, "rollback failed");
                }
            }
        }
        if undo_failed || conn.is_autocommit() {
            // SQLite rolled the whole transaction back (an I/O error, a full disk during
            // a cache spill): the jobs before this one are gone with it. Going on would
            // commit the later ones each on its own while the group reports failure,
            // and an app that tries again would store them twice.
            tracing::error!("a change failed and took its group's transaction with it; the changes after it run in a new one");
            let e = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("the transaction was rolled back by another change's failure".into()),
            ));
            let msg = cause(&e);
            for (_, earlier) in replies {
                earlier(Err(same_kind(&e, &msg)));
            }
            if ok {
                reply(Err(same_kind(&e, &msg)));
            } else {
                // It answers with its own error.
                reply(Ok(()));
            }
            let rest: Vec<Job> = jobs.collect();
            if !rest.is_empty() {
                run_group(conn, rest);
            }
            return;
        }
        if let Err(e) = end {
            tracing::error!(error = %e, "savepoint failed");
        }
        replies.push((ok, reply));
    }
    match exec(conn, "COMMIT") {
        Ok(()) => {
            tracing::debug!(jobs = replies.len(), "group committed");
            for (_, reply) in replies {
                reply(Ok(()));
            }
        }
        Err(e) if is_sync_failure(&e) => {
            // After a failed fsync the kernel may have dropped the pages it could not
            // write and report the next fsync as a success; SQLite's log may also hold
            // this group's frames, which recovery would replay. Neither "stored" nor "not
            // stored" is known to be true: stop, and let the next start's recovery and
            // check say what the disk holds. The callers see their connection close.
            tracing::error!(error = %e, jobs = replies.len(), "the storage failed to sync a commit; stopping so that the next start recovers the database");
            eprintln!("fieldsyncd: the storage failed to sync a commit ({e}); stopping");
            std::process::exit(1);
        }
        Err(e) => {
            let e = StoreError::classify(e);
            tracing::error!(error = %e, jobs = replies.len(), "commit failed; nothing of this group was stored");
            let _ = conn.execute_batch("ROLLBACK");
            let msg = cause(&e);
            for (_, reply) in replies {
                reply(Err(same_kind(&e, &msg)));
            }
        }
    }
}

/// SQLite's words for a write or sync of the log that the storage failed (not a full
/// disk, which SQLite reports as such and which is safe to go on from).
fn is_sync_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_IOERR_FSYNC
                || f.extended_code == rusqlite::ffi::SQLITE_IOERR_WRITE
    )
}

/// A job that cannot run: its answer, without running it.
fn fail_job(job: Job) -> (bool, Reply) {
    (job.run)(None)
}

/// A copy of a group's failure for each of its jobs (rusqlite's errors are not `Clone`),
/// keeping SQLite's code so that callers can tell a busy or full store from the rest.
fn same_kind(e: &StoreError, msg: &str) -> StoreError {
    match e {
        StoreError::Full => StoreError::Full,
        StoreError::ReadOnly => StoreError::ReadOnly,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, _)) => {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(*code, Some(msg.to_owned())))
        }
        _ => StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some(msg.to_owned()),
        )),
    }
}

/// The words of a failure without this module's "database error: " before them, which
/// the copy made by [`same_kind`] adds again.
fn cause(e: &StoreError) -> String {
    match e {
        StoreError::Sqlite(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// Writes a small file of the state folder so that a power cut leaves either the whole
/// new content or none: a temporary file, synced, renamed over, the folder synced.
pub fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    photos::fsync_dir(dir)
}

/// Milliseconds since the Unix epoch, the store's and the protocol's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The current schema on a bare connection, for unit tests of the domain rules.
#[cfg(test)]
pub(crate) fn schema_for_tests(conn: &mut Connection) {
    rusqlite::vtab::array::load_module(conn).expect("array module");
    schema::migrate(conn).expect("schema applies to an empty database");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_commit_and_a_failing_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut handles = Vec::new();
        for i in 0..50 {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                store
                    .write(move |c| {
                        c.execute(
                            "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
                             VALUES (?1, 1, 't', 'new', '[\"new\"]', '{}', 0)",
                            [format!("W{i}")],
                        )?;
                        if i % 10 == 0 {
                            return Err(StoreError::Closed);
                        }
                        Ok::<_, StoreError>(())
                    })
                    .await
            }));
        }
        let mut failed = 0;
        for h in handles {
            if h.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 5);
        let n: i64 = store
            .read(|c| {
                Ok::<_, StoreError>(
                    c.query_row("SELECT count(*) FROM work_orders", [], |r| r.get(0))?,
                )
            })
            .await
            .unwrap();
        assert_eq!(n, 45);
        store.close();
    }

    /// Sixty concurrent writes, each storing a key; every seventh then does `misbehave`
    /// on the connection and fails. Whatever groups they fall into, exactly the keys
    /// answered ok are stored.
    async fn stored_is_what_was_answered_ok(misbehave: fn(&Connection)) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut handles = Vec::new();
        for i in 0..60 {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let answer = store
                    .write(move |c| {
                        c.execute(
                            "INSERT INTO settings (key, value) VALUES (?1, 'v')",
                            [format!("k{i}")],
                        )?;
                        if i % 7 == 3 {
                            misbehave(c);
                            return Err(StoreError::Closed);
                        }
                        Ok::<_, StoreError>(())
                    })
                    .await;
                (i, answer.is_ok())
            }));
        }
        let mut ok = std::collections::BTreeSet::new();
        for h in handles {
            let (i, answered_ok) = h.await.unwrap();
            if answered_ok {
                ok.insert(format!("k{i}"));
            }
        }
        let stored: std::collections::BTreeSet<String> = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT key FROM settings WHERE key LIKE 'k%'")?;
                let keys = stmt
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                Ok::<_, StoreError>(keys)
            })
            .await
            .unwrap();
        assert_eq!(stored, ok, "stored exactly what was answered ok");
        store.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_failure_ends_the_transaction_leaves_no_answer_untrue() {
        // What SQLite does by itself on an I/O error.
        stored_is_what_was_answered_ok(|c| {
            let _ = c.execute_batch("ROLLBACK");
        })
        .await;
    }

    /// A failed job whose savepoint is gone by the time it is undone (here it released
    /// it itself) must not leave its half-done change in the group's commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_job_that_cannot_be_undone_takes_its_group_with_it() {
        // Alone in its group a job has no savepoint, and this fails.
        stored_is_what_was_answered_ok(|c| {
            let _ = c.execute_batch("RELEASE job");
        })
        .await;
    }

    /// A group that cannot begin (another process holds the write lock past the busy
    /// timeout) answers its jobs without running them: run outside a transaction, a job
    /// would wait out the timeout again on its first write, or commit on its own what
    /// its caller is told failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_that_cannot_begin_runs_none_of_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let lock = Connection::open(dir.path().join(DB_FILE)).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let failed = store
            .write(move |_| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, StoreError>(())
            })
            .await;
        lock.execute_batch("ROLLBACK").unwrap();
        assert!(failed.is_err());
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "the job ran"
        );
        store.close();
    }

    #[tokio::test]
    async fn a_lone_failing_job_stores_nothing_and_the_next_write_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let insert = |c: &Connection, id: &str| {
            c.execute(
                "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
                 VALUES (?1, 1, 't', 'new', '[\"new\"]', '{}', 0)",
                [id],
            )
        };
        // Awaited one at a time, so each job is a group of its own (no savepoint).
        let failed = store
            .write(move |c| {
                insert(c, "LOST")?;
                Err::<(), _>(StoreError::Closed)
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Closed)));
        store
            .write(move |c| Ok::<_, StoreError>(insert(c, "KEPT")?))
            .await
            .unwrap();
        let ids: Vec<String> = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT id FROM work_orders ORDER BY id")?;
                let ids = stmt
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok::<_, StoreError>(ids)
            })
            .await
            .unwrap();
        assert_eq!(ids, ["KEPT"]);
        store.close();
    }

    #[test]
    fn only_a_clean_stop_with_the_file_untouched_defers_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(!report.check_deferred, "a first start checks");
        store.close();
        drop(store);
        assert!(dir.path().join(CLEAN_STOP).exists());

        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.check_deferred, "a clean stop is trusted");
        assert!(!dir.path().join(CLEAN_STOP).exists(), "used up at start");
        store.check().unwrap();
        // No close: a crash. The next start checks first.
        drop(store);
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(!report.check_deferred);
        store.close();
        drop(store);

        // A clean stop before the deferred check has passed is no clean stop: the next
        // start checks first.
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.check_deferred);
        store.close();
        drop(store);
        assert!(!dir.path().join(CLEAN_STOP).exists());
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(!report.check_deferred);
        store.close();
        drop(store);

        // A clean stop, but the file changed since.
        std::fs::write(dir.path().join(CLEAN_STOP), "1 2 3").unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(!report.check_deferred);
        drop(store);
    }

    #[tokio::test]
    async fn the_checkpoint_thread_keeps_the_log_short_and_a_close_after_a_burst_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let mut longest = 0;
        // About ten pages per commit, so the log passes START_AT many times over.
        for i in 0..600 {
            store
                .write(move |c| {
                    for j in 0..10 {
                        c.execute(
                            "INSERT INTO work_orders (id, version, title, stage, workflow, doc, received_ms)
                             VALUES (?1, 1, 't', 'new', '[\"new\"]', ?2, 0)",
                            rusqlite::params![format!("W{i}-{j}"), "x".repeat(4000)],
                        )?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await
                .unwrap();
            longest = longest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        // Had the log never started over, it would have reached INLINE_AT before the
        // writer copied it back itself.
        let page = 4096 + 24;
        assert!(
            longest < (checkpoint::INLINE_AT as u64 / 2) * page,
            "the log grew to {longest} bytes"
        );
        store.close();
        assert!(
            dir.path().join(CLEAN_STOP).exists(),
            "the last checkpoint at close ran with the thread stopped"
        );
        drop(store);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM work_orders", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 6000);
    }

    #[test]
    fn the_thread_is_woken_when_the_log_is_long_and_again_only_when_it_grew() {
        let mut wakes = checkpoint::Wakes::default();
        assert!(!wakes.due(checkpoint::START_AT - 1));
        assert!(wakes.due(checkpoint::START_AT));
        // The log could not start over (a reader held it): not for every commit.
        assert!(!wakes.due(checkpoint::START_AT + 10));
        assert!(wakes.due(checkpoint::START_AT + checkpoint::START_AT / 4));
        // It started over, and grew long again.
        assert!(!wakes.due(5));
        assert!(wakes.due(checkpoint::START_AT));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_locked_past_its_timeout_fails_as_unavailable_and_works_after() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let lock = Connection::open(dir.path().join(DB_FILE)).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = || {
            store.write(|c| {
                c.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')", [])?;
                Ok::<_, StoreError>(())
            })
        };
        let e = write().await.expect_err("the lock is held");
        assert!(e.is_unavailable(), "{e:?}");
        // Said once, as SQLite says it.
        assert_eq!(e.to_string(), "database error: database is locked");
        lock.execute_batch("ROLLBACK").unwrap();
        write().await.expect("free again");
        // What was written cannot succeed later: not unavailable.
        let e = store
            .write(|c| {
                c.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')", [])?;
                Ok::<_, StoreError>(())
            })
            .await
            .expect_err("the key is taken");
        assert!(!e.is_unavailable(), "{e:?}");
        store.close();
    }

    #[test]
    fn a_damaged_database_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let junk = vec![0x5au8; 8192];
        std::fs::write(dir.path().join(DB_FILE), &junk).unwrap();
        // A photo the damaged database may name.
        let sha = "ab".repeat(32);
        let photo = dir.path().join("photos").join("ab").join(&sha);
        std::fs::create_dir_all(photo.parent().unwrap()).unwrap();
        std::fs::write(&photo, b"bytes").unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        let moved = report.damaged_moved_to.expect("moved aside");
        assert_eq!(std::fs::read(&moved).unwrap(), junk);
        // Its photos are set aside with it, out of reach of any later sweep.
        let stamp = moved
            .extension()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("damaged-")
            .to_owned();
        let kept = dir
            .path()
            .join(format!("photos.damaged-{stamp}"))
            .join("ab")
            .join(&sha);
        assert_eq!(std::fs::read(&kept).unwrap(), b"bytes");
        assert!(!photo.exists());
        store.close();
        drop(store);
        // A later start that sweeps (after a crash) cannot touch them.
        let (store, _) = Store::open(dir.path()).unwrap();
        drop(store);
        assert_eq!(std::fs::read(&kept).unwrap(), b"bytes");
    }

    #[test]
    fn a_log_left_beside_an_empty_database_is_moved_aside_not_deleted() {
        for database in [Some(&b""[..]), None] {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = Store::open(dir.path()).unwrap();
            store.close();
            drop(store);
            let db = dir.path().join(DB_FILE);
            let log = vec![0x37u8; 4120];
            std::fs::write(dir.path().join(format!("{DB_FILE}-wal")), &log).unwrap();
            match database {
                Some(bytes) => std::fs::write(&db, bytes).unwrap(),
                None => std::fs::remove_file(&db).unwrap(),
            }
            let (store, report) = Store::open(dir.path()).unwrap();
            let moved = report.damaged_moved_to.expect("moved aside");
            let kept = PathBuf::from(format!("{}-wal", moved.display()));
            assert_eq!(std::fs::read(&kept).unwrap(), log);
            store.close();
        }
    }

    #[test]
    fn a_database_locked_by_another_process_is_not_taken_for_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.close();
        drop(store);
        let other = Connection::open(dir.path().join(DB_FILE)).unwrap();
        other
            .execute_batch("PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE;")
            .unwrap();
        let Err(e) = Store::open(dir.path()) else {
            panic!("the start fails while the file is locked")
        };
        assert!(matches!(e, StoreError::Open { .. }), "{e:?}");
        drop(other);
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.damaged_moved_to.is_none());
        store.close();
    }

    #[test]
    fn the_database_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.schema_version >= 1);
        store.close();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
