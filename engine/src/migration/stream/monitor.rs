//! What a running memory stream reports, and how it is stopped from outside: counters,
//! rates and phase for a progress bar, and [`StreamMonitor::abort`].

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::StreamId;

/// The window the rates are measured over: long enough to smooth the link's bursts (TCP
/// sends in round trips of 100–250 ms), short enough that a progress bar follows a change
/// within a second.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Samples kept per rate: one per [`RATE_SAMPLE_SPACING`] over [`RATE_WINDOW`], plus the
/// one at the window's start and the newest.
const RATE_SAMPLES_MAX: usize = 12;

/// Samples closer than this replace the newest one instead of adding a sample, so a busy
/// pump does not need more than [`RATE_SAMPLES_MAX`] to cover the window.
const RATE_SAMPLE_SPACING: Duration = Duration::from_millis(100);

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamPhase {
    /// Source: waiting for the VMM to connect. Destination: waiting for `Start`.
    Waiting = 0,
    /// Destination: connecting to the VMM's socket.
    Connecting = 1,
    /// Bytes flow both ways.
    Streaming = 2,
    /// One direction has ended; waiting for the other.
    Ending = 3,
    /// Both directions ended and the destination confirmed it loaded the state.
    Done = 4,
    /// The stream failed or was aborted.
    Failed = 5,
}

impl StreamPhase {
    fn from_u8(value: u8) -> StreamPhase {
        match value {
            0 => StreamPhase::Waiting,
            1 => StreamPhase::Connecting,
            2 => StreamPhase::Streaming,
            3 => StreamPhase::Ending,
            4 => StreamPhase::Done,
            _ => StreamPhase::Failed,
        }
    }

    /// The name used in logs and the control API.
    pub fn name(self) -> &'static str {
        match self {
            StreamPhase::Waiting => "waiting",
            StreamPhase::Connecting => "connecting",
            StreamPhase::Streaming => "streaming",
            StreamPhase::Ending => "ending",
            StreamPhase::Done => "done",
            StreamPhase::Failed => "failed",
        }
    }
}

/// A snapshot of a stream's counters. "Local" is this side's VMM, "peer" the other
/// engine: on the source, `local_to_peer` is the migration stream and `peer_to_local` the
/// return path; on the destination the other way round.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamProgress {
    /// Where the stream is.
    pub phase: StreamPhase,
    /// The stream's id, once known (the destination learns it from `Start`).
    pub stream: Option<StreamId>,
    /// VMM bytes read from the local socket and handed to the link.
    pub local_to_peer_bytes: u64,
    /// VMM bytes received from the link and written to the local socket.
    pub peer_to_local_bytes: u64,
    /// `local_to_peer_bytes` per second over the last [`RATE_WINDOW`].
    pub local_to_peer_bytes_per_s: u64,
    /// `peer_to_local_bytes` per second over the last [`RATE_WINDOW`].
    pub peer_to_local_bytes_per_s: u64,
    /// Time the relay left the local VMM's bytes unread because the link had no room for
    /// more: after a few hundred KiB of socket buffer, the VMM was blocked writing for
    /// about this long. The back-pressure that makes its rate estimate see the WAN.
    pub local_held_back: Duration,
    /// Time the relay spent writing into the local VMM's socket (long when that VMM reads
    /// slower than the link delivers).
    pub local_write_wait: Duration,
    /// Messages of other streams discarded (leftovers of an aborted one).
    pub stale_messages: u64,
}

/// Cumulative bytes at a few instants, for a rate over a sliding window.
#[derive(Debug, Default)]
struct RateMeter {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn sample(&mut self, now: Instant, bytes: u64) {
        let n = self.samples.len();
        // The newest sample moves forward while it is within the spacing of the one
        // before it, so the samples stay spaced and their number bounded.
        if n >= 2 && now.duration_since(self.samples[n - 2].0) < RATE_SAMPLE_SPACING {
            self.samples[n - 1] = (now, bytes);
        } else {
            self.samples.push_back((now, bytes));
        }
        // Keep one sample at or before the window's start, so the window is covered.
        let horizon = now.checked_sub(RATE_WINDOW);
        while self.samples.len() > RATE_SAMPLES_MAX
            || (self.samples.len() >= 2 && horizon.is_some_and(|h| self.samples[1].0 <= h))
        {
            self.samples.pop_front();
        }
    }

