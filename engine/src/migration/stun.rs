//! Stun During Page Send, for memory and disk together: one controller shares the link
//! between the guest's memory dirtying (slowed by the vCPU throttle) and its disk writes
//! (slowed by pacing their completions, [`crate::replication::throttle`]), so that both
//! together stay below what the link delivers and the migration converges, and each is
//! slowed no more than that.
//!
//! Inputs, once per [`TICK`]: the guest's dirty rate as the VMM measured it over its last
//! pass (with the throttle it applied then, so the unthrottled demand can be recovered),
//! the rate of the guest's mirrored disk writes (and whether the controller's own cap is
//! holding them), and what the link delivered over the last tick, all classes together
//! (the peer's acknowledgements: the WAN's rate, not a local buffer's; the memory stream
//! keeps the link busy during the memory phase, so this is its capacity).
//!
//! The budget is [`HEADROOM`] of the link. If both demands fit, nothing is slowed. If not,
//! the budget is shared max-min fairly: a side that wants less than half gets what it
//! wants, the other gets the rest; two that both want more get half each. A guest that
//! dirties memory faster than memory's share is throttled to [`CONVERGE_SHRINK`] times
//! less than the share (`dirty × (1 − t) ≤ share / 2`), so that each pass has half as much
//! to send as the one before; the disk's share becomes a cap on the guest's write rate.
//!
//! The throttle rises at once (the guest is outrunning the link now) and falls by at most
//! [`STEP_DOWN_PCT`] per [`HOLD`] (QEMU applies a new value at auto-converge's next
//! trigger, about 2 s later, see `docs/vmm.md`; moving faster would oscillate). Below
//! [`OFF_BELOW_PCT`] it is off. QEMU cannot go below 1% once throttling started, so the
//! caller asks "off" as 1%.

use std::time::{Duration, Instant};

use crate::replication::throttle::RATE_MIN_BYTES_PER_S;

/// How often the controller looks: QEMU recomputes its rates every 100 ms and applies a
/// throttle at most once a second, so 500 ms sees every change without busy polling.
pub const TICK: Duration = Duration::from_millis(500);

/// Memory and disk together are held at this share of the link: the memory stream must
/// also make progress on what is already dirty, and the link rate it measured may drop.
pub const HEADROOM: f64 = 0.8;

/// Once the guest dirties memory faster than memory's share of the link, the throttle
/// holds its dirty rate to this fraction of that share (not just under it): each pass then
/// has at most half as much to send as the one before, and the passes converge in a few
/// seconds. A throttle that only matched the link let them shrink slowly: measured at 214
/// ms RTT, 200 Mbit/s, it crept from 12% to 89% over 13 s as the passes shortened, and the
/// workload's heartbeats ran 70% slower throughout (a 40% throttle costs that workload far
/// more than 40%: each step forks and waits on the disk). The guest loses about
/// `throttle × time throttled`; a pass that halves what is left costs less of that than
/// many passes that barely shrink it (`docs/migration.md`, "Stun During Page Send").
pub const CONVERGE_SHRINK: u64 = 2;

/// Largest throttle asked (QEMU's ceiling is 99%): the guest keeps a sliver of CPU so its
/// timers and heartbeats do not stop dead.
pub const MAX_PCT: u8 = 95;

/// A throttle this small is noise against the measurement error of two rates: off.
pub const OFF_BELOW_PCT: u8 = 5;

/// How far the throttle falls per [`HOLD`].
pub const STEP_DOWN_PCT: u8 = 10;

/// How long a throttle stays before it may fall: QEMU's trigger delay (about 2 s).
pub const HOLD: Duration = Duration::from_secs(2);

/// The lowest cap put on the guest's disk writes: the replication pacer's own slowest
/// pace ([`RATE_MIN_BYTES_PER_S`], 8 MiB/s, a 64 KiB write every 8 ms). Below it the cap
/// would stall the guest rather than slow it: during a link cut the link delivers nothing,
/// its budget is 0, and a cap of the budget held each disk write up to the pacer's limit
/// of a second (measured: a guest's heartbeat loop, which writes a block per step, silent
/// for 1.7 s at 0 ms RTT with a 3 s cut, the cap at 1 B/s and the throttle at 95%). What the link cannot take meanwhile goes to the
/// replication's dirty bitmap and is copied later: nothing is lost, and the vCPU throttle
/// still holds memory.
pub const DISK_CAP_MIN_BYTES_PER_S: u64 = RATE_MIN_BYTES_PER_S;

