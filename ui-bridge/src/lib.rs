//! The touchscreen app's side of fieldsync: the versioned ui-bridge protocol
//! ([`protocol`]), an async client for it ([`client`]), and the `fieldctl` tool built on
//! them.

pub mod client;
pub mod protocol;

pub use client::{Client, ClientError};
pub use protocol::*;
