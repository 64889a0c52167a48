//! The migration's orchestration on the source engine: the phases of
//! `docs/migration.md` ("The switchover protocol"), the vCPU throttle, and the rollback at
//! every failure before the commit point.
//!
//! 1. **Disk**: wait until replication has copied the whole disk (in sync or behind).
//! 2. **Offer**: the destination engine points its VMM at its incoming socket.
//! 3. **Memory**: the source VMM migrates into the [`SourceEnd`] on the replication
//!    session; the throttle ([`StunController`]) keeps its dirty rate under the link's.
//! 4. **Switchover**: at QEMU's `pre-switchover` (vCPUs stopped) the disk is fenced and
//!    demoted, and the mirror drained until the destination confirmed every write.
//! 5. **Completing**: `migrate-continue`; QEMU sends the device state; the stream must end
//!    with the destination's `SHUT 0`.
//! 6. **Commit**: `Commit`; from here the source is in doubt until the destination answers,
//!    and stays paused. `Committed` (or the destination refusing replication because it was
//!    promoted): done, the VM runs there. `Refused`: the destination recorded that it never
//!    commits, so the source rolls back.
//!
//! Rollback (any failure before `Commit` left, or `Refused`): cancel the VMM's migration,
//! tell the destination `Abort`, take the demote back, lift the fence, resume the VM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use strait_net::StreamClass;
use strait_vmm::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    RunState, VcpuQuota, Vmm,
};
use tracing::{info, warn};

use super::port::Port;
use super::stream::{SourceEnd, StreamConfig, StreamHandle, StreamMonitor};
use super::stun::{Actuator, AppliedLog, Demand, StunController, StunState, TICK};
use super::wire::{MigrationId, MigrationMessage};
use super::{connect_vmm, MigrationError};
use crate::replication::driver::SourceStatus;
use crate::replication::SourceState;

/// How long the destination may take to answer an offer: it connects to its VMM and
/// issues two QMP commands (well under a second), plus a WAN round trip; the rest is a
/// loaded machine's margin.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the source waits for the destination's decision after `Commit` before it
/// asks to abort instead (and then waits for the answer to that). The destination needs
/// QEMU's last pages and device state (megabytes: seconds across a slow WAN) and the
/// mirror's backlog (at most about a second of the link's rate,
/// [`crate::replication::throttle`]); a minute covers a link that drops for less than its
/// resume window on the way. The VM is paused meanwhile.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the source looks at the link and its VMM while it waits for the decision
/// (a message from the destination wakes it at once).
const DECIDE_POLL: Duration = Duration::from_millis(50);

/// How long the source QEMU may take to end its migration once the destination
/// committed: the return path's `SHUT` is half a round trip behind the commit; 10 s is a
/// link that just dropped.
pub const SOURCE_COMPLETED_WAIT: Duration = Duration::from_secs(10);

/// Between two re-sends of `Commit` while in doubt within one session (a new session
/// sends it at once).
pub const COMMIT_RESEND: Duration = Duration::from_secs(5);

/// The guest's downtime a migration aims for unless told otherwise: issue 5's target at
/// 214 ms RTT (XvMotion reports about a second). QEMU gets what is left of it once the
/// link's part is taken off (`DowntimeBudget`).
pub const DOWNTIME_LIMIT_MS_DEFAULT: u64 = 500;

/// The part of the switchover that is neither QEMU's last pages nor the link: the
/// destination QEMU loading the device state and resuming, and strait's commit. Measured
/// on the sweep at 0 ms RTT, where the link adds nothing: the guest's gap was 845 ms
/// against QEMU's own 678 ms, so about 170 ms; 150 ms, since part of that gap is the
/// emulated link's own queue.
pub const SWITCHOVER_FIXED_MS: u64 = 150;

/// The least downtime QEMU is asked to aim for, whatever the link takes: QEMU converges
/// when what is left fits that time at the link's rate, and the throttle only keeps the
/// guest's dirty rate below the link's, so a smaller aim means more passes and a longer
/// throttled phase (100 ms is a third of QEMU's own default, 2.5 MB at 200 Mbit/s).
pub const VMM_DOWNTIME_LIMIT_MS_MIN: u64 = 100;

/// No bandwidth cap from QEMU itself (its default is 128 MiB/s): the link limits, and
/// QEMU must see the link's rate.
const UNCAPPED_BYTES_PER_S: u64 = 1 << 36;

/// auto-converge evaluates at most once a second and triggers when a pass dirtied more than
/// this share of what it sent; 1% makes it apply the throttle the controller asks for
/// whenever the guest dirties memory at all (`docs/vmm.md`, "The throttle").
const THROTTLE_TRIGGER_PCT: u8 = 1;

/// Timeline samples kept. At the start one per [`TICK`] (500 ms): 2048 samples are 17
/// minutes; a longer migration halves the resolution each time the timeline fills, so the
/// memory stays bounded whatever its length.
pub const TIMELINE_MAX: usize = 2048;

/// How long the VMM may take to resume after a rollback.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// What the orchestration needs of the source engine.
pub trait SourceSide: Send + Sync {
    /// Replication's status, `None` when it is not running.
    fn replication(&self) -> Option<SourceStatus>;
    /// Replication's session, for the memory stream and the messages.
    fn port(&self) -> Option<Arc<Port>>;
    /// Fences the disk: no guest write is applied or acknowledged after this returns.
    fn fence(&self) -> Result<(), String>;
    /// Lifts the fence.
    fn unfence(&self);
    fn demote(&self);
    fn undemote(&self);
    /// Caps the guest's disk write rate (bytes per second; 0: no cap), on top of
    /// replication's own back-pressure: the disk's share of the link.
    fn set_disk_rate_cap(&self, bytes_per_s: u64);
}

/// What to migrate, and how.
#[derive(Debug, Clone)]
pub struct MigratePlan {
    pub id: MigrationId,
    /// The source VMM (`qemu:PATH`).
    pub vmm: String,
    /// The destination's VMM, forwarded (`qemu:PATH`); `None`: the destination's own.
    pub dst_vmm: Option<String>,
    /// Where the source socket is created.
    pub run_dir: PathBuf,
    pub downtime_limit_ms: u64,
    /// The longest the memory phase may run before the VM stops for the switchover; past
    /// it the migration rolls back and the VM goes on here (`None`: no limit, the throttle
    /// alone makes QEMU converge).
    pub converge_timeout: Option<Duration>,
    /// What applies the vCPU throttle.
    pub actuator: Actuator,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Disk,
    Offer,
    Memory,
    Switchover,
    /// `Commit` sent: the destination commits as soon as it holds the whole state and
    /// every write; the source VM stays paused until it says.
    Completing,
    /// No decision yet, and the source cannot get one now: the link is down, or the
    /// source asked to abort and has no answer. The source VM stays paused.
    InDoubt,
    /// Committed: the VM runs on the destination.
    Done,
    /// Rolled back: the VM runs here again.
    RolledBack,
    /// Failed and the VM's state is not what a rollback leaves (see `error`).
    Failed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Disk => "disk",
            Phase::Offer => "offer",
            Phase::Memory => "memory",
            Phase::Switchover => "switchover",
            Phase::Completing => "completing",
            Phase::InDoubt => "in-doubt",
            Phase::Done => "done",
            Phase::RolledBack => "rolled-back",
            Phase::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack | Phase::Failed)
    }
}

