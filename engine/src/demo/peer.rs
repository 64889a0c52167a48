//! `strait demo --system qemu`: the peer strait is measured against. No engine: QEMU moves
//! the disk and the memory itself, driven over QMP the way libvirt drives QEMU for
//! `virsh migrate --live --copy-storage-all`, across the same emulated WAN, with the same
//! guest and workload; the demo's report and checks then apply unchanged.
//!
//! The sequence (S: the source QEMU in namespace A; D: the destination QEMU in namespace B,
//! started with `-incoming defer -S`; both QMP sockets reached from the root namespace):
//!
//! 1. D: `nbd-server-start` on B's address, `block-export-add` of its disk node (NBD,
//!    writable); `migrate-set-capabilities events`; `migrate-incoming tcp:B:PORT`.
//! 2. S: `blockdev-add` an NBD client node for D's export; `blockdev-mirror sync=full
//!    copy-mode=background|write-blocking` from the disk node to it; the job copies the
//!    whole disk, then reports `ready` (phase `disk`).
//! 3. S: capabilities `events`, `pause-before-switchover` (libvirt sets it with NBD, so that
//!    it finishes the block jobs while the source is paused), `auto-converge`; parameters
//!    `downtime-limit` (strait's default) and `max-bandwidth` uncapped (as strait and
//!    libvirt do: the link limits); `migrate tcp:B:PORT` (phase `memory`).
//! 4. S reaches `pre-switchover`, its vCPUs stopped: `block-job-cancel` of the ready mirror
//!    (for a ready mirror that completes it: the target holds every write), wait until the
//!    job concluded, `job-dismiss`, `migrate-continue` (phase `switchover`).
//! 5. S `completed`, then D's incoming migration `completed` (phase `completing`):
//!    D `nbd-server-stop` and `cont`: the VM runs on the destination (phase `done`). S drops
//!    its NBD node.
//!
//! Whatever fails (a QMP command, the block job, the migration, a QEMU, a bound reached)
//! ends the migration as `failed` with what QEMU said, and the source is told to cancel
//! the migration and the mirror, so that the VM goes on there; the report says it did not
//! survive. The times and rates go into a `migration` object shaped like strait's
//! `status.migration` (phases with `at_s`, `timeline_columns` and `timeline`, `bytes`,
//! `vmm_downtime_ms`, `switchover_ms`, `elapsed_s`), so the report and the chart read both.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strait_vmm::qmp::{QmpClient, QmpConfig};

use super::report::{Check, Recording};
use super::rig::{NoEngines, Rig, DISK_NODE};
use super::{
    finish, guest_line, say, watch_source, DemoError, Interrupt, Plan, BASELINE, PROGRESS_INTERVAL,
};
use crate::cli::CopyMode;

/// D's NBD server port inside namespace B: NBD's registered port (a fresh namespace:
/// nothing else listens there).
const NBD_PORT: u16 = 10809;
/// D's incoming migration port: the first of libvirt's default migration range.
const MIGRATION_PORT: u16 = 49152;
/// The NBD export's name, and the source's client node for it.
const EXPORT_NAME: &str = "strait-peer-disk";
const NBD_NODE: &str = "strait-peer-nbd";
/// The mirror job's id.
const MIRROR_JOB: &str = "strait-peer-mirror";
/// The downtime QEMU aims for: what strait's migration asks QEMU for by default (its
/// `migrate --downtime-ms`), so both systems get the same target.
const DOWNTIME_LIMIT_MS: u64 = crate::migration::source::DOWNTIME_LIMIT_MS_DEFAULT;
/// No bandwidth cap from QEMU itself (its default is 128 MiB/s): libvirt lifts it unless
/// told a bandwidth, and strait lifts it too; the link is the limit.
const UNCAPPED_BYTES_PER_S: u64 = 1 << 36;
/// A row of the timeline this often: the resolution of strait's own timeline.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest wait for one QMP event before the loop looks at everything else: short, since
/// the time from `pre-switchover` to `migrate-continue` is downtime.
const EVENT_WAIT: Duration = Duration::from_millis(20);
/// Timeline rows kept: two a second over the longest migration bound the demo sets (a few
/// minutes at the slowest link) with a wide margin.
const TIMELINE_ROWS_MAX: usize = 4000;
/// QEMU creates its QMP socket before it listens on it; the rig waited for the file
/// already, so this only covers the moment in between on a loaded machine.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each QMP command's reply: QEMU answers within milliseconds unless its main loop is
/// starved (two TCG guests on 2 cores); `blockdev-add` connects to the NBD server across
/// the WAN first (a few round trips).
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The image comparison reads this much at a time.
const COMPARE_CHUNK_BYTES: usize = 1 << 20;
/// The guest's DMA range (`MIGRATE_DMA_BYTES` in `scripts/guest/init.sh`).
const DMA_BYTES: u64 = super::DMA_BYTES;

