//! The JSON control API of `strait serve`: a Unix-socket server that answers newline-delimited
//! JSON requests by asking a [`Handler`], and the blocking client that `strait ctl` and the
//! tests use. The wire format is in `protocol.rs` and, as a versioned schema, in
//! `docs/api.md`.

use std::io;
use std::path::PathBuf;

mod client;
mod protocol;
mod server;

pub use client::{ControlClient, CLIENT_TIMEOUT, MAX_RESPONSE_BYTES};
pub use protocol::{
    parse_request, read_line_bounded, Command, ErrorCode, Framed, Request, RequestError,
    API_VERSION, MAX_DISCARD_BYTES, MAX_REQUEST_BYTES,
};
pub use server::{
    ControlServer, CONNECTION_IDLE_TIMEOUT, CONNECTION_WRITE_TIMEOUT, MAX_CONNECTIONS,
};

/// What the engine plugs into the control server: the answers to the commands that depend
/// on its state. `version` and `help` are answered by the server itself.
///
/// The server calls these from its connection threads, concurrently, so they must be cheap
/// (read counters, do not wait on I/O), except `promote` and `demote`, which wait for the
/// disk (a sync; the writes in flight), boundedly, before they answer. A panic is caught and answered with an `internal`
/// error; the server keeps serving.
pub trait Handler: Send + Sync + 'static {
    /// Result object of the `status` command.
    fn status(&self) -> serde_json::Value;
    /// Result object of the `stats` command.
    fn stats(&self) -> serde_json::Value;
    /// Starts replication (`replicate`), or says why not.
    fn replicate(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        let _ = args;
        Err((
            protocol::ErrorCode::Refused,
            "this engine does not replicate".into(),
        ))
    }
    /// Starts a verify of the replica (`verify`), or says why not.
    fn verify(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        let _ = args;
        Err((
            protocol::ErrorCode::Refused,
            "this engine does not replicate".into(),
        ))
    }
    /// Promotes this replica (`promote`), or says why not.
    fn promote(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        let _ = args;
        Err((
            protocol::ErrorCode::Refused,
            "this engine holds no replica".into(),
        ))
    }
    /// Demotes this source (`demote`), or says why not.
    fn demote(&self) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        refused("this engine serves no disk")
    }
    /// Starts a live migration (`migrate`), or says why not.
    fn migrate(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        let _ = args;
        refused("this engine does not migrate")
    }
    /// Rolls the running migration back (`migrate-cancel`), or says why not.
    fn migrate_cancel(&self) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
        refused("no migration runs")
    }
}

/// The refusal the default handlers answer with.
fn refused(message: &str) -> Result<serde_json::Value, (protocol::ErrorCode, String)> {
    Err((protocol::ErrorCode::Refused, message.into()))
}

/// What can fail in the control server or client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot inspect control socket path {path}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("control socket {path} is in use: another server answers on it")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it with the control socket")]
    NotASocket { path: PathBuf },
    #[error("cannot probe the existing control socket {path}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale control socket {path}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind the control socket {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set mode 0600 on the control socket {path}")]
    SetPermissions { path: PathBuf, source: io::Error },
    #[error("cannot set up the control socket {path}")]
    Setup { path: PathBuf, source: io::Error },
    #[error("cannot start the control server thread for {path}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("cannot connect to control socket {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot send a request on control socket {path}")]
    Send { path: PathBuf, source: io::Error },
    #[error("cannot read a response from control socket {path}")]
    Receive { path: PathBuf, source: io::Error },
    #[error("control socket {path} closed the connection before answering")]
    Closed { path: PathBuf },
    #[error("a response on control socket {path} is longer than {limit_bytes} bytes")]
    ResponseTooLarge { path: PathBuf, limit_bytes: usize },
    #[error("a response on control socket {path} is not valid JSON")]
    BadResponse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("a response on control socket {path} breaks the protocol: {reason}")]
    Protocol { path: PathBuf, reason: String },
    #[error("the engine refused the request ({code}): {message}")]
    Remote { code: String, message: String },
}
