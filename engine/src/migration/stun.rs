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
//! [`STEP_DOWN_PCT`] per hold: [`HOLD`] when QEMU's auto-converge applies it (a new value
//! lands at its next trigger, about 2 s later, see `docs/vmm.md`; moving faster would
//! oscillate), [`HOLD_CGROUP`] when strait's own CFS quota does ([`Actuator`]). Below
//! [`OFF_BELOW_PCT`] it is off. QEMU cannot go below 1% once throttling started, so the
//! caller asks "off" as 1% of QEMU; the quota takes 0.

use std::collections::VecDeque;
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

/// The same with strait's quota, which acts within a CFS period: one period of QEMU's
/// dirty-rate measure (at least 1 s), so that a step down is seen in the rate before the
/// next one is taken.
pub const HOLD_CGROUP: Duration = Duration::from_secs(1);

/// A new dirty-rate measure taken under a throttle at least this many points higher than
/// the one before is a test of how the guest responds (smaller steps are within the
/// measures' noise).
pub const SATURATION_STEP_PCT: u8 = 10;

/// The guest's dirty rate counts each page once per pass, however often it was written:
/// a guest that rewrites a small working set many times a pass dirties the same pages
/// throttled or not, until the throttle is deep enough that it no longer gets round its
/// set in one pass. The linear model (`dirty × (1 − throttle)`) then reads each raise as a
/// larger demand, and climbs one QEMU measure (1–1.5 s) at a time: measured at 214 ms,
/// 59% left the rate at 21–23 MB/s, 84% at 9 MB/s, and it took 89% and 3.5 s. A measure
/// after a raise that kept more than this many times the rate the linear model predicted
/// marks the guest as saturated, and the throttle goes to [`MAX_PCT`] for the passes
/// that are left (with the quota only: it acts within a quarter second, so the deep
/// throttle covers the next pass and not the one after).
pub const SATURATION_FACTOR: f64 = 2.0;

/// What slows the guest's vCPUs when the controller asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Actuator {
    /// The VMM's own throttle (QEMU's auto-converge): no privilege needed, but it applies
    /// a new value only at its next trigger, 1–8 s later in the sweep.
    #[default]
    Vmm,
    /// A CFS quota on the vCPU threads ([`strait_vmm::VcpuQuota`]): acts within 0.25 s;
    /// needs a v1 `cpu` cgroup hierarchy, the right to write to it, and the VMM's vCPU
    /// thread ids (strait beside the VMM, on its host).
    Cgroup,
}

impl Actuator {
    /// The names the API and the command line take.
    pub const NAMES: [&'static str; 2] = ["vmm", "cgroup"];

    pub fn name(self) -> &'static str {
        match self {
            Actuator::Vmm => "vmm",
            Actuator::Cgroup => "cgroup",
        }
    }

    pub fn parse(name: &str) -> Option<Actuator> {
        match name {
            "vmm" => Some(Actuator::Vmm),
            "cgroup" => Some(Actuator::Cgroup),
            _ => None,
        }
    }

    /// The least throttle this actuator can be asked for once a migration started: QEMU
    /// cannot go below 1% once it throttled, so its "off" is 1%; the quota's is 0.
    pub fn off_pct(self) -> u8 {
        match self {
            Actuator::Vmm => 1,
            Actuator::Cgroup => 0,
        }
    }

    /// How long a throttle stays before it may fall with this actuator.
    pub fn hold(self) -> Duration {
        match self {
            Actuator::Vmm => HOLD,
            Actuator::Cgroup => HOLD_CGROUP,
        }
    }
}

/// Throttle changes an [`AppliedLog`] keeps: one per [`TICK`] at most, so 256 cover a pass
/// of two minutes; a longer pass is averaged over its last two minutes.
const APPLIED_CHANGES_MAX: usize = 256;

/// The throttle that was in force over the period of QEMU's last dirty-rate measure, for
/// an actuator that changes it in the middle of such a period (the quota). QEMU updates
/// its dirty rate at a bitmap sync at least a second after the last update; the moments
/// the reported rate changes mark those updates (to within a [`TICK`]), and the throttle
/// averaged over time between the last two is what the rate was measured under. Without
/// it, a throttle raised just before a measure that mostly preceded it would make the
/// controller read the unthrottled demand as many times the truth, and over-throttle.
#[derive(Debug, Default)]
pub struct AppliedLog {
    /// (since, percent), oldest first; the last entry is in force now.
    changes: VecDeque<(Instant, u8)>,
    /// The dirty rate last seen, and when it changed.
    rate: Option<(u64, Instant)>,
    /// The period of the last measure.
    window: Option<(Instant, Instant)>,
}

impl AppliedLog {
    /// The throttle changes to `pct` at `at`.
    pub fn set(&mut self, at: Instant, pct: u8) {
        if self.changes.back().is_some_and(|(_, p)| *p == pct) {
            return;
        }
        if self.changes.len() >= APPLIED_CHANGES_MAX {
            self.changes.pop_front();
        }
        self.changes.push_back((at, pct));
    }

