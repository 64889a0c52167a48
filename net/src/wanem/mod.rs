//! The WAN emulator: two network namespaces joined by a user-space forwarder that adds the
//! round-trip time, rate limit, loss, jitter and link cuts of a wide-area path.
//!
//! The kernel here has no `netem`, and kernel TCP must see a real RTT, so the path is made
//! in user space:
//!
//! ```text
//!  namespace A                      this process                       namespace B
//!  10.213.x.1/30                                                       10.213.x.2/30
//!  wan0 (TUN) --read--> [path A->B] --delay line--> release --write--> wan0 (TUN)
//!  wan0 (TUN) <--write-- release <--delay line-- [path B->A] <--read-- wan0 (TUN)
//! ```
//!
//! Each direction has a reader thread (TUN read, then the `path` model decides drop or
//! due time for every wire packet), a bounded delay line, and a release thread that sleeps
//! on an absolute `CLOCK_MONOTONIC` deadline until the head packet is due. Programs under
//! test run inside the namespaces (`ip netns exec`, or [`Wanem::run_in_a`] for code in
//! this process) and talk to the other side's address.
//!
//! The devices use TCP segmentation offload (the `gso` module): TCP crosses the forwarder
//! as super-packets of up to 64 KiB, which the path still treats segment by segment. That
//! is what lets two cores carry 1 Gbit/s at 200 ms with the forwarder using about a fifth
//! of a core; packet by packet it took well over a core.
//!
//! What it measures of itself, in [`WanemStats`]: the lateness of releases against their
//! due times (timer and scheduling error; means of 50–250 µs and maxima of a few ms were
//! measured under load on this kind of machine), and drops caused by the emulator falling
//! behind (`dropped_overload`), kept apart from the drops the emulated path makes.
//!
//! Inside the namespaces, TCP buffer autotuning may grow to 64 MiB (`tcp_rmem`/`tcp_wmem`
//! are per namespace). `net.core.rmem_max`/`wmem_max` are not settable there: in a
//! non-initial namespace they are read-only copies of the host's, so an explicit
//! `SO_RCVBUF` stays capped by the host's value.

mod cli;
mod forwarder;
mod gso;
mod netns;
mod path;
mod sys;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

pub use cli::run_cli;

use forwarder::{Counters, DirectionSpec, Forwarder};
use netns::{DeviceStatsFile, NamespacePair};
use path::{PathParams, NS_PER_S};

/// Longest RTT accepted: well beyond any real path (a geostationary hop is about 600 ms),
/// and it bounds how much a delay line must hold.
pub const RTT_MS_MAX: u32 = 10_000;

/// Largest jitter accepted, for the same reasons as [`RTT_MS_MAX`].
pub const JITTER_MS_MAX: u32 = 10_000;

/// Fastest rate limit accepted: 100 Gbit/s, far above what a user-space forwarder moves, so
/// anything larger is a typo.
pub const RATE_MBIT_MAX: u32 = 100_000;

/// Latest cut start and longest cut accepted: a day, longer than any test runs.
pub const CUT_S_MAX: f64 = 86_400.0;

/// The TUN device in each namespace.
pub const DEVICE: &str = "wan0";

/// The MTU of both devices: Ethernet's, as on the real WAN path.
const MTU_BYTES: u32 = 1500;

/// Packets (or TCP super-packets) a device queues for its reader: Linux's default for
/// Ethernet. At a 50,000 packet/s flood that is 20 ms of a reader waiting for a CPU; what
/// overflows is counted in `dropped_tun_queue`.
const TUN_QUEUE_PACKETS: u32 = 1000;

/// Each instance gets its own /30 out of 10.213.0.0/16 (16384 of them), so parallel
/// emulators have distinct addresses, which keeps logs and captures unambiguous even
/// though the addresses live only inside their namespaces.
const SUBNET_BASE: u32 = u32::from_be_bytes([10, 213, 0, 0]);
/// The number of /30 subnets in [`SUBNET_BASE`]'s /16.
const SUBNET_COUNT: u32 = 1 << 14;

