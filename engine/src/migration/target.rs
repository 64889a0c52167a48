//! The destination's side of a migration: answers the source's [`MigrationMessage`]s.
//!
//! On `Offer`, it points its VMM (started with `-incoming defer` and `-S`) at a socket of
//! its own (`migrate-incoming`), starts the memory stream's [`DestinationEnd`] on the
//! replication session, and answers `Ready`. `Commit` (sent by the source as it lets its
//! QEMU go) hands it the decision: as soon as its VMM loaded the whole state (the stream
//! passed on `SHUT 0` and QEMU says `completed`) and the replica is complete (the source
//! was demoted and every write is here), it records the commit durably
//! ([`MigrationRecord`]), answers `Committed`, promotes the disk, lifts its fence and
//! resumes the VM, without waiting for another word from the source. A stream that fails,
//! an `Abort`, or no complete state within [`COMMIT_READY_TIMEOUT`] is a refusal: recorded
//! first, then answered, and the VMM that loaded the state is terminated so that state
//! never runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use strait_vhost_blk::Backend;
use strait_vmm::{MigrationCapabilities, MigrationStatus, MigrationUri, RunState, Vmm};
use tracing::{info, warn};

use super::port::Port;
use super::record::{Decision, MigrationRecord};
use super::stream::{DestinationEnd, StreamConfig, StreamHandle, StreamMonitor};
use super::wire::{MigrationId, MigrationMessage};
use super::{connect_vmm, MigrationError};
use crate::replication::driver::DestDriver;

/// How long after `Commit` the destination may take to hold everything the commit needs
/// before it refuses: the source sends `Commit` as it lets its QEMU go, so the last pages,
/// the device state and the mirror's backlog are still on their way (seconds across a
/// slow WAN, more across a link that drops for less than its resume window). As long as
/// the source's own [`super::source::DECISION_TIMEOUT`]: whichever side gives up first,
/// the answer is a recorded refusal.
pub const COMMIT_READY_TIMEOUT: Duration = super::source::DECISION_TIMEOUT;

/// How often the thread looks for a stop request while no message comes.
const POLL: Duration = Duration::from_millis(200);

/// How often it looks whether a requested commit can be made: every millisecond here is
/// a millisecond of the guest's downtime, and a look is two atomic loads (the QMP query
/// is made once, when the stream says the state is loaded).
const COMMIT_POLL: Duration = Duration::from_millis(1);

/// What the destination reports about migrations.
#[derive(Debug, Clone, Default)]
pub struct TargetStatus {
    /// The migration in progress or last seen.
    pub id: Option<MigrationId>,
    /// `idle`, `receiving`, `committed`, `refused`.
    pub state: &'static str,
    pub detail: Option<String>,
    pub memory_bytes: u64,
    pub committed_at_unix_s: Option<f64>,
}

/// The pieces of the destination engine a migration acts on.
pub struct TargetParts {
    pub port: Arc<Port>,
    pub replica: Arc<DestDriver>,
    /// The disk served to the destination VMM (fenced until the commit).
    pub backend: Option<Arc<Backend>>,
    /// The VMM from the engine's own configuration (`serve --vmm`).
    pub vmm: Option<String>,
    /// Where the incoming socket is created.
    pub run_dir: PathBuf,
    /// The replica's disk (the record lives beside it).
    pub disk: PathBuf,
}

