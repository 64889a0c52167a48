//! `strait serve`: one disk to one VMM, with the control API beside it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use strait_net::tls::{TlsError, TlsIdentity};
use strait_vhost_blk::{Backend, BackendConfig, QueueSnapshot, QueueStats};

use crate::cli::ServeArgs;
use crate::control::{ControlError, ControlServer, ErrorCode, Handler, API_VERSION};
use crate::migration::port::Port;
use crate::migration::source::{MigratePlan, Migration, SourceSide};
use crate::migration::stun::Actuator;
use crate::migration::target::{Target, TargetParts};
use crate::replication::capture::MirrorCapture;
use crate::replication::driver::{
    DestDriver, FenceFn, PromoteFailure, SourceDriver, SourceStatus, SourceTarget,
};
use crate::replication::identity::ReplicaIdentity;
use crate::replication::{
    ByteRange, DestConfig, DriverError, SourceConfig, SourceState, VerifyRefusal, VerifyReport,
    VerifyState, BULK_INFLIGHT_MAX, CHUNK_BYTES, MIRROR_BACKLOG_BYTES_MAX,
};

/// What can stop `strait serve` from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("disk image {0} does not exist")]
    MissingDisk(PathBuf),
    #[error("core {core} does not exist: this machine has cores 0 to {last}")]
    NoSuchCore { core: usize, last: usize },
    #[error(transparent)]
    Backend(#[from] strait_vhost_blk::ServerError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot install the SIGTERM/SIGINT handler")]
    Signals(#[source] std::io::Error),
    #[error("cannot load the TLS identity from {dir}")]
    Tls {
        dir: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    #[error("--listen needs --tls-dir DIR (or --insecure): a replica accepts only peers it can authenticate")]
    NoPeerAuth,
    #[error("cannot read the size of {path}")]
    DiskSize {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start receiving the replica")]
    Replica(#[source] DriverError),
    #[error(transparent)]
    ReplicaIdentity(#[from] crate::replication::identity::IdentityError),
    #[error("cannot start receiving migrations")]
    Migration(#[source] Box<crate::migration::MigrationError>),
    #[error(transparent)]
    VmmSpec(Box<crate::migration::MigrationError>),
}

/// A running `strait serve`: the block backend (or, with `--listen`, the replica
/// receiver) and its control server.
pub struct Server {
    backend: Option<Arc<Backend>>,
    handler: Arc<EngineHandler>,
    control: Option<ControlServer>,
}

impl Server {
    /// Starts the backend and the control API.
    pub fn start(args: &ServeArgs) -> Result<Server, ServeError> {
        if !args.disk.exists() {
            return Err(ServeError::MissingDisk(args.disk.clone()));
        }
        // An engine killed mid-migration leaves its guest slowed by the vCPU quota in
        // force (up to 95%); lift what dead engines left before anything else.
        match strait_vmm::sweep_stale_quotas() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                cgroups = n,
                "undid vCPU quotas that engines which no longer run left behind"
            ),
            Err(e) => tracing::warn!(error = %e, "could not look for vCPU quotas left behind"),
        }
        let tls = match &args.tls_dir {
            Some(dir) => Some(Arc::new(TlsIdentity::load(dir).map_err(|source| {
                ServeError::Tls {
                    dir: dir.clone(),
                    source: Box::new(source),
                }
            })?)),
            None => None,
        };
        let disk_bytes = std::fs::metadata(&args.disk)
            .map_err(|source| ServeError::DiskSize {
                path: args.disk.clone(),
                source,
            })?
            .len();
        // With --listen the disk receives a replica; it is served to a VMM (if
        // --vhost-socket) fenced, so no guest writes it until it is promoted.
        if let Some(spec) = &args.vmm {
            crate::migration::parse_vmm_spec(spec).map_err(|e| ServeError::VmmSpec(Box::new(e)))?;
        }
        let replica = match args.listen {
            Some(listen) => Some(Arc::new(Server::start_replica(
                args,
                listen,
                tls.clone(),
                disk_bytes,
            )?)),
            None => None,
        };
        let backend = match &args.vhost_socket {
            Some(socket) => Some(Arc::new(Server::start_backend(
                args,
                socket,
                replica.is_some(),
            )?)),
            None => None,
        };
        // Sockets the engine creates for migrations live beside its control socket.
        let run_dir = args
            .control
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf);
        let target = match &replica {
            Some(replica) => Some(
                Target::start(TargetParts {
                    port: replica.port(),
                    replica: replica.clone(),
                    backend: backend.clone(),
                    vmm: args.vmm.clone(),
                    run_dir: run_dir.clone(),
                    disk: args.disk.clone(),
                })
                .map_err(|e| ServeError::Migration(Box::new(e)))?,
            ),
            None => None,
        };
        let handler = Arc::new(EngineHandler {
            run_dir,
            target,
            migration: Mutex::new(None),
            backend: backend.clone(),
            disk: args.disk.clone(),
            disk_bytes,
            queues: args.queues,
            tls,
            insecure: args.insecure,
            source: Arc::new(Mutex::new(None)),
            replica,
            last_stats: Mutex::new(None),
        });
        let control = match ControlServer::start(&args.control, handler.clone()) {
            Ok(c) => c,
            Err(err) => {
                // Do not leave a half-started backend behind.
                drop(handler);
                if let Some(backend) = backend.and_then(|b| Arc::try_unwrap(b).ok()) {
                    let _ = backend.shutdown();
                }
                return Err(err.into());
            }
        };
        Ok(Server {
            backend,
            handler,
            control: Some(control),
        })
    }

    fn start_backend(
        args: &ServeArgs,
        socket: &std::path::Path,
        fenced: bool,
    ) -> Result<Backend, ServeError> {
        let cores = args.cores.clone().map_or_else(|| vec![0], |c| c.0);
        let online = online_cores();
        if let Some(&core) = cores.iter().find(|c| **c >= online) {
            return Err(ServeError::NoSuchCore {
                core,
                last: online.saturating_sub(1),
            });
        }
        Ok(Backend::start(BackendConfig {
            disk: args.disk.clone(),
            socket: socket.to_path_buf(),
            queues: args.queues,
            cores,
            read_only: args.read_only,
            serial: args.serial.clone(),
            direct_io: true,
            fenced,
        })?)
    }

    /// `--listen`: the disk receives a replica from a source engine.
    fn start_replica(
        args: &ServeArgs,
        listen: std::net::SocketAddr,
        tls: Option<Arc<TlsIdentity>>,
        disk_bytes: u64,
    ) -> Result<DestDriver, ServeError> {
        if tls.is_none() && !args.insecure {
            return Err(ServeError::NoPeerAuth);
        }
        let identity =
            ReplicaIdentity::load_or_new(&args.disk).map_err(ServeError::ReplicaIdentity)?;
        let config = DestConfig {
            disk_id: None,
            disk_bytes,
            chunk_bytes: CHUNK_BYTES,
            generation: identity.generation,
            source_id: None,
            promoted: false,
        };
        let replica = DestDriver::start(&args.disk, config, identity, listen, tls)
            .map_err(ServeError::Replica)?;
        tracing::info!(listen = %replica.local_addr(), "receiving a replica");
        Ok(replica)
    }

    /// Stops the control API and replication, disconnects the VMM, flushes the image.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(control) = self.control.take() {
            control.shutdown();
        }
        if let Some(source) = lock(&self.handler.source).take() {
            source.stop();
        }
        if let Some(backend) = self.backend.take() {
            match Arc::try_unwrap(backend) {
                Ok(backend) => backend.shutdown()?,
                // Still referenced by a handler being torn down: Drop stops it.
                Err(_) => tracing::warn!("backend still referenced at shutdown"),
            }
        }
        Ok(())
    }
}

/// Longest a fence waits for the guest writes in flight: each is one io_uring write or
/// fallocate (milliseconds); 5 s covers a disk stalled by writeback. Past it the disk is
/// fenced all the same and those writes are not acknowledged.
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn online_cores() -> usize {
    // SAFETY: sysconf reads a system constant and has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Runs `strait serve` until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    crate::init_logging();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let server = Server::start(&args)?;
    tracing::info!(control = %args.control.display(), "ready");
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "stopping");
    }
    server.shutdown()?;
    tracing::info!("stopped; image flushed");
    Ok(())
}

