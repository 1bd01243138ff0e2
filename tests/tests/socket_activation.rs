//! The UI socket taken from systemd (`LISTEN_FDS`), as `fieldsyncd.socket` passes it:
//! started by systemd's own `systemd-socket-activate`, the daemon serves the socket it
//! is given, binds none of its own, and leaves that socket in place when it stops; a
//! passed descriptor that is not a listening Unix stream socket stops the start with
//! an error that says so.

use fieldsync_tests::{Daemon, Launch, Options, UNUSED_SOCKET};
use ui_bridge::RecordBody;

fn options(launch: Launch) -> Options {
    Options {
        launch,
        ..Options::default()
    }
}

#[tokio::test]
async fn the_socket_systemd_passes_is_served_and_none_is_bound() {
    let mut d = Daemon::start_with(options(Launch::Activated));
    let mut c = d.client().await;
    let item = c
        .add_record(
            "WO-1",
            RecordBody::Note {
                text: "taken over the passed socket".into(),
            },
        )
        .await
        .expect("capture over the activated socket");
    assert_eq!(c.status().await.expect("status").unsent, 1);
    drop(c);
    assert!(d.log().contains("socket from systemd"), "{}", d.log());
    assert!(
        !d.dir.path().join(UNUSED_SOCKET).exists(),
        "the daemon bound its configured path as well"
    );

    // systemd owns the socket: a stop must not remove it, or the .socket unit's next
    // activation would find nothing to listen on.
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(d.socket.exists(), "the stop removed systemd's socket");

    // Activated again, the capture is there.
    d.spawn();
    let mut c = d.client().await;
    let items = c.work_order("WO-1").await.expect("work order").items;
    assert!(items.iter().any(|i| i.id == item.id), "{items:?}");
}

#[test]
fn a_datagram_socket_from_systemd_stops_the_start_with_a_clear_error() {
    let mut d = Daemon::configured(options(Launch::ActivatedDatagram));
    assert_eq!(d.run_until_exit(), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("LISTEN_FDS names descriptor 3, which is a socket, but not a stream one"),
        "{log}"
    );
    assert!(!d.dir.path().join(UNUSED_SOCKET).exists());
}

#[test]
fn a_stray_listen_fds_naming_a_file_is_refused_and_the_file_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"what another program keeps here").expect("write");
    let mut d = Daemon::configured(options(Launch::StrayListenFds(file.clone())));
    assert_eq!(d.run_until_exit(), Some(1), "{}", d.log());
    assert!(
        d.log()
            .contains("LISTEN_FDS names descriptor 3, which is not a socket"),
        "{}",
        d.log()
    );
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"what another program keeps here"
    );
}