/// TCP buffer autotuning limit inside the namespaces: twice the bandwidth-delay product of
/// the worst path the product targets (1 Gbit/s x 250 ms = 31 MB), since the receive window
/// advertises only part of the buffer (`tcp_adv_win_scale`). The host's 32 MiB would cap a
/// single stream below the link rate at 250 ms.
const TCP_BUFFER_BYTES_MAX: u32 = 64 << 20;

/// Sysctls set in both namespaces before the TUN device is created.
fn namespace_sysctls() -> [(&'static str, String); 4] {
    [
        // No IPv6 router solicitations or MLD reports on the link: every packet that crosses
        // it is the test's own, so the loss counters are exact.
        ("net.ipv6.conf.all.disable_ipv6", "1".to_string()),
        ("net.ipv6.conf.default.disable_ipv6", "1".to_string()),
        (
            "net.ipv4.tcp_rmem",
            format!("4096 131072 {TCP_BUFFER_BYTES_MAX}"),
        ),
        (
            "net.ipv4.tcp_wmem",
            format!("4096 16384 {TCP_BUFFER_BYTES_MAX}"),
        ),
    ]
}

/// What the emulated path does, the same in both directions.
#[derive(Debug, Clone)]
pub struct WanemConfig {
    /// Round-trip time; each direction adds half of it.
    pub rtt_ms: u32,
    /// Bottleneck rate of each direction in Mbit/s of IP packets (link-layer framing is
    /// not counted); 0 means unlimited. The queue in front of it holds one
    /// bandwidth-delay product, and tail-drops beyond.
    pub rate_mbit: u32,
    /// Percentage of packets lost at random in each direction, `0.0..=100.0`.
    pub loss_pct: f64,
    /// Extra per-packet delay, uniform in `0..=jitter_ms`, without reordering.
    pub jitter_ms: u32,
    /// Seconds after the start when the link is cut in both directions, if ever. Packets
    /// entering the link during the cut are lost; those already on the wire arrive.
    pub cut_at_s: Option<f64>,
    /// How long the cut lasts.
    pub cut_for_s: f64,
    /// Seeds loss and jitter (each direction derives its own stream); the same seed and
    /// the same packets give the same drops.
    pub seed: u64,
}

impl Default for WanemConfig {
    fn default() -> WanemConfig {
        WanemConfig {
            rtt_ms: 0,
            rate_mbit: 0,
            loss_pct: 0.0,
            jitter_ms: 0,
            cut_at_s: None,
            cut_for_s: 0.0,
            seed: 0,
        }
    }
}

impl WanemConfig {
    /// Checks every field against its bound.
    pub fn validate(&self) -> Result<(), WanemError> {
        let invalid = |reason: String| Err(WanemError::InvalidConfig { reason });
        if self.rtt_ms > RTT_MS_MAX {
            return invalid(format!("rtt_ms {} is above {RTT_MS_MAX}", self.rtt_ms));
        }
        if self.jitter_ms > JITTER_MS_MAX {
            return invalid(format!(
                "jitter_ms {} is above {JITTER_MS_MAX}",
                self.jitter_ms
            ));
        }
        if self.rate_mbit > RATE_MBIT_MAX {
            return invalid(format!(
                "rate_mbit {} is above {RATE_MBIT_MAX}",
                self.rate_mbit
            ));
        }
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return invalid(format!("loss_pct {} is not in 0..=100", self.loss_pct));
        }
        if let Some(cut_at_s) = self.cut_at_s {
            if !(0.0..=CUT_S_MAX).contains(&cut_at_s) {
                return invalid(format!("cut_at_s {cut_at_s} is not in 0..={CUT_S_MAX}"));
            }
        }
        if !(0.0..=CUT_S_MAX).contains(&self.cut_for_s) {
            return invalid(format!(
                "cut_for_s {} is not in 0..={CUT_S_MAX}",
                self.cut_for_s
            ));
        }
        Ok(())
    }

    fn path_params(&self, seed: u64) -> PathParams {
        let ms_to_ns = |ms: u32| u64::from(ms) * 1_000_000;
        let rate_bits_per_s = u64::from(self.rate_mbit) * 1_000_000;
        let s_to_ns = |s: f64| (s * NS_PER_S as f64) as u64;
        PathParams {
            one_way_ns: ms_to_ns(self.rtt_ms) / 2,
            jitter_ns_max: ms_to_ns(self.jitter_ms),
            rate_bits_per_s,
            queue_bytes_max: PathParams::queue_bytes_for(rate_bits_per_s, ms_to_ns(self.rtt_ms)),
            loss_probability: self.loss_pct / 100.0,
            cut_ns: self.cut_at_s.map(|at_s| {
                let start_ns = s_to_ns(at_s);
                (start_ns, start_ns.saturating_add(s_to_ns(self.cut_for_s)))
            }),
            seed,
        }
    }
}

