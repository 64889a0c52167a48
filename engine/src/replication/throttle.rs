//! Guest IO back-pressure: when the link or the destination drains mirrored writes slower
//! than the guest makes them, the guest's write completions are delayed just enough that
//! its write rate follows the drain rate (XvMotion's answer to a slow link: slow the
//! guest a little instead of failing the migration, or falling behind without bound).
//!
//! Two halves:
//! - [`Pacer`], on the data path: each queue asks it, after a write is durable locally and
//!   captured, how long to hold the completion. It is a virtual clock advanced by every
//!   paced write's cost at the pacing rate, so all queues together get the rate, and a
//!   write is only delayed when writes arrive faster than the rate (a guest below it
//!   waits for nothing). Off, it costs one relaxed load per write.
//! - [`Controller`], on the replication thread, every [`CONTROL_INTERVAL`]: measures how
//!   fast the destination confirms mirrored bytes, derives the backlog bound from the
//!   downtime budget (what can drain in [`DOWNTIME_BUDGET`] at that rate), and sets the
//!   pacing rate from how full the backlog is. Below half the bound nothing is paced; above
//!   it the rate is the drain rate scaled by how far the backlog is from half the bound,
//!   so the backlog settles at half the bound and the guest's rate at the drain rate. The
//!   delay a write gets grows with how much faster than the drain rate the guest tries to
//!   write: the imposed delay is proportional to the excess, not a cliff.
//!
//! `docs/replication.md` explains the choice of numbers; the unit tests below run the
//! controller against a modelled link and guest and check that the guest's rate converges
//! and the backlog stays within the bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The switchover's downtime target: buffered mirror bytes must drain within it at the
/// measured rate, so a switchover started at any time stays about this short.
pub const DOWNTIME_BUDGET: Duration = Duration::from_secs(1);

/// The smallest backlog bound: 4 MiB drains in a third of a second even at 100 Mbit/s,
/// the slowest link worth migrating over, so a smaller backlog is never worth a delay.
pub const BUDGET_MIN_BYTES: u64 = 4 << 20;

/// How often the controller looks: 1/50 of the downtime budget, fine enough that the
/// rate changes in small steps, coarse enough that each step sees some confirmations
/// (the destination confirms every 10 ms).
pub const CONTROL_INTERVAL: Duration = Duration::from_millis(20);

/// Longest one completion is held: the downtime budget, since a write held longer would
/// be better sent by the bulk copy later. This is not the guest's stall: the pacer spaces
/// completions at the rate, so with many writes in flight each is held long but one
/// completes every write's cost (6.5 ms for 64 KiB at 10 MB/s, 8 ms at the slowest pace). A guest so far above the
/// rate that the hold would pass this gets through faster than the rate; the controller
/// then lowers the rate, and past the backlog bound its writes go to the dirty bitmap
/// (nothing is lost, the destination only falls further behind).
pub const DELAY_MAX: Duration = DOWNTIME_BUDGET;

/// Writes arriving below the rate may run ahead of it by this much without any delay, so
/// a guest writing under the rate never waits: 2 ms is 500 4 KiB writes at 1 GB/s.
pub const BURST: Duration = Duration::from_millis(2);

/// The slowest pace: 8 MiB/s, below the slowest link worth migrating over (100 Mbit/s,
/// 12.5 MB/s). Before the first confirmation, or with a destination that stopped applying,
/// the guest still completes a 64 KiB write every 8 ms (no stall), and what the link cannot
/// take past the backlog bound goes to the dirty bitmap.
pub const RATE_MIN_BYTES_PER_S: u64 = 8 << 20;

/// Rates are measured over this window: long enough to smooth the destination's
/// confirmation bursts (it confirms every 10 ms, in whole writes), short enough to follow a
/// link that changes rate.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// A rate over a window shorter than this is not trusted (taken as unknown).
const RATE_WINDOW_MIN: Duration = Duration::from_millis(100);

/// How long the link's peak delivery rate (which sizes the backlog bound) is remembered
/// while nothing is paced: a minute, so a quiet spell after the bulk copy does not shrink
/// the bound a later burst needs.
const PEAK_WINDOW: Duration = Duration::from_secs(60);