/// The columns of the timeline, named as in strait's `status.migration.timeline`.
const TIMELINE_COLUMNS: [&str; 10] = [
    "t_s",
    "phase",
    "memory_bytes_per_s",
    "mirror_bytes_per_s",
    "bulk_bytes_per_s",
    "dirty_bytes_per_s",
    "throttle_pct",
    "applied_throttle_pct",
    "mirror_backlog_bytes",
    "expected_downtime_ms",
];

/// Which QEMU a command goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Src => "source QEMU",
            Side::Dst => "destination QEMU",
        }
    }
}

/// The mirror job as `query-block-jobs` (or its events) last showed it.
#[derive(Clone, Debug, Default)]
struct Mirror {
    offset: u64,
    len: u64,
    ready: bool,
    /// The job's bytes copied when it became ready: the whole disk, once (`bulk`).
    offset_at_ready: Option<u64>,
    /// The job's status (`running`, `ready`, `concluded`, ...).
    status: String,
    /// Why it failed, once it did.
    error: Option<String>,
}

/// One sample's counters, for the next sample's rates.
#[derive(Clone, Copy, Debug)]
struct Counters {
    at: Instant,
    ram_transferred: u64,
    mirror_offset: u64,
}

/// The QMP side of the peer's migration, and what it recorded.
struct Driver {
    src: QmpClient,
    dst: QmpClient,
    addr_b: String,
    migrate_at: Instant,
    /// `(phase, seconds since migrate_at)`. Invariant: in time order, one per phase of
    /// the module's sequence (at most six).
    phases: Vec<(String, f64)>,
    /// Invariant: at most [`TIMELINE_ROWS_MAX`].
    rows: Vec<Value>,
    last: Option<Counters>,
    next_sample: Instant,
    next_print: Instant,
    mirror: Mirror,
    /// The source's migration status as its events and `query-migrate` say.
    status: String,
    /// The source's last `query-migrate`.
    info: Value,
    /// When the source reached `pre-switchover` (its vCPUs stopped).
    paused_at: Option<Instant>,
}

/// Runs the demo with `--system qemu`: the rig, the workload's baseline, the migration
/// of the module's sequence, then what strait's demo does after a migration.
pub fn drive(
    plan: &Plan,
    mode: CopyMode,
    dir: &Path,
    interrupt: &Interrupt,
) -> Result<Recording, DemoError> {
    let mut rig = Rig::start_qemu_peer(plan, dir, interrupt)?;
    let first_heartbeat = super::wait_for_workload(&mut rig, interrupt)?;
    watch_source(&mut rig, first_heartbeat + BASELINE, interrupt)?;
    let mut driver = Driver::connect(&rig)?;
    let wire_before = rig.wire_now();
    let migrate_at = Instant::now();
    driver.migrate_at = migrate_at;
    say(&format!(
        "migrate  QEMU to QEMU, disk by NBD mirror (copy-mode {}), memory by QEMU's migrate \
         to tcp:{}:{MIGRATION_PORT}, {:.1} s after the link came up",
        mode.qmp_name(),
        driver.addr_b,
        migrate_at.duration_since(rig.link_up).as_secs_f64()
    ));
    let deadline = migrate_at + plan.migration_timeout();
    let outcome = driver.run(&mut rig, plan, mode, deadline, interrupt);
    let error = match outcome {
        Ok(()) => None,
        Err(DemoError::Interrupted) => return Err(DemoError::Interrupted),
        Err(e) => {
            let message = error_chain(&e);
            say(&format!(
                "{:>6.1} s failed: {message}",
                migrate_at.elapsed().as_secs_f64()
            ));
            driver.abandon();
            Some(message)
        }
    };
    let migration = driver.migration(error.as_deref());
    let detail = driver.detail(mode);
    let mut recording = Recording::new(plan, rig.link_up, first_heartbeat, migrate_at, migration);
    recording.wire_during = Some((wire_before, rig.wire_now()));
    recording.system_detail = detail;
    let (src_image, dst_image) = (rig.src_image.clone(), rig.dst_image.clone());
    drop(driver);
    let mut recording = finish(rig, plan, recording, interrupt)?;
    if recording.committed() {
        let check = image_check(&recording, &src_image, &dst_image)?;
        recording.extra_checks.push(check);
    }
    Ok(recording)
}

