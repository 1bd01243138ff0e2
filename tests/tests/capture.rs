//! Capture with no network, through the real socket of the real daemon: every record
//! kind, photos by descriptor, edit and delete before delivery, the stage rule, the
//! unsent count, and events.

use std::fs::File;
use std::time::Duration;

use fieldsync_tests::{photo_file, sha256_hex, Daemon};
use ui_bridge::{
    ChecklistAnswer, ErrorCode, Event, ItemKind, Material, RecordBody, Severity, SyncState,
    WorkOrderChange,
};

fn note(text: &str) -> RecordBody {
    RecordBody::Note { text: text.into() }
}

#[tokio::test]
async fn every_kind_of_capture_is_stored_and_waits() {
    let d = Daemon::start();
    let mut c = d.client().await;
    assert_eq!(c.status().await.unwrap().unsent, 0);

    let work = c
        .add_record(
            "WO-1",
            RecordBody::CompletedWork {
                description: "Replaced seal on P1".into(),
                duration_minutes: Some(45),
                materials: vec![Material {
                    code: Some("S-12".into()),
                    name: "Seal".into(),
                    quantity: 2.0,
                    unit: "pcs".into(),
                }],
            },
        )
        .await
        .unwrap();
    // Listed as soon as it is answered, by every read.
    let wo = c.work_order("WO-1").await.unwrap();
    assert!(wo.items.iter().any(|i| i.id == work.id), "{wo:?}");
    assert_eq!(wo.summary.unsent, 1);
    let checklist = c
        .add_record(
            "WO-1",
            RecordBody::Checklist {
                answers: vec![
                    ChecklistAnswer {
                        item_id: "valves".into(),
                        value: true.into(),
                        comment: None,
                    },
                    ChecklistAnswer {
                        item_id: "vibration".into(),
                        value: 2.5.into(),
                        comment: None,
                    },
                    ChecklistAnswer {
                        item_id: "remarks".into(),
                        value: "fine".into(),
                        comment: Some("ok".into()),
                    },
                ],
            },
        )
        .await
        .unwrap();
    let defect = c
        .add_record(
            "WO-1",
            RecordBody::Defect {
                title: "Cracked flange".into(),
                description: "Hairline crack".into(),
                severity: Severity::High,
                location: Some("P2 outlet".into()),
            },
        )
        .await
        .unwrap();
    let n = c
        .add_record("WO-2", note("Gate locked, key at office"))
        .await
        .unwrap();

    let (path, bytes) = photo_file(d.dir.path(), "flange.jpg", 300_000);
    let photo = c
        .attach_photo(
            &defect.id,
            &File::open(&path).unwrap(),
            Some("image/jpeg"),
            Some("crack"),
        )
        .await
        .unwrap();
    assert_eq!(photo.kind, ItemKind::Photo);
    assert_eq!(photo.record_id.as_deref(), Some(defect.id.as_str()));
    let sha = sha256_hex(&bytes);
    assert_eq!(photo.body["sha256"], sha);
    assert_eq!(photo.body["size"], 300_000);
    let stored = d.state_dir.join("photos").join(&sha[..2]).join(&sha);
    assert_eq!(std::fs::read(stored).unwrap(), bytes);

    for item in [&work, &checklist, &defect, &n, &photo] {
        assert_eq!(item.state, SyncState::Waiting);
    }
    assert_eq!(c.status().await.unwrap().unsent, 5);
    let wo = c.work_order("WO-1").await.unwrap();
    assert_eq!(wo.items.len(), 4);
    assert_eq!(wo.summary.unsent, 4);
    let ops = c.outbox(None).await.unwrap();
    assert_eq!(ops.len(), 5);
    assert!(ops
        .iter()
        .all(|o| o.action == "create" && o.state == SyncState::Waiting));

    // Everything survives a restart.
    drop(c);
    let mut d = d;
    d.restart();
    let mut c = d.client().await;
    assert_eq!(c.status().await.unwrap().unsent, 5);
    assert_eq!(c.work_order("WO-1").await.unwrap().items.len(), 4);
}

