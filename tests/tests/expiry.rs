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
