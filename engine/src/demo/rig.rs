//! The demo's machinery on one host: the emulated WAN (`strait wanem`'s two network
//! namespaces) and two QEMUs, the destination waiting (`-incoming defer -S`).
//!
//! - `--system strait`: a destination engine in namespace B, a source engine in namespace
//!   A, each serving its image to its QEMU over vhost-user (the QEMUs run in the root
//!   namespace: only the engines talk across the link). The same recipe as
//!   `engine/tests/migration_e2e.rs`.
//! - `--system qemu`: no engine. Each QEMU runs inside its namespace with a plain
//!   `virtio-blk-pci` disk on its raw image, so QEMU's own NBD and migration streams cross
//!   the link (`peer.rs` drives them).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use strait_net::tls::write_certs;
use strait_net::wanem::{Wanem, WanemConfig};

use super::children::{ChildProcess, Stop};
use super::console::Console;
use super::{say, DemoError, GuestFiles, Interrupt, Plan, QEMU_BINARY};
use crate::control::ControlClient;

/// The disk each engine serves: the guest writes a 4 MiB region of it; 64 MiB keeps the
/// disk phase (the whole image crosses the WAN first) a few seconds at 200 Mbit/s.
pub const DISK_BYTES: u64 = 64 << 20;

/// After a QEMU is stopped, its console reader sees the pipe close at once; the bound only
/// keeps a wedged reader from holding up the demo's exit.
const CONSOLE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest RAM: what the memory phase moves (mostly zero pages, which QEMU sends compactly,
/// plus the 16 MiB the workload keeps rewriting). 256 MiB is the test guest's size.
const GUEST_MEMORY_MIB: u32 = 256;
/// The same in bytes, for the migration's time bound.
pub const GUEST_MEMORY_BYTES: u64 = (GUEST_MEMORY_MIB as u64) << 20;

/// The destination engine's port inside namespace B (a fresh namespace: nothing else
/// listens there).
const PORT: u16 = 7400;

/// The block node of the guest's disk in `--system qemu` (`-blockdev node-name=`): what
/// the destination exports over NBD and the source mirrors from.
pub const DISK_NODE: &str = "disk0";

/// The link's bytes are sampled this often (wanem's counters, both directions): the
/// same resolution as the migration's own timeline.
const WIRE_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Samples kept: two a second for the longest workload (600 s) plus boot and the
/// migration's bound, with room; a longer run keeps its first samples.
const WIRE_SAMPLES_MAX: usize = 4000;

/// An engine creates its sockets within milliseconds; 10 s covers a loaded 2-core host.
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU creates its QMP sockets before it starts the guest; under TCG on a loaded host
/// that is well under a second.
const QMP_SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// The kernel command line: `quiet` keeps kernel messages out of the workload's lines;
/// `panic=-1` turns a guest panic into a reboot, which `-no-reboot` turns into QEMU
/// exiting (a clear failure instead of a hang).
const KERNEL_CMDLINE_BASE: &str = "console=ttyS0 quiet panic=-1 strait.test=migrate";

/// Byte pattern of the destination image before the migration: anything but what the
/// source holds, so that a destination region that matches the guest's read-back was
/// written by the migration.
const DESTINATION_FILL_BYTE: u8 = 0xa5;
/// Byte pattern of the source image (the bulk copy carries it).
const SOURCE_FILL_BYTE: u8 = 0x5a;

/// A `strait serve` child and its control socket.
pub struct EngineProc {
    pub process: ChildProcess,
    pub control: PathBuf,
}

impl EngineProc {
    /// One control API call.
    pub fn call(&self, cmd: &str, args: Map<String, Value>) -> Result<Value, DemoError> {
        let failed = |source| DemoError::Control {
            engine: self.process.name.clone(),
            cmd: cmd.to_owned(),
            source,
        };
        ControlClient::connect(&self.control)
            .map_err(failed)?
            .call_with_args(cmd, args)
            .map_err(failed)
    }
}

/// A QEMU child and its serial console.
pub struct QemuProc {
    pub process: ChildProcess,
    pub console: Console,
    /// The demo's own QMP monitor (the engine holds the other during the migration).
    pub qmp: PathBuf,
    /// The other monitor: the engine's (`--system strait`), or the peer driver's.
    pub driver_qmp: PathBuf,
}

/// The two engines of `--system strait`.
pub struct Engines {
    pub src: EngineProc,
    pub dst: EngineProc,
    /// The destination engine, as `migrate` takes it.
    pub to: String,
    /// The source engine's QMP monitor, as `migrate` takes it.
    pub src_vmm: String,
}

/// What runs beside the QEMUs: the engines, or nothing (`--system qemu`).
pub trait Backend {
    /// Fails if a process of it died.
    fn ensure_running(&mut self) -> Result<(), DemoError>;
    /// Stops it (after the QEMUs).
    fn stop(&mut self);
}

impl Backend for Engines {
    fn ensure_running(&mut self) -> Result<(), DemoError> {
        self.src.process.ensure_running()?;
        self.dst.process.ensure_running()
    }

    fn stop(&mut self) {
        self.src.process.stop();
        self.dst.process.stop();
    }
}

/// `--system qemu`: QEMU moves disk and memory itself.
pub struct NoEngines;

impl Backend for NoEngines {
    fn ensure_running(&mut self) -> Result<(), DemoError> {
        Ok(())
    }

    fn stop(&mut self) {}
}

/// The link's counters at one moment: bytes delivered from A to B and from B to A.
#[derive(Clone, Copy, Debug)]
pub struct WireSample {
    pub at: Instant,
    pub a_to_b_bytes: u64,
    pub b_to_a_bytes: u64,
}

/// Everything running. Field order is drop order: the QEMUs go before the engines they
/// are attached to, and the engines before the namespaces they run in.
pub struct Rig<E: Backend> {
    pub src_qemu: QemuProc,
    pub dst_qemu: QemuProc,
    pub backend: E,
    pub wanem: Wanem,
    /// When the link came up: `--cut-at-s` counts from here.
    pub link_up: Instant,
    pub dst_image: PathBuf,
    pub src_image: PathBuf,
    /// The link's counters every [`WIRE_SAMPLE_INTERVAL`]. Invariant: in time order, at
    /// most [`WIRE_SAMPLES_MAX`].
    pub wire: Vec<WireSample>,
}

/// The link (from the plan) and the two images; says what it started.
fn start_link(plan: &Plan, dir: &Path) -> Result<(Wanem, Instant, PathBuf, PathBuf), DemoError> {
    let wanem = Wanem::start(WanemConfig {
        rtt_ms: plan.rtt_ms,
        rate_mbit: plan.rate_mbit,
        cut_at_s: plan.cut.map(|c| c.0),
        cut_for_s: plan.cut.map_or(0.0, |c| c.1),
        seed: 1,
        ..WanemConfig::default()
    })?;
    let link_up = Instant::now();
    say(&format!(
        "link     namespaces {} ({}) and {} ({}): {} ms RTT, {} Mbit/s{}",
        wanem.namespace_a(),
        wanem.addr_a(),
        wanem.namespace_b(),
        wanem.addr_b(),
        plan.rtt_ms,
        plan.rate_mbit,
        plan.cut
            .map(|(at, for_s)| format!(", cut at {at} s for {for_s} s"))
            .unwrap_or_default()
    ));
    let (src_image, dst_image) = (dir.join("src.img"), dir.join("dst.img"));
    make_image(&src_image, SOURCE_FILL_BYTE)?;
    make_image(&dst_image, DESTINATION_FILL_BYTE)?;
    Ok((wanem, link_up, src_image, dst_image))
}

impl Rig<Engines> {
    /// Starts the link, the images, the engines and both QEMUs, in that order.
    pub fn start(plan: &Plan, dir: &Path, interrupt: &Interrupt) -> Result<Self, DemoError> {
        let (wanem, link_up, src_image, dst_image) = start_link(plan, dir)?;
        let certs = dir.join("certs");
        write_certs(&certs, &[wanem.addr_b().to_string()]).map_err(DemoError::Certs)?;
        let to = format!("{}:{PORT}", wanem.addr_b());
        let exe = std::env::current_exe().map_err(|e| DemoError::io("find", "strait", e))?;
        let exe = exe.to_string_lossy().into_owned();

        // The destination: its engine first (QEMU connects to its vhost socket), then QEMU.
        let mut command = wanem.command_in_b(&exe);
        command
            .args(["serve", "--listen", &to, "--tls-dir"])
            .arg(&certs)
            .arg("--vmm")
            .arg(format!(
                "qemu:{}",
                dir.join("dst-qmp-engine.sock").display()
            ));
        let dst_engine = start_engine(
            "destination engine",
            command,
            dir,
            "dst",
            &dst_image,
            interrupt,
        )?;
        let vhost = |side: &str| Disk::VhostUser(dir.join(format!("{side}-vhost.sock")));
        let dst_qemu = start_qemu(
            plan,
            dir,
            "dst",
            &vhost("dst"),
            Command::new(QEMU_BINARY),
            interrupt,
        )?;
        let mut command = wanem.command_in_a(&exe);
        command.args(["serve", "--tls-dir"]).arg(&certs);
        let src_engine = start_engine("source engine", command, dir, "src", &src_image, interrupt)?;
        let src_qemu = start_qemu(
            plan,
            dir,
            "src",
            &vhost("src"),
            Command::new(QEMU_BINARY),
            interrupt,
        )?;
        say(&format!(
            "engines  source in {}, destination in {} listening on {to}; QEMUs (TCG) started, \
             the destination waits with -incoming defer -S",
            wanem.namespace_a(),
            wanem.namespace_b()
        ));
        Ok(Rig {
            src_qemu,
            dst_qemu,
            backend: Engines {
                src: src_engine,
                dst: dst_engine,
                to,
                src_vmm: format!("qemu:{}", dir.join("src-qmp-engine.sock").display()),
            },
            wanem,
            link_up,
            dst_image,
            src_image,
            wire: Vec::new(),
        })
    }
}

impl Rig<NoEngines> {
    /// `--system qemu`: the link, the images, and a QEMU inside each namespace, each with
    /// its image as a plain virtio-blk disk; the destination waits (`-incoming defer -S`).
    pub fn start_qemu_peer(
        plan: &Plan,
        dir: &Path,
        interrupt: &Interrupt,
    ) -> Result<Self, DemoError> {
        let (wanem, link_up, src_image, dst_image) = start_link(plan, dir)?;
        let dst_qemu = start_qemu(
            plan,
            dir,
            "dst",
            &Disk::Raw(dst_image.clone()),
            wanem.command_in_b(QEMU_BINARY),
            interrupt,
        )?;
        let src_qemu = start_qemu(
            plan,
            dir,
            "src",
            &Disk::Raw(src_image.clone()),
            wanem.command_in_a(QEMU_BINARY),
            interrupt,
        )?;
        say(&format!(
            "qemu     source QEMU (TCG) in {}, destination QEMU in {} waiting with \
             -incoming defer -S; each has its image as a virtio-blk disk",
            wanem.namespace_a(),
            wanem.namespace_b()
        ));
        Ok(Rig {
            src_qemu,
            dst_qemu,
            backend: NoEngines,
            wanem,
            link_up,
            dst_image,
            src_image,
            wire: Vec::new(),
        })
    }
}

impl<E: Backend> Rig<E> {
    /// Fails if the backend or the source QEMU died; the destination QEMU too unless
    /// `dst_may_exit` (its guest powers off at the end of the workload). Takes a sample of
    /// the link's counters when one is due.
    pub fn ensure_running(&mut self, dst_may_exit: bool) -> Result<(), DemoError> {
        self.sample_wire();
        self.backend.ensure_running()?;
        self.src_qemu.process.ensure_running()?;
        if !dst_may_exit {
            self.dst_qemu.process.ensure_running()?;
        }
        Ok(())
    }

    /// Records the link's counters if [`WIRE_SAMPLE_INTERVAL`] passed since the last time.
    pub fn sample_wire(&mut self) {
        let now = Instant::now();
        let due = self
            .wire
            .last()
            .is_none_or(|last| now.duration_since(last.at) >= WIRE_SAMPLE_INTERVAL);
        if due && self.wire.len() < WIRE_SAMPLES_MAX {
            self.wire.push(self.wire_now());
        }
    }

    /// The link's counters now.
    pub fn wire_now(&self) -> WireSample {
        let stats = self.wanem.stats();
        WireSample {
            at: Instant::now(),
            a_to_b_bytes: stats.a_to_b.bytes_forwarded,
            b_to_a_bytes: stats.b_to_a.bytes_forwarded,
        }
    }

    /// Stops every child (QEMUs first) and waits for their consoles to close.
    pub fn stop(&mut self) {
        for qemu in [&mut self.src_qemu, &mut self.dst_qemu] {
            qemu.process.stop();
            qemu.console.wait_closed(CONSOLE_CLOSE_TIMEOUT);
        }
        self.backend.stop();
    }
}

/// `command` (`strait serve` and its side's options) plus `--disk IMAGE --vhost-socket
/// --control`, logging to
/// `DIR/SIDE-engine.log`; returns once its sockets exist.
fn start_engine(
    what: &str,
    mut command: Command,
    dir: &Path,
    side: &str,
    image: &Path,
    interrupt: &Interrupt,
) -> Result<EngineProc, DemoError> {
    let vhost = dir.join(format!("{side}-vhost.sock"));
    let control = dir.join(format!("{side}-control.sock"));
    command
        .arg("--disk")
        .arg(image)
        .arg("--vhost-socket")
        .arg(&vhost)
        .arg("--control")
        .arg(&control);
    let log = dir.join(format!("{side}-engine.log"));
    let mut process = ChildProcess::spawn(what, &mut command, &log, false, Stop::Graceful)?;
    for socket in [&vhost, &control] {
        process.wait_socket(socket, ENGINE_START_TIMEOUT, interrupt)?;
    }
    Ok(EngineProc { process, control })
}

/// The guest's disk, as QEMU gets it.
pub enum Disk {
    /// `vhost-user-blk-pci` on an engine's socket (`--system strait`).
    VhostUser(PathBuf),
    /// `virtio-blk-pci` on a raw image, block node [`DISK_NODE`] (`--system qemu`).
    Raw(PathBuf),
}

/// QEMU (`command`: the binary, maybe inside a namespace) with the guest's `migrate`
/// workload on `disk`, two QMP monitors (the migration driver's and the demo's), the
/// console read by a [`Console`].
fn start_qemu(
    plan: &Plan,
    dir: &Path,
    side: &str,
    disk: &Disk,
    mut command: Command,
    interrupt: &Interrupt,
) -> Result<QemuProc, DemoError> {
    let engine_qmp = dir.join(format!("{side}-qmp-engine.sock"));
    let qmp = dir.join(format!("{side}-qmp.sock"));
    let args = qemu_args(
        &plan.guest,
        disk,
        plan.workload_s,
        &[&engine_qmp, &qmp],
        side == "dst",
    );
    let what = if side == "dst" {
        "destination QEMU"
    } else {
        "source QEMU"
    };
    let log = dir.join(format!("{side}-qemu.log"));
    let mut process = ChildProcess::spawn(what, command.args(args), &log, true, Stop::Kill)?;
    let stdout = process.take_stdout().ok_or_else(|| {
        DemoError::io(
            "read the console of",
            what,
            std::io::ErrorKind::BrokenPipe.into(),
        )
    })?;
    let console = Console::start(side, stdout, &dir.join(format!("{side}-console.log")))?;
    for socket in [&engine_qmp, &qmp] {
        process.wait_socket(socket, QMP_SOCKET_TIMEOUT, interrupt)?;
    }
    if let Some(split) = &plan.cpu_split {
        split.pin_vcpus(what, &qmp)?;
    }
    Ok(QemuProc {
        process,
        console,
        qmp,
        driver_qmp: engine_qmp,
    })
}

/// QEMU's arguments. A destination gets the same machine (QEMU refuses incoming state that
/// does not match its devices) plus `-incoming defer -S`: it waits, paused, for
/// `migrate-incoming`, and after the migration for `cont`.
pub fn qemu_args(
    guest: &GuestFiles,
    disk: &Disk,
    workload_s: u32,
    qmp: &[&Path],
    incoming: bool,
) -> Vec<String> {
    let memory = GUEST_MEMORY_MIB;
    let mut args: Vec<String> = [
        // KVM hangs on these machines (docs: FACTS); TCG works everywhere.
        "-accel",
        "tcg",
        "-machine",
        "pc",
        // No NIC, VGA, floppy or CD-ROM: less to emulate and to migrate.
        "-nodefaults",
        "-no-user-config",
        "-smp",
        "1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(["-m".into(), format!("{memory}M")]);
    match disk {
        Disk::VhostUser(socket) => args.extend([
            // vhost-user backends map guest RAM, so it must be a shareable memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=c0,path={}", socket.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=c0,num-queues=1".into(),
        ]),
        // Plain RAM and QEMU's own block layer, as libvirt sets a VM up. The image is on
        // whatever file system the work folder is (tmpfs refuses O_DIRECT), so the host's
        // page cache is used, as with `cache=writeback`.
        Disk::Raw(image) => args.extend([
            "-blockdev".into(),
            format!(
                "driver=raw,node-name={DISK_NODE},file.driver=file,file.filename={}",
                image.display()
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive={DISK_NODE},id=vda"),
        ]),
    }
    args.extend([
        "-kernel".into(),
        guest.kernel.display().to_string(),
        "-initrd".into(),
        guest.initramfs.display().to_string(),
        "-append".into(),
        format!("{KERNEL_CMDLINE_BASE} strait.arg={workload_s}"),
        // stdout carries the serial console alone.
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
    ]);
    for path in qmp {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", path.display()));
    }
    if incoming {
        args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
    }
    args
}

/// A [`DISK_BYTES`] image filled with `byte`.
fn make_image(path: &Path, byte: u8) -> Result<(), DemoError> {
    /// Written a mebibyte at a time: fast, and a small buffer.
    const CHUNK_BYTES: usize = 1 << 20;
    let io = |op, e| DemoError::io(op, path, e);
    let mut file = File::create(path).map_err(|e| io("create image", e))?;
    let chunk = vec![byte; CHUNK_BYTES];
    for _ in 0..DISK_BYTES / CHUNK_BYTES as u64 {
        file.write_all(&chunk).map_err(|e| io("write image", e))?;
    }
    file.sync_all().map_err(|e| io("sync image", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_waits_paused_and_both_have_two_monitors() {
        let guest = GuestFiles {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.gz".into(),
        };
        let (a, b) = (Path::new("/d/a.sock"), Path::new("/d/b.sock"));
        let disk = Disk::VhostUser("/d/v.sock".into());
        let src = qemu_args(&guest, &disk, 45, &[a, b], false);
        let dst = qemu_args(&guest, &disk, 45, &[a, b], true);
        assert_eq!(&dst[..src.len()], &src[..]);
        assert_eq!(&dst[src.len()..], ["-incoming", "defer", "-S"]);
        assert_eq!(src.iter().filter(|a| *a == "-qmp").count(), 2);
        assert!(src
            .iter()
            .any(|a| a.ends_with("strait.test=migrate strait.arg=45")));
        assert!(src.iter().any(|a| a.starts_with("vhost-user-blk-pci")));
    }

    #[test]
    fn the_qemu_peer_has_a_named_virtio_blk_node_on_its_raw_image() {
        let guest = GuestFiles {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.gz".into(),
        };
        let args = qemu_args(&guest, &Disk::Raw("/d/src.img".into()), 45, &[], true);
        assert!(args.contains(
            &"driver=raw,node-name=disk0,file.driver=file,file.filename=/d/src.img".to_owned()
        ));
        assert!(args.contains(&"virtio-blk-pci,drive=disk0,id=vda".to_owned()));
        assert!(!args
            .iter()
            .any(|a| a.contains("vhost-user") || a.contains("memfd")));
        assert!(args.ends_with(&["-incoming".into(), "defer".into(), "-S".into()]));
    }
}
