//! The command line. Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// strait moves a running VM between hosts that share nothing.
#[derive(Debug, Parser)]
#[command(name = "strait", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one disk image to a VMM over a vhost-user-blk socket.
    Serve(ServeArgs),
    /// Talk to a running engine over its control socket.
    Ctl(CtlArgs),
    /// Make a self-signed CA and node certificates for a first setup of mutual TLS.
    Certs(CertsArgs),
    /// Emulate a WAN between two network namespaces (delay, rate, loss, jitter, link cuts).
    Wanem(WanemArgs),
    /// Check the link between two engines: one side listens, the other sends a stream
    /// whose every byte the listener verifies; both print what they measured as JSON.
    Link(LinkArgs),
    /// Measure parts of strait on this machine.
    Bench(BenchArgs),
    /// Live-migrate a running VM across an emulated WAN on this machine, and prove that it
    /// went on over there: a small guest boots under QEMU (TCG) on a disk served by a
    /// source engine; two engines run in two network namespaces joined by `strait wanem`;
    /// the VM, disk and memory, moves to the destination with the control API's `migrate`
    /// while its workload runs. Prints a progress line per second, a report (times,
    /// downtime, bytes, link use, the workload's slowdown, the checks) and writes an SVG
    /// chart of the timeline. Needs root, QEMU and the test guest (`make demo` provides
    /// all three). Exit status 1 if the migration did not commit or a check failed.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder with the guest's `vmlinuz` and `initramfs.gz`, as `scripts/guest/build.sh`
    /// builds them (it prints the folder).
    #[arg(long, value_name = "DIR", default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Round-trip time of the emulated WAN, in milliseconds.
    #[arg(long, default_value_t = crate::demo::RTT_MS_DEFAULT)]
    pub rtt_ms: u32,
    /// Rate of the emulated WAN in each direction, in Mbit/s.
    #[arg(long, default_value_t = crate::demo::RATE_MBIT_DEFAULT)]
    pub rate_mbit: u32,
    /// How long the guest's workload runs, in seconds of guest time (20 to 600): long
    /// enough for a baseline, the migration, and a while on the destination.
    #[arg(long, default_value_t = crate::demo::WORKLOAD_S_DEFAULT)]
    pub workload_s: u32,
    /// Cut the link this many seconds after it comes up (the migration starts about 10 s
    /// after; the demo prints when).
    #[arg(long)]
    pub cut_at_s: Option<f64>,
    /// How long the cut lasts, in seconds.
    #[arg(long, default_value_t = 0.0, requires = "cut_at_s")]
    pub cut_for_s: f64,
    /// Where to write the SVG chart of the migration's timeline.
    #[arg(long, value_name = "PATH", default_value = crate::demo::SVG_DEFAULT)]
    pub svg: PathBuf,
    /// Folder for the images, sockets, certificates and logs (default: a new temporary
    /// folder, removed at the end unless `--keep` or the demo failed).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Keep the work folder.
    #[arg(long)]
    pub keep: bool,
    /// Also print the report as one JSON object, on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Which system migrates the VM: `strait` (two engines, the control API's `migrate`),
    /// or `qemu`, the peer it is compared with: what libvirt does for
    /// `--copy-storage-all` (the destination QEMU exports its disk over NBD, the source
    /// mirrors to it with `blockdev-mirror`, then QEMU's own `migrate` over TCP), across
    /// the same emulated WAN.
    #[arg(long, value_enum, default_value_t = DemoSystem::Strait)]
    pub system: DemoSystem,
    /// With `--system qemu`: the mirror's `copy-mode` (`background` copies the guest's
    /// writes after they complete; `write-blocking` completes a write only once it reached
    /// the destination too).
    #[arg(long, value_enum, default_value_t = CopyMode::Background)]
    pub copy_mode: CopyMode,
    /// Let the guests' vCPUs share the cores with everything else. By default (with two
    /// cores or more) each QEMU's vCPU thread gets the last core to itself and the engines,
    /// the WAN emulator and the rest of QEMU the others, as on two hosts where the
    /// migration's work does not run on the guest's core.
    #[arg(long)]
    pub share_cores: bool,
    /// With `--system strait`: what slows the guest's vCPUs when it dirties memory faster
    /// than the link carries it (`strait ctl migrate --throttle`): `vmm`, QEMU's
    /// auto-converge, or `cgroup`, a CFS quota on the vCPU thread (needs root and a v1
    /// `cpu` cgroup hierarchy).
    #[arg(long, value_name = "vmm|cgroup", default_value = "vmm",
          value_parser = clap::builder::PossibleValuesParser::new(crate::migration::stun::Actuator::NAMES))]
    pub throttle: String,
}