/// The destination's migration thread.
pub struct Target {
    status: Arc<Mutex<TargetStatus>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    pub fn start(parts: TargetParts) -> Result<Target, MigrationError> {
        let record = MigrationRecord::load(&parts.disk).map_err(MigrationError::Record)?;
        let status = Arc::new(Mutex::new(TargetStatus {
            state: "idle",
            ..TargetStatus::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let mut runner = Runner {
            parts,
            record,
            status: status.clone(),
            current: None,
        };
        let s = stop.clone();
        let thread = thread::Builder::new()
            .name("strait-mig-dst".into())
            .spawn(move || runner.run(&s))
            .map_err(MigrationError::Thread)?;
        Ok(Target {
            status,
            stop,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> TargetStatus {
        lock(&self.status).clone()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A migration being received.
struct Incoming {
    id: MigrationId,
    vmm: Box<dyn Vmm>,
    stream: Option<StreamHandle>,
    /// The stream's verdict once it ended: `Ok` when the VMM loaded everything.
    outcome: Option<Result<(), String>>,
    /// When the source's `Commit` arrived: from then on this side decides.
    commit_asked: Option<Instant>,
    /// The VMM said its incoming migration completed.
    vmm_loaded: bool,
}

struct Runner {
    parts: TargetParts,
    record: MigrationRecord,
    status: Arc<Mutex<TargetStatus>>,
    current: Option<Incoming>,
}

impl Runner {
    fn run(&mut self, stop: &AtomicBool) {
        self.finish_recorded_commit();
        while !stop.load(Ordering::Relaxed) {
            self.watch_stream();
            self.poll_commit();
            let commit_pending = self
                .current
                .as_ref()
                .is_some_and(|i| i.commit_asked.is_some());
            let Some(message) =
                self.parts
                    .port
                    .recv(if commit_pending { COMMIT_POLL } else { POLL })
            else {
                continue;
            };
            info!(?message, "migration message");
            let reply = match message {
                MigrationMessage::Offer { id, vmm } => Some(self.offer(id, &vmm)),
                MigrationMessage::Abort { id, reason } => {
                    self.abort(id, &format!("aborted by the source: {reason}"))
                }
                MigrationMessage::Commit { id } => self.commit(id),
                other => {
                    warn!(?other, "a migration message only a source takes; ignored");
                    None
                }
            };
            if let Some(reply) = reply {
                if let Err(e) = self.parts.port.send(&reply) {
                    // The source asks again (Commit) or times out (Offer).
                    warn!(error = %e, ?reply, "cannot answer the source");
                }
            }
        }
        if let Some(incoming) = self.current.take() {
            if let Some(stream) = &incoming.stream {
                stream.monitor().abort("the destination engine is stopping");
            }
        }
    }

    fn set_status(&self, id: MigrationId, state: &'static str, detail: Option<String>) {
        let mut s = lock(&self.status);
        s.id = Some(id);
        s.state = state;
        s.detail = detail;
        if state == "committed" {
            s.committed_at_unix_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs_f64());
        }
    }

    /// Takes the stream's verdict once it ended.
    fn watch_stream(&mut self) {
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        settle(incoming, &self.status);
        // A stream that failed can never commit: discard at once (the source may be cut
        // off and never send its Abort), and tell the source if it can hear it.
        if let Some(Err(e)) = &incoming.outcome {
            let (id, reason) = (incoming.id, format!("the memory stream failed: {e}"));
            let asked = incoming.commit_asked.is_some();
            self.refuse(id, &reason);
            // A source that sent `Commit` waits for the decision itself.
            let message = if asked {
                MigrationMessage::Refused { id, reason }
            } else {
                MigrationMessage::Failed { id, reason }
            };
            let _ = self.parts.port.send(&message);
        }
    }

    fn offer(&mut self, id: MigrationId, vmm: &str) -> MigrationMessage {
        if let Some(decision) = self.record.get(id) {
            return MigrationMessage::Failed {
                id,
                reason: format!("migration {id:016x} was already decided here: {decision:?}"),
            };
        }
        if let Some(old) = self.current.take() {
            // A newer offer replaces an attempt the source gave up on.
            self.discard(old, "replaced by a newer migration");
        }
        match self.prepare(id, vmm) {
            Ok(incoming) => {
                self.current = Some(incoming);
                self.set_status(id, "receiving", None);
                MigrationMessage::Ready { id }
            }
            Err(reason) => {
                warn!(id, %reason, "cannot receive the migration");
                self.set_status(id, "refused", Some(reason.clone()));
                MigrationMessage::Failed { id, reason }
            }
        }
    }

    fn prepare(&self, id: MigrationId, forwarded: &str) -> Result<Incoming, String> {
        if self.parts.replica.status().promoted {
            return Err("the destination disk is already promoted (a VM runs on it)".into());
        }
        let spec = if forwarded.is_empty() {
            self.parts.vmm.clone().ok_or_else(|| {
                "the destination engine has no VMM (start it with --vmm, or pass --dst-vmm)"
                    .to_string()
            })?
        } else {
            forwarded.to_string()
        };
        let vmm = connect_vmm(&spec).map_err(|e| e.to_string())?;
        let state = vmm.run_state().map_err(|e| e.to_string())?;
        if state != RunState::InMigrate {
            return Err(format!(
                "the destination VMM ({}) is {state:?}, not waiting for a migration: start it with -incoming defer",
                vmm.describe()
            ));
        }
        vmm.set_migration_capabilities(&MigrationCapabilities {
            return_path: true,
            events: true,
            ..MigrationCapabilities::default()
        })
        .map_err(|e| format!("setting the destination VMM's capabilities: {e}"))?;
        let socket = incoming_socket(&self.parts.run_dir, id);
        let _ = std::fs::remove_file(&socket);
        vmm.start_incoming(&MigrationUri::Unix(socket.clone()))
            .map_err(|e| format!("migrate-incoming on the destination VMM: {e}"))?;
        let (_, link) = self
            .parts
            .port
            .link()
            .ok_or("the replication session is gone")?;
        let stream = DestinationEnd::new(&socket, StreamConfig::default())
            .spawn(link, StreamMonitor::new())
            .map_err(|e| format!("starting the memory stream: {e}"))?;
        info!(id, vmm = %vmm.describe(), socket = %socket.display(), "ready to receive the migration");
        Ok(Incoming {
            id,
            vmm,
            stream: Some(stream),
            outcome: None,
            commit_asked: None,
            vmm_loaded: false,
        })
    }

    /// The answer to a decision already made about `id`.
    fn decided(&self, id: MigrationId) -> Option<MigrationMessage> {
        match self.record.get(id)? {
            Decision::Committed => Some(MigrationMessage::Committed { id }),
            Decision::Refused => Some(MigrationMessage::Refused {
                id,
                reason: "this migration was refused here earlier".into(),
            }),
        }
    }

    /// `Commit`: this side decides from now on ([`Runner::poll_commit`]). Answered at once
    /// only when already decided, or when this destination is not receiving `id`.
    fn commit(&mut self, id: MigrationId) -> Option<MigrationMessage> {
        if let Some(answer) = self.decided(id) {
            return Some(answer);
        }
        match self.current.as_mut() {
            Some(incoming) if incoming.id == id => {
                if incoming.commit_asked.is_none() {
                    incoming.commit_asked = Some(Instant::now());
                }
                self.poll_commit();
                None
            }
            _ => {
                let why = "this destination is not receiving that migration (restarted, or never offered)";
                self.refuse(id, why);
                Some(MigrationMessage::Refused {
                    id,
                    reason: why.into(),
                })
            }
        }
    }

    /// `Abort`: refused unless already decided; answered either way, since a source
    /// that sent `Commit` may be waiting for the answer.
    fn abort(&mut self, id: MigrationId, why: &str) -> Option<MigrationMessage> {
        if let Some(answer) = self.decided(id) {
            return Some(answer);
        }
        self.refuse(id, why);
        Some(MigrationMessage::Refused {
            id,
            reason: why.to_string(),
        })
    }

    /// Commits the requested migration once everything it needs is here: the stream
    /// passed on the VMM's `SHUT 0`, the VMM says `completed`, and the replica is
    /// complete. Refuses once that took [`COMMIT_READY_TIMEOUT`].
    fn poll_commit(&mut self) {
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        let Some(asked) = incoming.commit_asked else {
            return;
        };
        settle(incoming, &self.status);
        let stream_loaded = match &incoming.outcome {
            Some(Ok(())) => true,
            // watch_stream refuses it.
            Some(Err(_)) => return,
            None => incoming
                .stream
                .as_ref()
                .is_some_and(|s| s.monitor().loaded()),
        };
        if stream_loaded && !incoming.vmm_loaded {
            match incoming.vmm.migration_info() {
                Ok(info) if info.status == MigrationStatus::Completed => {
                    info!("the destination VMM loaded the state");
                    incoming.vmm_loaded = true;
                }
                Ok(info) if info.status.is_terminal() => {
                    let (id, why) = (
                        incoming.id,
                        format!("the destination VMM's migration ended as {:?}", info.status),
                    );
                    self.refuse(id, &why);
                    let _ = self
                        .parts
                        .port
                        .send(&MigrationMessage::Refused { id, reason: why });
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "cannot ask the destination VMM whether it loaded the state")
                }
            }
        }
        let complete = self.parts.replica.status().complete;
        if incoming.vmm_loaded && complete {
            if let Some(incoming) = self.current.take() {
                self.do_commit(incoming);
            }
            return;
        }
        if asked.elapsed() >= COMMIT_READY_TIMEOUT {
            let id = incoming.id;
            let why = format!(
                "not everything arrived within {COMMIT_READY_TIMEOUT:?} of the commit request (state loaded: {}, replica complete: {complete})",
                incoming.vmm_loaded
            );
            self.refuse(id, &why);
            let _ = self
                .parts
                .port
                .send(&MigrationMessage::Refused { id, reason: why });
        }
    }

    /// Commits `incoming`; sends `Committed` itself (before the promote ends the session).
    fn do_commit(&mut self, incoming: Incoming) {
        let id = incoming.id;
        // The commit point.
        if let Err(e) = self.record.decide(id, Decision::Committed) {
            let reason = format!("cannot record the commit: {e}");
            self.current = Some(incoming);
            self.refuse(id, &reason);
            let _ = self
                .parts
                .port
                .send(&MigrationMessage::Refused { id, reason });
            return;
        }
        info!(id, "migration committed");
        // Answer first: the promote ends the replication session (the source is told it
        // was superseded), and the answer must travel before that.
        // (The session's end after the promote flushes it: no wait here, the VM is
        // stopped until the `cont` below.)
        if let Err(e) = self.parts.port.send(&MigrationMessage::Committed { id }) {
            warn!(error = %e, "cannot tell the source the commit; it asks again");
        }
        let mut problems = Vec::new();
        let committed_at = Instant::now();
        // The replica is complete, so this is the ordinary (unforced) promote.
        if let Err(e) = self.parts.replica.promote(false) {
            problems.push(format!("promoting the disk: {e}"));
        }
        if let Some(backend) = &self.parts.backend {
            backend.unfence();
        }
        let promoted_at = Instant::now();
        if problems.is_empty() {
            if let Err(e) = incoming.vmm.resume() {
                problems.push(format!("resuming the VM: {e}"));
            }
        }
        // Both are part of the guest's downtime; `cont` includes the VMM starting its
        // devices (a vhost-user device's whole setup, message by message).
        info!(
            id,
            promote_ms = promoted_at.duration_since(committed_at).as_secs_f64() * 1e3,
            resume_ms = promoted_at.elapsed().as_secs_f64() * 1e3,
            "promoted and resumed"
        );
        let detail = (!problems.is_empty()).then(|| problems.join("; "));
        if let Some(d) = &detail {
            warn!(id, problem = %d, "committed, but the VM does not run yet");
        }
        self.set_status(id, "committed", detail);
    }

    /// An engine that stopped between the commit point (the record) and the promote
    /// finishes the commit when it starts again: the source may already know it
    /// committed, so the VM must run here. The replica was complete when the commit was
    /// recorded, but a restarted replica cannot know that by itself, so the promote is
    /// forced; the VMM, if it still holds the loaded state (paused after a completed
    /// incoming migration), is resumed.
    fn finish_recorded_commit(&mut self) {
        let Some(id) = self.record.last_decision_committed() else {
            return;
        };
        if self.parts.replica.status().promoted {
            return;
        }
        warn!(
            id,
            "a recorded commit was not finished before the engine stopped: finishing it"
        );
        let mut problems = Vec::new();
        if let Err(e) = self.parts.replica.promote(true) {
            problems.push(format!("promoting the disk: {e}"));
        }
        if let Some(backend) = &self.parts.backend {
            backend.unfence();
        }
        let vmm = self.parts.vmm.as_deref().map(connect_vmm);
        match vmm {
            Some(Ok(vmm)) => {
                let loaded = vmm
                    .migration_info()
                    .is_ok_and(|i| i.status == MigrationStatus::Completed);
                match vmm.run_state() {
                    Ok(RunState::Paused) if loaded && problems.is_empty() => {
                        if let Err(e) = vmm.resume() {
                            problems.push(format!("resuming the VM: {e}"));
                        }
                    }
                    Ok(RunState::Running) => {}
                    other => problems.push(format!(
                        "the VMM does not hold the migrated state (run state {other:?}): start the VM from the promoted disk"
                    )),
                }
            }
            Some(Err(e)) => problems.push(format!("the VMM: {e}")),
            None => problems
                .push("no VMM configured (--vmm): start the VM from the promoted disk".into()),
        }
        let detail = (!problems.is_empty()).then(|| problems.join("; "));
        if let Some(d) = &detail {
            warn!(id, problem = %d, "the recorded commit is finished only in part");
        }
        self.set_status(id, "committed", detail);
    }

    /// Records that `id` never commits here, and discards what was received.
    fn refuse(&mut self, id: MigrationId, why: &str) {
        warn!(id, reason = why, "migration refused");
        if let Err(e) = self.record.decide(id, Decision::Refused) {
            warn!(error = %e, "cannot record the refusal");
        }
        if let Some(incoming) = self.current.take() {
            if incoming.id == id {
                self.discard(incoming, why);
            } else {
                self.current = Some(incoming);
            }
        }
        self.set_status(id, "refused", Some(why.to_string()));
    }

    /// The state this VMM loaded must never run: end the stream and the VMM.
    fn discard(&self, incoming: Incoming, why: &str) {
        if let Some(stream) = &incoming.stream {
            stream.monitor().abort(why);
        }
        match incoming.vmm.run_state() {
            Ok(RunState::Running) => {
                warn!("the destination VMM runs although nothing committed: leaving it to the operator");
            }
            _ => {
                if let Err(e) = incoming.vmm.terminate() {
                    warn!(error = %e, "cannot terminate the destination VMM");
                }
            }
        }
    }
}

/// Publishes the stream's progress and, once it ended, takes its verdict.
fn settle(incoming: &mut Incoming, status: &Mutex<TargetStatus>) {
    if let Some(stream) = &incoming.stream {
        lock(status).memory_bytes = stream.monitor().progress().peer_to_local_bytes;
    }
    if incoming
        .stream
        .as_ref()
        .is_some_and(StreamHandle::is_finished)
    {
        if let Some(stream) = incoming.stream.take() {
            let outcome = stream.join().map(|_| ()).map_err(|e| e.to_string());
            info!(id = incoming.id, ?outcome, "memory stream ended");
            incoming.outcome = Some(outcome);
        }
    }
}

/// The socket the destination VMM listens on for migration `id`.
fn incoming_socket(run_dir: &Path, id: MigrationId) -> PathBuf {
    run_dir.join(format!("strait-incoming-{id:016x}.sock"))
}
