//! `strait demo`: the product's main job on one machine. A small Linux guest boots under
//! QEMU (TCG) on a disk served by a source engine, runs a workload that proves continuity
//! (a counter in memory, one O_DIRECT block write and one console heartbeat per step,
//! memory dirtied in a loop), and is live-migrated, disk and memory, to a destination
//! engine across an emulated WAN (`strait wanem`) with the control API's `migrate`. Then
//! the demo shows that the guest went on over there: the counter continues, and at the end
//! the guest reads its blocks back and the destination image on the host holds the same
//! bytes. It prints a progress line per second, a report, and writes an SVG chart of the
//! migration's timeline (`docs/demo.md`).
//!
//! 1. Preflight: the guest's files, QEMU, root (the WAN emulator makes network namespaces).
//! 2. The rig (`rig.rs`): the link, both engines, both QEMUs (the destination paused,
//!    `-incoming defer -S`).
//! 3. The workload starts on the source; a few seconds of it give the baseline rate.
//! 4. `migrate`; `status.migration` followed until it ends.
//! 5. On the destination: heartbeats, then the guest's verdict; the md5 of the region in
//!    the destination image.
//! 6. Every child stopped; the report (`report.rs`) and the chart (`svg.rs`).
//!
//! `--system qemu` runs the peer strait is compared with instead (`peer.rs`): no engine;
//! QEMU mirrors the disk over NBD and migrates its memory over TCP, as libvirt does for
//! `--copy-storage-all`, across the same link, with the same guest, workload, report and
//! checks.

mod children;
mod console;
mod peer;
mod pin;
mod report;
mod rig;
mod svg;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use strait_net::tls::TlsError;
use strait_net::wanem::WanemError;
use strait_vmm::{QemuVmm, RunState, Vmm};

use crate::cli::{CopyMode, DemoArgs, DemoSystem};
use crate::control::ControlError;
use crate::migration::stun::Actuator;
use console::Verdict;
use pin::CpuSplit;
use report::{Recording, Report};
use rig::{Backend, Engines, Rig, DISK_BYTES, GUEST_MEMORY_BYTES};

/// `--rtt-ms`: a transatlantic path.
pub const RTT_MS_DEFAULT: u32 = 100;
/// `--rate-mbit`: what the WAN emulator's forwarder sustains on 2 busy cores beside two TCG
/// guests and two engines (1000 Mbit/s is the product's target link, but here the cores
/// would be the bottleneck, not the link).
pub const RATE_MBIT_DEFAULT: u32 = 200;
/// `--workload-s`: boot and the baseline (about 10 s), the migration (about 15 s at 200
/// Mbit/s for the 256 MiB guest, more on a loaded machine), then about 20 s on the
/// destination.
pub const WORKLOAD_S_DEFAULT: u32 = 60;
/// The guest's own bound (`MIGRATE_SECONDS_MAX` in `scripts/guest/init.sh`).
pub const WORKLOAD_S_MAX: u32 = 600;
/// Below this the workload ends before a migration could: the baseline alone takes
/// `BASELINE` (5 s), and the fastest migration here about 10 s.
pub const WORKLOAD_S_MIN: u32 = 20;
/// `--svg`.
pub const SVG_DEFAULT: &str = "strait-demo.svg";

/// The QEMU system emulator.
const QEMU_BINARY: &str = "qemu-system-x86_64";
/// What the guest folder must hold (`scripts/guest/build.sh`'s output).
const GUEST_KERNEL: &str = "vmlinuz";
const GUEST_INITRAMFS: &str = "initramfs.gz";

/// Unix socket paths must fit in `sun_path` (108 bytes with the NUL); the longest name
/// the engines create in the work folder is `strait-migrate-<16 hex>.sock` (36 bytes).
const WORKDIR_PATH_MAX: usize = 70;

