//! The demo's machinery on one host: the emulated WAN (`strait wanem`'s two network
//! namespaces), a destination engine in namespace B with its QEMU waiting (`-incoming defer
//! -S`), and a source engine in namespace A with the QEMU that runs the guest. The same
//! recipe as `engine/tests/migration_e2e.rs`.

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
}

/// Everything running. Field order is drop order: the QEMUs go before the engines they
/// are attached to, and the engines before the namespaces they run in.
pub struct Rig {
    pub src_qemu: QemuProc,
    pub dst_qemu: QemuProc,
    pub src_engine: EngineProc,
    pub dst_engine: EngineProc,
    /// Held for its drop: the link and the namespaces last as long as the rig.
    _wanem: Wanem,
    /// When the link came up: `--cut-at-s` counts from here.
    pub link_up: Instant,
    /// The destination engine, as `migrate` takes it.
    pub to: String,
    /// The source engine's QMP monitor, as `migrate` takes it.
    pub src_vmm: String,
    pub dst_image: PathBuf,
}

impl Rig {
    /// Starts the link, the images, the engines and both QEMUs, in that order.
    pub fn start(plan: &Plan, dir: &Path, interrupt: &Interrupt) -> Result<Rig, DemoError> {
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
        let certs = dir.join("certs");
        write_certs(&certs, &[wanem.addr_b().to_string()]).map_err(DemoError::Certs)?;
        let (src_image, dst_image) = (dir.join("src.img"), dir.join("dst.img"));
        make_image(&src_image, SOURCE_FILL_BYTE)?;
        make_image(&dst_image, DESTINATION_FILL_BYTE)?;
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
        let dst_qemu = start_qemu(plan, dir, "dst", interrupt)?;
        let mut command = wanem.command_in_a(&exe);
        command.args(["serve", "--tls-dir"]).arg(&certs);
        let src_engine = start_engine("source engine", command, dir, "src", &src_image, interrupt)?;
        let src_qemu = start_qemu(plan, dir, "src", interrupt)?;
        say(&format!(
            "engines  source in {}, destination in {} listening on {to}; QEMUs (TCG) started, \
             the destination waits with -incoming defer -S",
            wanem.namespace_a(),
            wanem.namespace_b()
        ));
        Ok(Rig {
            src_qemu,
            dst_qemu,
            src_engine,
            dst_engine,
            _wanem: wanem,
            link_up,
            to,
            src_vmm: format!("qemu:{}", dir.join("src-qmp-engine.sock").display()),
            dst_image,
        })
    }

    /// Fails if an engine or the source QEMU died; the destination QEMU too unless
    /// `dst_may_exit` (its guest powers off at the end of the workload).
    pub fn ensure_running(&mut self, dst_may_exit: bool) -> Result<(), DemoError> {
        self.src_engine.process.ensure_running()?;
        self.dst_engine.process.ensure_running()?;
        self.src_qemu.process.ensure_running()?;
        if !dst_may_exit {
            self.dst_qemu.process.ensure_running()?;
        }
        Ok(())
    }

    /// Stops every child (QEMUs first) and waits for their consoles to close.
    pub fn stop(&mut self) {
        for qemu in [&mut self.src_qemu, &mut self.dst_qemu] {
            qemu.process.stop();
            qemu.console.wait_closed(CONSOLE_CLOSE_TIMEOUT);
        }
        self.src_engine.process.stop();
        self.dst_engine.process.stop();
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

/// QEMU with the guest's `migrate` workload on `SIDE-vhost.sock`, two QMP monitors (the
/// engine's and the demo's), the console read by a [`Console`].
fn start_qemu(
    plan: &Plan,
    dir: &Path,
    side: &str,
    interrupt: &Interrupt,
) -> Result<QemuProc, DemoError> {
    let engine_qmp = dir.join(format!("{side}-qmp-engine.sock"));
    let qmp = dir.join(format!("{side}-qmp.sock"));
    let args = qemu_args(
        &plan.guest,
        &dir.join(format!("{side}-vhost.sock")),
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
    let mut process = ChildProcess::spawn(
        what,
        Command::new(QEMU_BINARY).args(args),
        &log,
        true,
        Stop::Kill,
    )?;
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
    Ok(QemuProc {
        process,
        console,
        qmp,
    })
}

/// QEMU's arguments. A destination gets the same machine (QEMU refuses incoming state that
/// does not match its devices) plus `-incoming defer -S`: it waits, paused, for the
/// engine's `migrate-incoming`, and after the commit for `cont`.
pub fn qemu_args(
    guest: &GuestFiles,
    vhost: &Path,
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
    args.extend([
        "-m".into(),
        format!("{memory}M"),
        // vhost-user backends map guest RAM, so it must be a shareable memfd.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-chardev".into(),
        format!("socket,id=c0,path={}", vhost.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=c0,num-queues=1".into(),
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
        let src = qemu_args(&guest, Path::new("/d/v.sock"), 45, &[a, b], false);
        let dst = qemu_args(&guest, Path::new("/d/v.sock"), 45, &[a, b], true);
        assert_eq!(&dst[..src.len()], &src[..]);
        assert_eq!(&dst[src.len()..], ["-incoming", "defer", "-S"]);
        assert_eq!(src.iter().filter(|a| *a == "-qmp").count(), 2);
        assert!(src
            .iter()
            .any(|a| a.ends_with("strait.test=migrate strait.arg=45")));
    }
}
