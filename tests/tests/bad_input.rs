//! Bad input of every kind gets a clear error, the daemon keeps serving, and nothing
//! stored changes.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use fieldsync_tests::{
    copy_for_anyone, fieldctl_bin, fieldsyncd_bin, output_of_fresh_copy, photo_file, Daemon,
    Options,
};
use ui_bridge::{ErrorCode, RecordBody, Request, ResponseResult, ServerFrame};

fn note(text: &str) -> RecordBody {
    RecordBody::Note { text: text.into() }
}

/// Sends a raw line and returns the error code of the answer.
async fn raw_error(c: &mut ui_bridge::Client, line: &[u8]) -> (Option<u64>, ErrorCode) {
    c.send_raw_with_fd(line, None).await.unwrap();
    match c.read_frame().await.unwrap() {
        ServerFrame::Response(r) => match r.result {
            ResponseResult::Error(e) => (r.id, e.code),
            ResponseResult::Ok(ok) => panic!("expected an error, got {ok:?}"),
        },
        ServerFrame::Event(e) => panic!("expected an error, got event {e:?}"),
    }
}

#[tokio::test]
async fn broken_frames_get_errors_and_the_connection_goes_on() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.add_record("WO-1", note("before")).await.unwrap();
    let before = d.snapshot();

    assert_eq!(
        raw_error(&mut c, b"{not json\n").await,
        (None, ErrorCode::MalformedJson)
    );
    assert_eq!(
        raw_error(&mut c, b"\"just a string\"\n").await,
        (None, ErrorCode::BadRequest)
    );
    assert_eq!(
        raw_error(
            &mut c,
            br#"{"v":1,"id":5,"request":{"type":"launch_rocket"}}"#
                .iter()
                .chain(b"\n")
                .copied()
                .collect::<Vec<_>>()
                .as_slice()
        )
        .await,
        (Some(5), ErrorCode::UnknownRequest)
    );
    // Another version; a later version's frame may also hold fields this one does not
    // know, and is still told its version.
    for line in [
        &b"{\"v\":9,\"id\":6,\"request\":{\"type\":\"status\"}}\n"[..],
        b"{\"v\":2,\"id\":6,\"request\":{\"type\":\"status\"},\"auth\":\"t\"}\n",
    ] {
        assert_eq!(
            raw_error(&mut c, line).await,
            (Some(6), ErrorCode::UnsupportedVersion)
        );
    }
    // Wrong types: a number where a string belongs, a missing field, an unknown field.
    for line in [
        &b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"get_work_order\",\"work_order_id\":17}}\n"[..],
        b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"add_record\",\"work_order_id\":\"WO-1\"}}\n",
        b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"add_record\",\"work_order_id\":\"WO-1\",\"record\":{\"kind\":\"note\",\"text\":\"x\",\"extra\":1}}}\n",
        b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"add_record\",\"work_order_id\":\"WO-1\",\"record\":{\"kind\":\"defect\",\"title\":\"x\",\"severity\":\"apocalyptic\"}}}\n",
        // Unknown fields on a request that takes none, and beside the request.
        b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"sync_now\",\"force\":true}}\n",
        b"{\"v\":1,\"id\":7,\"request\":{\"type\":\"status\"},\"token\":\"x\"}\n",
    ] {
        assert_eq!(raw_error(&mut c, line).await, (Some(7), ErrorCode::BadRequest));
    }
    // An oversize frame (the default limit is 64 KiB), sent in pieces and then whole.
    let mut big = b"{\"v\":1,\"id\":8,\"request\":{\"type\":\"add_record\",\"work_order_id\":\"WO-1\",\"record\":{\"kind\":\"note\",\"text\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 200_000));
    big.extend_from_slice(b"\"}}}\n");
    assert_eq!(
        raw_error(&mut c, &big).await,
        (None, ErrorCode::FrameTooLarge)
    );
    // The same through the client library: answered, not waited on for ever.
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.add_record("WO-1", note(&"a".repeat(200_000))),
    )
    .await
    .expect("an answer comes")
    .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
    // Domain errors.
    let err = c.add_record("WO-404", note("x")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownWorkOrder));
    let err = c.add_record("WO-1", note("   ")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRecord));
    let err = c.edit_record("no-such-item", note("x")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownItem));

    assert_eq!(d.snapshot(), before, "refused requests changed nothing");
    // Same connection, and another one, still served.
    assert_eq!(c.status().await.unwrap().unsent, 1);
    let mut other = d.client().await;
    assert_eq!(other.status().await.unwrap().unsent, 1);
}

