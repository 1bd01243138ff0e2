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
