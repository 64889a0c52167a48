//! Fencing: while a disk is fenced, no guest mutation (write, discard, write-zeroes) is
//! applied or acknowledged. A replication source that was demoted, or superseded by a
//! promoted destination, is fenced, so two writers can never both be live; a destination
//! serves its disk fenced until it is promoted.
//!
//! The ordering that makes [`Fence::fence`] mean "no mutation lands after this returns"
//! is Dekker's: each side writes its own variable, then reads the other's, all
//! sequentially consistent.
//!
//! - A mutation on queue `q` first counts itself in on `q`'s own counter, then loads the
//!   flag.
//! - The fence stores the flag, then loads every queue's counter and waits until one pass
//!   sums to zero.
//!
//! SeqCst puts all of these in one total order, so at least one side sees the other. A
//! mutation that loaded the flag unset did so before the flag was stored, so its increment
//! precedes the flag store, which precedes every counter load of every pass: each pass
//! counts it until it has counted itself out. A mutation whose increment comes after the
//! flag store loads the flag after it too, sees it set and fails without touching the
//! disk. The sum need not be an atomic snapshot for this: every counter load of a pass
//! comes after the flag store, and every mutation that can still land incremented before
//! it; a counter never reads zero while one of its own mutations is between its increment
//! and its decrement, since each queue's decrements follow their own increments.
//!
//! A mutation already applied when the fence comes is not acknowledged either: the queue
//! checks the flag again just before it completes the request, and reports an I/O error
//! instead (a failed write leaves its range undefined, which the data on the disk
//! satisfies).
//!
//! Each queue has its own counter on its own cache line: the counters are written on every
//! guest mutation, from whichever core runs the queue, and one counter shared by all queues
//! would bounce its line between those cores on the request path. The fence, which is rare,
//! pays instead: it reads one line per queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often [`Fence::fence`] looks whether the mutations in flight are done.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// A value alone on its cache line, so that no write to a neighbour invalidates the line
/// of another core. 128 bytes, not 64: x86 prefetches lines in adjacent pairs and recent
/// ARM cores have 128-byte lines (crossbeam's `CachePadded` picks the same size for them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

/// The fence state of one device.
#[derive(Debug)]
pub struct Fence {
    /// Read on every guest mutation from every queue's core; written only when the fence
    /// is set or lifted.
    fenced: CacheLine<AtomicBool>,
    /// Per queue: its mutations between [`Fence::enter`] and the drop of their guard.
    /// Invariant: never empty (see [`Fence::slot`]).
    inside: Box<[CacheLine<AtomicU64>]>,
}

/// A mutation inside the fence check; dropping it lets a waiting fence complete.
#[derive(Debug)]
pub struct Entered<'a>(&'a AtomicU64);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fence did not see the mutations in flight finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{inside} guest mutations still in flight after {waited:?}; the disk is fenced, and they will not be acknowledged")]
pub struct FenceTimeout {
    /// Summed over all queues, in the last pass.
    pub inside: u64,
    pub waited: Duration,
}

impl Fence {
    /// A fence in the given state for a device with `queue_count` queues.
    pub fn new(queue_count: usize, fenced: bool) -> Fence {
        // A device always has a queue; one counter at least keeps `slot` total.
        let inside = (0..queue_count.max(1))
            .map(|_| CacheLine(AtomicU64::new(0)))
            .collect();
        Fence {
            fenced: CacheLine(AtomicBool::new(fenced)),
            inside,
        }
    }

    /// The counter of `queue`. Queue indices come from the backend, which numbers its
    /// queues `0..queue_count`, never from the guest; an index out of that range anyway
    /// (a backend bug) shares another queue's counter rather than panicking on the request
    /// path. Correctness does not depend on which counter a mutation uses, since the fence
    /// sums them all; only the cache line stops being the queue's own.
    fn slot(&self, queue: u16) -> &AtomicU64 {
        &self.inside[usize::from(queue) % self.inside.len()].0
    }