/// `strait demo --system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoSystem {
    Strait,
    Qemu,
}

/// `strait demo --copy-mode`: QEMU's `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyMode {
    Background,
    WriteBlocking,
}

impl CopyMode {
    /// The name QMP takes (`blockdev-mirror copy-mode`).
    pub fn qmp_name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Goodput of the session (or of one plain TCP connection) from namespace A to B over
    /// an emulated WAN, every byte verified. Needs root (network namespaces). The last
    /// line of stdout is one JSON object.
    Link(LinkBenchArgs),
}

/// What `strait bench link` pushes over the emulated path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkBenchMode {
    /// A strait session: Bulk at full speed plus a steady Mirror and Control stream.
    Session,
    /// The peer to beat: one plain kernel TCP connection (the default congestion control).
    SingleTcp,
}

/// Default payload of a bulk send: a quarter of a 1 MiB frame, like a disk-copy chunk.
const DEFAULT_PAYLOAD_KIB: usize = 256;

#[derive(Debug, Args)]
pub struct LinkBenchArgs {
    /// Round-trip time the emulated link adds, in milliseconds.
    #[arg(long, default_value_t = 214)]
    pub rtt_ms: u32,
    /// Link rate in each direction, in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u32,
    /// Length of the measured window, in seconds. A warm-up of max(2 s, 10 RTT) before
    /// it is not counted.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Packet loss in each direction, in percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Plain TCP instead of mutual TLS (session mode only).
    #[arg(long)]
    pub insecure: bool,
    /// TCP connections the session stripes over (session mode only).
    #[arg(long, default_value_t = strait_net::session::DEFAULT_CONNECTIONS)]
    pub connections: u16,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = LinkBenchMode::Session)]
    pub mode: LinkBenchMode,
    /// Print only the JSON line (otherwise a one-line summary comes first).
    #[arg(long)]
    pub json: bool,
    /// Bytes per bulk payload (session) or per write (single TCP), in KiB.
    #[arg(long, default_value_t = DEFAULT_PAYLOAD_KIB, value_parser = clap::value_parser!(usize))]
    pub payload_kib: usize,
    /// Seed of the emulator's loss generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Session receive window per class, in MiB (the send buffer follows at 5/4 of it), to
    /// see whether the window bounds goodput (session mode only).
    #[arg(long, default_value_t = strait_net::session::RECV_WINDOW_BYTES >> 20)]
    pub recv_window_mib: u64,
    /// Session in-flight bound per connection, in MiB (session mode only).
    #[arg(long, default_value_t = strait_net::session::CONN_INFLIGHT_BYTES_MAX >> 20)]
    pub conn_inflight_mib: u64,
    /// Print the Bulk class's flow-control state (MiB) every 100 ms to stderr, to see what
    /// bounds the session: send backlog, credit left, unacked, received, applied, frames
    /// held for reordering (session mode only).
    #[arg(long)]
    pub trace: bool,
}

#[derive(Debug, Args)]
pub struct LinkArgs {
    #[command(subcommand)]
    pub command: LinkCommand,
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Accept one session, verify everything it carries, and exit once the sender
    /// finished (exit status 1 if a byte was wrong or the session failed).
    Listen(LinkListenArgs),
    /// Open a session to a listening engine, send a verified stream, finish gracefully.
    Send(LinkSendArgs),
}

/// How an engine authenticates its link: mutual TLS from a directory, or nothing.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct LinkSecurity {
    /// Directory with `ca.pem`, `node.pem` and `node.key` (as `strait certs --out DIR`
    /// writes): this engine's identity and the CA whose peers it trusts.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plain TCP, no authentication: only to measure the cost of TLS.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, Args)]
pub struct LinkListenArgs {
    /// Address and port to listen on (port 0 picks one; the address is printed).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub security: LinkSecurity,
}

