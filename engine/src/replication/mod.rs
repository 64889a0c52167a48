//! Replication of a live disk to a destination engine: the bulk copy of every chunk, the
//! asynchronous mirroring of guest writes, the resync of what changed while the link
//! was lost, and the verify that compares both disks by chunk digests while the guest
//! writes ([`verify`]). Sans-IO state machines ([`ReplicaSource`], [`ReplicaDest`]) and the messages
//! between them ([`wire::Message`]); the engine's driver does the disk and link I/O.
//!
//! Why the destination never ends up older than the source (the mirror race, and why no
//! range lock is needed) is argued in `docs/replication.md`; `engine/tests/replication_sim.rs`
//! checks it over thousands of seeded runs of the real session on the simulated link.

pub mod apply;
pub mod capture;
pub mod dest;
pub mod driver;
pub mod identity;
pub mod source;
pub mod throttle;
pub mod verify;
pub mod wire;

pub use dest::{Apply, DestConfig, DestError, DestStats, PromoteError, Promoted, ReplicaDest};
pub use source::{
    BulkJob, ReplicaSource, SourceConfig, SourceError, SourceState, SourceStats, WriteVerdict,
};
pub use verify::{ByteRange, VerifyRefusal, VerifyReport, VerifyState};

use thiserror::Error;

/// The bulk copy's unit: 512 KiB, so a chunk and its message header fit one link frame
/// (1 MiB) with room to spare ([`wire::DATA_BYTES_MAX`]). Per chunk the source keeps a
/// dirty bit and the destination two sequence numbers: 32 MiB of destination state per
/// TiB of disk.
pub const CHUNK_BYTES: u64 = 512 << 10;

/// The most mirrored bytes the destination may ever leave unconfirmed: one second of a
/// 1 Gbit/s link (119 MiB), rounded to 128 MiB. It bounds the memory; the bound in force is
/// usually lower, one second of the measured link rate (the downtime budget, see
/// [`throttle`]). Past the bound nothing is lost (the bitmap makes the bulk copy carry the
/// write), the destination only falls further behind.
pub const MIRROR_BACKLOG_BYTES_MAX: u64 = 128 << 20;

/// Bulk chunks sent and not yet confirmed: 64 × 512 KiB = 32 MiB, a link's
/// bandwidth-delay product (1 Gbit/s × 250 ms), so the copy keeps the link busy while
/// each confirmation makes its round trip.
pub const BULK_INFLIGHT_MAX: usize = 64;

/// A replication setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("chunk size {chunk_bytes} is not a non-zero multiple of 4096 up to {max}")]
    ChunkSize { chunk_bytes: u64, max: usize },
    #[error("the disk is empty")]
    EmptyDisk,
    #[error("{chunks} chunks do not fit this machine's address space")]
    TooManyChunks { chunks: u64 },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// What stops a replication driver from starting.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("cannot open the disk image {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the replication thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Chunks of a disk of `disk_bytes` (the last one may be shorter).
pub(crate) fn chunk_count(disk_bytes: u64, chunk_bytes: u64) -> Result<u64, ConfigError> {
    let max = wire::DATA_BYTES_MAX;
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(4096) || chunk_bytes > max as u64 {
        return Err(ConfigError::ChunkSize { chunk_bytes, max });
    }
    if disk_bytes == 0 {
        return Err(ConfigError::EmptyDisk);
    }
    Ok(disk_bytes.div_ceil(chunk_bytes))
}

/// Bytes of chunk `index`.
pub(crate) fn chunk_len(index: u64, disk_bytes: u64, chunk_bytes: u64) -> u64 {
    chunk_bytes.min(disk_bytes - index * chunk_bytes)
}

#[cfg(test)]
mod tests;
