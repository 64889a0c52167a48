//! The memory stream with real parts: two QEMUs (TCG) migrate a running guest through
//! strait's memory stream, over a loopback link with mutual TLS and across `strait wanem`
//! (100 ms RTT, 200 Mbit/s), with `return-path` and `pause-before-switchover`; and the
//! failures: a destination VMM socket that does not exist, a QEMU killed mid-stream on
//! either side, a peer that sends garbage.
//!
//! The guest is a 79-byte multiboot kernel written by the test: it stamps every 4 KiB page
//! from 4 MiB to [`FILL_END`] once (so they migrate as full pages, not zero markers), then
//! dirties the pages from 4 to 8 MiB in a loop, so every pass finds work.
//!
//! Tests that need QEMU say `qemu` in their name and skip with a loud message without it
//! (fail under CI); the WAN test needs root and network namespaces and says `netns`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use strait_engine::migration::stream::{
    DestinationEnd, SourceEnd, StreamConfig, StreamError, StreamHandle, StreamMonitor,
    StreamReport, Verdict, LINK_UNSENT_BYTES_MAX,
};
use strait_net::protocol::Role;
use strait_net::session::tcp::Link;
use strait_net::session::SessionConfig;
use strait_net::tls::{write_certs, TlsIdentity};
use strait_net::wanem::{Wanem, WanemConfig};
use strait_net::StreamClass;
use strait_vmm::qmp::QmpConfig;
use strait_vmm::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    QemuVmm, RunState, Vmm,
};

/// Guest RAM: room for [`FILL_END`] and the firmware; two such guests fit the machine
/// easily.
const GUEST_MIB: u32 = 128;
/// The guest stamps every page from 4 MiB up to here: 108 MiB of full pages, about 4.5 s at
/// 200 Mbit/s, so QEMU measures its rate over dozens of 100 ms periods.
const FILL_END: u32 = 112 << 20;
/// No cap from QEMU itself (its default is 128 MiB/s): the link must be what limits.
const UNCAPPED_BYTES_PER_S: u64 = 1 << 32;
/// A QEMU cap that makes a migration take several seconds on any link, for the tests that
/// kill a QEMU mid-stream.
const SLOW_BYTES_PER_S: u64 = 16 << 20;
/// The emulated WAN.
const WAN_RTT_MS: u32 = 100;
const WAN_RATE_MBIT: u32 = 200;
/// The downtime QEMU aims for (its default, set explicitly).
const DOWNTIME_LIMIT_MS: u64 = 300;
/// A migration of 108 MiB at 200 Mbit/s takes about 5 s; the rest is margin for a loaded
/// 2-core machine running two TCG guests.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU creates its QMP socket within milliseconds; the margin is for a busy machine.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest stamps its pages in well under a second under TCG.
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failed stream may take to end on both sides: it must never hang, and the
/// relay's own bounds are shorter (an abort is seen within 50 ms, a peer's end within an
/// RTT, a lingering QEMU within 30 s).
const FAILURE_END_TIMEOUT: Duration = Duration::from_secs(45);
/// How often the test samples `query-migrate`: QEMU recomputes its rate every 100 ms.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// The local buffers between QEMU and the link: strait's unsent bound, plus both socket
/// buffers (QEMU's 208 KiB, strait's 128 KiB) and the piece in hand, rounded up to 1 MiB.
const LOCAL_BUFFERS_BYTES: u64 = LINK_UNSENT_BYTES_MAX + (1 << 20);
/// Link connections, as in production.
const CONNECTIONS: u16 = 4;

// --- the guest ---------------------------------------------------------------------------

