//! One UI connection: reads newline-delimited frames together with any descriptors that
//! arrived with their bytes, answers each request in order, and forwards events once the
//! client subscribed. A bad frame gets an error frame; the connection and every other
//! client carry on.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use ui_bridge::{
    ErrorBody, ErrorCode, Event, EventFrame, Request, RequestFrame, Response, ResponseFrame,
    ResponseResult, PROTOCOL_VERSION,
};

use crate::service::Service;

/// A client that does not read its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for as many descriptors as one sendmsg can carry (Linux's SCM_MAX_FD), so the
/// kernel never truncates them: truncated, the ones it did install could not be told
/// apart, and would stay open for good.
const MAX_FDS_PER_READ: usize = 253;
/// Descriptors kept for frames not complete yet. A frame uses one at most; beyond these,
/// more are closed at once, so a client cannot hoard the daemon's descriptors.
const MAX_PENDING_FDS: usize = 4;
/// Bytes one read takes at most.
const READ_CHUNK: usize = 16 * 1024;

/// Bytes read so far and the descriptors that came with them, each at the offset of the
/// last byte of the read it arrived with: a read that brings descriptors ends with the
/// data they were sent with, possibly after data sent before them without any.
struct Inbox {
    bytes: Vec<u8>,
    fds: Vec<(usize, OwnedFd)>,
    /// After an oversize frame, bytes are dropped up to the next newline.
    skipping: bool,
    /// What one recvmsg reads into, and its room for descriptors: kept for the whole
    /// connection rather than made (and zeroed) for every read.
    chunk: Vec<u8>,
    cmsg: Vec<u8>,
}