/// Equal photos share one file. Deleting one while the same bytes are attached to
/// another record, at the same moment, leaves the file for the one that stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_deleted_while_its_twin_is_attached_keeps_the_twins_file() {
    let d = Daemon::start();
    let mut c1 = d.client().await;
    let mut c2 = d.client().await;
    let a = c1.add_record("WO-1", note("a")).await.unwrap();
    let b = c1.add_record("WO-1", note("b")).await.unwrap();
    let (path, bytes) = photo_file(d.dir.path(), "twin.jpg", 1024 * 1024);
    let sha = sha256_hex(&bytes);
    let stored = d.state_dir.join("photos").join(&sha[..2]).join(&sha);
    // The delete comes a little later each round, so that some round it lands between
    // the twin's copy finding the file in place and the twin's row naming it.
    for round in 0..30u64 {
        let first = c1
            .attach_photo(&a.id, &File::open(&path).unwrap(), None, None)
            .await
            .unwrap();
        let file = File::open(&path).unwrap();
        let (deleted, twin) = tokio::join!(
            async {
                tokio::time::sleep(std::time::Duration::from_millis(round)).await;
                c1.delete_item(&first.id).await
            },
            c2.attach_photo(&b.id, &file, None, None)
        );
        deleted.unwrap();
        let twin = twin.unwrap();
        assert_eq!(
            std::fs::read(&stored).ok().as_deref(),
            Some(&bytes[..]),
            "round {round}: the twin's file is there"
        );
        c2.delete_item(&twin.id).await.unwrap();
    }
}

#[tokio::test]
async fn edits_fold_and_deletes_send_nothing_before_delivery() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let item = c.add_record("WO-1", note("first")).await.unwrap();
    let (path, _) = photo_file(d.dir.path(), "p.jpg", 10_000);
    let photo = c
        .attach_photo(&item.id, &File::open(&path).unwrap(), None, None)
        .await
        .unwrap();
    let edited = c.edit_record(&item.id, note("second")).await.unwrap();
    assert_eq!(edited.body["text"], "second");
    // The edit folded into the waiting create: still two operations.
    let ops = c.outbox(None).await.unwrap();
    assert_eq!(ops.len(), 2);
    c.outbox(None).await.unwrap();
    let payload: String = d
        .db()
        .query_row(
            // NULL: the operation carries the item's body as it stands.
            "SELECT coalesce(payload, (SELECT body FROM items WHERE id = item_id))
             FROM outbox WHERE item_id = ?1",
            [&item.id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(payload.contains("second"), "{payload}");

    let err = c
        .edit_record(
            &item.id,
            RecordBody::Defect {
                title: "x".into(),
                description: String::new(),
                severity: Severity::Low,
                location: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRecord));

    assert!(
        c.delete_item(&item.id).await.unwrap(),
        "nothing had been sent"
    );
    assert_eq!(c.status().await.unwrap().unsent, 0);
    assert!(c.work_order("WO-1").await.unwrap().items.is_empty());
    let sha = photo.body["sha256"].as_str().unwrap().to_owned();
    assert!(
        !d.state_dir
            .join("photos")
            .join(&sha[..2])
            .join(&sha)
            .exists(),
        "photo file removed"
    );
    let err = c.edit_record(&item.id, note("third")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownItem));
}

#[tokio::test]
async fn delivered_items_can_no_longer_be_edited_or_deleted() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let item = c.add_record("WO-1", note("done")).await.unwrap();
    d.deliver_everything().await;
    let before = d.snapshot();
    let err = c.edit_record(&item.id, note("changed")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyDelivered));
    let err = c.delete_item(&item.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyDelivered));
    assert_eq!(d.snapshot(), before);
    let wo = c.work_order("WO-1").await.unwrap();
    assert_eq!(wo.items[0].state, SyncState::Delivered);
    assert_eq!(wo.items[0].body["text"], "done");
}

#[tokio::test]
async fn stages_move_one_step_forward_only() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let err = c.advance_stage("WO-1", "on_site").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StageJump));
    let err = c.advance_stage("WO-1", "new").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StageJump));
    let err = c.advance_stage("WO-404", "accepted").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownWorkOrder));
    let moved = c.advance_stage("WO-1", "accepted").await.unwrap();
    assert_eq!(moved.kind, ItemKind::Stage);
    assert_eq!(moved.body["from"], "new");
    assert_eq!(moved.body["to"], "accepted");
    let wo = c.work_order("WO-1").await.unwrap();
    assert_eq!(wo.summary.stage, "accepted");
    assert_eq!(wo.summary.next_stage.as_deref(), Some("on_site"));
    c.advance_stage("WO-1", "on_site").await.unwrap();
    c.advance_stage("WO-1", "completed").await.unwrap();
    let err = c.advance_stage("WO-1", "completed").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StageJump));
    assert_eq!(c.status().await.unwrap().unsent, 3);
    let err = c.delete_item(&moved.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEditable));
}

