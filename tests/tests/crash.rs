//! Promise 1 under fire: clients capture records and photos as fast as they can, the
//! daemon is SIGKILLed at a random moment, and after every kill each capture the daemon
//! acknowledged is on disk, the database passes `PRAGMA integrity_check`, and every
//! photo's bytes match their SHA-256.
//!
//! `FIELDSYNC_CRASH_ROUNDS` sets the number of kills (default 200).

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync_tests::{sha256_hex, Daemon};
use rand::Rng;
use ui_bridge::RecordBody;

#[derive(Default)]
struct Acked {
    records: Vec<String>,
    /// item id -> sha256
    photos: HashMap<String, String>,
}

async fn capture_until_killed(
    socket: std::path::PathBuf,
    dir: std::path::PathBuf,
    worker: usize,
    acked: Arc<Mutex<Acked>>,
) {
    let Ok(mut c) = ui_bridge::Client::connect(&socket).await else {
        return;
    };
    let mut last_record: Option<String> = None;
    for i in 0usize.. {
        if i % 4 == 3 {
            if let Some(record) = &last_record {
                let size = rand::rng().random_range(1_000..64_000);
                let bytes: Vec<u8> = (0..size).map(|_| rand::rng().random()).collect();
                let path = dir.join(format!("photo-{worker}-{i}.jpg"));
                if std::fs::write(&path, &bytes).is_err() {
                    return;
                }
                let Ok(f) = File::open(&path) else { return };
                match c.attach_photo(record, &f, None, None).await {
                    Ok(item) => {
                        acked
                            .lock()
                            .unwrap()
                            .photos
                            .insert(item.id, sha256_hex(&bytes));
                    }
                    Err(_) => return,
                }
                let _ = std::fs::remove_file(&path);
                continue;
            }
        }
        let wo = if i % 2 == 0 { "WO-1" } else { "WO-2" };
        let text = format!("worker {worker} capture {i}: {}", "reading ".repeat(50));
        match c.add_record(wo, RecordBody::Note { text }).await {
            Ok(item) => {
                acked.lock().unwrap().records.push(item.id.clone());
                last_record = Some(item.id);
            }
            Err(_) => return,
        }
    }
}

fn verify(d: &Daemon, acked: &Acked) {
    let db = d.db();
    let verdict: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok");
    for id in &acked.records {
        assert!(
            Daemon::item_stored(&db, id),
            "acknowledged record {id} lost"
        );
    }
    let mut stmt = db
        .prepare("SELECT photo_sha256 FROM items WHERE id = ?1")
        .unwrap();
    for (id, sha) in &acked.photos {
        let stored: String = stmt
            .query_row([id], |r| r.get(0))
            .unwrap_or_else(|e| panic!("acknowledged photo {id} lost: {e}"));
        assert_eq!(&stored, sha);
        let bytes = std::fs::read(d.state_dir.join("photos").join(&sha[..2]).join(sha))
            .unwrap_or_else(|e| panic!("photo file of {id} missing: {e}"));
        assert_eq!(&sha256_hex(&bytes), sha, "photo {id} damaged");
    }
    // Every acknowledged capture still has its operation waiting.
    let unsent: i64 = db
        .query_row(
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM captures)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(unsent as usize >= acked.records.len() + acked.photos.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_captures_survive_sigkill_at_any_moment() {
    let rounds: usize = std::env::var("FIELDSYNC_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut d = Daemon::start();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let scratch = d.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for round in 0..rounds {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                tokio::spawn(capture_until_killed(
                    d.socket.clone(),
                    scratch.clone(),
                    w,
                    acked.clone(),
                ))
            })
            .collect();
        let delay = rand::rng().random_range(2..60);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        d.kill();
        for w in workers {
            w.await.unwrap();
        }
        verify(&d, &acked.lock().unwrap());
        if round + 1 < rounds {
            d.spawn();
        }
    }
    let acked = acked.lock().unwrap();
    assert!(
        acked.records.len() > rounds,
        "the clients captured something in most rounds"
    );
    assert!(!acked.photos.is_empty());
    eprintln!(
        "{rounds} kills: {} records and {} photos acknowledged, none lost",
        acked.records.len(),
        acked.photos.len()
    );
}
