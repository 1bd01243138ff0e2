//! The link as NetworkManager and ModemManager tell it, on a private system bus with
//! python-dbusmock, against the real Mosquitto and the test back office: the policy
//! holds byte for byte, a link appearing starts a sync at once, auto-sync off waits for
//! "sync now" or a completed visit, NetworkManager and the bus may come and go, and an
//! idle offline daemon costs next to no CPU.

use std::time::{Duration, Instant};

use fieldsync_tests::backoffice::BackOffice;
use fieldsync_tests::broker::Broker;
use fieldsync_tests::netmock::{MockLink, NetMock};
use fieldsync_tests::{Daemon, Options};
use ui_bridge::{RecordBody, SyncState};

fn options(broker: &Broker, bus: &NetMock, device: &str, sync: &str) -> Options {
    Options {
        uplink: format!(
            "broker = \"{}\"\ndevice_id = \"{device}\"\nreconnect_min_ms = 50\nreconnect_max_secs = 1\nphoto_chunk_bytes = 16384\n",
            broker.url()
        ),
        sync: format!("network_manager = true\n{sync}"),
        env: vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), bus.address())],
        ..Options::default()
    }
}

fn note(text: &str) -> RecordBody {
    RecordBody::Note { text: text.into() }
}

/// Waits until the daemon's status satisfies `ok`, or fails with the last status seen.
async fn wait_status(
    c: &mut ui_bridge::Client,
    what: &str,
    ok: impl Fn(&ui_bridge::Status) -> bool,
) -> ui_bridge::Status {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status().await.expect("status");
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: status is {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes of the photo `sha` the back office has received so far.
fn photo_bytes(bo: &BackOffice, sha: &str) -> usize {
    bo.state
        .lock()
        .unwrap()
        .photos
        .get(sha)
        .map_or(0, |p| p.data.len() + p.resent as usize)
}

/// A record and a photo attached to it; returns (record id, photo item id, sha256).
async fn capture_with_photo(
    d: &Daemon,
    c: &mut ui_bridge::Client,
    name: &str,
) -> (String, String, String) {
    let record = c.add_record("WO-1", note(name)).await.expect("record");
    let (path, bytes) =
        fieldsync_tests::photo_file(d.dir.path(), &format!("{name}.jpg"), 200 * 1024);
    let photo = c
        .attach_photo(&record.id, &std::fs::File::open(&path).unwrap(), None, None)
        .await
        .expect("photo");
    (record.id, photo.id, fieldsync_tests::sha256_hex(&bytes))
}

async fn wait_delivered(c: &mut ui_bridge::Client, item: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let detail = c.work_order("WO-1").await.expect("work order");
        let state = detail.items.iter().find(|i| i.id == item).map(|i| i.state);
        if state == Some(SyncState::Delivered) {
            return;
        }
        assert!(Instant::now() < deadline, "{item} still {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_wait_for_a_link_the_policy_allows() {
    let bus = NetMock::start();
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;

    // EDGE: records go, not one photo byte.
    bus.set_link(MockLink::Edge);
    let d = Daemon::start_with(options(&broker, &bus, "dev-policy", ""));
    let mut c = d.client().await;
    wait_status(&mut c, "2G seen", |s| s.link == "2g" && s.broker == "up").await;
    let (record, photo, sha) = capture_with_photo(&d, &mut c, "edge").await;
    wait_delivered(&mut c, &record).await;
    // The record went; give the photo every chance to follow if it wrongly could.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(photo_bytes(&bo, &sha), 0, "photo bytes went out on EDGE");
    let s = c.status().await.unwrap();
    assert!(
        s.sync_note.as_deref().unwrap_or("").contains("2G"),
        "the banner says why: {s:?}"
    );

    // LTE: the photo follows, without anyone asking.
    bus.set_link(MockLink::Lte);
    wait_delivered(&mut c, &photo).await;
    assert!(bo.state.lock().unwrap().photos[&sha].complete);
    drop(c);
    drop(d);

    // "Wi-Fi only for files": not on LTE, not on a metered (guessed) Wi-Fi; on Wi-Fi.
    let d = Daemon::start_with(options(
        &broker,
        &bus,
        "dev-wifi-only",
        "files_on_wifi_only = true\n",
    ));
    let mut c = d.client().await;
    wait_status(&mut c, "LTE seen", |s| {
        s.link == "cellular" && s.broker == "up"
    })
    .await;
    let (record, photo, sha) = capture_with_photo(&d, &mut c, "lte").await;
    wait_delivered(&mut c, &record).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(photo_bytes(&bo, &sha), 0, "photo bytes went out on LTE");

    bus.set_link(MockLink::Wifi { metered: true });
    let s = wait_status(&mut c, "metered Wi-Fi seen", |s| {
        s.link == "metered" && s.broker == "up"
    })
    .await;
    assert!(s.files_on_wifi_only);
    let late = c
        .add_record("WO-1", note("on metered Wi-Fi"))
        .await
        .unwrap();
    wait_delivered(&mut c, &late.id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        photo_bytes(&bo, &sha),
        0,
        "photo bytes went out on metered Wi-Fi"
    );

    bus.set_link(MockLink::Wifi { metered: false });
    wait_delivered(&mut c, &photo).await;
    let rx = bo.state.lock().unwrap().photos[&sha].clone();
    assert!(rx.complete);
    assert_eq!(rx.resent, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_appearing_sends_at_once() {
    let bus = NetMock::start();
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    // The broker answers all along; only NetworkManager's word keeps the daemon quiet.
    bus.set_link(MockLink::Offline);
    let d = Daemon::start_with(options(&broker, &bus, "dev-appear", ""));
    let mut c = d.client().await;
    let item = c
        .add_record("WO-1", note("captured offline"))
        .await
        .unwrap();
    let s = wait_status(&mut c, "offline seen", |s| s.link == "offline").await;
    assert!(s.sync_note.unwrap_or_default().contains("offline"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        bo.applied().is_empty(),
        "sent while NetworkManager said offline"
    );
    assert_eq!(c.status().await.unwrap().broker, "down");

    let appeared = Instant::now();
    bus.set_link(MockLink::Wifi { metered: false });
    let applied = bo.wait_applied(1, Duration::from_secs(20)).await;
    let took = appeared.elapsed();
    assert_eq!(applied[0].item, item.id);
    eprintln!("link appeared -> first record applied: {took:?}");
    // Far below the 2-minute timer and any reconnect backoff: the link itself started it.
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // And when the link goes, nothing more is tried until it is back.
    bus.set_link(MockLink::Offline);
    wait_status(&mut c, "offline again", |s| {
        s.link == "offline" && s.broker == "down"
    })
    .await;
    let second = c.add_record("WO-1", note("offline again")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(bo.applied().iter().all(|a| a.item != second.id));
    bus.set_link(MockLink::Ethernet);
    wait_delivered(&mut c, &second.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_goes_before_network_manager_has_answered() {
    // A system bus that takes connections and never answers. The uplink holds back (the
    // link may well be offline) until the watcher gives up on the bus after its 5 s call
    // timeout, then tries the broker as it does without NetworkManager.
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("silent-bus");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept() {
            held.push(conn);
        }
    });
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(Options {
        uplink: format!(
            "broker = \"{}\"\ndevice_id = \"dev-silent\"\nreconnect_min_ms = 50\n",
            broker.url()
        ),
        sync: "network_manager = true\n".into(),
        env: vec![(
            "DBUS_SYSTEM_BUS_ADDRESS".into(),
            format!("unix:path={}", path.display()),
        )],
        ..Options::default()
    });
    let started = Instant::now();
    let mut c = d.client().await;
    let item = c
        .add_record("WO-1", note("captured before the link is known"))
        .await
        .unwrap();
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.link.as_str(), s.link_detail.as_str()),
        ("unknown", "asking NetworkManager")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        bo.applied().is_empty(),
        "sent before NetworkManager said anything"
    );
    wait_delivered(&mut c, &item.id).await;
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "delivered after {:?}, before the watcher could have given up",
        started.elapsed()
    );
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.link.as_str(), s.link_source.as_str()),
        ("unknown", "none")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_sync_off_only_sync_now_and_a_completed_visit_send() {
    let bus = NetMock::start();
    bus.set_link(MockLink::Wifi { metered: false });
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(options(&broker, &bus, "dev-manual", "auto_sync = false\n"));
    let mut c = d.client().await;
    wait_status(&mut c, "connected", |s| s.broker == "up" && !s.auto_sync).await;

    let first = c
        .add_record("WO-1", note("kept for sync now"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(bo.applied().is_empty(), "sent with auto-sync off");
    let s = c.status().await.unwrap();
    assert!(
        s.sync_note
            .as_deref()
            .unwrap_or("")
            .contains("auto-sync is off"),
        "{s:?}"
    );
    c.sync_now().await.unwrap();
    wait_delivered(&mut c, &first.id).await;

    // Each stage is a change that waits; reaching the last one sends them all.
    for stage in ["accepted", "on_site"] {
        c.advance_stage("WO-1", stage).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        bo.applied().len(),
        1,
        "stages sent before the visit was completed"
    );
    let done = c.advance_stage("WO-1", "completed").await.unwrap();
    wait_delivered(&mut c, &done.id).await;
    assert_eq!(bo.wait_applied(4, Duration::from_secs(10)).await.len(), 4);

    // The app switches auto-sync on: from then on changes go by themselves, and the
    // choice outlives a restart, over the config's default.
    let s = c
        .set_sync_switches(Some(true), None, Some(true))
        .await
        .unwrap();
    assert!(s.auto_sync && s.files_on_wifi_only && s.sync_on_visit_completed);
    let later = c
        .add_record("WO-1", note("auto-sync back on"))
        .await
        .unwrap();
    wait_delivered(&mut c, &later.id).await;
    drop(c);
    let mut d = d;
    d.restart();
    let mut c = d.client().await;
    let s = c.status().await.unwrap();
    assert!(s.auto_sync && s.files_on_wifi_only, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_manager_and_the_bus_may_come_and_go() {
    let mut bus = NetMock::start_bus_only();
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(options(&broker, &bus, "dev-nm", ""));
    let mut c = d.client().await;

    // No NetworkManager: the broker is simply tried, and records go.
    let s = wait_status(&mut c, "fallback", |s| {
        s.link == "unknown" && s.broker == "up"
    })
    .await;
    assert_eq!(s.link_source, "none");
    let first = c
        .add_record("WO-1", note("no NetworkManager"))
        .await
        .unwrap();
    wait_delivered(&mut c, &first.id).await;

    // NetworkManager appears: followed at once.
    bus.set_link(MockLink::Offline);
    bus.start_network_manager();
    let s = wait_status(&mut c, "NetworkManager followed", |s| s.link == "offline").await;
    assert_eq!(s.link_source, "networkmanager");
    bus.set_link(MockLink::Lte);
    wait_status(&mut c, "LTE", |s| s.link == "cellular" && s.broker == "up").await;

    // The bus restarts: the daemon keeps serving, then follows the new bus.
    bus.set_link(MockLink::Ethernet);
    bus.restart_bus();
    let second = c
        .add_record("WO-1", note("during the bus restart"))
        .await
        .unwrap();
    wait_status(&mut c, "ethernet after the restart", |s| {
        s.link == "ethernet" && s.link_source == "networkmanager"
    })
    .await;
    wait_delivered(&mut c, &second.id).await;
    assert_eq!(bo.applied().len(), 2);

    let log = d.log();
    let said = log.matches("not following NetworkManager").count();
    assert!(
        (1..=3).contains(&said),
        "fallback logged {said} times:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_and_idle_the_daemon_sleeps() {
    let bus = NetMock::start();
    bus.set_link(MockLink::Offline);
    let broker = Broker::start();
    let d = Daemon::start_with(options(&broker, &bus, "dev-idle", ""));
    let mut c = d.client().await;
    c.add_record("WO-1", note("waiting for a link"))
        .await
        .unwrap();
    wait_status(&mut c, "offline", |s| s.link == "offline").await;
    drop(c);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pid = d.pid().to_string();
    let before = fieldsync_tests::cpu_time(&pid);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let used_ms = (fieldsync_tests::cpu_time(&pid) - before).as_millis();
    eprintln!("offline and idle for 60 s: {used_ms} ms of CPU");
    assert!(used_ms < 50, "{used_ms} ms of CPU in 60 s offline");
}

/// The real services announce signal quality, device and access point changes all day;
/// only a change of what the class depends on may make the watcher read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_that_cannot_change_the_link_wake_nothing() {
    let bus = NetMock::start();
    bus.set_link(MockLink::Lte);
    let broker = Broker::start();
    let d = Daemon::start_with(options(&broker, &bus, "dev-chatter", ""));
    let mut c = d.client().await;
    wait_status(&mut c, "on LTE", |s| s.link == "cellular").await;
    let reads = || bus.log().matches("GetAll").count();
    // Whatever reads the start caused have settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = reads();
    assert!(
        before > 0,
        "the watcher read NetworkManager:\n{}",
        bus.log()
    );

    bus.chatter(30);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reads(),
        before,
        "chatter made the watcher read:\n{}",
        bus.log()
    );

    // A change that matters still does.
    bus.set_link(MockLink::Edge);
    wait_status(&mut c, "on EDGE", |s| s.link == "2g").await;
    assert!(reads() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_syncs_by_itself_with_no_app_connected() {
    let bus = NetMock::start();
    bus.set_link(MockLink::Wifi { metered: false });
    let broker = Broker::start();
    let _bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(options(&broker, &bus, "dev-timer", "interval_secs = 10\n"));
    let mut c = d.client().await;
    // The sync a connection starts with, and when it ended.
    let first = wait_status(&mut c, "first sync", |s| s.last_sync_ms.is_some())
        .await
        .last_sync_ms;
    drop(c);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // A loaded machine may take a while past the period to finish that sync.
    let mut c = d.client().await;
    wait_status(&mut c, "a sync from the timer", |s| s.last_sync_ms > first).await;
}

/// With the broker down, a modem stepping between LTE, HSPA and EDGE does not start the
/// reconnect backoff over at every step: a new detail is no new chance, and a new class
/// cuts the backoff short at most once per 10 s. Before, every step called the broker
/// again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_keeps_the_backoff() {
    let bus = NetMock::start();
    let mut broker = Broker::start();
    bus.set_link(MockLink::Lte);
    let d = Daemon::start_with(options(&broker, &bus, "dev-flap", ""));
    broker.kill();
    let lost = |d: &Daemon| d.log().matches("broker connection lost").count();
    // The backoff grows to its 1 s ceiling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = lost(&d);
    let mut c = d.client().await;
    for i in 0..24 {
        bus.set_link(match i % 3 {
            0 => MockLink::Hspa,
            1 => MockLink::Edge,
            _ => MockLink::Lte,
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let tries = lost(&d) - before;
    wait_status(&mut c, "LTE at last", |s| s.link == "cellular").await;
    // About 3.6 s at a 1 s ceiling with jitter: a handful, not one per step.
    assert!(
        tries <= 10,
        "{tries} connection attempts in 3.6 s\n{}",
        d.log()
    );
}

/// NetworkManager stops (a restart, a crash) while the device is on EDGE: photos stay
/// back, as the link they would go on is still EDGE, until NetworkManager names
/// another. Records go all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_stay_back_on_edge_while_network_manager_is_away() {
    let mut bus = NetMock::start();
    let broker = Broker::start();
    let bo = BackOffice::start(broker.port).await;
    bus.set_link(MockLink::Edge);
    let d = Daemon::start_with(options(&broker, &bus, "dev-nm-away", ""));
    let mut c = d.client().await;
    wait_status(&mut c, "EDGE", |s| s.link == "2g" && s.broker == "up").await;

    bus.stop_network_manager();
    let s = wait_status(&mut c, "NetworkManager gone", |s| {
        s.link_detail.contains("as last seen")
    })
    .await;
    assert_eq!(s.link, "2g", "{s:?}");
    let (record, photo, sha) = capture_with_photo(&d, &mut c, "while-nm-away").await;
    wait_delivered(&mut c, &record).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(photo_bytes(&bo, &sha), 0, "a photo went on EDGE");

    bus.set_link(MockLink::Wifi { metered: false });
    bus.start_network_manager();
    wait_delivered(&mut c, &photo).await;
}

/// A sync period changed by a reload (SIGHUP) takes effect on the connection under way,
/// not at the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_period_changed_by_a_reload_counts_at_once() {
    let bus = NetMock::start();
    bus.set_link(MockLink::Wifi { metered: false });
    let broker = Broker::start();
    let _bo = BackOffice::start(broker.port).await;
    let d = Daemon::start_with(options(
        &broker,
        &bus,
        "dev-period",
        "interval_secs = 3600\n",
    ));
    let mut c = d.client().await;
    let first = wait_status(&mut c, "first sync", |s| s.last_sync_ms.is_some())
        .await
        .last_sync_ms;
    std::fs::create_dir_all(d.dir.path().join("config.d")).unwrap();
    std::fs::write(
        d.dir.path().join("config.d/period.toml"),
        "[sync]\ninterval_secs = 10\n",
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // The reload weighs the switches again, which is a sync of its own; the timer's come
    // after it.
    let second = wait_status(&mut c, "the reload's sync", |s| s.last_sync_ms > first)
        .await
        .last_sync_ms;
    // Well before the old period of an hour.
    wait_status(&mut c, "a sync on the new period", |s| {
        s.last_sync_ms > second
    })
    .await;
}