#[tokio::test]
async fn photos_need_a_regular_file_within_the_size_limit() {
    let d = Daemon::start_with(Options {
        store: "min_free_bytes = 0\nmax_photo_bytes = 100000\n".into(),
        ..Options::default()
    });
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("with photo")).await.unwrap();
    let before = d.snapshot();

    let (big, _) = photo_file(d.dir.path(), "big.jpg", 100_001);
    let err = c
        .attach_photo(&record.id, &File::open(&big).unwrap(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PhotoTooLarge));

    let dir = File::open(d.dir.path()).unwrap();
    let err = c
        .attach_photo(&record.id, &dir, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotRegularFile));

    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = c
        .attach_photo(&record.id, &a, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotRegularFile));
    drop(b);

    let err = c
        .call(Request::AttachPhoto {
            record_id: record.id.clone(),
            mime: None,
            caption: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MissingDescriptor));

    let (ok, _) = photo_file(d.dir.path(), "ok.jpg", 1000);
    let err = c
        .attach_photo("no-such-record", &File::open(&ok).unwrap(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownItem));

    assert_eq!(d.snapshot(), before);
    let photos: Vec<_> = walk(&d.state_dir.join("photos"));
    assert!(photos.is_empty(), "no photo file left behind: {photos:?}");

    // A write-only descriptor cannot be read.
    let wo = std::fs::OpenOptions::new().write(true).open(&ok).unwrap();
    let err = c
        .call_with_fd(
            Request::AttachPhoto {
                record_id: record.id.clone(),
                mime: None,
                caption: None,
            },
            wo.as_fd(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    c.attach_photo(&record.id, &File::open(&ok).unwrap(), None, None)
        .await
        .unwrap();
}

/// Descriptors the daemon holds open now.
fn open_fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count()
}

/// Sends `bytes` with `fds` in one sendmsg on a raw connection.
fn send_with_fds(s: &std::os::unix::net::UnixStream, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    assert_eq!(n, bytes.len());
}

