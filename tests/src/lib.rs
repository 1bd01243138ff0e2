//! The integration harness: starts the real `fieldsyncd` binary in a temporary folder
//! with its own socket, hands out clients, kills and restarts it, and reads its database
//! directly when a test needs to look behind the socket.

pub mod backoffice;
pub mod broker;
pub mod netmock;
pub mod pki;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use ui_bridge::Client;

/// Work orders every test daemon starts with.
pub const WORK_ORDERS: &str = r#"[
  {"id":"WO-1","version":1,"title":"Pump station","stage":"new",
   "workflow":["new","accepted","on_site","completed"],"scheduled_for":"2026-11-23",
   "checklist":[{"id":"valves","text":"Valves closed","answer":"bool"},
                {"id":"vibration","text":"Vibration mm/s","answer":"number"},
                {"id":"remarks","text":"Remarks","answer":"text"}]},
  {"id":"WO-2","version":1,"title":"Hydrant","stage":"accepted",
   "workflow":["new","accepted","on_site","completed"]}
]"#;

/// Where cargo put the workspace's binaries for the profile these tests were built with.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps")
            .to_owned();
        build_binaries(&dir);
        dir
    })
}

/// Builds `fieldsyncd` and `fieldctl` with the tests' own profile, so a plain
/// `cargo test` never runs a stale daemon.
fn build_binaries(dir: &Path) {
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "fieldsyncd",
        "-p",
        "fieldsync-ui-bridge",
        "--bins",
    ]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building fieldsyncd and fieldctl failed");
}

/// The daemon the harness starts: this tree's, or the one `FIELDSYNC_BIN` names, so that
/// a benchmark can run another build side by side with this one.
pub fn fieldsyncd_bin() -> PathBuf {
    match std::env::var_os("FIELDSYNC_BIN") {
        Some(path) => PathBuf::from(path),
        None => bin_dir().join("fieldsyncd"),
    }
}

pub fn fieldctl_bin() -> PathBuf {
    bin_dir().join("fieldctl")
}

/// A system program by name: from `PATH`, or from the sbin folders where Debian keeps
/// `mosquitto`, `mkfs.ext4` and `debugfs` and which a user's `PATH` leaves out.
pub fn system_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The environment that runs a program under libfaketime with its wall clock read
/// from `file` ("-365d", "+0"), re-read at every call so that a test can set the clock
/// while the program runs. Only the wall clock is faked: timers and the time since boot
/// stay the kernel's, as when NTP sets a real clock.
pub fn faketime_env(file: &Path) -> Vec<(String, String)> {
    let library = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file())
        .expect("libfaketime (scripts/install-deps.sh installs faketime)");
    [
        ("LD_PRELOAD", library.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec()
}

/// A copy of `binary` in `dir` (which the caller opened to others), for a test that runs
/// it as another user: the build folder may sit in a home only its owner can enter.
pub fn copy_for_anyone(binary: &Path, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let name = binary.file_name().expect("a binary's path names a file");
    let copy = dir.join(name);
    std::fs::copy(binary, &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
        .expect("open the copy to others");
    copy
}

/// Runs `cmd` to its end, as `Command::output` does, for a binary [`copy_for_anyone`]
/// has just written: while the copy was open for writing, another test thread may have
/// forked, and until that child execs it holds the copy open, so that exec fails with
/// "text file busy" for a moment.
pub fn output_of_fresh_copy(cmd: &mut Command) -> std::process::Output {
    let mut tries = 0;
    loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.expect("the copied binary runs"),
        }
    }
}

/// Options for a test daemon.
#[derive(Clone, Debug)]
pub struct Options {
    /// Extra TOML appended to the generated config (sections may repeat keys' sections
    /// only once, so use keys of `[store]` and `[ui]` through the fields below).
    pub store: String,
    pub ui: String,
    pub work_orders: String,
    /// The `[uplink]` section's keys; empty: no broker.
    pub uplink: String,
    /// The `[sync]` section's keys. The default leaves NetworkManager alone, so that a
    /// test does not depend on the machine's own network.
    pub sync: String,
    /// Extra environment for the daemon (`DBUS_SYSTEM_BUS_ADDRESS` of a test bus).
    pub env: Vec<(String, String)>,
    /// Runs the daemon under a systemd-like watchdog of this period: `WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` naming the daemon itself (a shell exports its own pid, then execs).
    pub watchdog_usec: Option<u64>,
    /// How the UI socket reaches the daemon.
    pub launch: Launch,
}

/// How the daemon gets its UI socket.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Launch {
    /// It binds the configured path itself.
    #[default]
    Binds,
    /// systemd's `systemd-socket-activate` listens on [`Daemon::socket`] and starts the
    /// daemon on the first connection, passing the socket by `LISTEN_FDS`; the config
    /// names another path, which the daemon must then leave alone.
    Activated,
    /// The same with a datagram socket, which the daemon must refuse.
    ActivatedDatagram,
    /// `LISTEN_FDS=1` names descriptor 3, opened on this file: a leaked variable.
    StrayListenFds(PathBuf),
}

/// The path the config names when the socket comes from systemd.
pub const UNUSED_SOCKET: &str = "bound-by-daemon.sock";

impl Default for Options {
    fn default() -> Self {
        Options {
            store: "min_free_bytes = 0\n".into(),
            ui: String::new(),
            work_orders: WORK_ORDERS.into(),
            uplink: String::new(),
            sync: "network_manager = false\n".into(),
            env: Vec::new(),
            watchdog_usec: None,
            launch: Launch::Binds,
        }
    }
}

/// A running `fieldsyncd` with its own state folder and socket.
pub struct Daemon {
    pub dir: TempDir,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    watchdog_usec: Option<u64>,
    launch: Launch,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Daemon {
        let mut d = Daemon::configured(options);
        d.spawn();
        d
    }

