//! The forwarder: per direction, a reader thread that takes packets off the sending TUN
//! device and runs them through the [`Path`] model, a bounded delay line sorted by due
//! time, and a release thread that sleeps until the head packet is due and writes it into
//! the receiving TUN device.
//!
//! Because the model never lets a packet be due before the one ahead of it, the delay line
//! is a FIFO: the release thread only ever looks at its head, and a reader only has to wake
//! the release thread when the line was empty.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{debug, error, warn};

use super::gso::{Plan, FRAME_BYTES_MAX};
use super::path::{Path, PathParams, Verdict, NS_PER_S, QUEUE_BYTES_MIN};
use super::sys::{self, StopEvent};
use super::{DirectionStats, WanemError};

/// A reader takes at most this many packets per wake-up before handing them to the delay
/// line, so one lock covers a burst without delaying the first packet of a long one.
const READ_BATCH: usize = 64;

/// A release thread writes at most this many due packets per lock, for the same reason.
const RELEASE_BATCH: usize = 64;

/// Readers wake at least this often to notice a stop even if the stop event were missed.
const READER_POLL_TIMEOUT_MS: i32 = 100;

/// A release thread sleeping towards a far head (a 10 s RTT) wakes this often to notice a
/// stop; 50 ms keeps `stop` quick without costing anything measurable.
const RELEASE_STOP_CHECK_NS: u64 = 50_000_000;

/// Timer slack for release threads: wake exactly when asked.
const RELEASE_TIMER_SLACK_NS: u64 = 1;

/// What a queued packet costs the delay line beyond its bytes: the Vec header, the
/// allocator's rounding and the deque slot. Counting it bounds the memory of a line full of
/// 40-byte ACKs too.
const PACKET_OVERHEAD_BYTES: u64 = 64;

/// For a path without a rate limit, the delay line is sized as if the link ran at
/// 10 Gbit/s: more than a user-space forwarder on this kind of machine can move, so the
/// line is never the bottleneck.
const UNLIMITED_RATE_ASSUMED_BITS_PER_S: u64 = 10_000_000_000;

/// The delay line also holds what arrives while its release thread waits for a CPU: on two
/// busy cores that wait was measured at up to tens of milliseconds (see the stats'
/// `release_late_us_max`); 50 ms of traffic at the line's rate covers it.
const RELEASE_LATENCY_ALLOWANCE_NS: u64 = 50_000_000;

/// The delay line of one direction never holds more than 1 GiB: two directions then use at
/// most a tenth of the 24 GiB machine, whatever the RTT and rate asked for.
const DELAY_LINE_BYTES_MAX: u64 = 1 << 30;

/// The live counters of one direction, shared between its threads and `stats()`.
#[derive(Default)]
pub(crate) struct Counters {
    packets_forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_overload: AtomicU64,
    segments_rebuilt: AtomicU64,
    write_errors: AtomicU64,
    queue_delay_ns_max: AtomicU64,
    release_late_ns_max: AtomicU64,
    release_late_ns_sum: AtomicU64,
    reader_tid: AtomicI32,
    release_tid: AtomicI32,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> DirectionStats {
        let packets = self.packets_forwarded.load(Ordering::Relaxed);
        let late_sum = self.release_late_ns_sum.load(Ordering::Relaxed);
        let cpu = |tid: &AtomicI32| match tid.load(Ordering::Relaxed) {
            0 => None,
            tid => sys::thread_cpu_ms(tid),
        };
        DirectionStats {
            packets_forwarded: packets,
            bytes_forwarded: self.bytes_forwarded.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            dropped_cut: self.dropped_cut.load(Ordering::Relaxed),
            dropped_overload: self.dropped_overload.load(Ordering::Relaxed),
            // Counted by the kernel, not here; the caller fills it in.
            dropped_tun_queue: 0,
            segments_rebuilt: self.segments_rebuilt.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            queue_delay_us_max: self.queue_delay_ns_max.load(Ordering::Relaxed) / 1000,
            release_late_us_max: self.release_late_ns_max.load(Ordering::Relaxed) / 1000,
            release_late_us_mean: late_sum.checked_div(packets).unwrap_or(0) / 1000,
            reader_cpu_ms: cpu(&self.reader_tid),
            release_cpu_ms: cpu(&self.release_tid),
        }
    }
}

/// A frame in the delay line: a virtio-net header and one IP packet, which may be a TCP
/// super-packet standing for several wire packets.
struct Packet {
    due_ns: u64,
    data: Vec<u8>,
    /// Wire packets it stands for.
    segments: u64,
    /// Their IP bytes.
    wire_bytes: u64,
}

impl Packet {
    fn cost_bytes(&self) -> u64 {
        self.data.len() as u64 + PACKET_OVERHEAD_BYTES
    }
}