    fn rate_bytes_per_s(&self) -> u64 {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return 0;
        };
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        if seconds <= 0.0 {
            return 0;
        }
        (last.1.saturating_sub(first.1) as f64 / seconds) as u64
    }
}

#[derive(Debug, Default)]
pub(super) struct MonitorInner {
    phase: AtomicU8,
    has_stream: AtomicBool,
    stream: AtomicU32,
    pub(super) local_to_peer_bytes: AtomicU64,
    pub(super) peer_to_local_bytes: AtomicU64,
    pub(super) held_back_ns: AtomicU64,
    pub(super) local_write_wait_ns: AtomicU64,
    pub(super) stale_messages: AtomicU64,
    aborted: AtomicBool,
    abort_reason: Mutex<Option<String>>,
    /// A handle on the VMM socket while the relay owns it, so `abort` can shut it and
    /// unblock the relay's threads at once.
    local: Mutex<Option<UnixStream>>,
    /// Set by [`StreamMonitor::hold_vmm_socket`]: a failure leaves the VMM's socket open.
    holding: AtomicBool,
    /// The VMM's socket kept open after the relay ended, while holding.
    held: Mutex<Option<UnixStream>>,
    /// The return path carried the destination's `SHUT 0`, and this end passed it on.
    loaded: AtomicBool,
    /// Local-to-peer, peer-to-local.
    rates: Mutex<[RateMeter; 2]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked relay thread leaves plain counters behind: carry on with them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watches and controls one memory stream; cheap to clone, shareable between threads. Use a
/// new one for each stream: the counters are cumulative, and an abort is final.
#[derive(Debug, Clone, Default)]
pub struct StreamMonitor {
    pub(super) inner: Arc<MonitorInner>,
}

impl StreamMonitor {
    /// A monitor for a stream that has not started.
    pub fn new() -> StreamMonitor {
        StreamMonitor::default()
    }

    /// The counters now.
    pub fn progress(&self) -> StreamProgress {
        let i = &*self.inner;
        let local_to_peer_bytes = i.local_to_peer_bytes.load(Ordering::Relaxed);
        let peer_to_local_bytes = i.peer_to_local_bytes.load(Ordering::Relaxed);
        let (up_rate, down_rate) = {
            let mut rates = lock(&i.rates);
            let now = Instant::now();
            rates[0].sample(now, local_to_peer_bytes);
            rates[1].sample(now, peer_to_local_bytes);
            (rates[0].rate_bytes_per_s(), rates[1].rate_bytes_per_s())
        };
        StreamProgress {
            phase: self.phase(),
            stream: i
                .has_stream
                .load(Ordering::Acquire)
                .then(|| i.stream.load(Ordering::Relaxed)),
            local_to_peer_bytes,
            peer_to_local_bytes,
            local_to_peer_bytes_per_s: up_rate,
            peer_to_local_bytes_per_s: down_rate,
            local_held_back: Duration::from_nanos(i.held_back_ns.load(Ordering::Relaxed)),
            local_write_wait: Duration::from_nanos(i.local_write_wait_ns.load(Ordering::Relaxed)),
            stale_messages: i.stale_messages.load(Ordering::Relaxed),
        }
    }

    /// Where the stream is.
    pub fn phase(&self) -> StreamPhase {
        StreamPhase::from_u8(self.inner.phase.load(Ordering::Acquire))
    }

    /// Stops the stream: the relay closes the VMM's socket (the VMM sees its migration
    /// fail), tells the peer engine `Abort { reason }`, and its `run` returns
    /// [`super::StreamError::Aborted`]. Also stops a stream still waiting to begin. The
    /// first reason wins.
    pub fn abort(&self, reason: &str) {
        {
            let mut r = lock(&self.inner.abort_reason);
            if r.is_none() {
                *r = Some(reason.to_owned());
            }
        }
        self.inner.aborted.store(true, Ordering::Release);
        if let Some(sock) = lock(&self.inner.local).as_ref() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        self.release_vmm_socket();
    }

