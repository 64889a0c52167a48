//! Every bound of the block backend, with the reason for its value.

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
/// One sector: 512 bytes, `1 << SECTOR_SHIFT`.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Largest virtqueue we accept. 256 entries carry a queue depth of 128 two-descriptor
/// requests (or 256 indirect ones), more than Linux's default `virtio_blk` depth of 128 and
/// enough to saturate an NVMe device; a larger ring only adds memory and latency.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Most virtqueues (and so guest-side hardware queues) one device offers. A 2-core host
/// gains nothing past one queue per vCPU; 16 covers a large guest without letting a
/// frontend make us allocate per-queue state without bound.
pub const MAX_QUEUES: u16 = 16;

/// Default number of queues.
pub const DEFAULT_QUEUES: u16 = 1;

/// Most data segments (`seg_max`) in one request. Linux sizes its scatter-gather tables from
/// it; 126 is what QEMU advertises for a 128-entry queue (queue size - 2 for header and
/// status), so guests are tuned for it.
pub const MAX_SEGMENTS: usize = 126;

/// Largest single data segment (`size_max`). Guests split larger segments; 64 KiB keeps
/// each copy between guest memory and the I/O buffer within a couple of cache-friendly
/// chunks.
pub const MAX_SEGMENT_BYTES: u32 = 64 * 1024;

/// Largest request, in bytes. Linux's default `max_sectors_kb` is 1280 KiB; 4 MiB leaves room
/// for a raised limit while bounding the I/O buffer one request can pin.
pub const MAX_REQUEST_BYTES: u64 = 4 * 1024 * 1024;

/// Bytes of guest data one queue may have in flight (read buffers and write copies). A full
/// 128-deep queue of 128 KiB requests fits; beyond it the queue stops taking new requests
/// until completions free space, which bounds memory per queue whatever the guest does.
pub const MAX_INFLIGHT_BYTES: u64 = 16 * 1024 * 1024;

/// Most ranges in one discard or write-zeroes request (`max_discard_seg`). QEMU offers 1;
/// Linux merges discards up to this many ranges, and 32 bounds the 512-byte payload we read.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// Largest discard / write-zeroes range, in sectors (`max_discard_sectors`): 1 GiB. A single
/// `fallocate` over more blocks for longer than a guest's I/O timeout on some filesystems.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;

/// Length of the serial number `GET_ID` answers (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_BYTES: usize = 20;