struct LineState {
    /// Invariant: sorted by `due_ns` (the path model never releases out of order).
    packets: VecDeque<Packet>,
    /// Invariant: the sum of `cost_bytes()` over `packets`. A frame is admitted only while
    /// this is below the line's limit, so it exceeds the limit by at most one frame split
    /// into segments.
    bytes: u64,
    stopping: bool,
}

/// The bounded FIFO between a reader and a release thread.
struct DelayLine {
    state: Mutex<LineState>,
    not_empty: Condvar,
    bytes_max: u64,
}

impl DelayLine {
    fn new(bytes_max: u64) -> DelayLine {
        DelayLine {
            state: Mutex::new(LineState {
                packets: VecDeque::new(),
                bytes: 0,
                stopping: false,
            }),
            not_empty: Condvar::new(),
            bytes_max,
        }
    }

    /// A poisoned lock means the other thread of this direction panicked; the state is
    /// still consistent (every update is a push or pop), so keep going.
    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stop(&self) {
        self.lock().stopping = true;
        self.not_empty.notify_all();
    }

    /// The size of the line for a path: everything the bottleneck queue and the wire
    /// (propagation plus the largest jitter) can hold at once.
    fn bytes_for(params: &PathParams) -> u64 {
        let rate = match params.rate_bits_per_s {
            0 => UNLIMITED_RATE_ASSUMED_BITS_PER_S,
            rate => rate,
        };
        let in_flight_ns = params
            .one_way_ns
            .saturating_add(params.jitter_ns_max)
            .saturating_add(RELEASE_LATENCY_ALLOWANCE_NS);
        let in_flight_bytes =
            u128::from(rate) * u128::from(in_flight_ns) / 8 / u128::from(NS_PER_S);
        let in_flight_bytes = u64::try_from(in_flight_bytes).unwrap_or(u64::MAX);
        // The queue and the line both count packets by wire bytes, the line adds overhead:
        // double the sum leaves room for a line full of the smallest packets' overhead.
        in_flight_bytes
            .saturating_add(params.queue_bytes_max.max(QUEUE_BYTES_MIN))
            .saturating_mul(2)
            .min(DELAY_LINE_BYTES_MAX)
    }
}

/// One direction's fixed wiring.
/// A link cut ordered while the emulator runs ([`super::Wanem::cut`]), shared by both
/// directions: every packet entering the link in `start_ns..end_ns` (emulator time) is
/// lost, as with a scheduled cut.
#[derive(Debug, Default)]
pub(crate) struct CutControl {
    start_ns: AtomicU64,
    end_ns: AtomicU64,
}

impl CutControl {
    /// Cuts the link during `start_ns..end_ns` (replacing an earlier ordered cut).
    pub(crate) fn set(&self, start_ns: u64, end_ns: u64) {
        // Close the window first, so a reader never sees the new start with an old end.
        self.end_ns.store(0, Ordering::SeqCst);
        self.start_ns.store(start_ns, Ordering::SeqCst);
        self.end_ns.store(end_ns, Ordering::SeqCst);
    }

    fn contains(&self, now_ns: u64) -> bool {
        let start = self.start_ns.load(Ordering::Relaxed);
        let end = self.end_ns.load(Ordering::Relaxed);
        (start..end).contains(&now_ns)
    }
}

struct Direction {
    name: &'static str,
    /// A cut ordered at run time.
    cut: Arc<CutControl>,
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    line: DelayLine,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    stop_event: Arc<StopEvent>,
    /// CLOCK_MONOTONIC at the emulator's time zero.
    epoch_ns: u64,
}

/// The running threads of both directions; stopped and joined on drop.
pub(crate) struct Forwarder {
    threads: Vec<JoinHandle<()>>,
    directions: Vec<Arc<Direction>>,
    stop: Arc<AtomicBool>,
    stop_event: Arc<StopEvent>,
}

/// What the forwarder needs to start one direction.
pub(crate) struct DirectionSpec {
    pub(crate) name: &'static str,
    pub(crate) params: PathParams,
    pub(crate) counters: Arc<Counters>,
}