/// Why the emulator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum WanemError {
    /// A configuration field is out of bounds.
    #[error("invalid wanem config: {reason}")]
    InvalidConfig {
        /// Which field and why.
        reason: String,
    },
    /// A helper program could not be started.
    #[error("failed to run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// A helper program exited with a failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A thread could not enter a namespace.
    #[error("failed to enter network namespace {namespace}")]
    EnterNamespace {
        /// The namespace.
        namespace: String,
        /// The setns (or open) error.
        #[source]
        source: io::Error,
    },
    /// Code run inside a namespace panicked.
    #[error("the helper thread in network namespace {namespace} panicked")]
    HelperPanicked {
        /// The namespace.
        namespace: String,
    },
    /// A namespace sysctl could not be set.
    #[error("failed to set sysctl {key} in network namespace {namespace}")]
    Sysctl {
        /// The namespace.
        namespace: String,
        /// The sysctl key.
        key: String,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// The TUN device could not be created.
    #[error("failed to create TUN device {device} in network namespace {namespace}")]
    OpenTun {
        /// The namespace.
        namespace: String,
        /// The device name.
        device: String,
        /// The open or TUNSETIFF error.
        #[source]
        source: io::Error,
    },
    /// The namespace's device statistics could not be opened.
    #[error("failed to open /proc/thread-self/net/dev in network namespace {namespace}")]
    DeviceStats {
        /// The namespace.
        namespace: String,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("failed to start thread {name}")]
    SpawnThread {
        /// The thread's name.
        name: String,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// The forwarder's stop eventfd could not be created.
    #[error("failed to create the forwarder's stop eventfd")]
    EventFd {
        /// The eventfd error.
        #[source]
        source: io::Error,
    },
    /// A signal handler could not be installed.
    #[error("failed to install a handler for signal {signal}")]
    Signal {
        /// The signal number.
        signal: i32,
        /// The sigaction error.
        #[source]
        source: io::Error,
    },
    /// A command run by `run_cli` could not be waited for or stopped.
    #[error("failed to wait for `{command}` in network namespace {namespace}")]
    Wait {
        /// The namespace.
        namespace: String,
        /// The command.
        command: String,
        /// The wait error.
        #[source]
        source: io::Error,
    },
    /// A command run by `run_cli` exited with a failure.
    #[error("`{command}` in network namespace {namespace} exited with {status}")]
    ChildFailed {
        /// The namespace.
        namespace: String,
        /// The command.
        command: String,
        /// Its exit status.
        status: ExitStatus,
    },
}

/// Counters of one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets written into the receiving device.
    pub packets_forwarded: u64,
    /// Their IP bytes.
    pub bytes_forwarded: u64,
    /// Packets lost to random loss.
    pub dropped_loss: u64,
    /// Packets tail-dropped by the full bottleneck queue (or delay line).
    pub dropped_queue: u64,
    /// Packets lost to a link cut.
    pub dropped_cut: u64,
    /// Packets dropped because the emulator itself fell behind (its delay line was full):
    /// not part of the emulated path. Non-zero means the forwarder is short of CPU.
    pub dropped_overload: u64,
    /// Packets the sending namespace's kernel dropped at its TUN device's queue because
    /// the reader did not keep up: emulator overload too, before the path saw them.
    pub dropped_tun_queue: u64,
    /// Wire packets cut out of a TCP super-packet (see the `gso` module) because other
    /// segments of it were dropped; they are also counted as forwarded.
    pub segments_rebuilt: u64,
    /// Packets the receiving device refused.
    pub write_errors: u64,
    /// Longest wait in the bottleneck queue.
    pub queue_delay_us_max: u64,
    /// Worst lateness of a release against its due time (timer and scheduling error).
    pub release_late_us_max: u64,
    /// Mean lateness of a release against its due time.
    pub release_late_us_mean: u64,
    /// CPU time of this direction's reader thread, while it runs.
    pub reader_cpu_ms: Option<u64>,
    /// CPU time of this direction's release thread (which also runs the receiving kernel
    /// stack: a TUN write delivers the packet synchronously).
    pub release_cpu_ms: Option<u64>,
}

