//! The aarch64 build on a whole emulated handheld: Debian's arm64 kernel under
//! `qemu-system-aarch64`, the store on an ext4 virtio disk, the daemon and `fieldctl`
//! driven by the guest's scenarios in `tests/qemu/` and reporting over the serial console.
//! The back office is the host's: a private Mosquitto and the test back office
//! (`src/backoffice.rs`), which the guest reaches through QEMU's user network at 10.0.2.2.
//!
//! - capture: with the broker down, every kind of capture and a photo, a SIGTERM restart,
//!   nothing missing; then the host starts the broker and everything reaches the back
//!   office once, in order, the photo verified; then three refusals, seen by the device
//!   with their reasons: one fixed by an edit (the change after it on the same work order
//!   held back meanwhile, the other work order going on), one discarded, one retried.
//! - power: the host pulls the plug (SIGKILL of QEMU) at a random moment of a capture
//!   loop that the daemon is delivering as it goes, then boots again on the same disk:
//!   every acknowledged capture and photo is there and SQLite's integrity check passes on
//!   the database exactly as the cut left it; then the daemon drains, and the back office
//!   has applied every acknowledged capture exactly once, the notes in the order taken.
//!   `FIELDSYNC_POWER_CYCLES` sets the number of cuts (default 3; the full run is 20).
//! - footprint: a store the host filled through the x86_64 daemon, copied onto the disk;
//!   the stripped binary's size, idle memory and start time on it.
//!   `FIELDSYNC_FOOTPRINT_RECORDS` (default 20,000) and `FIELDSYNC_FOOTPRINT_WAITING`
//!   (default a tenth of them) set its size; the figures in docs/benchmarks.md come from
//!   100,000 and 10,000.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use fieldsync_tests::backoffice::{Applied, BackOffice, RefusePolicy};
use fieldsync_tests::broker::Broker;
use fieldsync_tests::Daemon;
use rand::Rng;
use serde_json::Value;
use tempfile::TempDir;
use ui_bridge::RecordBody;

/// Emulated, a boot takes a few seconds and the longest scenario well under a minute; a
/// busy machine may need many more. Longer than the guest's own waits (60 and 90 s), so
/// that a guest that gives up reports why before the host does.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest's `uplink.device_id` (tests/qemu/init).
const DEVICE: &str = "vm-handheld";
/// The device's budget, as promised in docs/benchmarks.md.
const MAX_BINARY_BYTES: u64 = 8 * 1024 * 1024;
const MAX_IDLE_RSS_KIB: u64 = 8 * 1024;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed with {}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The guest's kernel and initramfs, and the device build they carry.
struct Images {
    kernel: PathBuf,
    initrd: PathBuf,
    fieldsyncd: PathBuf,
}

/// Installs QEMU, qemu-img and e2fsprogs once per run of this test binary, before the
/// first disk is made (a no-op when nothing is missing).
fn tools() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        run(&mut Command::new(
            repo().join("scripts/install-qemu-deps.sh"),
        ))
    });
}

/// Cross-builds the daemon and assembles the initramfs, once per run of this test
/// binary; both scripts are no-ops when nothing changed.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        tools();
        run(Command::new(repo().join("scripts/build-aarch64.sh")).arg("--aarch64-only"));
        let bin = repo().join("target/aarch64/aarch64-unknown-linux-gnu/device");
        let out = output(
            Command::new(repo().join("tests/qemu/build-initramfs.sh"))
                .arg(bin.join("fieldsyncd"))
                .arg(bin.join("fieldctl")),
        );
        let path = |key: &str| -> PathBuf {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("build-initramfs.sh printed no {key}=:\n{out}"))
                .into()
        };
        Images {
            kernel: path("kernel"),
            initrd: path("initrd"),
            fieldsyncd: bin.join("fieldsyncd"),
        }
    })
}

/// One VM at a time: emulation takes every core, and the timings this suite reports
/// mean something only on a quiet machine.
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The store disk: a fresh raw ext4 image in a temporary folder.
struct Disk {
    dir: TempDir,
    path: PathBuf,
}

