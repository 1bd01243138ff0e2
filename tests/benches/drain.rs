//! Draining the outbox to a real Mosquitto and the test back office, side by side with
//! `mosquitto_pub -q 1 -l` publishing the same payloads one per message to the same
//! broker; bytes on the wire; resident memory while draining.
//!
//! cargo bench -p fieldsync-tests --bench drain
//!
//! FIELDSYNC_DRAIN_RECORDS (20000) and FIELDSYNC_MEMORY_RECORDS (100000) size the runs;
//! FIELDSYNC_COMPRESSION_LEVEL sets the daemon's `uplink.compression_level`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldsync_tests::backoffice::BackOffice;
use fieldsync_tests::broker::Broker;
use fieldsync_tests::{Daemon, Options};
use rand::distr::{Alphanumeric, SampleString};
use rand::seq::IndexedRandom;
use ui_bridge::{Client, RecordBody};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn options(broker: &Broker) -> Options {
    let mut uplink = format!(
        "broker = \"{}\"\ndevice_id = \"bench\"\nreconnect_min_ms = 50\nreconnect_max_secs = 1\n",
        broker.url()
    );
    if let Ok(level) = std::env::var("FIELDSYNC_COMPRESSION_LEVEL") {
        uplink.push_str(&format!("compression_level = {level}\n"));
    }
    Options {
        uplink,
        ..Options::default()
    }
}

/// 1 KiB of random letters and digits: as good as incompressible for a text protocol.
fn random_text() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 1024)
}

/// An inspection record as inspectors write them: repeated structure, natural language.
fn realistic(i: usize) -> RecordBody {
    let mut rng = rand::rng();
    let parts = [
        "valve",
        "flange",
        "gasket",
        "pump housing",
        "bearing",
        "seal",
        "coupling",
        "pipe joint",
    ];
    let states = [
        "shows light corrosion",
        "is leaking slightly",
        "is in good condition",
        "needs replacement within three months",
        "was cleaned and re-tightened",
        "shows hairline cracks near the weld",
    ];
    let places = [
        "at the inlet",
        "on the north side",
        "behind the control cabinet",
        "next to pump P2",
        "at the outlet manifold",
    ];
    let sentence = |rng: &mut rand::rngs::ThreadRng| {
        format!(
            "The {} {} {}.",
            parts.choose(rng).unwrap(),
            states.choose(rng).unwrap(),
            places.choose(rng).unwrap()
        )
    };
    match i % 3 {
        0 => RecordBody::Defect {
            title: format!(
                "{} {}",
                parts.choose(&mut rng).unwrap(),
                states.choose(&mut rng).unwrap()
            ),
            description: (0..4)
                .map(|_| sentence(&mut rng))
                .collect::<Vec<_>>()
                .join(" "),
            severity: *[
                ui_bridge::Severity::Low,
                ui_bridge::Severity::Medium,
                ui_bridge::Severity::High,
            ]
            .choose(&mut rng)
            .unwrap(),
            location: Some(places.choose(&mut rng).unwrap().to_string()),
        },
        1 => RecordBody::CompletedWork {
            description: (0..3)
                .map(|_| sentence(&mut rng))
                .collect::<Vec<_>>()
                .join(" "),
            duration_minutes: Some(15 + (i % 90) as u32),
            materials: vec![ui_bridge::Material {
                code: Some(format!("M-{}", 100 + i % 40)),
                name: parts.choose(&mut rng).unwrap().to_string(),
                quantity: (1 + i % 4) as f64,
                unit: "pcs".into(),
            }],
        },
        _ => RecordBody::Note {
            text: (0..5)
                .map(|_| sentence(&mut rng))
                .collect::<Vec<_>>()
                .join(" "),
        },
    }
}

/// Captures `bodies` through the socket with 8 clients.
async fn capture(d: &Daemon, bodies: Vec<RecordBody>) -> usize {
    let json: usize = bodies
        .iter()
        .map(|b| serde_json::to_vec(b).unwrap().len())
        .sum();
    let chunks: Vec<Vec<RecordBody>> = bodies
        .chunks(bodies.len().div_ceil(8))
        .map(|c| c.to_vec())
        .collect();
    let mut tasks = Vec::new();
    for (w, chunk) in chunks.into_iter().enumerate() {
        let mut c = Client::connect(&d.socket).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            for body in chunk {
                c.add_record(["WO-1", "WO-2"][w % 2], body)
                    .await
                    .expect("capture");
            }
        }));
    }
    for t in tasks {
        t.await.expect("capture task");
    }
    json
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Drain {
    first_ms: f64,
    all_s: f64,
    wire: u64,
    peak_kib: u64,
    /// CPU seconds the daemon and this process (the back office) spent on the drain.
    daemon_cpu_s: f64,
    backoffice_cpu_s: f64,
}

