//! Field support's tools: exporting what was captured in a time range to a file, and
//! the full resync.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fieldsync_tests::backoffice::BackOffice;
use fieldsync_tests::broker::Broker;
use fieldsync_tests::{fieldctl_bin, photo_file, Daemon, Options};
use ui_bridge::{ErrorCode, Item, ItemKind, RecordBody, SyncState};

const DEVICE: &str = "dev-support";

fn note(text: &str) -> RecordBody {
    RecordBody::Note { text: text.into() }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn fieldctl(d: &Daemon, tz: &str, args: &[&str]) -> std::process::Output {
    Command::new(fieldctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .env("TZ", tz)
        .output()
        .unwrap()
}

fn lines(path: &std::path::Path) -> Vec<Item> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn an_export_pages_through_a_time_range_oldest_first() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let early = c.add_record("WO-1", note("early")).await.unwrap();
    let deleted = c.add_record("WO-1", note("deleted")).await.unwrap();
    c.delete_item(&deleted.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut later = Vec::new();
    for i in 0..250 {
        later.push(
            c.add_record("WO-2", note(&format!("later {i}")))
                .await
                .unwrap()
                .id,
        );
    }

    let (items, next) = c.export_page(None, Some(cut), None, None).await.unwrap();
    let ids: Vec<_> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [early.id.as_str()],
        "the deleted record is not exported"
    );
    assert_eq!(next, None);

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let (items, next) = c
            .export_page(Some(cut), None, after, Some(100))
            .await
            .unwrap();
        assert!(items.len() <= 100);
        seen.extend(items.into_iter().map(|i| i.id));
        pages += 1;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, later, "every item once, in the order captured");
    assert_eq!(pages, 3);

    for (since, until, limit) in [
        (None, None, Some(0)),
        (None, None, Some(1001)),
        (Some(cut), Some(cut - 1), None),
    ] {
        let e = c
            .export_page(since, until, None, limit)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    }
    // The connection goes on.
    c.status().await.unwrap();
}

#[tokio::test]
async fn fieldctl_exports_to_a_new_file_and_says_when_there_is_nothing() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("pump checked")).await.unwrap();
    let (photo, _) = photo_file(d.dir.path(), "p.jpg", 2048);
    let photo = std::fs::File::open(photo).unwrap();
    c.attach_photo(&record.id, &photo, None, None)
        .await
        .unwrap();
    let out = d.dir.path().join("export.jsonl");
    let out_s = out.to_str().unwrap();

    let run = fieldctl(&d, "UTC", &["export", out_s, "--all"]);
    assert!(run.status.success(), "{run:?}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("exported 2 items (1 records, 1 photos)"),
        "{stdout}"
    );
    let items = lines(&out);
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].id, record.id);
    assert_eq!(items[1].kind, ItemKind::Photo);

    // An export never overwrites a file.
    let again = fieldctl(&d, "UTC", &["export", out_s, "--all"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("cannot create"));
    assert_eq!(lines(&out).len(), 2, "the first export is intact");

    // A range with nothing in it writes nothing, and says so.
    let empty = d.dir.path().join("empty.jsonl");
    let none = fieldctl(
        &d,
        "UTC",
        &[
            "export",
            empty.to_str().unwrap(),
            "--from",
            "2001-01-01",
            "--to",
            "2001-01-31",
        ],
    );
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("nothing was captured from 2001-01-01T00:00:00Z to 2001-02-01T00:00:00Z"),
        "{err}"
    );
    assert!(!empty.exists());

    // Days that do not exist, and no range at all, are usage errors.
    for args in [
        vec!["export", "x.jsonl", "--from", "2026-02-30"],
        vec!["export", "x.jsonl", "--from", "yesterday"],
        vec!["export", "x.jsonl"],
    ] {
        let bad = fieldctl(&d, "UTC", &args);
        assert_eq!(bad.status.code(), Some(2), "{args:?}: {bad:?}");
    }
}