/// The guest boots (about 3 s under TCG) and starts its workload; a loaded 2-core
/// machine may take ten times that.
const FIRST_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(90);
/// The workload runs on the source this long before the migration starts: the baseline
/// of the heartbeat rate the slowdown is measured against.
const BASELINE: Duration = Duration::from_secs(5);
/// The migration's bound: this much for the fixed costs (offer, switchover, commit across
/// the WAN, a loaded machine)...
const MIGRATION_TIMEOUT_BASE: Duration = Duration::from_secs(120);
/// ... plus this many times the time the disk and the guest's RAM take at the link's rate
/// (the guest dirties memory meanwhile, which QEMU sends again).
const MIGRATION_TIMEOUT_LINK_FACTOR: f64 = 4.0;
/// After the commit, the destination's first heartbeat: the guest resumes at once; the
/// console has to reach the host through a loaded machine.
const DESTINATION_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);
/// After the migration, beyond the workload's own length: the read-back of 4 MiB and the
/// check (a few seconds under TCG) on a loaded machine.
const VERDICT_MARGIN: Duration = Duration::from_secs(120);
/// From the guest's verdict to QEMU's exit: `poweroff -f` takes milliseconds.
const QEMU_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// From the source's `done` to the destination QEMU running: the destination promotes its
/// disk, lifts its fence and resumes the VM right after it answered `Committed`, which
/// takes about 100 ms; a loaded machine gets a margin.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the demo reads `status` and the consoles while it waits.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// One progress line per this.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// The guest's region when it does not report it: `strait.off` defaults to 1 MiB and the
/// region is 1024 blocks of 4 KiB (`scripts/guest/init.sh`).
const REGION_OFFSET_DEFAULT: u64 = 1 << 20;
const REGION_BYTES_DEFAULT: u64 = 4 << 20;
/// The guest's DMA range (`MIGRATE_DMA_BYTES` in `scripts/guest/init.sh`), at `dma_offset`.
const DMA_BYTES: u64 = 1 << 20;
/// Exit status after a second SIGINT/SIGTERM (128 + SIGINT, as a shell reports it).
const SECOND_SIGNAL_EXIT: i32 = 130;

/// What `strait demo` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid option: {0}")]
    InvalidArgs(String),
    #[error(
        "the guest is not built: {path} is missing (scripts/guest/build.sh builds it and \
         prints the folder to pass as --guest; `make demo` does both)"
    )]
    MissingGuest { path: PathBuf },
    #[error("{program} is not installed (not found on PATH); scripts/install-deps.sh installs it (Debian package {package})")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error(
        "strait demo needs root: the emulated WAN is two network namespaces (run it with sudo)"
    )]
    NotRoot,
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot install the SIGINT/SIGTERM handler")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the {what} ({program})")]
    Spawn {
        what: String,
        program: String,
        source: std::io::Error,
    },
    #[error("the {what} exited unexpectedly ({status}); the end of its log:\n{log}")]
    ChildExited {
        what: String,
        status: String,
        log: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}{}", if log.is_empty() { String::new() } else { format!("; the end of its log:\n{log}") })]
    Timeout {
        what: String,
        timeout: Duration,
        log: String,
    },
    #[error("cannot start the WAN emulator")]
    Wanem(#[from] WanemError),
    #[error("cannot make the engines' TLS certificates")]
    Certs(#[source] TlsError),
    #[error("the control API call `{cmd}` to the {engine} failed")]
    Control {
        engine: String,
        cmd: String,
        source: ControlError,
    },
    #[error(
        "the guest's workload ended on the source before the migration finished; give it \
         more time with --workload-s (it was {workload_s} s)"
    )]
    WorkloadTooShort { workload_s: u32 },
    #[error("md5sum failed on {path}: {detail}")]
    Md5 { path: PathBuf, detail: String },
    #[error("the QMP command `{command}` to the {qemu} failed")]
    Qmp {
        qemu: &'static str,
        command: String,
        source: Box<strait_vmm::qmp::QmpError>,
    },
    #[error("QEMU's migration did not complete: {reason}")]
    QemuMigration { reason: String },
    #[error("cannot {what} (--share-cores runs without moving any thread)")]
    Pin {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted; every engine and QEMU the demo started was stopped")]
    Interrupted,
    #[error("{failed} of the demo's checks failed: {names} (the report above says why; logs in {workdir})")]
    ChecksFailed {
        failed: usize,
        names: String,
        workdir: PathBuf,
    },
}