impl Forwarder {
    /// Starts forwarding `tun_a` → `tun_b` with `a_to_b` and back with `b_to_a`. Time zero
    /// of both paths (where a scheduled cut is measured from) is `epoch_ns`.
    pub(crate) fn start(
        tun_a: OwnedFd,
        tun_b: OwnedFd,
        a_to_b: DirectionSpec,
        b_to_a: DirectionSpec,
        epoch_ns: u64,
        cut: Arc<CutControl>,
    ) -> Result<Forwarder, WanemError> {
        let stop_event =
            Arc::new(StopEvent::new().map_err(|source| WanemError::EventFd { source })?);
        let stop = Arc::new(AtomicBool::new(false));
        let tun_a = Arc::new(tun_a);
        let tun_b = Arc::new(tun_b);
        let mut forwarder = Forwarder {
            threads: Vec::new(),
            directions: Vec::new(),
            stop,
            stop_event,
        };
        for (spec, from, to) in [
            (a_to_b, tun_a.clone(), tun_b.clone()),
            (b_to_a, tun_b, tun_a),
        ] {
            let line = DelayLine::new(DelayLine::bytes_for(&spec.params));
            debug!(direction = spec.name, line_bytes_max = line.bytes_max, params = ?spec.params, "path");
            let direction = Arc::new(Direction {
                name: spec.name,
                cut: cut.clone(),
                from,
                to,
                line,
                counters: spec.counters,
                stop: forwarder.stop.clone(),
                stop_event: forwarder.stop_event.clone(),
                epoch_ns,
            });
            forwarder.directions.push(direction.clone());
            // On an error here, dropping `forwarder` stops the threads already running.
            let path = Path::new(spec.params);
            forwarder.spawn(format!("wanem-rd-{}", spec.name), {
                let direction = direction.clone();
                move || run_reader(&direction, path)
            })?;
            forwarder.spawn(format!("wanem-tx-{}", spec.name), move || {
                run_release(&direction)
            })?;
        }
        Ok(forwarder)
    }

    fn spawn(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), WanemError> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(body)
            .map_err(|source| WanemError::SpawnThread { name, source })?;
        self.threads.push(handle);
        Ok(())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(err) = self.stop_event.signal() {
            // The readers still notice the flag within READER_POLL_TIMEOUT_MS.
            warn!(error = %err, "could not signal the forwarder's stop event");
        }
        for direction in &self.directions {
            direction.line.stop();
        }
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                error!("a forwarder thread panicked");
            }
        }
    }
}

fn run_reader(direction: &Direction, mut path: Path) {
    let counters = &direction.counters;
    counters
        .reader_tid
        .store(sys::thread_id(), Ordering::Relaxed);
    let fd = direction.from.as_raw_fd();
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    // Frames read in this wake-up, with their arrival times.
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(READ_BATCH);
    let mut scratch = Scratch::default();
    while !direction.stop.load(Ordering::Relaxed) {
        while batch.len() < READ_BATCH {
            match sys::read_packet(fd, &mut buf) {
                Ok(Some(len)) => batch.push((sys::monotonic_ns(), buf[..len].to_vec())),
                Ok(None) => break,
                Err(err) => {
                    // The device is gone (or broken); nothing more will come from it.
                    error!(direction = direction.name, error = %err, "TUN read failed, reader stops");
                    return;
                }
            }
        }
        if batch.is_empty() {
            if let Err(err) = direction.stop_event.poll_with(fd, READER_POLL_TIMEOUT_MS) {
                error!(direction = direction.name, error = %err, "poll failed, reader stops");
                return;
            }
            continue;
        }
        admit_batch(direction, &mut path, &mut batch, &mut scratch);
    }
}

/// Scratch space a reader reuses from batch to batch.
#[derive(Default)]
struct Scratch {
    /// The segments of one frame that the path releases, with their due times.
    released: Vec<(usize, u64)>,
    /// Packets of this batch bound for the delay line.
    ready: Vec<Packet>,
}

/// Runs each wire packet of each frame of `batch` through the path and queues what
/// survives: the whole frame if all of it does, else the surviving segments cut out of it.
/// The cutting happens outside the line's lock, so the release thread never waits for it.
fn admit_batch(
    direction: &Direction,
    path: &mut Path,
    batch: &mut Vec<(u64, Vec<u8>)>,
    scratch: &mut Scratch,
) {
    let line = &direction.line;
    // The release thread only takes bytes out meanwhile, so this errs on the safe side.
    let mut line_bytes = line.lock().bytes;
    let Scratch { released, ready } = scratch;
    for (arrival_ns, frame) in batch.drain(..) {
        let now_ns = arrival_ns.saturating_sub(direction.epoch_ns);
        let has_room = line_bytes + frame.len() as u64 + PACKET_OVERHEAD_BYTES <= line.bytes_max;
        let plan = Plan::of(&frame);
        let count = plan.count();
        released.clear();
        for index in 0..count {
            if let Some(due_ns) =
                admit_one(direction, path, now_ns, plan.wire_bytes(index), has_room)
            {
                released.push((index, due_ns.saturating_add(direction.epoch_ns)));
            }
        }
        let ready_before = ready.len();
        match (plan, released.last()) {
            (_, None) => {}
            // All of it survives: deliver it whole when its last wire packet is due.
            (_, Some(&(_, due_ns))) if released.len() == count => {
                let wire_bytes = (0..count).map(|index| plan.wire_bytes(index) as u64).sum();
                ready.push(Packet {
                    due_ns,
                    data: frame,
                    segments: count as u64,
                    wire_bytes,
                });
            }
            (Plan::Tcp4(tcp), Some(_)) => {
                direction
                    .counters
                    .segments_rebuilt
                    .fetch_add(released.len() as u64, Ordering::Relaxed);
                ready.extend(released.iter().map(|&(index, due_ns)| Packet {
                    due_ns,
                    data: tcp.segment(&frame, index),
                    segments: 1,
                    wire_bytes: plan.wire_bytes(index) as u64,
                }));
            }
            // A single packet is either released or not; handled above.
            (Plan::Single { .. }, Some(_)) => {}
        }
        line_bytes += ready[ready_before..]
            .iter()
            .map(Packet::cost_bytes)
            .sum::<u64>();
    }
    if ready.is_empty() {
        return;
    }
    let mut state = line.lock();
    let was_empty = state.packets.is_empty();
    for packet in ready.drain(..) {
        state.bytes += packet.cost_bytes();
        state.packets.push_back(packet);
    }
    drop(state);
    // The release thread only waits on the condvar when the line is empty; otherwise it is
    // asleep until the head is due, and new packets are never due before the head.
    if was_empty {
        line.not_empty.notify_one();
    }
}

