//! The UI socket (`ui-bridge`): a Unix stream socket speaking newline-delimited JSON.
//! This module binds it (or takes it from systemd socket activation), authorizes each
//! caller by its peer credentials, caps the number of connections, and hands each
//! connection to [`connection`].

mod auth;
mod connection;

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ui_bridge::{ErrorBody, ErrorCode};

use crate::config::Settings;
use crate::service::Service;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("another fieldsyncd already serves {0}")]
    InUse(PathBuf),
    #[error("cannot bind the UI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the socket passed by systemd: {0}")]
    Activation(std::io::Error),
}

/// Where the listening socket came from, for the log and STATUS line.
pub enum Origin {
    Systemd,
    Bound(PathBuf),
}

/// Takes the socket systemd passed (`LISTEN_FDS`), or binds `settings.socket_path` with
/// its mode and group set before anyone can be told the daemon is ready.
pub fn listen(settings: &Settings) -> Result<(UnixListener, Origin), BridgeError> {
    // Leave the environment alone: other threads are running, and only the process named
    // in LISTEN_PID acts on it anyway.
    let passed = sd_notify::listen_fds_with_names(false)
        .map_err(BridgeError::Activation)?
        .next();
    if let Some((fd, _name)) = passed {
        // A stray LISTEN_FDS (a wrapper that leaked it, a unit without its .socket) would
        // name a descriptor the process uses for something else, the database even.
        check_passed_socket(fd).map_err(|why| {
            BridgeError::Activation(std::io::Error::other(format!(
                "LISTEN_FDS names descriptor {fd}, which {why}; start fieldsyncd from fieldsyncd.socket or without LISTEN_FDS"
            )))
        })?;
        // SAFETY: systemd hands us this descriptor and nothing else in the process owns it.
        let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        std_listener
            .set_nonblocking(true)
            .map_err(BridgeError::Activation)?;
        let listener = UnixListener::from_std(std_listener).map_err(BridgeError::Activation)?;
        return Ok((listener, Origin::Systemd));
    }
    let path = &settings.socket_path;
    let bind_err = |source| BridgeError::Bind {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(settings.socket_mode))
        .map_err(bind_err)?;
    if let Some(group) = &settings.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid);
        nix::unistd::chown(path, None, gid).map_err(|e| bind_err(e.into()))?;
    }
    Ok((listener, Origin::Bound(path.clone())))
}

/// Whether `fd` is what socket activation must pass: a listening Unix stream socket.
fn check_passed_socket(fd: std::os::fd::RawFd) -> Result<(), &'static str> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    // SAFETY: only borrowed for the calls below; nothing is closed or taken over.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match getsockopt(&borrowed, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(_) => return Err("is a socket, but not a stream one"),
        Err(_) => return Err("is not a socket"),
    }
    if getsockname::<UnixAddr>(fd).is_err() {
        return Err("is not a Unix socket");
    }
    match getsockopt(&borrowed, sockopt::AcceptConn) {
        Ok(true) => Ok(()),
        _ => Err("is not listening"),
    }
}

/// A socket file left by a daemon that died is removed; one that still answers belongs
/// to a running daemon and is left alone.
fn remove_stale(path: &Path) -> Result<(), BridgeError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BridgeError::InUse(path.to_owned()));
    }
    std::fs::remove_file(path).map_err(|source| BridgeError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Accepts connections until `shutdown`, then waits for the open ones to finish their
/// current request.
pub async fn serve(
    listener: UnixListener,
    service: Service,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the UI socket failed");
                    // EMFILE and friends: give the system a moment instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer credentials; connection closed");
                continue;
            }
        };
        let groups = {
            use std::os::fd::AsFd;
            auth::peer_groups(stream.as_fd(), cred.uid(), cred.gid(), &settings)
        };
        if !auth::is_allowed(cred.uid(), cred.gid(), &groups, &settings) {
            tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "UI connection refused: user not allowed");
            refuse(
                stream,
                ErrorCode::Unauthorized,
                "this user may not use fieldsync's UI socket",
            )
            .await;
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                uid = cred.uid(),
                max = settings.max_connections,
                "UI connection refused: too many connections"
            );
            refuse(
                stream,
                ErrorCode::Busy,
                "too many connections to fieldsync; try again shortly",
            )
            .await;
            continue;
        };
        let service = service.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            tracing::debug!(uid = cred.uid(), pid = ?cred.pid(), "UI client connected");
            connection::run(stream, service, settings.max_frame_bytes, shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn refuse(stream: UnixStream, code: ErrorCode, message: &str) {
    let frame = connection::error_frame(
        None,
        ErrorBody {
            code,
            message: message.into(),
        },
    );
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        connection::write_all(&stream, &frame),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::check_passed_socket;

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken_from_systemd() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("db")).unwrap();
        assert_eq!(
            check_passed_socket(file.as_raw_fd()),
            Err("is not a socket")
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_passed_socket(a.as_raw_fd()), Err("is not listening"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            check_passed_socket(udp.as_raw_fd()),
            Err("is a socket, but not a stream one")
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            check_passed_socket(tcp.as_raw_fd()),
            Err("is not a Unix socket")
        );
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(check_passed_socket(l.as_raw_fd()), Ok(()));
    }
}