impl DemoError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> DemoError {
        DemoError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// The guest's kernel and initramfs.
#[derive(Clone, Debug)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Which system migrates the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// Two engines and the control API's `migrate`.
    Strait,
    /// QEMU alone, as libvirt drives it for `--copy-storage-all`, with this mirror mode.
    Qemu(CopyMode),
}

impl System {
    /// The name in the report and the bench's tables.
    pub fn name(self) -> &'static str {
        match self {
            System::Strait => "strait",
            System::Qemu(CopyMode::Background) => "qemu-background",
            System::Qemu(CopyMode::WriteBlocking) => "qemu-write-blocking",
        }
    }
}

/// The options, checked.
#[derive(Clone, Debug)]
pub struct Plan {
    pub system: System,
    pub guest: GuestFiles,
    pub rtt_ms: u32,
    pub rate_mbit: u32,
    pub workload_s: u32,
    /// `(at_s, for_s)` from the link's start.
    pub cut: Option<(f64, f64)>,
    pub svg: PathBuf,
    pub workdir: Option<PathBuf>,
    pub keep: bool,
    pub json: bool,
    /// The cores, unless `--share-cores` or a one-core machine (`pin.rs`).
    pub cpu_split: Option<CpuSplit>,
    /// What applies strait's vCPU throttle (`--throttle`).
    pub actuator: Actuator,
}

impl Plan {
    /// Checks the options, then what the demo needs on this machine, cheapest first, so a
    /// missing piece fails in milliseconds.
    pub fn check(args: DemoArgs) -> Result<Plan, DemoError> {
        if !(WORKLOAD_S_MIN..=WORKLOAD_S_MAX).contains(&args.workload_s) {
            return Err(DemoError::InvalidArgs(format!(
                "--workload-s {} is not in {WORKLOAD_S_MIN}..={WORKLOAD_S_MAX}",
                args.workload_s
            )));
        }
        if args.rate_mbit == 0 {
            return Err(DemoError::InvalidArgs(
                "--rate-mbit must be above 0 (the link utilization is measured against it)".into(),
            ));
        }
        if args.system == DemoSystem::Strait && args.copy_mode != CopyMode::Background {
            return Err(DemoError::InvalidArgs(
                "--copy-mode is QEMU's mirror mode: it goes with --system qemu".into(),
            ));
        }
        let actuator = Actuator::parse(&args.throttle).ok_or_else(|| {
            DemoError::InvalidArgs(format!(
                "--throttle {:?} is not vmm or cgroup",
                args.throttle
            ))
        })?;
        if args.system == DemoSystem::Qemu && actuator != Actuator::Vmm {
            return Err(DemoError::InvalidArgs(
                "--throttle is strait's: QEMU's own migration throttles with auto-converge".into(),
            ));
        }
        let system = match args.system {
            DemoSystem::Strait => System::Strait,
            DemoSystem::Qemu => System::Qemu(args.copy_mode),
        };
        let cut = args.cut_at_s.map(|at| (at, args.cut_for_s));
        let guest = GuestFiles {
            kernel: args.guest.join(GUEST_KERNEL),
            initramfs: args.guest.join(GUEST_INITRAMFS),
        };
        for path in [&guest.kernel, &guest.initramfs] {
            if !path.is_file() {
                return Err(DemoError::MissingGuest { path: path.clone() });
            }
        }
        if !on_path(QEMU_BINARY) {
            return Err(DemoError::MissingProgram {
                program: QEMU_BINARY,
                package: "qemu-system-x86",
            });
        }
        if !on_path("md5sum") {
            return Err(DemoError::MissingProgram {
                program: "md5sum",
                package: "coreutils",
            });
        }
        // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(DemoError::NotRoot);
        }
        let cpu_split = if args.share_cores {
            None
        } else {
            CpuSplit::detect()?
        };
        Ok(Plan {
            cpu_split,
            actuator,
            system,
            guest,
            rtt_ms: args.rtt_ms,
            rate_mbit: args.rate_mbit,
            workload_s: args.workload_s,
            cut,
            svg: args.svg,
            workdir: args.workdir,
            keep: args.keep,
            json: args.json,
        })
    }

    /// The migration's bound: see [`MIGRATION_TIMEOUT_LINK_FACTOR`].
    fn migration_timeout(&self) -> Duration {
        let bytes = DISK_BYTES + GUEST_MEMORY_BYTES;
        let at_link_s = bytes as f64 * 8.0 / (f64::from(self.rate_mbit) * 1e6);
        MIGRATION_TIMEOUT_BASE + Duration::from_secs_f64(at_link_s * MIGRATION_TIMEOUT_LINK_FACTOR)
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// SIGINT and SIGTERM, seen by every wait of the demo.
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// The first signal sets the flag (the demo stops its children and exits); a second
    /// one exits at once (the children die with the demo: `PR_SET_PDEATHSIG`).
    pub fn install() -> Result<Interrupt, DemoError> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Registered first, so it sees the flag before the first signal sets it.
            signal_hook::flag::register_conditional_shutdown(
                signal,
                SECOND_SIGNAL_EXIT,
                Arc::clone(&flag),
            )
            .map_err(DemoError::Signals)?;
            signal_hook::flag::register(signal, Arc::clone(&flag)).map_err(DemoError::Signals)?;
        }
        Ok(Interrupt { flag })
    }

    pub fn check(&self) -> Result<(), DemoError> {
        if self.flag.load(Ordering::Relaxed) {
            return Err(DemoError::Interrupted);
        }
        Ok(())
    }
}

