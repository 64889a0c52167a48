//! The threads that run replication over the real link and real files: the source's
//! (drain the capture shards, copy chunks, mirror writes, redial a lost link) and the
//! destination's (accept, apply, sync, confirm). The decisions are the state machines'
//! ([`ReplicaSource`], [`ReplicaDest`]); this only moves bytes.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use strait_net::protocol::Role;
use strait_net::session::tcp::{Link, LinkError};
use strait_net::session::SessionConfig;
use strait_net::tls::TlsIdentity;
use strait_net::{error_chain, StreamClass};
use tracing::{info, warn};

use crate::migration::port::Port;
use crate::migration::wire::is_migration;

use super::apply::{Applier, APPLY_DEPTH};
use super::capture::{Captured, MirrorCapture};
use super::identity::{IdentityError, ReplicaIdentity};
use super::throttle::{ControlState, Controller, PacerStats, CONTROL_INTERVAL};
use super::verify::hash_file_chunks;
use super::wire::{
    decode_payload, BatchEncoder, Message, RefuseReason, BATCH_BYTES_MAX, DATA_BYTES_MAX,
};
use super::{
    Apply, DestConfig, DestStats, PromoteError, Promoted, ReplicaDest, ReplicaSource, SourceConfig,
    SourceState, SourceStats, VerifyRefusal, VerifyReport, WriteVerdict,
};

/// Captured writes taken from each shard per round: enough to empty a shard that filled
/// during a millisecond, few enough that bulk copy and replies get their turn.
const DRAIN_BATCH: usize = 1024;

/// Longest a send waits for room in the link. The session fails by itself when the link
/// stays down past its resume window; a peer that stays connected but stops granting
/// credit for this long is treated as lost (its writes go back to the bitmap).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause of a thread that found nothing to do: short against any RTT, cheap when idle.
const IDLE_PAUSE: Duration = Duration::from_millis(1);

/// Bulk chunks a destination takes per round, between looks at the mirror: eight chunks
/// (4 MiB) keep eight writes in flight to the disk, and a mirror write waits for at most
/// that much bulk data ahead of it.
const BULK_PER_ROUND: usize = 8;

/// How long a promoted destination waits for its refusal to reach the source before it
/// closes the session: a few WAN round trips. A source that does not get it learns the
/// same when it reconnects (its `Hello` is refused).
const PROMOTED_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Between two attempts to reach the destination.
const REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// The destination syncs its disk and confirms at least this often while it applies:
/// confirmations free the source's mirror backlog, so they must not wait long, and a
/// `fdatasync` per 10 ms is cheap next to the WAN round trip.
const SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// What the engine reports about a running replication.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    pub to: SocketAddr,
    pub state: SourceState,
    pub stats: SourceStats,
    pub mirror_backlog_bytes: u64,
    /// Writes that found their capture shard full and went to the bitmap.
    pub overflowed_writes: u64,
    /// Guest mutations captured, and how many of them this status already accounts for:
    /// `state` covers every write when the two are equal.
    pub captured_writes: u64,
    pub accounted_writes: u64,
    pub last_error: Option<String>,
    /// The disk is fenced and every write it made is handed to replication.
    pub demoted: bool,
    /// The destination was promoted: this source's disk is fenced for good.
    pub superseded: bool,
    /// The back-pressure controller's last decision, and what the pacer imposed.
    pub control: ControlState,
    pub pacer: PacerStats,
    /// The current or last verify run (see [`SourceDriver::start_verify`]).
    pub verify: Option<VerifyReport>,
    /// The cap a migration put on the guest's write rate (0: none).
    pub rate_cap_bytes_per_s: u64,
    /// A verify asked for (with `repair`) that the thread has not taken up yet.
    verify_requested: Option<bool>,
}

/// Where a source sends its disk.
pub struct SourceTarget {
    pub to: SocketAddr,
    pub tls: Option<Arc<TlsIdentity>>,
    pub connections: u16,
}

/// Fences the source's disk: called when the destination was promoted (this source is
/// superseded), from the replication thread.
pub type FenceFn = Box<dyn Fn() + Send>;