/// Captures with the broker down, restarts the daemon (so its peak memory reflects the
/// drain only), brings the broker up, and times the drain.
async fn drain(bodies: Vec<RecordBody>) -> (Drain, usize) {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    broker.stop();
    let mut d = Daemon::start_with(options(&broker));
    let n = bodies.len();
    let json = capture(&d, bodies).await;
    d.restart();
    let pid = d.pid();
    let cpu = |who: &str| fieldsync_tests::cpu_time(who).as_secs_f64();
    let (daemon_cpu0, self_cpu0) = (cpu(&pid.to_string()), cpu("self"));
    let t0 = Instant::now();
    broker.spawn();
    bo.wait_applied(n, Duration::from_secs(600)).await;
    let daemon_cpu_s = cpu(&pid.to_string()) - daemon_cpu0;
    let backoffice_cpu_s = cpu("self") - self_cpu0;
    let st = bo.state.lock().unwrap();
    let first = st.first_batch_at.expect("a batch").duration_since(t0);
    let last = st.last_applied_at.expect("applied").duration_since(t0);
    let out = Drain {
        first_ms: first.as_secs_f64() * 1000.0,
        all_s: last.as_secs_f64(),
        wire: st.wire_bytes,
        peak_kib: rss_kib(pid, "VmHWM:"),
        daemon_cpu_s,
        backoffice_cpu_s,
    };
    (out, json)
}

fn mosquitto_pub(lines: &[String]) -> f64 {
    let broker = Broker::start();
    let start = Instant::now();
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            "bench/ref",
            "-l",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (scripts/install-deps.sh installs it)");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for l in lines {
            writeln!(stdin, "{l}").expect("write");
        }
    }
    assert!(child.wait().expect("mosquitto_pub").success());
    lines.len() as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n = env_count("FIELDSYNC_DRAIN_RECORDS", 20_000);
    let texts: Vec<String> = (0..n).map(|_| random_text()).collect();

    println!("## Drain of {n} queued 1 KiB records\n");
    // "From the first batch" leaves the reconnect out: what the sending itself does.
    println!("| run | mosquitto_pub -q 1 msgs/s | fieldsync records/s | ratio | first batch after broker up | records/s from the first batch | wire bytes per payload byte | CPU s: daemon, back office |");
    println!("|---|---|---|---|---|---|---|---|");
    for run in 1..=2 {
        let reference = mosquitto_pub(&texts);
        let bodies = texts
            .iter()
            .map(|t| RecordBody::Note { text: t.clone() })
            .collect();
        let (d, _) = drain(bodies).await;
        let rate = n as f64 / d.all_s;
        let sending = n as f64 / (d.all_s - d.first_ms / 1000.0);
        println!(
            "| {run} | {reference:.0} | {rate:.0} | {:.2}x | {:.0} ms | {sending:.0} | {:.3} | {:.2}, {:.2} |",
            rate / reference,
            d.first_ms,
            d.wire as f64 / (n * 1024) as f64,
            d.daemon_cpu_s,
            d.backoffice_cpu_s
        );
    }

    let m = 5_000;
    let (d, json) = drain((0..m).map(realistic).collect()).await;
    println!("\n## Bytes on the wire, {m} realistic inspection records\n");
    println!(
        "records as JSON: {json} bytes; on the wire (batches, zstd): {} bytes; ratio {:.3}",
        d.wire,
        d.wire as f64 / json as f64
    );

    let big = env_count("FIELDSYNC_MEMORY_RECORDS", 100_000);
    println!(
        "\n## Peak resident memory while draining (VmHWM of a daemon restarted before the drain)\n"
    );
    println!("| queued records | peak RSS | drain time |");
    println!("|---|---|---|");
    let mut peaks = Vec::new();
    for count in [1_000, big] {
        let bodies = (0..count)
            .map(|i| RecordBody::Note {
                text: texts[i % texts.len()].clone(),
            })
            .collect();
        let (d, _) = drain(bodies).await;
        println!(
            "| {count} | {:.1} MiB | {:.1} s |",
            d.peak_kib as f64 / 1024.0,
            d.all_s
        );
        peaks.push(d.peak_kib);
    }
    println!(
        "\nratio {big}/1000: {:.2}x (goal <= 1.2x, and <= 16 MiB)",
        peaks[1] as f64 / peaks[0] as f64
    );
}