#[tokio::test]
async fn subscribers_see_item_unsent_and_work_order_events() {
    let d = Daemon::start();
    let mut watcher = d.client().await;
    watcher.subscribe().await.unwrap();
    let mut c = d.client().await;
    let item = c.add_record("WO-2", note("hello")).await.unwrap();
    assert_eq!(
        watcher.next_event().await.unwrap(),
        Event::ItemState {
            item_id: item.id.clone(),
            work_order_id: "WO-2".into(),
            kind: ItemKind::Note,
            state: Some(SyncState::Waiting),
            reason: None,
        }
    );
    assert_eq!(
        watcher.next_event().await.unwrap(),
        Event::Unsent { count: 1 }
    );
    c.advance_stage("WO-2", "on_site").await.unwrap();
    assert_eq!(
        watcher.next_event().await.unwrap(),
        Event::WorkOrder {
            work_order_id: "WO-2".into(),
            change: WorkOrderChange::Changed
        }
    );
    assert!(matches!(
        watcher.next_event().await.unwrap(),
        Event::ItemState {
            kind: ItemKind::Stage,
            ..
        }
    ));
    assert_eq!(
        watcher.next_event().await.unwrap(),
        Event::Unsent { count: 2 }
    );
    c.delete_item(&item.id).await.unwrap();
    assert!(matches!(
        watcher.next_event().await.unwrap(),
        Event::ItemState { state: None, .. }
    ));
    assert_eq!(
        watcher.next_event().await.unwrap(),
        Event::Unsent { count: 1 }
    );
    // The subscriber can still make requests on the same connection.
    assert_eq!(watcher.status().await.unwrap().unsent, 1);
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    let item = c.add_record("WO-1", note("kept")).await.unwrap();
    assert_eq!(d.stop(), Some(0));
    assert!(!d.socket.exists());
    assert!(Daemon::item_stored(&d.db(), &item.id));
}

/// Under systemd the daemon asks for more time while it opens (and may check) its
/// store, then says it is ready: a long check on a large store is not ended by the
/// unit's start timeout.
#[tokio::test]
async fn the_start_asks_systemd_for_time_then_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _d = Daemon::start_with(fieldsync_tests::Options {
        env: vec![("NOTIFY_SOCKET".into(), notify.display().to_string())],
        ..fieldsync_tests::Options::default()
    });
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    while !said.iter().any(|m: &String| m.contains("READY=1")) {
        let n = sock.recv(&mut buf).expect("the daemon notifies");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let extend = said.iter().position(|m| m.contains("EXTEND_TIMEOUT_USEC="));
    let ready = said.iter().position(|m| m.contains("READY=1"));
    assert!(extend.is_some() && extend < ready, "{said:?}");
}

/// Reads what the daemon tells systemd on `sock` for `period`.
fn notifications(sock: &std::os::unix::net::UnixDatagram, period: Duration) -> Vec<String> {
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    let until = std::time::Instant::now() + period;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => said.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    said
}

/// Under a watchdog of 2 s the daemon feeds it every second while its store's writer
/// answers, and stops while the writer is stuck (here another process holds the
/// database's write lock), so that systemd restarts a wedged daemon; it starts again once
/// the writer is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_while_the_store_writes_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let d = Daemon::start_with(fieldsync_tests::Options {
        env: vec![("NOTIFY_SOCKET".into(), notify.display().to_string())],
        watchdog_usec: Some(2_000_000),
        ..fieldsync_tests::Options::default()
    });
    let feeds = |said: &[String]| said.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let healthy = notifications(&sock, Duration::from_millis(3500));
    assert!(feeds(&healthy) >= 3, "{healthy:?}\n{}", d.log());

    let lock = rusqlite::Connection::open(d.state_dir.join("fieldsync.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A probe already answered may still be fed; none after it.
    notifications(&sock, Duration::from_millis(600));
    let stuck = notifications(&sock, Duration::from_millis(3000));
    lock.execute_batch("ROLLBACK").unwrap();
    assert_eq!(feeds(&stuck), 0, "{stuck:?}\n{}", d.log());

    let again = notifications(&sock, Duration::from_millis(7000));
    assert!(feeds(&again) >= 1, "{again:?}\n{}", d.log());
}

/// `JOURNAL_STREAM` is inherited through a shell that sends stderr elsewhere; with
/// `log.format = "auto"` the daemon logs to the journal only when its stderr is that
/// stream, so a log redirected to a file keeps its lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_stream_that_is_not_stderr_leaves_the_log_on_stderr() {
    let mut d = Daemon::start_with(fieldsync_tests::Options {
        env: vec![("JOURNAL_STREAM".into(), "8:12345".into())],
        ..fieldsync_tests::Options::default()
    });
    d.stop();
    std::fs::create_dir_all(d.dir.path().join("config.d")).unwrap();
    std::fs::write(
        d.dir.path().join("config.d/log.toml"),
        "[log]\nformat = \"auto\"\n",
    )
    .unwrap();
    d.spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.log().matches("fieldsyncd ready").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second start logs to stderr:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!d.log().contains("journald unavailable"), "{}", d.log());
}