/// A running source replication thread.
pub struct SourceDriver {
    /// Chunks of the disk: what a verify compares.
    chunks: u64,
    status: Arc<Mutex<SourceStatus>>,
    stop: Arc<AtomicBool>,
    demote: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: Arc<Port>,
    /// A ceiling on the guest's write rate from outside (a migration sharing the link
    /// between memory and disk), bytes per second; 0: none.
    rate_cap: Arc<AtomicU64>,
}

impl SourceDriver {
    /// Starts replicating `image` (read from here, written by the data path) to `target`,
    /// mirroring what `capture` collects.
    pub fn start(
        image: &Path,
        config: SourceConfig,
        capture: Arc<MirrorCapture>,
        target: SourceTarget,
        fence: FenceFn,
    ) -> Result<SourceDriver, super::DriverError> {
        let file = File::open(image).map_err(|source| super::DriverError::Open {
            path: image.to_path_buf(),
            source,
        })?;
        let source = ReplicaSource::new(config)?;
        let chunks = super::chunk_count(config.disk_bytes, config.chunk_bytes)?;
        let status = Arc::new(Mutex::new(SourceStatus {
            to: target.to,
            state: source.state(),
            stats: source.stats(),
            mirror_backlog_bytes: 0,
            overflowed_writes: 0,
            captured_writes: 0,
            accounted_writes: 0,
            last_error: None,
            demoted: false,
            superseded: false,
            control: ControlState::default(),
            pacer: PacerStats::default(),
            verify: None,
            verify_requested: None,
            rate_cap_bytes_per_s: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let demote = Arc::new(AtomicBool::new(false));
        let port = Port::new();
        let rate_cap = Arc::new(AtomicU64::new(0));
        let mut runner = SourceRunner {
            rate_cap: rate_cap.clone(),
            port: port.clone(),
            demote: demote.clone(),
            fence,
            file,
            source,
            capture,
            target,
            link: None,
            status: status.clone(),
            stop: stop.clone(),
            controller: Controller::new(),
            next_control: Instant::now(),
            delivered: 0,
            link_acked: 0,
            overflow_seen: 0,
            mirror_batch: std::cell::RefCell::new(BatchEncoder::default()),
            verify: VerifyLocal::default(),
        };
        let thread = thread::Builder::new()
            .name("strait-replicate".into())
            .spawn(move || runner.run())
            .map_err(super::DriverError::Thread)?;
        Ok(SourceDriver {
            chunks,
            status,
            stop,
            demote,
            thread: Some(thread),
            port,
            rate_cap,
        })
    }

    /// Caps the rate of the guest's writes at `bytes_per_s` (0: no cap), on top of the
    /// back-pressure's own pacing: the lower of the two applies. A live migration sets it
    /// to the disk's share of the link ([`crate::migration::stun`]).
    pub fn set_rate_cap(&self, bytes_per_s: u64) {
        self.rate_cap.store(bytes_per_s, Ordering::Relaxed);
    }

    /// The migration's access to this replication's session (see [`Port`]).
    pub fn port(&self) -> Arc<Port> {
        self.port.clone()
    }

    /// Starts a verify run (see [`super::verify`]); with `repair`, chunks found different
    /// are copied again. Refused at once when the status shows no session, no full copy
    /// yet, or a run in progress; the thread takes it up within a round, and should the
    /// state have changed by then, the run's report says why it did not start.
    pub fn start_verify(&self, repair: bool) -> Result<(), VerifyRefusal> {
        let mut s = lock(&self.status);
        if s.verify.as_ref().is_some_and(VerifyReport::running) {
            return Err(VerifyRefusal::Running);
        }
        match s.state {
            SourceState::InSync | SourceState::Behind { .. } => {}
            SourceState::Copying { .. } | SourceState::Resyncing { .. } => {
                return Err(VerifyRefusal::NotCopied)
            }
            _ => return Err(VerifyRefusal::NotConnected),
        }
        s.verify = Some(VerifyReport::starting(repair, self.chunks, wall_ns()));
        s.verify_requested = Some(repair);
        Ok(())
    }

    /// A snapshot of where replication stands.
    pub fn status(&self) -> SourceStatus {
        lock(&self.status).clone()
    }

    /// The caller fenced the disk, and every mutation it will ever make is captured:
    /// replication drains what is left and tells the destination its replica is complete.
    pub fn demote(&self) {
        self.demote.store(true, Ordering::Release);
    }

    /// Takes a [`Self::demote`] back (a migration rolled back before its commit): the
    /// destination is told it is no longer complete before any later write is mirrored.
    /// The caller keeps the disk fenced until [`SourceStatus::demoted`] reads false.
    pub fn undemote(&self) {
        self.demote.store(false, Ordering::Release);
    }

    /// Stops the thread (its link closes; the destination keeps what it confirmed).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SourceDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct SourceRunner {
    file: File,
    source: ReplicaSource,
    capture: Arc<MirrorCapture>,
    target: SourceTarget,
    link: Option<Arc<Link>>,
    /// Where the migration finds the session and its messages.
    port: Arc<Port>,
    /// See [`SourceDriver::set_rate_cap`].
    rate_cap: Arc<AtomicU64>,
    status: Arc<Mutex<SourceStatus>>,
    stop: Arc<AtomicBool>,
    controller: Controller,
    next_control: Instant,
    demote: Arc<AtomicBool>,
    fence: FenceFn,
    /// Bytes the links delivered (acked by the peer), all classes, all sessions.
    delivered: u64,
    /// The current link's acked bytes at the last control tick.
    link_acked: u64,
    /// The capture's overflow mark last looked at.
    overflow_seen: u64,
    verify: VerifyLocal,
    /// Mirror messages waiting to go out together (see [`SourceRunner::send`]).
    mirror_batch: std::cell::RefCell<BatchEncoder>,
}

/// The source thread's part of verify.
#[derive(Default)]
struct VerifyLocal {
    /// Reused for reading chunks to hash.
    buf: Vec<u8>,
    /// A run the state machine refused to start after the status allowed it.
    refused: Option<VerifyReport>,
}

/// The wall clock in nanoseconds since the Unix epoch: verify reports when it started and
/// ended in it. Its only other use is the pause between verify passes, which a clock step
/// lengthens or shortens once, harmlessly.
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl SourceRunner {
    fn run(&mut self) {
        let mut next_dial = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            // A refusal (wrong disk, too small, promoted) does not fix itself: no redial.
            let refused = matches!(self.source.state(), SourceState::Refused(_));
            if self.link.is_none() && !refused && Instant::now() >= next_dial {
                self.dial();
                next_dial = Instant::now() + REDIAL_PAUSE;
            }
            let busy = match self
                .round()
                .and_then(|busy| self.flush_mirror().map(|()| busy))
            {
                Ok(busy) => busy,
                Err(e) => {
                    self.lost(&e);
                    true
                }
            };
            self.control();
            self.publish();
            if !busy {
                thread::sleep(IDLE_PAUSE);
            }
        }
        // Nothing drains any more: stop holding the guest's writes.
        self.capture.pacer().set_rate(0);
        self.port.detach();
        if let Some(link) = self.link.take() {
            link.close();
        }
    }

    fn dial(&mut self) {
        let t = &self.target;
        let config = SessionConfig::new(Role::Source);
        match Link::connect(t.to, t.connections, t.tls.as_deref(), config) {
            Ok(link) => {
                let hello = self.source.on_connected();
                match link.send(StreamClass::Control, hello.encode(), SEND_TIMEOUT) {
                    Ok(_) => {
                        info!(to = %t.to, "replication session open");
                        let link = Arc::new(link);
                        self.port.attach(link.clone());
                        self.link = Some(link);
                        self.link_acked = 0;
                    }
                    Err(e) => self.lost(&e.to_string()),
                }
            }
            Err(e) => {
                warn!(to = %t.to, error = %e, "cannot reach the destination");
                lock(&self.status).last_error = Some(error_chain(&e));
            }
        }
    }

    /// The session is gone: everything unconfirmed goes back to the bitmap.
    fn lost(&mut self, why: &str) {
        warn!(
            error = why,
            "replication session lost; changes go to the dirty bitmap"
        );
        self.port.detach();
        if let Some(link) = self.link.take() {
            link.close();
        }
        self.source.on_disconnected();
        lock(&self.status).last_error = Some(why.to_string());
    }

    /// One round: captured writes, overflowed chunks, replies, bulk copy.
    fn round(&mut self) -> Result<bool, String> {
        // A demote taken back: the destination hears it before any later write (the
        // caller keeps the disk fenced until the status shows it).
        if !self.demote.load(Ordering::Acquire) && self.source.is_demoted() {
            info!("demote taken back: the destination is told its replica is not complete");
            if let Some(m) = self.source.undemote() {
                self.send(StreamClass::Mirror, m)?;
            }
        }
        let mut captured = Vec::new();
        let drained = self.capture.drain(DRAIN_BATCH, |c| captured.push(c));
        for c in captured {
            self.mirror(c)?;
        }
        let mut overflowed = Vec::new();
        self.capture.take_overflow(|chunk| overflowed.push(chunk));
        for chunk in overflowed {
            self.source.mark_chunk_dirty(chunk);
        }
        // Demoted: once every write captured is accounted for, there will be no other.
        let (captured_total, accounted) = self.capture.counts();
        if self.demote.load(Ordering::Acquire)
            && !self.source.is_demoted()
            && captured_total == accounted
        {
            info!("demoted: the destination is told once it holds every write");
            self.source.demote();
        }
        let Some(link) = &self.link else {
            return Ok(drained > 0);
        };
        let mut replies = 0;
        while let Some(p) = link
            .recv(StreamClass::Control, Duration::ZERO)
            .map_err(err)?
        {
            let _ = link.mark_applied(StreamClass::Control, p.len() as u64);
            if is_migration(&p) {
                self.port.deliver(&p).map_err(|e| e.to_string())?;
                replies += 1;
                continue;
            }
            let message = Message::decode(&p).map_err(|e| e.to_string())?;
            self.source.on_message(message).map_err(|e| e.to_string())?;
            replies += 1;
        }
        if let SourceState::Refused(reason) = self.source.state() {
            if reason == RefuseReason::Promoted {
                self.superseded();
            }
            return Err(format!("the destination refused: {reason}"));
        }
        let mut chunks = 0;
        while let Some(job) = self.source.next_bulk() {
            let mut data = vec![0; job.len as usize];
            self.file
                .read_exact_at(&mut data, job.offset)
                .map_err(|e| format!("reading chunk {} of the disk: {e}", job.index))?;
            if data.iter().all(|&b| b == 0) {
                data = Vec::new();
            }
            let message = Message::Chunk {
                index: job.index,
                seq: job.seq,
                data,
            };
            self.send(StreamClass::Bulk, message)?;
            chunks += 1;
        }
        if let Some(m) = self.source.take_synced() {
            self.send(StreamClass::Mirror, m)?;
        }
        let verified = self.verify_round()?;
        Ok(drained + replies + chunks > 0 || verified)
    }

    /// Takes up a requested verify, and sends at most one verify request per round, so
    /// the capture rings are drained between two batches of local hashing.
    fn verify_round(&mut self) -> Result<bool, String> {
        if self.source.take_repaired() {
            self.send_unsynced()?;
        }
        let requested = lock(&self.status).verify_requested.take();
        if let Some(repair) = requested {
            let now = wall_ns();
            self.verify.refused = match self.source.start_verify(repair, now) {
                Ok(()) => None,
                Err(refusal) => Some(VerifyReport::refused(&refusal, repair, now)),
            };
        }
        if self.link.is_none() {
            return Ok(false);
        }
        let (file, buf) = (&self.file, &mut self.verify.buf);
        let next = self
            .source
            .next_verify(wall_ns(), |offset, len, chunk_bytes| {
                hash_file_chunks(file, offset, len, chunk_bytes, buf)
            });
        match next {
            Ok(Some(request)) => self.send(StreamClass::Mirror, request).map(|()| true),
            Ok(None) => Ok(false),
            Err(e) => {
                warn!(error = %e, "verify cannot read the local disk");
                self.source
                    .fail_verify(&format!("reading the local disk: {e}"));
                Ok(false)
            }
        }
    }

    fn mirror(&mut self, c: Captured) -> Result<(), String> {
        // A write overflowed to the bitmap since we last looked: the destination must not
        // take what follows for a state the source was in. (Possibly early, if that write
        // was numbered after this one: telling it early is only conservative.)
        let mark = self.capture.overflow_mark();
        if mark != self.overflow_seen {
            self.overflow_seen = mark;
            self.send_unsynced()?;
        }
        let verdict = self
            .source
            .on_guest_write(c.offset, c.len)
            .map_err(|e| e.to_string())?;
        let WriteVerdict::Mirror { seq } = verdict else {
            return self.send_unsynced();
        };
        let Some(data) = c.data else {
            return self.send(
                StreamClass::Mirror,
                Message::Zero {
                    seq,
                    offset: c.offset,
                    len: c.len,
                },
            );
        };
        for (i, piece) in data.chunks(DATA_BYTES_MAX).enumerate() {
            let offset = c.offset + (i * DATA_BYTES_MAX) as u64;
            let message = Message::Write {
                seq,
                offset,
                data: piece.to_vec(),
            };
            self.send(StreamClass::Mirror, message)?;
        }
        Ok(())
    }

    /// The destination was promoted: this disk must take no more writes.
    fn superseded(&mut self) {
        if !lock(&self.status).superseded {
            warn!("the destination was promoted: fencing this disk");
            (self.fence)();
            lock(&self.status).superseded = true;
        }
    }

    fn send_unsynced(&mut self) -> Result<(), String> {
        match self.source.take_unsynced() {
            Some(m) => self.send(StreamClass::Mirror, m),
            None => Ok(()),
        }
    }

    fn send(&self, class: StreamClass, message: Message) -> Result<(), String> {
        // No link: the state machine was told (on_disconnected) and tracks everything.
        let Some(link) = &self.link else {
            return Ok(());
        };
        let bytes = message.encode();
        if class == StreamClass::Mirror {
            // Mirror messages go out in batches (in order), flushed at the end of each
            // round: one link send for many small writes.
            let mut batch = self.mirror_batch.borrow_mut();
            if batch.fits(&bytes) {
                batch.push(&bytes);
                return Ok(());
            }
            if !batch.is_empty() {
                let payload = batch.take();
                link.send(class, payload, SEND_TIMEOUT).map_err(err)?;
            }
            if bytes.len() < BATCH_BYTES_MAX / 2 {
                batch.push(&bytes);
                return Ok(());
            }
        }
        link.send(class, bytes, SEND_TIMEOUT)
            .map(|_| ())
            .map_err(err)
    }

    /// Sends the Mirror messages batched so far.
    fn flush_mirror(&self) -> Result<(), String> {
        let mut batch = self.mirror_batch.borrow_mut();
        if batch.is_empty() {
            return Ok(());
        }
        let payload = batch.take();
        let Some(link) = &self.link else {
            return Ok(());
        };
        // A batch of one is sent as the message itself.
        let payload = match decode_payload(&payload) {
            Ok(mut one) if one.len() == 1 => one.remove(0).encode(),
            _ => payload,
        };
        link.send(StreamClass::Mirror, payload, SEND_TIMEOUT)
            .map(|_| ())
            .map_err(err)
    }

    /// Back-pressure: every control interval, the pacing rate and the backlog bound from
    /// the drain rate and the backlog (captured and not yet drained, or mirrored and not
    /// yet confirmed).
    fn control(&mut self) {
        let now = Instant::now();
        if now < self.next_control {
            return;
        }
        self.next_control = now + CONTROL_INTERVAL;
        let backlog = self.source.mirror_backlog_bytes() + self.capture.pending_bytes();
        let connected = self.link.is_some() && self.source.is_welcomed();
        if let Some(link) = &self.link {
            // Per session counters: keep a running total across sessions.
            let acked: u64 = link.stats().send.iter().map(|c| c.acked_bytes).sum();
            self.delivered += acked.saturating_sub(self.link_acked);
            self.link_acked = acked;
        }
        let confirmed = self.source.stats().bytes_confirmed;
        let state = self
            .controller
            .tick(now, confirmed, self.delivered, backlog, connected);
        let cap = self.rate_cap.load(Ordering::Relaxed);
        let rate = match (state.rate_bytes_per_s, cap) {
            (0, cap) => cap,
            (rate, 0) => rate,
            (rate, cap) => rate.min(cap),
        };
        self.capture.pacer().set_rate(rate);
        lock(&self.status).rate_cap_bytes_per_s = cap;
        self.source.set_mirror_backlog_limit(state.budget_bytes);
    }

    fn publish(&self) {
        let (captured, accounted) = self.capture.counts();
        let mut s = lock(&self.status);
        s.captured_writes = captured;
        s.accounted_writes = accounted;
        s.state = self.source.state();
        s.stats = self.source.stats();
        s.mirror_backlog_bytes = self.source.mirror_backlog_bytes();
        s.overflowed_writes = self.capture.overflowed_writes();
        s.control = self.controller.state();
        s.pacer = self.capture.pacer().stats();
        s.demoted = self.source.is_demoted();
        // A request not taken up yet keeps its "starting" report.
        if s.verify_requested.is_none() {
            s.verify = self
                .verify
                .refused
                .clone()
                .or_else(|| self.source.verify_report());
        }
    }
}

fn err(e: LinkError) -> String {
    error_chain(&e)
}

/// What a destination reports.
#[derive(Debug, Clone, Default)]
pub struct DestStatus {
    pub connected: bool,
    pub stats: DestStats,
    pub sessions: u64,
    pub last_error: Option<String>,
    /// The replica is a state the source's disk was in, and at which seq.
    pub consistent_at: Option<u64>,
    /// The source was demoted and every write it made is here.
    pub complete: bool,
    pub promoted: bool,
}

/// Why a destination could not be promoted.
#[derive(Debug, thiserror::Error)]
pub enum PromoteFailure {
    #[error(transparent)]
    Refused(#[from] PromoteError),
    #[error("promoted, but syncing the disk failed: {0}")]
    Sync(io::Error),
    #[error("promoted, but it could not be recorded beside the disk (a restart would take replication again): {0}")]
    Identity(IdentityError),
}

/// The replica's identity as stored beside its disk; stored again when it changes.
struct IdentityStore {
    disk: PathBuf,
    stored: Mutex<ReplicaIdentity>,
}

impl IdentityStore {
    /// Stores what `dest` says must survive a restart, if it changed.
    fn sync(&self, dest: &ReplicaDest) -> Result<(), IdentityError> {
        let (disk_id, source_id, promoted) = dest.identity();
        let mut stored = lock(&self.stored);
        let now = ReplicaIdentity {
            disk_id,
            source_id,
            promoted,
            ..*stored
        };
        if now != *stored {
            now.store(&self.disk)?;
            *stored = now;
        }
        Ok(())
    }
}

/// A running destination: accepts sessions on `listen` and applies them to its disk.
pub struct DestDriver {
    status: Arc<Mutex<DestStatus>>,
    /// Shared with the session thread, which applies each message under this lock: once
    /// `promote` holds it and succeeds, nothing more of the source lands.
    dest: Arc<Mutex<ReplicaDest>>,
    file: File,
    identity: Arc<IdentityStore>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    listen: SocketAddr,
    port: Arc<Port>,
}

impl DestDriver {
    /// Starts listening; the disk at `image` receives the replica. `config` takes the
    /// replica's identity from `identity` (what is stored beside the disk, see
    /// [`super::identity`]), and the driver stores it again whenever it changes.
    pub fn start(
        image: &Path,
        mut config: DestConfig,
        identity: ReplicaIdentity,
        listen: SocketAddr,
        tls: Option<Arc<TlsIdentity>>,
    ) -> Result<DestDriver, super::DriverError> {
        config.generation = identity.generation;
        config.disk_id = identity.disk_id.or(config.disk_id);
        config.source_id = identity.source_id;
        config.promoted = identity.promoted;
        let identity = Arc::new(IdentityStore {
            disk: image.to_path_buf(),
            stored: Mutex::new(identity),
        });
        let open = |source| super::DriverError::Open {
            path: image.to_path_buf(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(image)
            .map_err(open)?;
        let dest = Arc::new(Mutex::new(ReplicaDest::new(config)?));
        let sync_file = file.try_clone().map_err(open)?;
        // Bind now, so a wrong address fails the start and not a thread later.
        let listen_err = |source| super::DriverError::Listen {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).map_err(listen_err)?;
        // Port 0 picked one: keep it, so a new session after a lost one finds us there.
        let listen = listener.local_addr().map_err(listen_err)?;
        let status = Arc::new(Mutex::new(DestStatus::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, d, id) = (status.clone(), stop.clone(), dest.clone(), identity.clone());
        let port = Port::new();
        let p = port.clone();
        let thread = thread::Builder::new()
            .name("strait-replica".into())
            .spawn(move || dest_thread(file, &d, &id, &p, listener, listen, tls, &s, &st))
            .map_err(super::DriverError::Thread)?;
        Ok(DestDriver {
            status,
            dest,
            file: sync_file,
            identity,
            stop,
            thread: Some(thread),
            listen,
            port,
        })
    }

    /// The migration's access to the current session (see [`Port`]).
    pub fn port(&self) -> Arc<Port> {
        self.port.clone()
    }

    /// The address sources connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// A snapshot of where the destination stands.
    pub fn status(&self) -> DestStatus {
        let mut s = lock(&self.status).clone();
        let d = lock(&self.dest);
        s.consistent_at = d.consistent_at();
        s.complete = d.is_complete();
        s.promoted = d.is_promoted();
        s
    }

    /// Makes the replica a disk of its own (see [`ReplicaDest::promote`]). When this
    /// returns `Ok`, nothing more of any source lands on the disk, and what landed is
    /// durable. The session in progress, if any, is told (`Refuse(Promoted)`) and ends:
    /// its source fences its disk.
    pub fn promote(&self, force: bool) -> Result<Promoted, PromoteFailure> {
        let mut dest = lock(&self.dest);
        let promoted = dest.promote(force)?;
        self.file.sync_data().map_err(PromoteFailure::Sync)?;
        self.identity
            .sync(&dest)
            .map_err(PromoteFailure::Identity)?;
        info!(?promoted, "replica promoted");
        Ok(promoted)
    }

    /// Stops applying. A session still being accepted is abandoned (its thread ends
    /// when the accept gives up).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn dest_thread(
    file: File,
    dest: &Mutex<ReplicaDest>,
    identity: &IdentityStore,
    port: &Port,
    first: TcpListener,
    listen: SocketAddr,
    tls: Option<Arc<TlsIdentity>>,
    status: &Mutex<DestStatus>,
    stop: &AtomicBool,
) {
    let mut listener = Some(first);
    while !stop.load(Ordering::Relaxed) {
        let l = match listener
            .take()
            .map_or_else(|| TcpListener::bind(listen), Ok)
        {
            Ok(l) => l,
            Err(e) => {
                lock(status).last_error = Some(format!("cannot listen on {listen}: {e}"));
                thread::sleep(REDIAL_PAUSE);
                continue;
            }
        };
        let link = match Link::accept(l, tls.as_deref(), SessionConfig::new(Role::Destination)) {
            Ok(link) => Arc::new(link),
            Err(e) => {
                lock(status).last_error = Some(error_chain(&e));
                continue;
            }
        };
        {
            let mut s = lock(status);
            s.connected = true;
            s.sessions += 1;
        }
        info!("replication session accepted");
        port.attach(link.clone());
        // A writer per session: one that failed is not reused.
        let outcome = file
            .try_clone()
            .and_then(Applier::new)
            .map_err(|e| format!("cannot set up the replica's writer (io_uring): {e}"))
            .and_then(|mut applier| {
                serve_session(&mut applier, dest, identity, port, &link, status, stop)
            });
        port.detach();
        lock(dest).on_disconnected();
        link.close();
        let mut s = lock(status);
        s.connected = false;
        if let Err(e) = outcome {
            warn!(error = %e, "replication session ended");
            s.last_error = Some(e);
        }
    }
}

fn serve_session(
    applier: &mut Applier,
    dest: &Mutex<ReplicaDest>,
    identity: &IdentityStore,
    port: &Port,
    link: &Link,
    status: &Mutex<DestStatus>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    let io = |e: io::Error| format!("writing the replica: {e}");
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for (class, batch) in [
            (StreamClass::Control, APPLY_DEPTH),
            (StreamClass::Mirror, APPLY_DEPTH),
            // Some chunks per round, so mirror writes are never starved.
            (StreamClass::Bulk, BULK_PER_ROUND),
        ] {
            // The lock is held while a batch is applied and written: a promote waits for
            // it, and nothing of the batch lands after the promote.
            let mut dest = lock(dest);
            if dest.is_promoted() {
                drop(dest);
                return tell_promoted(link);
            }
            let mut replies = Vec::new();
            let mut received = 0u64;
            for _ in 0..batch {
                let Some(p) = link.recv(class, Duration::ZERO).map_err(err)? else {
                    break;
                };
                received += p.len() as u64;
                if class == StreamClass::Control && is_migration(&p) {
                    port.deliver(&p).map_err(|e| e.to_string())?;
                    continue;
                }
                let messages = decode_payload(&p).map_err(|e| e.to_string())?;
                let actions: Vec<Apply> = messages
                    .into_iter()
                    .map(|m| dest.on_message(m))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .flatten()
                    .collect();
                for action in actions {
                    match action {
                        Apply::Write { offset, data } => {
                            applier.write(offset, data).map_err(io)?;
                            unsynced = true;
                        }
                        Apply::Zero { offset, len } => {
                            applier.zero(offset, len).map_err(io)?;
                            unsynced = true;
                        }
                        Apply::Reply(m) => replies.push(m),
                        Apply::Verify {
                            id,
                            first,
                            offset,
                            len,
                            chunk_bytes,
                        } => {
                            // Every write of the messages before it must be on the disk
                            // before it is read, and none of the messages after it: the
                            // writes in flight complete first, and the chunks are hashed
                            // here, in the middle of the batch.
                            applier.flush().map_err(io)?;
                            let digests = hash_file_chunks(
                                applier.file(),
                                offset,
                                len,
                                chunk_bytes,
                                &mut Vec::new(),
                            )
                            .map_err(|e| format!("hashing the replica for verify: {e}"))?;
                            replies.push(Message::VerifyReply { id, first, digests });
                        }
                    }
                }
            }
            if received == 0 {
                continue;
            }
            busy = true;
            applier.flush().map_err(io)?;
            if class == StreamClass::Control {
                // A Hello may have bound the replica to its source: stored before the
                // answer goes out.
                identity.sync(&dest).map_err(|e| error_chain(&e))?;
            }
            drop(dest);
            // Credit for what is written, not merely received: a slow disk slows the
            // source through the link's flow control.
            let _ = link.mark_applied(class, received);
            // Replies wait for link room without the lock, so a promote never waits on
            // the link.
            for m in replies {
                link.send(StreamClass::Control, m.encode(), SEND_TIMEOUT)
                    .map_err(err)?;
            }
        }
        if last_sync.elapsed() >= SYNC_INTERVAL {
            // Confirm even when nothing was written: a superseded mirror write or a
            // chunk already newer is applied by doing nothing, and is confirmed too.
            if unsynced {
                applier
                    .sync()
                    .map_err(|e| format!("syncing the replica: {e}"))?;
                unsynced = false;
            }
            last_sync = Instant::now();
            let confirmations = lock(dest).on_synced();
            for m in confirmations {
                link.send(StreamClass::Control, m.encode(), SEND_TIMEOUT)
                    .map_err(err)?;
            }
        }
        lock(status).stats = lock(dest).stats();
        if !busy {
            thread::sleep(IDLE_PAUSE);
        }
    }
    Ok(())
}

/// The replica was promoted while a source was connected: tell it (it fences its disk),
/// and end the session; its later messages would be refused anyway.
fn tell_promoted(link: &Link) -> Result<(), String> {
    let refuse = Message::Refuse(RefuseReason::Promoted);
    link.send(StreamClass::Control, refuse.encode(), SEND_TIMEOUT)
        .map_err(err)?;
    // Give the refusal its chance to arrive before the session closes.
    let _ = link.flush(PROMOTED_FLUSH_TIMEOUT);
    Err("promoted: the session with the source ended".into())
}