/// The same while pacing: the link is full then, so what it delivered over the last few
/// seconds is what it can do now, and a link that became slower is not judged by its old
/// peak for long. Not the rate of this instant: when pacing starts, the link was idle a
/// moment ago and its rate is still rising.
const PACING_PEAK_WINDOW: Duration = Duration::from_secs(5);

/// Pacing stops only after the backlog stayed under a quarter of its bound this long: a
/// guest that still writes faster than the link would otherwise burst as soon as the
/// pacing stops, and pacing would flap on and off. A guest under the rate is not held
/// anyway (see [`BURST`]), so staying on a second longer costs it nothing.
const PACING_RELEASE: Duration = Duration::from_secs(1);

/// The pacing side, shared by every queue's capture point and the controller.
#[derive(Debug)]
pub struct Pacer {
    epoch: Instant,
    /// Pacing rate in bytes per second; zero when not pacing.
    rate: AtomicU64,
    /// The virtual clock: nanoseconds since `epoch` at which the paced writes so far would
    /// have finished at the rate.
    next_free_ns: AtomicU64,
    delayed_writes: AtomicU64,
    delay_ns_total: AtomicU64,
    delay_ns_max: AtomicU64,
}

/// What the pacer has imposed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacerStats {
    /// Pacing rate now (bytes per second), zero when off.
    pub rate_bytes_per_s: u64,
    /// Completions held, and for how long in total.
    pub delayed_writes: u64,
    pub delay_ns_total: u64,
    /// The longest hold.
    pub delay_ns_max: u64,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

impl Pacer {
    /// A pacer that delays nothing until a rate is set.
    pub fn new() -> Pacer {
        Pacer {
            epoch: Instant::now(),
            rate: AtomicU64::new(0),
            next_free_ns: AtomicU64::new(0),
            delayed_writes: AtomicU64::new(0),
            delay_ns_total: AtomicU64::new(0),
            delay_ns_max: AtomicU64::new(0),
        }
    }

    /// Sets the pacing rate in bytes per second; zero stops pacing.
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// How long to hold the completion of a write of `bytes` that completes now.
    pub fn delay(&self, bytes: u64) -> Duration {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        let now = self.now_ns();
        let delay = self.delay_at(now, rate, bytes);
        if delay > 0 {
            self.delayed_writes.fetch_add(1, Ordering::Relaxed);
            self.delay_ns_total.fetch_add(delay, Ordering::Relaxed);
            self.delay_ns_max.fetch_max(delay, Ordering::Relaxed);
        }
        Duration::from_nanos(delay)
    }

    /// The delay, in nanoseconds, of a write of `bytes` at `now_ns` under `rate`; advances
    /// the virtual clock.
    fn delay_at(&self, now_ns: u64, rate: u64, bytes: u64) -> u64 {
        let cost =
            u64::try_from(u128::from(bytes) * 1_000_000_000 / u128::from(rate)).unwrap_or(u64::MAX);
        let floor = now_ns.saturating_sub(BURST.as_nanos() as u64);
        let ceiling = now_ns.saturating_add(DELAY_MAX.as_nanos() as u64);
        let mut finish = 0;
        // The closure always returns Some, so this cannot fail; `finish` is what it stored.
        let _ = self
            .next_free_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                finish = next.max(floor).saturating_add(cost).min(ceiling);
                Some(finish)
            });
        finish.saturating_sub(now_ns)
    }

    /// What was imposed so far, and the rate now.
    pub fn stats(&self) -> PacerStats {
        PacerStats {
            rate_bytes_per_s: self.rate.load(Ordering::Relaxed),
            delayed_writes: self.delayed_writes.load(Ordering::Relaxed),
            delay_ns_total: self.delay_ns_total.load(Ordering::Relaxed),
            delay_ns_max: self.delay_ns_max.load(Ordering::Relaxed),
        }
    }

    /// Nanoseconds since a point one burst before the pacer was made, so the burst
    /// allowance holds from the first write.
    fn now_ns(&self) -> u64 {
        let since = self.epoch.elapsed() + BURST;
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What the controller decided last.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ControlState {
    /// Mirrored bytes the destination confirms per second.
    pub drain_bytes_per_s: u64,
    /// What the link delivers per second, all classes together.
    pub link_bytes_per_s: u64,
    /// The backlog bound: what the link delivers in the downtime budget, at its peak of
    /// the last minute (the last few seconds while pacing).
    pub budget_bytes: u64,
    /// The backlog the decision saw.
    pub backlog_bytes: u64,
    /// The pacing rate set; zero when not pacing.
    pub rate_bytes_per_s: u64,
}

/// A rate over a sliding window of samples of a cumulative counter.
#[derive(Debug, Default)]
struct WindowRate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl WindowRate {
    /// Adds a sample; returns the rate over the window, zero while the window is short.
    fn update(&mut self, now: Instant, total: u64) -> f64 {
        self.samples.push_back((now, total));
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.saturating_duration_since(s.0) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(then, before)) = self.samples.front() else {
            return 0.0;
        };
        let span = now.saturating_duration_since(then);
        if span < RATE_WINDOW_MIN {
            return 0.0;
        }
        total.saturating_sub(before) as f64 / span.as_secs_f64()
    }
}