    /// A mutation on `queue` about to touch the disk: `None` if the disk is fenced.
    pub fn enter(&self, queue: u16) -> Option<Entered<'_>> {
        let inside = self.slot(queue);
        inside.fetch_add(1, Ordering::SeqCst);
        // Made before the flag is looked at, so a refused mutation counts itself out too.
        let entered = Entered(inside);
        if self.fenced.0.load(Ordering::SeqCst) {
            return None;
        }
        Some(entered)
    }

    /// Whether the disk is fenced now.
    pub fn is_fenced(&self) -> bool {
        self.fenced.0.load(Ordering::SeqCst)
    }

    /// Mutations in flight, summed over all queues. Not a snapshot: see the module
    /// documentation for why the fence needs none.
    fn inside(&self) -> u64 {
        self.inside
            .iter()
            .map(|slot| slot.0.load(Ordering::SeqCst))
            .sum()
    }

    /// Fences the disk and waits, at most `timeout`, until no mutation is in flight on any
    /// queue.
    pub fn fence(&self, timeout: Duration) -> Result<(), FenceTimeout> {
        self.fenced.0.store(true, Ordering::SeqCst);
        let started = Instant::now();
        loop {
            let inside = self.inside();
            if inside == 0 {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(FenceTimeout {
                    inside,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(DRAIN_POLL);
        }
    }

    /// Lifts the fence: mutations are applied again.
    pub fn lift(&self) {
        self.fenced.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_fenced_disk_lets_no_mutation_in() {
        let fence = Fence::new(2, false);
        assert!(fence.enter(0).is_some());
        fence.fence(Duration::ZERO).unwrap();
        assert!(fence.enter(0).is_none());
        assert!(fence.enter(1).is_none());
        assert!(fence.is_fenced());
        fence.lift();
        assert!(fence.enter(0).is_some());
        assert!(fence.enter(1).is_some());
    }

    /// A mutation in flight on `queue` of `queues` holds `fence` until it leaves.
    fn assert_fence_waits_for(queues: usize, queue: u16) {
        let fence = Arc::new(Fence::new(queues, false));
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fence.clone();
        let writer = std::thread::spawn(move || {
            let entered = f.enter(queue);
            assert!(entered.is_some());
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(entered);
            Instant::now()
        });
        rx.recv().unwrap();
        let err = fence.fence(Duration::from_millis(1)).unwrap_err();
        assert_eq!(err.inside, 1);
        fence.fence(Duration::from_secs(5)).unwrap();
        let fenced_at = Instant::now();
        let left_at = writer.join().unwrap();
        assert!(
            left_at <= fenced_at,
            "the fence returned before the write on queue {queue} left"
        );
    }

    #[test]
    fn the_fence_waits_for_mutations_in_flight() {
        assert_fence_waits_for(1, 0);
    }

    #[test]
    fn the_fence_waits_for_a_mutation_on_another_queue_than_the_first() {
        // Queue 0 idle, queue 1 busy: the fence sums every queue's counter.
        assert_fence_waits_for(2, 1);
    }

    #[test]
    fn a_mutation_entering_after_the_flag_is_set_is_refused() {
        // Queue 1 holds the fence in its wait, so the flag is set but `fence` has not
        // returned: a mutation entering on queue 0 now must be refused, and count itself
        // out again so the fence still completes once queue 1 is done.
        let fence = Arc::new(Fence::new(2, false));
        let held = fence.enter(1).unwrap();
        let f = fence.clone();
        let fencer = std::thread::spawn(move || f.fence(Duration::from_secs(5)));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !fence.is_fenced() {
            assert!(Instant::now() < deadline, "the fence never set its flag");
            std::thread::yield_now();
        }
        assert!(fence.enter(0).is_none());
        assert!(fence.enter(1).is_none());
        assert!(!fencer.is_finished(), "the fence did not wait for queue 1");
        drop(held);
        fencer.join().unwrap().unwrap();
        assert_eq!(fence.inside(), 0);
    }

    #[test]
    fn a_queue_index_out_of_range_is_counted_without_panicking() {
        let fence = Fence::new(2, false);
        let entered = fence.enter(u16::MAX).unwrap();
        assert_eq!(fence.fence(Duration::ZERO).unwrap_err().inside, 1);
        drop(entered);
        fence.fence(Duration::ZERO).unwrap();
        // No queues at all still leaves one counter to count in.
        let empty = Fence::new(0, true);
        assert!(empty.enter(3).is_none());
        empty.fence(Duration::ZERO).unwrap();
    }

    #[test]
    fn every_queue_counter_has_its_own_cache_line() {
        let fence = Fence::new(3, false);
        let addresses: Vec<usize> = fence
            .inside
            .iter()
            .map(|slot| &slot.0 as *const AtomicU64 as usize)
            .collect();
        for pair in addresses.windows(2) {
            assert!(pair[1] - pair[0] >= 128);
        }
        assert_eq!(std::mem::align_of::<CacheLine<AtomicU64>>(), 128);
    }
}
