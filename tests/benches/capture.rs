//! Capture throughput through the real socket, side by side with raw SQLite doing one
//! durable 1 KiB row per commit (WAL, synchronous=FULL) on the same disk in the same run.
//!
//! cargo bench -p fieldsync-tests --bench capture
//!
//! Goals: sequential single captures >= 0.8x the raw commit rate; 8 concurrent clients
//! >= 3x the raw single-commit rate (group commit shares one fsync).
//!
//! The clients run on one thread, as a touchscreen app's event loop does (and as
//! `fieldctl` does): a multi-threaded runtime here would add a wake-up of another
//! thread to every answer, which is the benchmark's cost, not the daemon's.

use std::time::Instant;

use fieldsync_tests::Daemon;
use ui_bridge::{Client, RecordBody};

const N: usize = 3000;

fn raw_sqlite_commits(n: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .expect("wal");
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
    )
    .expect("schema");
    let body = vec![b'x'; 1024];
    let start = Instant::now();
    for _ in 0..n {
        conn.execute("INSERT INTO t (body) VALUES (?1)", [&body])
            .expect("insert");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn note(worker: usize, i: usize) -> RecordBody {
    // About 1 KiB of text, like the raw rows.
    let mut text = format!("worker {worker} reading {i}: ");
    while text.len() < 1024 {
        text.push_str("pressure nominal, ");
    }
    RecordBody::Note { text }
}

/// Captures per second, and the slowest captures: the 99th percentile and the worst, in
/// milliseconds (a capture that meets housekeeping in the store waits for it).
async fn sequential(d: &Daemon, n: usize) -> (f64, f64, f64) {
    let mut c = d.client().await;
    let mut each = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        c.add_record("WO-1", note(0, i)).await.expect("capture");
        each.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    each.sort_by(|a, b| a.total_cmp(b));
    (rate, each[n * 99 / 100], each[n - 1])
}

/// Round trips of `status`, which writes nothing: what the socket, both event loops and
/// one read of the store cost, apart from any commit. Microseconds each.
async fn round_trip_us(d: &Daemon, n: usize) -> f64 {
    let mut c = d.client().await;
    let start = Instant::now();
    for _ in 0..n {
        c.status().await.expect("status");
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

async fn concurrent(d: &Daemon, clients: usize, per_client: usize) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(&d.socket).await.expect("connect"));
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut c)| {
            tokio::spawn(async move {
                for i in 0..per_client {
                    c.add_record("WO-1", note(w, i)).await.expect("capture");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    (clients * per_client) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Build (release) and start the daemon before timing anything.
    let d = Daemon::start();
    // Warm both sides once so file creation is not timed.
    raw_sqlite_commits(200);
    sequential(&d, 200).await;

    let mut rows = Vec::new();
    for run in 1..=3 {
        let raw = raw_sqlite_commits(N);
        let (seq, p99, worst) = sequential(&d, N).await;
        let conc = concurrent(&d, 8, N / 2).await;
        let rtt = round_trip_us(&d, N).await;
        rows.push((run, raw, seq, conc, rtt, p99, worst));
    }
    println!("| run | raw SQLite commits/s | sequential captures/s | ratio | 8 clients captures/s | ratio | µs: raw commit, capture, status round trip | sequential ms: 99th percentile, slowest |");
    println!("|---|---|---|---|---|---|---|---|");
    for (run, raw, seq, conc, rtt, p99, worst) in &rows {
        println!(
            "| {run} | {raw:.0} | {seq:.0} | {:.2}x | {conc:.0} | {:.2}x | {:.0}, {:.0}, {rtt:.0} | {p99:.2}, {worst:.1} |",
            seq / raw,
            conc / raw,
            1e6 / raw,
            1e6 / seq
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let seq_ratio = median(rows.iter().map(|r| r.2 / r.1).collect());
    let conc_ratio = median(rows.iter().map(|r| r.3 / r.1).collect());
    println!(
        "\nmedian: sequential {seq_ratio:.2}x (goal >= 0.8x), 8 clients {conc_ratio:.2}x (goal >= 3x)"
    );
}