/// The next answer on a raw connection: its id and error code, if it is an error.
fn answer(r: &mut impl std::io::BufRead) -> (u64, Option<String>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (
        v["id"].as_u64().unwrap_or(u64::MAX),
        v["error"]["code"].as_str().map(String::from),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_go_with_their_own_frame_and_none_is_kept_beyond_use() {
    use std::io::BufReader;
    use std::os::fd::AsRawFd;
    let d = Daemon::start();
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("with photo")).await.unwrap();
    let (photo, bytes) = photo_file(d.dir.path(), "p.jpg", 3000);
    let sha = fieldsync_tests::sha256_hex(&bytes);
    let file = File::open(&photo).unwrap();
    let baseline = open_fds(&d);

    let s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let attach = format!(
        "{{\"v\":1,\"id\":2,\"request\":{{\"type\":\"attach_photo\",\"record_id\":\"{}\"}}}}\n",
        record.id
    );
    // A request and, right behind it, the photo with its descriptor: one read may bring
    // both, and the descriptor is the photo's.
    for _ in 0..5 {
        send_with_fds(
            &s,
            b"{\"v\":1,\"id\":1,\"request\":{\"type\":\"status\"}}\n",
            &[],
        );
        send_with_fds(&s, attach.as_bytes(), &[file.as_raw_fd()]);
        assert_eq!(answer(&mut r), (1, None));
        assert_eq!(answer(&mut r), (2, None), "the photo got its descriptor");
    }
    // Two photos, each with its line, in one sendmsg: the kernel hands both descriptors
    // over with the second line. Neither may land under the other's record.
    let other = c.add_record("WO-1", note("another")).await.unwrap();
    let (first, first_bytes) = photo_file(d.dir.path(), "first.jpg", 2000);
    let (second, second_bytes) = photo_file(d.dir.path(), "second.jpg", 2500);
    let (first, second) = (File::open(&first).unwrap(), File::open(&second).unwrap());
    let both = format!(
        "{{\"v\":1,\"id\":5,\"request\":{{\"type\":\"attach_photo\",\"record_id\":\"{}\"}}}}\n{{\"v\":1,\"id\":6,\"request\":{{\"type\":\"attach_photo\",\"record_id\":\"{}\"}}}}\n",
        record.id, other.id
    );
    send_with_fds(
        &s,
        both.as_bytes(),
        &[first.as_raw_fd(), second.as_raw_fd()],
    );
    assert_eq!(answer(&mut r), (5, Some("missing_descriptor".into())));
    assert_eq!(answer(&mut r), (6, Some("bad_request".into())));
    drop((first, second));
    // Descriptors with a request that takes none: refused, and closed.
    let many = vec![file.as_raw_fd(); 6];
    for _ in 0..20 {
        send_with_fds(
            &s,
            b"{\"v\":1,\"id\":3,\"request\":{\"type\":\"status\"}}\n",
            &many,
        );
        assert_eq!(answer(&mut r), (3, Some("bad_request".into())));
    }
    // Descriptors on a line that never ends are not hoarded.
    for _ in 0..50 {
        send_with_fds(&s, b" ", &many);
    }
    send_with_fds(
        &s,
        b"{\"v\":1,\"id\":4,\"request\":{\"type\":\"status\"}}\n",
        &[],
    );
    // The line ends as a status request with descriptors: refused, like the ones above.
    assert_eq!(answer(&mut r), (4, Some("bad_request".into())));
    assert!(
        open_fds(&d) <= baseline + 1 + 4,
        "{} descriptors open, {baseline} before",
        open_fds(&d)
    );
    drop(r);
    drop(s);
    // And none is left once the client is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open_fds(&d) > baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "{} > {baseline}",
            open_fds(&d)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let item = c.work_order("WO-1").await.unwrap();
    assert!(item.items.iter().any(|i| i.body["sha256"] == sha));
    for bytes in [first_bytes, second_bytes] {
        let sha = fieldsync_tests::sha256_hex(&bytes);
        assert!(item.items.iter().all(|i| i.body["sha256"] != sha));
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A daemon whose socket anyone may reach, and which decides by peer credentials alone.
fn daemon_open_to_anyone(ui: &str) -> Daemon {
    let d = Daemon::start_with(Options {
        ui: format!("socket_mode = \"0666\"\n{ui}"),
        ..Options::default()
    });
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users and needs root"
    );
    // The temp folder must be reachable for the other user.
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

/// `fieldctl status` run as uid and gid 65534, holding exactly `groups` besides.
fn status_as_nobody(d: &Daemon, groups: &[u32]) -> std::process::Output {
    let gids: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let mut cmd = Command::new(copy_for_anyone(&fieldctl_bin(), d.dir.path()));
    cmd.args(["--socket"]).arg(&d.socket).arg("status");
    // SAFETY: only async-signal-safe calls between fork and exec; `gids` is built
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&gids)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(65534))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
            Ok(())
        });
    }
    output_of_fresh_copy(&mut cmd)
}