/// An error with its sources, one line: what QEMU said is at the end of the chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Driver {
    fn connect(rig: &Rig<NoEngines>) -> Result<Driver, DemoError> {
        let config = QmpConfig {
            connect_timeout: QMP_CONNECT_TIMEOUT,
            command_timeout: QMP_COMMAND_TIMEOUT,
            ..QmpConfig::default()
        };
        let connect = |side: Side, path: &Path| {
            QmpClient::connect_with(path, config.clone()).map_err(|source| DemoError::Qmp {
                qemu: side.name(),
                command: "(connect)".into(),
                source: Box::new(source),
            })
        };
        let now = Instant::now();
        Ok(Driver {
            src: connect(Side::Src, &rig.src_qemu.driver_qmp)?,
            dst: connect(Side::Dst, &rig.dst_qemu.driver_qmp)?,
            addr_b: rig.wanem.addr_b().to_string(),
            migrate_at: now,
            phases: Vec::new(),
            rows: Vec::new(),
            last: None,
            next_sample: now,
            next_print: now,
            mirror: Mirror::default(),
            status: "none".into(),
            info: Value::Null,
            paused_at: None,
        })
    }

    fn qmp(&self, side: Side, command: &str, arguments: Option<Value>) -> Result<Value, DemoError> {
        let client = match side {
            Side::Src => &self.src,
            Side::Dst => &self.dst,
        };
        client
            .execute::<Value>(command, arguments)
            .map_err(|source| DemoError::Qmp {
                qemu: side.name(),
                command: command.to_owned(),
                source: Box::new(source),
            })
    }

    fn since_start_s(&self) -> f64 {
        self.migrate_at.elapsed().as_secs_f64()
    }

    fn enter(&mut self, phase: &str) {
        self.phases.push((phase.to_owned(), self.since_start_s()));
    }

    fn phase(&self) -> &str {
        self.phases.last().map_or("none", |p| p.0.as_str())
    }

    /// Steps 1 to 5 of the module's sequence.
    fn run(
        &mut self,
        rig: &mut Rig<NoEngines>,
        plan: &Plan,
        mode: CopyMode,
        deadline: Instant,
        interrupt: &Interrupt,
    ) -> Result<(), DemoError> {
        self.enter("disk");
        let b = self.addr_b.clone();
        self.qmp(
            Side::Dst,
            "nbd-server-start",
            Some(json!({"addr": {"type": "inet", "data": {"host": b, "port": NBD_PORT.to_string()}}})),
        )?;
        self.qmp(
            Side::Dst,
            "block-export-add",
            Some(
                json!({"type": "nbd", "id": EXPORT_NAME, "node-name": DISK_NODE,
                        "name": EXPORT_NAME, "writable": true}),
            ),
        )?;
        self.set_capabilities(Side::Dst, &["events"])?;
        let uri = format!("tcp:{b}:{MIGRATION_PORT}");
        self.qmp(Side::Dst, "migrate-incoming", Some(json!({"uri": uri})))?;
        self.qmp(
            Side::Src,
            "blockdev-add",
            Some(
                json!({"driver": "nbd", "node-name": NBD_NODE, "export": EXPORT_NAME,
                        "server": {"type": "inet", "host": b, "port": NBD_PORT.to_string()}}),
            ),
        )?;
        self.qmp(
            Side::Src,
            "blockdev-mirror",
            Some(
                json!({"job-id": MIRROR_JOB, "device": DISK_NODE, "target": NBD_NODE,
                        "sync": "full", "copy-mode": mode.qmp_name(), "auto-dismiss": false}),
            ),
        )?;
        self.wait(
            rig,
            plan,
            "the mirror to be ready",
            deadline,
            interrupt,
            |d| Ok(d.mirror.ready),
        )?;
        self.set_capabilities(
            Side::Src,
            &["events", "pause-before-switchover", "auto-converge"],
        )?;
        self.qmp(
            Side::Src,
            "migrate-set-parameters",
            Some(
                json!({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": UNCAPPED_BYTES_PER_S}),
            ),
        )?;
        self.enter("memory");
        self.qmp(Side::Src, "migrate", Some(json!({"uri": uri})))?;
        self.wait(
            rig,
            plan,
            "QEMU's pre-switchover",
            deadline,
            interrupt,
            |d| Ok(d.status == "pre-switchover"),
        )?;
        self.switch_over(rig, plan, deadline, interrupt)?;
        self.wait(
            rig,
            plan,
            "the source's completed",
            deadline,
            interrupt,
            |d| Ok(d.status == "completed"),
        )?;
        self.wait_destination(rig, deadline, interrupt)?;
        self.qmp(Side::Dst, "nbd-server-stop", None)?;
        self.qmp(Side::Dst, "cont", None)?;
        self.enter("done");
        say(&format!(
            "{:>6.1} s done: the destination QEMU runs",
            self.since_start_s()
        ));
        // The source no longer needs its client of a server that is gone; a failure here
        // changes nothing for the VM.
        if let Err(e) = self.qmp(
            Side::Src,
            "blockdev-del",
            Some(json!({"node-name": NBD_NODE})),
        ) {
            tracing::warn!(error = %error_chain(&e), "the source kept its NBD node");
        }
        self.sample();
        Ok(())
    }

    /// Step 4: the source is paused at `pre-switchover`; the mirror is completed (every
    /// write it holds reaches the destination), then QEMU may finish.
    fn switch_over(
        &mut self,
        rig: &mut Rig<NoEngines>,
        plan: &Plan,
        deadline: Instant,
        interrupt: &Interrupt,
    ) -> Result<(), DemoError> {
        self.paused_at.get_or_insert_with(Instant::now);
        self.enter("switchover");
        self.qmp(
            Side::Src,
            "block-job-cancel",
            Some(json!({"device": MIRROR_JOB})),
        )?;
        let status = self.wait(
            rig,
            plan,
            "the mirror to complete",
            deadline,
            interrupt,
            Driver::job_status,
        )?;
        if let Some(error) = status {
            return Err(DemoError::QemuMigration {
                reason: format!("the mirror job ended with an error: {error}"),
            });
        }
        self.qmp(Side::Src, "job-dismiss", Some(json!({"id": MIRROR_JOB})))?;
        self.qmp(
            Side::Src,
            "migrate-continue",
            Some(json!({"state": "pre-switchover"})),
        )?;
        self.enter("completing");
        Ok(())
    }

    /// The mirror job once it concluded: `Some(Some(error))` if it failed, `Some(None)`
    /// if it completed, `None` while it runs.
    fn job_status(&mut self) -> Result<Option<Option<String>>, DemoError> {
        let jobs = self.qmp(Side::Src, "query-block-jobs", None)?;
        let job = jobs
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["device"] == MIRROR_JOB));
        let Some(job) = job else {
            return Ok(Some(Some("the mirror job vanished".into())));
        };
        self.take_job(job);
        match job["status"].as_str() {
            Some("concluded" | "null") => Ok(Some(job["error"].as_str().map(str::to_owned))),
            _ => Ok(None),
        }
    }

    fn set_capabilities(&self, side: Side, names: &[&str]) -> Result<(), DemoError> {
        let list: Vec<Value> = names
            .iter()
            .map(|name| json!({"capability": name, "state": true}))
            .collect();
        self.qmp(
            side,
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )?;
        Ok(())
    }

    /// Samples, prints and takes events until `done` says so (`Ok(Some(value))` or
    /// `Ok(true)`), failing on a failed migration or block job, a dead QEMU, the deadline.
    fn wait<T: Waited>(
        &mut self,
        rig: &mut Rig<NoEngines>,
        plan: &Plan,
        what: &str,
        deadline: Instant,
        interrupt: &Interrupt,
        mut done: impl FnMut(&mut Driver) -> Result<T, DemoError>,
    ) -> Result<T::Value, DemoError> {
        loop {
            interrupt.check()?;
            rig.sample_wire();
            if rig.src_qemu.console.verdict().is_some() {
                // For strait this is the demo's own misconfiguration; QEMU's mirror, though,
                // may never be ready while the guest writes (it reports ready only once no
                // block is dirty and no copy is in flight, and over a WAN every copy takes
                // a round trip while the guest writes every few milliseconds): a migration
                // that did not complete, reported as such.
                return Err(DemoError::QemuMigration {
                    reason: format!(
                        "the guest's {} s workload ended on the source while QEMU was still \
                         waiting for {what} (phase {}, {:.0} s after the start; mirror \
                         {} of {} bytes copied, ready: {})",
                        plan.workload_s,
                        self.phase(),
                        self.since_start_s(),
                        self.mirror.offset,
                        self.mirror.len,
                        self.mirror.ready
                    ),
                });
            }
            self.ensure_qemus(rig)?;
            if Instant::now() >= self.next_sample {
                self.sample();
                self.next_sample = Instant::now() + SAMPLE_INTERVAL;
            }
            if ["failed", "cancelled", "cancelling"].contains(&self.status.as_str()) {
                let why = self.info["error-desc"]
                    .as_str()
                    .unwrap_or("no reason given");
                return Err(DemoError::QemuMigration {
                    reason: format!("QEMU's migration {}: {why}", self.status),
                });
            }
            if let Some(error) = &self.mirror.error {
                return Err(DemoError::QemuMigration {
                    reason: format!("the mirror job failed: {error}"),
                });
            }
            if let Some(value) = done(self)?.value() {
                return Ok(value);
            }
            if Instant::now() >= self.next_print {
                self.print_progress(rig);
                self.next_print += PROGRESS_INTERVAL;
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: format!("{what} (phase {})", self.phase()),
                    timeout: deadline.duration_since(self.migrate_at),
                    log: String::new(),
                });
            }
            self.take_event()?;
        }
    }

    /// A QEMU that exited ends the migration (an incoming migration that fails makes the
    /// destination QEMU exit, with the reason in its log).
    fn ensure_qemus(&self, rig: &mut Rig<NoEngines>) -> Result<(), DemoError> {
        rig.src_qemu.process.ensure_running()?;
        rig.dst_qemu.process.ensure_running()
    }

    /// Waits up to [`EVENT_WAIT`] for an event of the source and takes what it says.
    fn take_event(&mut self) -> Result<(), DemoError> {
        let event = self
            .src
            .next_event(EVENT_WAIT)
            .map_err(|source| DemoError::Qmp {
                qemu: Side::Src.name(),
                command: "(events)".into(),
                source: Box::new(source),
            })?;
        let Some(event) = event else {
            return Ok(());
        };
        match event.name.as_str() {
            "MIGRATION" => {
                if let Some(status) = event.data["status"].as_str() {
                    self.status = status.to_owned();
                    if status == "pre-switchover" {
                        self.paused_at.get_or_insert_with(Instant::now);
                    }
                }
            }
            "BLOCK_JOB_READY" if event.data["device"] == MIRROR_JOB => {
                self.take_job(&event.data);
                self.mirror.ready = true;
            }
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR" if event.data["device"] == MIRROR_JOB => {
                self.take_job(&event.data);
            }
            _ => {}
        }
        Ok(())
    }

    /// A mirror job's `offset`, `len` and `ready`, from `query-block-jobs` or an event.
    fn take_job(&mut self, job: &Value) {
        if let Some(status) = job["status"].as_str() {
            status.clone_into(&mut self.mirror.status);
        }
        if let Some(error) = job["error"].as_str() {
            self.mirror.error = Some(error.to_owned());
        }
        if let Some(offset) = job["offset"].as_u64() {
            self.mirror.offset = offset;
        }
        if let Some(len) = job["len"].as_u64() {
            self.mirror.len = len;
        }
        if job["ready"].as_bool() == Some(true) || job["status"] == "ready" {
            self.mirror.ready = true;
        }
        if self.mirror.ready && self.mirror.offset_at_ready.is_none() {
            self.mirror.offset_at_ready = Some(self.mirror.offset);
        }
    }

    /// One timeline row: `query-migrate` and `query-block-jobs` of the source, rates
    /// since the previous row. A failed query leaves the row out (the next one covers the
    /// interval).
    fn sample(&mut self) {
        let Ok(info) = self.qmp(Side::Src, "query-migrate", None) else {
            return;
        };
        // Events are faster; the query fills in what an event may have missed.
        if let Some(status) = info["status"].as_str() {
            status.clone_into(&mut self.status);
        }
        if let Ok(jobs) = self.qmp(Side::Src, "query-block-jobs", None) {
            if let Some(job) = jobs
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["device"] == MIRROR_JOB))
            {
                self.take_job(job);
            }
        }
        let now = Counters {
            at: Instant::now(),
            ram_transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            mirror_offset: self.mirror.offset,
        };
        self.info = info;
        let Some(last) = self.last.replace(now) else {
            return;
        };
        let dt = now.at.duration_since(last.at).as_secs_f64();
        if dt <= 0.0 || self.rows.len() >= TIMELINE_ROWS_MAX {
            return;
        }
        let rate = |a: u64, b: u64| (b.saturating_sub(a) as f64 / dt).round();
        let disk_rate = rate(last.mirror_offset, now.mirror_offset);
        let ready = self.mirror.offset_at_ready.is_some();
        let ram = &self.info["ram"];
        let dirty = ram["dirty-pages-rate"].as_f64().unwrap_or(0.0)
            * ram["page-size"].as_f64().unwrap_or(0.0);
        let throttle = self.info["cpu-throttle-percentage"].as_f64().unwrap_or(0.0);
        let backlog = if ready {
            self.mirror.len.saturating_sub(self.mirror.offset)
        } else {
            0
        };
        self.rows.push(json!([
            (now.at.duration_since(self.migrate_at).as_secs_f64() * 1e3).round() / 1e3,
            self.phase(),
            rate(last.ram_transferred, now.ram_transferred),
            if ready { disk_rate } else { 0.0 },
            if ready { 0.0 } else { disk_rate },
            dirty,
            throttle,
            throttle,
            backlog,
            self.info["expected-downtime"].as_f64().unwrap_or(0.0),
        ]));
    }

    fn print_progress(&self, rig: &Rig<NoEngines>) {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let ram = self.info["ram"]["transferred"].as_u64().unwrap_or(0);
        say(&format!(
            "{:>6.1} s {} | mirror {:.1}/{:.1} MiB{}, memory {:.1} MiB sent, QEMU {}{} | {}",
            self.since_start_s(),
            self.phase(),
            mib(self.mirror.offset),
            mib(self.mirror.len),
            if self.mirror.ready { " ready" } else { "" },
            mib(ram),
            self.status,
            self.info["cpu-throttle-percentage"]
                .as_u64()
                .map(|t| format!(", throttle {t}%"))
                .unwrap_or_default(),
            guest_line(rig)
        ));
    }

    /// Step 5's wait: the destination's incoming migration completed (its events, or its
    /// `query-migrate` when none came).
    fn wait_destination(
        &mut self,
        rig: &mut Rig<NoEngines>,
        deadline: Instant,
        interrupt: &Interrupt,
    ) -> Result<(), DemoError> {
        let mut next_query = Instant::now();
        loop {
            interrupt.check()?;
            rig.dst_qemu.process.ensure_running()?;
            let event = self
                .dst
                .next_event(EVENT_WAIT)
                .map_err(|source| DemoError::Qmp {
                    qemu: Side::Dst.name(),
                    command: "(events)".into(),
                    source: Box::new(source),
                })?;
            if let Some(event) = event {
                if event.name == "MIGRATION" && event.data["status"] == "completed" {
                    return Ok(());
                }
            }
            if Instant::now() >= next_query {
                let info = self.qmp(Side::Dst, "query-migrate", None)?;
                match info["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some("failed") => {
                        return Err(DemoError::QemuMigration {
                            reason: format!(
                                "the destination's incoming migration failed: {}",
                                info["error-desc"].as_str().unwrap_or("no reason given")
                            ),
                        })
                    }
                    _ => {}
                }
                next_query += SAMPLE_INTERVAL;
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: "the destination's incoming migration to complete".into(),
                    timeout: deadline.duration_since(self.migrate_at),
                    log: rig.dst_qemu.process.log_tail(),
                });
            }
        }
    }

    /// After a failure: the source cancels the migration and the mirror, so the VM goes
    /// on there (best effort: each may have ended already).
    fn abandon(&mut self) {
        self.enter("failed");
        for (command, arguments) in [
            ("migrate_cancel", None),
            (
                "block-job-cancel",
                Some(json!({"device": MIRROR_JOB, "force": true})),
            ),
            ("migrate-continue", Some(json!({"state": "pre-switchover"}))),
        ] {
            if let Err(e) = self.qmp(Side::Src, command, arguments) {
                tracing::debug!(command, error = %error_chain(&e), "abandoning the peer's migration");
            }
        }
        self.sample();
    }

    /// The migration as strait's `status.migration` shapes it.
    fn migration(&self, error: Option<&str>) -> Value {
        let committed = error.is_none() && self.phase() == "done";
        let end_s = self.phases.last().map_or(0.0, |p| p.1);
        let offset_at_ready = self.mirror.offset_at_ready.unwrap_or(self.mirror.offset);
        let switchover_ms = self.paused_at.filter(|_| committed).map(|at| {
            let done = self.migrate_at + Duration::from_secs_f64(end_s);
            (done.saturating_duration_since(at).as_secs_f64() * 1e4).round() / 10.0
        });
        json!({
            "id": Value::Null,
            "phase": if committed { "done" } else { "failed" },
            "error": error,
            "elapsed_s": end_s,
            "phases": self.phases.iter().map(|(p, at)| json!({"phase": p, "at_s": at})).collect::<Vec<_>>(),
            "bytes": {
                "memory": self.info["ram"]["transferred"].as_u64(),
                "mirror": self.mirror.offset.saturating_sub(offset_at_ready),
                "bulk": offset_at_ready,
            },
            "vmm_downtime_ms": self.info["downtime"],
            "switchover_ms": switchover_ms,
            "timeline_columns": TIMELINE_COLUMNS,
            "timeline": self.rows,
        })
    }

    /// QEMU's own figures, for the report's `system_detail`.
    fn detail(&self, mode: CopyMode) -> Value {
        json!({
            "copy_mode": mode.qmp_name(),
            "downtime_limit_ms": DOWNTIME_LIMIT_MS,
            "query_migrate": self.info,
            "mirror": {
                "len": self.mirror.len,
                "offset": self.mirror.offset,
                "offset_at_ready": self.mirror.offset_at_ready,
            },
        })
    }
}

