//! Downloaded work orders expire after the administrator's age, with a warning first;
//! what the inspector captured and has not delivered keeps its work order on the device.

use std::time::{Duration, Instant};

use fieldsync_tests::{Daemon, Options};
use ui_bridge::{Client, Event, RecordBody, WorkOrderChange};

/// Waits for a `work_order` event of `change` for `id`, skipping others.
async fn wait_for(watcher: &mut Client, d: &Daemon, id: &str, change: WorkOrderChange) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watcher.next_event()).await {
            Ok(Ok(Event::WorkOrder {
                work_order_id,
                change: c,
            })) if work_order_id == id && c == change => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("events: {e}"),
            Err(_) => panic!("no {change:?} for {id}:\n{}", d.log()),
        }
    }
}

#[tokio::test]
async fn work_orders_expire_after_a_warning_but_not_while_their_work_waits() {
    let d = Daemon::start_with(Options {
        sync: format!(
            "{}[work_orders]\nexpire_after_secs = 4\nwarn_before_secs = 3\n",
            Options::default().sync
        ),
        ..Options::default()
    });
    let mut watcher = d.client().await;
    watcher.subscribe().await.unwrap();
    let mut c = d.client().await;
    let list = c.work_orders().await.unwrap();
    let wo1 = list.iter().find(|w| w.id == "WO-1").unwrap();
    assert_eq!(wo1.expires_ms, Some(wo1.received_ms + 4000));
    let record = c
        .add_record(
            "WO-2",
            RecordBody::Note {
                text: "not sent yet".into(),
            },
        )
        .await
        .unwrap();

    wait_for(&mut watcher, &d, "WO-1", WorkOrderChange::Expiring).await;
    wait_for(&mut watcher, &d, "WO-1", WorkOrderChange::Removed).await;
    assert!(c.work_order("WO-1").await.is_err(), "WO-1 left the cache");
    // Past its age, WO-2 stays for the record that waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wo2 = c.work_order("WO-2").await.unwrap();
    assert!(wo2.items.iter().any(|i| i.id == record.id));
    assert!(
        !wo2.summary.withdrawn,
        "kept as it is for the inspector, not shown as cancelled"
    );
    assert_eq!(c.status().await.unwrap().unsent, 1);

    // Once nothing of it waits (here the record is deleted before it went), it goes.
    c.delete_item(&record.id).await.unwrap();
    wait_for(&mut watcher, &d, "WO-2", WorkOrderChange::Removed).await;
    assert!(c.work_orders().await.unwrap().is_empty(), "{}", d.log());
}

fn expiry_options(age_secs: u64, env: Vec<(String, String)>) -> Options {
    Options {
        sync: format!(
            "{}[work_orders]\nexpire_after_secs = {age_secs}\nwarn_before_secs = 60\n",
            Options::default().sync
        ),
        env,
        ..Options::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Once the daemon's first look after a start has had time to run: both work orders
/// are still cached, as arrived about now, and expire `age_ms` after that.
async fn assert_both_kept_from_now(d: &Daemon, age_ms: i64) {
    let mut c = d.client().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list = c.work_orders().await.unwrap();
    assert_eq!(list.len(), 2, "{}", d.log());
    for w in &list {
        assert!((w.received_ms - now_ms()).abs() < 60_000, "{w:?}");
        assert_eq!(w.expires_ms, Some(w.received_ms + age_ms));
    }
}

/// A handheld whose clock was a year behind when its work orders came, set right by NTP
/// since: their age counts from when they came, not from the stale stamp, while the
/// daemon runs and after it restarts.
#[tokio::test]
async fn a_clock_set_after_work_orders_came_does_not_age_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "-365d\n").unwrap();
    let hour = 3_600_000;
    let mut d = Daemon::start_with(expiry_options(3600, fieldsync_tests::faketime_env(&clock)));
    let mut c = d.client().await;
    let stale = c.work_orders().await.unwrap();
    assert_eq!(stale.len(), 2);
    assert!(
        stale[0].received_ms < now_ms() - 300 * 24 * hour,
        "the daemon's clock is a year behind: {stale:?}"
    );

    std::fs::write(&clock, "+0\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for w in c.work_orders().await.unwrap() {
        assert!((w.received_ms - now_ms()).abs() < 60_000, "{w:?}");
        assert_eq!(w.expires_ms, Some(w.received_ms + hour));
    }

    // A restart in the same boot looks at once: a year-old stamp would expire now.
    d.restart();
    assert_both_kept_from_now(&d, hour).await;
    // And the corrected arrival is what the store keeps.
    let kept: i64 = d
        .db()
        .query_row("SELECT min(received_ms) FROM work_orders", [], |r| r.get(0))
        .unwrap();
    assert!((kept - now_ms()).abs() < 60_000, "{kept}");
}

/// Work orders stamped in an earlier boot by a clock never set (1970) count their age
/// from the first look once the clock is right, instead of expiring at once.
#[tokio::test]
async fn work_orders_stamped_by_an_unset_clock_count_from_when_it_was_set() {
    let mut d = Daemon::start_with(expiry_options(3600, Vec::new()));
    d.client().await.work_orders().await.unwrap();
    d.stop();
    d.db()
        .execute(
            "UPDATE work_orders SET received_ms = 86400000, received_boot = 'an earlier boot'",
            [],
        )
        .unwrap();
    d.spawn();
    assert_both_kept_from_now(&d, 3_600_000).await;
}