impl Disk {
    /// An empty file system, or one holding `contents`' files.
    fn new(size_mib: u64, contents: Option<&Path>) -> Disk {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-vm")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("store.img");
        tools();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&path)
            .arg(format!("{size_mib}M")));
        let mut mkfs = Command::new(fieldsync_tests::system_program("mkfs.ext4"));
        mkfs.args(["-q", "-F", "-L", "fieldsync"]);
        if let Some(root) = contents {
            mkfs.arg("-d").arg(root);
        }
        run(mkfs.arg(&path));
        Disk { dir, path }
    }

    /// Copies a file out of the image, or returns `None` when it is not there. Only for a
    /// cleanly unmounted image: debugfs does not replay the journal.
    fn read(&self, guest_path: &str) -> Option<PathBuf> {
        let out = self.dir.path().join("out");
        std::fs::create_dir_all(&out).expect("out dir");
        let dest = out.join(guest_path.trim_start_matches('/').replace('/', "_"));
        let _ = std::fs::remove_file(&dest);
        let result = Command::new(fieldsync_tests::system_program("debugfs"))
            .arg("-R")
            .arg(format!("dump -p {guest_path} {}", dest.display()))
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("debugfs runs");
        assert!(result.success(), "debugfs failed on {guest_path}");
        dest.exists().then_some(dest)
    }
}

/// One line of the guest's report (see tests/qemu/scenarios/lib.sh).
#[derive(Clone, Debug, PartialEq)]
enum Line {
    Report(String, String),
    Ack(String),
    Photo(String, String),
    Log(String),
    Fail(String),
    Done,
}

impl Line {
    fn parse(raw: &str) -> Option<Line> {
        let at = raw.find("FIELDSYNC-")?;
        let (tag, rest) = raw[at..].split_once(' ').unwrap_or((&raw[at..], ""));
        let rest = rest.trim_end();
        Some(match tag {
            "FIELDSYNC-REPORT" => {
                let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
                Line::Report(key.into(), value.into())
            }
            // A line the console mangled must not count as an acknowledgement of an id
            // that was never given.
            "FIELDSYNC-ACK" if is_uuid(rest) => Line::Ack(rest.into()),
            "FIELDSYNC-PHOTO" => {
                let (id, sha) = rest.split_once(' ')?;
                if !is_uuid(id) || sha.len() != 64 {
                    return None;
                }
                Line::Photo(id.into(), sha.into())
            }
            "FIELDSYNC-LOG" => Line::Log(rest.into()),
            "FIELDSYNC-FAIL" => Line::Fail(rest.into()),
            "FIELDSYNC-DONE" => Line::Done,
            _ => return None,
        })
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// A running VM, its console read line by line on a thread. Dropped, it is powered off.
struct Vm {
    child: Child,
    lines: Receiver<Line>,
    /// The lines `next` returned, so that the final report holds the whole run.
    seen: Vec<Line>,
    console: std::sync::Arc<Mutex<String>>,
    started: Instant,
    scenario: String,
}

/// The broker as the guest reaches it: QEMU's user network maps 10.0.2.2 to the host's
/// loopback, where the test broker listens.
fn guest_broker_url(broker: &Broker) -> String {
    format!("mqtt://10.0.2.2:{}", broker.port)
}

impl Vm {
    fn boot(disk: &Disk, scenario: &str, args: &[(&str, String)]) -> Vm {
        let images = images();
        let mut append = format!("console=ttyAMA0 panic=-1 quiet fieldsync.scenario={scenario}");
        for (k, v) in args {
            append.push_str(&format!(" fieldsync.{k}={v}"));
        }
        let mut child = Command::new("qemu-system-aarch64")
            .args(["-M", "virt", "-cpu", "cortex-a57", "-smp", "2", "-m", "512"])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initrd)
            .arg("-append")
            .arg(append)
            // cache=none: the guest's fsync reaches the image file, as it would the flash.
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=none",
                disk.path.display()
            ))
            .args(["-netdev", "user,id=n"])
            // No option ROM: the kernel is booted directly, and none is installed.
            .args(["-device", "virtio-net-pci,netdev=n,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-aarch64 starts");
        let console = std::sync::Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let log = console.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdout.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf);
                log.lock().unwrap().push_str(&text);
                // A line cut short by the power cut is not a line.
                if !buf.ends_with(b"\n") {
                    return;
                }
                if let Some(line) = Line::parse(text.trim_end_matches(['\r', '\n'])) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let log = console.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            log.lock().unwrap().push_str(&s);
        });
        Vm {
            child,
            lines,
            seen: Vec::new(),
            console,
            started: Instant::now(),
            scenario: scenario.into(),
        }
    }

    /// The next report line, or `None` once the console closed.
    fn next(&mut self) -> Option<Line> {
        let left = SCENARIO_TIMEOUT.saturating_sub(self.started.elapsed());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                panic!(
                    "scenario {} did not finish within {SCENARIO_TIMEOUT:?}:\n{}",
                    self.scenario,
                    self.console()
                );
            }
        }
    }

    /// Waits for the guest's report `key` and returns its value: the host's cue to act
    /// in the middle of a scenario. Panics with the console when the guest fails or
    /// powers off first.
    fn wait_for(&mut self, key: &str) -> String {
        loop {
            match self.next() {
                Some(Line::Report(k, v)) if k == key => return v,
                Some(Line::Fail(reason)) => self.failed(&reason),
                Some(_) => {}
                None => panic!(
                    "scenario {} ended before it reported `{key}`:\n{}",
                    self.scenario,
                    self.console()
                ),
            }
        }
    }

    /// The guest reported a failure: panics with its console, once the daemon's log that
    /// follows the failure has arrived (the guest then powers off).
    fn failed(&mut self, reason: &str) -> ! {
        while self.next().is_some() {}
        panic!(
            "scenario {} failed in the guest: {reason}\n{}",
            self.scenario,
            self.console()
        );
    }

    fn console(&self) -> String {
        let text = self.console.lock().unwrap().clone();
        // The tail is what explains a failure; a report can run to megabytes.
        let start = text.len().saturating_sub(20_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }

    /// A hard power-off: the guest gets no chance to flush or unmount anything.
    fn power_cut(&mut self) -> Vec<Line> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // What the guest printed before the cut still counts.
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            rest.push(line);
        }
        rest
    }

    /// Waits for the scenario to finish and the VM to power off, and returns its report
    /// (every line of the run, those `next` already returned included).
    fn finish(mut self) -> Report {
        while self.next().is_some() {}
        let status = self.child.wait().expect("qemu exits");
        let report = Report {
            lines: std::mem::take(&mut self.seen),
            console: self.console(),
            wall: self.started.elapsed(),
        };
        if let Some(reason) = report.failure() {
            panic!(
                "scenario {} failed in the guest: {reason}\n{}",
                self.scenario, report.console
            );
        }
        assert!(
            report.lines.contains(&Line::Done),
            "scenario {} ended without finishing (qemu: {status}):\n{}",
            self.scenario,
            report.console
        );
        assert!(status.success(), "qemu exited with {status}");
        report
    }
}