struct EngineHandler {
    /// Where migration sockets are created.
    run_dir: PathBuf,
    /// With `--listen`: the destination's side of migrations.
    target: Option<Target>,
    /// The migration started here (the last one, once it ended).
    migration: Mutex<Option<Migration>>,
    backend: Option<Arc<Backend>>,
    disk: PathBuf,
    disk_bytes: u64,
    queues: u16,
    tls: Option<Arc<TlsIdentity>>,
    insecure: bool,
    /// Replication of the served disk, once `replicate` started it.
    source: Arc<Mutex<Option<SourceDriver>>>,
    /// With `--listen`: the replica being received.
    replica: Option<Arc<DestDriver>>,
    // The previous `stats` answer, to turn counters into rates over the interval between
    // two calls.
    last_stats: Mutex<Option<(Instant, Vec<QueueStats>)>>,
}

impl Handler for EngineHandler {
    fn status(&self) -> Value {
        let replication = self.replication_json();
        let Some(backend) = &self.backend else {
            return json!({
                "engine_version": env!("CARGO_PKG_VERSION"),
                "api_version": API_VERSION,
                "disk": { "path": self.disk, "size_bytes": self.disk_bytes },
                "vmm_connected": false,
                "replication": replication,
                "migration": self.migration_json(),
            });
        };
        let s = backend.status();
        json!({
            "engine_version": env!("CARGO_PKG_VERSION"),
            "api_version": API_VERSION,
            "disk": {
                "path": s.path,
                "size_bytes": s.size_bytes,
                "read_only": s.read_only,
                "fenced": s.fenced,
                "block_size_bytes": s.block_size_bytes,
                "direct_io": s.direct_io,
                "serial": s.serial,
            },
            "queues": s.queues,
            "queue_size": s.queue_size,
            "cores": s.cores,
            "vmm_connected": s.vmm_connected,
            "features": {
                "offered": s.offered_features,
                "acked": s.acked_features,
                "protocol": s.protocol_features,
                "dirty_logging": s.dirty_logging,
                "writeback": s.writeback,
            },
            "uptime_s": s.uptime_s,
            "replication": replication,
            "migration": self.migration_json(),
        })
    }

