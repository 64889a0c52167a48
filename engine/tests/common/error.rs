//! The harness's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong while preparing or running a guest.
///
/// `Debug` prints the same as `Display` (plus the source chain) so that a test failing with
/// `.expect(..)` shows the guest's console with real line breaks, not an escaped string.
#[derive(thiserror::Error)]
pub enum HarnessError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed ({status}):\n{output}")]
    Command {
        program: String,
        status: String,
        output: String,
    },
    #[error("{what} exited ({status}) before its socket {path} appeared; its log:\n{log}")]
    ExitedBeforeSocket {
        what: String,
        path: PathBuf,
        status: String,
        log: String,
    },
    #[error("socket {path} did not appear within {timeout:?}")]
    SocketTimeout { path: PathBuf, timeout: Duration },
    #[error("no guest verdict within {timeout:?}; QEMU was killed. Console:\n{console}")]
    VerdictTimeout { timeout: Duration, console: String },
    #[error("QEMU exited ({status}) without a guest verdict. Console:\n{console}")]
    NoVerdict { status: String, console: String },
    #[error("unparsable verdict line {line:?}. Console:\n{console}")]
    BadVerdict { line: String, console: String },
    #[error("QEMU did not exit within {timeout:?}; it was killed. Console:\n{console}")]
    ExitTimeout { timeout: Duration, console: String },
    #[error("no guest heartbeat i >= {min_i} within {timeout:?}. Console:\n{console}")]
    HeartbeatTimeout {
        min_i: u64,
        timeout: Duration,
        console: String,
    },
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl HarnessError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        HarnessError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