    /// The throttle in force now.
    pub fn current(&self) -> u8 {
        self.changes.back().map_or(0, |(_, p)| *p)
    }

    /// Takes in the dirty rate the VMM reports at `at`.
    pub fn observe_rate(&mut self, at: Instant, dirty_bytes_per_s: u64) {
        match self.rate {
            Some((rate, _)) if rate == dirty_bytes_per_s => {}
            Some((_, since)) => {
                self.window = Some((since, at));
                self.rate = Some((dirty_bytes_per_s, at));
                // Changes before the window's start matter only as the value at its start.
                while self.changes.len() >= 2
                    && self.changes.get(1).is_some_and(|(t, _)| *t <= since)
                {
                    self.changes.pop_front();
                }
            }
            None => self.rate = Some((dirty_bytes_per_s, at)),
        }
    }

    /// The throttle averaged over the last measure's period, in percent; the one in force
    /// until a period is known.
    pub fn applied(&self) -> u8 {
        let Some((start, end)) = self.window else {
            return self.current();
        };
        // With its oldest changes dropped, the log covers only the end of the period.
        let start = self.changes.front().map_or(start, |(t, _)| start.max(*t));
        let span = end.saturating_duration_since(start).as_secs_f64();
        if span <= 0.0 {
            return self.current();
        }
        let mut weighted = 0.0;
        for (i, (since, pct)) in self.changes.iter().enumerate() {
            let until = self.changes.get(i + 1).map_or(end, |(t, _)| *t).min(end);
            let from = (*since).max(start);
            if until > from {
                weighted += f64::from(*pct) * until.duration_since(from).as_secs_f64();
            }
        }
        (weighted / span).round().clamp(0.0, 100.0) as u8
    }
}

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
    /// The guest's dirty rate did not respond to a raise ([`SATURATION_FACTOR`]).
    pub saturated: bool,
}

/// The controller. Pure: the caller feeds it rates and applies its answer.
#[derive(Debug)]
pub struct StunController {
    state: StunState,
    changed_at: Option<Instant>,
    hold: Duration,
    /// Whether a saturated guest gets [`MAX_PCT`] ([`SATURATION_FACTOR`]).
    saturation_jump: bool,
    /// The last dirty-rate measure and the throttle it was taken under.
    last_measure: Option<(u8, u64)>,
    saturated: bool,
}

impl Default for StunController {
    fn default() -> StunController {
        StunController::new()
    }
}

impl StunController {
    /// A controller for QEMU's own throttle.
    pub fn new() -> StunController {
        StunController::for_actuator(Actuator::Vmm)
    }

    /// A controller paced for `actuator`: its hold, and with the quota the jump to
    /// [`MAX_PCT`] for a saturated guest.
    pub fn for_actuator(actuator: Actuator) -> StunController {
        StunController {
            state: StunState::default(),
            changed_at: None,
            hold: actuator.hold(),
            saturation_jump: actuator == Actuator::Cgroup,
            last_measure: None,
            saturated: false,
        }
    }