    fn promote(&self, args: &Map<String, Value>) -> Result<Value, (ErrorCode, String)> {
        let invalid = |m: &str| (ErrorCode::InvalidArgs, m.to_string());
        let force = match args.get("force") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("`force` must be true or false")),
        };
        if args.keys().any(|k| k != "force") {
            return Err(invalid("`promote` takes only `force`"));
        }
        let Some(replica) = &self.replica else {
            let what = if lock(&self.source).is_some() {
                "this engine is a replication source: promote applies to the destination (an engine started with --listen)"
            } else {
                "this engine holds no replica (promote applies to an engine started with --listen)"
            };
            return Err((ErrorCode::Refused, what.into()));
        };
        let promoted = replica.promote(force).map_err(|e| match e {
            PromoteFailure::Refused(r) => (ErrorCode::Refused, r.to_string()),
            PromoteFailure::Sync(_) | PromoteFailure::Identity(_) => {
                (ErrorCode::Internal, e.to_string())
            }
        })?;
        if let Some(backend) = &self.backend {
            backend.unfence();
        }
        Ok(json!({
            "consistent": promoted.consistent,
            "complete": promoted.complete,
            "applied_seq": promoted.applied_seq,
            "forced": promoted.forced,
            "serving": self.backend.is_some(),
        }))
    }

    fn demote(&self) -> Result<Value, (ErrorCode, String)> {
        let Some(backend) = &self.backend else {
            return Err((
                ErrorCode::Refused,
                "this engine serves no disk to a VMM (no --vhost-socket): nothing to demote".into(),
            ));
        };
        // Fence first: from here on no guest write is applied or acknowledged, and once
        // this returns every write that was is captured.
        backend
            .fence(FENCE_TIMEOUT)
            .map_err(|e| (ErrorCode::Internal, format!("fencing the disk: {e}")))?;
        let source = lock(&self.source);
        if let Some(driver) = source.as_ref() {
            driver.demote();
        }
        Ok(json!({ "fenced": true, "replicating": source.is_some() }))
    }

    fn replicate(&self, args: &Map<String, Value>) -> Result<Value, (ErrorCode, String)> {
        let invalid = |m: &str| (ErrorCode::InvalidArgs, m.to_string());
        let refused = |m: String| (ErrorCode::Refused, m);
        let to = args
            .get("to")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("`to` (\"ADDR:PORT\", a string) is required"))?;
        let to: std::net::SocketAddr = to
            .parse()
            .map_err(|_| invalid("`to` must be an IP address and port, like \"10.0.0.2:7400\""))?;
        if args.keys().any(|k| k != "to") {
            return Err(invalid("`replicate` takes only `to`"));
        }
        if self.replica.as_ref().is_some_and(|r| !r.status().promoted) {
            return Err(refused(
                "this engine receives a replica (--listen); promote it before it replicates its disk"
                    .into(),
            ));
        }
        let Some(backend) = &self.backend else {
            return Err(refused(
                "this engine serves no disk to a VMM (no --vhost-socket): nothing to replicate"
                    .into(),
            ));
        };
        if self.tls.is_none() && !self.insecure {
            return Err(refused(
                "the engine was started without --tls-dir (or --insecure): it cannot authenticate a destination".into(),
            ));
        }
        let mut source = lock(&self.source);
        if let Some(running) = source.as_ref() {
            return Err(refused(format!(
                "already replicating to {}",
                running.status().to
            )));
        }
        let capture = Arc::new(MirrorCapture::new(
            self.queues,
            self.disk_bytes,
            CHUNK_BYTES,
        ));
        // A disk is named by the serial the guest sees (device and inode unless set) and
        // its size, so a destination that holds another disk refuses this one.
        let serial = backend.status().serial;
        let disk_id = id_of(&[serial.as_bytes(), &self.disk_bytes.to_le_bytes()]);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let source_id = id_of(&[host.trim().as_bytes(), &disk_id]);
        let config = SourceConfig {
            disk_id,
            source_id,
            disk_bytes: self.disk_bytes,
            chunk_bytes: CHUNK_BYTES,
            mirror_backlog_bytes_max: MIRROR_BACKLOG_BYTES_MAX,
            bulk_inflight_max: BULK_INFLIGHT_MAX,
        };
        let target = SourceTarget {
            to,
            tls: self.tls.clone(),
            connections: strait_net::session::DEFAULT_CONNECTIONS,
        };
        // Capture first, then start: the driver sees every write from its first chunk on.
        backend
            .set_capture(capture.clone())
            .map_err(|e| refused(format!("cannot attach the capture point: {e}")))?;
        let fenced = backend.clone();
        let fence: FenceFn = Box::new(move || {
            if let Err(e) = fenced.fence(FENCE_TIMEOUT) {
                tracing::error!(error = %e, "fencing the superseded disk");
            }
        });
        let driver = SourceDriver::start(&self.disk, config, capture, target, fence)
            .map_err(|e| refused(format!("cannot start replication: {e}")))?;
        *source = Some(driver);
        Ok(json!({ "to": to.to_string() }))
    }

    fn migrate(&self, args: &Map<String, Value>) -> Result<Value, (ErrorCode, String)> {
        let invalid = |m: &str| (ErrorCode::InvalidArgs, m.to_string());
        let refused = |m: String| (ErrorCode::Refused, m);
        let string = |key: &str| match args.get(key) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(invalid(&format!("`{key}` must be a string"))),
        };
        if let Some(k) = args.keys().find(|k| !MIGRATE_ARGS.contains(&k.as_str())) {
            return Err(invalid(&format!(
                "`migrate` takes `vmm`, `to`, `dst_vmm`, `downtime_ms`, \
                 `converge_timeout_s` and `throttle`, not `{k}`"
            )));
        }
        let vmm = string("vmm")?
            .ok_or_else(|| invalid("`vmm` (\"qemu:QMP_SOCKET\", a string) is required"))?;
        let dst_vmm = string("dst_vmm")?;
        for spec in std::iter::once(&vmm).chain(dst_vmm.as_ref()) {
            crate::migration::parse_vmm_spec(spec).map_err(|e| invalid(&e.to_string()))?;
        }
        let downtime_limit_ms = match args.get("downtime_ms") {
            None => crate::migration::source::DOWNTIME_LIMIT_MS_DEFAULT,
            Some(v) => v
                .as_u64()
                .filter(|d| (DOWNTIME_MS_MIN..=DOWNTIME_MS_MAX).contains(d))
                .ok_or_else(|| {
                    invalid(&format!(
                        "`downtime_ms` must be a whole number from {DOWNTIME_MS_MIN} to {DOWNTIME_MS_MAX}"
                    ))
                })?,
        };
        let converge_timeout = match args.get("converge_timeout_s") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|s| (CONVERGE_TIMEOUT_S_MIN..=CONVERGE_TIMEOUT_S_MAX).contains(s))
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        invalid(&format!(
                            "`converge_timeout_s` must be a whole number from \
                             {CONVERGE_TIMEOUT_S_MIN} to {CONVERGE_TIMEOUT_S_MAX}"
                        ))
                    })?,
            ),
        };
        let actuator = match string("throttle")? {
            None => Actuator::default(),
            Some(name) => Actuator::parse(&name).ok_or_else(|| {
                invalid(&format!(
                    "`throttle` must be \"vmm\" (QEMU's auto-converge) or \"cgroup\" (a CFS \
                     quota on the vCPU threads), not {name:?}"
                ))
            })?,
        };
        let to = string("to")?;
        if self.replica.is_some() {
            return Err(refused(
                "this engine receives a replica (--listen): migrate runs on the source engine"
                    .into(),
            ));
        }
        let Some(backend) = &self.backend else {
            return Err(refused(
                "this engine serves no disk to a VMM (no --vhost-socket): nothing to migrate"
                    .into(),
            ));
        };
        let mut migration = lock(&self.migration);
        if let Some(m) = migration.as_ref() {
            let s = m.status();
            if !s.phase.is_final() || !m.is_finished() {
                return Err((
                    ErrorCode::Busy,
                    format!("a migration is in progress ({})", s.phase.name()),
                ));
            }
            if s.phase == crate::migration::source::Phase::Done {
                return Err(refused(
                    "this VM was migrated away already: it runs on the destination".into(),
                ));
            }
        }
        let replicating_to = lock(&self.source).as_ref().map(|d| d.status().to);
        match (replicating_to, &to) {
            (Some(current), Some(to)) if current.to_string() != *to => {
                return Err(refused(format!(
                    "this engine replicates to {current}, not {to}"
                )))
            }
            (Some(_), _) => {}
            (None, Some(to)) => {
                let mut a = Map::new();
                a.insert("to".into(), Value::String(to.clone()));
                self.replicate(&a)?;
            }
            (None, None) => {
                return Err(invalid(
                    "`to` (\"ADDR:PORT\") is required: this engine does not replicate yet",
                ))
            }
        }
        let side = Arc::new(EngineSourceSide {
            backend: backend.clone(),
            source: self.source.clone(),
        });
        let plan = MigratePlan {
            id: random_id(),
            vmm,
            dst_vmm,
            run_dir: self.run_dir.clone(),
            downtime_limit_ms,
            converge_timeout,
            actuator,
        };
        let id = plan.id;
        let started = Migration::start(plan, side).map_err(|e| refused(e.to_string()))?;
        *migration = Some(started);
        Ok(json!({ "id": format!("{id:016x}") }))
    }

    fn migrate_cancel(&self) -> Result<Value, (ErrorCode, String)> {
        let migration = lock(&self.migration);
        match migration.as_ref() {
            Some(m) if !m.status().phase.is_final() => {
                m.cancel();
                Ok(json!({ "phase": m.status().phase.name() }))
            }
            _ => Err((ErrorCode::Refused, "no migration runs".into())),
        }
    }

    fn verify(&self, args: &Map<String, Value>) -> Result<Value, (ErrorCode, String)> {
        let repair = match args.get("repair") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err((ErrorCode::InvalidArgs, "`repair` must be a boolean".into())),
        };
        if args.keys().any(|k| k != "repair") {
            return Err((
                ErrorCode::InvalidArgs,
                "`verify` takes only `repair`".into(),
            ));
        }
        let source = lock(&self.source);
        let Some(driver) = source.as_ref() else {
            let why = if self.replica.is_some() {
                "this engine receives a replica; run verify on the source engine"
            } else {
                "not replicating: start `replicate` first"
            };
            return Err((ErrorCode::Refused, why.into()));
        };
        driver.start_verify(repair).map_err(|refusal| {
            let code = match refusal {
                VerifyRefusal::Running => ErrorCode::Busy,
                VerifyRefusal::NotConnected | VerifyRefusal::NotCopied => ErrorCode::Refused,
            };
            (code, refusal.to_string())
        })?;
        Ok(json!({ "repair": repair }))
    }

    fn stats(&self) -> Value {
        let now = Instant::now();
        let Some(backend) = &self.backend else {
            return json!({ "queues": [], "replication": self.replication_json() });
        };
        let current = backend.stats();
        let uptime_s = backend.status().uptime_s;
        let mut last = self.last_stats.lock().unwrap_or_else(|e| e.into_inner());
        let (interval_s, previous) = match last.as_ref() {
            Some((at, prev)) => (now.duration_since(*at).as_secs_f64(), Some(prev.clone())),
            None => (uptime_s, None),
        };
        let empty = QueueSnapshot::default();
        let mut queues = Vec::new();
        let mut total = QueueSnapshot::default();
        let mut total_prev = QueueSnapshot::default();
        for q in &current {
            let prev = previous
                .as_ref()
                .and_then(|p| p.iter().find(|x| x.index == q.index))
                .map(|x| &x.counters)
                .unwrap_or(&empty);
            let mut entry = queue_json(&q.counters, prev, interval_s);
            entry["index"] = json!(q.index);
            entry["core"] = json!(q.core);
            queues.push(entry);
            total.add(&q.counters);
            total_prev.add(prev);
        }
        *last = Some((now, current));
        json!({
            "uptime_s": uptime_s,
            "interval_s": interval_s,
            "queues": queues,
            "totals": queue_json(&total, &total_prev, interval_s),
        })
    }
}

