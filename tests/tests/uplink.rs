//! Store and forward over a real Mosquitto to the test back office: every change reaches
//! the back office exactly once, in order per work order, whatever happens to the link,
//! the broker or the daemon.

use std::collections::HashMap;
use std::time::Duration;

use fieldsync_tests::backoffice::{Applied, BackOffice};
use fieldsync_tests::broker::Broker;
use fieldsync_tests::{Daemon, Options};
use ui_bridge::{RecordBody, SyncState};

const DEVICE: &str = "dev-test";

fn uplink_options(broker: &Broker) -> Options {
    Options {
        uplink: format!(
            "broker = \"{}\"\ndevice_id = \"{DEVICE}\"\nack_timeout_secs = 3\nreconnect_min_ms = 50\nreconnect_max_secs = 1\n",
            broker.url()
        ),
        ..Options::default()
    }
}

fn note(text: String) -> RecordBody {
    RecordBody::Note { text }
}

/// Each item applied once, and per work order in the order captured.
fn assert_exactly_once_in_order(applied: &[Applied], captured: &[(String, String)]) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for a in applied {
        *count.entry(a.item.as_str()).or_default() += 1;
    }
    for (item, _) in captured {
        assert_eq!(
            count.get(item.as_str()),
            Some(&1),
            "item {item} applied once"
        );
    }
    assert_eq!(applied.len(), captured.len(), "nothing else applied");
    let mut per_wo: HashMap<&str, Vec<&str>> = HashMap::new();
    for a in applied {
        per_wo
            .entry(a.wo.as_str())
            .or_default()
            .push(a.item.as_str());
    }
    let mut expected: HashMap<&str, Vec<&str>> = HashMap::new();
    for (item, wo) in captured {
        expected.entry(wo.as_str()).or_default().push(item.as_str());
    }
    assert_eq!(per_wo, expected, "order per work order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_captured_while_the_broker_is_down_arrive_once_in_order() {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    broker.stop();
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let mut captured = Vec::new();
    for i in 0..1000 {
        let wo = if i % 3 == 0 { "WO-2" } else { "WO-1" };
        let item = c
            .add_record(wo, note(format!("reading {i}")))
            .await
            .unwrap();
        captured.push((item.id, wo.to_owned()));
    }
    assert_eq!(c.status().await.unwrap().unsent, 1000);
    assert_eq!(c.status().await.unwrap().broker, "down");
    let t = std::time::Instant::now();
    broker.spawn();
    let applied = bo.wait_applied(1000, Duration::from_secs(60)).await;
    eprintln!("drained 1000 in {:?}", t.elapsed());
    assert_exactly_once_in_order(&applied, &captured);
    // The device learns of every acknowledgement.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status().await.unwrap();
        if s.unsent == 0 {
            assert_eq!(s.broker, "up");
            assert!(s.last_upload_ms.is_some());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "unsent stays at {}",
            s.unsent
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wo = c.work_order("WO-1").await.unwrap();
    assert!(wo.items.iter().all(|i| i.state == SyncState::Delivered));
}

async fn wait_state(
    c: &mut ui_bridge::Client,
    wo: &str,
    item: &str,
    state: SyncState,
) -> ui_bridge::Item {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let detail = c.work_order(wo).await.unwrap();
        if let Some(i) = detail.items.iter().find(|i| i.id == item) {
            if i.state == state {
                return i.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "item {item} never became {state:?}: {detail:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_holds_back_only_its_work_order_until_fixed_or_discarded() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.set_refuse(Some(Box::new(|a| {
        a.body["text"]
            .as_str()
            .filter(|t| t.contains("BAD"))
            .map(|_| {
                (
                    "conflict".to_owned(),
                    "work order closed by someone else".to_owned(),
                )
            })
    })));
    let d = Daemon::start_with(uplink_options(&broker));
    let mut watcher = d.client().await;
    watcher.subscribe().await.unwrap();
    let mut c = d.client().await;
    let r1 = c.add_record("WO-1", note("ok 1".into())).await.unwrap();
    let r2 = c.add_record("WO-1", note("BAD 2".into())).await.unwrap();
    let r3 = c
        .add_record("WO-1", note("after the bad one".into()))
        .await
        .unwrap();
    let r4 = c
        .add_record("WO-2", note("other work order".into()))
        .await
        .unwrap();

    let refused = wait_state(&mut c, "WO-1", &r2.id, SyncState::Refused).await;
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("closed by someone else"),
        "{refused:?}"
    );
    wait_state(&mut c, "WO-1", &r1.id, SyncState::Delivered).await;
    wait_state(&mut c, "WO-2", &r4.id, SyncState::Delivered).await;
    // The later change of the same work order waits; give it every chance to leak.
    c.sync_now().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let applied: Vec<String> = bo.applied().iter().map(|a| a.item.clone()).collect();
    assert!(!applied.contains(&r3.id), "held back behind the refusal");
    assert!(!applied.contains(&r2.id));
    let r3_now = c
        .work_order("WO-1")
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|i| i.id == r3.id)
        .unwrap();
    assert_eq!(r3_now.state, SyncState::Waiting);
    // The app heard about the refusal.
    let mut saw_refusal = false;
    while let Ok(Ok(ev)) =
        tokio::time::timeout(Duration::from_millis(200), watcher.next_event()).await
    {
        if let ui_bridge::Event::ItemState {
            item_id,
            state: Some(SyncState::Refused),
            reason,
            ..
        } = ev
        {
            assert_eq!(item_id, r2.id);
            assert!(reason.is_some());
            saw_refusal = true;
        }
    }
    assert!(saw_refusal);

    // Fixed and sent again: delivered, then the held one follows, in order.
    c.edit_record(&r2.id, note("fixed 2".into())).await.unwrap();
    wait_state(&mut c, "WO-1", &r3.id, SyncState::Delivered).await;
    let order: Vec<String> = bo
        .applied()
        .iter()
        .filter(|a| a.wo == "WO-1")
        .map(|a| a.item.clone())
        .collect();
    assert_eq!(order, vec![r1.id.clone(), r2.id.clone(), r3.id.clone()]);
    assert_eq!(
        bo.applied().iter().find(|a| a.item == r2.id).unwrap().body["text"],
        "fixed 2"
    );

    // Discarded: the refused creation disappears, the next change goes.
    let r5 = c.add_record("WO-2", note("BAD 5".into())).await.unwrap();
    let r6 = c.add_record("WO-2", note("six".into())).await.unwrap();
    wait_state(&mut c, "WO-2", &r5.id, SyncState::Refused).await;
    assert_eq!(c.discard(&r5.id).await.unwrap(), None);
    wait_state(&mut c, "WO-2", &r6.id, SyncState::Delivered).await;
    assert!(c
        .work_order("WO-2")
        .await
        .unwrap()
        .items
        .iter()
        .all(|i| i.id != r5.id));
    assert!(bo.applied().iter().all(|a| a.item != r5.id));
    assert_eq!(c.status().await.unwrap().unsent, 0);
    // Only refused changes can be discarded or retried.
    let err = c.discard(&r6.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ui_bridge::ErrorCode::NotEditable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_during_a_drain_lose_nothing_and_apply_nothing_twice() {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(Options {
        // Small batches, so each restart lands in the middle of the drain.
        uplink: format!(
            "{}batch_max_ops = 20\nwindow = 2\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let mut captured = Vec::new();
    for i in 0..2000 {
        let wo = ["WO-1", "WO-2"][i % 2];
        let item = c
            .add_record(wo, note(format!("reading {i}")))
            .await
            .unwrap();
        captured.push((item.id, wo.to_owned()));
    }
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(30 + (round * 7) % 40)).await;
        if round % 2 == 0 {
            broker.kill();
        } else {
            broker.stop();
        }
        broker.spawn();
    }
    let applied = bo
        .wait_applied(captured.len(), Duration::from_secs(120))
        .await;
    assert_exactly_once_in_order(&applied, &captured);
    let duplicates = bo.state.lock().unwrap().duplicates;
    eprintln!("duplicates received and ignored by the back office: {duplicates}");
    // Proof that cuts landed mid-flight: some operations were sent twice.
    assert!(duplicates > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kills_during_a_drain_lose_nothing_and_apply_nothing_twice() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let mut d = Daemon::start_with(Options {
        uplink: format!(
            "{}batch_max_ops = 20\nwindow = 2\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    // Capture with the uplink unable to keep up, then kill the daemon mid-drain.
    let mut captured = Vec::new();
    let mut c = d.client().await;
    for i in 0..2000 {
        let wo = ["WO-1", "WO-2"][i % 2];
        let item = c
            .add_record(wo, note(format!("reading {i}")))
            .await
            .unwrap();
        captured.push((item.id, wo.to_owned()));
    }
    drop(c);
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(20 + (round * 13) % 50)).await;
        d.kill();
        d.spawn();
    }
    let applied = bo
        .wait_applied(captured.len(), Duration::from_secs(120))
        .await;
    assert_exactly_once_in_order(&applied, &captured);
    let mut c = d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.status().await.unwrap().unsent > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "acknowledgements reach the device"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let duplicates = bo.state.lock().unwrap().duplicates;
    eprintln!("duplicates received and ignored by the back office: {duplicates}");
    // Proof that cuts landed mid-flight: some operations were sent twice.
    assert!(duplicates > 0);
}