/// The demo's output: its whole point is what it prints.
#[allow(clippy::print_stdout)]
fn say(text: &str) {
    println!("{text}");
}

/// The folder for images, sockets, certificates and logs.
enum Workdir {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

impl Workdir {
    fn create(given: Option<&Path>) -> Result<Workdir, DemoError> {
        let workdir = match given {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .map_err(|e| DemoError::io("create the work folder", path, e))?;
                Workdir::Given(path.to_owned())
            }
            None => Workdir::Temp(
                tempfile::Builder::new()
                    .prefix("strait-demo-")
                    .tempdir()
                    .map_err(|e| {
                        DemoError::io("create a work folder in", std::env::temp_dir(), e)
                    })?,
            ),
        };
        let length = workdir.path().as_os_str().len();
        if length > WORKDIR_PATH_MAX {
            return Err(DemoError::InvalidArgs(format!(
                "the work folder {} is {length} bytes long; the Unix sockets inside it need \
                 it at most {WORKDIR_PATH_MAX} (give a shorter --workdir or TMPDIR)",
                workdir.path().display()
            )));
        }
        Ok(workdir)
    }

    fn path(&self) -> &Path {
        match self {
            Workdir::Temp(dir) => dir.path(),
            Workdir::Given(path) => path,
        }
    }

    /// Leaves the folder in place (a given one always stays); returns its path.
    fn keep(self) -> PathBuf {
        match self {
            Workdir::Temp(dir) => dir.keep(),
            Workdir::Given(path) => path,
        }
    }
}

/// Runs `strait demo`.
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    let plan = Plan::check(args)?;
    let interrupt = Interrupt::install()?;
    let workdir = Workdir::create(plan.workdir.as_deref())?;
    say(&format!(
        "strait demo: live-migrating a running VM (disk and memory) across an emulated WAN \
         ({} ms RTT, {} Mbit/s) with {}; work folder {}",
        plan.rtt_ms,
        plan.rate_mbit,
        match plan.system {
            System::Strait => "strait".to_owned(),
            System::Qemu(mode) => format!(
                "QEMU alone (NBD mirror, copy-mode {}, then QEMU's migrate over TCP)",
                mode.qmp_name()
            ),
        },
        workdir.path().display()
    ));
    if let Some(split) = &plan.cpu_split {
        split.pin_self()?;
        say(&format!(
            "cores    the guests' vCPUs on core {}, the engines, the WAN emulator and the \
             rest of QEMU on {:?} (--share-cores: all together)",
            split.guest, split.host
        ));
    }
    let driven = match plan.system {
        System::Strait => drive(&plan, workdir.path(), &interrupt),
        System::Qemu(mode) => peer::drive(&plan, mode, workdir.path(), &interrupt),
    };
    let recording = match driven {
        Ok(recording) => recording,
        Err(e) => {
            // An interrupted demo cleans up; a failed one keeps its logs for a look.
            if plan.keep || !matches!(e, DemoError::Interrupted) {
                say(&format!("work folder kept: {}", workdir.keep().display()));
            }
            return Err(e);
        }
    };
    let report = Report::new(&recording, &plan);
    let chart = svg::render(&recording, &report);
    std::fs::write(&plan.svg, chart).map_err(|e| DemoError::io("write the chart", &plan.svg, e))?;
    say(&report.text(&plan.svg));
    let failed = report.failed_checks();
    let kept = (plan.keep || !failed.is_empty()).then(|| workdir.keep());
    if let Some(dir) = &kept {
        say(&format!("work folder kept: {}", dir.display()));
    }
    if plan.json {
        say(&report.json(&plan.svg, kept.as_deref()).to_string());
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(DemoError::ChecksFailed {
        failed: failed.len(),
        names: failed.join(", "),
        workdir: kept.unwrap_or_default(),
    })
}

