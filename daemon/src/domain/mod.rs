//! The domain rules: work orders and their stages, records, photos, and the outbox that
//! carries every change to the back office. Each change and its outbox operation are
//! written in the same transaction (promise 3), so the functions here take the store's
//! connection inside a write job and never commit themselves.

pub mod items;
pub mod journal;
pub mod outbox;
pub mod photos;
pub mod settings;
pub mod work_orders;

use ui_bridge::ErrorCode;

use crate::store::{PhotoError, StoreError};

/// Why a request about the domain was refused. Each maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("no work order {0} on this device")]
    UnknownWorkOrder(String),
    #[error("no item {0} on this device")]
    UnknownItem(String),
    #[error("{0}")]
    InvalidRecord(String),
    #[error("work order {work_order_id} is at stage {stage:?}; the next allowed stage is {next}, not {to:?}")]
    StageJump {
        work_order_id: String,
        stage: String,
        next: String,
        to: String,
    },
    #[error("item {0} was already delivered to the back office and can no longer change")]
    AlreadyDelivered(String),
    #[error("{0}")]
    NotEditable(String),
    #[error("attach_photo needs the photo's file descriptor sent with its frame (SCM_RIGHTS)")]
    MissingDescriptor,
    #[error("invalid work order: {0}")]
    InvalidWorkOrder(String),
    #[error(transparent)]
    Photo(#[from] PhotoError),
    #[error("storage is low ({free} bytes free, {needed} kept in reserve): new captures are refused until space is freed; everything stored keeps syncing")]
    StorageLow { free: u64, needed: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    AttachmentUnavailable(String),
    /// A request whose fields are each well formed but do not fit together.
    #[error("{0}")]
    BadRequest(String),
    /// A bug (a task that panicked): the request changed nothing.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for DomainError {
    fn from(e: rusqlite::Error) -> Self {
        DomainError::Store(StoreError::Sqlite(e))
    }
}

impl DomainError {
    /// The store could not take the change, whatever the change: see
    /// [`StoreError::is_unavailable`].
    pub fn is_store_unavailable(&self) -> bool {
        matches!(self, DomainError::Store(e) if e.is_unavailable())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            DomainError::UnknownWorkOrder(_) => ErrorCode::UnknownWorkOrder,
            DomainError::UnknownItem(_) => ErrorCode::UnknownItem,
            DomainError::InvalidRecord(_) | DomainError::InvalidWorkOrder(_) => {
                ErrorCode::InvalidRecord
            }
            DomainError::StageJump { .. } => ErrorCode::StageJump,
            DomainError::AlreadyDelivered(_) => ErrorCode::AlreadyDelivered,
            DomainError::NotEditable(_) => ErrorCode::NotEditable,
            DomainError::MissingDescriptor => ErrorCode::MissingDescriptor,
            DomainError::Photo(PhotoError::NotRegularFile) => ErrorCode::NotRegularFile,
            DomainError::Photo(PhotoError::TooLarge { .. }) => ErrorCode::PhotoTooLarge,
            DomainError::Photo(PhotoError::Read(_) | PhotoError::Empty) => ErrorCode::BadRequest,
            DomainError::Photo(PhotoError::Io { source, .. })
                if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) =>
            {
                ErrorCode::StorageLow
            }
            DomainError::Photo(PhotoError::Io { .. }) => ErrorCode::StorageUnavailable,
            DomainError::StorageLow { .. } | DomainError::Store(StoreError::Full) => {
                ErrorCode::StorageLow
            }
            DomainError::Store(_) => ErrorCode::StorageUnavailable,
            DomainError::AttachmentUnavailable(_) => ErrorCode::AttachmentUnavailable,
            DomainError::BadRequest(_) => ErrorCode::BadRequest,
            DomainError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Reads a JSON `null` as the field's default, as a missing key is: a back office whose
/// language writes an empty list or an absent string as `null` (Go's nil slices, a
/// mapper's unset fields) sends exactly that. For `#[serde(default, deserialize_with)]`.
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

/// The stage after `stage` in `workflow`, if any.
pub fn next_stage<'a>(workflow: &'a [String], stage: &str) -> Option<&'a str> {
    let at = workflow.iter().position(|s| s == stage)?;
    workflow.get(at + 1).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stage_walks_the_workflow() {
        let wf: Vec<String> = ["new", "accepted", "done"].map(String::from).to_vec();
        assert_eq!(next_stage(&wf, "new"), Some("accepted"));
        assert_eq!(next_stage(&wf, "accepted"), Some("done"));
        assert_eq!(next_stage(&wf, "done"), None);
        assert_eq!(next_stage(&wf, "elsewhere"), None);
    }
}