/// While the cap holds the guest's writes, their true demand is unknown (at least the
/// cap): it is taken as this much more, so the disk's share grows again as soon as memory
/// leaves room.
pub const DISK_PROBE: f64 = 1.25;

/// What the controller sees in one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand {
    /// QEMU's dirty rate over its last pass, bytes per second.
    pub dirty_bytes_per_s: u64,
    /// The throttle QEMU applied meanwhile, in percent.
    pub applied_throttle_pct: u8,
    /// The guest's mirrored disk writes, bytes per second.
    pub disk_bytes_per_s: u64,
    /// Whether this controller's cap held the guest's writes during the tick.
    pub disk_capped: bool,
    /// What the link delivered, all classes, bytes per second.
    pub link_bytes_per_s: u64,
}

/// What the controller decided.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StunState {
    /// The throttle asked for, in percent; 0 is off.
    pub throttle_pct: u8,
    /// The throttle the inputs called for this tick, before smoothing.
    pub needed_pct: u8,
    /// The cap on the guest's disk writes, bytes per second; 0 is none.
    pub disk_cap_bytes_per_s: u64,
    /// The guest's dirty rate without throttle (estimated), bytes per second.
    pub dirty_bytes_per_s: u64,
    /// The disk's demand as estimated, bytes per second.
    pub disk_bytes_per_s: u64,
    /// The link rate and the shares of its budget, bytes per second.
    pub link_bytes_per_s: u64,
    pub memory_share_bytes_per_s: u64,
    pub disk_share_bytes_per_s: u64,
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

    /// One look: the throttle to ask for (0: off) and the disk cap (0: none).
    pub fn tick(&mut self, now: Instant, demand: Demand) -> StunState {
        let applied = f64::from(demand.applied_throttle_pct.min(MAX_PCT)) / 100.0;
        // What the guest would dirty unthrottled: the measured rate is what it managed
        // with `applied` of its CPU time taken away.
        let memory = (demand.dirty_bytes_per_s as f64 / (1.0 - applied)) as u64;
        let disk = if demand.disk_capped {
            let cap = self.state.disk_cap_bytes_per_s.max(demand.disk_bytes_per_s);
            (cap as f64 * DISK_PROBE) as u64
        } else {
            demand.disk_bytes_per_s
        };
        let budget = (HEADROOM * demand.link_bytes_per_s as f64) as u64;
        let (memory_share, disk_share) = share(budget, memory, disk);
        let needed = if memory > memory_share {
            needed_pct(memory, memory_share / CONVERGE_SHRINK)
        } else {
            0
        };
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
        let disk_cap = if disk > disk_share.max(DISK_CAP_MIN_BYTES_PER_S) {
            disk_share.max(DISK_CAP_MIN_BYTES_PER_S)
        } else {
            0
        };
        self.state = StunState {
            throttle_pct: next,
            needed_pct: needed,
            disk_cap_bytes_per_s: disk_cap,
            dirty_bytes_per_s: memory,
            disk_bytes_per_s: disk,
            link_bytes_per_s: demand.link_bytes_per_s,
            memory_share_bytes_per_s: memory_share,
            disk_share_bytes_per_s: disk_share,
        };
        self.state
    }

    pub fn state(&self) -> StunState {
        self.state
    }
}

/// The budget shared max-min fairly between two demands: `(memory, disk)`.
fn share(budget: u64, memory: u64, disk: u64) -> (u64, u64) {
    if memory.saturating_add(disk) <= budget {
        return (memory, disk);
    }
    let half = budget / 2;
    if memory <= half {
        (memory, budget - memory)
    } else if disk <= half {
        (budget - disk, disk)
    } else {
        (half, budget - half)
    }
}