    /// Writes the state folder's config without starting anything: for a start that is
    /// expected to fail ([`Daemon::run_until_exit`]).
    pub fn configured(options: Options) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-test")
            .tempdir()
            .expect("temp dir");
        let state_dir = dir.path().join("state");
        let socket = dir.path().join("ui.sock");
        let config = dir.path().join("fieldsyncd.toml");
        let configured = match options.launch {
            Launch::Binds => "ui.sock",
            _ => UNUSED_SOCKET,
        };
        std::fs::write(dir.path().join("work-orders.json"), &options.work_orders)
            .expect("write work orders");
        std::fs::write(
            &config,
            format!(
                "[store]\nstate_dir = \"state\"\n{}\n[ui]\nsocket = \"{configured}\"\n{}\n[log]\nlevel = \"info\"\nformat = \"text\"\n[dev]\nseed_work_orders = \"work-orders.json\"\n[uplink]\n{}\n[sync]\n{}\n",
                options.store, options.ui, options.uplink, options.sync
            ),
        )
        .expect("write config");
        Daemon {
            dir,
            state_dir,
            socket,
            config,
            env: options.env,
            watchdog_usec: options.watchdog_usec,
            launch: options.launch,
            child: None,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("fieldsyncd.log")
    }

    /// The daemon's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the binary and waits until its socket answers.
    pub fn spawn(&mut self) {
        self.start_process();
        self.wait_ready();
    }

    /// Starts the binary and waits for it to exit by itself; returns its exit code.
    pub fn run_until_exit(&mut self) -> Option<i32> {
        self.start_process();
        let mut child = self.child.take().expect("started");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("fieldsyncd did not exit by itself:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start_process(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut command = match (self.watchdog_usec, &self.launch) {
            (None, Launch::Binds) => Command::new(fieldsyncd_bin()),
            (None, Launch::Activated | Launch::ActivatedDatagram) => {
                let _ = std::fs::remove_file(&self.socket);
                let mut activate = Command::new(system_program("systemd-socket-activate"));
                if self.launch == Launch::ActivatedDatagram {
                    activate.arg("--datagram");
                }
                // It passes on only the environment it is told to.
                activate.arg("--listen").arg(&self.socket);
                for (key, _) in &self.env {
                    activate.arg(format!("--setenv={key}"));
                }
                activate.arg(fieldsyncd_bin());
                activate
            }
            (None, Launch::StrayListenFds(file)) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg("export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" \"$@\" 3<>\"$FIELDSYNC_STRAY\"")
                    .arg(fieldsyncd_bin())
                    .env("FIELDSYNC_STRAY", file);
                sh
            }
            (Some(usec), launch) => {
                assert_eq!(
                    *launch,
                    Launch::Binds,
                    "a watchdog run binds its own socket"
                );
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg("export WATCHDOG_PID=$$; exec \"$0\" \"$@\"")
                    .arg(fieldsyncd_bin())
                    .env("WATCHDOG_USEC", usec.to_string());
                sh
            }
        };
        if self.watchdog_usec.is_none() {
            command
                .env_remove("WATCHDOG_USEC")
                .env_remove("WATCHDOG_PID");
        }
        let child = command
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("fieldsyncd starts");
        self.child = Some(child);
        if self.launch == Launch::ActivatedDatagram {
            // The daemon is started by the first datagram.
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.send_to(b"wake", &self.socket))
                .is_err()
            {
                assert!(Instant::now() < deadline, "no datagram socket to wake");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // An activated daemon's socket answers before the daemon runs: the first
            // connection is what starts it.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && (self.launch != Launch::Activated || self.log().contains("fieldsyncd ready"))
            {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "fieldsyncd exited with {status} before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "fieldsyncd not ready in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .expect("connect to fieldsyncd")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "fieldsyncd did not stop within 15 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A read-only look at the database, as the daemon left it.
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_with_flags(
            self.state_dir.join("fieldsync.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .expect("open database");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn
    }

    /// Counts of rows in the tables the UI changes, to show that a refused request left
    /// everything as it was.
    pub fn snapshot(&self) -> (i64, i64, i64, i64) {
        let db = self.db();
        let count = |t: &str| -> i64 {
            db.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .expect("count")
        };
        (
            count("items"),
            count("captures"),
            count("outbox"),
            count("work_orders"),
        )
    }

    /// Whether a captured item is on disk, folded or still in the capture journal.
    pub fn item_stored(db: &rusqlite::Connection, id: &str) -> bool {
        db.query_row(
            "SELECT (SELECT count(*) FROM items WHERE id = ?1) + (SELECT count(*) FROM captures WHERE item_id = ?1)",
            [id],
            |r| r.get::<_, i64>(0),
        )
        .expect("look up item")
            == 1
    }

    /// Marks every operation delivered, the way the back office's acknowledgements will.
    pub async fn deliver_everything(&self) {
        // Reading the outbox folds the capture journal first.
        self.client().await.outbox(None).await.expect("outbox");
        let db = self.db();
        db.execute_batch(
            "BEGIN;
             UPDATE items SET sync_state = 'delivered', sent = 1;
             DELETE FROM outbox;
             COMMIT;",
        )
        .expect("mark delivered");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The SHA-256 of bytes, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A photo-like file of `size` random bytes in `dir`.
pub fn photo_file(dir: &Path, name: &str, size: usize) -> (PathBuf, Vec<u8>) {
    use rand::RngCore;
    let mut bytes = vec![0u8; size];
    rand::rng().fill_bytes(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write photo");
    (path, bytes)
}

/// CPU time (user + system) a process has used so far; `pid` is a number or `self`.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name may hold spaces; the fields after its ')' are fixed.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}
