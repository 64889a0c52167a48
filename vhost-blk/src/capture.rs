//! The one point every guest write passes through.
//!
//! The replication engine attaches a [`WriteCapture`] to the device; each queue calls it on
//! its own core, after the write is applied to the local image and before the guest sees the
//! completion. Nothing attached costs one branch on an `Option` per mutation.
//!
//! Ordering contract: for one queue, captures arrive in completion order; two writes in
//! flight at once on different queues may be captured in either order, exactly as the guest
//! may observe them (a guest that needs ordering waits for the first completion).

use std::sync::Arc;
use std::time::Duration;

/// A mutation of the disk, as applied locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestWrite<'a> {
    /// `data` now lives at byte `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// `len` bytes at `offset` now read as zeros (write-zeroes).
    Zeroes { offset: u64, len: u64 },
    /// `len` bytes at `offset` were discarded; they read as zeros on this image.
    Discard { offset: u64, len: u64 },
    /// Every write completed before this is durable on the local image.
    Flush,
}

/// Receives every guest write. Called on the queue's core; must not block.
pub trait WriteCapture: Send + Sync + 'static {
    /// One mutation from queue `queue`.
    fn capture(&self, queue: u16, write: GuestWrite<'_>);

    /// Back-pressure: how long the queue holds the completion of a data write of `bytes`
    /// that it just captured. The queue waits on a timer, so other requests go on; the
    /// guest only sees its write take longer, and slows down if it waits for it.
    fn completion_delay(&self, _queue: u16, _bytes: u64) -> Duration {
        Duration::ZERO
    }
}

/// The capture attached to a device, if any.
pub type SharedCapture = Option<Arc<dyn WriteCapture>>;