impl Drop for Vm {
    /// A test that panics mid-scenario leaves no emulator running behind it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Report {
    lines: Vec<Line>,
    console: String,
    wall: Duration,
}

impl Report {
    fn failure(&self) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Fail(r) => Some(r.as_str()),
            _ => None,
        })
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Report(k, v) if k == key => Some(v.as_str()),
                _ => None,
            })
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key).as_slice() {
            [v] => v,
            other => panic!(
                "expected one `{key}` report, got {}:\n{}",
                other.len(),
                self.console
            ),
        }
    }

    fn json(&self, key: &str) -> Value {
        serde_json::from_str(self.one(key))
            .unwrap_or_else(|e| panic!("`{key}` is not JSON ({e}): {}", self.one(key)))
    }

    /// `a=1 b=2` fields of the reports named `key`, in order.
    fn fields(&self, key: &str) -> Vec<HashMap<String, String>> {
        self.all(key)
            .into_iter()
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .collect()
    }

    fn number(fields: &HashMap<String, String>, key: &str) -> u64 {
        fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
    }
}

fn ids(items: &Value) -> HashSet<String> {
    items
        .as_array()
        .expect("a list")
        .iter()
        .map(|i| i["id"].as_str().expect("an id").to_owned())
        .collect()
}

/// The back office's judgement in the capture scenario. By content rather than on a cue
/// from the host, so that the guest needs no handshake to capture what gets refused: a
/// material the catalogue does not know (the inspector fixes the record), a defect another
/// inspector already reported (discarded), and WO-7001's move to on_site the first time
/// only, while the dispatcher held the work order (retried as it was).
fn refusals() -> RefusePolicy {
    let locked = AtomicBool::new(true);
    Box::new(move |a: &Applied| {
        let materials = a.body["materials"].as_array();
        if materials.is_some_and(|m| m.iter().any(|m| m["name"] == "seal kit XL")) {
            return Some(("validation".into(), "unknown material: seal kit XL".into()));
        }
        if a.kind == "defect" && a.body["title"] == "Leaking seal on V-12" {
            return Some((
                "conflict".into(),
                "already reported as D-88 by another inspector".into(),
            ));
        }
        if a.kind == "stage" && a.body["to"] == "on_site" && locked.swap(false, Ordering::SeqCst) {
            return Some((
                "conflict".into(),
                "WO-7001 is locked by the dispatcher; try again".into(),
            ));
        }
        None
    })
}