/// Runs one wire packet through the path, counting a drop; returns its due time (on the
/// path's clock) if it is released.
fn admit_one(
    direction: &Direction,
    path: &mut Path,
    now_ns: u64,
    wire_bytes: usize,
    has_room: bool,
) -> Option<u64> {
    let counters = &direction.counters;
    if direction.cut.contains(now_ns) {
        counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let dropped = match path.admit(now_ns, wire_bytes, has_room) {
        Verdict::Release {
            due_ns,
            queue_delay_ns,
        } => {
            counters
                .queue_delay_ns_max
                .fetch_max(queue_delay_ns, Ordering::Relaxed);
            return Some(due_ns);
        }
        Verdict::DropLoss => &counters.dropped_loss,
        Verdict::DropQueue => &counters.dropped_queue,
        Verdict::DropCut => &counters.dropped_cut,
        Verdict::DropOverload => &counters.dropped_overload,
    };
    dropped.fetch_add(1, Ordering::Relaxed);
    None
}

fn run_release(direction: &Direction) {
    let counters = &direction.counters;
    counters
        .release_tid
        .store(sys::thread_id(), Ordering::Relaxed);
    if let Err(err) = sys::set_timer_slack_ns(RELEASE_TIMER_SLACK_NS) {
        warn!(direction = direction.name, error = %err, "cannot lower timer slack; releases may be up to 50 us late");
    }
    let fd = direction.to.as_raw_fd();
    let mut due: Vec<Packet> = Vec::with_capacity(RELEASE_BATCH);
    loop {
        if !take_due(&direction.line, &mut due) {
            return;
        }
        for packet in due.drain(..) {
            let written_ns = sys::monotonic_ns();
            match sys::write_packet(fd, &packet.data) {
                Ok(()) => {
                    let late_ns = written_ns.saturating_sub(packet.due_ns);
                    counters
                        .packets_forwarded
                        .fetch_add(packet.segments, Ordering::Relaxed);
                    counters
                        .bytes_forwarded
                        .fetch_add(packet.wire_bytes, Ordering::Relaxed);
                    counters
                        .release_late_ns_max
                        .fetch_max(late_ns, Ordering::Relaxed);
                    counters
                        .release_late_ns_sum
                        .fetch_add(late_ns * packet.segments, Ordering::Relaxed);
                }
                Err(err) => {
                    // A malformed packet or a device going down: count it, like a wire error.
                    if counters.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!(direction = direction.name, error = %err, "TUN write failed (further failures are only counted)");
                    }
                }
            }
        }
    }
}

/// Waits until the line's head is due, then moves up to `RELEASE_BATCH` due packets into
/// `out`. Returns false when the forwarder is stopping.
fn take_due(line: &DelayLine, out: &mut Vec<Packet>) -> bool {
    let mut state = line.lock();
    loop {
        if state.stopping {
            return false;
        }
        let Some(head) = state.packets.front() else {
            state = line
                .not_empty
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            continue;
        };
        let now_ns = sys::monotonic_ns();
        if head.due_ns <= now_ns {
            break;
        }
        let wake_ns = head.due_ns.min(now_ns + RELEASE_STOP_CHECK_NS);
        drop(state);
        sys::sleep_until_ns(wake_ns);
        state = line.lock();
    }
    let now_ns = sys::monotonic_ns();
    while out.len() < RELEASE_BATCH {
        match state.packets.front() {
            Some(head) if head.due_ns <= now_ns => {}
            _ => break,
        }
        if let Some(packet) = state.packets.pop_front() {
            state.bytes -= packet.cost_bytes();
            out.push(packet);
        }
    }
    true
}
