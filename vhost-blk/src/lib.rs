//! A vhost-user-blk backend on thread-per-core glommio and io_uring.
//!
//! A VMM (QEMU with `-device vhost-user-blk-pci`, Cloud Hypervisor with `--disk
//! vhost_user=true`) attaches the guest's disk through a vhost-user socket; [`Backend`]
//! serves it from a local image:
//!
//! - the vhost-user protocol runs on `vhost-user-backend`'s thread; kicks are forwarded to
//!   the executor that owns the queue (`docs/architecture.md` explains the bridge and its
//!   cost);
//! - one executor per configured core, each owning its queues for their whole life, reads
//!   and writes the image through io_uring (`O_DIRECT` where the filesystem allows it);
//! - every guest page the backend writes is marked in the VMM's dirty log while
//!   `VHOST_F_LOG_ALL` is negotiated, so the VM can migrate while its disk is busy;
//! - every guest write passes through one [`WriteCapture`] point, the hook replication
//!   attaches to;
//! - hostile descriptor chains are answered with `IOERR`/`UNSUPP` and counted, never trusted.

#[cfg(any(test, feature = "fuzzing"))]
pub mod bitmap;
#[cfg(not(any(test, feature = "fuzzing")))]
mod bitmap;
mod capture;
mod config;
mod device;
mod fence;
mod limits;
#[cfg(any(test, feature = "fuzzing"))]
pub mod metrics;
#[cfg(not(any(test, feature = "fuzzing")))]
mod metrics;
mod queue;
#[cfg(any(test, feature = "fuzzing"))]
pub mod request;
#[cfg(not(any(test, feature = "fuzzing")))]
mod request;
mod rt;
mod server;

pub use capture::{GuestWrite, SharedCapture, WriteCapture};
pub use config::{feature_names, VHOST_F_LOG_ALL};
pub use fence::FenceTimeout;
pub use limits::{
    DEFAULT_QUEUES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_QUEUES, MAX_QUEUE_SIZE,
    MAX_REQUEST_BYTES, MAX_SEGMENTS, MAX_SEGMENT_BYTES, SECTOR_SIZE, SERIAL_BYTES,
};
pub use metrics::{ErrorCounts, Histogram, QueueSnapshot};
pub use server::{Backend, BackendConfig, DeviceStatus, QueueStats, ServerError};