    /// Whether the guest was found saturated (see [`SATURATION_FACTOR`]).
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// Takes in a dirty-rate measure; marks the guest saturated if a raise of the
    /// throttle did not bring the rate down as the linear model says.
    fn observe(&mut self, applied_pct: u8, dirty: u64) {
        if self.last_measure.is_some_and(|(_, d)| d == dirty) {
            return;
        }
        if let Some((before_pct, before)) = self.last_measure {
            let raised = applied_pct >= before_pct.saturating_add(SATURATION_STEP_PCT);
            let kept = f64::from(100 - applied_pct.min(MAX_PCT))
                / f64::from(100 - before_pct.min(MAX_PCT));
            let predicted = before as f64 * kept;
            if raised && dirty as f64 > SATURATION_FACTOR * predicted {
                self.saturated = true;
            }
        }
        self.last_measure = Some((applied_pct, dirty));
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
        self.observe(demand.applied_throttle_pct, demand.dirty_bytes_per_s);
        let needed = if memory > memory_share {
            needed_pct(memory, memory_share / CONVERGE_SHRINK)
        } else {
            0
        };
        if needed == 0 {
            // The guest fits the link again: whatever held before is history.
            self.saturated = false;
        }
        let needed = if self.saturated && self.saturation_jump && needed > 0 {
            MAX_PCT
        } else {
            needed
        };
        let current = self.state.throttle_pct;
        let held = self
            .changed_at
            .is_none_or(|at| now.duration_since(at) >= self.hold);
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
            saturated: self.saturated,
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
    fn with_the_quota_it_falls_once_a_second() {
        let mut c = StunController::for_actuator(Actuator::Cgroup);
        let t0 = Instant::now();
        assert_eq!(c.tick(t0, memory_only(100 * MB, 25 * MB)).throttle_pct, 90);
        let calm = memory_only(MB, 25 * MB);
        assert_eq!(c.tick(t0 + TICK, calm).throttle_pct, 90);
        assert_eq!(c.tick(t0 + HOLD_CGROUP, calm).throttle_pct, 80);
        assert_eq!(c.tick(t0 + HOLD_CGROUP + TICK, calm).throttle_pct, 80);
        assert_eq!(c.tick(t0 + HOLD_CGROUP * 2, calm).throttle_pct, 70);
    }

    /// The measures of a run at 214 ms with the quota: 21 MB/s unthrottled, 22 MB/s under
    /// 59%. The linear model predicted 8.6.
    #[test]
    fn a_guest_whose_rate_does_not_respond_gets_the_most_with_the_quota() {
        let at = |pct: u8, dirty: u64| Demand {
            dirty_bytes_per_s: dirty,
            applied_throttle_pct: pct,
            link_bytes_per_s: 24 * MB,
            ..Demand::default()
        };
        let t = Instant::now();
        let mut quota = StunController::for_actuator(Actuator::Cgroup);
        let mut vmm = StunController::new();
        for c in [&mut quota, &mut vmm] {
            assert_eq!(c.tick(t, at(0, 21 * MB)).throttle_pct, 55);
            // The same measure read again under the new throttle is not a response.
            assert_eq!(c.tick(t + TICK, at(55, 21 * MB)).throttle_pct, 80);
            assert!(!c.saturated());
        }
        // A new measure under 59% that barely moved.
        assert_eq!(
            quota.tick(t + TICK * 3, at(59, 22 * MB)).throttle_pct,
            MAX_PCT
        );
        assert!(quota.saturated());
        // QEMU's throttle follows the model (the jump would land seconds late).
        assert_eq!(vmm.tick(t + TICK * 3, at(59, 22 * MB)).throttle_pct, 83);
        assert!(vmm.saturated());
        // A guest that calms down clears it.
        let calm = quota.tick(t + TICK * 4 + HOLD_CGROUP, at(MAX_PCT, 0));
        assert!(!quota.saturated());
        assert_eq!(calm.needed_pct, 0);
    }

    #[test]
    fn a_guest_that_responds_as_modelled_is_not_saturated() {
        let mut c = StunController::for_actuator(Actuator::Cgroup);
        let t = Instant::now();
        let at = |pct: u8, dirty: u64| Demand {
            dirty_bytes_per_s: dirty,
            applied_throttle_pct: pct,
            link_bytes_per_s: 25 * MB,
            ..Demand::default()
        };
        assert_eq!(c.tick(t, at(0, 40 * MB)).throttle_pct, 75);
        // 75% taken, 10 MB/s left: exactly the model.
        let s = c.tick(t + TICK * 3, at(75, 10 * MB));
        assert!(!c.saturated());
        assert_eq!(s.throttle_pct, 75);
        // A small step (under SATURATION_STEP_PCT) proves nothing either way.
        let mut c = StunController::for_actuator(Actuator::Cgroup);
        c.tick(t, at(0, 20 * MB));
        c.tick(t + TICK * 3, at(5, 20 * MB + 1));
        assert!(!c.saturated());
    }

    #[test]
    fn actuator_names_round_trip() {
        for name in Actuator::NAMES {
            assert_eq!(Actuator::parse(name).map(Actuator::name), Some(name));
        }
        assert_eq!(Actuator::parse("cgroups"), None);
        assert_eq!(Actuator::default(), Actuator::Vmm);
    }

    #[test]
    fn applied_is_the_throttle_averaged_over_the_last_measure() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut log = AppliedLog::default();
        assert_eq!(log.applied(), 0);
        log.set(at(0), 0);
        log.observe_rate(at(0), 100 * MB);
        // Raised to 90% three quarters into a measure: the measure was under 22.5%.
        log.set(at(750), 90);
        assert_eq!(
            log.applied(),
            90,
            "no measured period yet: the one in force"
        );
        log.observe_rate(at(1000), 80 * MB);
        assert_eq!(log.applied(), 23);
        assert_eq!(log.current(), 90);
        // The same rate read again is the same measure.
        log.observe_rate(at(1500), 80 * MB);
        assert_eq!(log.applied(), 23);
        // The next measure ran wholly at 90%.
        log.observe_rate(at(2000), 10 * MB);
        assert_eq!(log.applied(), 90);
        // 90% for 0.5 s, then 50% for 1 s, then 0 for 0.5 s.
        log.set(at(2500), 50);
        log.set(at(3500), 0);
        log.observe_rate(at(4000), 30 * MB);
        assert_eq!(log.applied(), 48);
        // Setting the same value twice is one change.
        let changes = log.changes.len();
        log.set(at(4100), 0);
        assert_eq!(log.changes.len(), changes);
    }

    #[test]
    fn the_applied_log_stays_bounded() {
        let t0 = Instant::now();
        let mut log = AppliedLog::default();
        log.observe_rate(t0, 1);
        for i in 0..(APPLIED_CHANGES_MAX as u64 * 4) {
            log.set(t0 + TICK * (i as u32), (i % 2) as u8 * 50);
        }
        assert_eq!(log.changes.len(), APPLIED_CHANGES_MAX);
        log.observe_rate(t0 + TICK * (APPLIED_CHANGES_MAX as u32 * 4), 2);
        // Half the time at 50%, over the part the log still covers.
        assert_eq!(log.applied(), 25);
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