/// The controller; see the module documentation.
#[derive(Debug)]
pub struct Controller {
    drain: WindowRate,
    link: WindowRate,
    /// Peak link rates per second-long slot: (start of slot, peak), the current slot last.
    peaks: std::collections::VecDeque<(Instant, f64)>,
    /// Since when the controller paces, if it does.
    pacing_since: Option<Instant>,
    /// Since when the backlog is under a quarter of its bound, while pacing.
    low_since: Option<Instant>,
    state: ControlState,
}

impl Default for Controller {
    fn default() -> Self {
        Controller::new()
    }
}

impl Controller {
    /// A controller that has measured nothing yet.
    pub fn new() -> Controller {
        Controller {
            drain: WindowRate::default(),
            link: WindowRate::default(),
            peaks: std::collections::VecDeque::new(),
            pacing_since: None,
            low_since: None,
            state: ControlState {
                budget_bytes: BUDGET_MIN_BYTES,
                ..ControlState::default()
            },
        }
    }

    /// One decision at `now`. `confirmed_bytes`: mirrored bytes the destination confirmed
    /// so far; `delivered_bytes`: bytes the link delivered so far, every class (bulk copy
    /// included, which is what measures the link while the mirror is quiet); both
    /// cumulative. `backlog_bytes`: captured or mirrored and not confirmed. `connected`:
    /// whether a session carries the mirror.
    pub fn tick(
        &mut self,
        now: Instant,
        confirmed_bytes: u64,
        delivered_bytes: u64,
        backlog_bytes: u64,
        connected: bool,
    ) -> ControlState {
        let drain = self.drain.update(now, confirmed_bytes);
        let link = self.link.update(now, delivered_bytes).max(drain);
        self.note_peak(now, link);
        // While pacing the link is full, so the last few seconds say what it can do now;
        // but only once pacing has run that long (before, the link was idle a moment ago).
        let window = match self.pacing_since {
            Some(since) if now.saturating_duration_since(since) >= PACING_PEAK_WINDOW => {
                PACING_PEAK_WINDOW
            }
            _ => PEAK_WINDOW,
        };
        let capacity = self
            .peaks
            .iter()
            .filter(|p| now.saturating_duration_since(p.0) < window)
            .map(|p| p.1)
            .fold(link, f64::max);
        let budget = ((capacity * DOWNTIME_BUDGET.as_secs_f64()) as u64).max(BUDGET_MIN_BYTES);
        // Without a session the writes go to the dirty bitmap, whose memory is bounded
        // by the disk size: there is nothing to pace against.
        if !connected {
            self.pacing_since = None;
        } else if backlog_bytes > budget / 2 {
            self.pacing_since.get_or_insert(now);
        }
        if backlog_bytes < budget / 4 {
            let low = *self.low_since.get_or_insert(now);
            if now.saturating_duration_since(low) >= PACING_RELEASE {
                self.pacing_since = None;
            }
        } else {
            self.low_since = None;
        }
        let rate = if self.pacing_since.is_some() {
            // 1.25 × drain at a quarter full, 1 × at half, 0.5 × full, 0.25 × beyond.
            let fill = backlog_bytes as f64 / budget as f64;
            let factor = (1.5 - fill).clamp(0.25, 1.25);
            ((drain * factor) as u64).max(RATE_MIN_BYTES_PER_S)
        } else {
            0
        };
        self.state = ControlState {
            drain_bytes_per_s: drain as u64,
            link_bytes_per_s: link as u64,
            budget_bytes: budget,
            backlog_bytes,
            rate_bytes_per_s: rate,
        };
        self.state
    }