/// Steps 2 to 6 of the module's list.
fn drive(plan: &Plan, dir: &Path, interrupt: &Interrupt) -> Result<Recording, DemoError> {
    let mut rig = Rig::start(plan, dir, interrupt)?;
    let first_heartbeat = wait_for_workload(&mut rig, interrupt)?;
    watch_source(&mut rig, first_heartbeat + BASELINE, interrupt)?;
    let wire_before = rig.wire_now();
    let migrate_at = Instant::now();
    let mut args = Map::new();
    args.insert("to".into(), json!(rig.backend.to));
    args.insert("vmm".into(), json!(rig.backend.src_vmm));
    args.insert("throttle".into(), json!(plan.actuator.name()));
    let started = rig.backend.src.call("migrate", args)?;
    say(&format!(
        "migrate  id {} to {}, {:.1} s after the link came up",
        started["id"].as_str().unwrap_or("?"),
        rig.backend.to,
        migrate_at.duration_since(rig.link_up).as_secs_f64()
    ));
    let migration = follow_migration(&mut rig, plan, migrate_at, interrupt)?;
    let mut recording = Recording::new(plan, rig.link_up, first_heartbeat, migrate_at, migration);
    recording.wire_during = Some((wire_before, rig.wire_now()));
    finish(rig, plan, recording, interrupt)
}

/// After the migration: the run states, the guest on the destination and its verdict,
/// the image; then every child stopped and the heartbeats taken.
fn finish<E: Backend>(
    mut rig: Rig<E>,
    plan: &Plan,
    mut recording: Recording,
    interrupt: &Interrupt,
) -> Result<Recording, DemoError> {
    if recording.committed() {
        recording.run_states = Some(run_states(&rig));
        match follow_destination(&mut rig, plan, interrupt) {
            Ok(()) => check_destination_image(&mut rig, &mut recording)?,
            Err(DemoError::Interrupted) => return Err(DemoError::Interrupted),
            // Reported as a failed check, beside what the migration did.
            Err(e) => recording.after_error = Some(e.to_string()),
        }
    }
    rig.stop();
    recording.take_heartbeats(&rig);
    recording.wire = std::mem::take(&mut rig.wire);
    Ok(recording)
}