    /// From now on a failure of the stream does not end the VMM's migration: the relay
    /// stops, but the VMM's socket stays open (held here) until
    /// [`StreamMonitor::release_vmm_socket`] or [`StreamMonitor::abort`].
    ///
    /// Why: a source QEMU whose migration fails after it stopped the guest starts the
    /// guest again by itself. Once the destination may commit on its own (after
    /// `migrate-continue`), that would make two running copies; held, the source QEMU
    /// waits at the end of its migration until the outcome is known.
    pub fn hold_vmm_socket(&self) {
        self.inner.holding.store(true, Ordering::Release);
    }

    /// Ends a hold: the VMM's socket, if the relay left it open, is closed now (a VMM
    /// still migrating sees its migration fail).
    pub fn release_vmm_socket(&self) {
        self.inner.holding.store(false, Ordering::Release);
        if let Some(sock) = lock(&self.inner.held).take() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether the destination VMM confirmed it loaded everything (its return path
    /// carried `SHUT 0`) and this end passed that on: on the destination, as soon as the
    /// confirmation is on the link, before the stream's last `End` comes back.
    pub fn loaded(&self) -> bool {
        self.inner.loaded.load(Ordering::Acquire)
    }

    /// The reason given to [`StreamMonitor::abort`], once it was called.
    pub fn abort_reason(&self) -> Option<String> {
        if !self.inner.is_aborted() {
            return None;
        }
        self.inner.abort_reason()
    }
}

impl MonitorInner {
    pub(super) fn set_phase(&self, phase: StreamPhase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub(super) fn set_stream(&self, stream: StreamId) {
        self.stream.store(stream, Ordering::Relaxed);
        self.has_stream.store(true, Ordering::Release);
    }

    pub(super) fn abort_reason(&self) -> Option<String> {
        lock(&self.abort_reason).clone()
    }

    pub(super) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Hands the monitor a handle on the VMM socket (shut at once if already aborted).
    pub(super) fn attach_local(&self, sock: UnixStream) {
        let mut local = lock(&self.local);
        if self.is_aborted() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        *local = Some(sock);
    }

    /// Takes back the handle on the VMM socket; while holding, keeps it open instead.
    pub(super) fn detach_local(&self) {
        let sock = lock(&self.local).take();
        if self.is_holding() {
            *lock(&self.held) = sock;
        }
    }

    pub(super) fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    pub(super) fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Adds bytes moved one way and samples that way's rate.
    pub(super) fn count(&self, local_to_peer: bool, bytes: u64) {
        let (counter, index) = if local_to_peer {
            (&self.local_to_peer_bytes, 0)
        } else {
            (&self.peer_to_local_bytes, 1)
        };
        let total = counter.fetch_add(bytes, Ordering::Relaxed) + bytes;
        lock(&self.rates)[index].sample(Instant::now(), total);
    }

    pub(super) fn add_ns(counter: &AtomicU64, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_window() {
        let mut meter = RateMeter::default();
        let start = Instant::now();
        // 10 MB/s for 3 s, sampled every 10 ms.
        for step in 0..=300u64 {
            meter.sample(start + Duration::from_millis(step * 10), step * 100_000);
            assert!(meter.samples.len() <= RATE_SAMPLES_MAX);
        }
        let rate = meter.rate_bytes_per_s();
        assert!((9_500_000..=10_500_000).contains(&rate), "{rate}");
        // Then idle for 2 s: the rate falls to zero once the window has passed.
        meter.sample(start + Duration::from_secs(5), 300 * 100_000);
        meter.sample(start + Duration::from_millis(5_200), 300 * 100_000);
        assert_eq!(meter.rate_bytes_per_s(), 0);
    }

    #[test]
    fn no_samples_no_rate() {
        assert_eq!(RateMeter::default().rate_bytes_per_s(), 0);
    }

    #[test]
    fn abort_keeps_the_first_reason() {
        let monitor = StreamMonitor::new();
        assert_eq!(monitor.abort_reason(), None);
        monitor.abort("first");
        monitor.abort("second");
        assert_eq!(monitor.abort_reason().as_deref(), Some("first"));
        assert!(monitor.inner.is_aborted());
    }
}