/// A day is the device's day: in a zone 14 hours ahead of UTC and in one 12 hours
/// behind, today holds what was just captured and yesterday does not. At any hour one
/// of the two zones is on another date than UTC, so reading days as UTC would fail.
#[tokio::test]
async fn export_days_are_local_days() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("today")).await.unwrap();
    // POSIX zone strings need no time-zone database: "XYZ-14" is UTC+14.
    for tz in ["XYZ-14", "XYZ+12"] {
        let date = |when: &str| {
            let out = Command::new("date")
                .env("TZ", tz)
                .args(["-d", when, "+%F"])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let (today, yesterday) = (date("now"), date("yesterday"));
        let export_day = |day: &str| {
            let file = d.dir.path().join(format!("{tz}-{day}.jsonl"));
            let run = fieldctl(
                &d,
                tz,
                &["export", file.to_str().unwrap(), "--from", day, "--to", day],
            );
            (file, run)
        };
        let (file, run) = export_day(&today);
        assert!(run.status.success(), "{tz}: {run:?}");
        assert_eq!(lines(&file)[0].id, record.id);
        let (_, run) = export_day(&yesterday);
        assert_eq!(run.status.code(), Some(1), "{tz}: {run:?}");
    }
}

/// Waits until `$check` (an expression that may `.await`) holds, for 20 s at most.
macro_rules! eventually {
    ($what:expr, $d:expr, $check:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(20);
        while !$check {
            assert!(Instant::now() < deadline, "{}:\n{}", $what, $d.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

/// A full resync: a damaged attachment is fetched again, the cache becomes the back
/// office's full state, and a work order it no longer names stays while it has
/// undelivered work. A resync the back office has not answered survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_replaces_the_cache_keeps_unsent_work_and_refetches_bad_files() {
    use sha2::Digest;
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let file: Vec<u8> = (0..100 * 1024).map(|_| rand::random::<u8>()).collect();
    let sha = hex::encode(sha2::Sha256::digest(&file));
    let wo = |id: &str, version: u32, title: &str| serde_json::json!({"id": id, "version": version, "title": title, "stage": "new", "workflow": ["new", "done"]});
    let mut with_drawing = wo("WO-30", 1, "With a drawing");
    with_drawing["attachments"] =
        serde_json::json!([{"id": "dwg", "name": "layout.pdf", "size": file.len(), "sha256": sha}]);
    {
        let mut st = bo.state.lock().unwrap();
        st.attachment_files.insert(sha.clone(), file.clone());
        st.work_orders.insert(
            DEVICE.into(),
            vec![with_drawing.clone(), wo("WO-31", 1, "Soon reassigned")],
        );
    }
    // Changes of WO-31 are refused: they stay on the device, undelivered.
    bo.set_refuse(Some(Box::new(|a| {
        (a.wo == "WO-31").then(|| ("conflict".into(), "reassigned in the office".into()))
    })));
    let mut d = Daemon::start_with(Options {
        work_orders: "[]".into(),
        uplink: format!(
            "broker = \"{}\"\ndevice_id = \"{DEVICE}\"\nreconnect_min_ms = 50\nreconnect_max_secs = 1\n",
            broker.url()
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    eventually!("the first full state and its attachment", d, {
        matches!(c.work_order("WO-30").await, Ok(w) if w.attachments.iter().all(|a| a.downloaded))
    });
    let kept = c.add_record("WO-31", note("found a leak")).await.unwrap();
    eventually!("the record is refused", d, {
        matches!(c.work_order("WO-31").await, Ok(w) if w.items.iter().any(|i| i.id == kept.id && i.state == SyncState::Refused))
    });
    // Support sees it, with the back office's reason.
    let refused = c.diagnostics().await.unwrap().refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].item_id, kept.id);
    assert!(refused[0]
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("reassigned in the office")));
    let asked = bo.state.lock().unwrap().resync_requests;
    assert_eq!(asked, 1);

    // Flash that went bad under the drawing, and a dispatcher that moved on.
    let stored = d.state_dir.join("attachments").join(&sha);
    std::fs::write(&stored, b"not the drawing any more").unwrap();
    bo.state.lock().unwrap().work_orders.insert(
        DEVICE.into(),
        vec![
            {
                let mut w = with_drawing.clone();
                w["version"] = 2.into();
                w["title"] = "With a drawing, revised".into();
                w
            },
            wo("WO-32", 1, "New today"),
        ],
    );
    assert_eq!(c.resync().await.unwrap(), (1, 1));
    eventually!("the full state replaces the cache", d, {
        let list = c.work_orders().await.unwrap();
        let get = |id: &str| list.iter().find(|w| w.id == id).cloned();
        get("WO-32").is_some()
            && get("WO-30").is_some_and(|w| w.title == "With a drawing, revised")
            && get("WO-31").is_some_and(|w| w.withdrawn)
    });
    // The refused record is still there for the inspector to fix or discard.
    let wo31 = c.work_order("WO-31").await.unwrap();
    assert!(wo31.items.iter().any(|i| i.id == kept.id));
    eventually!("the drawing is fetched again", d, {
        matches!(c.work_order("WO-30").await, Ok(w) if w.attachments.iter().all(|a| a.downloaded))
    });
    assert_eq!(std::fs::read(&stored).unwrap(), file);
    assert_eq!(bo.state.lock().unwrap().resync_requests, asked + 1);
    assert!(!c.status().await.unwrap().resync_pending);

    // A back office that does not answer: the wish outlives a restart, and the
    // restarted daemon (whose broker session and cache are both there) asks again.
    bo.state.lock().unwrap().work_orders.remove(DEVICE);
    c.resync().await.unwrap();
    eventually!("the request reaches the back office", d, {
        bo.state.lock().unwrap().resync_requests == asked + 2
    });
    assert!(c.status().await.unwrap().resync_pending);
    drop(c);
    d.restart();
    let mut c = d.client().await;
    eventually!("the restarted daemon asks again", d, {
        bo.state.lock().unwrap().resync_requests == asked + 3
    });
    assert!(c.status().await.unwrap().resync_pending);
    let out = fieldctl(&d, "UTC", &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("full state is asked for"),
        "{out:?}"
    );
}

/// The diagnostics bundle: what support reads first, even where the journal is out of
/// its reach. A broker that is not there leaves its warnings in it.
#[tokio::test]
async fn a_diagnostics_bundle_holds_the_figures_and_the_latest_problems() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start_with(Options {
        uplink: format!(
            "broker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"{DEVICE}\"\nreconnect_min_ms = 50\nreconnect_max_secs = 1\n"
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    c.add_record("WO-1", note("waiting")).await.unwrap();
    eventually!("the broker's absence is logged", d, {
        c.diagnostics()
            .await
            .unwrap()
            .recent_problems
            .iter()
            .any(|p| p.message == "broker connection lost")
    });
    let report = c.diagnostics().await.unwrap();
    assert_eq!(report.items.get("waiting"), Some(&1));
    assert!(report.work_orders >= 1);
    assert_eq!(report.device_id.as_deref(), Some(DEVICE));
    assert_eq!(report.broker_address, Some(format!("127.0.0.1:{port}")));
    assert!(report.database_bytes > 0);
    let problem = report
        .recent_problems
        .iter()
        .find(|p| p.message == "broker connection lost")
        .unwrap();
    assert_eq!(problem.level, "WARN");
    assert!(
        problem.fields.iter().any(|f| f.starts_with("error=")),
        "{problem:?}"
    );
    assert!(report.refused.is_empty());

    let file = d.dir.path().join("diagnostics.json");
    let run = fieldctl(&d, "UTC", &["diagnostics", file.to_str().unwrap()]);
    assert!(run.status.success(), "{run:?}");
    let bundle: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(bundle["diagnostics"]["items"]["waiting"], 1);
    assert!(
        bundle["journal"]["lines"].is_array() || bundle["journal"]["unavailable"].is_string(),
        "{}",
        bundle["journal"]
    );
    let again = fieldctl(&d, "UTC", &["diagnostics", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "never over an earlier bundle");
}
