//! The scheduler's share of the link among Mirror, Memory and Bulk: deficit round robin
//! by bytes (Shreedhar and Varghese), so each backlogged class gets its weight's share
//! whatever its frame sizes, and none starves. Control is not here: it goes first.
//!
//! Also the dialer's choice of how many connections carry the link ([`ConnTuning`]).

use tracing::info;

use super::{CONN_PROBE_GAIN_MIN_PERCENT, CONN_PROBE_INTERVAL_NS, DRR_QUANTUM_BYTES};
use crate::protocol::MAX_FRAME_PAYLOAD_BYTES;

/// The dialer's search for its connection count (see
/// [`super::SessionConfig::connections_grow_max`]): doubles the count while each doubling
/// raised the drain rate by [`CONN_PROBE_GAIN_MIN_PERCENT`], else goes back to the count
/// before and settles.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnTuning {
    /// Connections wanted now. Invariant: `connections..=grow_max` of the config.
    pub target: u16,
    grow_max: u16,
    /// The count before the last doubling and the drain rate it reached.
    before: Option<(u16, u64)>,
    next_probe_ns: u64,
    /// No more changes: the last doubling did not pay, or the maximum was reached.
    settled: bool,
}

impl ConnTuning {
    pub fn new(start: u16, grow_max: u16, now_ns: u64) -> ConnTuning {
        ConnTuning {
            target: start,
            grow_max: grow_max.max(start),
            before: None,
            next_probe_ns: now_ns,
            settled: grow_max <= start,
        }
    }

    /// When the current period ends, unless settled.
    pub fn next_probe_ns(&self) -> Option<u64> {
        (!self.settled).then_some(self.next_probe_ns)
    }

    /// True once per [`CONN_PROBE_INTERVAL_NS`] while not settled; the next period is
    /// scheduled before the caller decides whether this one says anything, so a skipped
    /// period never wakes the driver in a loop.
    pub fn period_over(&mut self, now_ns: u64) -> bool {
        if self.settled || now_ns < self.next_probe_ns {
            return false;
        }
        self.next_probe_ns = now_ns.saturating_add(CONN_PROBE_INTERVAL_NS);
        true
    }

    /// Judges a period at `target` connections that drained `rate` bytes per second with
    /// data waiting. True when the target went back down (surplus connections retire).
    pub fn judge(&mut self, rate: u64) -> bool {
        let gain_min = u128::from(100 + CONN_PROBE_GAIN_MIN_PERCENT);
        match self.before {
            Some((count, rate_before))
                if u128::from(rate) * 100 < u128::from(rate_before) * gain_min =>
            {
                info!(
                    from = self.target,
                    to = count,
                    rate,
                    rate_before,
                    "more connections did not pay; going back"
                );
                self.target = count;
                self.settled = true;
                true
            }
            _ if self.target >= self.grow_max => {
                self.settled = true;
                false
            }
            _ => {
                let to = self.target.saturating_mul(2).min(self.grow_max);
                info!(from = self.target, to, rate, "adding connections");
                self.before = Some((self.target, rate));
                self.target = to;
                false
            }
        }
    }
}

/// Deficit round robin over three classes.
#[derive(Debug)]
pub(super) struct Drr {
    weights: [u32; 3],
    next: usize,
    /// Invariant: each is below the class's largest frame plus one quantum.
    deficit_bytes: [u64; 3],
}

impl Drr {
    /// Weights must be at least 1 (checked by the session's configuration).
    pub fn new(weights: [u32; 3]) -> Drr {
        debug_assert!(!weights.contains(&0));
        Drr {
            weights,
            next: 0,
            deficit_bytes: [0; 3],
        }
    }

    /// Which class sends next, given the size of each class's next sendable frame; the
    /// chosen class is charged for it.
    pub fn pick(&mut self, ready_len: [Option<usize>; 3]) -> Option<usize> {
        if ready_len.iter().all(Option::is_none) {
            return None;
        }
        let weight_min = u64::from(self.weights.iter().copied().min().unwrap_or(1).max(1));
        // Each visit to a class that cannot send yet adds at least a quantum, so within
        // this many visits some class has a frame's worth.
        let visits_max =
            3 * (u64::from(MAX_FRAME_PAYLOAD_BYTES) / (DRR_QUANTUM_BYTES * weight_min) + 2);
        for _ in 0..visits_max {
            let i = self.next;
            match ready_len[i] {
                None => {
                    // An idle class keeps no credit, as DRR requires.
                    self.deficit_bytes[i] = 0;
                    self.next = (i + 1) % 3;
                }
                Some(len) if self.deficit_bytes[i] >= len as u64 => {
                    self.deficit_bytes[i] -= len as u64;
                    return Some(i);
                }
                Some(_) => {
                    self.deficit_bytes[i] += DRR_QUANTUM_BYTES * u64::from(self.weights[i]);
                    self.next = (i + 1) % 3;
                }
            }
        }
        debug_assert!(false, "DRR found no class within its visit bound");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: [u32; 3], lens: [usize; 3], rounds: usize) -> [u64; 3] {
        let mut drr = Drr::new(weights);
        let mut bytes = [0u64; 3];
        for _ in 0..rounds {
            let i = drr.pick(lens.map(Some)).expect("always backlogged");
            bytes[i] += lens[i] as u64;
        }
        bytes
    }

    #[test]
    fn backlogged_classes_share_by_weight_whatever_their_frame_sizes() {
        let bytes = shares([4, 4, 1], [1 << 20, 4096, 300_000], 20_000);
        let total: u64 = bytes.iter().sum();
        for (i, expected) in [4.0 / 9.0, 4.0 / 9.0, 1.0 / 9.0].into_iter().enumerate() {
            let got = bytes[i] as f64 / total as f64;
            assert!(
                (got - expected).abs() < 0.01,
                "class {i}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn an_idle_class_is_skipped_and_a_lone_class_gets_everything() {
        let mut drr = Drr::new([4, 4, 1]);
        for _ in 0..100 {
            assert_eq!(drr.pick([None, None, Some(1 << 20)]), Some(2));
        }
        assert_eq!(drr.pick([None, None, None]), None);
    }
}