/// Writes the multiboot guest described in the module docs and returns its path.
fn guest_kernel(dir: &Path) -> PathBuf {
    const LOAD_ADDRESS: u32 = 0x0010_0000;
    const MAGIC: u32 = 0x1BAD_B002;
    // Bit 16: the header gives the load addresses (the "a.out kludge"): a flat binary.
    const FLAGS: u32 = 0x0001_0000;
    const HEADER_BYTES: u32 = 32;
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        LOAD_ADDRESS,                // header_addr
        LOAD_ADDRESS,                // load_addr
        0,                           // load_end_addr: the whole file
        0,                           // bss_end_addr: none
        LOAD_ADDRESS + HEADER_BYTES, // entry_addr: right after the header
    ];
    let end = FILL_END.to_le_bytes();
    #[rustfmt::skip]
    let code: [u8; 47] = [
        0xBF, 0x00, 0x00, 0x40, 0x00,                   //        mov edi, 0x400000
        0x89, 0x3F,                                     // fill:  mov [edi], edi
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00,             //        add edi, 0x1000
        0x81, 0xFF, end[0], end[1], end[2], end[3],     //        cmp edi, FILL_END
        0x72, 0xF0,                                     //        jb fill
        0x31, 0xC0,                                     //        xor eax, eax
        0xBF, 0x00, 0x00, 0x40, 0x00,                   // outer: mov edi, 0x400000
        0x89, 0x07,                                     // inner: mov [edi], eax
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00,             //        add edi, 0x1000
        0x81, 0xFF, 0x00, 0x00, 0x80, 0x00,             //        cmp edi, 0x800000
        0x72, 0xF0,                                     //        jb inner
        0x40,                                           //        inc eax
        0xEB, 0xE8,                                     //        jmp outer
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend_from_slice(&code);
    let path = dir.join("guest.bin");
    std::fs::write(&path, image).unwrap();
    path
}

/// How a test QEMU starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Running,
    /// `-incoming defer`: a destination waiting for `migrate-incoming`.
    Incoming,
    /// `-incoming defer -S`: a destination that stays paused after the migration.
    IncomingPaused,
}

/// A QEMU running the guest, killed and reaped on drop.
struct Vm {
    child: Child,
    log: PathBuf,
    vmm: QemuVmm,
}

impl Vm {
    fn start(dir: &Path, name: &str, kernel: &Path, start: Start) -> Vm {
        let qmp = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new("qemu-system-x86_64");
        command
            // KVM hangs on these machines (FACTS.md); TCG works everywhere.
            .args(["-accel", "tcg", "-machine", "q35", "-nodefaults"])
            .args(["-no-user-config", "-display", "none", "-m"])
            .arg(format!("{GUEST_MIB}M"))
            .arg("-kernel")
            .arg(kernel)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if start == Start::IncomingPaused {
            command.arg("-S");
        }
        if start != Start::Running {
            command.args(["-incoming", "defer"]);
        }
        let log_file = std::fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        common::kill_with_parent(&mut command);
        let mut child = command.spawn().expect("spawn QEMU");
        common::wait_for_socket(&qmp, &mut child, "QMP", Some(&log), QEMU_START_TIMEOUT).unwrap();
        let config = QmpConfig {
            connect_timeout: QEMU_START_TIMEOUT,
            ..QmpConfig::default()
        };
        let vmm = QemuVmm::connect_with(&qmp, config).expect("connect to QMP");
        Vm { child, log, vmm }
    }

    /// The guest word at `address`, read through the monitor.
    fn read_word(&self, address: u32) -> Option<u32> {
        let output: String = self
            .vmm
            .qmp()
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": format!("xp /1wx {address:#x}")})),
            )
            .ok()?;
        // "0000000000400000: 0x0040002a"
        let hex = output.rsplit("0x").next()?;
        u32::from_str_radix(hex.trim(), 16).ok()
    }

