//! The destination's side of a migration: answers the source's [`MigrationMessage`]s.
//!
//! On `Offer`, it points its VMM (started with `-incoming defer` and `-S`) at a socket of
//! its own (`migrate-incoming`), starts the memory stream's [`DestinationEnd`] on the
//! replication session, and answers `Ready`. On `Commit`, it checks that its VMM loaded
//! the whole state (the stream saw `SHUT 0` and QEMU says `completed`) and that the replica
//! is complete (the source was demoted and every write is here), then records the commit
//! durably ([`MigrationRecord`]), answers `Committed`, promotes the disk, lifts its fence
//! and resumes the VM. Anything else is refused: recorded first, then answered, and the
//! VMM that loaded the state is terminated so that state never runs.

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

/// How long a commit waits for the replica to become complete: the source sends `Commit`
/// once every write is confirmed, but the `Synced { last }` that makes the replica complete
/// travels on the Mirror class and may arrive just after the `Commit` on Control.
pub const COMPLETE_WAIT: Duration = Duration::from_secs(10);

/// How long a commit waits for the destination VMM to report the migration completed
/// after the stream ended: QEMU finishes loading the device state within milliseconds.
pub const LOADED_WAIT: Duration = Duration::from_secs(10);

/// How often the thread looks for a stop request while no message comes.
const POLL: Duration = Duration::from_millis(200);

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
            let Some(message) = self.parts.port.recv(POLL) else {
                continue;
            };
            info!(?message, "migration message");
            let reply = match message {
                MigrationMessage::Offer { id, vmm } => Some(self.offer(id, &vmm)),
                MigrationMessage::Abort { id, reason } => {
                    self.refuse(id, &format!("aborted by the source: {reason}"));
                    None
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
            self.refuse(id, &reason);
            let _ = self
                .parts
                .port
                .send(&MigrationMessage::Failed { id, reason });
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
        })
    }

    /// The answer to `Commit`, unless it was sent already.
    fn commit(&mut self, id: MigrationId) -> Option<MigrationMessage> {
        match self.record.get(id) {
            Some(Decision::Committed) => return Some(MigrationMessage::Committed { id }),
            Some(Decision::Refused) => {
                return Some(MigrationMessage::Refused {
                    id,
                    reason: "this migration was refused here earlier".into(),
                })
            }
            None => {}
        }
        let why_not = match self.current.take() {
            Some(mut incoming) if incoming.id == id => match self.ready_to_commit(&mut incoming) {
                Ok(()) => return self.do_commit(incoming),
                Err(why) => {
                    self.current = Some(incoming);
                    why
                }
            },
            other => {
                self.current = other;
                "this destination is not receiving that migration (restarted, or never offered)"
                    .into()
            }
        };
        self.refuse(id, &why_not);
        Some(MigrationMessage::Refused {
            id,
            reason: why_not,
        })
    }

    /// Whether everything the commit needs is here: the VMM loaded the whole state and
    /// the replica is complete. Waits a little for each (see the constants).
    fn ready_to_commit(&mut self, incoming: &mut Incoming) -> Result<(), String> {
        let deadline = Instant::now() + LOADED_WAIT;
        loop {
            settle(incoming, &self.status);
            match &incoming.outcome {
                Some(Ok(())) => break,
                Some(Err(e)) => return Err(format!("the memory stream failed: {e}")),
                None if incoming.stream.is_none() => {
                    return Err("the memory stream never ran".into())
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err("the memory stream has not ended".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let info = incoming
            .vmm
            .wait_migration_status(&[MigrationStatus::Completed], LOADED_WAIT)
            .map_err(|e| format!("the destination VMM did not load the state: {e}"))?;
        info!(?info.status, "the destination VMM loaded the state");
        let deadline = Instant::now() + COMPLETE_WAIT;
        loop {
            let s = self.parts.replica.status();
            if s.complete {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the replica is not complete (consistent: {}, the source's last write not confirmed)",
                    s.consistent_at.is_some()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Commits `incoming`; sends `Committed` itself (before the promote ends the session).
    fn do_commit(&mut self, incoming: Incoming) -> Option<MigrationMessage> {
        let id = incoming.id;
        // The commit point.
        if let Err(e) = self.record.decide(id, Decision::Committed) {
            let reason = format!("cannot record the commit: {e}");
            self.refuse(id, &reason);
            return Some(MigrationMessage::Refused { id, reason });
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
        // The replica is complete, so this is the ordinary (unforced) promote.
        if let Err(e) = self.parts.replica.promote(false) {
            problems.push(format!("promoting the disk: {e}"));
        }
        if let Some(backend) = &self.parts.backend {
            backend.unfence();
        }
        if problems.is_empty() {
            if let Err(e) = incoming.vmm.resume() {
                problems.push(format!("resuming the VM: {e}"));
            }
        }
        let detail = (!problems.is_empty()).then(|| problems.join("; "));
        if let Some(d) = &detail {
            warn!(id, problem = %d, "committed, but the VM does not run yet");
        }
        self.set_status(id, "committed", detail);
        None
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