/// Counters of both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WanemStats {
    /// From namespace A to namespace B.
    pub a_to_b: DirectionStats,
    /// From namespace B to namespace A.
    pub b_to_a: DirectionStats,
    /// Time since the forwarder started.
    pub elapsed_ms: u64,
}

impl fmt::Display for WanemStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "elapsed {} ms", self.elapsed_ms)?;
        for (name, d) in [("A->B", &self.a_to_b), ("B->A", &self.b_to_a)] {
            let cpu = |ms: Option<u64>| ms.map_or("-".to_string(), |ms| format!("{ms} ms"));
            writeln!(
                f,
                "{name}: forwarded {} packets / {} bytes; dropped loss {} queue {} cut {} overload {} \
                 tun queue {}; \
                 rebuilt {}; write errors {}; queue delay max {} us; release late max {} us mean {} us; \
                 cpu reader {} release {}",
                d.packets_forwarded,
                d.bytes_forwarded,
                d.dropped_loss,
                d.dropped_queue,
                d.dropped_cut,
                d.dropped_overload,
                d.dropped_tun_queue,
                d.segments_rebuilt,
                d.write_errors,
                d.queue_delay_us_max,
                d.release_late_us_max,
                d.release_late_us_mean,
                cpu(d.reader_cpu_ms),
                cpu(d.release_cpu_ms),
            )?;
        }
        Ok(())
    }
}

/// Mixed into the seed of the B-to-A direction: the two directions draw different streams
/// and so lose different packets, as on a real path. (The golden-ratio constant flips about
/// half the bits of any seed.)
const B_TO_A_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Numbers the instances of this process, for unique namespace names and subnets.
static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running emulator. Dropping it stops the forwarder and deletes the namespaces.
pub struct Wanem {
    config: WanemConfig,
    addr_a: Ipv4Addr,
    addr_b: Ipv4Addr,
    a_to_b: Arc<Counters>,
    b_to_a: Arc<Counters>,
    started_ns: u64,
    /// `/proc/net/dev` of A and B, for the drops at each device's queue.
    dev_stats: [DeviceStatsFile; 2],
    /// Cuts ordered at run time ([`Wanem::cut`]).
    cut: Arc<forwarder::CutControl>,
    // Field order is drop order: the forwarder (and with it the TUN devices) goes before
    // the namespaces.
    forwarder: Option<Forwarder>,
    namespaces: NamespacePair,
}