/// An item of a `fieldctl --json work-order` report, by id.
fn item<'a>(work_order: &'a Value, id: &str) -> &'a Value {
    work_order["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("item {id} is not in {work_order}"))
}

#[test]
fn offline_captures_survive_a_restart_then_reach_the_back_office_once() {
    // The images first: building them may take minutes, and the VM slot is held from here.
    images();
    let vm_slot = one_vm_at_a_time();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut broker = Broker::start();
    let bo = rt.block_on(BackOffice::start(broker.port));
    bo.set_refuse(Some(refusals()));
    // The handheld starts out of reach of its broker: it captures and restarts offline.
    // SIGTERM, so that Mosquitto keeps the back office's session for its return.
    broker.stop();

    let disk = Disk::new(256, None);
    let mut vm = Vm::boot(&disk, "capture", &[("broker", guest_broker_url(&broker))]);
    vm.wait_for("waiting-for-broker");
    assert!(bo.applied().is_empty(), "nothing can have arrived yet");
    let link_back = Instant::now();
    broker.spawn();
    let report = vm.finish();
    drop(vm_slot);
    let console = &report.console;

    let boot = &report.fields("boot")[0];
    eprintln!(
        "capture scenario: userspace at {} s of guest uptime, {:.1} s wall in all, of which \
         {:.1} s from the broker's return to the end; {} operations applied, {} repeats",
        boot["uptime_s"],
        report.wall.as_secs_f64(),
        link_back.elapsed().as_secs_f64(),
        bo.applied().len(),
        bo.state.lock().unwrap().duplicates
    );

    // Offline: every kind of capture, stored and waiting.
    let items: Vec<Value> = report
        .all("item")
        .iter()
        .map(|v| serde_json::from_str(v).expect("item JSON"))
        .collect();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "note",
            "defect",
            "completed_work",
            "checklist",
            "photo",
            "stage"
        ]
    );
    assert!(items.iter().all(|i| i["state"] == "waiting"), "{items:?}");
    let id = |i: &Value| i["id"].as_str().expect("an id").to_owned();
    let captured: HashSet<String> = items.iter().map(id).collect();

    let work = &items[2]["body"];
    assert_eq!(work["materials"][0]["name"], "gasket DN100");
    assert_eq!(work["materials"][1]["quantity"], 8.0);
    assert_eq!(items[3]["body"]["answers"][1]["value"], 4.2);
    let photo = &items[4];
    let sha = report.one("photo-sha256");
    assert_eq!(photo["body"]["sha256"], sha);
    assert_eq!(photo["body"]["size"], 300 * 1024);
    assert_eq!(photo["record_id"], items[1]["id"], "attached to the defect");
    assert_eq!(report.one("photo-file"), sha, "the stored photo's bytes");

    let before = report.json("status-before");
    let after = report.json("status-after");
    for status in [&before, &after] {
        assert_eq!(status["unsent"], 6);
        let session = status["broker"].as_str().unwrap();
        assert!(
            ["down", "connecting"].contains(&session),
            "the broker is down, yet the session is {session}"
        );
    }
    assert!(after["damaged_store"].is_null());

    let stops = report.fields("stopped");
    assert_eq!(stops.len(), 2);
    assert!(stops.iter().all(|s| s["exit"] == "0"), "{stops:?}");
    let ready = report.fields("ready");
    assert_eq!(Report::number(&ready[1], "unsent"), 6);

    let wo = report.json("work-order-after");
    assert_eq!(wo["stage"], "accepted");
    assert_eq!(ids(&wo["items"]), captured);
    let outbox = report.json("outbox-after");
    let waiting: HashSet<String> = outbox
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["item_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(waiting, captured);

    // The link back: everything delivered, acknowledged by the back office.
    let delivered = report.json("status-delivered");
    assert_eq!(delivered["unsent"], 0);
    assert_eq!(delivered["broker"], "up");
    assert!(delivered["last_upload_ms"].is_number(), "{delivered}");

    // The refusals, as the device showed them.
    let [work, held, other, duplicate, stage] =
        ["work", "held", "other", "duplicate", "stage"].map(|k| id(&report.json(k)));
    let refused = |key: &str, id: &str, why: &str| {
        let wo = report.json(key);
        let i = item(&wo, id);
        assert_eq!(i["state"], "refused", "{key}: {i}");
        let reason = i["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{key}: the reason is {reason:?}");
        wo
    };
    let wo = refused(
        "wo-7002-refused-work",
        &work,
        "unknown material: seal kit XL",
    );
    assert_ne!(
        item(&wo, &held)["state"],
        "delivered",
        "held back behind the refusal"
    );
    refused(
        "wo-7002-refused-defect",
        &duplicate,
        "already reported as D-88",
    );
    let wo = refused("wo-7001-refused-stage", &stage, "locked by the dispatcher");
    // Refused, the move stays made on the device until it is retried or discarded.
    assert_eq!(wo["stage"], "on_site");
    assert_eq!(
        report.one("discarded"),
        "null",
        "a refused creation discarded is gone"
    );
    assert_eq!(report.json("retried")["state"], "waiting");

    // And in the end, all of it delivered.
    assert_eq!(report.json("status-final")["unsent"], 0);
    let wo_7001 = report.json("wo-7001-final");
    let wo_7002 = report.json("wo-7002-final");
    assert_eq!(wo_7001["stage"], "on_site");
    let mut on_7001 = captured.clone();
    on_7001.extend([other.clone(), stage.clone()]);
    assert_eq!(ids(&wo_7001["items"]), on_7001);
    assert_eq!(
        ids(&wo_7002["items"]),
        HashSet::from([work.clone(), held.clone()]),
        "the discarded defect is gone"
    );
    for wo in [&wo_7001, &wo_7002] {
        for i in wo["items"].as_array().unwrap() {
            assert_eq!(i["state"], "delivered", "{i}");
        }
    }
    assert_eq!(
        item(&wo_7002, &work)["body"]["materials"][0]["name"],
        "seal kit V12"
    );

    // The back office's side: each change applied once, per work order in the order
    // made, the photo after its record and its bytes verified; the refused creation
    // fixed by the edit applied with its new content, the discarded one never.
    let applied = bo.applied();
    let st = bo.state.lock().unwrap();
    let summary = format!(
        "applied {:?}\nrefused {:?}, {} repeats\n{console}",
        applied
            .iter()
            .map(|a| format!("{} {} {}", a.wo, a.kind, a.item))
            .collect::<Vec<_>>(),
        st.refused,
        st.duplicates
    );
    assert!(
        applied
            .iter()
            .all(|a| a.device == DEVICE && a.act == "create"),
        "{summary}"
    );
    let mut times: HashMap<&str, usize> = HashMap::new();
    for a in &applied {
        *times.entry(a.item.as_str()).or_default() += 1;
    }
    let mut expected: HashSet<String> = on_7001.clone();
    expected.extend([work.clone(), held.clone()]);
    assert_eq!(
        times.keys().map(|k| k.to_string()).collect::<HashSet<_>>(),
        expected,
        "{summary}"
    );
    assert!(times.values().all(|&n| n == 1), "applied twice: {summary}");
    let order = |wo: &str| -> Vec<&str> {
        applied
            .iter()
            .filter(|a| a.wo == wo && a.kind != "photo")
            .map(|a| a.item.as_str())
            .collect()
    };
    let records_7001: Vec<String> = items
        .iter()
        .filter(|i| i["kind"] != "photo")
        .map(id)
        .chain([other.clone(), stage.clone()])
        .collect();
    assert_eq!(order("WO-7001"), records_7001, "{summary}");
    assert_eq!(
        order("WO-7002"),
        [work.as_str(), held.as_str()],
        "{summary}"
    );
    let at = |item: &str| applied.iter().position(|a| a.item == item).unwrap();
    let (photo_id, defect_id) = (id(photo), id(&items[1]));
    assert!(
        at(&photo_id) > at(&defect_id),
        "photo before its record: {summary}"
    );
    assert!(
        at(&other) < at(&work),
        "WO-7001 waited for WO-7002: {summary}"
    );
    let photo_op = &applied[at(&photo_id)];
    assert_eq!(photo_op.body["sha256"], sha);
    let rx = st.photos.get(sha).expect("the photo's bytes arrived");
    assert!(rx.complete && rx.data.len() == 300 * 1024, "{summary}");
    let fixed = &applied[at(&work)];
    assert_eq!(fixed.body["materials"][0]["name"], "seal kit V12");
    // The fixed and the retried changes were applied, under new ids (a refused id never
    // comes again); the discarded one never.
    assert_eq!(st.refused.len(), 3, "{summary}");
    for op in [fixed, &applied[at(&stage)]] {
        assert!(st.refused_items.contains(&op.item), "{summary}");
        assert!(!st.refused.contains(&op.id), "{summary}");
    }
    drop(st);

    // The host's view of the cleanly unmounted disk agrees.
    let db = disk
        .read("/state/fieldsync.db")
        .expect("the database is on the disk");
    let db = rusqlite::Connection::open(db).expect("open the guest's database");
    for id in &expected {
        assert!(Daemon::item_stored(&db, id), "{id} is not in the database");
    }
    let unsent: i64 = db
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(unsent, 0, "the outbox is empty on the disk");
}