    /// The last decision.
    pub fn state(&self) -> ControlState {
        self.state
    }

    fn note_peak(&mut self, now: Instant, rate: f64) {
        match self.peaks.back_mut() {
            Some((start, peak))
                if now.saturating_duration_since(*start) < Duration::from_secs(1) =>
            {
                *peak = peak.max(rate);
            }
            _ => self.peaks.push_back((now, rate)),
        }
        while self
            .peaks
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) >= PEAK_WINDOW)
        {
            self.peaks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn no_delay_below_the_rate_and_the_rate_above_it() {
        let pacer = Pacer::new();
        // 100 MB/s: a 4 KiB write costs 41 µs.
        let rate = 100_000_000;
        // One write per millisecond is far below the rate: never delayed.
        for i in 0..100 {
            assert_eq!(
                pacer.delay_at(BURST.as_nanos() as u64 + i * 1_000_000, rate, 4096),
                0
            );
        }
        // 1000 writes at once: the n-th waits n × 41 µs, less the burst allowance.
        let now = 200_000_000;
        let delays: Vec<u64> = (0..1000).map(|_| pacer.delay_at(now, rate, 4096)).collect();
        let last = *delays.last().unwrap_or(&0);
        let expected = 1000 * 40_960 - BURST.as_nanos() as u64;
        assert!(
            last.abs_diff(expected) < 100_000,
            "last delay {last} ns, expected about {expected}"
        );
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_hold_never_exceeds_its_bound() {
        let pacer = Pacer::new();
        // 1 MiB/s and 10 000 writes of 64 KiB at once: minutes of work, each held at most
        // DELAY_MAX.
        for _ in 0..10_000 {
            let d = pacer.delay_at(1_000_000_000, RATE_MIN_BYTES_PER_S, 65536);
            assert!(d <= DELAY_MAX.as_nanos() as u64);
        }
    }

    #[test]
    fn off_means_no_delay_and_nothing_counted() {
        let pacer = Pacer::new();
        assert_eq!(pacer.delay(1 << 20), Duration::ZERO);
        pacer.set_rate(1 << 20);
        pacer.set_rate(0);
        assert_eq!(pacer.delay(1 << 20), Duration::ZERO);
        assert_eq!(pacer.stats().delayed_writes, 0);
    }

    /// What [`model`] saw.
    struct Run {
        /// The guest's write rate over the last five seconds.
        guest_rate: f64,
        /// The largest backlog over the last five seconds, and the bound then.
        max_backlog: u64,
        budget: u64,
        /// Bytes past the backlog bound (to the dirty bitmap) over the last five seconds.
        overflowed: u64,
        /// The longest hold of a completion.
        max_hold: u64,
        /// The longest time without any completion.
        max_gap: u64,
    }

    /// A closed-loop guest (`depth` writes in flight, each taking its local latency plus
    /// the pacer's hold) against a link that carries `link` bytes/s and confirms an RTT
    /// after it sends, in 1 ms steps, with the source's rule that a write past the
    /// backlog bound goes to the bitmap instead of the link.
    fn model(depth: u32, write_bytes: u64, link: f64, rtt_ms: u64, seconds: u64) -> Run {
        let pacer = Pacer::new();
        let mut controller = Controller::new();
        let epoch = Instant::now();
        let local_latency_ns = 200_000;
        let step = 1_000_000u64;
        let end = seconds * 1_000_000_000;
        let late = end - 5_000_000_000;
        // When each of the writes in flight completes.
        let mut inflight: Vec<u64> = vec![0; depth as usize];
        let mut sent = 0u64;
        let mut carried = 0f64;
        let mut confirmed = 0u64;
        let mut wire = std::collections::VecDeque::new();
        let mut run = Run {
            guest_rate: 0.0,
            max_backlog: 0,
            budget: 0,
            overflowed: 0,
            max_hold: 0,
            max_gap: 0,
        };
        let mut completions = Vec::new();
        let mut written_late = 0u64;
        let mut next_control = 0;
        let mut t = 0;
        while t < end {
            for done in inflight.iter_mut() {
                while *done <= t {
                    if sent - confirmed + write_bytes <= controller.state().budget_bytes {
                        sent += write_bytes;
                    } else if *done >= late {
                        run.overflowed += write_bytes;
                    }
                    let rate = pacer.rate.load(Ordering::Relaxed);
                    let hold = if rate == 0 {
                        0
                    } else {
                        pacer.delay_at(*done, rate, write_bytes)
                    };
                    run.max_hold = run.max_hold.max(hold);
                    if *done >= late {
                        written_late += write_bytes;
                    }
                    completions.push(*done + hold);
                    *done += local_latency_ns + hold;
                }
            }
            carried = (carried + link * step as f64 / 1e9).min(sent as f64);
            wire.push_back((t + rtt_ms * 1_000_000, carried as u64));
            while let Some(&(at, total)) = wire.front() {
                if at > t {
                    break;
                }
                confirmed = total;
                wire.pop_front();
            }
            if t >= next_control {
                let backlog = sent - confirmed;
                let state = controller.tick(
                    epoch + Duration::from_nanos(t),
                    confirmed,
                    confirmed,
                    backlog,
                    true,
                );
                pacer.set_rate(state.rate_bytes_per_s);
                if t >= late {
                    run.max_backlog = run.max_backlog.max(backlog);
                    run.budget = state.budget_bytes;
                }
                next_control = t + CONTROL_INTERVAL.as_nanos() as u64;
            }
            t += step;
        }
        run.guest_rate = written_late as f64 / 5.0;
        completions.sort_unstable();
        run.max_gap = completions
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(u64::MAX);
        run
    }

    #[test]
    fn a_guest_faster_than_the_link_converges_to_the_link_rate() {
        // 32 writes of 64 KiB in flight at 200 µs each: the guest could write 10 GB/s.
        for (link, rtt_ms) in [(50.0 * MB, 100), (100.0 * MB, 250), (10.0 * MB, 50)] {
            let run = model(32, 65536, link, rtt_ms, 30);
            let what = format!("link {:.0} MB/s, RTT {rtt_ms} ms", link / MB);
            assert!(
                (run.guest_rate / link - 1.0).abs() < 0.05,
                "{what}: guest rate {:.1} MB/s",
                run.guest_rate / MB
            );
            // The bound is what drains in the downtime budget at the link's rate.
            let bound =
                ((link * DOWNTIME_BUDGET.as_secs_f64() * 1.05) as u64).max(BUDGET_MIN_BYTES);
            assert!(
                run.budget <= bound,
                "{what}: bound {} over {bound}",
                run.budget
            );
            assert!(
                run.max_backlog <= run.budget * 3 / 4,
                "{what}: backlog {} against the bound {}",
                run.max_backlog,
                run.budget
            );
            assert_eq!(
                run.overflowed, 0,
                "{what}: writes overflowed once converged"
            );
            assert!(run.max_hold <= DELAY_MAX.as_nanos() as u64, "{what}");
            // The bound on a stall: the guest sees completions at least this often.
            assert!(
                run.max_gap < 100_000_000,
                "{what}: {} ms without a completion",
                run.max_gap / 1_000_000
            );
            assert!(run.max_hold > 0, "{what}: the guest was never delayed");
        }
    }

    #[test]
    fn a_guest_slower_than_the_link_is_not_delayed() {
        // One 4 KiB write in flight, 200 µs each: 20 MB/s against a 100 MB/s link.
        let run = model(1, 4096, 100.0 * MB, 100, 10);
        assert_eq!(run.max_hold, 0);
        assert!(
            run.guest_rate > 19.0 * MB,
            "guest rate {:.1} MB/s",
            run.guest_rate / MB
        );
    }

    #[test]
    fn a_disconnected_link_paces_nothing() {
        let mut c = Controller::new();
        let t = Instant::now();
        let s = c.tick(t, 0, 0, 1 << 30, false);
        assert_eq!(s.rate_bytes_per_s, 0);
        let s = c.tick(t + CONTROL_INTERVAL, 0, 0, 1 << 30, true);
        assert_eq!(s.rate_bytes_per_s, RATE_MIN_BYTES_PER_S);
    }
}