/// Waits for the guest's first heartbeat on the source.
fn wait_for_workload<E: Backend>(
    rig: &mut Rig<E>,
    interrupt: &Interrupt,
) -> Result<Instant, DemoError> {
    let started = Instant::now();
    loop {
        if let Some(first) = rig.src_qemu.console.first_heartbeat() {
            say(&format!(
                "guest    booted in {:.1} s; the workload runs on the source (a counter, one \
                 4 KiB O_DIRECT write and one heartbeat line per step, 16 MiB of memory \
                 rewritten in a loop)",
                started.elapsed().as_secs_f64()
            ));
            return Ok(first.arrived);
        }
        interrupt.check()?;
        rig.ensure_running(false)?;
        if started.elapsed() >= FIRST_HEARTBEAT_TIMEOUT {
            return Err(DemoError::Timeout {
                what: "the guest's first heartbeat on the source QEMU's console".into(),
                timeout: FIRST_HEARTBEAT_TIMEOUT,
                log: rig.src_qemu.console.tail(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The guest's heartbeats: the last counter value and how many arrived in the last
/// second, on both consoles.
fn guest_line<E: Backend>(rig: &Rig<E>) -> String {
    let since = Instant::now() - PROGRESS_INTERVAL;
    let (src, dst) = (&rig.src_qemu.console, &rig.dst_qemu.console);
    let rate = src.count_since(since) + dst.count_since(since);
    let (side, last) = match dst.last_heartbeat() {
        Some(h) => ("destination", Some(h)),
        None => ("source", src.last_heartbeat()),
    };
    let i = last.map_or_else(|| "-".into(), |h| h.i.to_string());
    format!("guest on the {side}: i={i}, {rate} heartbeats/s")
}

/// Prints the guest's progress once a second until `until`.
fn watch_source<E: Backend>(
    rig: &mut Rig<E>,
    until: Instant,
    interrupt: &Interrupt,
) -> Result<(), DemoError> {
    let mut next_print = Instant::now() + PROGRESS_INTERVAL;
    while Instant::now() < until {
        interrupt.check()?;
        rig.ensure_running(false)?;
        if Instant::now() >= next_print {
            say(&format!("  baseline      {}", guest_line(rig)));
            next_print += PROGRESS_INTERVAL;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// Follows `status.migration` until it ends; a progress line per second.
fn follow_migration(
    rig: &mut Rig<Engines>,
    plan: &Plan,
    migrate_at: Instant,
    interrupt: &Interrupt,
) -> Result<Value, DemoError> {
    let timeout = plan.migration_timeout();
    let mut next_print = Instant::now();
    loop {
        interrupt.check()?;
        rig.ensure_running(false)?;
        let m = rig.backend.src.call("status", Map::new())?["migration"].take();
        let phase = m["phase"].as_str().unwrap_or("?");
        if ["done", "rolled-back", "failed"].contains(&phase) {
            say(&format!(
                "{:>6.1} s {}",
                migrate_at.elapsed().as_secs_f64(),
                phase
            ));
            return Ok(m);
        }
        if rig.src_qemu.console.verdict().is_some() {
            return Err(DemoError::WorkloadTooShort {
                workload_s: plan.workload_s,
            });
        }
        if Instant::now() >= next_print {
            say(&format!(
                "{:>6.1} s {} | {}",
                migrate_at.elapsed().as_secs_f64(),
                crate::ctl::migration_progress_line(&m).trim_end(),
                guest_line(rig)
            ));
            next_print += PROGRESS_INTERVAL;
        }
        if migrate_at.elapsed() >= timeout {
            return Err(DemoError::Timeout {
                what: format!("the migration to end (it is in phase {phase})"),
                timeout,
                log: rig.backend.src.process.log_tail(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The run state of each QEMU, by name (`postmigrate`, `running`...), read on the demo's
/// own QMP monitors. The destination resumes the VM just after it answered `Committed`
/// (it promotes its disk and lifts its fence first), so it is given a moment.
fn run_states<E: Backend>(rig: &Rig<E>) -> (String, String) {
    let name = |state: RunState| {
        serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{state:?}"))
    };
    let read = |qmp: &Path, wait_for: Option<RunState>| {
        let vmm = QemuVmm::connect(qmp)?;
        match wait_for {
            Some(state) => vmm
                .wait_run_state(&[state], RESUME_TIMEOUT)
                .or_else(|_| vmm.run_state()),
            None => vmm.run_state(),
        }
    };
    let state = |qmp: &Path, wait_for| match read(qmp, wait_for) {
        Ok(state) => name(state),
        Err(e) => format!("unknown ({e})"),
    };
    (
        state(&rig.src_qemu.qmp, None),
        state(&rig.dst_qemu.qmp, Some(RunState::Running)),
    )
}

/// After the commit: the guest's heartbeats on the destination, a line per second, until
/// its verdict.
fn follow_destination<E: Backend>(
    rig: &mut Rig<E>,
    plan: &Plan,
    interrupt: &Interrupt,
) -> Result<(), DemoError> {
    let started = Instant::now();
    let verdict_timeout = Duration::from_secs(u64::from(plan.workload_s)) + VERDICT_MARGIN;
    let mut next_print = Instant::now();
    let workload_end_s = rig
        .src_qemu
        .console
        .first_heartbeat()
        .map(|h| h.uptime_s + f64::from(plan.workload_s));
    loop {
        interrupt.check()?;
        if rig.dst_qemu.console.verdict().is_some() {
            return Ok(());
        }
        rig.ensure_running(true)?;
        let console = &rig.dst_qemu.console;
        if let Some(status) = rig.dst_qemu.process.exited() {
            return Err(DemoError::ChildExited {
                what: "destination QEMU (before the guest's verdict)".into(),
                status: status.to_string(),
                log: rig.dst_qemu.console.tail(),
            });
        }
        let last = console.last_heartbeat();
        let (what, timeout) = match last {
            None => (
                "the guest's first heartbeat on the destination",
                DESTINATION_HEARTBEAT_TIMEOUT,
            ),
            Some(_) => ("the guest's verdict on the destination", verdict_timeout),
        };
        if started.elapsed() >= timeout {
            return Err(DemoError::Timeout {
                what: what.into(),
                timeout,
                log: console.tail(),
            });
        }
        if Instant::now() >= next_print {
            let left = match (last, workload_end_s) {
                (Some(h), Some(end)) if end > h.uptime_s => {
                    format!(", the workload ends in about {:.0} s", end - h.uptime_s)
                }
                (Some(_), Some(_)) => ", the guest checks its blocks".into(),
                _ => String::new(),
            };
            say(&format!("  after         {}{left}", guest_line(rig)));
            next_print += PROGRESS_INTERVAL;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The guest's read-back, against the destination image on the host.
fn check_destination_image<E: Backend>(
    rig: &mut Rig<E>,
    recording: &mut Recording,
) -> Result<(), DemoError> {
    let console = &rig.dst_qemu.console;
    recording.verdict = console.verdict();
    recording.guest_results = console.results();
    if rig.dst_qemu.process.wait_exit(QEMU_EXIT_TIMEOUT).is_none() {
        tracing::warn!("the destination QEMU did not power off after the guest's verdict");
    }
    let number = |key: &str, default: u64| {
        recording
            .guest_results
            .get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let (offset, length) = (
        number("offset", REGION_OFFSET_DEFAULT),
        number("length", REGION_BYTES_DEFAULT),
    );
    if offset
        .checked_add(length)
        .is_none_or(|end| end > DISK_BYTES)
    {
        recording.after_error = Some(format!(
            "the guest reported a region ({offset}+{length}) outside the {DISK_BYTES}-byte disk"
        ));
        return Ok(());
    }
    recording.host_md5 = Some(md5_range(&rig.dst_image, offset, length)?);
    // The DMA range follows the region (when the guest ran the DMA check).
    let dma_offset = number("dma_offset", 0);
    let dma_end = dma_offset.checked_add(DMA_BYTES);
    if dma_offset > 0 && dma_end.is_some_and(|end| end <= DISK_BYTES) {
        recording.host_md5_dma = Some(md5_range(&rig.dst_image, dma_offset, DMA_BYTES)?);
    }
    Ok(())
}

/// The md5 of `length` bytes of `path` at `offset`, as the guest's busybox `md5sum`
/// prints it (coreutils' `md5sum` reading the range).
fn md5_range(path: &Path, offset: u64, length: u64) -> Result<String, DemoError> {
    use std::io::{Read, Seek, SeekFrom};
    let failed = |detail: String| DemoError::Md5 {
        path: path.to_owned(),
        detail,
    };
    let mut file = std::fs::File::open(path).map_err(|e| DemoError::io("open", path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| DemoError::io("seek in", path, e))?;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    // md5sum reads to the end before it prints, so writing everything first cannot
    // deadlock; dropping stdin closes it.
    let copied = match child.stdin.take() {
        Some(mut stdin) => std::io::copy(&mut file.take(length), &mut stdin),
        None => Ok(0),
    };
    let output = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    match copied {
        Ok(n) if n == length => {}
        Ok(n) => return Err(failed(format!("read {n} of {length} bytes"))),
        Err(e) => return Err(failed(e.to_string())),
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.split_whitespace().next() {
        Some(hex) if output.status.success() && hex.len() == 32 => Ok(hex.to_owned()),
        _ => Err(failed(format!("{}: {stdout}", output.status))),
    }
}

/// Whether the guest's final word was PASS.
fn passed(verdict: Option<&Verdict>) -> bool {
    verdict == Some(&Verdict::Pass)
}