impl Wanem {
    /// Validates `config`, removes namespaces left by dead processes, creates the two
    /// namespaces with their devices, and starts forwarding.
    pub fn start(config: WanemConfig) -> Result<Wanem, WanemError> {
        config.validate()?;
        netns::remove_stale();
        let pid = std::process::id();
        let instance = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let subnet = pid.wrapping_mul(131).wrapping_add(instance) % SUBNET_COUNT;
        let addr_a = Ipv4Addr::from(SUBNET_BASE + subnet * 4 + 1);
        let addr_b = Ipv4Addr::from(SUBNET_BASE + subnet * 4 + 2);
        let namespaces = NamespacePair::create(
            format!("{}{pid}-{instance}", netns::PREFIX_A),
            format!("{}{pid}-{instance}", netns::PREFIX_B),
        )?;
        let (tun_a, dev_stats_a) = setup_namespace(&namespaces.a, addr_a)?;
        let (tun_b, dev_stats_b) = setup_namespace(&namespaces.b, addr_b)?;
        let a_to_b = Arc::new(Counters::default());
        let b_to_a = Arc::new(Counters::default());
        let started_ns = sys::monotonic_ns();
        let cut = Arc::new(forwarder::CutControl::default());
        let forwarder = Forwarder::start(
            tun_a,
            tun_b,
            DirectionSpec {
                name: "a2b",
                params: config.path_params(config.seed),
                counters: a_to_b.clone(),
            },
            DirectionSpec {
                name: "b2a",
                params: config.path_params(config.seed ^ B_TO_A_SEED_MIX),
                counters: b_to_a.clone(),
            },
            started_ns,
            cut.clone(),
        )?;
        info!(
            namespace_a = %namespaces.a, %addr_a, namespace_b = %namespaces.b, %addr_b,
            ?config, "wanem started"
        );
        Ok(Wanem {
            config,
            addr_a,
            addr_b,
            a_to_b,
            b_to_a,
            started_ns,
            dev_stats: [dev_stats_a, dev_stats_b],
            cut,
            forwarder: Some(forwarder),
            namespaces,
        })
    }

    /// The configuration this emulator runs with.
    pub fn config(&self) -> &WanemConfig {
        &self.config
    }

    /// The name of namespace A (for `ip netns exec`).
    pub fn namespace_a(&self) -> &str {
        &self.namespaces.a
    }

    /// The name of namespace B.
    pub fn namespace_b(&self) -> &str {
        &self.namespaces.b
    }

    /// The address of A's device, reachable from B.
    pub fn addr_a(&self) -> Ipv4Addr {
        self.addr_a
    }

    /// The address of B's device, reachable from A.
    pub fn addr_b(&self) -> Ipv4Addr {
        self.addr_b
    }

    /// `ip netns exec A program`, to which the caller adds arguments and then spawns.
    pub fn command_in_a(&self, program: &str) -> Command {
        command_in(&self.namespaces.a, program)
    }

    /// `ip netns exec B program`.
    pub fn command_in_b(&self, program: &str) -> Command {
        command_in(&self.namespaces.b, program)
    }

    /// Runs `f` on a thread inside namespace A and returns its result. Sockets it creates
    /// stay in A wherever they are used afterwards.
    pub fn run_in_a<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, WanemError> {
        netns::run_in(&self.namespaces.a, f)
    }

    /// Runs `f` on a thread inside namespace B and returns its result.
    pub fn run_in_b<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, WanemError> {
        netns::run_in(&self.namespaces.b, f)
    }

    /// Cuts the link in both directions now, for `duration` (at most [`CUT_S_MAX`]
    /// seconds): every packet entering it meanwhile is lost, those already on the wire
    /// arrive. For tests and drills that must cut at a moment chosen by what they observe
    /// (a phase of a migration), not at a time fixed in advance. Replaces a cut ordered
    /// earlier with this method; a scheduled cut (`cut_at_s`) applies as well.
    pub fn cut(&self, duration: std::time::Duration) {
        let now = sys::monotonic_ns().saturating_sub(self.started_ns);
        let len = duration.min(std::time::Duration::from_secs_f64(CUT_S_MAX));
        let len_ns = u64::try_from(len.as_nanos()).unwrap_or(u64::MAX);
        info!(?duration, "wanem: link cut");
        self.cut.set(now, now.saturating_add(len_ns));
    }

    /// The counters of both directions so far.
    pub fn stats(&self) -> WanemStats {
        let tun_dropped = |side: usize| self.dev_stats[side].tx_dropped(DEVICE).unwrap_or(0);
        WanemStats {
            a_to_b: DirectionStats {
                dropped_tun_queue: tun_dropped(0),
                ..self.a_to_b.snapshot()
            },
            b_to_a: DirectionStats {
                dropped_tun_queue: tun_dropped(1),
                ..self.b_to_a.snapshot()
            },
            elapsed_ms: sys::monotonic_ns().saturating_sub(self.started_ns) / 1_000_000,
        }
    }

