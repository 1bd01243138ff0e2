//! The durable store: one SQLite database in WAL mode with `synchronous=FULL`, written by
//! a single writer thread that commits concurrent captures together (group commit, one
//! fsync for all of them), read through a separate connection, plus the photo files
//! beside it ([`photos`]).
//!
//! Promise 1 lives here: a write's future resolves only after its transaction's COMMIT
//! returned, and SQLite with `synchronous=FULL` in WAL mode fsyncs the log before COMMIT
//! returns.

pub mod photos;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
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
}

impl StoreError {
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
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type RunFn = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

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
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    reader: Mutex<Connection>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub photos: PhotoDir,
    state_dir: PathBuf,
}

pub const DB_FILE: &str = "fieldsync.db";

impl Store {
    /// Opens (or creates) the store in `state_dir`: checks the database, moves a damaged
    /// one aside, migrates, sweeps photo files no row names, and starts the writer.
    pub fn open(state_dir: &Path) -> Result<(Store, OpenReport), StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        check_writable(state_dir)?;
        let db_path = state_dir.join(DB_FILE);
        let mut report = OpenReport::default();
        let conn = match open_checked(&db_path) {
            Ok(conn) => conn,
            Err(problem) => {
                let moved = move_aside(&db_path)?;
                tracing::error!(
                    database = %db_path.display(),
                    moved_to = %moved.display(),
                    problem = %problem,
                    "the database is damaged; it was moved aside and a new one started"
                );
                report.damaged_moved_to = Some(moved);
                open_checked(&db_path).map_err(|e| StoreError::Open {
                    path: db_path.clone(),
                    source: e,
                })?
            }
        };
        let mut conn = conn;
        report.schema_version = schema::migrate(&mut conn)?;
        let photos = PhotoDir::open(&state_dir.join("photos")).map_err(|e| match e {
            PhotoError::Io { path, source } => StoreError::NotWritable { path, source },
            other => StoreError::NotWritable {
                path: state_dir.join("photos"),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        sweep_unreferenced_photos(&conn, &photos)?;

        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: db_path.clone(),
            source,
        })?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;

        let (tx, rx) = mpsc::channel::<Job>();
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|source| StoreError::NotWritable {
                path: state_dir.to_owned(),
                source,
            })?;
        let store = Store {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Some(tx)),
                reader: Mutex::new(reader),
                writer_thread: Mutex::new(Some(writer_thread)),
                photos,
                state_dir: state_dir.to_owned(),
            }),
        };
        Ok((store, report))
    }

    pub fn photos(&self) -> &PhotoDir {
        &self.inner.photos
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
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(e.into()),
                });
            });
            (ok, reply)
        });
        {
            let jobs = self.inner.jobs.lock().map_err(|_| StoreError::Closed)?;
            let sender = jobs.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send(Job { durable, run })
                .map_err(|_| StoreError::Closed)?;
        }
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

    /// Stops the writer after the jobs already queued, so the database is left closed
    /// and checkpointed.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        let handle = self
            .inner
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Whether the writer is still running (the watchdog asks).
    pub fn is_alive(&self) -> bool {
        self.inner
            .writer_thread
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
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
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         PRAGMA foreign_keys=ON;
         PRAGMA temp_store=MEMORY;",
    )
}

/// Opens the database and runs SQLite's quick check; any failure means damaged.
fn open_checked(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    let verdict: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(verdict),
        ));
    }
    Ok(conn)
}

/// Renames the database and its WAL and SHM files to `<name>.damaged-<unix time>`; never
/// deletes them, since they may hold work support can still recover.
fn move_aside(db: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let target = db.with_extension(format!("db.damaged-{stamp}"));
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
    for sha in photos.list().map_err(|e| StoreError::NotWritable {
        path: photos.root().to_owned(),
        source: std::io::Error::other(e.to_string()),
    })? {
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

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    let mut full_sync = true;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A group with nothing durable in it commits without an fsync of its own.
        let durable = batch.iter().any(|j| j.durable);
        if durable != full_sync {
            let mode = if durable { "FULL" } else { "NORMAL" };
            if let Err(e) = conn.pragma_update(None, "synchronous", mode) {
                tracing::error!(error = %e, "cannot switch synchronous mode");
            } else {
                full_sync = durable;
            }
        }
        if durable && !full_sync {
            // Never commit a durable job without FULL: fail the group rather than lie.
            for job in batch {
                let (_, reply) = fail_job(job, &conn);
                reply(Err(StoreError::SyncMode));
            }
            continue;
        }
        run_group(&conn, batch);
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(error = %e, "checkpoint at shutdown failed");
    }
}

fn run_group(conn: &Connection, batch: Vec<Job>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = StoreError::classify(e);
        tracing::error!(error = %e, "cannot begin a write transaction");
        let msg = e.to_string();
        for job in batch {
            // The job still has to answer; run nothing and fail it.
            let (_, reply) = fail_job(job, conn);
            reply(Err(same_kind(&e, &msg)));
        }
        return;
    }
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        if conn.execute_batch("SAVEPOINT job").is_err() {
            let (_, reply) = fail_job(job, conn);
            replies.push((false, reply));
            continue;
        }
        let (ok, reply) = (job.run)(conn);
        let end = if ok {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = end {
            tracing::error!(error = %e, "savepoint failed");
        }
        replies.push((ok, reply));
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            for (_, reply) in replies {
                reply(Ok(()));
            }
        }
        Err(e) => {
            let e = StoreError::classify(e);
            tracing::error!(error = %e, jobs = replies.len(), "commit failed; nothing of this group was stored");
            let _ = conn.execute_batch("ROLLBACK");
            let msg = e.to_string();
            for (_, reply) in replies {
                reply(Err(same_kind(&e, &msg)));
            }
        }
    }
}

/// A job that cannot run still owns its reply channel; running it against a connection
/// with no transaction would write outside the group, so it runs inside a savepoint that
/// is rolled back.
fn fail_job(job: Job, conn: &Connection) -> (bool, Reply) {
    let _ = conn.execute_batch("SAVEPOINT doomed");
    let out = (job.run)(conn);
    let _ = conn.execute_batch("ROLLBACK TO doomed; RELEASE doomed");
    out
}

fn same_kind(e: &StoreError, msg: &str) -> StoreError {
    match e {
        StoreError::Full => StoreError::Full,
        StoreError::ReadOnly => StoreError::ReadOnly,
        _ => StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some(msg.to_owned()),
        )),
    }
}

/// Milliseconds since the Unix epoch, the store's and the protocol's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    #[test]
    fn a_damaged_database_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let junk = vec![0x5au8; 8192];
        std::fs::write(dir.path().join(DB_FILE), &junk).unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        let moved = report.damaged_moved_to.expect("moved aside");
        assert_eq!(std::fs::read(&moved).unwrap(), junk);
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

/// The current schema on a bare connection, for unit tests of the domain rules.
#[cfg(test)]
pub(crate) fn schema_for_tests(conn: &mut Connection) {
    schema::migrate(conn).expect("schema applies to an empty database");
}
