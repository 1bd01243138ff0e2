//! Store and forward over a real Mosquitto to the test back office: every change reaches
//! the back office exactly once, in order per work order, whatever happens to the link,
//! the broker or the daemon. The drains also run over Aedes, a second broker that keeps
//! nothing across a restart: no session, no subscription, no queued message.

use std::collections::HashMap;
use std::time::Duration;

use fieldsync_tests::backoffice::{Applied, BackOffice};
use fieldsync_tests::broker::{Broker, Kind};
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
    captured_while_down_then_drained(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_records_captured_while_the_broker_is_down_arrive_once_in_order() {
    captured_while_down_then_drained(Kind::Aedes).await;
}

async fn captured_while_down_then_drained(kind: Kind) {
    let mut broker = Broker::start_kind(kind, None);
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
    let down = c.status().await.unwrap();
    assert_eq!(down.broker, "down");
    assert!(down.last_error.is_some(), "why the broker is not reached");
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
            // The banner no longer shows why the broker was away.
            assert_eq!(s.last_error, None);
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

/// The device's retained status as a subscriber arriving now reads it, once it reads
/// `want` (within 10 s).
fn wait_retained_status(broker: &Broker, want: &str) {
    let topic = format!("fieldsync/v1/{DEVICE}/status");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(["-t", &topic, "-C", "1", "-W", "2"])
            .output()
            .expect("mosquitto_sub runs (scripts/install-deps.sh installs it)");
        let seen = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let state = serde_json::from_str::<serde_json::Value>(&seen)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_owned));
        if state.as_deref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retained status reads {seen:?}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Online while connected; offline as the last will when the daemon dies, and from the
/// daemon itself on a clean stop.
async fn status_is_retained(kind: Kind) {
    let broker = Broker::start_kind(kind, None);
    let mut d = Daemon::start_with(uplink_options(&broker));
    wait_retained_status(&broker, "online");
    d.kill();
    wait_retained_status(&broker, "offline");
    d.spawn();
    wait_retained_status(&broker, "online");
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    wait_retained_status(&broker, "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_status_is_retained_with_a_last_will() {
    status_is_retained(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_the_device_status_is_retained_with_a_last_will() {
    status_is_retained(Kind::Aedes).await;
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
    restarts_during_a_drain(Kind::Mosquitto).await;
}

/// Aedes forgets everything at each restart: what was queued for the back office is
/// gone, and only the device's outbox brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_broker_restarts_during_a_drain_lose_nothing_and_apply_nothing_twice() {
    restarts_during_a_drain(Kind::Aedes).await;
}

async fn restarts_during_a_drain(kind: Kind) {
    let mut broker = Broker::start_kind(kind, None);
    let bo = BackOffice::start(broker.port).await;
    bo.state.lock().unwrap().ops_ack_delay = Duration::from_millis(40);
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
    broker.stop();
    for i in 0..2000 {
        let wo = ["WO-1", "WO-2"][i % 2];
        let item = c
            .add_record(wo, note(format!("reading {i}")))
            .await
            .unwrap();
        captured.push((item.id, wo.to_owned()));
    }
    broker.spawn();
    let mut cuts_mid_drain = 0;
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(30 + (round * 7) % 40)).await;
        if c.status().await.unwrap().unsent > 0 {
            cuts_mid_drain += 1;
        }
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
    eprintln!("{cuts_mid_drain} of 20 cuts landed mid-drain; {duplicates} repeats ignored by the back office");
    assert!(
        cuts_mid_drain >= 10,
        "only {cuts_mid_drain} cuts landed while operations were unsent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kills_during_a_drain_lose_nothing_and_apply_nothing_twice() {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.state.lock().unwrap().ops_ack_delay = Duration::from_millis(40);
    let mut d = Daemon::start_with(Options {
        uplink: format!(
            "{}batch_max_ops = 20\nwindow = 2\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    // Capture while the broker is away, then kill the daemon again and again mid-drain.
    let mut captured = Vec::new();
    let mut c = d.client().await;
    broker.stop();
    for i in 0..2000 {
        let wo = ["WO-1", "WO-2"][i % 2];
        let item = c
            .add_record(wo, note(format!("reading {i}")))
            .await
            .unwrap();
        captured.push((item.id, wo.to_owned()));
    }
    drop(c);
    broker.spawn();
    let mut cuts_mid_drain = 0;
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(20 + (round * 13) % 50)).await;
        if d.client().await.status().await.unwrap().unsent > 0 {
            cuts_mid_drain += 1;
        }
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
    eprintln!("{cuts_mid_drain} of 20 cuts landed mid-drain; {duplicates} repeats ignored by the back office");
    assert!(
        cuts_mid_drain >= 10,
        "only {cuts_mid_drain} cuts landed while operations were unsent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_pushes_work_orders_and_bad_downlink_is_ignored() {
    dispatcher_pushes(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_the_dispatcher_pushes_work_orders_and_bad_downlink_is_ignored() {
    dispatcher_pushes(Kind::Aedes).await;
}

async fn dispatcher_pushes(kind: Kind) {
    let broker = Broker::start_kind(kind, None);
    let bo = BackOffice::start(broker.port).await;
    // A device that starts with an empty cache asks for its full state.
    bo.state.lock().unwrap().work_orders.insert(
        DEVICE.into(),
        vec![serde_json::json!({"id": "WO-9", "version": 1, "title": "From the back office", "stage": "new", "workflow": ["new", "done"]})],
    );
    let d = Daemon::start_with(Options {
        work_orders: "[]".into(),
        uplink: format!(
            "{}max_downlink_bytes = 4096\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.work_orders().await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "full state arrives");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(bo.state.lock().unwrap().resync_requests, 1);
    let mut watcher = d.client().await;
    watcher.subscribe().await.unwrap();

    // Broken messages of every kind: logged, counted, nothing changes, nothing crashes.
    for (topic, payload) in [
        ("work-orders", b"{not json".to_vec()),
        ("work-orders", br#"{"v":7,"type":"upsert","work_orders":[]}"#.to_vec()),
        ("work-orders", br#"{"v":1,"type":"explode"}"#.to_vec()),
        ("work-orders", br#"{"v":1,"type":"upsert","work_orders":[{"id":"","version":1,"title":"x","stage":"a","workflow":["a"]}]}"#.to_vec()),
        ("work-orders", vec![0x28, 0xb5, 0x2f, 0xfd, 0, 1, 2]),
        ("acks", br#"{"v":1,"acks":["no-such-operation"]}"#.to_vec()),
        ("acks", b"[]".to_vec()),
        // A photo acknowledgement for a hash this device is not sending.
        ("photo-acks", format!(r#"{{"v":1,"sha256":"{}","received":5,"complete":true}}"#, "cd".repeat(32)).into_bytes()),
        ("photo-acks", b"{\"v\":1}".to_vec()),
        ("nonsense", b"hello".to_vec()),
    ] {
        bo.publish_down(DEVICE, topic, payload).await;
    }
    // Over the size limit (4 KiB here).
    let big = serde_json::json!({"v": 1, "type": "upsert", "work_orders": [{"id": "WO-BIG", "version": 1, "title": "x".repeat(10_000), "stage": "a", "workflow": ["a"]}]});
    bo.publish_down(DEVICE, "work-orders", serde_json::to_vec(&big).unwrap())
        .await;

    // A good push still works after all that, and the app hears of it.
    bo.push_work_orders(
        DEVICE,
        vec![serde_json::json!({
            "id": "WO-10", "version": 1, "title": "New today", "stage": "new",
            "workflow": ["new", "accepted", "done"], "scheduled_for": "2026-11-23"
        })],
    )
    .await;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watcher.next_event())
            .await
            .expect("event")
            .unwrap();
        if ev
            == (ui_bridge::Event::WorkOrder {
                work_order_id: "WO-10".into(),
                change: ui_bridge::WorkOrderChange::Added,
            })
        {
            break;
        }
    }
    let ids: Vec<String> = c
        .work_orders()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"WO-9".to_owned()) && ids.contains(&"WO-10".to_owned()));
    let status = c.status().await.unwrap();
    assert!(status.last_download_ms.is_some());
    assert!(
        status.last_error.unwrap_or_default().contains("bad"),
        "the last error names the bad message"
    );
    let log = d.log();
    assert!(
        log.matches("downlink message ignored").count() >= 8,
        "{log}"
    );
    // A changed version replaces it; an older one is ignored.
    bo.push_work_orders(DEVICE, vec![serde_json::json!({"id": "WO-10", "version": 2, "title": "Changed", "stage": "new", "workflow": ["new", "accepted", "done"]})]).await;
    bo.push_work_orders(DEVICE, vec![serde_json::json!({"id": "WO-10", "version": 1, "title": "Stale", "stage": "new", "workflow": ["new", "accepted", "done"]})]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let w = c.work_order("WO-10").await.unwrap();
        if w.summary.title == "Changed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.work_order("WO-10").await.unwrap().summary.title,
        "Changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_a_wrong_ca_is_refused() {
    tls_with_client_certificates(Kind::Mosquitto).await;
}

/// Node.js's TLS server instead of Mosquitto's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_tls_with_client_certificates_and_a_wrong_ca_is_refused() {
    tls_with_client_certificates(Kind::Aedes).await;
}

async fn tls_with_client_certificates(kind: Kind) {
    let certs = tempfile::tempdir().unwrap();
    let pki = fieldsync_tests::pki::make(certs.path(), "fleet");
    let other = fieldsync_tests::pki::make(certs.path(), "stranger");
    let broker = Broker::start_kind(
        kind,
        Some(fieldsync_tests::broker::TlsListener {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
    );
    let bo = BackOffice::start(broker.port).await;
    let tls_url = format!("mqtts://127.0.0.1:{}", broker.tls_port.unwrap());
    let tls_options = |ca: &std::path::Path| {
        Options {
        uplink: format!(
            // An ALPN name the broker does not ask for is offered and does no harm.
            "broker = \"{tls_url}\"\ndevice_id = \"{DEVICE}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nreconnect_max_secs = 1\nalpn = [\"mqtt\"]\n",
            ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
        ..Options::default()
    }
    };

    let d = Daemon::start_with(tls_options(&pki.ca));
    let mut c = d.client().await;
    let item = c.add_record("WO-1", note("over TLS".into())).await.unwrap();
    let applied = bo.wait_applied(1, Duration::from_secs(20)).await;
    assert_eq!(applied[0].item, item.id);
    drop(c);
    drop(d);

    // A broker whose certificate our CA did not sign is never trusted.
    let d = Daemon::start_with(tls_options(&other.ca));
    let mut c = d.client().await;
    let kept = c
        .add_record("WO-1", note("must not leak".into()))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        // Between tries the broker is `connecting` with the last error kept.
        let status = c.status().await.unwrap();
        if status.last_error.is_some() && status.broker == "down" {
            break status;
        }
        assert_ne!(status.broker, "up");
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let err = status.last_error.unwrap_or_default();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("TLS") || err.contains("Tls"),
        "{err}"
    );
    assert_eq!(status.unsent, 1);
    assert!(bo.applied().iter().all(|a| a.item != kept.id));

    // Without a client certificate the broker refuses the device.
    let d = Daemon::start_with(Options {
        uplink: format!("broker = \"{tls_url}\"\ndevice_id = \"{DEVICE}\"\nca_file = \"{}\"\nreconnect_max_secs = 1\n", pki.ca.display()),
        ..Options::default()
    });
    let mut c = d.client().await;
    c.add_record("WO-1", note("no client cert".into()))
        .await
        .unwrap();
    // Never up, for two seconds of tries, and seen down with the reason.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        assert_ne!(c.status().await.unwrap().broker, "up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.status().await.unwrap();
        if s.broker == "down" && s.last_error.is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never down: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bo.applied().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_an_expired_certificate_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    let pki = fieldsync_tests::pki::make(certs.path(), "fleet");
    // The right CA signed it, but its time is over.
    let broker = Broker::start_with(Some(fieldsync_tests::broker::TlsListener {
        ca: pki.ca.clone(),
        cert: pki.expired_server_cert.clone(),
        key: pki.expired_server_key.clone(),
    }));
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(Options {
        uplink: format!(
            "broker = \"mqtts://127.0.0.1:{}\"\ndevice_id = \"{DEVICE}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nreconnect_max_secs = 1\n",
            broker.tls_port.unwrap(),
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let kept = c
        .add_record("WO-1", note("not for an expired broker".into()))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = c.status().await.unwrap();
        if s.last_error.is_some() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no error: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.broker, "down");
    let err = status.last_error.unwrap_or_default().to_lowercase();
    assert!(err.contains("expired"), "the error says why: {err}");
    assert_eq!(status.unsent, 1);
    assert!(bo.applied().iter().all(|a| a.item != kept.id));
    assert!(
        d.log().to_lowercase().contains("expired"),
        "the log says why:\n{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_cut_three_times_resumes_and_arrives_verified() {
    photo_cut_three_times(Kind::Mosquitto).await;
}

/// Chunks the broker held for the back office are gone with each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_a_photo_cut_three_times_resumes_and_arrives_verified() {
    photo_cut_three_times(Kind::Aedes).await;
}

async fn photo_cut_three_times(kind: Kind) {
    const CHUNK: u64 = 32 * 1024;
    const WINDOW: u64 = 4;
    let mut broker = Broker::start_kind(kind, None);
    let bo = BackOffice::start(broker.port).await;
    // Slow confirmations so the upload can be cut in the middle, three times.
    bo.state.lock().unwrap().photo_ack_delay = Duration::from_millis(15);
    let d = Daemon::start_with(Options {
        uplink: format!(
            "{}photo_chunk_bytes = {CHUNK}\nphoto_window = {WINDOW}\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let record = c
        .add_record("WO-1", note("pump housing".into()))
        .await
        .unwrap();
    let (path, bytes) = fieldsync_tests::photo_file(d.dir.path(), "big.jpg", 5 * 1024 * 1024);
    let sha = fieldsync_tests::sha256_hex(&bytes);
    let later = c
        .add_record("WO-1", note("taken after the photo".into()))
        .await
        .unwrap();
    let photo = c
        .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
        .await
        .unwrap();

    // Records never wait for photos.
    let applied = bo.wait_applied(2, Duration::from_secs(20)).await;
    assert_eq!(applied[1].item, later.id);

    for cut in 1..=3u64 {
        let target = cut * bytes.len() as u64 / 4;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = bo
                .state
                .lock()
                .unwrap()
                .photos
                .get(&sha)
                .map_or(0, |p| p.data.len() as u64);
            if got >= target {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "upload reaches {target} bytes (at {got})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        broker.kill();
        broker.spawn();
    }
    let applied = bo.wait_applied(3, Duration::from_secs(60)).await;
    let photo_op = applied
        .iter()
        .find(|a| a.item == photo.id)
        .expect("photo operation applied");
    assert_eq!(photo_op.body["sha256"], sha);
    assert_eq!(photo_op.body["record_id"], record.id);
    let rx = bo.state.lock().unwrap().photos.get(&sha).cloned().unwrap();
    assert!(rx.complete);
    assert_eq!(rx.data, bytes);
    let bound = 3 * (CHUNK + WINDOW * CHUNK);
    eprintln!("resent after 3 cuts: {} bytes (bound {bound})", rx.resent);
    assert!(rx.resent <= bound, "resent {} > {bound}", rx.resent);
    wait_state(&mut c, "WO-1", &photo.id, SyncState::Delivered).await;
}

/// A photo whose file was damaged on the device after it was stored (failing flash, a
/// hand in the state folder) is refused on the device once the back office reports its
/// bytes wrong, instead of going again from the start for ever; the record it belongs
/// to is delivered all the same. The same photo attached again is stored anew and goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_damaged_on_the_device_is_refused_there_not_sent_for_ever() {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    broker.stop();
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("gasket".into())).await.unwrap();
    let (path, bytes) = fieldsync_tests::photo_file(d.dir.path(), "p.jpg", 100 * 1024);
    let sha = fieldsync_tests::sha256_hex(&bytes);
    let photo = c
        .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
        .await
        .unwrap();
    let stored = d.state_dir.join("photos").join(&sha[..2]).join(&sha);
    let mut damaged = std::fs::read(&stored).unwrap();
    damaged[5000] ^= 0x40;
    std::fs::write(&stored, &damaged).unwrap();
    // And one whose file is gone altogether: it cannot even be read.
    let (gone_path, gone_bytes) = fieldsync_tests::photo_file(d.dir.path(), "q.jpg", 1000);
    let gone_sha = fieldsync_tests::sha256_hex(&gone_bytes);
    let gone = c
        .attach_photo(
            &record.id,
            &std::fs::File::open(&gone_path).unwrap(),
            None,
            None,
        )
        .await
        .unwrap();
    std::fs::remove_file(
        d.state_dir
            .join("photos")
            .join(&gone_sha[..2])
            .join(&gone_sha),
    )
    .unwrap();

    broker.spawn();
    let refused = wait_state(&mut c, "WO-1", &photo.id, SyncState::Refused).await;
    let reason = refused.reason.unwrap_or_default();
    assert!(reason.starts_with("photo_damaged:"), "{reason}");
    let refused = wait_state(&mut c, "WO-1", &gone.id, SyncState::Refused).await;
    let reason = refused.reason.unwrap_or_default();
    assert!(reason.starts_with("photo_damaged:"), "{reason}");
    bo.wait_applied(1, Duration::from_secs(20)).await;
    let sent = |bo: &BackOffice| {
        bo.state
            .lock()
            .unwrap()
            .photos
            .get(&sha)
            .map_or(0, |p| p.chunks)
    };
    let chunks = sent(&bo);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sent(&bo),
        chunks,
        "nothing more is sent of the damaged file"
    );

    // Attached again, the photo replaces the damaged file and arrives whole.
    let again = c
        .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);
    // Like any refusal, each holds back what comes after it in its work order.
    c.discard(&photo.id).await.unwrap();
    c.discard(&gone.id).await.unwrap();
    wait_state(&mut c, "WO-1", &again.id, SyncState::Delivered).await;
    let rx = bo.state.lock().unwrap().photos.get(&sha).cloned().unwrap();
    assert!(rx.complete);
    assert_eq!(rx.data, bytes);
}

/// The device was away while the dispatcher pushed a work order. Mosquitto kept the
/// device's session across its restart and hands the push over; Aedes forgot the
/// session and the push with it, and the device, finding no session, asks for the full
/// state, which brings the work order all the same.
async fn pushed_while_away(kind: Kind) {
    let mut broker = Broker::start_kind(kind, None);
    let bo = BackOffice::start(broker.port).await;
    let wo = |id: &str| serde_json::json!({"id": id, "version": 1, "title": "Pushed", "stage": "new", "workflow": ["new", "done"]});
    bo.state
        .lock()
        .unwrap()
        .work_orders
        .insert(DEVICE.into(), vec![wo("WO-9")]);
    let mut d = Daemon::start_with(Options {
        work_orders: "[]".into(),
        ..uplink_options(&broker)
    });
    let mut c = d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.work_orders().await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "full state arrives");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (asked, connections) = {
        let st = bo.state.lock().unwrap();
        (st.resync_requests, st.connections)
    };
    drop(c);
    d.kill();
    broker.stop();
    broker.spawn();
    // The back office is back on the broker before it pushes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bo.state.lock().unwrap().connections == connections {
        assert!(
            std::time::Instant::now() < deadline,
            "back office reconnects"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bo.push_work_orders(DEVICE, vec![wo("WO-10")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.spawn();
    let mut c = d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.work_order("WO-10").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the work order pushed while the device was away never arrived"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let asked_again = bo.state.lock().unwrap().resync_requests - asked;
    match kind {
        // The session held the push: no need for the full state.
        Kind::Mosquitto => assert_eq!(asked_again, 0),
        Kind::Aedes => assert_eq!(asked_again, 1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_order_pushed_while_the_device_was_away_arrives() {
    pushed_while_away(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_a_work_order_pushed_while_the_broker_forgot_the_device_arrives() {
    pushed_while_away(Kind::Aedes).await;
}

/// A first start's full state names an attachment: it is fetched at once, not at the
/// next sync something else starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_named_in_the_full_state_are_fetched() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    use sha2::Digest;
    let file: Vec<u8> = (0..200 * 1024).map(|_| rand::random::<u8>()).collect();
    let sha = hex::encode(sha2::Sha256::digest(&file));
    {
        let mut st = bo.state.lock().unwrap();
        st.attachment_files.insert(sha.clone(), file.clone());
        st.work_orders.insert(
            DEVICE.into(),
            vec![serde_json::json!({
                "id": "WO-30", "version": 1, "title": "With a drawing", "stage": "new",
                "workflow": ["new", "done"],
                "attachments": [{"id": "dwg", "name": "layout.pdf", "size": file.len(), "sha256": sha}]
            })],
        );
    }
    let d = Daemon::start_with(Options {
        work_orders: "[]".into(),
        ..uplink_options(&broker)
    });
    let mut c = d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(wo) = c.work_order("WO-30").await {
            if wo.attachments.iter().all(|a| a.downloaded) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the attachment was not fetched:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A push the store cannot take is left unacknowledged, so the broker hands it over again
/// on the next connection and it is stored then. Here another process holds the
/// database's write lock past the daemon's busy timeout; a full or failing disk does the
/// same on a handheld. Acknowledged anyway (or on reading), the push would be gone while
/// the back office believes it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_the_store_cannot_take_comes_again_once_it_can() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let wo = |id: &str| serde_json::json!({"id": id, "version": 1, "title": "Pushed", "stage": "new", "workflow": ["new", "done"]});
    // Subscribed: a first push arrives.
    push_until_seen(&bo, &mut c, wo("WO-A")).await;

    let lock = rusqlite::Connection::open(d.state_dir.join("fieldsync.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    bo.push_work_orders(DEVICE, vec![wo("WO-B")]).await;
    // The daemon waits 5 s for the lock, then gives up on this delivery.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !d.log().contains("database is locked") {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure is logged:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Pushed once, stored all the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.work_order("WO-B").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "WO-B comes again and is stored:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delivered again by the broker, not brought by a full state.
    assert_eq!(bo.state.lock().unwrap().resync_requests, 1, "{}", d.log());
}

/// Pushes a work order until the device has that version. A push that reaches the
/// broker before the device's subscription (its first, or after a broker restart without
/// persistence) has no session to wait in and is lost; the dispatcher sends it again.
async fn push_until_seen(bo: &BackOffice, c: &mut ui_bridge::Client, wo: serde_json::Value) {
    let id = wo["id"].as_str().unwrap().to_owned();
    let version = wo["version"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        bo.push_work_orders(DEVICE, vec![wo.clone()]).await;
        for _ in 0..50 {
            if c.work_order(&id)
                .await
                .is_ok_and(|w| w.summary.version == version)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} v{version} never arrives"
        );
    }
}

/// Bytes of attachment `sha` the back office has sent so far.
fn attachment_sent(bo: &BackOffice, sha: &str) -> u64 {
    bo.state
        .lock()
        .unwrap()
        .attachment_bytes_sent
        .get(sha)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_download_resume_after_cuts_and_are_checked() {
    use sha2::Digest;
    const WINDOW: u64 = 4 * 32 * 1024;
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let drawing: Vec<u8> = (0..3 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();
    let manual: Vec<u8> = (0..100 * 1024).map(|_| rand::random::<u8>()).collect();
    let (good, bad) = (
        hex::encode(sha2::Sha256::digest(&drawing)),
        hex::encode(sha2::Sha256::digest(&manual)),
    );
    let unknown = "ab".repeat(32);
    {
        let mut st = bo.state.lock().unwrap();
        st.attachment_files.insert(good.clone(), drawing.clone());
        st.attachment_files.insert(bad.clone(), manual.clone());
        // The back office serves the manual with a byte changed: it never checks out.
        st.corrupt_attachments.insert(bad.clone());
    }
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    // Slow enough to cut in the middle: each window waits a little.
    bo.state.lock().unwrap().attachment_delay = Duration::from_millis(40);
    push_until_seen(
        &bo,
        &mut c,
        serde_json::json!({
            "id": "WO-20", "version": 1, "title": "With drawings", "stage": "new",
            "workflow": ["new", "done"],
            "attachments": [
                {"id": "dwg", "name": "layout.pdf", "size": drawing.len(), "sha256": good},
                {"id": "man", "name": "manual.pdf", "size": manual.len(), "sha256": bad},
                {"id": "old", "name": "gone.pdf", "size": 10, "sha256": unknown},
            ]
        }),
    )
    .await;

    // Two cuts in the middle of the drawing.
    for cut in 1..=2u64 {
        let target = cut * drawing.len() as u64 / 3;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while attachment_sent(&bo, &good) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "download reaches {target} bytes (at {}):\n{}",
                attachment_sent(&bo, &good),
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !d.state_dir.join("attachments").join(&good).exists(),
            "cut {cut} comes in the middle of the download"
        );
        broker.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker.spawn();
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let wo = c.work_order("WO-20").await.unwrap();
        let done = |id: &str| wo.attachments.iter().any(|a| a.id == id && a.downloaded);
        if done("dwg") {
            assert!(!done("man") && !done("old"), "{:?}", wo.attachments);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drawing not downloaded: {:?}\n{}",
            wo.attachments,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The app reads it through a descriptor the daemon hands over.
    let (a, fd) = c.open_attachment("WO-20", "dwg").await.unwrap();
    assert_eq!((a.name.as_str(), a.downloaded), ("layout.pdf", true));
    let mut stored = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut stored).unwrap();
    assert!(stored == drawing, "the stored drawing is the drawing");
    let err = c.open_attachment("WO-20", "man").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ui_bridge::ErrorCode::AttachmentUnavailable)
    );
    let err = c.open_attachment("WO-20", "../etc").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ui_bridge::ErrorCode::AttachmentUnavailable)
    );
    // Resumed, not restarted: each cut costs at most the window asked for ahead.
    let sent = attachment_sent(&bo, &good);
    let extra = sent - drawing.len() as u64;
    eprintln!(
        "drawing: {} bytes, {sent} sent, {extra} again after 2 cuts",
        drawing.len()
    );
    assert!(extra <= 2 * WINDOW, "{extra} bytes sent again");

    // The corrupted manual is fetched a few times, then left; the reason is told. The
    // back office's word on the attachment it does not have is logged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let err = c.status().await.unwrap().last_error.unwrap_or_default();
        let log = d.log();
        if log.matches("does not match its SHA-256").count() >= 3
            && log.contains("cannot serve an attachment")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{err}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(attachment_sent(&bo, &bad) <= 3 * manual.len() as u64);
    assert!(!d.state_dir.join("attachments").join(&bad).exists());
    // It rests: a new connection does not fetch it three times more.
    let before = attachment_sent(&bo, &bad);
    broker.kill();
    broker.spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.log().contains("rests before it is tried again")
        || c.status().await.unwrap().broker != "up"
    {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.sync_now().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attachment_sent(&bo, &bad), before, "fetched again at once");
    // The app can say why neither came.
    let wo = c.work_order("WO-20").await.unwrap();
    let problem = |id: &str| {
        wo.attachments
            .iter()
            .find(|a| a.id == id)
            .and_then(|a| a.problem.clone())
            .unwrap_or_default()
    };
    assert!(
        problem("man").contains("did not match its SHA-256 3 times"),
        "{:?}",
        wo.attachments
    );
    assert!(
        problem("old").contains("cannot serve"),
        "{:?}",
        wo.attachments
    );
    assert!(problem("dwg").is_empty(), "{:?}", wo.attachments);

    // A work order that drops an attachment lets its file go.
    push_until_seen(
        &bo,
        &mut c,
        serde_json::json!({
            "id": "WO-20", "version": 2, "title": "Without drawings", "stage": "new",
            "workflow": ["new", "done"]
        }),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.state_dir.join("attachments").join(&good).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "drawing file kept:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Letters and digits from a fixed seed: text that compresses about as little as text
/// can.
fn noise(seed: u64, len: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    use rand::SeedableRng;
    Alphanumeric.sample_string(&mut rand::rngs::StdRng::seed_from_u64(seed), len)
}

/// A change larger than the broker takes (`uplink.max_message_bytes`) cannot go. Sent,
/// it would cost the session and come first again on the next one, for ever, with
/// everything behind it. It turns red on the device instead and holds back only its own
/// work order; the rest goes in batches cut to fit, and once shortened it goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_for_the_broker_is_refused_on_the_device() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(Options {
        ui: "max_frame_bytes = 1048576\n".into(),
        uplink: format!(
            "{}max_message_bytes = 32768\nbatch_max_bytes = 1048576\nphoto_chunk_bytes = 16384\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let big = c.add_record("WO-1", note(noise(1, 200_000))).await.unwrap();
    let behind = c
        .add_record("WO-1", note("after the long one".into()))
        .await
        .unwrap();
    let mut others = Vec::new();
    for i in 0..100 {
        let item = c
            .add_record("WO-2", note(noise(i + 2, 1024)))
            .await
            .unwrap();
        others.push((item.id, "WO-2".to_owned()));
    }

    let refused = wait_state(&mut c, "WO-1", &big.id, SyncState::Refused).await;
    let reason = refused.reason.unwrap_or_default();
    assert!(reason.starts_with("too_large"), "{reason}");
    let applied = bo.wait_applied(100, Duration::from_secs(30)).await;
    assert_exactly_once_in_order(&applied, &others);
    let (batches, largest) = {
        let st = bo.state.lock().unwrap();
        (st.batches, st.largest_batch)
    };
    assert!(batches >= 2, "100 KiB of records went in {batches} message");
    assert!(largest <= 32768, "a message of {largest} bytes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bo.applied().len(), 100, "the change behind it waits");
    wait_state(&mut c, "WO-1", &behind.id, SyncState::Waiting).await;
    assert!(
        !d.log().contains("broker connection lost"),
        "the session was never lost:\n{}",
        d.log()
    );

    c.edit_record(&big.id, note("shortened".into()))
        .await
        .unwrap();
    let applied = bo.wait_applied(102, Duration::from_secs(30)).await;
    assert_eq!(applied[100].item, big.id);
    assert_eq!(applied[100].body["text"], "shortened");
    assert_eq!(applied[101].item, behind.id);
}

/// A broker that takes the connection and then drops it for a packet over its limit
/// (Mosquitto's `max_packet_size`, rumqttd's default 20 KiB) while the device's
/// `max_message_bytes` is larger. Every connection fails the same way, so the device
/// backs off instead of calling again every `reconnect_min_ms`, and says why the
/// connection dropped, not only that a publish could not go after it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_every_connection_is_called_with_growing_backoff() {
    let broker = Broker::start_mosquitto_with("max_packet_size 20000\n");
    let d = Daemon::start_with(Options {
        uplink: format!(
            "broker = \"{}\"\ndevice_id = \"{DEVICE}\"\nreconnect_min_ms = 50\nreconnect_max_secs = 2\n",
            broker.url()
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    // About 23 KB once compressed: over the broker's limit, under the device's.
    c.add_record("WO-1", note(noise(7, 30_000))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = d.log();
    let connects = log.matches("connected to the broker").count();
    assert!(connects >= 2, "the broker was called again:\n{log}");
    // 50, 100, 200, 400, 800 ms, then 2 s (each with jitter): a handful in 6 s, where a
    // backoff that starts over at every connection would make dozens.
    assert!(connects <= 12, "{connects} connections in 6 s:\n{log}");
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broker connection lost"))
        .collect();
    assert!(!lost.is_empty(), "{log}");
    assert!(
        lost.iter()
            .all(|l| !l.contains("Failed to send mqtt requests")),
        "the cause, not its echo:\n{}",
        lost.join("\n")
    );
}

/// Access rules that keep the device from reading its downlink: no acknowledgement could
/// ever arrive. The device says so, keeps what it captured, and retries with backoff
/// rather than sending the same batch every `ack_timeout_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_aedes_a_refused_subscription_is_reported() {
    let broker = Broker::start_aedes_refusing(&format!("fieldsync/v1/{DEVICE}/down/#"));
    let _bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    c.add_record("WO-1", note("kept".into())).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status().await.unwrap();
        let err = s.last_error.unwrap_or_default();
        if err.contains("refused the subscription") {
            assert!(err.contains("down/#"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no word of it: {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.status().await.unwrap().unsent, 1);
    // The backoff (50 ms doubling to 1 s here) is not reset by connections that fail
    // this way: a handful of tries in 3 s, not one every 50 ms.
    let before = d.log().matches("broker connection lost").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = d.log().matches("broker connection lost").count() - before;
    assert!(tries <= 12, "{tries} tries in 3 s");
}

/// An operation whose stored payload cannot be read (only damage can do that) would
/// stay first in line for ever: it turns red on the device instead, holding back only
/// its work order, and an edit sends the item as it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_operation_is_refused_on_the_device() {
    let mut broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    broker.stop();
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let damaged = c
        .add_record("WO-1", note("pump housing".into()))
        .await
        .unwrap();
    let fine = c
        .add_record("WO-2", note("gate locked".into()))
        .await
        .unwrap();
    // Listing the outbox moves the captures into it.
    assert_eq!(c.outbox(None).await.unwrap().len(), 2);
    let hit = d
        .db()
        .execute(
            "UPDATE outbox SET payload = '{\"text\": ' WHERE item_id = ?1",
            [&damaged.id],
        )
        .unwrap();
    assert_eq!(hit, 1);
    broker.spawn();
    let refused = wait_state(&mut c, "WO-1", &damaged.id, SyncState::Refused).await;
    let reason = refused.reason.unwrap_or_default();
    assert!(reason.starts_with("unreadable"), "{reason}");
    let applied = bo.wait_applied(1, Duration::from_secs(20)).await;
    assert_eq!(applied[0].item, fine.id);

    c.edit_record(&damaged.id, note("pump housing, cracked".into()))
        .await
        .unwrap();
    let applied = bo.wait_applied(2, Duration::from_secs(20)).await;
    assert_eq!(applied[1].item, damaged.id);
    assert_eq!(applied[1].body["text"], "pump housing, cracked");
}

/// A back office that gets one entry of its answer wrong must not make the device send
/// the whole batch again for ever: the entries it can read are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_in_an_answer_does_not_void_the_rest() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    // Slow enough that the answer written by hand below arrives first.
    bo.state.lock().unwrap().ops_ack_delay = Duration::from_secs(30);
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let acked = c.add_record("WO-1", note("valve".into())).await.unwrap();
    let refused = c.add_record("WO-2", note("seal".into())).await.unwrap();
    let op_of = |ops: &[ui_bridge::Operation], item: &str| {
        ops.iter()
            .find(|o| o.item_id == item)
            .map(|o| o.op_id.clone())
            .unwrap()
    };
    let ops = c.outbox(None).await.unwrap();
    let (acked_op, refused_op) = (op_of(&ops, &acked.id), op_of(&ops, &refused.id));
    wait_state(&mut c, "WO-1", &acked.id, SyncState::InProgress).await;
    let answer = serde_json::json!({"v": 1,
    "acks": [acked_op, 42],
    "refused": [
        {"id": refused_op, "code": "validation", "work_order": {"id": ["not", "a", "work order"]}},
        {"code": "conflict", "reason": "names no operation"}
    ]});
    bo.publish_down(DEVICE, "acks", serde_json::to_vec(&answer).unwrap())
        .await;
    wait_state(&mut c, "WO-1", &acked.id, SyncState::Delivered).await;
    let item = wait_state(&mut c, "WO-2", &refused.id, SyncState::Refused).await;
    assert_eq!(item.reason.as_deref(), Some("validation"));
    let log = d.log();
    for why in [
        "not a string: 42",
        "missing field `id`",
        "work order in a refusal",
    ] {
        assert!(log.contains(why), "the log names {why:?}:\n{log}");
    }
    assert_eq!(c.status().await.unwrap().unsent, 1);
}

/// A chunk the back office lost leaves a gap it will not fill from the chunks after it:
/// the device sees its confirmations stop and sends again from the last byte confirmed,
/// on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_chunk_lost_by_the_back_office_is_sent_again() {
    const CHUNK: u64 = 16 * 1024;
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.state.lock().unwrap().lose_photo_chunk_at = Some(2 * CHUNK);
    let d = Daemon::start_with(Options {
        uplink: format!(
            "{}photo_chunk_bytes = {CHUNK}\nphoto_window = 4\n",
            uplink_options(&broker).uplink
        ),
        ..Options::default()
    });
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("gasket".into())).await.unwrap();
    let (path, bytes) = fieldsync_tests::photo_file(d.dir.path(), "gap.jpg", 10 * CHUNK as usize);
    let sha = fieldsync_tests::sha256_hex(&bytes);
    let photo = c
        .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
        .await
        .unwrap();
    wait_state(&mut c, "WO-1", &photo.id, SyncState::Delivered).await;
    let rx = bo.state.lock().unwrap().photos.get(&sha).cloned().unwrap();
    assert!(rx.complete);
    assert_eq!(rx.data, bytes);
    assert_eq!(
        bo.state.lock().unwrap().connections,
        1,
        "no new connection was needed"
    );
    assert!(
        d.log().contains("photo chunks went unconfirmed"),
        "{}",
        d.log()
    );
}

/// Waits for a photo's file to leave the device's state folder.
async fn wait_file_gone(d: &Daemon, sha: &str, why: &str) {
    let path = d.state_dir.join("photos").join(&sha[..2]).join(sha);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{why}: {} stays\n{}",
            path.display(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A photo's file leaves the device once no row names it, however the last row went:
/// the inspector discarded the photo after the back office refused it, or the
/// dispatcher took the work order off the device. Kept, every such photo would stay on
/// the flash until captures are refused for want of room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photo_files_leave_the_device_with_their_last_row() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.set_refuse(Some(Box::new(|a| {
        (a.kind == "photo" && a.wo == "WO-1").then(|| ("validation".into(), "blurred".into()))
    })));
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let mut shas = Vec::new();
    let mut photos = Vec::new();
    for (wo, name, state) in [
        ("WO-1", "refused.jpg", SyncState::Refused),
        ("WO-2", "removed.jpg", SyncState::Delivered),
    ] {
        let (path, bytes) = fieldsync_tests::photo_file(d.dir.path(), name, 40 * 1024);
        let record = c.add_record(wo, note("with a photo".into())).await.unwrap();
        let photo = c
            .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
            .await
            .unwrap();
        wait_state(&mut c, wo, &photo.id, state).await;
        shas.push(fieldsync_tests::sha256_hex(&bytes));
        photos.push(photo);
    }

    // Refused and discarded: the photo is gone from the device, its file too.
    c.discard(&photos[0].id).await.unwrap();
    wait_file_gone(&d, &shas[0], "the refused photo was discarded").await;

    // Taken off the device by the dispatcher with nothing left to send.
    let removal =
        serde_json::json!({"v": 1, "type": "remove", "ids": ["WO-2"], "reason": "reassigned"});
    bo.publish_down(DEVICE, "work-orders", serde_json::to_vec(&removal).unwrap())
        .await;
    wait_file_gone(&d, &shas[1], "its work order was removed").await;
    assert!(c.work_order("WO-2").await.is_err(), "{}", d.log());
}

/// The dispatcher removes a work order while a change of it waits (here refused and
/// red): the device keeps it, marked withdrawn, and drops it by itself once nothing of
/// it waits any more (here the inspector discards the change), with no second removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_order_removed_with_changes_waiting_goes_once_they_are_settled() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.set_refuse(Some(Box::new(|a| {
        (a.wo == "WO-2").then(|| ("conflict".into(), "closed in the office".into()))
    })));
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let record = c.add_record("WO-2", note("on site".into())).await.unwrap();
    wait_state(&mut c, "WO-2", &record.id, SyncState::Refused).await;

    let removal =
        serde_json::json!({"v": 1, "type": "remove", "ids": ["WO-2"], "reason": "reassigned"});
    bo.publish_down(DEVICE, "work-orders", serde_json::to_vec(&removal).unwrap())
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let wo = c
            .work_order("WO-2")
            .await
            .expect("kept while its change waits");
        if wo.summary.withdrawn {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never withdrawn\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c.discard(&record.id).await.unwrap();
    assert!(
        c.work_order("WO-2").await.is_err(),
        "gone with its last change\n{}",
        d.log()
    );
    let list = c.work_orders().await.unwrap();
    assert!(list.iter().all(|w| w.id != "WO-2"), "{list:?}");
}

/// The dispatcher drops an attachment from its work order while it downloads: the
/// device stops asking for the rest, rather than fetching a file nobody needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_dropped_mid_download_is_not_fetched_further() {
    use sha2::Digest;
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let drawing: Vec<u8> = (0..2 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();
    let sha = hex::encode(sha2::Sha256::digest(&drawing));
    {
        let mut st = bo.state.lock().unwrap();
        st.attachment_files.insert(sha.clone(), drawing.clone());
        st.attachment_delay = Duration::from_millis(40);
    }
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let wo = |attachments: serde_json::Value, version: i64| {
        serde_json::json!({
            "id": "WO-21", "version": version, "title": "With a drawing", "stage": "new",
            "workflow": ["new", "done"], "attachments": attachments
        })
    };
    push_until_seen(
        &bo,
        &mut c,
        wo(
            serde_json::json!([{"id": "dwg", "name": "layout.pdf", "size": drawing.len(), "sha256": sha}]),
            1,
        ),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while attachment_sent(&bo, &sha) < drawing.len() as u64 / 4 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    push_until_seen(&bo, &mut c, wo(serde_json::json!([]), 2)).await;
    // What was asked for before the push still comes; nothing after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_at = attachment_sent(&bo, &sha);
    // Longer than the device waits for asked bytes (half of ack_timeout_secs = 3).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(attachment_sent(&bo, &sha), stopped_at, "{}", d.log());
    assert!(stopped_at < drawing.len() as u64, "downloaded whole");
    assert!(!d.state_dir.join("attachments").join(&sha).exists());
}

/// The back office leaves a change for later while the next change of its work order is
/// held behind it: the held one waits on the device for its predecessor's answer,
/// instead of going again at every round trip until the ack timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_held_behind_one_left_for_later_waits_for_it() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bo.state
        .lock()
        .unwrap()
        .defer_once
        .insert("left for later".into());
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let first = c
        .add_record("WO-1", note("left for later".into()))
        .await
        .unwrap();
    let second = c
        .add_record("WO-1", note("behind it".into()))
        .await
        .unwrap();
    let applied = bo.wait_applied(2, Duration::from_secs(30)).await;
    assert_eq!(
        applied.iter().map(|a| a.item.as_str()).collect::<Vec<_>>(),
        [first.id.as_str(), second.id.as_str()]
    );
    let held = bo.state.lock().unwrap().held_answers;
    assert!(held <= 3, "answered held {held} times:\n{}", d.log());
}

/// A back office that confirms every byte of a photo and never says whether they check
/// out: the device asks again a few times, then lets the photo rest, and the photo behind
/// it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_that_never_gets_a_verdict_rests_and_the_next_one_goes() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(uplink_options(&broker));
    let mut c = d.client().await;
    let record = c
        .add_record("WO-1", note("two photos".into()))
        .await
        .unwrap();
    let (stuck, stuck_bytes) = fieldsync_tests::photo_file(d.dir.path(), "stuck.jpg", 40_000);
    let (next, next_bytes) = fieldsync_tests::photo_file(d.dir.path(), "next.jpg", 30_000);
    let (stuck_sha, next_sha) = (
        fieldsync_tests::sha256_hex(&stuck_bytes),
        fieldsync_tests::sha256_hex(&next_bytes),
    );
    bo.state
        .lock()
        .unwrap()
        .no_verdict
        .insert(stuck_sha.clone());
    for path in [&stuck, &next] {
        c.attach_photo(&record.id, &std::fs::File::open(path).unwrap(), None, None)
            .await
            .unwrap();
    }
    // Three asks at the ack timeout (3 s, checked every 1.5 s), then it rests.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !bo
        .state
        .lock()
        .unwrap()
        .photos
        .get(&next_sha)
        .is_some_and(|p| p.complete)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the photo behind never went:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        d.log().contains("never says whether they check out"),
        "{}",
        d.log()
    );
    let st = bo.state.lock().unwrap();
    let rx = st.photos.get(&stuck_sha).expect("its bytes came");
    assert!(!rx.complete && rx.data.len() == stuck_bytes.len());
    // Asked again with its last byte, not sent whole again.
    assert!(rx.resent <= 3, "{} bytes again", rx.resent);
}

/// With no `device_id` in the configuration the device makes one at its first start and
/// keeps it in its state folder: the back office knows it by the same id after a
/// restart (on images whose machine id changes at every boot, too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_configured_id_keeps_the_one_it_made() {
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let mut options = uplink_options(&broker);
    let configured = format!("device_id = \"{DEVICE}\"\n");
    assert!(options.uplink.contains(&configured));
    options.uplink = options.uplink.replace(&configured, "");
    let mut d = Daemon::start_with(options);
    let kept = d.state_dir.join("device-id");
    let id = std::fs::read_to_string(&kept).expect("the id is kept before the daemon is ready");
    let id = id.trim().to_owned();
    assert!(!id.is_empty() && id.len() <= 64, "{id:?}");
    let mut c = d.client().await;
    c.add_record("WO-1", note("before".into())).await.unwrap();
    let first = bo.wait_applied(1, Duration::from_secs(20)).await;
    assert_eq!(first[0].device, id);
    drop(c);
    d.kill();
    d.spawn();
    let mut c = d.client().await;
    c.add_record("WO-1", note("after".into())).await.unwrap();
    let both = bo.wait_applied(2, Duration::from_secs(20)).await;
    assert_eq!(both[1].device, id, "the same device after a restart");
    assert_eq!(std::fs::read_to_string(&kept).unwrap().trim(), id);
}