/// `downtime_ms` of `migrate`: below 50 ms QEMU would never find a moment to switch over
/// across a WAN; above a minute it is no longer a live migration.
const DOWNTIME_MS_MIN: u64 = 50;
const DOWNTIME_MS_MAX: u64 = 60_000;

/// The arguments `migrate` takes.
const MIGRATE_ARGS: [&str; 6] = [
    "vmm",
    "to",
    "dst_vmm",
    "downtime_ms",
    "converge_timeout_s",
    "throttle",
];

/// `converge_timeout_s` of `migrate`: the controller reads QEMU every 0.5 s, so a second is
/// the shortest limit it can keep; a day is longer than anyone watches a guest throttled.
const CONVERGE_TIMEOUT_S_MIN: u64 = 1;
const CONVERGE_TIMEOUT_S_MAX: u64 = 86_400;

/// A random migration id (from the kernel's generator; a clock if that fails, which only
/// weakens the id's uniqueness, not safety: the destination records decisions per id).
fn random_id() -> u64 {
    let mut b = [0u8; 8];
    let from_kernel = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if from_kernel {
        return u64::from_le_bytes(b);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// The migration's view of the serving engine.
struct EngineSourceSide {
    backend: Arc<Backend>,
    source: Arc<Mutex<Option<SourceDriver>>>,
}

impl SourceSide for EngineSourceSide {
    fn replication(&self) -> Option<SourceStatus> {
        lock(&self.source).as_ref().map(SourceDriver::status)
    }

    fn port(&self) -> Option<Arc<Port>> {
        lock(&self.source).as_ref().map(SourceDriver::port)
    }

    fn fence(&self) -> Result<(), String> {
        self.backend.fence(FENCE_TIMEOUT).map_err(|e| e.to_string())
    }

    fn unfence(&self) {
        self.backend.unfence();
    }

    fn demote(&self) {
        if let Some(d) = lock(&self.source).as_ref() {
            d.demote();
        }
    }

    fn undemote(&self) {
        if let Some(d) = lock(&self.source).as_ref() {
            d.undemote();
        }
    }

    fn set_disk_rate_cap(&self, bytes_per_s: u64) {
        if let Some(d) = lock(&self.source).as_ref() {
            d.set_rate_cap(bytes_per_s);
        }
    }
}

impl EngineHandler {
    /// The `migration` object of `status`: null when no migration ran.
    fn migration_json(&self) -> Value {
        if let Some(target) = &self.target {
            let t = target.status();
            return json!({
                "role": "destination",
                "id": t.id.map(|id| format!("{id:016x}")),
                "state": t.state,
                "detail": t.detail,
                "memory_bytes_received": t.memory_bytes,
                "committed_unix_s": t.committed_at_unix_s,
            });
        }
        let migration = lock(&self.migration);
        let Some(m) = migration.as_ref() else {
            return Value::Null;
        };
        let s = m.status();
        let disk = lock(&self.source)
            .as_ref()
            .map_or(Value::Null, |d| source_json(&d.status()));
        let rate = |f: fn(&crate::migration::source::Sample) -> u64| s.timeline.last().map_or(0, f);
        json!({
            "role": "source",
            "id": format!("{:016x}", s.id),
            "phase": s.phase.name(),
            "phases": s.phases.iter().map(|(p, t)| json!({ "phase": p.name(), "at_s": t })).collect::<Vec<_>>(),
            "elapsed_s": s.elapsed_s,
            "disk": disk,
            "memory_transferred_bytes": s.memory_transferred_bytes,
            "memory_remaining_bytes": s.memory_remaining_bytes,
            "memory_total_bytes": s.memory_total_bytes,
            "rates_bytes_per_s": {
                "memory": rate(|x| x.memory_bytes_per_s),
                "mirror": rate(|x| x.mirror_bytes_per_s),
                "bulk": rate(|x| x.bulk_bytes_per_s),
            },
            "bytes": { "memory": s.memory_bytes, "mirror": s.mirror_bytes, "bulk": s.bulk_bytes },
            "throttle": {
                "actuator": s.actuator.name(),
                "asked_pct": s.throttle.throttle_pct,
                "needed_pct": s.throttle.needed_pct,
                "applied_pct": s.applied_throttle_pct,
                "dirty_bytes_per_s": s.throttle.dirty_bytes_per_s,
                "disk_bytes_per_s": s.throttle.disk_bytes_per_s,
                "link_bytes_per_s": s.throttle.link_bytes_per_s,
                "memory_share_bytes_per_s": s.throttle.memory_share_bytes_per_s,
                "disk_share_bytes_per_s": s.throttle.disk_share_bytes_per_s,
                "disk_cap_bytes_per_s": s.throttle.disk_cap_bytes_per_s,
                "saturated": s.throttle.saturated,
            },
            "expected_downtime_ms": s.expected_downtime_ms,
            "vmm_downtime_ms": s.vmm_downtime_ms,
            "switchover_ms": s.switchover_ms,
            "at_stop": s.at_stop.map(|a| json!({
                "memory_queued_bytes": a.memory_queued_bytes,
                "memory_in_flight_bytes": a.memory_in_flight_bytes,
                "mirror_backlog_bytes": a.mirror_backlog_bytes,
                "link_bytes_per_s": a.link_bytes_per_s,
                "srtt_ms": a.srtt_ms,
                "vmm_bytes": a.vmm_bytes,
                "vmm_bytes_after": a.vmm_bytes_after,
                "vmm_downtime_limit_ms": a.vmm_downtime_limit_ms,
            })),
            "error": s.error,
            "timeline": s.timeline.iter().map(|x| json!([
                (x.t_s * 1000.0).round() / 1000.0, x.phase.name(), x.memory_bytes_per_s,
                x.mirror_bytes_per_s, x.bulk_bytes_per_s, x.dirty_bytes_per_s, x.throttle_pct,
                x.applied_throttle_pct, x.mirror_backlog_bytes, x.expected_downtime_ms,
                x.disk_cap_bytes_per_s,
            ])).collect::<Vec<_>>(),
            "timeline_columns": ["t_s", "phase", "memory_bytes_per_s", "mirror_bytes_per_s",
                "bulk_bytes_per_s", "dirty_bytes_per_s", "throttle_pct", "applied_throttle_pct",
                "mirror_backlog_bytes", "expected_downtime_ms", "disk_cap_bytes_per_s"],
        })
    }

    /// The `replication` object of `status`: null when the engine neither sends nor
    /// receives a replica.
    fn replication_json(&self) -> Value {
        if let Some(replica) = &self.replica {
            let s = replica.status();
            let state = if s.promoted {
                "promoted"
            } else if s.connected {
                "receiving"
            } else {
                "waiting"
            };
            return json!({
                "role": "destination",
                "state": state,
                "consistent": s.consistent_at.is_some(),
                "consistent_seq": s.consistent_at,
                "complete": s.complete,
                "listening": replica.local_addr().to_string(),
                "sessions": s.sessions,
                "chunks_applied": s.stats.chunks_applied,
                "chunks_redone": s.stats.chunks_redone,
                "mirror_bytes_applied": s.stats.mirror_bytes_applied,
                "refusals": s.stats.refusals,
                "chunks_hashed": s.stats.chunks_hashed,
                "last_error": s.last_error,
            });
        }
        lock(&self.source)
            .as_ref()
            .map_or(Value::Null, |d| source_json(&d.status()))
    }
}

fn source_json(s: &SourceStatus) -> Value {
    let mut v = json!({
        "role": "source",
        "to": s.to.to_string(),
        "mirror_backlog_bytes": s.mirror_backlog_bytes,
        "writes_mirrored": s.stats.writes_mirrored,
        "writes_tracked": s.stats.writes_tracked,
        "bytes_mirrored": s.stats.bytes_mirrored,
        "chunks_sent": s.stats.chunks_sent,
        "chunks_redone": s.stats.chunks_redone,
        "sessions_lost": s.stats.sessions_lost,
        "full_resyncs": s.stats.full_resyncs,
        "overflowed_writes": s.overflowed_writes,
        "captured_writes": s.captured_writes,
        "accounted_writes": s.accounted_writes,
        "last_error": s.last_error,
        "verify": s.verify.as_ref().map_or(Value::Null, verify_json),
        "demoted": s.demoted,
        "superseded": s.superseded,
        "throttle": {
            "active": s.control.rate_bytes_per_s > 0,
            "rate_bytes_per_s": s.control.rate_bytes_per_s,
            "drain_bytes_per_s": s.control.drain_bytes_per_s,
            "link_bytes_per_s": s.control.link_bytes_per_s,
            "backlog_bytes": s.control.backlog_bytes,
            "backlog_limit_bytes": s.control.budget_bytes,
            "delayed_writes": s.pacer.delayed_writes,
            "delay_ms_total": s.pacer.delay_ns_total as f64 / 1e6,
            "delay_ms_max": s.pacer.delay_ns_max as f64 / 1e6,
        },
    });
    let (state, extra) = match s.state {
        SourceState::Disconnected => ("disconnected", json!({})),
        SourceState::Connecting => ("connecting", json!({})),
        SourceState::Refused(reason) => ("refused", json!({ "reason": reason.to_string() })),
        SourceState::Copying {
            done_bytes,
            total_bytes,
        } => (
            "copying",
            json!({
                "done_bytes": done_bytes,
                "total_bytes": total_bytes,
                "rate_bytes_per_s": s.control.link_bytes_per_s,
            }),
        ),
        SourceState::Resyncing {
            dirty_bytes,
            total_bytes,
        } => (
            "resyncing",
            json!({
                "done_bytes": total_bytes - dirty_bytes,
                "total_bytes": total_bytes,
                "dirty_bytes": dirty_bytes,
                "rate_bytes_per_s": s.control.link_bytes_per_s,
            }),
        ),
        SourceState::Behind { lag_bytes } => {
            // The RPO: how long the destination needs to catch up at the drain rate.
            let drain = s.control.drain_bytes_per_s;
            let lag_seconds = (drain > 0).then(|| lag_bytes as f64 / drain as f64);
            (
                "behind",
                json!({ "lag_bytes": lag_bytes, "lag_seconds": lag_seconds }),
            )
        }
        SourceState::InSync => ("in-sync", json!({})),
    };
    v["state"] = json!(state);
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    v
}

/// The `verify` object of a source's `replication` status.
fn verify_json(v: &VerifyReport) -> Value {
    let ranges = |list: &[ByteRange]| -> Vec<Value> {
        list.iter()
            .map(|r| json!({ "offset": r.offset, "len": r.len }))
            .collect()
    };
    let (state, error) = match &v.state {
        VerifyState::Running => ("running", None),
        VerifyState::Done => ("done", None),
        VerifyState::Failed(why) => ("failed", Some(why.clone())),
    };
    let seconds = |ns: u64| ns as f64 / 1e9;
    json!({
        "state": state,
        "error": error,
        "repair": v.repair,
        "chunk_bytes": CHUNK_BYTES,
        "chunks_total": v.chunks_total,
        "chunks_checked": v.chunks_checked,
        "mismatch_chunks": v.mismatch_chunks,
        "mismatches": ranges(&v.mismatches),
        "busy_chunks": v.busy_chunks,
        "busy": ranges(&v.busy),
        "unconfirmed": v.unconfirmed,
        "changed": v.changed,
        "passes": v.passes,
        "requests": v.requests,
        "started_unix_s": seconds(v.started_ns),
        "finished_unix_s": v.finished_ns.map(seconds),
    })
}

/// A 16-byte identity from some fields (FNV-1a, twice with different offsets): stable for
/// the same inputs, not a secret.
fn id_of(parts: &[&[u8]]) -> [u8; 16] {
    let mut out = [0; 16];
    for (half, basis) in [0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142]
        .iter()
        .enumerate()
    {
        let mut h = *basis;
        for part in parts {
            for b in part.iter().chain(&[0xff]) {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        out[half * 8..half * 8 + 8].copy_from_slice(&h.to_le_bytes());
    }
    out
}

/// One queue's figures: counters since start, rates and latency over the interval.
fn queue_json(now: &QueueSnapshot, before: &QueueSnapshot, interval_s: f64) -> Value {
    let rate = |a: u64, b: u64| {
        if interval_s > 0.0 {
            a.saturating_sub(b) as f64 / interval_s
        } else {
            0.0
        }
    };
    let window = now.latency.since(&before.latency);
    let us = |q: f64| window.quantile_ns(q) / 1_000;
    json!({
        "requests": now.requests,
        "reads": now.reads,
        "writes": now.writes,
        "flushes": now.flushes,
        "discards": now.discards,
        "write_zeroes": now.write_zeroes,
        "get_id": now.get_id,
        "bytes_read": now.bytes_read,
        "bytes_written": now.bytes_written,
        "iops": rate(now.requests, before.requests),
        "read_bytes_per_s": rate(now.bytes_read, before.bytes_read),
        "write_bytes_per_s": rate(now.bytes_written, before.bytes_written),
        "latency_us": {
            "p50": us(0.5),
            "p90": us(0.9),
            "p99": us(0.99),
            "p999": us(0.999),
            "max": now.latency.max_ns() / 1_000,
        },
        "errors": now.errors,
    })
}
