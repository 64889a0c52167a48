//! Stun During Page Send: the vCPU throttle that keeps the guest's memory dirty rate below
//! the rate the link actually drains the memory stream, so the migration converges instead
//! of chasing the guest forever, and throttles no more than that.
//!
//! Inputs, once per [`TICK`]: the guest's dirty rate as the VMM measured it over its last
//! pass, and the rate the link delivered the `memory` class over the last tick (the
//! peer's acknowledgements, so it is the WAN's rate, shared with the disk's classes, not a
//! local buffer's). The throttle asked is the share of vCPU time to take away so that
//! `dirty × (1 − throttle) ≤ HEADROOM × drain`.
//!
//! Rises at once (the guest is outrunning the link now), falls by at most [`STEP_DOWN_PCT`]
//! per [`HOLD`] (QEMU applies a new value at auto-converge's next trigger, about 2 s later,
//! see `docs/vmm.md`; moving faster would oscillate). Below [`OFF_BELOW_PCT`] it is off. QEMU
//! cannot go below 1% once throttling started, so "off" is asked as 1%.

use std::time::{Duration, Instant};

/// How often the controller looks: QEMU recomputes its rates every 100 ms and applies a
/// throttle at most once a second, so 500 ms sees every change without busy polling.
pub const TICK: Duration = Duration::from_millis(500);

/// The dirty rate is held at this share of the drain rate: the memory stream must also
/// make progress on what is already dirty, and the link rate it measured may drop.
pub const HEADROOM: f64 = 0.8;

/// Largest throttle asked (QEMU's ceiling is 99%): the guest keeps a sliver of CPU so its
/// timers and heartbeats do not stop dead.
pub const MAX_PCT: u8 = 95;

/// A throttle this small is noise against the measurement error of two rates: off.
pub const OFF_BELOW_PCT: u8 = 5;

/// How far the throttle falls per [`HOLD`].
pub const STEP_DOWN_PCT: u8 = 10;

/// How long a throttle stays before it may fall: QEMU's trigger delay (about 2 s).
pub const HOLD: Duration = Duration::from_secs(2);

/// What the controller decided.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StunState {
    /// The throttle asked for, in percent; 0 is off.
    pub throttle_pct: u8,
    /// The throttle the inputs called for this tick, before smoothing.
    pub needed_pct: u8,
    pub dirty_bytes_per_s: u64,
    pub drain_bytes_per_s: u64,
}

/// The controller. Pure: the caller feeds it rates and applies its answer.
#[derive(Debug, Default)]
pub struct StunController {
    state: StunState,
    changed_at: Option<Instant>,
}

impl StunController {
    pub fn new() -> StunController {
        StunController::default()
    }

    /// One look: returns the throttle to ask for, in percent (0: off).
    pub fn tick(&mut self, now: Instant, dirty_bytes_per_s: u64, drain_bytes_per_s: u64) -> u8 {
        let needed = needed_pct(dirty_bytes_per_s, drain_bytes_per_s);
        let current = self.state.throttle_pct;
        let held = self
            .changed_at
            .is_none_or(|at| now.duration_since(at) >= HOLD);
        let next = if needed > current {
            needed
        } else if needed < current && held {
            let lower = current.saturating_sub(STEP_DOWN_PCT).max(needed);
            if lower < OFF_BELOW_PCT {
                0
            } else {
                lower
            }
        } else {
            current
        };
        if next != current {
            self.changed_at = Some(now);
        }
        self.state = StunState {
            throttle_pct: next,
            needed_pct: needed,
            dirty_bytes_per_s,
            drain_bytes_per_s,
        };
        next
    }

    pub fn state(&self) -> StunState {
        self.state
    }
}

/// The throttle that brings `dirty` to [`HEADROOM`] of `drain`, in percent.
fn needed_pct(dirty: u64, drain: u64) -> u8 {
    if dirty == 0 {
        return 0;
    }
    let allowed = HEADROOM * drain as f64;
    if (dirty as f64) <= allowed {
        return 0;
    }
    let share = 1.0 - allowed / dirty as f64;
    let pct = (share * 100.0 - 1e-6).ceil();
    let pct = if pct.is_finite() { pct } else { 100.0 };
    let pct = pct.clamp(0.0, f64::from(MAX_PCT)) as u8;
    if pct < OFF_BELOW_PCT {
        0
    } else {
        pct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn off_while_the_link_keeps_up() {
        let mut c = StunController::new();
        let t = Instant::now();
        assert_eq!(c.tick(t, 10 * MB, 25 * MB), 0);
        assert_eq!(c.tick(t, 0, 0), 0);
        // Just above the headroom: too small to act on.
        assert_eq!(c.tick(t, 20 * MB + MB / 2, 25 * MB), 0);
    }

    #[test]
    fn rises_at_once_to_what_brings_the_dirty_rate_under_the_link() {
        let mut c = StunController::new();
        let t = Instant::now();
        // 100 MB/s dirty, 25 MB/s drained: keep 20 MB/s, take 80%.
        let pct = c.tick(t, 100 * MB, 25 * MB);
        assert_eq!(pct, 80);
        let throttled = 100.0 * (1.0 - f64::from(pct) / 100.0);
        assert!(throttled <= HEADROOM * 25.0 + 1e-9);
        // A drain of nothing asks for the most, never more.
        assert_eq!(c.tick(t, 100 * MB, 0), MAX_PCT);
    }

    #[test]
    fn falls_in_steps_no_faster_than_the_hold() {
        let mut c = StunController::new();
        let t0 = Instant::now();
        assert_eq!(c.tick(t0, 100 * MB, 25 * MB), 80);
        // The guest calms down: nothing needed, but the throttle holds...
        assert_eq!(c.tick(t0 + Duration::from_secs(1), MB, 25 * MB), 80);
        // ...then falls one step per hold.
        let mut t = t0 + HOLD;
        let mut seen = vec![];
        for _ in 0..12 {
            seen.push(c.tick(t, MB, 25 * MB));
            t += HOLD;
        }
        assert_eq!(seen, vec![70, 60, 50, 40, 30, 20, 10, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_link_that_slows_raises_it_again_at_once() {
        let mut c = StunController::new();
        let t = Instant::now();
        assert_eq!(c.tick(t, 40 * MB, 25 * MB), 50);
        // The link drops to a fifth: the same guest needs more, now.
        assert_eq!(c.tick(t + Duration::from_millis(500), 40 * MB, 5 * MB), 90);
        assert_eq!(c.state().needed_pct, 90);
    }
}