    /// Waits until the guest stamped its last page (and so every page before it).
    fn wait_guest_ready(&self) {
        let last_page = FILL_END - 0x1000;
        let started = Instant::now();
        while self.read_word(last_page) != Some(last_page) {
            assert!(
                started.elapsed() < GUEST_READY_TIMEOUT,
                "the guest did not fill its memory: {}",
                self.log_text()
            );
            thread::sleep(SAMPLE_INTERVAL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

// --- links -------------------------------------------------------------------------------

/// A dialer (the source engine) and an acceptor (the destination) over loopback TCP with
/// mutual TLS, as two engines given the same `--tls-dir`.
fn loopback_links(dir: &Path) -> (Arc<Link>, Arc<Link>) {
    let tls = identity(dir, "127.0.0.1");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    open(listener, &tls, || dial(addr, &tls))
}

fn identity(dir: &Path, host: &str) -> TlsIdentity {
    let certs = dir.join("tls");
    write_certs(&certs, &[host.to_string()]).unwrap();
    TlsIdentity::load(&certs).unwrap()
}

fn dial(addr: SocketAddr, tls: &TlsIdentity) -> Link {
    Link::connect(
        addr,
        CONNECTIONS,
        Some(tls),
        SessionConfig::new(Role::Source),
    )
    .unwrap()
}

/// Opens the session: `dial` runs the source's side, where the source lives.
fn open(
    listener: TcpListener,
    tls: &TlsIdentity,
    dial: impl FnOnce() -> Link,
) -> (Arc<Link>, Arc<Link>) {
    thread::scope(|s| {
        let acceptor =
            s.spawn(|| Link::accept(listener, Some(tls), SessionConfig::new(Role::Destination)));
        let dialer = dial();
        (
            Arc::new(dialer),
            Arc::new(acceptor.join().unwrap().unwrap()),
        )
    })
}

fn wanem() -> Option<Wanem> {
    common::wanem_or_skip(WanemConfig {
        rtt_ms: WAN_RTT_MS,
        rate_mbit: WAN_RATE_MBIT,
        ..WanemConfig::default()
    })
}

/// The source engine's link in namespace A, the destination's in B.
fn links_across(wanem: &Wanem, dir: &Path) -> (Arc<Link>, Arc<Link>) {
    let tls = identity(dir, &wanem.addr_b().to_string());
    let listener = wanem
        .run_in_b(|| TcpListener::bind((wanem.addr_b(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    open(listener, &tls, || {
        wanem.run_in_a(|| dial(addr, &tls)).unwrap()
    })
}

// --- a migration through the stream ------------------------------------------------------

/// Two QEMUs set up the way the orchestration will: capabilities on both, the destination
/// listening on its socket, both strait ends running.
struct Migration {
    dir: PathBuf,
    source: Vm,
    destination: Vm,
    source_end: Option<StreamHandle>,
    destination_end: Option<StreamHandle>,
    source_socket: PathBuf,
}

fn prepare(
    dir: &Path,
    links: &(Arc<Link>, Arc<Link>),
    destination_start: Start,
    bandwidth_bytes_per_s: u64,
) -> Migration {
    let kernel = guest_kernel(dir);
    let source = Vm::start(dir, "src", &kernel, Start::Running);
    let destination = Vm::start(dir, "dst", &kernel, destination_start);
    source.wait_guest_ready();
    destination
        .vmm
        .set_migration_capabilities(&MigrationCapabilities {
            return_path: true,
            events: true,
            ..MigrationCapabilities::default()
        })
        .unwrap();
    source
        .vmm
        .set_migration_capabilities(&MigrationCapabilities {
            pause_before_switchover: true,
            return_path: true,
            events: true,
            ..MigrationCapabilities::default()
        })
        .unwrap();
    source
        .vmm
        .set_migration_parameters(&MigrationParameters {
            downtime_limit_ms: Some(DOWNTIME_LIMIT_MS),
            max_bandwidth_bytes_per_s: Some(bandwidth_bytes_per_s),
            ..MigrationParameters::default()
        })
        .unwrap();
    let incoming = dir.join("dst-in.sock");
    destination
        .vmm
        .start_incoming(&MigrationUri::Unix(incoming.clone()))
        .unwrap();
    let destination_end = DestinationEnd::new(&incoming, StreamConfig::default())
        .spawn(links.1.clone(), StreamMonitor::new())
        .unwrap();
    let source_socket = dir.join("src-out.sock");
    let source_end = SourceEnd::bind(&source_socket, 1, StreamConfig::default())
        .unwrap()
        .spawn(links.0.clone(), StreamMonitor::new())
        .unwrap();
    Migration {
        dir: dir.to_path_buf(),
        source,
        destination,
        source_end: Some(source_end),
        destination_end: Some(destination_end),
        source_socket,
    }
}

/// One `query-migrate` of the source while the migration is active.
struct Sample {
    info: MigrationInfo,
    at: Instant,
}

impl Migration {
    fn start(&self) {
        self.source
            .vmm
            .start_migration(&MigrationUri::Unix(self.source_socket.clone()))
            .unwrap();
    }

    /// Samples the source until it holds the migration at `pre-switchover`.
    fn run_to_pre_switchover(&self) -> Vec<Sample> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        let mut samples = Vec::new();
        loop {
            let info = self.source.vmm.migration_info().unwrap();
            match info.status {
                MigrationStatus::PreSwitchover => break,
                status if status.is_terminal() => panic!(
                    "the migration ended before pre-switchover: {info:?}\nsource QEMU: {}\n\
                     destination QEMU: {}",
                    self.source.log_text(),
                    self.destination.log_text()
                ),
                _ => {}
            }
            samples.push(Sample {
                info,
                at: Instant::now(),
            });
            assert!(Instant::now() < deadline, "no pre-switchover in time");
            thread::sleep(SAMPLE_INTERVAL);
        }
        samples
    }

    /// Lets the source finish, waits for both QEMUs, and joins both strait ends.
    fn complete(&mut self) -> (MigrationInfo, StreamReport, StreamReport) {
        self.source.vmm.continue_migration().unwrap();
        let info = self
            .source
            .vmm
            .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
            .unwrap();
        self.destination
            .vmm
            .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
            .unwrap();
        let source = join(self.source_end.take().unwrap(), "source");
        let destination = join(self.destination_end.take().unwrap(), "destination");
        (info, source.unwrap(), destination.unwrap())
    }
}

/// Joins a stream's thread, failing the test if it does not end in time.
fn join(handle: StreamHandle, side: &str) -> Result<StreamReport, StreamError> {
    let deadline = Instant::now() + FAILURE_END_TIMEOUT;
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the {side} end did not finish within {FAILURE_END_TIMEOUT:?}: {:?}",
            handle.monitor().progress()
        );
        thread::sleep(Duration::from_millis(20));
    }
    handle.join()
}

/// What both ends counted must match, both ways, and the return path must have carried
/// the destination's confirmation.
fn assert_counters_match(source: &StreamReport, destination: &StreamReport) {
    let (s, d) = (&source.progress, &destination.progress);
    eprintln!("source end: {source:?}\ndestination end: {destination:?}");
    assert_eq!(
        s.local_to_peer_bytes, d.peer_to_local_bytes,
        "migration stream"
    );
    assert_eq!(d.local_to_peer_bytes, s.peer_to_local_bytes, "return path");
    assert!(
        s.peer_to_local_bytes > 0,
        "nothing came back on the return path"
    );
    assert_eq!(source.verdict, Verdict::Loaded);
    assert_eq!(destination.verdict, Verdict::Loaded);
    assert!(source.return_path_messages >= 1);
    assert_eq!(
        source.return_path_messages,
        destination.return_path_messages
    );
}

fn migrate_over_loopback(destination_start: Start, expect: RunState) {
    if !common::require_qemu() {
        return;
    }
    let dir = common::test_dir("mstream");
    let links = loopback_links(dir.path());
    let mut m = prepare(dir.path(), &links, destination_start, UNCAPPED_BYTES_PER_S);
    let started = Instant::now();
    m.start();
    let samples = m.run_to_pre_switchover();
    assert_eq!(m.source.vmm.run_state().unwrap(), RunState::FinishMigrate);
    let (info, source, destination) = m.complete();
    eprintln!(
        "migrated in {:.2} s ({} samples); QEMU: {info:?}",
        started.elapsed().as_secs_f64(),
        samples.len()
    );
    assert_eq!(m.source.vmm.run_state().unwrap(), RunState::PostMigrate);
    m.destination
        .vmm
        .wait_run_state(&[expect], MIGRATION_TIMEOUT)
        .unwrap();
    let ram = info.ram.as_ref().unwrap();
    assert_eq!(ram.remaining_bytes, 0);
    assert!(
        ram.normal_pages >= u64::from((FILL_END - (4 << 20)) / 4096),
        "{ram:?}"
    );
    assert_counters_match(&source, &destination);
    // The stream is QEMU's RAM pages plus its own headers and the device state.
    assert!(source.progress.local_to_peer_bytes >= ram.transferred_bytes);
    // The guest runs on where it was (its counter page carries on from the source's).
    if expect == RunState::Running {
        let first = m.destination.read_word(0x40_0000).unwrap();
        thread::sleep(Duration::from_millis(200));
        let later = m.destination.read_word(0x40_0000).unwrap();
        assert_ne!(first, later, "the guest does not run on the destination");
    }
    let _ = &m.dir;
}

#[test]
fn qemu_migrates_through_the_memory_stream_over_a_loopback_link() {
    migrate_over_loopback(Start::Incoming, RunState::Running);
}

#[test]
fn qemu_destination_started_paused_stays_paused_after_the_stream() {
    migrate_over_loopback(Start::IncomingPaused, RunState::Paused);
}

/// Across the emulated WAN, QEMU's own view of its bandwidth (what its downtime decision
/// uses) must be the link's rate, not a local socket's: the relay's buffer is small.
#[test]
fn qemu_netns_sees_the_wan_rate_through_the_memory_stream() {
    if !common::require_qemu() {
        return;
    }
    let Some(wanem) = wanem() else {
        return;
    };
    let dir = common::test_dir("mstream");
    let links = links_across(&wanem, dir.path());
    let mut m = prepare(dir.path(), &links, Start::Incoming, UNCAPPED_BYTES_PER_S);
    let started = Instant::now();
    m.start();
    let samples = m.run_to_pre_switchover();
    let held_after = started.elapsed();
    let (info, source, destination) = m.complete();
    assert_counters_match(&source, &destination);
    m.destination
        .vmm
        .wait_run_state(&[RunState::Running], MIGRATION_TIMEOUT)
        .unwrap();

    let link_mbit = f64::from(WAN_RATE_MBIT);
    let rates: Vec<(f64, f64, u64)> = samples
        .iter()
        .filter_map(|s| {
            let ram = s.info.ram.as_ref()?;
            Some((
                s.at.duration_since(started).as_secs_f64(),
                ram.rate_mbit_per_s,
                ram.transferred_bytes,
            ))
        })
        .collect();
    for (t, mbps, transferred) in &rates {
        eprintln!("{t:6.2} s  QEMU mbps {mbps:7.1}  transferred {transferred:>10}");
    }
    // QEMU's average over the whole pre-copy, from its own counters.
    let first = rates.first().unwrap();
    let last = rates.last().unwrap();
    let average_mbit = (last.2 - first.2) as f64 * 8.0 / 1e6 / (last.0 - first.0);
    let peak_mbit = rates.iter().map(|r| r.1).fold(0.0, f64::max);
    let ram = info.ram.as_ref().unwrap();
    eprintln!(
        "held at pre-switchover after {:.2} s; QEMU average {average_mbit:.1} Mbit/s, peak \
         {peak_mbit:.1} Mbit/s (over 100 ms), final {:.1} Mbit/s; link {link_mbit} Mbit/s; \
         downtime {:?} ms; strait held QEMU back for {:.2} s; {}",
        held_after.as_secs_f64(),
        ram.rate_mbit_per_s,
        info.downtime_ms,
        source.progress.local_held_back.as_secs_f64(),
        wanem.stats()
    );
    assert!(
        average_mbit <= link_mbit * 1.05,
        "QEMU saw {average_mbit:.1} Mbit/s on average through a {link_mbit} Mbit/s link"
    );
    // How far QEMU ever got ahead of the link: the most it handed over in any interval
    // beyond what the link's rate carries in that interval. That is every buffer between
    // QEMU and the destination: TCP's flight and the emulated router's queue (one
    // bandwidth-delay product each, TCP's start-up fills both), then the local ones
    // (strait's unsent bound and two socket buffers). A large buffer in strait would show
    // here in full.
    let link_bytes_per_s = link_mbit * 1e6 / 8.0;
    let mut ahead_bytes: f64 = 0.0;
    for (i, a) in rates.iter().enumerate() {
        for b in &rates[i + 1..] {
            let carried = link_bytes_per_s * (b.0 - a.0);
            ahead_bytes = ahead_bytes.max((b.2 - a.2) as f64 - carried);
        }
    }
    let bdp_bytes = link_bytes_per_s * f64::from(WAN_RTT_MS) / 1e3;
    let ahead_max_bytes = 3.0 * bdp_bytes + LOCAL_BUFFERS_BYTES as f64;
    eprintln!(
        "QEMU was at most {:.2} MB ahead of the link (bound {:.2} MB; one BDP is {:.2} MB)",
        ahead_bytes / 1e6,
        ahead_max_bytes / 1e6,
        bdp_bytes / 1e6
    );
    assert!(
        ahead_bytes <= ahead_max_bytes,
        "QEMU got {ahead_bytes} bytes ahead of a {link_mbit} Mbit/s link"
    );
    assert!(
        average_mbit >= link_mbit * 0.5,
        "QEMU reached only {average_mbit:.1} Mbit/s of a {link_mbit} Mbit/s link"
    );
    assert!(source.progress.local_held_back > Duration::ZERO);
}

// --- failures ----------------------------------------------------------------------------

/// The destination engine is told a VMM socket where nothing listens: it ends with a clear
/// error, the source end hears why, and the source QEMU's migration fails with its guest
/// still running.
#[test]
fn qemu_destination_vmm_socket_missing_fails_both_ends() {
    if !common::require_qemu() {
        return;
    }
    let dir = common::test_dir("mstream");
    let links = loopback_links(dir.path());
    let kernel = guest_kernel(dir.path());
    let source = Vm::start(dir.path(), "src", &kernel, Start::Running);
    source.wait_guest_ready();
    let missing = dir.path().join("nobody-listens.sock");
    let destination_end = DestinationEnd::new(&missing, StreamConfig::default())
        .spawn(links.1.clone(), StreamMonitor::new())
        .unwrap();
    let socket = dir.path().join("src-out.sock");
    let source_end = SourceEnd::bind(&socket, 7, StreamConfig::default())
        .unwrap()
        .spawn(links.0.clone(), StreamMonitor::new())
        .unwrap();
    source
        .vmm
        .start_migration(&MigrationUri::Unix(socket))
        .unwrap();

    let destination = join(destination_end, "destination").unwrap_err();
    eprintln!("destination end: {destination}");
    assert!(
        matches!(&destination, StreamError::VmmSocketMissing { path, .. } if *path == missing),
        "{destination:?}"
    );
    let source_error = join(source_end, "source").unwrap_err();
    eprintln!("source end: {source_error}");
    let StreamError::PeerAborted { reason } = &source_error else {
        panic!("{source_error:?}");
    };
    assert!(reason.contains("nobody-listens.sock"), "{reason}");
    let info = source
        .vmm
        .wait_migration_status(&[MigrationStatus::Failed], MIGRATION_TIMEOUT);
    assert!(
        matches!(
            info,
            Err(strait_vmm::VmmError::MigrationEnded { .. }) | Ok(_)
        ),
        "{info:?}"
    );
    assert_eq!(
        source.vmm.migration_info().unwrap().status,
        MigrationStatus::Failed
    );
    assert_eq!(source.vmm.run_state().unwrap(), RunState::Running);
}

/// Which QEMU the test kills mid-stream.
#[derive(Debug, Clone, Copy)]
enum Kill {
    Source,
    Destination,
}

/// A QEMU dies while the stream runs: both strait ends end with an error (none reports a
/// success, none hangs), and the QEMU that lives on sees its migration fail.
fn kill_mid_stream(kill: Kill) {
    if !common::require_qemu() {
        return;
    }
    let dir = common::test_dir("mstream");
    let links = loopback_links(dir.path());
    let mut m = prepare(dir.path(), &links, Start::Incoming, SLOW_BYTES_PER_S);
    m.start();
    // Well into the stream: 1 s at 16 MiB/s of a 108 MiB guest.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = m.source.vmm.migration_info().unwrap();
        let sent = info.ram.as_ref().map_or(0, |r| r.transferred_bytes);
        if info.status == MigrationStatus::Active && sent >= 16 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "{info:?}");
        thread::sleep(SAMPLE_INTERVAL);
    }
    let killed_at = Instant::now();
    match kill {
        Kill::Source => m.source.kill(),
        Kill::Destination => m.destination.kill(),
    }
    let source = join(m.source_end.take().unwrap(), "source");
    let destination = join(m.destination_end.take().unwrap(), "destination");
    eprintln!(
        "{kill:?} killed; both ends done after {:.2} s\nsource end: {source:?}\n\
         destination end: {destination:?}",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(source.is_err(), "the source end reported success");
    assert!(destination.is_err(), "the destination end reported success");
    match kill {
        Kill::Source => {
            // The destination QEMU read a stream that stopped half-way: its load fails
            // and QEMU 7.2 exits.
            let exited = m.destination.child.wait().unwrap();
            assert!(!exited.success(), "{exited}");
        }
        Kill::Destination => {
            let info = m
                .source
                .vmm
                .wait_migration_status(&[MigrationStatus::Failed], MIGRATION_TIMEOUT);
            assert!(info.is_ok(), "{info:?}");
            assert_eq!(m.source.vmm.run_state().unwrap(), RunState::Running);
        }
    }
}

#[test]
fn qemu_source_killed_mid_stream_fails_both_ends() {
    kill_mid_stream(Kill::Source);
}

#[test]
fn qemu_destination_killed_mid_stream_fails_both_ends() {
    kill_mid_stream(Kill::Destination);
}

/// A peer engine that sends garbage on the Memory class: the source end fails with a clear
/// error, closes the VMM's socket and tells the peer why. (No QEMU: a plain socket plays
/// the VMM.)
#[test]
fn garbage_from_the_peer_fails_the_stream_and_closes_the_vmm_socket() {
    let dir = common::test_dir("mstream");
    let (source_link, peer) = loopback_links(dir.path());
    let socket = dir.path().join("src-out.sock");
    let monitor = StreamMonitor::new();
    let handle = SourceEnd::bind(&socket, 3, StreamConfig::default())
        .unwrap()
        // A clone: the last reference to a link closes it.
        .spawn(source_link.clone(), monitor.clone())
        .unwrap();
    let mut vmm = UnixStream::connect(&socket).unwrap();
    // The source end announces the stream.
    let start = peer
        .recv(StreamClass::Memory, Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(start, [1, 3, 0, 0, 0, 1]);
    peer.send(StreamClass::Memory, vec![0xEE; 100], Duration::from_secs(1))
        .unwrap();
    let error = join(handle, "source").unwrap_err();
    eprintln!("source end: {}", strait_net::error_chain(&error));
    assert!(matches!(error, StreamError::Malformed(_)), "{error:?}");
    // The VMM's socket is closed: it reads the end (or a reset), never hangs.
    vmm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut vmm, &mut buf);
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The peer heard why.
    let abort = peer
        .recv(StreamClass::Memory, Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(abort[..5], [4, 3, 0, 0, 0]);
    let reason = String::from_utf8_lossy(&abort[5..]);
    assert!(
        reason.contains("unknown memory-stream message type 238"),
        "{reason}"
    );
    assert_eq!(
        monitor.phase(),
        strait_engine::migration::stream::StreamPhase::Failed
    );
}

/// An abort from the orchestration ends a stream that is waiting and one that runs, at
/// once, and the peer hears the reason.
#[test]
fn abort_ends_a_running_stream_on_both_sides() {
    let dir = common::test_dir("mstream");
    let (source_link, destination_link) = loopback_links(dir.path());
    // The destination "VMM": a listener that accepts and keeps the connection open.
    let incoming = dir.path().join("dst-in.sock");
    let listener = std::os::unix::net::UnixListener::bind(&incoming).unwrap();
    let destination_end = DestinationEnd::new(&incoming, StreamConfig::default())
        // Clones: the last reference to a link closes it, possibly before the abort left.
        .spawn(destination_link.clone(), StreamMonitor::new())
        .unwrap();
    let socket = dir.path().join("src-out.sock");
    let source_end = SourceEnd::bind(&socket, 9, StreamConfig::default())
        .unwrap()
        .spawn(source_link.clone(), StreamMonitor::new())
        .unwrap();
    let mut vmm = UnixStream::connect(&socket).unwrap();
    let (mut dst_vmm, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut vmm, b"QEVM").unwrap();
    dst_vmm
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut dst_vmm, &mut magic).unwrap();
    assert_eq!(&magic, b"QEVM");
    let aborted_at = Instant::now();
    source_end.monitor().abort("cancelled by the operator");
    let source = join(source_end, "source").unwrap_err();
    let destination = join(destination_end, "destination").unwrap_err();
    eprintln!(
        "after {:?}: source {source}; destination {destination}",
        aborted_at.elapsed()
    );
    assert!(
        matches!(&source, StreamError::Aborted { reason } if reason == "cancelled by the operator")
    );
    assert!(
        matches!(&destination, StreamError::PeerAborted { reason } if reason.contains("cancelled by the operator")),
        "{destination:?}"
    );
    assert!(aborted_at.elapsed() < Duration::from_secs(5));
}

/// The waits before a stream begins are bounded too: a source end that no VMM connects to
/// times out and removes its socket file; a destination end that never hears `Start` ends
/// at its abort.
#[test]
fn waits_before_the_stream_begins_end() {
    let dir = common::test_dir("mstream");
    let (source_link, destination_link) = loopback_links(dir.path());
    let socket = dir.path().join("src-out.sock");
    let config = StreamConfig {
        accept_timeout: Duration::from_millis(300),
        ..StreamConfig::default()
    };
    let started = Instant::now();
    let error = SourceEnd::bind(&socket, 1, config)
        .unwrap()
        .run(&source_link, &StreamMonitor::new())
        .unwrap_err();
    assert!(
        matches!(error, StreamError::AcceptTimeout { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!socket.exists(), "the socket file was left behind");

    let destination = DestinationEnd::new(&dir.path().join("dst-in.sock"), StreamConfig::default())
        .spawn(destination_link.clone(), StreamMonitor::new())
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(!destination.is_finished());
    destination.monitor().abort("no migration after all");
    let error = join(destination, "destination").unwrap_err();
    assert!(
        matches!(&error, StreamError::Aborted { reason } if reason == "no migration after all"),
        "{error:?}"
    );
}