/// A complete frame taken out of the inbox.
struct Frame {
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Inbox {
    fn next_frame(&mut self) -> Option<Frame> {
        let pos = self.bytes.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.bytes.drain(..=pos).collect();
        line.pop();
        let (mine, rest): (Vec<_>, Vec<_>) = self.fds.drain(..).partition(|(at, _)| *at <= pos);
        self.fds = rest
            .into_iter()
            .map(|(at, fd)| (at - pos - 1, fd))
            .collect();
        Some(Frame {
            line,
            fds: mine.into_iter().map(|(_, fd)| fd).collect(),
        })
    }
}

pub async fn run(
    stream: UnixStream,
    service: Service,
    max_frame: usize,
    shutdown: CancellationToken,
) {
    let mut inbox = Inbox {
        bytes: Vec::with_capacity(4096),
        fds: Vec::new(),
        skipping: false,
        chunk: vec![0; READ_CHUNK],
        cmsg: nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS_PER_READ]),
    };
    let mut events: Option<broadcast::Receiver<Event>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = stream.readable() => {
                if ready.is_err() {
                    return;
                }
                match stream.try_io(Interest::READABLE, || read_some(&stream, &mut inbox)) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "UI connection read failed");
                        return;
                    }
                }
                while let Some(frame) = inbox.next_frame() {
                    let reply = if frame.line.len() > max_frame {
                        too_large(max_frame).into()
                    } else {
                        handle_frame(&service, frame, &mut events).await
                    };
                    let sent = match reply {
                        Reply::Plain(bytes) => send(&stream, &bytes).await,
                        Reply::WithFd(bytes, fd) => send_with_fd(&stream, &bytes, fd).await,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                if inbox.bytes.len() > max_frame {
                    inbox.bytes.clear();
                    inbox.fds.clear();
                    if !inbox.skipping {
                        inbox.skipping = true;
                        if send(&stream, &too_large(max_frame)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            event = next_event(&mut events) => {
                let frame = match event {
                    Ok(event) => event_frame(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => event_frame(Event::Lagged { missed }),
                    Err(broadcast::error::RecvError::Closed) => {
                        events = None;
                        continue;
                    }
                };
                if send(&stream, &frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<Event>>,
) -> Result<Event, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One recvmsg: appends the bytes and keeps any descriptors that came with them.
fn read_some(stream: &UnixStream, inbox: &mut Inbox) -> io::Result<usize> {
    let Inbox {
        bytes,
        fds,
        skipping,
        chunk,
        cmsg,
    } = inbox;
    let (n, received) = {
        let mut iov = [IoSliceMut::new(chunk)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut received = Vec::new();
        match msg.cmsgs() {
            Err(e) => {
                // Cannot happen with room for SCM_MAX_FD; said loudly if it does.
                tracing::error!(error = %e, "descriptors from a UI client were cut short");
            }
            Ok(cmsgs) => {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: the kernel just installed these descriptors for us; we are
                        // their only owner.
                        received.extend(
                            fds.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
        }
        (msg.bytes, received)
    };
    if !*skipping || n == 0 {
        bytes.extend_from_slice(&chunk[..n]);
    } else {
        // While skipping, keep only what follows the next newline.
        match chunk[..n].iter().position(|&b| b == b'\n') {
            Some(p) => {
                *skipping = false;
                bytes.extend_from_slice(&chunk[p + 1..n]);
            }
            None => return Ok(n),
        }
    }
    if let Some(at) = bytes.len().checked_sub(1) {
        let room = MAX_PENDING_FDS.saturating_sub(fds.len());
        if received.len() > room {
            tracing::warn!(
                received = received.len(),
                kept = room,
                "a UI client sent more descriptors than its frames can use; the rest are closed"
            );
        }
        // Dropping the others closes them.
        fds.extend(received.into_iter().take(room).map(|fd| (at, fd)));
    }
    Ok(n)
}

/// An answer, with the descriptor it carries, if any.
enum Reply {
    Plain(Vec<u8>),
    WithFd(Vec<u8>, OwnedFd),
}

impl From<Vec<u8>> for Reply {
    fn from(bytes: Vec<u8>) -> Reply {
        Reply::Plain(bytes)
    }
}

async fn handle_frame(
    service: &Service,
    frame: Frame,
    events: &mut Option<broadcast::Receiver<Event>>,
) -> Reply {
    let (id, request) = match parse(&frame.line) {
        Ok(parsed) => parsed,
        Err((id, body)) => {
            tracing::warn!(code = ?body.code, reason = %body.message, "bad UI request");
            return error_frame(id, body).into();
        }
    };
    if !frame.fds.is_empty() && !matches!(request, Request::AttachPhoto { .. }) {
        // Most likely sent with the wrong frame: said, rather than closed in silence.
        return error_frame(
            Some(id),
            ErrorBody {
                code: ErrorCode::BadRequest,
                message: format!(
                    "only attach_photo takes a descriptor; the {} sent with this frame {} closed",
                    frame.fds.len(),
                    if frame.fds.len() == 1 { "was" } else { "were" }
                ),
            },
        )
        .into();
    }
    if frame.fds.len() > 1 {
        // Descriptors sent in one sendmsg all come with the last line it carried: two
        // photos sent with two lines at once would both reach the second line, and the
        // first would be stored under the wrong record.
        return error_frame(
            Some(id),
            ErrorBody {
                code: ErrorCode::BadRequest,
                message: format!(
                    "{} descriptors came with this frame; send each photo's descriptor with its own attach_photo line, in a sendmsg of its own; all were closed",
                    frame.fds.len()
                ),
            },
        )
        .into();
    }
    if matches!(request, Request::Subscribe {}) && events.is_none() {
        *events = Some(service.subscribe());
    }
    let result = match request {
        Request::OpenAttachment {
            work_order_id,
            attachment_id,
        } => match service
            .open_attachment(&work_order_id, &attachment_id)
            .await
        {
            Ok((a, fd)) => return Reply::WithFd(ok_frame(id, Response::Attachment(a)), fd),
            Err(e) => Err(e),
        },
        request => service.handle(request, frame.fds.into_iter().next()).await,
    };
    match result {
        Ok(response) => ok_frame(id, response).into(),
        Err(e) => {
            let code = e.code();
            if code == ErrorCode::StorageUnavailable {
                tracing::error!(error = %e, request_id = id, "request failed in the store");
            } else {
                tracing::info!(code = ?code, reason = %e, request_id = id, "UI request refused");
            }
            error_frame(
                Some(id),
                ErrorBody {
                    code,
                    message: e.to_string(),
                },
            )
            .into()
        }
    }
}

/// Reads a request frame, with an error code for each way it can be wrong.
fn parse(line: &[u8]) -> Result<(u64, Request), (Option<u64>, ErrorBody)> {
    // The common case in one pass; only a frame that fails is looked at again to say
    // precisely what is wrong with it.
    if let Ok(frame) = serde_json::from_slice::<RequestFrame>(line) {
        if frame.v == PROTOCOL_VERSION {
            return Ok((frame.id, frame.request));
        }
    }
    diagnose(line)
}

fn diagnose(line: &[u8]) -> Result<(u64, Request), (Option<u64>, ErrorBody)> {
    let err = |id, code, message: String| Err((id, ErrorBody { code, message }));
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return err(None, ErrorCode::MalformedJson, format!("not JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return err(
            None,
            ErrorCode::BadRequest,
            "a frame must be a JSON object".into(),
        );
    };
    let Some(id) = obj.get("id").and_then(|v| v.as_u64()) else {
        return err(
            None,
            ErrorCode::BadRequest,
            "`id` must be a non-negative integer".into(),
        );
    };
    match obj.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        other => {
            return err(
                Some(id),
                ErrorCode::UnsupportedVersion,
                format!("protocol version {other:?} is not spoken here; this daemon speaks {PROTOCOL_VERSION}"),
            )
        }
    }
    // After the version: a frame of a later version may hold more.
    if let Some(key) = obj
        .keys()
        .find(|k| !["v", "id", "request"].contains(&k.as_str()))
    {
        return err(
            Some(id),
            ErrorCode::BadRequest,
            format!("unknown field `{key}`: a frame holds `v`, `id` and `request`"),
        );
    }
    let Some(request) = obj.get("request") else {
        return err(
            Some(id),
            ErrorCode::BadRequest,
            "`request` is missing".into(),
        );
    };
    let Some(kind) = request.get("type").and_then(|t| t.as_str()) else {
        return err(
            Some(id),
            ErrorCode::BadRequest,
            "`request.type` must be a string".into(),
        );
    };
    if !Request::TYPES.contains(&kind) {
        return err(
            Some(id),
            ErrorCode::UnknownRequest,
            format!("unknown request type {kind:?}"),
        );
    }
    match serde_json::from_value::<Request>(request.clone()) {
        Ok(r) => Ok((id, r)),
        Err(e) => err(Some(id), ErrorCode::BadRequest, format!("{kind}: {e}")),
    }
}

fn too_large(max: usize) -> Vec<u8> {
    error_frame(
        None,
        ErrorBody {
            code: ErrorCode::FrameTooLarge,
            message: format!("a frame may be at most {max} bytes; it was dropped"),
        },
    )
}

fn line_of(value: &impl serde::Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

fn ok_frame(id: u64, response: Response) -> Vec<u8> {
    line_of(&ResponseFrame {
        v: PROTOCOL_VERSION,
        id: Some(id),
        result: ResponseResult::Ok(Box::new(response)),
    })
}

pub(super) fn error_frame(id: Option<u64>, body: ErrorBody) -> Vec<u8> {
    line_of(&ResponseFrame {
        v: PROTOCOL_VERSION,
        id,
        result: ResponseResult::Error(body),
    })
}

fn event_frame(event: Event) -> Vec<u8> {
    line_of(&EventFrame {
        v: PROTOCOL_VERSION,
        event,
    })
}

async fn send(stream: &UnixStream, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write_all(stream, bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))?
}

/// Like [`send`], with `fd` riding on the first byte (SCM_RIGHTS).
async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: OwnedFd) -> io::Result<()> {
    let first = async {
        loop {
            stream.writable().await?;
            let res = stream.try_io(Interest::WRITABLE, || {
                let iov = [io::IoSlice::new(bytes)];
                let fds = [fd.as_raw_fd()];
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => return Ok::<usize, io::Error>(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    let n = tokio::time::timeout(WRITE_TIMEOUT, first)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))??;
    // Sent (the kernel holds its own reference); ours can go.
    drop(fd);
    send(stream, &bytes[n..]).await
}

pub(super) async fn write_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sorts_bad_frames_by_code() {
        let code = |s: &str| parse(s.as_bytes()).unwrap_err().1.code;
        assert_eq!(code("{nope"), ErrorCode::MalformedJson);
        assert_eq!(code("[1]"), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"v":2,"id":1,"request":{"type":"status"}}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(r#"{"v":1,"id":1,"request":{"type":"fly"}}"#),
            ErrorCode::UnknownRequest
        );
        assert_eq!(
            code(r#"{"v":1,"id":1,"request":{"type":"get_work_order","work_order_id":5}}"#),
            ErrorCode::BadRequest
        );
        assert!(parse(br#"{"v":1,"id":1,"request":{"type":"status"}}"#).is_ok());
    }

    #[test]
    fn descriptors_belong_to_the_frame_they_arrived_with() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut inbox = Inbox {
            bytes: b"one\ntw".to_vec(),
            fds: vec![(4, a.into())],
            skipping: false,
            chunk: Vec::new(),
            cmsg: Vec::new(),
        };
        inbox.bytes.extend_from_slice(b"o\n");
        let first = inbox.next_frame().unwrap();
        assert_eq!(first.line, b"one");
        assert!(first.fds.is_empty());
        let second = inbox.next_frame().unwrap();
        assert_eq!(second.line, b"two");
        assert_eq!(second.fds.len(), 1);
    }
}