/// The throttle that brings `demand` down to `allowed`, in percent.
fn needed_pct(demand: u64, allowed: u64) -> u8 {
    if demand == 0 || demand <= allowed {
        return 0;
    }
    let share = 1.0 - allowed as f64 / demand as f64;
    // Rounded up, less a hair so an exact share is not pushed to the next percent.
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

    fn memory_only(dirty: u64, link: u64) -> Demand {
        Demand {
            dirty_bytes_per_s: dirty,
            link_bytes_per_s: link,
            ..Demand::default()
        }
    }

    #[test]
    fn off_while_the_link_keeps_up() {
        let mut c = StunController::new();
        let t = Instant::now();
        assert_eq!(c.tick(t, memory_only(10 * MB, 25 * MB)).throttle_pct, 0);
        assert_eq!(c.tick(t, memory_only(0, 0)).throttle_pct, 0);
        // Just within the headroom: the passes still shrink by themselves.
        let s = c.tick(t, memory_only(20 * MB, 25 * MB));
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (0, 0));
    }

    #[test]
    fn a_guest_just_above_the_link_is_throttled_to_half_of_it_not_just_under_it() {
        // 20.5 MB/s against a budget of 20: the passes would barely shrink. Holding the
        // guest to 10 MB/s halves each pass.
        let s = StunController::new().tick(Instant::now(), memory_only(20 * MB + MB / 2, 25 * MB));
        assert_eq!((s.needed_pct, s.throttle_pct), (52, 52));
        let held = 20.5 * (1.0 - f64::from(s.throttle_pct) / 100.0);
        assert!(
            held <= HEADROOM * 25.0 / CONVERGE_SHRINK as f64 + 1e-9,
            "{held}"
        );
    }

    #[test]
    fn rises_at_once_to_what_halves_each_pass() {
        let mut c = StunController::new();
        let t = Instant::now();
        // 100 MB/s dirty, 25 MB/s link: a budget of 20 MB/s, the guest held to half of
        // it, 10 MB/s: take 90%.
        let pct = c.tick(t, memory_only(100 * MB, 25 * MB)).throttle_pct;
        assert_eq!(pct, 90);
        let throttled = 100.0 * (1.0 - f64::from(pct) / 100.0);
        assert!(throttled <= HEADROOM * 25.0 / CONVERGE_SHRINK as f64 + 1e-9);
        // A link that delivers nothing asks for the most, never more.
        assert_eq!(c.tick(t, memory_only(100 * MB, 0)).throttle_pct, MAX_PCT);
    }

    #[test]
    fn the_measured_dirty_rate_is_unthrottled_before_it_is_compared() {
        let mut c = StunController::new();
        let t = Instant::now();
        assert_eq!(c.tick(t, memory_only(100 * MB, 25 * MB)).throttle_pct, 90);
        // QEMU applies 90%: the guest now dirties 10 MB/s, which fits. The demand is
        // still 100 MB/s, so the throttle must stay, not fall.
        let s = c.tick(
            t + HOLD * 2,
            Demand {
                dirty_bytes_per_s: 10 * MB,
                applied_throttle_pct: 90,
                link_bytes_per_s: 25 * MB,
                ..Demand::default()
            },
        );
        assert_eq!((s.needed_pct, s.throttle_pct), (90, 90));
        assert_eq!(s.dirty_bytes_per_s, 100 * MB);
    }

    #[test]
    fn falls_in_steps_no_faster_than_the_hold() {
        let mut c = StunController::new();
        let t0 = Instant::now();
        assert_eq!(c.tick(t0, memory_only(100 * MB, 25 * MB)).throttle_pct, 90);
        // The guest calms down: nothing needed, but the throttle holds...
        let calm = memory_only(MB, 25 * MB);
        assert_eq!(c.tick(t0 + Duration::from_secs(1), calm).throttle_pct, 90);
        // ...then falls one step per hold.
        let mut t = t0 + HOLD;
        let mut seen = vec![];
        for _ in 0..12 {
            seen.push(c.tick(t, calm).throttle_pct);
            t += HOLD;
        }
        assert_eq!(seen, vec![80, 70, 60, 50, 40, 30, 20, 10, 0, 0, 0, 0]);
    }

    #[test]
    fn a_link_that_slows_raises_it_again_at_once() {
        let mut c = StunController::new();
        let t = Instant::now();
        assert_eq!(c.tick(t, memory_only(40 * MB, 25 * MB)).throttle_pct, 75);
        // The link drops to a fifth: the same guest needs more, now (95%, the most).
        let s = c.tick(t + Duration::from_millis(500), memory_only(40 * MB, 5 * MB));
        assert_eq!((s.throttle_pct, s.needed_pct), (MAX_PCT, MAX_PCT));
    }

    #[test]
    fn memory_and_disk_share_the_link_max_min_fairly() {
        let t = Instant::now();
        // Budget 20 MB/s. A disk that wants little gets it all; memory gets the rest, and
        // is throttled to half of that.
        let s = StunController::new().tick(
            t,
            Demand {
                dirty_bytes_per_s: 40 * MB,
                disk_bytes_per_s: 4 * MB,
                link_bytes_per_s: 25 * MB,
                ..Demand::default()
            },
        );
        assert_eq!(
            (s.memory_share_bytes_per_s, s.disk_share_bytes_per_s),
            (16 * MB, 4 * MB)
        );
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (80, 0));
        // Memory that wants little leaves the rest to the disk, which is capped to it.
        let s = StunController::new().tick(
            t,
            Demand {
                dirty_bytes_per_s: 2 * MB,
                disk_bytes_per_s: 40 * MB,
                link_bytes_per_s: 25 * MB,
                ..Demand::default()
            },
        );
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (0, 18 * MB));
        // Both want more than half: half each.
        let s = StunController::new().tick(
            t,
            Demand {
                dirty_bytes_per_s: 40 * MB,
                disk_bytes_per_s: 40 * MB,
                link_bytes_per_s: 25 * MB,
                ..Demand::default()
            },
        );
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (88, 10 * MB));
        // Together within the budget: neither is slowed.
        let s = StunController::new().tick(
            t,
            Demand {
                dirty_bytes_per_s: 10 * MB,
                disk_bytes_per_s: 9 * MB,
                link_bytes_per_s: 25 * MB,
                ..Demand::default()
            },
        );
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (0, 0));
    }

    #[test]
    fn a_link_that_delivers_nothing_slows_the_disk_but_never_stalls_it() {
        let t = Instant::now();
        // A cut: nothing delivered, the guest wants 2 MB/s of memory and 1 MB/s of disk.
        let cut = Demand {
            dirty_bytes_per_s: 2 * MB,
            disk_bytes_per_s: MB,
            link_bytes_per_s: 0,
            ..Demand::default()
        };
        let s = StunController::new().tick(t, cut);
        // Memory is held by the throttle at its ceiling; a disk below the floor is not
        // capped at all.
        assert_eq!((s.throttle_pct, s.disk_cap_bytes_per_s), (MAX_PCT, 0));
        // A disk that wants more than the floor is held at the floor, not at the budget
        // (0): its writes beyond what the link takes go to the dirty bitmap.
        let s = StunController::new().tick(
            t,
            Demand {
                disk_bytes_per_s: 40 * MB,
                ..cut
            },
        );
        assert_eq!(s.disk_cap_bytes_per_s, DISK_CAP_MIN_BYTES_PER_S);
        // A slow link whose half is below the floor: the floor too.
        let s = StunController::new().tick(
            t,
            Demand {
                dirty_bytes_per_s: 40 * MB,
                disk_bytes_per_s: 40 * MB,
                link_bytes_per_s: 10 * MB,
                ..Demand::default()
            },
        );
        assert_eq!(s.disk_cap_bytes_per_s, DISK_CAP_MIN_BYTES_PER_S);
    }

    #[test]
    fn a_capped_disk_gets_its_share_back_when_memory_leaves_room() {
        let mut c = StunController::new();
        let t = Instant::now();
        let both = Demand {
            dirty_bytes_per_s: 40 * MB,
            disk_bytes_per_s: 40 * MB,
            link_bytes_per_s: 25 * MB,
            ..Demand::default()
        };
        assert_eq!(c.tick(t, both).disk_cap_bytes_per_s, 10 * MB);
        // The guest stops dirtying memory; its writes are held at the cap (10 MB/s
        // measured): the cap must grow, not settle where it was.
        let mut cap = 10 * MB;
        for i in 1..10 {
            let s = c.tick(
                t + TICK * i,
                Demand {
                    dirty_bytes_per_s: 0,
                    disk_bytes_per_s: cap,
                    disk_capped: true,
                    link_bytes_per_s: 25 * MB,
                    ..Demand::default()
                },
            );
            assert!(s.disk_cap_bytes_per_s == 0 || s.disk_cap_bytes_per_s >= cap);
            cap = s.disk_cap_bytes_per_s;
            if cap == 0 {
                break;
            }
        }
        // It reaches the whole budget (then the cap is whatever the budget allows).
        assert!(cap == 0 || cap >= 20 * MB - 1, "cap {cap}");
    }
}