/// What a [`Driver::wait`] condition yields: `true`, or a value once there is one.
trait Waited {
    type Value;
    fn value(self) -> Option<Self::Value>;
}

impl Waited for bool {
    type Value = ();
    fn value(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Waited for Option<T> {
    type Value = T;
    fn value(self) -> Option<T> {
        self
    }
}

/// The check only the QEMU peer has: the destination image equals the source's (frozen
/// since the switchover) everywhere but the guest's region and DMA range, which the guest
/// went on writing on the destination and which the guest's own checks cover. Shows that
/// the mirror copied the whole disk.
fn image_check(rec: &Recording, src: &Path, dst: &Path) -> Result<Check, DemoError> {
    let number = |key: &str| {
        rec.guest_results
            .get(key)
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut excluded = Vec::new();
    if let (Some(offset), Some(length)) = (number("offset"), number("length")) {
        excluded.push((offset, length));
    }
    if let Some(offset) = number("dma_offset").filter(|o| *o > 0) {
        excluded.push((offset, DMA_BYTES));
    }
    let (compared, differs) = compare_outside(src, dst, &excluded)?;
    Ok(Check {
        name: "image_copied",
        passed: differs.is_none() && !excluded.is_empty(),
        detail: match differs {
            None if excluded.is_empty() => {
                "the guest did not report its region, so the images were not compared".into()
            }
            None => format!(
                "the destination image equals the source's outside the guest's region and DMA \
                 range ({compared} bytes compared)"
            ),
            Some(at) => format!("the destination image differs from the source's at byte {at}"),
        },
    })
}

/// Compares two files outside the `(offset, length)` ranges; returns the bytes compared
/// and the first differing offset, if any (files of different lengths differ at the
/// shorter one's end).
fn compare_outside(
    a: &Path,
    b: &Path,
    excluded: &[(u64, u64)],
) -> Result<(u64, Option<u64>), DemoError> {
    use std::io::Read;
    let open = |path: &Path| std::fs::File::open(path).map_err(|e| DemoError::io("open", path, e));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (
        vec![0u8; COMPARE_CHUNK_BYTES],
        vec![0u8; COMPARE_CHUNK_BYTES],
    );
    let mut position = 0u64;
    let mut compared = 0u64;
    let skipped = |at: u64| {
        excluded
            .iter()
            .any(|(offset, length)| at >= *offset && at - offset < *length)
    };
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| DemoError::io("read", a, e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| DemoError::io("read", b, e))?;
        let n = na.min(nb);
        for i in 0..n {
            let at = position + i as u64;
            if skipped(at) {
                continue;
            }
            compared += 1;
            if ba[i] != bb[i] {
                return Ok((compared, Some(at)));
            }
        }
        if na != nb {
            return Ok((compared, Some(position + n as u64)));
        }
        if n == 0 {
            return Ok((compared, None));
        }
        position += n as u64;
    }

    fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn images_are_compared_outside_the_excluded_ranges_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut bytes = vec![7u8; 3 * COMPARE_CHUNK_BYTES + 10];
        std::fs::write(&a, &bytes).unwrap();
        // Different inside the excluded range, across a chunk boundary.
        let start = COMPARE_CHUNK_BYTES - 5;
        bytes[start..start + 10].fill(9);
        std::fs::write(&b, &bytes).unwrap();
        let excluded = [(start as u64, 10)];
        let (compared, differs) = compare_outside(&a, &b, &excluded).unwrap();
        assert_eq!(differs, None);
        assert_eq!(compared, bytes.len() as u64 - 10);
        // One byte outside it.
        bytes[start + 10] = 9;
        std::fs::write(&b, &bytes).unwrap();
        let (_, differs) = compare_outside(&a, &b, &excluded).unwrap();
        assert_eq!(differs, Some(start as u64 + 10));
        // A shorter file differs at its end.
        std::fs::write(&b, &bytes[..100]).unwrap();
        let (_, differs) = compare_outside(&a, &b, &[]).unwrap();
        assert_eq!(differs, Some(100));
    }

    #[test]
    fn an_error_shows_its_causes() {
        let e = DemoError::io(
            "open",
            "/x",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(error_chain(&e), "failed to open /x: gone");
    }
}
