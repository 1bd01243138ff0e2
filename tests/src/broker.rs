//! A real MQTT broker for tests, started in the foreground on a free port in a temporary
//! folder, stopped, killed and restarted on the same port. Mosquitto by default; Aedes
//! (`tests/aedes/`) as a second, independent implementation that keeps nothing across a
//! restart, so the protocol is not tried against one broker's habits only.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Which broker program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Mosquitto with its persistence file: sessions and queued messages survive a
    /// restart.
    Mosquitto,
    /// Aedes in memory: a restart forgets every session, subscription and queued or
    /// retained message.
    Aedes,
}

pub struct Broker {
    pub kind: Kind,
    pub dir: TempDir,
    /// The plain listener (the test back office uses it).
    pub port: u16,
    /// The TLS listener, when started with one.
    pub tls_port: Option<u16>,
    conf: PathBuf,
    tls: Option<TlsListener>,
    /// Aedes only: a topic filter whose subscription the broker refuses.
    refuse_subscription: Option<String>,
    child: Option<Child>,
}

/// TLS material for a listener that requires client certificates.
pub struct TlsListener {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The broker's log, in its folder.
const LOG: &str = "broker.log";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(None)
    }

    pub fn start_with(tls: Option<TlsListener>) -> Broker {
        Broker::start_kind(Kind::Mosquitto, tls)
    }

    pub fn start_kind(kind: Kind, tls: Option<TlsListener>) -> Broker {
        let mut b = Broker::prepare(kind, tls);
        b.spawn();
        b
    }

    /// Mosquitto with `extra` lines in its configuration (a packet limit, say).
    pub fn start_mosquitto_with(extra: &str) -> Broker {
        let mut b = Broker::prepare(Kind::Mosquitto, None);
        let mut conf = std::fs::read_to_string(&b.conf).expect("mosquitto.conf");
        conf.push_str(extra);
        std::fs::write(&b.conf, conf).expect("write mosquitto.conf");
        b.spawn();
        b
    }

    /// Aedes refusing subscriptions to `filter`, as access rules that do not let a
    /// device read there would.
    pub fn start_aedes_refusing(filter: &str) -> Broker {
        let mut b = Broker::prepare(Kind::Aedes, None);
        b.refuse_subscription = Some(filter.to_owned());
        b.spawn();
        b
    }

    /// The folder and the ports, and Mosquitto's configuration when it is Mosquitto.
    fn prepare(kind: Kind, tls: Option<TlsListener>) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-broker")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let mut conf = format!(
            "# Small packets (acknowledgements) go out at once, as on a tuned production broker.\n\
             set_tcp_nodelay true\n\
             listener {port} 127.0.0.1\n\
             persistence true\n\
             persistence_location {}/\n\
             log_dest file {}/{LOG}\n\
             log_type error\nlog_type warning\nlog_type notice\n\
             # Queued messages for a device that is away: far more than a test needs.\n\
             max_queued_messages 1000000\n",
            dir.path().display(),
            dir.path().display(),
        );
        if nix::unistd::geteuid().is_root() {
            // Keep root so the persistence folder (owned by root) stays writable.
            conf.push_str("user root\n");
        }
        conf.push_str("allow_anonymous true\n");
        let tls_port = tls.as_ref().map(|t| {
            let port = free_port();
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ));
            port
        });
        let path = dir.path().join("mosquitto.conf");
        if kind == Kind::Mosquitto {
            std::fs::write(&path, conf).expect("write mosquitto.conf");
        }
        Broker {
            kind,
            dir,
            port,
            tls_port,
            conf: path,
            tls,
            refuse_subscription: None,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let child = match self.kind {
            Kind::Mosquitto => Command::new(crate::system_program("mosquitto"))
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto starts (scripts/install-deps.sh installs it)"),
            Kind::Aedes => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("aedes/broker.js");
                assert!(
                    script.with_file_name("node_modules/aedes").is_dir(),
                    "Aedes is not installed: scripts/install-deps.sh installs it"
                );
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join(LOG))
                    .expect("broker log");
                let mut cmd = Command::new("node");
                cmd.arg(&script).arg(self.port.to_string());
                if let Some(filter) = &self.refuse_subscription {
                    cmd.env("AEDES_REFUSE_SUBSCRIPTION", filter);
                }
                if let (Some(port), Some(t)) = (self.tls_port, &self.tls) {
                    cmd.arg(port.to_string()).args([&t.ca, &t.cert, &t.key]);
                }
                cmd.stdin(Stdio::null())
                    .stdout(log.try_clone().expect("broker log"))
                    .stderr(log)
                    .spawn()
                    .expect("node starts (scripts/install-deps.sh installs it)")
            }
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("{:?} exited with {status}: {}", self.kind, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not listen in 10 s: {}",
                self.kind,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }

    /// SIGKILL: connections drop without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: Mosquitto saves its persistence file and closes connections; Aedes just
    /// goes.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
