//! Where guest writes leave the data path for replication: one bounded lock-free ring per
//! queue (each queue runs on one core, so no lock or cache line is shared between cores on
//! the write path), drained by the replication thread.
//!
//! Order: every capture takes a number from one atomic counter, and the drain hands writes
//! out in that order across shards. A guest that writes A, waits for its completion, then
//! writes B over it on another queue must see B win at the destination too; A's capture
//! happens before A completes, so A is in its ring before B takes its number, and the
//! merge never hands B out before A. (Draining shard by shard did: the replication test
//! caught the destination ending with A's data.) Writes still in flight together are
//! unordered for the guest as well, so the order between them does not matter.
//!
//! A write that finds its ring full, or its shard over its byte budget, is not dropped and
//! does not wait: it sets its chunks' bits in a shared atomic bitmap, and the bulk copy
//! carries it later (`docs/replication.md`). So the capture never blocks the guest and
//! nothing acknowledged is lost; the cost of overflow is only that those chunks are copied
//! again instead of mirrored.

use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use strait_vhost_blk::{GuestWrite, WriteCapture};

use super::throttle::Pacer;

/// Writes one shard's ring holds: a queue has at most 256 requests in flight (the ring
/// size the test guests and QEMU use, and far above what completes between two drains,
/// which run every millisecond or sooner).
pub const SHARD_ENTRIES: usize = 4096;

/// Data bytes one shard may hold before writes overflow to the bitmap: 16 MiB, sixteen
/// milliseconds of a 1 GB/s guest on one queue, so the drain (every millisecond) keeps up
/// with any guest the link can, and a slow drain costs bounded memory.
pub const SHARD_BYTES_MAX: u64 = 16 << 20;

/// One captured mutation.
#[derive(Debug)]
pub struct Captured {
    /// Capture order across all queues.
    pub order: u64,
    pub offset: u64,
    pub len: u64,
    /// The written data; `None` when the range now reads as zeros.
    pub data: Option<Vec<u8>>,
}

struct Shard {
    ring: ArrayQueue<Captured>,
    bytes: AtomicU64,
}

/// The capture point's side of replication: shards plus the overflow bitmap.
pub struct MirrorCapture {
    shards: Vec<Shard>,
    chunk_bytes: u64,
    disk_bytes: u64,
    /// One bit per chunk: written while its shard was full.
    overflow: Vec<AtomicU64>,
    overflowed_writes: AtomicU64,
    /// Overflowed writes whose bits `take_overflow` has not taken yet.
    overflow_pending: AtomicU64,
    /// One more than the highest capture number that overflowed (0: none yet); never
    /// reset, see [`MirrorCapture::overflow_mark`].
    overflow_last: AtomicU64,
    /// The next capture number, which is also how many mutations were captured.
    next_order: AtomicU64,
    /// Captured mutations the replication thread has taken (drained, or their overflow
    /// bits taken): equal to `next_order` when nothing captured is still on its way.
    taken: AtomicU64,
    /// Per shard, the entry taken from its ring and not yet handed out: the drain's
    /// merge looks at every shard's head. Only the replication thread uses it.
    heads: std::sync::Mutex<Vec<Option<Captured>>>,
    /// Back-pressure: how long each write's completion is held (the replication thread
    /// sets its rate).
    pacer: Pacer,
}

impl MirrorCapture {
    /// A capture for `queues` queues of a disk of `disk_bytes` cut into `chunk_bytes`.
    pub fn new(queues: u16, disk_bytes: u64, chunk_bytes: u64) -> MirrorCapture {
        let chunks = disk_bytes.div_ceil(chunk_bytes.max(1));
        MirrorCapture {
            shards: (0..queues.max(1))
                .map(|_| Shard {
                    ring: ArrayQueue::new(SHARD_ENTRIES),
                    bytes: AtomicU64::new(0),
                })
                .collect(),
            chunk_bytes: chunk_bytes.max(1),
            disk_bytes,
            overflow: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            overflowed_writes: AtomicU64::new(0),
            overflow_pending: AtomicU64::new(0),
            overflow_last: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            next_order: AtomicU64::new(0),
            heads: std::sync::Mutex::new((0..queues.max(1)).map(|_| None).collect()),
            pacer: Pacer::new(),
        }
    }

    /// Hands out up to `max` captured writes, in capture order across the shards.
    pub fn drain(&self, max: usize, mut each: impl FnMut(Captured)) -> usize {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = 0;
        while taken < max {
            for (shard, head) in self.shards.iter().zip(heads.iter_mut()) {
                if head.is_none() {
                    *head = shard.ring.pop();
                    if let Some(d) = head.as_ref().and_then(|c| c.data.as_ref()) {
                        shard.bytes.fetch_sub(d.len() as u64, Ordering::AcqRel);
                    }
                }
            }
            let next = heads
                .iter_mut()
                .filter(|h| h.is_some())
                .min_by_key(|h| h.as_ref().map_or(u64::MAX, |c| c.order));
            let Some(c) = next.and_then(Option::take) else {
                break;
            };
            each(c);
            taken += 1;
        }
        self.taken.fetch_add(taken as u64, Ordering::AcqRel);
        taken
    }

    /// Mutations captured so far, and how many of them the replication thread has taken.
    pub fn counts(&self) -> (u64, u64) {
        // `taken` first: a count read after it can only be larger.
        let taken = self.taken.load(Ordering::Acquire);
        (self.next_order.load(Ordering::Acquire), taken)
    }