#[derive(Debug, Args)]
pub struct LinkSendArgs {
    /// The listening engine.
    #[arg(long, value_name = "ADDR:PORT")]
    pub to: std::net::SocketAddr,
    #[command(flatten)]
    pub security: LinkSecurity,
    /// How much to send, in MiB.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// TCP connections the session stripes over.
    #[arg(long, default_value_t = strait_net::session::DEFAULT_CONNECTIONS)]
    pub connections: u16,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `node.pem` and `node.key` into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Names (DNS names or IP addresses) the node certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WanemArgs {
    /// Round-trip time the link adds, in milliseconds (split evenly between directions).
    #[arg(long, default_value_t = 0)]
    pub rtt_ms: u32,
    /// Link rate in each direction, in Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u32,
    /// Packet loss in each direction, in percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Random extra one-way delay, uniform in 0..=jitter, in milliseconds (packets of one
    /// direction stay in order, as on a real path).
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u32,
    /// Cut the link this many seconds after start.
    #[arg(long)]
    pub cut_at_s: Option<f64>,
    /// How long the cut lasts, in seconds.
    #[arg(long, default_value_t = 0.0)]
    pub cut_for_s: f64,
    /// Seed of the loss and jitter generator (runs with one seed drop the same packets).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shell command to run in namespace A (the link's left side).
    #[arg(long)]
    pub run_a: Option<String>,
    /// Shell command to run in namespace B (the link's right side).
    #[arg(long)]
    pub run_b: Option<String>,
    /// Keep the link up this long when no command is given (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The disk image to serve (a raw file; it is not resized).
    #[arg(long)]
    pub disk: PathBuf,
    /// Path of the vhost-user socket the VMM connects to (created; must not exist).
    /// Required unless the engine receives a replica (`--listen`). With `--listen`, the
    /// disk is served fenced (guest writes fail) until `promote`.
    #[arg(long, required_unless_present = "listen")]
    pub vhost_socket: Option<PathBuf>,
    /// Receive a replica of a source engine's disk into `--disk` (which must be at least as
    /// large). Accepts only the peers `--tls-dir` trusts.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory with `ca.pem`, `node.pem` and `node.key` (`strait certs --out DIR`): this
    /// engine's identity on the link, and the CA whose peers it trusts. Needed to
    /// replicate or to `--listen`, unless `--insecure`.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,
    /// Replicate over plain TCP without authentication: only to measure the cost of TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Path of the JSON control socket (created with mode 0600; must not exist).
    #[arg(long)]
    pub control: PathBuf,
    /// Number of virtqueues offered to the guest.
    #[arg(long, default_value_t = strait_vhost_blk::DEFAULT_QUEUES)]
    pub queues: u16,
    /// CPU cores to run one executor each on, e.g. `0,1` or `0-3`. Queues are spread over
    /// them round-robin. Default: core 0 only.
    #[arg(long, value_parser = parse_core_list)]
    pub cores: Option<CoreList>,
    /// Serve the disk read-only: the guest sees VIRTIO_BLK_F_RO and writes fail.
    #[arg(long)]
    pub read_only: bool,
    /// The serial number the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    /// Default: derived from the image's device and inode numbers.
    #[arg(long)]
    pub serial: Option<String>,
    /// The VMM this engine's disk belongs to, as `qemu:QMP_SOCKET`. On a destination
    /// (`--listen`) it is the VMM that receives migrations: a QEMU started with
    /// `-incoming defer -S` and the disk on `--vhost-socket`. The engine holds its QMP
    /// connection while a migration runs, so give QEMU a second `-qmp` for anything else.
    #[arg(long, value_name = "qemu:QMP_SOCKET")]
    pub vmm: Option<String>,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Path of the engine's control socket.
    #[arg(long)]
    pub control: PathBuf,
    /// Print the raw JSON result instead of the human-readable form.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// The served disk, its queues, negotiated features, whether a VMM is connected, and
    /// replication (state, progress, lag).
    Status {
        /// Follow replication: one progress line per interval (state, a bar, bytes, rate,
        /// lag) until interrupted, or `--count` lines.
        #[arg(long)]
        watch: bool,
        /// With `--watch`: milliseconds between lines.
        #[arg(long, default_value_t = 1000, requires = "watch")]
        interval_ms: u64,
        /// With `--watch`: stop after this many lines.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Per-queue request counts, throughput, latency percentiles and error counters.
    Stats,
    /// Replicate the served disk to a destination engine (`strait serve --listen`):
    /// bulk copy, then asynchronous mirroring of guest writes.
    Replicate {
        /// The destination engine's address.
        #[arg(long, value_name = "ADDR:PORT")]
        to: std::net::SocketAddr,
    },
    /// Compare the replica with the served disk by SHA-256 digests of every 512 KiB chunk,
    /// while the guest runs, and report the ranges that differ. Runs in the engine; the
    /// result is in `status`. Needs a replication in sync (or behind).
    Verify {
        /// Follow the run with a progress line per interval until it ends; exit status 1
        /// if a chunk differs or the run failed.
        #[arg(long)]
        wait: bool,
        /// Copy the chunks found different again (the bulk copy resends them).
        #[arg(long)]
        repair: bool,
        /// With `--wait`: milliseconds between progress lines.
        #[arg(long, default_value_t = 1000, requires = "wait")]
        interval_ms: u64,
    },
    /// Make this replica (an engine started with `--listen`) a disk of its own: it takes
    /// no more replication, a VMM may write it, and a source still connected is fenced.
    /// Refused while the replica is inconsistent (a copy or resync unfinished) or while a
    /// source that was not demoted is connected.
    Promote {
        /// Promote anyway (disaster recovery: the source is gone). The replica may then be
        /// inconsistent, or miss the source's last writes.
        #[arg(long)]
        force: bool,
    },
    /// Fence this engine's disk: guest writes fail from now on (reads go on). When it
    /// replicates, the destination is told once it holds every write, and may then be
    /// promoted.
    Demote,
    /// Live-migrate the running VM, disk and memory together, to a destination engine
    /// (`strait serve --listen ... --vhost-socket ... [--vmm qemu:QMP]`): the disk is copied
    /// (if not yet), then QEMU migrates its memory through this engine over the same link,
    /// and the switchover is atomic: the VM runs on exactly one side, whatever fails.
    /// Prints a progress line per interval until the migration ends; exit status 1 unless
    /// it committed.
    Migrate {
        /// The destination engine's address (not needed if this engine replicates to it
        /// already).
        #[arg(long, value_name = "ADDR:PORT")]
        to: Option<std::net::SocketAddr>,
        /// This VM's VMM: `qemu:QMP_SOCKET`.
        #[arg(long, value_name = "qemu:QMP_SOCKET")]
        vmm: String,
        /// The destination's VMM, forwarded to the destination engine (for setups on one
        /// machine; in production the destination engine knows its own, `serve --vmm`).
        #[arg(long, value_name = "qemu:QMP_SOCKET")]
        dst_vmm: Option<String>,
        /// The guest's downtime to aim for, in milliseconds: QEMU's `downtime-limit` is
        /// what the link leaves of it (the queue ahead of QEMU's last pages, their trip
        /// across the WAN, the destination's resume), at least 100 ms.
        #[arg(long, default_value_t = strait_engine_defaults::DOWNTIME_MS)]
        downtime_ms: u64,
        /// Roll the migration back if the VM has not stopped for the switchover this many
        /// seconds into the memory phase (1 to 86400; the VM goes on here). Without it the
        /// vCPU throttle alone makes QEMU converge, however long that takes.
        #[arg(long, value_name = "SECONDS")]
        converge_timeout_s: Option<u64>,
        /// What slows the guest's vCPUs when it dirties memory faster than the link
        /// carries it: `vmm` (QEMU's auto-converge, which applies a new value only at its
        /// next trigger, seconds later) or `cgroup` (a CFS quota on the vCPU threads,
        /// acting within a quarter second; needs a v1 `cpu` cgroup hierarchy and root,
        /// and this engine on the VMM's host).
        #[arg(long, value_name = "vmm|cgroup", default_value = "vmm",
              value_parser = clap::builder::PossibleValuesParser::new(crate::migration::stun::Actuator::NAMES))]
        throttle: String,
        /// Milliseconds between progress lines.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Return at once instead of following the migration.
        #[arg(long)]
        no_wait: bool,
    },
    /// Roll the running migration back (at once until `Commit` goes out with
    /// `migrate-continue`; after that, only if the destination agrees and records it).
    MigrateCancel,
}