#[tokio::test]
async fn a_peer_that_is_not_allowed_is_refused() {
    let d = daemon_open_to_anyone("allowed_uids = [4242]\n");
    let out = status_as_nobody(&d, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert!(d.log().contains("user not allowed"), "{}", d.log());
    // And the allowed user is still served.
    let mut c = d.client().await;
    assert_eq!(c.status().await.unwrap().unsent, 0);
}

/// fieldctl: a refusal on stderr, or as JSON on stdout with `--json`; exit 1 for a request
/// that is wrong, 4 for one the daemon cannot do now; a closed pipe ends it quietly.
#[tokio::test]
async fn fieldctl_reports_errors_by_kind() {
    let d = Daemon::start_with(Options {
        store: "min_free_bytes = 1000000000000000000\n".into(),
        ..Options::default()
    });
    let fieldctl = |args: &[&str]| {
        Command::new(fieldctl_bin())
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let out = fieldctl(&["--json", "work-order", "WO-404"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "unknown_work_order", "{v}");
    let out = fieldctl(&["add", "WO-1", "note", "x"]);
    assert_eq!(out.status.code(), Some(4), "storage low: try again later");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage_low"), "{stderr}");

    let mut child = Command::new(fieldctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .arg("work-orders")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A socket that takes the connection and never answers (systemd holding it for a
    // daemon that cannot start): fieldctl gives up and says so, with a code of its own
    // (the request may have been carried out).
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let out = Command::new(fieldctl_bin())
        .arg("--socket")
        .arg(&silent)
        .args(["--timeout", "1", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer"), "{stderr}");
}

/// A group counts when the connecting process holds it, as systemd's
/// `SupplementaryGroups=` gives it to an app, whatever the user database says; and not
/// when the process does not, whatever the user database says.
#[tokio::test]
async fn a_group_counts_when_the_process_holds_it() {
    let d = daemon_open_to_anyone("allowed_gids = [4243]\n");
    let status = |groups: &[u32]| status_as_nobody(&d, groups);
    let allowed = status(&[4243]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let refused = status(&[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthorized"));
}

#[tokio::test]
async fn connections_beyond_the_cap_are_told_busy() {
    let d = Daemon::start_with(Options {
        ui: "max_connections = 2\n".into(),
        ..Options::default()
    });
    // The harness's readiness probe holds a slot until the daemon has seen it close,
    // which on a busy machine may come after the next connections.
    async fn slot(d: &Daemon) -> ui_bridge::Client {
        for _ in 0..250 {
            let mut c = d.client().await;
            match c.status().await {
                Ok(_) => return c,
                Err(e) if e.code() == Some(ErrorCode::Busy) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("status: {e}"),
            }
        }
        panic!("no free connection slot");
    }
    let a = slot(&d).await;
    let _b = slot(&d).await;
    let mut c = d.client().await;
    let err = c.status().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy));
    drop(a);
    // The slot frees up once the first client leaves.
    let mut ok = false;
    for _ in 0..100 {
        let mut again = d.client().await;
        if again.status().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "a slot freed up");
}

fn run_with_config(
    dir: &std::path::Path,
    main: &str,
    dropin: Option<&str>,
) -> (Option<i32>, String) {
    std::fs::write(dir.join("f.toml"), main).unwrap();
    if let Some(text) = dropin {
        std::fs::create_dir_all(dir.join("config.d")).unwrap();
        std::fs::write(dir.join("config.d/50-site.toml"), text).unwrap();
    }
    let out = Command::new(fieldsyncd_bin())
        .arg("--config")
        .arg(dir.join("f.toml"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_names_file_and_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run_with_config(
        dir.path(),
        "[store]\nstate_dir = \"s\"\nmax_photo_byte = 5\n",
        None,
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("f.toml") && err.contains("max_photo_byte"),
        "{err}"
    );

    let (code, err) = run_with_config(
        dir.path(),
        "[store]\nstate_dir = \"s\"\n",
        Some("[ui]\nmax_connections = \"lots\"\n"),
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("50-site.toml") && err.contains("max_connections"),
        "{err}"
    );

    let (code, err) = run_with_config(dir.path(), "[store\n", None);
    std::fs::remove_dir_all(dir.path().join("config.d")).unwrap();
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("f.toml"), "{err}");

    let (code, err) = run_with_config(
        dir.path(),
        "[dev]\nseed_work_orders = \"missing.json\"\n[store]\nstate_dir = \"s\"\n",
        None,
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn a_state_folder_the_daemon_cannot_write_is_a_clear_error() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users and needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, err) = start_as_nobody(dir.path(), "[store]\nstate_dir = \"state\"\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not writable") && err.contains("state"),
        "{err}"
    );
}

/// Runs `fieldsyncd` as uid and gid 65534 on a config of `text` in `dir` (which the
/// caller opened to others) until it exits: its exit code and stderr.
fn start_as_nobody(dir: &std::path::Path, text: &str) -> (Option<i32>, String) {
    std::fs::write(dir.join("f.toml"), text).unwrap();
    let out = output_of_fresh_copy(
        Command::new(copy_for_anyone(&fieldsyncd_bin(), dir))
            .arg("--config")
            .arg(dir.join("f.toml"))
            .uid(65534)
            .gid(65534),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn low_storage_refuses_new_captures_and_keeps_what_is_stored() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    let kept = c.add_record("WO-1", note("kept")).await.unwrap();
    drop(c);
    // Restart with a reserve larger than any disk.
    d.kill();
    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("min_free_bytes = 0", "min_free_bytes = 1000000000000000");
    std::fs::write(&d.config, text).unwrap();
    d.spawn();
    let mut c = d.client().await;
    let before = d.snapshot();
    let err = c.add_record("WO-1", note("new")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StorageLow));
    assert!(err.to_string().contains("storage is low"), "{err}");
    let (p, _) = photo_file(d.dir.path(), "p.jpg", 100);
    let err = c
        .attach_photo(&kept.id, &File::open(&p).unwrap(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StorageLow));
    let status = c.status().await.unwrap();
    assert!(status.storage_low);
    assert_eq!(status.unsent, 1);
    // What is stored can still be fixed or removed, which frees space.
    c.edit_record(&kept.id, note("kept, edited")).await.unwrap();
    assert_eq!(d.snapshot(), before);
}

#[tokio::test]
async fn a_full_disk_refuses_captures_and_loses_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a small tmpfs and needs root"
    );
    let mut d = Daemon::start();
    d.kill();
    // Move the state onto a 3 MiB tmpfs.
    let small = d.dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("state_dir = \"state\"", "state_dir = \"small/state\"");
    std::fs::write(&d.config, text).unwrap();
    d.state_dir = small.join("state");
    d.spawn();
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("first")).await.unwrap();
    let mut acked = vec![record.id.clone()];
    let mut refused = None;
    for i in 0..40 {
        let (p, _) = photo_file(d.dir.path(), &format!("p{i}.jpg"), 200_000);
        match c
            .attach_photo(&record.id, &File::open(&p).unwrap(), None, None)
            .await
        {
            Ok(item) => acked.push(item.id),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the disk filled up");
    assert_eq!(err.code(), Some(ErrorCode::StorageLow), "{err}");
    // Small records may still fit or be refused; either way each answer is clear.
    for i in 0..50 {
        match c
            .add_record("WO-1", note(&format!("note {i} {}", "x".repeat(2000))))
            .await
        {
            Ok(item) => acked.push(item.id),
            Err(e) => assert!(
                matches!(
                    e.code(),
                    Some(ErrorCode::StorageLow) | Some(ErrorCode::StorageUnavailable)
                ),
                "{e}"
            ),
        }
    }
    assert_eq!(c.status().await.unwrap().unsent as usize, acked.len());
    drop(c);
    d.kill();
    let db = d.db();
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    for id in &acked {
        assert!(
            Daemon::item_stored(&db, id),
            "acknowledged item {id} is stored"
        );
    }
}

#[tokio::test]
async fn a_damaged_database_is_moved_aside_and_reported() {
    let mut d = Daemon::start();
    d.kill();
    let db = d.state_dir.join("fieldsync.db");
    let _ = std::fs::remove_file(d.state_dir.join("fieldsync.db-wal"));
    let _ = std::fs::remove_file(d.state_dir.join("fieldsync.db-shm"));
    let junk = b"this is not a database, but it may hold someone's work".repeat(100);
    std::fs::write(&db, &junk).unwrap();
    d.spawn();
    let mut c = d.client().await;
    let status = c.status().await.unwrap();
    let moved = status.damaged_store.expect("reported");
    assert_eq!(std::fs::read(&moved).unwrap(), junk, "kept byte for byte");
    // The daemon works on a fresh store.
    c.add_record("WO-1", note("after")).await.unwrap();
    // And says so at every start while the moved file is there: what it holds was
    // never delivered.
    drop(c);
    d.kill();
    d.spawn();
    let mut c = d.client().await;
    assert_eq!(c.status().await.unwrap().damaged_store, Some(moved.clone()));
    std::fs::remove_file(&moved).unwrap();
    drop(c);
    d.kill();
    d.spawn();
    let mut c = d.client().await;
    assert_eq!(
        c.status().await.unwrap().damaged_store,
        None,
        "support took it"
    );
}

/// An image rolled back to an older fieldsyncd finds a database a newer one migrated,
/// whose schema may use what this SQLite cannot parse. It is refused as too new and
/// left exactly as it was, not taken for a damaged file and set aside with the
/// inspector's unsent work in it.
#[tokio::test]
async fn a_database_from_a_newer_fieldsyncd_is_refused_and_left_as_it_was() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    c.add_record("WO-1", note("captured before the rollback"))
        .await
        .unwrap();
    drop(c);
    d.stop();
    let db = d.state_dir.join("fieldsync.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        // What a later release might write: a schema version past this one's and a
        // statement in the schema this SQLite does not understand.
        conn.execute_batch(
            "PRAGMA user_version = 99;
             PRAGMA writable_schema = ON;
             INSERT INTO sqlite_schema (type, name, tbl_name, rootpage, sql)
             VALUES ('table', 'later', 'later', 0, 'CREATE TABLE later (x) WITH FUTURE SYNTAX');
             PRAGMA writable_schema = OFF;",
        )
        .unwrap();
    }
    let set_aside = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("damaged"))
            .collect::<Vec<_>>()
    };
    let before = std::fs::read(&db).unwrap();
    assert_eq!(d.run_until_exit(), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("written by a newer fieldsyncd (schema 99"),
        "{log}"
    );
    assert!(!log.contains("damaged"), "{log}");
    assert_eq!(
        set_aside(&d.state_dir),
        Vec::<String>::new(),
        "nothing set aside"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before, "the file untouched");
}

/// One daemon per state folder: a second one (started by hand during support, a second
/// unit) stops before it touches anything, so a photo the first is about to name keeps
/// its file.
#[tokio::test]
async fn a_second_daemon_on_the_same_state_folder_stops_and_touches_nothing() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.status().await.unwrap();
    // A photo file no row names yet: what an attach in progress looks like.
    let shard = d.state_dir.join("photos").join("ab");
    std::fs::create_dir_all(&shard).unwrap();
    let pending = shard.join(format!("ab{}", "0".repeat(62)));
    std::fs::write(&pending, b"photo bytes").unwrap();
    let other = d.dir.path().join("other.toml");
    std::fs::write(
        &other,
        "[store]\nstate_dir = \"state\"\nmin_free_bytes = 0\n[ui]\nsocket = \"other.sock\"\n",
    )
    .unwrap();
    let mut second = Command::new(fieldsyncd_bin())
        .arg("--config")
        .arg(&other)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while second.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = second.kill();
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the second daemon ran on: {err}"
    );
    assert!(err.contains("another fieldsyncd"), "{err}");
    assert!(
        pending.exists(),
        "the second daemon swept the first one's photo"
    );
    // The first goes on.
    c.add_record("WO-1", note("still here")).await.unwrap();
}

/// A database file the daemon's user may read but not write (left by root after a
/// support session): SQLite would open it read-only without a word, and every change
/// would fail behind a daemon that said it was ready.
#[test]
fn a_database_the_daemon_cannot_write_is_a_clear_error() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users and needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    for p in [dir.path(), state.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    // A database root made: readable by all, writable by root only.
    let db = state.join("fieldsync.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    for f in ["fieldsync.db-wal", "fieldsync.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let before = std::fs::read(&db).unwrap();
    let (code, err) = start_as_nobody(
        dir.path(),
        "[store]\nstate_dir = \"state\"\nmin_free_bytes = 0\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("can be read but not written") && err.contains("fieldsync.db"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "nothing moved or changed"
    );
}

#[tokio::test]
async fn damage_behind_a_clean_stop_is_caught_after_ready_and_set_aside_next_start() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    for i in 0..200 {
        c.add_record("WO-1", note(&format!("reading {i}")))
            .await
            .unwrap();
    }
    // Folded into items and outbox, so that starting again touches none of it.
    c.outbox(Some(1)).await.unwrap();
    drop(c);
    assert_eq!(d.stop(), Some(0));
    assert!(d.state_dir.join("clean-stop").exists());

    // Damage the last pages (the captures), keeping the size and the time of the file:
    // a start trusts the clean stop and is ready at once.
    let db = d.state_dir.join("fieldsync.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let modified = std::fs::metadata(&db).unwrap().modified().unwrap();
    assert!(bytes.len() > 3 * 4096, "a few pages");
    let len = bytes.len();
    bytes[len - 3 * 4096..].fill(0x55);
    std::fs::write(&db, &bytes).unwrap();
    File::options()
        .write(true)
        .open(&db)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // The check behind ready finds it and stops the daemon, with a failure for systemd
    // (which restarts it).
    assert_eq!(d.run_until_exit(), Some(1), "{}", d.log());
    assert!(
        d.log().contains("fieldsyncd ready"),
        "ready before the check"
    );
    assert!(d.log().contains("failed its check"));
    assert!(!d.state_dir.join("clean-stop").exists());

    // The next start checks first and sets the file aside, byte for byte.
    d.spawn();
    let mut c = d.client().await;
    let moved = c.status().await.unwrap().damaged_store.expect("reported");
    assert!(
        std::fs::read(&moved).unwrap() == bytes,
        "kept byte for byte"
    );
}

/// Waits until the daemon's log holds `needle` `n` times.
async fn wait_log(d: &Daemon, needle: &str, n: usize) {
    for _ in 0..500 {
        if d.log().matches(needle).count() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no {needle:?} in the log:\n{}", d.log());
}

#[tokio::test]
async fn sighup_reloads_the_limits_and_a_broken_file_changes_nothing() {
    let d = Daemon::start_with(Options {
        store: "min_free_bytes = 0\nmax_photo_bytes = 1048576\n".into(),
        ..Options::default()
    });
    let mut c = d.client().await;
    let record = c.add_record("WO-1", note("for photos")).await.unwrap();
    let (big, _) = photo_file(d.dir.path(), "big.jpg", 100 * 1024);
    let (small, _) = photo_file(d.dir.path(), "small.jpg", 10 * 1024);
    c.attach_photo(&record.id, &File::open(&big).unwrap(), None, None)
        .await
        .unwrap();

    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace("max_photo_bytes = 1048576", "max_photo_bytes = 50000"),
    )
    .unwrap();
    hup();
    wait_log(&d, "configuration reloaded", 1).await;
    let err = c
        .attach_photo(&record.id, &File::open(&big).unwrap(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PhotoTooLarge));

    // A file that does not validate: the daemon keeps running on what it had.
    std::fs::write(&d.config, format!("{text}\n[store]\nmax_photo_bytez = 1\n")).unwrap();
    hup();
    wait_log(&d, "configuration not reloaded", 1).await;
    let err = c
        .attach_photo(&record.id, &File::open(&big).unwrap(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PhotoTooLarge));
    c.attach_photo(&record.id, &File::open(&small).unwrap(), None, None)
        .await
        .unwrap();
    assert_eq!(c.status().await.unwrap().unsent, 3);
}