    /// Stops the forwarder and deletes both namespaces (as dropping does).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Wanem {
    fn drop(&mut self) {
        // Join the threads and close the devices before the namespaces go (field order
        // would do the same; this makes it explicit).
        self.forwarder.take();
        info!(namespace_a = %self.namespaces.a, namespace_b = %self.namespaces.b, "wanem stopped");
    }
}

fn command_in(namespace: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace, program]);
    command
}

/// Sets the namespace's sysctls, creates its TUN device, and brings the device and
/// loopback up with `addr`/30. Returns the device's fd.
fn setup_namespace(
    namespace: &str,
    addr: Ipv4Addr,
) -> Result<(OwnedFd, DeviceStatsFile), WanemError> {
    let (tun, dev_stats) = netns::run_in(namespace, || -> Result<_, WanemError> {
        for (key, value) in namespace_sysctls() {
            netns::write_sysctl(key, &value).map_err(|source| WanemError::Sysctl {
                namespace: namespace.to_string(),
                key: key.to_string(),
                source,
            })?;
        }
        let dev_stats = DeviceStatsFile::open_here().map_err(|source| WanemError::DeviceStats {
            namespace: namespace.to_string(),
            source,
        })?;
        let tun = sys::open_tun(DEVICE).map_err(|source| WanemError::OpenTun {
            namespace: namespace.to_string(),
            device: DEVICE.to_string(),
            source,
        })?;
        Ok((tun, dev_stats))
    })??;
    let (tun, offload) = tun;
    if !offload {
        warn!(
            namespace,
            device = DEVICE,
            "no segmentation offload: forwarding packet by packet costs more CPU"
        );
    }
    let mtu = MTU_BYTES.to_string();
    let queue = TUN_QUEUE_PACKETS.to_string();
    let cidr = format!("{addr}/30");
    netns::ip(&["-n", namespace, "link", "set", "lo", "up"])?;
    netns::ip(&["-n", namespace, "addr", "add", &cidr, "dev", DEVICE])?;
    netns::ip(&[
        "-n",
        namespace,
        "link",
        "set",
        DEVICE,
        "mtu",
        &mtu,
        "txqueuelen",
        &queue,
        "up",
    ])?;
    Ok((tun, dev_stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bounds_are_enforced() {
        let ok = WanemConfig::default();
        assert!(ok.validate().is_ok());
        let bad = [
            WanemConfig {
                rtt_ms: RTT_MS_MAX + 1,
                ..ok.clone()
            },
            WanemConfig {
                loss_pct: 100.1,
                ..ok.clone()
            },
            WanemConfig {
                loss_pct: f64::NAN,
                ..ok.clone()
            },
            WanemConfig {
                cut_at_s: Some(-1.0),
                ..ok.clone()
            },
            WanemConfig {
                cut_for_s: f64::INFINITY,
                ..ok.clone()
            },
            WanemConfig {
                rate_mbit: RATE_MBIT_MAX + 1,
                ..ok.clone()
            },
            WanemConfig {
                jitter_ms: JITTER_MS_MAX + 1,
                ..ok
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(WanemError::InvalidConfig { .. })),
                "{config:?} accepted"
            );
        }
    }

    #[test]
    fn path_params_convert_units() {
        let params = WanemConfig {
            rtt_ms: 200,
            rate_mbit: 1000,
            loss_pct: 5.0,
            jitter_ms: 3,
            cut_at_s: Some(1.5),
            cut_for_s: 2.0,
            seed: 1,
        }
        .path_params(1);
        assert_eq!(params.one_way_ns, 100_000_000);
        assert_eq!(params.jitter_ns_max, 3_000_000);
        assert_eq!(params.rate_bits_per_s, 1_000_000_000);
        assert_eq!(params.queue_bytes_max, 25_000_000);
        assert_eq!(params.cut_ns, Some((1_500_000_000, 3_500_000_000)));
        assert!((params.loss_probability - 0.05).abs() < 1e-12);
    }
}