/// One point of the timeline (for the progress bar's history and the demo's chart).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the migration started.
    pub t_s: f64,
    pub phase: Phase,
    /// Bytes per second the link delivered, per class, over the last interval.
    pub memory_bytes_per_s: u64,
    pub mirror_bytes_per_s: u64,
    pub bulk_bytes_per_s: u64,
    /// QEMU's dirty rate, bytes per second.
    pub dirty_bytes_per_s: u64,
    /// The throttle asked, and the one QEMU applies, in percent.
    pub throttle_pct: u8,
    pub applied_throttle_pct: u8,
    /// Captured guest writes not yet confirmed by the destination.
    pub mirror_backlog_bytes: u64,
    /// QEMU's estimate of the downtime if it switched over now.
    pub expected_downtime_ms: u64,
    /// The cap on the guest's disk writes (the disk's share of the link); 0: none.
    pub disk_cap_bytes_per_s: u64,
}

/// What was still between the source VMM and the destination when the VM stopped for the
/// switchover, and what the VMM sent after it: the parts of the downtime that belong to
/// the link. The queue drains at the link's rate before the last pages can arrive, so
/// `memory_queued_bytes / link_bytes_per_s` bounds the downtime that QEMU's own estimate
/// (its remaining pages over its send rate) does not see: a bound, not the figure, since
/// the class's bytes count until the destination acks them in order, after the network.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AtStop {
    /// Memory-class bytes the link held: queued, or sent and not yet acked by the peer.
    pub memory_queued_bytes: u64,
    /// Of those, the bytes sent on a connection and not yet acked.
    pub memory_in_flight_bytes: u64,
    /// Captured guest writes not yet confirmed durable at the destination.
    pub mirror_backlog_bytes: u64,
    /// Bytes per second the link delivered, all classes together, just before the stop.
    pub link_bytes_per_s: u64,
    /// The session's smoothed round-trip time, once measured.
    pub srtt_ms: Option<f64>,
    /// Bytes the VMM had handed to the memory stream by the stop.
    pub vmm_bytes: u64,
    /// Bytes the VMM handed over after the stop (its last pages and the device state),
    /// once it completed.
    pub vmm_bytes_after: Option<u64>,
    /// The `downtime-limit` the VMM had at the stop: its share of the downtime target.
    pub vmm_downtime_limit_ms: u64,
}

/// A migration's status, for `status` and the progress bar.
#[derive(Debug, Clone)]
pub struct MigrateStatus {
    pub id: MigrationId,
    pub phase: Phase,
    /// When each phase began, in seconds since the start.
    pub phases: Vec<(Phase, f64)>,
    pub elapsed_s: f64,
    pub memory_transferred_bytes: u64,
    pub memory_remaining_bytes: u64,
    pub memory_total_bytes: u64,
    pub throttle: StunState,
    /// What applies the throttle.
    pub actuator: Actuator,
    /// The throttle in force: QEMU's report, or the quota's.
    pub applied_throttle_pct: u8,
    pub expected_downtime_ms: Option<u64>,
    /// QEMU's measured downtime (from its `query-migrate` once completed).
    pub vmm_downtime_ms: Option<u64>,
    /// From the VM stopping at `pre-switchover` to the destination's answer to `Commit`:
    /// the downtime as strait sees it. The destination answers once the commit is recorded,
    /// then promotes its disk and resumes the VM, which this figure does not include
    /// (tens of milliseconds: a sync and a QMP `cont`).
    pub switchover_ms: Option<f64>,
    /// Where the bytes were when the VM stopped.
    pub at_stop: Option<AtStop>,
    /// Bytes the link delivered per class during the migration.
    pub memory_bytes: u64,
    pub mirror_bytes: u64,
    pub bulk_bytes: u64,
    pub error: Option<String>,
    pub timeline: Vec<Sample>,
}

