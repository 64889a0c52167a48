//! Fencing: while a disk is fenced, no guest mutation (write, discard, write-zeroes) is
//! applied or acknowledged. A replication source that was demoted, or superseded by a
//! promoted destination, is fenced, so two writers can never both be live; a destination
//! serves its disk fenced until it is promoted.
//!
//! The ordering that makes [`Fence::fence`] mean "no mutation lands after this returns":
//! a mutation first counts itself in, then looks at the flag (both sequentially
//! consistent); the fence sets the flag, then waits for the count to reach zero. A mutation
//! that counted itself in before the flag was set is waited for; one that counts itself in
//! later sees the flag and fails without touching the disk. A mutation already applied
//! when the fence comes is not acknowledged either: the queue checks the flag again just
//! before it completes the request, and reports an I/O error instead (a failed write
//! leaves its range undefined, which the data on the disk satisfies).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often [`Fence::fence`] looks whether the mutations in flight are done.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// The fence state of one device.
#[derive(Debug, Default)]
pub struct Fence {
    fenced: AtomicBool,
    /// Mutations between [`Fence::enter`] and the drop of their guard.
    inside: AtomicU64,
}

/// A mutation inside the fence check; dropping it lets a waiting fence complete.
#[derive(Debug)]
pub struct Entered<'a>(&'a Fence);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fence did not see the mutations in flight finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{inside} guest mutations still in flight after {waited:?}; the disk is fenced, and they will not be acknowledged")]
pub struct FenceTimeout {
    pub inside: u64,
    pub waited: Duration,
}

impl Fence {
    /// A fence in the given state.
    pub fn new(fenced: bool) -> Fence {
        Fence {
            fenced: AtomicBool::new(fenced),
            inside: AtomicU64::new(0),
        }
    }

    /// A mutation about to touch the disk: `None` if the disk is fenced.
    pub fn enter(&self) -> Option<Entered<'_>> {
        self.inside.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(self);
        if self.fenced.load(Ordering::SeqCst) {
            return None;
        }
        Some(entered)
    }

    /// Whether the disk is fenced now.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Fences the disk and waits, at most `timeout`, until no mutation is in flight.
    pub fn fence(&self, timeout: Duration) -> Result<(), FenceTimeout> {
        self.fenced.store(true, Ordering::SeqCst);
        let started = Instant::now();
        loop {
            let inside = self.inside.load(Ordering::SeqCst);
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
        self.fenced.store(false, Ordering::SeqCst);
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
        let fence = Fence::new(false);
        assert!(fence.enter().is_some());
        fence.fence(Duration::ZERO).unwrap();
        assert!(fence.enter().is_none());
        assert!(fence.is_fenced());
        fence.lift();
        assert!(fence.enter().is_some());
    }

    #[test]
    fn the_fence_waits_for_mutations_in_flight() {
        let fence = Arc::new(Fence::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fence.clone();
        let writer = std::thread::spawn(move || {
            let entered = f.enter();
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
            "the fence returned before the write left"
        );
    }
}