    /// Takes the chunks written while their shard was full (clearing them).
    pub fn take_overflow(&self, mut each: impl FnMut(u64)) {
        // Count first: a write counted here set its bits before it was counted.
        let pending = self.overflow_pending.swap(0, Ordering::AcqRel);
        for (word_index, word) in self.overflow.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                each(word_index as u64 * 64 + bit);
            }
        }
        self.taken.fetch_add(pending, Ordering::AcqRel);
    }

    /// The back-pressure pacer the data path asks before each write completion.
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// Data bytes captured and not yet drained, over all shards.
    pub fn pending_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.bytes.load(Ordering::Acquire))
            .sum()
    }

    /// One more than the highest capture number that overflowed to the bitmap (0: none).
    /// A write that depends on an overflowed one (issued after that one completed) is
    /// captured after the overflow was recorded here, so the replication thread looks at
    /// this before it mirrors each write: an overflow numbered below the write means the
    /// destination must first be told it is missing one (`Unsynced`).
    pub fn overflow_mark(&self) -> u64 {
        self.overflow_last.load(Ordering::Acquire)
    }

    /// Writes that overflowed to the bitmap so far.
    pub fn overflowed_writes(&self) -> u64 {
        self.overflowed_writes.load(Ordering::Relaxed)
    }

    fn overflow(&self, order: u64, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_bytes {
            return;
        }
        self.overflow_last.fetch_max(order + 1, Ordering::AcqRel);
        let end = offset.saturating_add(len).min(self.disk_bytes);
        for chunk in offset / self.chunk_bytes..=(end - 1) / self.chunk_bytes {
            if let Some(word) = self.overflow.get((chunk / 64) as usize) {
                word.fetch_or(1 << (chunk % 64), Ordering::AcqRel);
            }
        }
        self.overflowed_writes.fetch_add(1, Ordering::Relaxed);
        self.overflow_pending.fetch_add(1, Ordering::AcqRel);
    }
}

impl WriteCapture for MirrorCapture {
    fn capture(&self, queue: u16, write: GuestWrite<'_>) {
        let (offset, len, data) = match write {
            GuestWrite::Data { offset, data } => (offset, data.len() as u64, Some(data)),
            GuestWrite::Zeroes { offset, len } | GuestWrite::Discard { offset, len } => {
                (offset, len, None)
            }
            // Durability at the destination is confirmed on its own schedule.
            GuestWrite::Flush => return,
        };
        // One number per mutation, overflowing or not, so it also counts them.
        let order = self.next_order.fetch_add(1, Ordering::AcqRel);
        let shard = &self.shards[usize::from(queue) % self.shards.len()];
        let data_len = data.map_or(0, |d| d.len() as u64);
        if shard.bytes.load(Ordering::Acquire) + data_len > SHARD_BYTES_MAX {
            self.overflow(order, offset, len);
            return;
        }
        shard.bytes.fetch_add(data_len, Ordering::AcqRel);
        let captured = Captured {
            order,
            offset,
            len,
            data: data.map(<[u8]>::to_vec),
        };
        if shard.ring.push(captured).is_err() {
            shard.bytes.fetch_sub(data_len, Ordering::AcqRel);
            self.overflow(order, offset, len);
        }
    }

    fn completion_delay(&self, _queue: u16, bytes: u64) -> Duration {
        self.pacer.delay(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_keeps_capture_order_across_queues() {
        let capture = MirrorCapture::new(3, 1 << 20, 4096);
        for (queue, offset) in [(2, 0), (0, 4096), (1, 8192), (2, 12288), (0, 16384)] {
            capture.capture(
                queue,
                GuestWrite::Data {
                    offset,
                    data: &[1; 512],
                },
            );
        }
        let mut order = Vec::new();
        capture.drain(2, |c| order.push(c.offset));
        capture.drain(usize::MAX, |c| order.push(c.offset));
        assert_eq!(order, [0, 4096, 8192, 12288, 16384]);
        assert_eq!(capture.counts(), (5, 5));
    }

    #[test]
    fn a_full_shard_overflows_to_the_bitmap_and_loses_nothing() {
        let capture = MirrorCapture::new(2, 64 << 20, 1 << 20);
        for i in 0..SHARD_ENTRIES as u64 + 3 {
            capture.capture(
                0,
                GuestWrite::Data {
                    offset: (i % 64) << 20,
                    data: &[1; 512],
                },
            );
        }
        capture.capture(
            1,
            GuestWrite::Zeroes {
                offset: 5 << 20,
                len: 3 << 20,
            },
        );
        assert_eq!(capture.overflowed_writes(), 3);
        let mut drained = Vec::new();
        assert_eq!(
            capture.drain(usize::MAX, |c| drained.push((c.offset, c.len))),
            SHARD_ENTRIES + 1
        );
        assert_eq!(drained.last(), Some(&(5 << 20, 3 << 20)));
        let mut chunks = Vec::new();
        capture.take_overflow(|c| chunks.push(c));
        // Writes SHARD_ENTRIES.. went to chunks (i % 64).
        let expected: Vec<u64> = (SHARD_ENTRIES as u64..SHARD_ENTRIES as u64 + 3)
            .map(|i| i % 64)
            .collect();
        assert_eq!(chunks, expected);
        capture.take_overflow(|_| panic!("taken twice"));
    }
}