/// A running migration.
pub struct Migration {
    status: Arc<Mutex<MigrateStatus>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Migration {
    /// Connects to the VMM (so a wrong address fails the request, not the thread) and
    /// starts the orchestration.
    pub fn start(
        plan: MigratePlan,
        side: Arc<dyn SourceSide>,
    ) -> Result<Migration, MigrationError> {
        let vmm = connect_vmm(&plan.vmm)?;
        if let Some(dst) = &plan.dst_vmm {
            super::parse_vmm_spec(dst)?;
        }
        let status = Arc::new(Mutex::new(MigrateStatus {
            id: plan.id,
            phase: Phase::Disk,
            phases: vec![(Phase::Disk, 0.0)],
            elapsed_s: 0.0,
            memory_transferred_bytes: 0,
            memory_remaining_bytes: 0,
            memory_total_bytes: 0,
            throttle: StunState::default(),
            actuator: plan.actuator,
            applied_throttle_pct: 0,
            expected_downtime_ms: None,
            vmm_downtime_ms: None,
            switchover_ms: None,
            at_stop: None,
            memory_bytes: 0,
            mirror_bytes: 0,
            bulk_bytes: 0,
            error: None,
            timeline: Vec::new(),
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let actuator = plan.actuator;
        let mut runner = Runner {
            budget: DowntimeBudget::new(plan.downtime_limit_ms),
            plan,
            side,
            vmm,
            status: status.clone(),
            cancel: cancel.clone(),
            started: Instant::now(),
            stream: None,
            stun: StunController::for_actuator(actuator),
            quota: None,
            applied: AppliedLog::default(),
            meter: ClassMeter::default(),
            sample_every: 1,
            ticks: 0,
            paused_at: None,
            armed: false,
            asked_on: None,
        };
        let thread = thread::Builder::new()
            .name("strait-migrate".into())
            .spawn(move || runner.run())
            .map_err(MigrationError::Thread)?;
        Ok(Migration {
            status,
            cancel,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> MigrateStatus {
        lock(&self.status).clone()
    }

    /// Asks for a rollback. Honoured before `Commit` is sent; after that the outcome is
    /// the destination's.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the orchestration stopped short of a commit.
enum Stop {
    /// Roll back: the VM runs here again.
    Rollback(String),
}

type Step<T> = Result<T, Stop>;

/// The window of the link's rate, all classes together, as the controller uses it: long
/// enough to smooth the bursts in which acknowledgements arrive, short enough that a link
/// that really slows shows within 2 s. The memory stream keeps the link busy during the
/// memory phase, so the rate over it is the link's capacity.
const LINK_WINDOW: Duration = Duration::from_secs(2);

/// The window of the per-class rates for the status and the timeline.
const CLASS_WINDOW: Duration = Duration::from_secs(1);

/// Shortest span a rate is computed over: below it, one burst of acknowledgements reads as
/// a link many times faster than it is.
const RATE_SPAN_MIN: Duration = Duration::from_millis(250);

/// Samples closer than this replace the newest one instead of adding to the window.
const SAMPLE_SPACING_MIN: Duration = Duration::from_millis(50);

/// Samples a [`Windowed`] keeps at most: with [`SAMPLE_SPACING_MIN`] between them, 64 cover
/// 3.2 s, more than the longest window, however often the loop wakes.
const WINDOW_SAMPLES_MAX: usize = 64;

/// Cumulative counters sampled over time, and their rates over a window (not between two
/// samples: the loop wakes at uneven moments, and a short interval after a burst reads as
/// a rate far above the truth).
#[derive(Default)]
struct Windowed<const N: usize> {
    samples: std::collections::VecDeque<(Instant, [u64; N])>,
}

impl<const N: usize> Windowed<N> {
    fn push(&mut self, at: Instant, values: [u64; N]) {
        // The newest sample moves forward until it is far enough from the one before it.
        let len = self.samples.len();
        let close = len >= 2
            && self
                .samples
                .get(len - 2)
                .is_some_and(|(t, _)| at.duration_since(*t) < SAMPLE_SPACING_MIN);
        if close {
            self.samples.pop_back();
        }
        self.samples.push_back((at, values));
        // Keep one sample at least LINK_WINDOW old as the base of the longest window.
        while self.samples.len() > WINDOW_SAMPLES_MAX
            || self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.duration_since(*t) >= LINK_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Counter `i`'s rate over the last `window` (or what is sampled of it), per second;
    /// 0 until the samples span [`RATE_SPAN_MIN`].
    fn rate(&self, i: usize, window: Duration) -> u64 {
        let Some((now, last)) = self.samples.back() else {
            return 0;
        };
        let base = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| now.duration_since(*t) >= window)
            .or_else(|| self.samples.front());
        let Some((then, first)) = base else {
            return 0;
        };
        let span = now.duration_since(*then);
        if span < RATE_SPAN_MIN {
            return 0;
        }
        (last[i].saturating_sub(first[i]) as f64 / span.as_secs_f64()) as u64
    }
}

/// The rate QEMU is told to expect for its last pages (`avail-switchover-bandwidth`):
/// the link's measured rate, all classes together (at the switchover the guest is
/// stopped, so its disk writes no longer share the link).
///
/// QEMU's own measure is how fast it wrote into its socket over the last 100 ms; strait's
/// buffers (a bandwidth-delay product and more, across the WAN) take bursts faster than the
/// WAN drains them, so QEMU's measure ran high and it stopped the VM with more left to send
/// than its `downtime-limit` allows (measured at 214 ms: 15–24 MB sent after the stop, 0.6–1 s
/// at the link's rate, with 500 ms asked).
#[derive(Debug, Default)]
struct SwitchoverRate {
    /// The rate last told, 0 before the first.
    told: u64,
    /// The VMM refused the parameter: do not ask again.
    unsupported: bool,
}

impl SwitchoverRate {
    /// A change smaller than this share of the rate last told, in percent, is not worth a
    /// QMP command (the measure itself moves by about that much from tick to tick).
    const CHANGE_PCT: u64 = 10;

    /// The rate to tell the VMM now, if it is measured and moved enough.
    fn update(&mut self, measured_bytes_per_s: u64) -> Option<u64> {
        if self.unsupported || measured_bytes_per_s == 0 {
            return None;
        }
        let moved = self.told.abs_diff(measured_bytes_per_s);
        if self.told != 0 && moved * 100 < self.told * Self::CHANGE_PCT {
            return None;
        }
        self.told = measured_bytes_per_s;
        Some(measured_bytes_per_s)
    }

    fn give_up(&mut self) {
        self.unsupported = true;
    }
}

/// What QEMU may spend of the guest's downtime target (`downtime-limit`): the target,
/// less what the link adds after QEMU's last byte left (the queue ahead of it and the
/// one-way delay), less [`SWITCHOVER_FIXED_MS`]; at least [`VMM_DOWNTIME_LIMIT_MS_MIN`].
///
/// QEMU's own figure is its remaining pages over the rate it expects ([`SwitchoverRate`]);
/// the guest waits that, and then for the bytes ahead of the last page to drain and for
/// the last page to cross the WAN. The session's ping sees both: its smoothed RTT is the
/// path's RTT plus the queue in the sockets and the bottleneck, and its lowest value over
/// the migration stands in for the path's RTT. So the link's part is `srtt - min_rtt / 2`.
#[derive(Debug)]
struct DowntimeBudget {
    target_ms: u64,
    /// The limit last told, 0 before the first.
    told_ms: u64,
    /// The lowest smoothed RTT seen, ns.
    min_rtt_ns: Option<u64>,
}

impl DowntimeBudget {
    /// A change smaller than this, in ms, is not worth a QMP command (the srtt moves by
    /// about that much from tick to tick at 214 ms).
    const CHANGE_MS: u64 = 20;

    fn new(target_ms: u64) -> DowntimeBudget {
        DowntimeBudget {
            target_ms,
            told_ms: 0,
            min_rtt_ns: None,
        }
    }

    /// Takes in a smoothed RTT (every tick of every phase, so that the path's RTT is
    /// known from the disk phase on, before the memory stream queues).
    fn observe(&mut self, srtt_ns: Option<u64>) {
        if let Some(srtt) = srtt_ns {
            self.min_rtt_ns = Some(self.min_rtt_ns.map_or(srtt, |m| m.min(srtt)));
        }
    }

    /// What QEMU may spend now.
    fn limit_ms(&self, srtt_ns: Option<u64>) -> u64 {
        let link_ms = match (srtt_ns, self.min_rtt_ns) {
            (Some(srtt), Some(min)) => srtt.saturating_sub(min / 2) / 1_000_000,
            _ => 0,
        };
        self.target_ms
            .saturating_sub(link_ms + SWITCHOVER_FIXED_MS)
            .max(VMM_DOWNTIME_LIMIT_MS_MIN)
            .min(self.target_ms)
    }

    /// Takes in the session's smoothed RTT; returns the limit to tell QEMU if it moved
    /// enough since the last one told.
    fn update(&mut self, srtt_ns: Option<u64>) -> Option<u64> {
        self.observe(srtt_ns);
        let limit = self.limit_ms(srtt_ns);
        if self.told_ms != 0 && limit.abs_diff(self.told_ms) < Self::CHANGE_MS {
            return None;
        }
        self.told_ms = limit;
        Some(limit)
    }
}

/// Bytes the link delivered per class, across sessions.
#[derive(Default)]
struct ClassMeter {
    session: u64,
    last: [u64; 4],
    total: [u64; 4],
    window: Windowed<4>,
}

impl ClassMeter {
    fn update(&mut self, port: &Port) {
        let Some((session, link)) = port.link() else {
            return;
        };
        let stats = link.stats();
        let mut now = [0u64; 4];
        for (i, s) in stats.send.iter().enumerate().take(4) {
            now[i] = s.acked_bytes;
        }
        if session != self.session {
            // Per-session counters start again at zero.
            self.session = session;
            self.last = [0; 4];
        }
        for (i, now) in now.iter().enumerate() {
            self.total[i] += now.saturating_sub(self.last[i]);
        }
        self.last = now;
        self.window.push(Instant::now(), self.total);
    }

    fn index(class: StreamClass) -> usize {
        StreamClass::ALL
            .iter()
            .position(|c| *c == class)
            .unwrap_or(0)
    }

    /// One class's rate over the last [`CLASS_WINDOW`].
    fn rate(&self, class: StreamClass) -> u64 {
        self.window.rate(Self::index(class), CLASS_WINDOW)
    }

    /// All classes together over the last [`LINK_WINDOW`].
    fn rate_all(&self) -> u64 {
        (0..4).map(|i| self.window.rate(i, LINK_WINDOW)).sum()
    }

    fn total(&self, class: StreamClass) -> u64 {
        self.total[Self::index(class)]
    }
}

/// The guest's mirrored write rate (over [`CLASS_WINDOW`]), and whether the migration's
/// cap held it since the last look.
#[derive(Default)]
struct DiskMeter {
    window: Windowed<1>,
    delayed: u64,
}

impl DiskMeter {
    fn update(&mut self, r: &SourceStatus) -> (u64, bool) {
        self.window.push(Instant::now(), [r.stats.bytes_mirrored]);
        let delayed = r.pacer.delayed_writes;
        let capped = r.rate_cap_bytes_per_s > 0 && delayed > self.delayed;
        self.delayed = delayed;
        (self.window.rate(0, CLASS_WINDOW), capped)
    }
}

/// Why a migration whose memory phase ran out of `limit` rolls back, with what QEMU had
/// left: the figures a user weighs before trying again with a longer limit, a larger
/// `downtime_ms` or a quieter guest.
fn not_converged(limit: Duration, info: &MigrationInfo, applied: u8, throttle_asked: u8) -> String {
    let (remaining, dirty) = info
        .ram
        .as_ref()
        .map_or((0, 0), |r| (r.remaining_bytes, r.dirty_bytes_per_s()));
    format!(
        "the memory phase did not converge within {} s: QEMU had {} MiB left, the guest \
         dirtied {} MiB/s, the vCPU throttle was {}% (asked {}%)",
        limit.as_secs(),
        remaining >> 20,
        dirty >> 20,
        applied,
        throttle_asked,
    )
}

struct Runner {
    plan: MigratePlan,
    side: Arc<dyn SourceSide>,
    vmm: Box<dyn Vmm>,
    status: Arc<Mutex<MigrateStatus>>,
    cancel: Arc<AtomicBool>,
    started: Instant,
    stream: Option<StreamHandle>,
    stun: StunController,
    /// The quota on the vCPU threads while the memory phase runs ([`Actuator::Cgroup`]).
    quota: Option<VcpuQuota>,
    /// The quota's changes, to tell the controller what QEMU's dirty rate was measured
    /// under.
    applied: AppliedLog,
    meter: ClassMeter,
    /// QEMU's share of the downtime target, and what it was last told.
    budget: DowntimeBudget,
    /// Take a timeline sample every this many ticks.
    sample_every: u64,
    ticks: u64,
    /// When the VM stopped for the switchover.
    paused_at: Option<Instant>,
    /// `Commit` went out: only the destination's `Refused` lets the VM run here again.
    armed: bool,
    /// The session the last `Commit` or `Abort` went on, and when.
    asked_on: Option<(u64, Instant)>,
}

impl Runner {
    fn run(&mut self) {
        info!(id = self.plan.id, vmm = %self.vmm.describe(), "migration started");
        let outcome = self.migrate();
        // The quota goes before anything else is decided: a rollback resumes the VM here,
        // which must run unslowed. Not at the stop for the switchover: the vCPUs are
        // stopped then, and moving threads between cgroups takes tens of milliseconds
        // (the kernel waits for an RCU grace period), which the downtime would pay.
        self.release_quota();
        let (phase, error) = match outcome {
            Ok(()) => (Phase::Done, None),
            Err(Stop::Rollback(why)) => {
                warn!(reason = %why, "migration rolls back");
                match self.rollback(&why) {
                    Ok(()) => (Phase::RolledBack, Some(why)),
                    Err(e) => (
                        Phase::Failed,
                        Some(format!("{why}; and the rollback failed: {e}")),
                    ),
                }
            }
        };
        // The VM either runs on the destination or here again: no more sharing, and the
        // link may fill its pipes for bulk work again.
        self.side.set_disk_rate_cap(0);
        if let Some((_, link)) = self.side.port().and_then(|p| p.link()) {
            link.set_latency_bound(false);
        }
        self.set_phase(phase);
        self.tick_status(None);
        lock(&self.status).error = error;
        info!(id = self.plan.id, phase = phase.name(), "migration ended");
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn set_phase(&self, phase: Phase) {
        let mut s = lock(&self.status);
        if s.phase != phase {
            info!(phase = phase.name(), "migration phase");
            s.phase = phase;
            s.phases.push((phase, self.elapsed()));
        }
    }

    fn phase(&self) -> Phase {
        lock(&self.status).phase
    }

    fn cancelled(&self) -> Step<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Stop::Rollback("cancelled".into()));
        }
        Ok(())
    }

    fn port(&self) -> Step<Arc<Port>> {
        self.side
            .port()
            .ok_or_else(|| Stop::Rollback("replication stopped".into()))
    }

    fn replication(&self) -> Step<SourceStatus> {
        self.side
            .replication()
            .ok_or_else(|| Stop::Rollback("replication stopped".into()))
    }

    /// Refreshes the status and the timeline from the link and, if given, QEMU.
    fn tick_status(&mut self, info: Option<&MigrationInfo>) {
        if let Some(port) = self.side.port() {
            self.meter.update(&port);
            if let Some((_, link)) = port.link() {
                self.budget.observe(link.stats().srtt_ns);
            }
        }
        let backlog = self
            .side
            .replication()
            .map_or(0, |r| r.mirror_backlog_bytes);
        let elapsed = self.elapsed();
        let mut s = lock(&self.status);
        s.elapsed_s = elapsed;
        s.memory_bytes = self.meter.total(StreamClass::Memory);
        s.mirror_bytes = self.meter.total(StreamClass::Mirror);
        s.bulk_bytes = self.meter.total(StreamClass::Bulk);
        s.throttle = self.stun.state();
        if let Some(info) = info {
            if let Some(ram) = &info.ram {
                s.memory_transferred_bytes = ram.transferred_bytes;
                s.memory_remaining_bytes = ram.remaining_bytes;
                s.memory_total_bytes = ram.total_bytes;
            }
            s.applied_throttle_pct = match self.plan.actuator {
                Actuator::Vmm => info.cpu_throttle_pct.unwrap_or(0),
                Actuator::Cgroup => self.applied.current(),
            };
            s.expected_downtime_ms = info.expected_downtime_ms.or(s.expected_downtime_ms);
            if info.downtime_ms.is_some() {
                s.vmm_downtime_ms = info.downtime_ms;
            }
        }
        self.ticks += 1;
        if self.ticks.is_multiple_of(self.sample_every) {
            let sample = Sample {
                t_s: elapsed,
                phase: s.phase,
                memory_bytes_per_s: self.meter.rate(StreamClass::Memory),
                mirror_bytes_per_s: self.meter.rate(StreamClass::Mirror),
                bulk_bytes_per_s: self.meter.rate(StreamClass::Bulk),
                dirty_bytes_per_s: s.throttle.dirty_bytes_per_s,
                throttle_pct: s.throttle.throttle_pct,
                applied_throttle_pct: s.applied_throttle_pct,
                mirror_backlog_bytes: backlog,
                expected_downtime_ms: s.expected_downtime_ms.unwrap_or(0),
                disk_cap_bytes_per_s: s.throttle.disk_cap_bytes_per_s,
            };
            if s.timeline.len() >= TIMELINE_MAX {
                // Halve the resolution: keep every other sample, sample half as often.
                let kept: Vec<Sample> = s.timeline.iter().step_by(2).copied().collect();
                s.timeline = kept;
                self.sample_every *= 2;
            }
            s.timeline.push(sample);
        }
    }

    fn migrate(&mut self) -> Step<()> {
        self.disk_phase()?;
        self.set_phase(Phase::Offer);
        self.offer()?;
        self.set_phase(Phase::Memory);
        self.memory_phase()?;
        self.set_phase(Phase::Switchover);
        self.switchover()?;
        self.set_phase(Phase::Completing);
        self.decide()?;
        self.finish();
        Ok(())
    }

    /// Phase 1: the disk copied once (mirroring then keeps it so).
    fn disk_phase(&mut self) -> Step<()> {
        loop {
            self.cancelled()?;
            let r = self.replication()?;
            match r.state {
                SourceState::InSync | SourceState::Behind { .. } => return Ok(()),
                SourceState::Refused(reason) => {
                    return Err(Stop::Rollback(format!(
                        "the destination refuses replication: {reason}"
                    )))
                }
                _ => {}
            }
            self.tick_status(None);
            thread::sleep(TICK);
        }
    }

    /// Phase 2: the destination gets ready.
    fn offer(&mut self) -> Step<()> {
        let port = self.port()?;
        let id = self.plan.id;
        let offer = MigrationMessage::Offer {
            id,
            vmm: self.plan.dst_vmm.clone().unwrap_or_default(),
        };
        port.send(&offer)
            .map_err(|e| Stop::Rollback(format!("offering the migration: {e}")))?;
        let deadline = Instant::now() + OFFER_TIMEOUT;
        loop {
            self.cancelled()?;
            match port.recv(TICK) {
                Some(MigrationMessage::Ready { id: i }) if i == id => return Ok(()),
                Some(MigrationMessage::Failed { id: i, reason }) if i == id => {
                    return Err(Stop::Rollback(format!(
                        "the destination cannot receive: {reason}"
                    )))
                }
                Some(other) => warn!(?other, "unexpected migration message; ignored"),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Stop::Rollback(format!(
                    "the destination did not answer the offer within {OFFER_TIMEOUT:?}"
                )));
            }
        }
    }

    /// Puts the vCPU threads back as they were, if a quota holds them.
    fn release_quota(&mut self) {
        if let Some(quota) = self.quota.take() {
            match quota.release() {
                Ok(()) => info!("vCPU quota released"),
                Err(e) => warn!(error = %e, "could not undo the vCPU quota entirely"),
            }
        }
        self.applied.set(Instant::now(), 0);
    }

    /// Attaches the quota to the VMM's vCPU threads ([`Actuator::Cgroup`]).
    fn attach_quota(&mut self) -> Step<()> {
        let refuse = |why: String| {
            Stop::Rollback(format!(
                "the cgroup vCPU throttle cannot be used: {why} (migrate with the VMM's \
                 own throttle instead: `throttle` \"vmm\")"
            ))
        };
        let threads = self.vmm.vcpu_threads().map_err(|e| refuse(e.to_string()))?;
        let quota = VcpuQuota::attach(&threads).map_err(|e| refuse(e.to_string()))?;
        info!(threads = ?threads, cgroups = ?quota.cgroups().collect::<Vec<_>>(), "vCPU quota attached");
        self.quota = Some(quota);
        self.applied.set(Instant::now(), 0);
        Ok(())
    }

    /// Asks the actuator for `pct` (at least its [`Actuator::off_pct`]).
    fn apply_throttle(&mut self, pct: u8) {
        match self.plan.actuator {
            Actuator::Vmm => {
                if let Err(e) = self.vmm.set_cpu_throttle(pct) {
                    warn!(error = %e, "cannot set the vCPU throttle");
                }
            }
            Actuator::Cgroup => {
                if let Some(quota) = self.quota.as_mut() {
                    match quota.set_throttle(pct) {
                        Ok(()) => self.applied.set(Instant::now(), quota.throttle_pct()),
                        Err(e) => warn!(error = %e, "cannot set the vCPU quota"),
                    }
                }
            }
        }
    }

    /// Phase 3: QEMU migrates into the stream until it holds at `pre-switchover`.
    fn memory_phase(&mut self) -> Step<()> {
        let vmm_err = |what: &str| {
            let what = what.to_string();
            move |e: strait_vmm::VmmError| Stop::Rollback(format!("{what}: {e}"))
        };
        self.vmm
            .set_migration_capabilities(&MigrationCapabilities {
                pause_before_switchover: true,
                return_path: true,
                // With the quota, QEMU's own throttle stays out of the way.
                auto_converge: self.plan.actuator == Actuator::Vmm,
                events: true,
            })
            .map_err(vmm_err("setting the source VMM's capabilities"))?;
        let srtt_ns = self
            .side
            .port()
            .and_then(|p| p.link())
            .and_then(|(_, link)| link.stats().srtt_ns);
        let limit_ms = self.budget.update(srtt_ns).unwrap_or(self.budget.told_ms);
        info!(
            limit_ms,
            target_ms = self.plan.downtime_limit_ms,
            "QEMU's downtime-limit"
        );
        self.vmm
            .set_migration_parameters(&MigrationParameters {
                downtime_limit_ms: Some(limit_ms),
                max_bandwidth_bytes_per_s: Some(UNCAPPED_BYTES_PER_S),
                throttle_trigger_threshold_pct: Some(THROTTLE_TRIGGER_PCT),
                ..MigrationParameters::default()
            })
            .map_err(vmm_err("setting the source VMM's parameters"))?;
        match self.plan.actuator {
            // "Off" as QEMU can express it, until the controller asks for more.
            Actuator::Vmm => self
                .vmm
                .set_cpu_throttle(1)
                .map_err(vmm_err("setting the vCPU throttle"))?,
            Actuator::Cgroup => self.attach_quota()?,
        }
        let port = self.port()?;
        let (_, link) = port
            .link()
            .ok_or_else(|| Stop::Rollback("the replication session is down".into()))?;
        let socket = self
            .plan
            .run_dir
            .join(format!("strait-migrate-{:016x}.sock", self.plan.id));
        let _ = std::fs::remove_file(&socket);
        let stream_id = (self.plan.id & u64::from(u32::MAX)) as u32;
        let end = SourceEnd::bind(&socket, stream_id, StreamConfig::default())
            .map_err(|e| Stop::Rollback(format!("binding the migration socket: {e}")))?;
        self.stream = Some(
            end.spawn(link, StreamMonitor::new())
                .map_err(|e| Stop::Rollback(format!("starting the memory stream: {e}")))?,
        );
        self.vmm
            .start_migration(&MigrationUri::Unix(socket))
            .map_err(vmm_err("starting the VMM's migration"))?;
        let memory_started = Instant::now();
        let mut throttle_asked = self.plan.actuator.off_pct();
        let mut switchover_rate = SwitchoverRate::default();
        let mut disk = DiskMeter::default();
        loop {
            self.cancelled()?;
            self.destination_failed(&port)?;
            // The last pages wait behind whatever the sockets and the bottleneck hold when
            // the VM stops: keep that to about a bandwidth-delay product from now on
            // (asked every tick: a resumed session is a new link). The same look gives the
            // session's RTT for the downtime budget.
            let srtt_ns = port.link().and_then(|(_, link)| {
                link.set_latency_bound(true);
                link.stats().srtt_ns
            });
            // Read before the query: an event that lands after the query (QEMU reaching
            // `pre-switchover` while this tick runs) must end the wait below at once, or
            // the stopped VM waits for the rest of a tick before `migrate-continue`.
            let marker = self.vmm.activity_marker().unwrap_or(0);
            let info = self
                .vmm
                .migration_info()
                .map_err(vmm_err("reading the migration's progress"))?;
            let (disk_bytes_per_s, disk_capped) = disk.update(&self.replication()?);
            let dirty_bytes_per_s = info.ram.as_ref().map_or(0, |r| r.dirty_bytes_per_s());
            self.applied.observe_rate(Instant::now(), dirty_bytes_per_s);
            let applied_throttle_pct = match self.plan.actuator {
                Actuator::Vmm => info.cpu_throttle_pct.unwrap_or(0),
                Actuator::Cgroup => self.applied.applied(),
            };
            let demand = Demand {
                dirty_bytes_per_s,
                applied_throttle_pct,
                disk_bytes_per_s,
                disk_capped,
                link_bytes_per_s: self.meter.rate_all(),
            };
            let decided = self.stun.tick(Instant::now(), demand);
            let want = decided.throttle_pct.max(self.plan.actuator.off_pct());
            if want != throttle_asked {
                info!(
                    percent = want,
                    actuator = self.plan.actuator.name(),
                    ?decided,
                    "vCPU throttle"
                );
                self.apply_throttle(want);
                throttle_asked = want;
            }
            self.side.set_disk_rate_cap(decided.disk_cap_bytes_per_s);
            if let Some(rate) = switchover_rate.update(self.meter.rate_all()) {
                let told = self.vmm.set_migration_parameters(&MigrationParameters {
                    avail_switchover_bandwidth_bytes_per_s: Some(rate),
                    ..MigrationParameters::default()
                });
                if let Err(e) = told {
                    // QEMU before 8.2: it keeps its own measure.
                    warn!(error = %e, "cannot tell the VMM the link's rate; it decides the switchover from its own measure");
                    switchover_rate.give_up();
                }
            }
            if let Some(limit_ms) = self.budget.update(srtt_ns) {
                info!(
                    limit_ms,
                    srtt_ms = srtt_ns.map(|n| n / 1_000_000),
                    "QEMU's downtime-limit"
                );
                let told = self.vmm.set_migration_parameters(&MigrationParameters {
                    downtime_limit_ms: Some(limit_ms),
                    ..MigrationParameters::default()
                });
                if let Err(e) = told {
                    warn!(error = %e, "cannot change the VMM's downtime-limit");
                }
            }
            self.tick_status(Some(&info));
            match info.status {
                MigrationStatus::PreSwitchover => {
                    self.paused_at = Some(Instant::now());
                    self.record_stop();
                    return Ok(());
                }
                s if s.is_terminal() => {
                    return Err(Stop::Rollback(format!(
                        "the VMM's migration ended as {s:?}{}",
                        info.error_desc
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    )))
                }
                _ => {}
            }
            if let Some(limit) = self
                .plan
                .converge_timeout
                .filter(|limit| memory_started.elapsed() >= *limit)
            {
                return Err(Stop::Rollback(not_converged(
                    limit,
                    &info,
                    applied_throttle_pct,
                    throttle_asked,
                )));
            }
            if self.stream.as_ref().is_some_and(StreamHandle::is_finished) {
                let why = match self.stream.take().map(StreamHandle::join) {
                    Some(Err(e)) => e.to_string(),
                    _ => "it ended early".into(),
                };
                return Err(Stop::Rollback(format!("the memory stream failed: {why}")));
            }
            let _ = self.vmm.wait_for_activity(marker, TICK);
        }
    }

    /// Records [`AtStop`] as the VM stops, and logs it.
    fn record_stop(&mut self) {
        let mut at = AtStop {
            mirror_backlog_bytes: self
                .side
                .replication()
                .map_or(0, |r| r.mirror_backlog_bytes),
            link_bytes_per_s: self.meter.rate_all(),
            vmm_downtime_limit_ms: self.budget.told_ms,
            vmm_bytes: self
                .stream
                .as_ref()
                .map_or(0, |s| s.monitor().progress().local_to_peer_bytes),
            ..AtStop::default()
        };
        if let Some((_, link)) = self.side.port().and_then(|p| p.link()) {
            let stats = link.stats();
            let memory = &stats.send[ClassMeter::index(StreamClass::Memory)];
            at.memory_queued_bytes = memory.backlog_bytes;
            at.memory_in_flight_bytes = memory.sent_bytes.saturating_sub(memory.acked_bytes);
            at.srtt_ms = stats.srtt_ns.map(|ns| ns as f64 / 1e6);
        }
        info!(?at, "the VM stopped for the switchover");
        lock(&self.status).at_stop = Some(at);
    }

    /// Completes [`AtStop`] with what the VMM sent after the stop.
    fn record_after_stop(&mut self, vmm_bytes_total: u64) {
        let mut s = lock(&self.status);
        if let Some(at) = s.at_stop.as_mut() {
            at.vmm_bytes_after = Some(vmm_bytes_total.saturating_sub(at.vmm_bytes));
            info!(at = ?*at, "what the switchover carried");
        }
    }

    /// A `Failed` from the destination ends the attempt.
    fn destination_failed(&self, port: &Port) -> Step<()> {
        while let Some(m) = port.recv(Duration::ZERO) {
            match m {
                MigrationMessage::Failed { id, reason } if id == self.plan.id => {
                    return Err(Stop::Rollback(format!("the destination gave up: {reason}")))
                }
                other => warn!(?other, "unexpected migration message; ignored"),
            }
        }
        Ok(())
    }

    /// Phase 4: the VM is stopped: the disk is fenced and demoted, QEMU is let go
    /// (`migrate-continue`), and `Commit` goes out at once, so its last pages and device
    /// state cross the link while the mirror drains. From `Commit` on, the destination
    /// decides: it commits by itself as soon as its VMM loaded the state and its disk
    /// holds every write, so the guest waits for no further round trip. The source gives
    /// up its own right to roll back there: it rolls back only on the destination's
    /// recorded `Refused`.
    ///
    /// A source QEMU whose migration fails after it stopped the guest starts the guest
    /// again by itself; so before QEMU is let go the memory stream is told to hold QEMU's
    /// socket open whatever happens to the link ([`StreamMonitor::hold_vmm_socket`]), and
    /// the source QEMU waits at the end of its migration until the outcome is known.
    fn switchover(&mut self) -> Step<()> {
        self.side
            .fence()
            .map_err(|e| Stop::Rollback(format!("fencing the disk: {e}")))?;
        self.side.demote();
        self.cancelled()?;
        let Some(stream) = self.stream.as_ref() else {
            return Err(Stop::Rollback("the memory stream never ran".into()));
        };
        stream.monitor().hold_vmm_socket();
        if stream.is_finished() {
            let why = match self.stream.take().map(StreamHandle::join) {
                Some(Err(e)) => e.to_string(),
                _ => "it ended early".into(),
            };
            return Err(Stop::Rollback(format!("the memory stream failed: {why}")));
        }
        self.vmm
            .continue_migration()
            .map_err(|e| Stop::Rollback(format!("migrate-continue: {e}")))?;
        self.armed = true;
        self.send_decision_request(None);
        Ok(())
    }

    /// Sends `Commit` (or, once the source wants out, `Abort`) on the current session,
    /// when the last one went on another session or [`COMMIT_RESEND`] ago.
    fn send_decision_request(&mut self, abort: Option<&str>) {
        let Some(port) = self.side.port() else { return };
        let Some(session) = port.link().map(|(s, _)| s) else {
            return;
        };
        let due = match self.asked_on {
            Some((on, at)) => session != on || at.elapsed() >= COMMIT_RESEND,
            None => true,
        };
        if !due {
            return;
        }
        let id = self.plan.id;
        let message = match abort {
            None => MigrationMessage::Commit { id },
            Some(reason) => MigrationMessage::Abort {
                id,
                reason: reason.to_string(),
            },
        };
        match port.send(&message) {
            Ok(()) => self.asked_on = Some((session, Instant::now())),
            Err(e) => {
                warn!(error = %e, "cannot ask the destination to decide; the VM stays paused")
            }
        }
    }

    fn paused_ms(&self) -> f64 {
        self.paused_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3)
    }

    /// Phase 5: wait for the destination's decision for as long as it takes. The VM stays
    /// paused here: it may already run there. `completing` while all looks well;
    /// `in-doubt` while the link is down, or once the source asked to abort (cancel, or no
    /// decision within [`DECISION_TIMEOUT`]) and has no answer.
    fn decide(&mut self) -> Step<()> {
        let id = self.plan.id;
        let deadline = Instant::now() + DECISION_TIMEOUT;
        let mut abort: Option<String> = None;
        loop {
            if abort.is_none() {
                if self.cancel.load(Ordering::Relaxed) {
                    abort = Some("cancelled".into());
                } else if Instant::now() >= deadline {
                    abort = Some(format!("no decision within {DECISION_TIMEOUT:?}"));
                }
                if abort.is_some() {
                    // Ask at once, whatever was sent before.
                    self.asked_on = None;
                }
            }
            self.send_decision_request(abort.as_deref());
            let port = self.side.port();
            if let Some(port) = &port {
                while let Some(m) = port.recv(Duration::ZERO) {
                    match m {
                        MigrationMessage::Committed { id: i } if i == id => {
                            lock(&self.status).switchover_ms = Some(self.paused_ms());
                            info!(
                                switchover_ms = self.paused_ms(),
                                "committed: the VM runs on the destination"
                            );
                            return Ok(());
                        }
                        MigrationMessage::Refused { id: i, reason } if i == id => {
                            return Err(Stop::Rollback(format!(
                                "the destination refused the commit: {reason}"
                            )));
                        }
                        MigrationMessage::Failed { id: i, reason } if i == id => {
                            // It gave up receiving; only its recorded answer to Abort
                            // lets this VM run again.
                            warn!(%reason, "the destination gave up; asking it to record the abort");
                            if abort.is_none() {
                                abort = Some(format!("the destination gave up: {reason}"));
                                self.asked_on = None;
                                self.send_decision_request(abort.as_deref());
                            }
                        }
                        other => warn!(?other, "unexpected migration message; ignored"),
                    }
                }
            }
            // A destination that refuses replication because it was promoted may run the
            // VM: it only promotes on a commit (or an operator's promote). Either way
            // this VM must never run again.
            if let Some(r) = self.side.replication() {
                if r.superseded
                    || r.state
                        == SourceState::Refused(crate::replication::wire::RefuseReason::Promoted)
                {
                    lock(&self.status).switchover_ms = Some(self.paused_ms());
                    info!("the destination was promoted: the VM runs there");
                    return Ok(());
                }
            }
            let link_up = port.as_ref().is_some_and(|p| p.link().is_some());
            self.set_phase(if link_up && abort.is_none() {
                Phase::Completing
            } else {
                Phase::InDoubt
            });
            // No QMP here: QEMU holds its big lock while it writes its last pages, so a
            // query would wait as long as the link does (and a cut link, for ever).
            self.tick_status(None);
            let session = self.asked_on.map_or(0, |(s, _)| s);
            match &port {
                Some(port) => port.wait_change(session, DECIDE_POLL),
                None => thread::sleep(DECIDE_POLL),
            }
        }
    }

    /// After the commit: the source QEMU hears from the return path that the destination
    /// loaded the state and ends its migration (`postmigrate`; its guest stays stopped).
    /// One that cannot hear it (the link went down just after the commit) would, the
    /// moment its socket closed, count the migration as failed and start its guest
    /// again, so it is stopped instead.
    fn finish(&mut self) {
        match self
            .vmm
            .wait_migration_status(&[MigrationStatus::Completed], SOURCE_COMPLETED_WAIT)
        {
            Ok(info) => self.tick_status(Some(&info)),
            Err(e) => {
                warn!(error = %e, "the source VMM did not end its migration after the commit; stopping it so that it never runs the guest again");
                if let Err(e) = self.vmm.terminate() {
                    warn!(error = %e, "cannot stop the source VMM: do not resume it, the VM runs on the destination");
                }
            }
        }
        if let Some(stream) = self.stream.take() {
            self.record_after_stop(stream.monitor().progress().local_to_peer_bytes);
            stream.monitor().release_vmm_socket();
        }
    }

    /// Brings the VM back here: the destination will never run it.
    fn rollback(&mut self, why: &str) -> Result<(), String> {
        let id = self.plan.id;
        if self.armed {
            // Only the destination's recorded refusal gets here once `Commit` went out.
            info!(reason = %why, "the destination refused: the VM runs here again");
        }
        if let Some(stream) = self.stream.take() {
            stream.monitor().abort(why);
        }
        if self.phase() != Phase::Disk {
            if let Err(e) = self.vmm.cancel_migration() {
                warn!(error = %e, "migrate_cancel");
            }
            if let Some(port) = self.side.port() {
                let abort = MigrationMessage::Abort {
                    id,
                    reason: why.to_string(),
                };
                if let Err(e) = port.send(&abort) {
                    warn!(error = %e, "cannot tell the destination to discard");
                }
            }
        }
        // The demote is taken back before the fence is lifted, so the destination hears
        // it before any later write.
        self.side.undemote();
        let deadline = Instant::now() + RESUME_TIMEOUT;
        while self.side.replication().is_some_and(|r| r.demoted) {
            if Instant::now() >= deadline {
                return Err("replication did not take the demote back".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.side.unfence();
        // A cancel at pre-switchover resumes the VM by itself; after `completed` it stays
        // `postmigrate` and must be told.
        let state = self.vmm.run_state().map_err(|e| e.to_string())?;
        match state {
            RunState::Running => {}
            RunState::FinishMigrate => {
                // Cancelling: QEMU resumes it in a moment.
                self.vmm
                    .wait_run_state(
                        &[RunState::Running, RunState::PostMigrate, RunState::Paused],
                        RESUME_TIMEOUT,
                    )
                    .map_err(|e| e.to_string())?;
                if self.vmm.run_state().map_err(|e| e.to_string())? != RunState::Running {
                    self.vmm.resume().map_err(|e| e.to_string())?;
                }
            }
            _ => self.vmm.resume().map_err(|e| e.to_string())?,
        }
        self.vmm
            .wait_run_state(&[RunState::Running], RESUME_TIMEOUT)
            .map_err(|e| e.to_string())?;
        info!("rolled back: the VM runs on the source");
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_switchover_rate_is_told_when_it_moved_and_never_after_a_refusal() {
        let mut r = SwitchoverRate::default();
        // Nothing measured: nothing to tell.
        assert_eq!(r.update(0), None);
        assert_eq!(r.update(20_000_000), Some(20_000_000));
        // Within 10 %: not worth a command.
        assert_eq!(r.update(21_900_000), None);
        assert_eq!(r.update(18_100_000), None);
        assert_eq!(r.update(22_000_000), Some(22_000_000));
        assert_eq!(r.update(0), None);
        r.give_up();
        assert_eq!(r.update(5_000_000), None);
    }

    #[test]
    fn qemu_gets_the_downtime_target_less_the_links_part() {
        const MS: u64 = 1_000_000;
        let mut b = DowntimeBudget::new(500);
        // No RTT yet: only the fixed part comes off.
        assert_eq!(b.update(None), Some(500 - SWITCHOVER_FIXED_MS));
        // An idle 100 ms path: half of it (the last page's trip) comes off as well.
        assert_eq!(
            b.update(Some(100 * MS)),
            Some(500 - 50 - SWITCHOVER_FIXED_MS)
        );
        // A queue of 60 ms builds: it comes off too.
        assert_eq!(
            b.update(Some(160 * MS)),
            Some(500 - 110 - SWITCHOVER_FIXED_MS)
        );
        // A move under 20 ms is not told; the path's RTT is still the lowest seen.
        assert_eq!(b.update(Some(170 * MS)), None);
        assert_eq!(b.told_ms, 500 - 110 - SWITCHOVER_FIXED_MS);
        // A queue longer than the whole budget: QEMU still gets its floor.
        assert_eq!(b.update(Some(900 * MS)), Some(VMM_DOWNTIME_LIMIT_MS_MIN));
        // A target below the floor is the target: strait never asks QEMU for more.
        let mut small = DowntimeBudget::new(50);
        assert_eq!(small.update(Some(900 * MS)), Some(50));
    }

    #[test]
    fn windowed_rates_do_not_read_a_burst_as_the_link() {
        let t0 = Instant::now();
        let mut w = Windowed::<1>::default();
        let ms = Duration::from_millis;
        // 10 MB/s, sampled every 500 ms...
        for k in 0..8u64 {
            w.push(t0 + ms(500 * k), [k * 5_000_000]);
        }
        assert_eq!(w.rate(0, LINK_WINDOW), 10_000_000);
        // ...then a burst of acknowledgements 10 ms after the last sample: between two
        // samples that reads 1 GB/s; over the window it barely moves.
        w.push(t0 + ms(3510), [35_000_000 + 1_000_000]);
        let r = w.rate(0, LINK_WINDOW);
        assert!((10_000_000..=11_000_000).contains(&r), "{r}");
        // Too short a span says nothing rather than something wrong.
        let mut fresh = Windowed::<1>::default();
        fresh.push(t0, [0]);
        fresh.push(t0 + ms(10), [1_000_000]);
        assert_eq!(fresh.rate(0, LINK_WINDOW), 0);
    }

    #[test]
    fn the_window_keeps_its_base_and_stays_bounded() {
        let t0 = Instant::now();
        let mut w = Windowed::<1>::default();
        for k in 0..1000u64 {
            w.push(t0 + Duration::from_millis(10 * k), [k]);
        }
        assert!(w.samples.len() <= WINDOW_SAMPLES_MAX);
        // 100 per second over the last second and the last two, however often sampled.
        assert_eq!(w.rate(0, CLASS_WINDOW), 100);
        assert_eq!(w.rate(0, LINK_WINDOW), 100);
        let span = w.samples.back().unwrap().0 - w.samples.front().unwrap().0;
        assert!(span >= LINK_WINDOW, "{span:?}");
        assert!(span <= LINK_WINDOW + SAMPLE_SPACING_MIN * 2, "{span:?}");
    }
}