mod strait_engine_defaults {
    /// `migrate --downtime-ms`: see [`crate::migration::source::DOWNTIME_LIMIT_MS_DEFAULT`].
    pub const DOWNTIME_MS: u64 = crate::migration::source::DOWNTIME_LIMIT_MS_DEFAULT;
}

/// A list of CPU cores, as `--cores` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

/// Parses `0,2,4-7` into `[0, 2, 4, 5, 6, 7]`.
pub fn parse_core_list(text: &str) -> Result<CoreList, String> {
    let mut cores = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (parse_core(a)?, parse_core(b)?),
            None => {
                let core = parse_core(part)?;
                (core, core)
            }
        };
        if first > last {
            return Err(format!("core range {part} runs backwards"));
        }
        for core in first..=last {
            if cores.contains(&core) {
                return Err(format!("core {core} is listed twice"));
            }
            cores.push(core);
        }
    }
    if cores.is_empty() {
        return Err("the core list is empty".to_string());
    }
    Ok(CoreList(cores))
}

fn parse_core(text: &str) -> Result<usize, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a core number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse() {
        assert_eq!(parse_core_list("0"), Ok(CoreList(vec![0])));
        assert_eq!(
            parse_core_list("0,2,4-6"),
            Ok(CoreList(vec![0, 2, 4, 5, 6]))
        );
        assert!(parse_core_list("3-1").is_err());
        assert!(parse_core_list("1,1").is_err());
        assert!(parse_core_list("x").is_err());
        assert!(parse_core_list("").is_err());
    }
}
