//! An async client of the ui-bridge socket, for `fieldctl`, the tests, and any Rust front
//! end. It matches responses to requests by id and keeps events that arrive in between
//! for [`Client::next_event`].

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::protocol::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the fieldsync socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the fieldsync socket failed: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("the daemon sent a frame this client cannot read: {0}")]
    BadFrame(String),
    #[error("{} ({})", .0.message, serde_json::to_string(&.0.code).unwrap_or_default().trim_matches('"'))]
    Daemon(ErrorBody),
    #[error("the daemon answered {got} to a {asked} request")]
    Unexpected { asked: &'static str, got: String },
}

impl ClientError {
    /// The daemon's error code, when the daemon refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Daemon(body) => Some(body.code),
            _ => None,
        }
    }
}

pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<Event>,
    /// Error frames without an id (the daemon could not read the request's id).
    orphan_errors: VecDeque<ErrorBody>,
    /// Descriptors the daemon sent (with `open_attachment` answers), oldest first.
    fds: VecDeque<OwnedFd>,
    /// What one recvmsg reads into and its room for descriptors, made once.
    chunk: Vec<u8>,
    cmsg: Vec<u8>,
}

impl Client {
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
            events: VecDeque::new(),
            orphan_errors: VecDeque::new(),
            fds: VecDeque::new(),
            chunk: vec![0; 16 * 1024],
            cmsg: nix::cmsg_space!([RawFd; 4]),
        })
    }

    /// Sends one request and waits for its response.
    pub async fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        self.call_inner(request, None).await
    }

    /// Sends one request with a file descriptor attached (for `attach_photo`).
    pub async fn call_with_fd(
        &mut self,
        request: Request,
        fd: BorrowedFd<'_>,
    ) -> Result<Response, ClientError> {
        self.call_inner(request, Some(fd)).await
    }

    async fn call_inner(
        &mut self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&RequestFrame {
            v: PROTOCOL_VERSION,
            id,
            request,
        })
        .map_err(|e| ClientError::BadFrame(e.to_string()))?;
        line.push(b'\n');
        if let Err(e) = self.send_raw_with_fd(&line, fd).await {
            // A daemon that refuses the connection (busy, unauthorized) says why and
            // closes it, possibly before our request went out: read the reason.
            return Err(match self.read_frame().await {
                Ok(ServerFrame::Response(ResponseFrame {
                    result: ResponseResult::Error(body),
                    ..
                })) => ClientError::Daemon(body),
                _ => e,
            });
        }
        loop {
            match self.read_frame().await? {
                ServerFrame::Event(ev) => self.events.push_back(ev.event),
                ServerFrame::Response(resp) if resp.id == Some(id) => {
                    return match resp.result {
                        ResponseResult::Ok(r) => Ok(*r),
                        ResponseResult::Error(e) => Err(ClientError::Daemon(e)),
                    }
                }
                ServerFrame::Response(ResponseFrame {
                    id: None,
                    result: ResponseResult::Error(e),
                    ..
                }) => {
                    // A refusal of the connection as a whole (unauthorized, busy) comes
                    // without an id and ends the exchange. So does a line too long for
                    // the daemon to read its id: this client's lines are its requests,
                    // one at a time, so it was this one.
                    if matches!(
                        e.code,
                        ErrorCode::Unauthorized | ErrorCode::Busy | ErrorCode::FrameTooLarge
                    ) {
                        return Err(ClientError::Daemon(e));
                    }
                    self.orphan_errors.push_back(e)
                }
                ServerFrame::Response(_) => {}
            }
        }
    }

    /// Writes bytes as they are, optionally with a descriptor; tests use it to send
    /// frames the typed API cannot produce.
    pub async fn send_raw_with_fd(
        &mut self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let mut sent = 0;
        // The descriptor rides on the first sendmsg only, so it arrives with the first
        // byte of the frame.
        let mut fd = fd;
        while sent < bytes.len() {
            self.stream.writable().await?;
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(&bytes[sent..])];
                let raw = fd.map(|f| [f.as_raw_fd()]);
                let cmsgs: Vec<ControlMessage<'_>> = match &raw {
                    Some(r) => vec![ControlMessage::ScmRights(r)],
                    None => vec![],
                };
                sendmsg::<()>(
                    self.stream.as_fd().as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => {
                    sent += n;
                    fd = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads the next frame from the daemon, whatever it is.
    pub async fn read_frame(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line[..line.len() - 1])
                    .map_err(|e| ClientError::BadFrame(e.to_string()));
            }
            self.stream.readable().await?;
            let (stream, chunk, space) = (&self.stream, &mut self.chunk, &mut self.cmsg);
            // recvmsg rather than read: a descriptor the daemon sends rides on the bytes.
            let res = stream.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(chunk)];
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                Ok((msg.bytes, fds))
            });
            match res {
                Ok((0, _)) => return Err(ClientError::Closed),
                Ok((n, fds)) => {
                    self.buf.extend_from_slice(&self.chunk[..n]);
                    self.fds.extend(fds);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next response to a request whose id the daemon could not read.
    pub async fn next_orphan_error(&mut self) -> Result<ErrorBody, ClientError> {
        loop {
            if let Some(e) = self.orphan_errors.pop_front() {
                return Ok(e);
            }
            match self.read_frame().await? {
                ServerFrame::Event(ev) => self.events.push_back(ev.event),
                ServerFrame::Response(ResponseFrame {
                    result: ResponseResult::Error(e),
                    id: None,
                    ..
                }) => return Ok(e),
                ServerFrame::Response(_) => {}
            }
        }
    }

    /// The next event (after [`Client::subscribe`]).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            match self.read_frame().await? {
                ServerFrame::Event(ev) => return Ok(ev.event),
                ServerFrame::Response(ResponseFrame {
                    id: None,
                    result: ResponseResult::Error(e),
                    ..
                }) => self.orphan_errors.push_back(e),
                ServerFrame::Response(_) => {}
            }
        }
    }

    /// Sets the switches given (`None` keeps one as it is); returns the new status.
    pub async fn set_sync_switches(
        &mut self,
        auto_sync: Option<bool>,
        sync_on_visit_completed: Option<bool>,
        files_on_wifi_only: Option<bool>,
    ) -> Result<Status, ClientError> {
        let request = Request::SetSyncSwitches {
            auto_sync,
            sync_on_visit_completed,
            files_on_wifi_only,
        };
        match self.call(request).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected("set_sync_switches", &other)),
        }
    }

    /// A downloaded attachment and a read-only descriptor of its file.
    pub async fn open_attachment(
        &mut self,
        work_order_id: &str,
        attachment_id: &str,
    ) -> Result<(Attachment, OwnedFd), ClientError> {
        let request = Request::OpenAttachment {
            work_order_id: work_order_id.into(),
            attachment_id: attachment_id.into(),
        };
        match self.call(request).await? {
            Response::Attachment(a) => match self.fds.pop_front() {
                Some(fd) => Ok((a, fd)),
                None => Err(ClientError::BadFrame(
                    "the attachment came without its descriptor".into(),
                )),
            },
            other => Err(unexpected("open_attachment", &other)),
        }
    }

    pub async fn status(&mut self) -> Result<Status, ClientError> {
        match self.call(Request::Status {}).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected("status", &other)),
        }
    }

    pub async fn work_orders(&mut self) -> Result<Vec<WorkOrderSummary>, ClientError> {
        match self.call(Request::ListWorkOrders {}).await? {
            Response::WorkOrders { work_orders } => Ok(work_orders),
            other => Err(unexpected("list_work_orders", &other)),
        }
    }

    pub async fn work_order(&mut self, id: &str) -> Result<WorkOrderDetail, ClientError> {
        match self
            .call(Request::GetWorkOrder {
                work_order_id: id.into(),
            })
            .await?
        {
            Response::WorkOrder(w) => Ok(w),
            other => Err(unexpected("get_work_order", &other)),
        }
    }

    pub async fn add_record(
        &mut self,
        work_order_id: &str,
        record: RecordBody,
    ) -> Result<Item, ClientError> {
        let req = Request::AddRecord {
            work_order_id: work_order_id.into(),
            record,
        };
        expect_item("add_record", self.call(req).await?)
    }

    pub async fn edit_record(
        &mut self,
        item_id: &str,
        record: RecordBody,
    ) -> Result<Item, ClientError> {
        let req = Request::EditRecord {
            item_id: item_id.into(),
            record,
        };
        expect_item("edit_record", self.call(req).await?)
    }

    /// Deletes an item; returns whether nothing about it was ever sent.
    pub async fn delete_item(&mut self, item_id: &str) -> Result<bool, ClientError> {
        match self
            .call(Request::DeleteItem {
                item_id: item_id.into(),
            })
            .await?
        {
            Response::Deleted { sent_nothing, .. } => Ok(sent_nothing),
            other => Err(unexpected("delete_item", &other)),
        }
    }

    /// Attaches the photo in `file` (any open, readable regular file) to a record.
    pub async fn attach_photo(
        &mut self,
        record_id: &str,
        file: &impl AsFd,
        mime: Option<&str>,
        caption: Option<&str>,
    ) -> Result<Item, ClientError> {
        let req = Request::AttachPhoto {
            record_id: record_id.into(),
            mime: mime.map(Into::into),
            caption: caption.map(Into::into),
        };
        let resp = self.call_with_fd(req, file.as_fd()).await?;
        expect_item("attach_photo", resp)
    }

    pub async fn advance_stage(
        &mut self,
        work_order_id: &str,
        to: &str,
    ) -> Result<Item, ClientError> {
        let req = Request::AdvanceStage {
            work_order_id: work_order_id.into(),
            to: to.into(),
        };
        expect_item("advance_stage", self.call(req).await?)
    }

    pub async fn outbox(&mut self, limit: Option<u32>) -> Result<Vec<Operation>, ClientError> {
        match self.call(Request::Outbox { limit }).await? {
            Response::Outbox { operations } => Ok(operations),
            other => Err(unexpected("outbox", &other)),
        }
    }

    /// One page of what was captured in `[since_ms, until_ms)`, oldest first, and where
    /// the next page starts (`None` after the last).
    pub async fn export_page(
        &mut self,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        after: Option<ExportCursor>,
        limit: Option<u32>,
    ) -> Result<(Vec<Item>, Option<ExportCursor>), ClientError> {
        let req = Request::Export {
            since_ms,
            until_ms,
            after,
            limit,
        };
        match self.call(req).await? {
            Response::Exported { items, next } => Ok((items, next)),
            other => Err(unexpected("export", &other)),
        }
    }

    pub async fn retry(&mut self, item_id: &str) -> Result<Item, ClientError> {
        let req = Request::Retry {
            item_id: item_id.into(),
        };
        expect_item("retry", self.call(req).await?)
    }

    /// Drops a refused change; returns the item as it is now, or `None` when it is gone.
    pub async fn discard(&mut self, item_id: &str) -> Result<Option<Item>, ClientError> {
        match self
            .call(Request::Discard {
                item_id: item_id.into(),
            })
            .await?
        {
            Response::Discarded { item, .. } => Ok(item),
            other => Err(unexpected("discard", &other)),
        }
    }

    pub async fn sync_now(&mut self) -> Result<(), ClientError> {
        match self.call(Request::SyncNow {}).await? {
            Response::SyncStarted => Ok(()),
            other => Err(unexpected("sync_now", &other)),
        }
    }

    pub async fn diagnostics(&mut self) -> Result<Diagnostics, ClientError> {
        match self.call(Request::Diagnostics {}).await? {
            Response::Diagnostics(d) => Ok(*d),
            other => Err(unexpected("diagnostics", &other)),
        }
    }

    /// Starts a full resync; returns how many downloaded attachments were checked and
    /// how many failed their check and will be fetched again.
    pub async fn resync(&mut self) -> Result<(u32, u32), ClientError> {
        match self.call(Request::Resync {}).await? {
            Response::ResyncStarted {
                attachments_checked,
                attachments_refetched,
            } => Ok((attachments_checked, attachments_refetched)),
            other => Err(unexpected("resync", &other)),
        }
    }

    pub async fn subscribe(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Subscribe {}).await? {
            Response::Subscribed => Ok(()),
            other => Err(unexpected("subscribe", &other)),
        }
    }
}

fn expect_item(asked: &'static str, resp: Response) -> Result<Item, ClientError> {
    match resp {
        Response::Item(item) => Ok(item),
        other => Err(unexpected(asked, &other)),
    }
}

fn unexpected(asked: &'static str, got: &Response) -> ClientError {
    let got = serde_json::to_value(got)
        .ok()
        .and_then(|v| v["type"].as_str().map(String::from))
        .unwrap_or_else(|| "?".into());
    ClientError::Unexpected { asked, got }
}
