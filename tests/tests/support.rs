//! Field support's tools: exporting what was captured in a time range to a file.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fieldsync_tests::{fieldctl_bin, photo_file, Daemon};
use ui_bridge::{ErrorCode, Item, ItemKind, RecordBody};

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
        let file = d.dir.path().join(format!("{tz}.jsonl"));
        let run = fieldctl(
            &d,
            tz,
            &[
                "export",
                file.to_str().unwrap(),
                "--from",
                &today,
                "--to",
                &today,
            ],
        );
        assert!(run.status.success(), "{tz}: {run:?}");
        assert_eq!(lines(&file)[0].id, record.id);
        let file = d.dir.path().join(format!("{tz}-yesterday.jsonl"));
        let run = fieldctl(
            &d,
            tz,
            &[
                "export",
                file.to_str().unwrap(),
                "--from",
                &yesterday,
                "--to",
                &yesterday,
            ],
        );
        assert_eq!(run.status.code(), Some(1), "{tz}: {run:?}");
    }
}
