//! The store's share of a drain, without broker or back office: read a batch, mark it
//! sent (durably, as the uplink does before publishing), acknowledge it. Shows what the
//! outbox costs per record, apart from the network and the other processes. Also times
//! the photo lane's look for its next upload with all those records waiting, which the
//! uplink repeats after every capture.
//!
//! cargo bench -p fieldsyncd --bench outbox
//!
//! FIELDSYNC_OUTBOX_RECORDS (20000) and FIELDSYNC_OUTBOX_BATCH (64) size the run.

use std::time::Instant;

use fieldsyncd::domain::{journal, outbox, photos, work_orders, DomainError};
use fieldsyncd::store::Store;
use ui_bridge::RecordBody;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let n = env_count("FIELDSYNC_OUTBOX_RECORDS", 20_000);
    let per = env_count("FIELDSYNC_OUTBOX_BATCH", 64);
    // On disk, not tmpfs: the fsyncs are part of the cost.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary folder");
    let (store, _) = Store::open(dir.path()).expect("store");
    store
        .write(move |c| {
            for wo in ["WO-1", "WO-2"] {
                let mut doc = work_orders::WorkOrderDoc::placeholder(wo);
                doc.version = 1;
                doc.stage = "new".into();
                doc.workflow = vec!["new".into()];
                work_orders::upsert(c, &doc)?;
            }
            for i in 0..n {
                // 1 KiB of varied letters, like the drain benchmark's payloads.
                let text: String = (0..1024)
                    .map(|j| (b'a' + ((i * 7 + j * 13) % 26) as u8) as char)
                    .collect();
                journal::stage(c, ["WO-1", "WO-2"][i % 2], &RecordBody::Note { text })?;
            }
            journal::fold(c)?;
            Ok::<_, DomainError>(())
        })
        .await
        .expect("fill the outbox");
    let bytes: i64 = store
        .read(|c| {
            c.query_row(
                "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
                [],
                |r| r.get(0),
            )
            .map_err(DomainError::from)
        })
        .await
        .expect("database size");

    let looks = 200;
    let t = Instant::now();
    for _ in 0..looks {
        let next = store
            .read(|c| photos::next_upload(c, &[]))
            .await
            .expect("next upload");
        assert!(next.is_none(), "no photo was taken");
    }
    println!(
        "looking for a photo to upload among {n} waiting records: {:.0} µs",
        t.elapsed().as_secs_f64() * 1e6 / looks as f64
    );

    let (mut read, mut mark, mut ack) = (0.0, 0.0, 0.0);
    let started = Instant::now();
    let mut done = 0;
    loop {
        let t = Instant::now();
        let batch = store
            .read(move |c| outbox::next_batch(c, per, usize::MAX))
            .await
            .expect("next batch");
        read += t.elapsed().as_secs_f64();
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<i64> = batch.iter().map(|o| o.seq).collect();
        let ids: Vec<String> = batch.iter().map(|o| o.op_id.clone()).collect();
        let t = Instant::now();
        store
            .write(move |c| outbox::mark_sent(c, &seqs))
            .await
            .expect("mark sent");
        mark += t.elapsed().as_secs_f64();
        let t = Instant::now();
        store
            .write_lazy(move |c| outbox::acknowledge(c, &ids).map(|_| ()))
            .await
            .expect("acknowledge");
        ack += t.elapsed().as_secs_f64();
        done += batch.len();
    }
    assert_eq!(done, n, "every record went through");
    let all = started.elapsed().as_secs_f64();
    let us = |s: f64| s * 1e6 / done as f64;
    println!(
        "{done} records ({:.1} MiB of database), {per} per batch: {:.0} records/s; per record: read {:.1} µs, mark sent {:.1} µs, acknowledge {:.1} µs",
        bytes as f64 / (1 << 20) as f64,
        done as f64 / all,
        us(read),
        us(mark),
        us(ack)
    );
}