/// What the guest acknowledged before the cuts so far.
#[derive(Default)]
struct Acked {
    records: Vec<String>,
    /// item id -> sha256
    photos: Vec<(String, String)>,
}

#[test]
fn a_power_cut_loses_nothing_acknowledged() {
    let cycles: usize = std::env::var("FIELDSYNC_POWER_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let disk = Disk::new(256, None);
    let mut acked = Acked::default();
    let _vm = one_vm_at_a_time();
    // The back office stays reachable throughout: the daemon delivers while it captures,
    // so a cut may fall between a send and its acknowledgement, and each verifying boot
    // drains what the cut left.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let broker = Broker::start();
    let bo = rt.block_on(BackOffice::start(broker.port));
    let url = guest_broker_url(&broker);
    for cycle in 0..cycles {
        let mut vm = Vm::boot(
            &disk,
            "power",
            &[("cycle", cycle.to_string()), ("broker", url.clone())],
        );
        // Somewhere in the middle of the capture loop: after a few acknowledgements, and
        // then anywhere inside the next capture or few.
        let acks_before_cut = rand::rng().random_range(3..=30);
        let mut acks = 0;
        let take = |line: Line, acked: &mut Acked| match line {
            Line::Ack(id) => {
                acked.records.push(id);
                1
            }
            Line::Photo(id, sha) => {
                acked.photos.push((id, sha));
                1
            }
            _ => 0,
        };
        while acks < acks_before_cut {
            match vm.next() {
                Some(Line::Fail(reason)) => vm.failed(&format!("cycle {cycle}: {reason}")),
                Some(line) => acks += take(line, &mut acked),
                None => panic!(
                    "cycle {cycle}: the VM stopped before the cut:\n{}",
                    vm.console()
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(rand::rng().random_range(0..400)));
        for line in vm.power_cut() {
            if let Line::Fail(reason) = &line {
                panic!(
                    "cycle {cycle}: the guest failed: {reason}\n{}",
                    vm.console()
                );
            }
            acks += take(line, &mut acked);
        }

        let report = Vm::boot(&disk, "verify", &[("broker", url.clone())]).finish();
        verify_after_cut(&disk, &report, &acked, cycle);
        verify_delivered(&bo, &report, &acked, cycle);
        eprintln!(
            "power cut {}: {acks} captures acknowledged this time, {} records and {} photos in all, none lost; \
             {} applied by the back office, {} repeats ignored",
            cycle + 1,
            acked.records.len(),
            acked.photos.len(),
            bo.applied().len(),
            bo.state.lock().unwrap().duplicates,
        );
    }
}

/// After the verifying boot drained the outbox: the back office applied every
/// acknowledged capture exactly once, the notes in the order they were taken, each photo
/// after its bytes were verified, and nothing the device does not hold (nothing left the
/// device before it was durable).
fn verify_delivered(bo: &BackOffice, report: &Report, acked: &Acked, cycle: usize) {
    let console = &report.console;
    let drained = report.json("status-drained");
    assert_eq!(drained["unsent"], 0, "cycle {cycle}: {drained}");
    let applied = bo.applied();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for a in &applied {
        *times.entry(a.item.as_str()).or_default() += 1;
    }
    for id in acked
        .records
        .iter()
        .chain(acked.photos.iter().map(|(id, _)| id))
    {
        let n = times.get(id.as_str()).copied().unwrap_or(0);
        assert_eq!(
            n, 1,
            "cycle {cycle}: acknowledged capture {id} applied {n} times\n{console}"
        );
    }
    // Captures the cut interrupted before their acknowledgement may have been saved and
    // delivered too, once, and only if the device kept them.
    let on_device = ids(&report.json("work-order")["items"]);
    for a in &applied {
        assert_eq!(a.device, DEVICE);
        assert_eq!(
            times[a.item.as_str()],
            1,
            "cycle {cycle}: {} applied twice\n{console}",
            a.item
        );
        assert!(
            on_device.contains(&a.item),
            "cycle {cycle}: {} reached the back office but is not on the device\n{console}",
            a.item
        );
    }
    let records: HashSet<&str> = acked.records.iter().map(String::as_str).collect();
    let order: Vec<&str> = applied
        .iter()
        .map(|a| a.item.as_str())
        .filter(|item| records.contains(item))
        .collect();
    assert!(
        order == acked.records,
        "cycle {cycle}: the notes were applied out of the order taken\n{console}"
    );
    let st = bo.state.lock().unwrap();
    for (id, sha) in &acked.photos {
        let op = applied.iter().find(|a| &a.item == id).unwrap();
        assert_eq!(op.body["sha256"], sha.as_str(), "cycle {cycle}: photo {id}");
        assert!(
            st.photos.get(sha).is_some_and(|p| p.complete),
            "cycle {cycle}: the bytes of photo {id} were not verified"
        );
    }
}

fn verify_after_cut(disk: &Disk, report: &Report, acked: &Acked, cycle: usize) {
    // The database exactly as the cut left it, before the daemon recovered anything.
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("fieldsync.db");
    let copied = disk
        .read("/after-cut/fieldsync.db")
        .expect("the guest copied the database");
    std::fs::copy(copied, &db_path).unwrap();
    if let Some(wal) = disk.read("/after-cut/fieldsync.db-wal") {
        std::fs::copy(wal, dir.path().join("fieldsync.db-wal")).unwrap();
    }
    let db = rusqlite::Connection::open(&db_path).expect("open the database");
    let verdict: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok", "cycle {cycle}: the database is damaged");
    for id in &acked.records {
        assert!(
            Daemon::item_stored(&db, id),
            "cycle {cycle}: acknowledged record {id} lost"
        );
    }
    for (id, sha) in &acked.photos {
        let stored: String = db
            .query_row("SELECT photo_sha256 FROM items WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged photo {id} lost: {e}"));
        assert_eq!(&stored, sha);
    }

    // And the daemon's own view after it recovered on the device.
    let status = report.json("status");
    assert!(
        status["damaged_store"].is_null(),
        "cycle {cycle}: the daemon set the store aside: {status}"
    );
    let listed = ids(&report.json("work-order")["items"]);
    for id in acked
        .records
        .iter()
        .chain(acked.photos.iter().map(|(id, _)| id))
    {
        assert!(
            listed.contains(id),
            "cycle {cycle}: {id} not listed after the cut"
        );
    }
    let files: HashMap<&str, &str> = report
        .all("photo-file")
        .into_iter()
        .filter_map(|v| v.split_once(' '))
        .collect();
    for (id, sha) in &acked.photos {
        assert_eq!(
            files.get(sha.as_str()).copied(),
            Some(sha.as_str()),
            "cycle {cycle}: the file of photo {id} is missing or damaged"
        );
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Fills a store through the x86_64 daemon: `records` notes, all but `waiting` of them
/// delivered. SQLite's files are the same on every architecture.
fn fill_store(records: usize, waiting: usize) -> (Daemon, PathBuf) {
    let mut d = Daemon::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let capture = |count: usize| {
            let clients = 8;
            let tasks: Vec<_> = (0..clients)
                .map(|w| {
                    let socket = d.socket.clone();
                    tokio::spawn(async move {
                        let mut c = ui_bridge::Client::connect(&socket).await.expect("client");
                        for i in (w..count).step_by(clients) {
                            let text = format!(
                                "Reading {i}: pressure nominal, no leaks at flanges, gauge {}",
                                i % 97
                            );
                            let wo = if i % 2 == 0 { "WO-1" } else { "WO-2" };
                            c.add_record(wo, RecordBody::Note { text })
                                .await
                                .expect("capture");
                        }
                    })
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.expect("capture task");
                }
            }
        };
        capture(records - waiting).await;
        // Delivered, the way the back office's acknowledgements leave them. A bounded
        // read folds the capture journal first; listing the whole outbox would not fit
        // one answer at this size.
        d.client().await.outbox(Some(1)).await.expect("outbox");
        d.db()
            .execute_batch(
                "BEGIN;
                 UPDATE items SET sync_state = 'delivered', sent = 1;
                 DELETE FROM outbox;
                 COMMIT;",
            )
            .expect("mark delivered");
        capture(waiting).await;
        // Fold the journal so the device starts on what a long-running one would hold.
        let mut c = d.client().await;
        assert_eq!(c.status().await.unwrap().unsent, waiting as u64);
    });
    assert_eq!(d.stop(), Some(0));
    let root = d.dir.path().join("disk");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(&d.state_dir)
        .arg(root.join("state")));
    (d, root)
}

fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => tree_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn footprint_on_a_full_store() {
    let records = env_number("FIELDSYNC_FOOTPRINT_RECORDS", 20_000);
    let waiting = env_number("FIELDSYNC_FOOTPRINT_WAITING", records / 10).min(records);
    let binary = std::fs::metadata(&images().fieldsyncd).unwrap().len();
    assert!(
        binary <= MAX_BINARY_BYTES,
        "the device build of fieldsyncd is {binary} bytes"
    );

    let filling = Instant::now();
    let (_host_daemon, root) = fill_store(records, waiting);
    let state_bytes = tree_bytes(&root);
    let fill_time = filling.elapsed();
    let disk = Disk::new((state_bytes / (1024 * 1024)) * 3 + 256, Some(&root));

    let report = {
        let _vm = one_vm_at_a_time();
        Vm::boot(&disk, "footprint", &[]).finish()
    };
    let ready = report.fields("ready");
    let cold_ms = Report::number(&ready[0], "startup_ms");
    let warm_ms = Report::number(&ready[1], "startup_ms");
    assert_eq!(Report::number(&ready[0], "unsent"), waiting as u64);
    let idle = &report.fields("memory-idle")[0];
    let idle_warm = &report.fields("memory-idle-warm")[0];
    let rss = Report::number(idle, "VmRSS");
    let mut out = std::io::stderr().lock();
    let _ = writeln!(
        out,
        "footprint: {records} records, {waiting} waiting, store {:.1} MiB (filled in {:.1} s)\n\
         \x20 fieldsyncd aarch64 device build: {binary} bytes ({:.2} MiB)\n\
         \x20 start to ready: {cold_ms} ms cold, {warm_ms} ms warm (emulated cortex-a57)\n\
         \x20 idle: VmRSS {rss} KiB (peak {} KiB; {} KiB anonymous, {} KiB of files); after a warm start VmRSS {} KiB",
        state_bytes as f64 / 1048576.0,
        fill_time.as_secs_f64(),
        binary as f64 / 1048576.0,
        Report::number(idle, "VmHWM"),
        Report::number(idle, "RssAnon"),
        Report::number(idle, "RssFile"),
        Report::number(idle_warm, "VmRSS"),
    );
    assert!(
        rss <= MAX_IDLE_RSS_KIB,
        "idle VmRSS {rss} KiB is over the {MAX_IDLE_RSS_KIB} KiB budget"
    );
}
