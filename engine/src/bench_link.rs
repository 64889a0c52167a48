//! `strait bench link`: goodput of the session over an emulated WAN, and of the peer to
//! beat, one plain kernel TCP connection over the same path.
//!
//! Both modes run inside one `Wanem` (namespaces A and B joined by the emulated path),
//! push from A to B for a warm-up that is not counted and then for the measured window,
//! and verify every byte on arrival: each class is a byte stream whose content is a
//! function of its offset ([`crate::pattern`]), so a lost, duplicated or reordered byte
//! shows as a mismatch. The last line of stdout is one JSON object.
//!
//! Both modes see the same TCP buffer limits: `Wanem` sets `tcp_rmem`/`tcp_wmem` maxima to
//! 64 MiB in both namespaces (they are per namespace; `net.core.rmem_max` is not
//! writable there), and the JSON reports the values read back inside namespace A.

#![allow(clippy::print_stdout)] // This command's output is its result.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strait_net::protocol::Role;
use strait_net::session::tcp::{Link, LinkError};
use strait_net::session::SessionConfig;
use strait_net::tls::{write_certs, TlsError, TlsIdentity};
use strait_net::wanem::{DirectionStats, Wanem, WanemConfig, WanemError};
use strait_net::StreamClass;

use crate::cli::{LinkBenchArgs, LinkBenchMode};
use crate::pattern::{check, payload};

/// Shortest warm-up: slow start and the session's windows need a few seconds to open
/// even on a short path.
const WARMUP_MIN: Duration = Duration::from_secs(2);

/// Warm-up in RTTs: BBR's startup and drain take a handful of round trips, ten leave
/// margin for the probe cycle to settle.
const WARMUP_RTTS: u32 = 10;

/// How long a blocked send or receive waits before looking at the stop flag again:
/// short against the measured window, so the end is prompt.
const POLL: Duration = Duration::from_millis(100);

/// Mirror's steady stream: one 4 KiB write every 10 ms (3.3 Mbit/s), like a guest's
/// trickle of small writes beside the bulk copy.
const MIRROR_PAYLOAD_BYTES: usize = 4 << 10;
const MIRROR_INTERVAL: Duration = Duration::from_millis(10);

/// Control's steady stream: a 256-byte message every 100 ms, like checkpoints.
const CONTROL_PAYLOAD_BYTES: usize = 256;
const CONTROL_INTERVAL: Duration = Duration::from_millis(100);

/// Bytes a single-TCP receiver reads at once.
const TCP_READ_BYTES: usize = 256 << 10;

/// The classes the bench sends on, in JSON order.
const CLASSES: [StreamClass; 3] = [StreamClass::Control, StreamClass::Mirror, StreamClass::Bulk];

/// What `strait bench link` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("WAN emulator failed")]
    Wanem(#[from] WanemError),
    #[error("certificate setup failed")]
    Tls(#[from] TlsError),
    #[error("link failed")]
    Link(#[from] LinkError),
    #[error("{op} failed")]
    Io { op: &'static str, source: io::Error },
    #[error("{class} stream corrupt: a payload at offset {offset} does not match the pattern")]
    Corrupt { class: &'static str, offset: u64 },
    #[error("{class} receiver saw mark_applied refused: {reason}")]
    Applied { class: &'static str, reason: String },
    #[error("a bench thread panicked")]
    Panicked,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> BenchError {
    move |source| BenchError::Io { op, source }
}

/// Verified bytes per class, written by the receivers, sampled by the clock.
#[derive(Default)]
struct Counters {
    verified_bytes: [AtomicU64; 3],
}

impl Counters {
    fn snapshot(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.verified_bytes[i].load(Ordering::Relaxed))
    }
}

/// What one run measured, before it becomes JSON.
struct Measured {
    window: Duration,
    bytes: [u64; 3],
    srtt_ms: Option<f64>,
    retransmitted_bytes: u64,
    tcp_retrans_segs: u64,
    process_cpu_s: f64,
    wanem_start: [DirectionStats; 2],
    wanem_end: [DirectionStats; 2],
    tcp_buffers: Value,
}

/// `strait bench link ...`.
pub fn run(args: LinkBenchArgs) -> Result<(), BenchError> {
    crate::init_logging();
    let wanem = Wanem::start(WanemConfig {
        rtt_ms: args.rtt_ms,
        rate_mbit: args.rate_mbit,
        loss_pct: args.loss_pct,
        jitter_ms: 0,
        cut_at_s: None,
        cut_for_s: 0.0,
        seed: args.seed,
    })?;
    let warmup = WARMUP_MIN.max(Duration::from_millis(u64::from(args.rtt_ms)) * WARMUP_RTTS);
    let window = Duration::from_secs_f64(args.seconds);
    let measured = match args.mode {
        LinkBenchMode::Session => run_session(&wanem, &args, warmup, window)?,
        LinkBenchMode::SingleTcp => run_single_tcp(&wanem, &args, warmup, window)?,
    };
    let report = report(&args, &measured);
    if !args.json {
        print_summary(&report);
    }
    println!("{report}");
    Ok(())
}

/// A temporary certificate directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_session(
    wanem: &Wanem,
    args: &LinkBenchArgs,
    warmup: Duration,
    window: Duration,
) -> Result<Measured, BenchError> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "strait-bench-link-{}-{}",
        std::process::id(),
        wanem.addr_b()
    )));
    write_certs(&dir.0, &[wanem.addr_b().to_string()])?;
    let identity = TlsIdentity::load(&dir.0)?;
    let tls = (!args.insecure).then_some(&identity);
    let listener = wanem
        .run_in_b(|| TcpListener::bind((wanem.addr_b(), 0)))?
        .map_err(io_err("bind listener in namespace B"))?;
    let addr = listener.local_addr().map_err(io_err("listener address"))?;
    let config = |role| {
        let mut config = SessionConfig::new(role);
        config.recv_window_bytes = args.recv_window_mib << 20;
        config.send_buffer_bytes = config.recv_window_bytes + config.recv_window_bytes / 4;
        config.conn_inflight_bytes_max = args.conn_inflight_mib << 20;
        config
    };
    let (acceptor, dialer) = thread::scope(|s| {
        let acceptor = s.spawn(|| Link::accept(listener, tls, config(Role::Destination)));
        let dialer =
            wanem.run_in_a(|| Link::connect(addr, args.connections, tls, config(Role::Source)));
        (acceptor.join(), dialer)
    });
    let acceptor = acceptor.map_err(|_| BenchError::Panicked)??;
    let dialer = dialer??;
    let result = drive_session(wanem, &dialer, &acceptor, args, warmup, window);
    dialer.close();
    acceptor.close();
    result
}

fn drive_session(
    wanem: &Wanem,
    dialer: &Link,
    acceptor: &Link,
    args: &LinkBenchArgs,
    warmup: Duration,
    window: Duration,
) -> Result<Measured, BenchError> {
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let payload_bytes = args.payload_kib << 10;
    thread::scope(|s| {
        let receivers: Vec<_> = (0..CLASSES.len())
            .map(|i| {
                let (counters, stop) = (&counters, &stop);
                s.spawn(move || receive_class(acceptor, i, counters, stop))
            })
            .collect();
        let bulk = s.spawn(|| send_bulk(dialer, payload_bytes, &stop));
        let trickle = s.spawn(|| send_trickle(dialer, &stop));
        if args.trace {
            let stop = &stop;
            s.spawn(move || trace_bulk(dialer, acceptor, stop));
        }
        let sample = |counters: &Counters| {
            let stats = dialer.stats();
            let retx: u64 = stats.send.iter().map(|c| c.retransmitted_bytes).sum();
            (counters.snapshot(), retx)
        };
        let measured = measure(
            wanem,
            &counters,
            warmup,
            window,
            sample,
            dialer_srtt(dialer),
        );
        stop.store(true, Ordering::Relaxed);
        let mut first_error = None;
        for handle in receivers.into_iter().chain([bulk, trickle]) {
            let outcome = handle
                .join()
                .map_err(|_| BenchError::Panicked)
                .and_then(|r| r);
            if let (Err(e), None) = (outcome, &first_error) {
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => measured,
        }
    })
}

/// How often `--trace` prints.
const TRACE_INTERVAL: Duration = Duration::from_millis(100);

/// `--trace`: one stderr line per [`TRACE_INTERVAL`] with the Bulk class's state, in MiB.
fn trace_bulk(dialer: &Link, acceptor: &Link, stop: &AtomicBool) {
    let bulk = StreamClass::ALL
        .iter()
        .position(|c| *c == StreamClass::Bulk)
        .unwrap_or(3);
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (send, recv) = (dialer.stats().send[bulk], acceptor.stats().recv[bulk]);
        eprintln!(
            "trace t={:.2}s backlog={} credit_left={} unacked={} received={} applied={} \
             reorder_frames={}",
            started.elapsed().as_secs_f64(),
            send.backlog_bytes >> 20,
            send.credit_available_bytes >> 20,
            (send.sent_bytes - send.acked_bytes) >> 20,
            recv.received_bytes >> 20,
            recv.applied_bytes >> 20,
            recv.reorder_frames,
        );
        thread::sleep(TRACE_INTERVAL);
    }
}

fn dialer_srtt(dialer: &Link) -> impl Fn() -> Option<f64> + '_ {
    move || dialer.stats().srtt_ns.map(|ns| ns as f64 / 1e6)
}

/// Waits out the warm-up, samples, waits the window, samples again.
fn measure(
    wanem: &Wanem,
    counters: &Counters,
    warmup: Duration,
    window: Duration,
    sample: impl Fn(&Counters) -> ([u64; 3], u64),
    srtt_ms: impl Fn() -> Option<f64>,
) -> Result<Measured, BenchError> {
    thread::sleep(warmup);
    let tcp_buffers = wanem.run_in_a(read_tcp_buffers)?;
    let segs_start = wanem.run_in_a(read_retrans_segs)?;
    let cpu_start = process_cpu_s();
    let wanem_start = wanem.stats();
    let (bytes_start, retx_start) = sample(counters);
    let started = Instant::now();
    thread::sleep(window);
    let (bytes_end, retx_end) = sample(counters);
    let elapsed = started.elapsed();
    let wanem_end = wanem.stats();
    let cpu_end = process_cpu_s();
    let segs_end = wanem.run_in_a(read_retrans_segs)?;
    Ok(Measured {
        window: elapsed,
        bytes: [0, 1, 2].map(|i| bytes_end[i] - bytes_start[i]),
        srtt_ms: srtt_ms(),
        retransmitted_bytes: retx_end - retx_start,
        tcp_retrans_segs: segs_end.saturating_sub(segs_start),
        process_cpu_s: cpu_end - cpu_start,
        wanem_start: [wanem_start.a_to_b, wanem_start.b_to_a],
        wanem_end: [wanem_end.a_to_b, wanem_end.b_to_a],
        tcp_buffers,
    })
}

/// Receives class `CLASSES[i]` until stopped, verifying and applying each payload.
fn receive_class(
    link: &Link,
    i: usize,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(), BenchError> {
    let class = CLASSES[i];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(payload) = link.recv(class, POLL)? else {
            continue;
        };
        if !check(&payload, offset) {
            return Err(BenchError::Corrupt {
                class: class.name(),
                offset,
            });
        }
        let len = payload.len() as u64;
        offset += len;
        link.mark_applied(class, len)
            .map_err(|e| BenchError::Applied {
                class: class.name(),
                reason: format!("{e:?}"),
            })?;
        counters.verified_bytes[i].fetch_add(len, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends one class's next payload; a full buffer (send timeout) is not an error here.
fn send_next(
    link: &Link,
    class: StreamClass,
    len: usize,
    offset: &mut u64,
) -> Result<(), BenchError> {
    match link.send(class, payload(len, *offset), POLL) {
        Ok(_) => {
            *offset += len as u64;
            Ok(())
        }
        Err(LinkError::SendTimeout { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn send_bulk(link: &Link, payload_bytes: usize, stop: &AtomicBool) -> Result<(), BenchError> {
    let mut offset = 0;
    while !stop.load(Ordering::Relaxed) {
        send_next(link, StreamClass::Bulk, payload_bytes, &mut offset)?;
    }
    Ok(())
}

/// Mirror and Control at their steady rates.
fn send_trickle(link: &Link, stop: &AtomicBool) -> Result<(), BenchError> {
    let (mut mirror_offset, mut control_offset) = (0, 0);
    let started = Instant::now();
    let mut next_control = Duration::ZERO;
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) {
        send_next(
            link,
            StreamClass::Mirror,
            MIRROR_PAYLOAD_BYTES,
            &mut mirror_offset,
        )?;
        if started.elapsed() >= next_control {
            send_next(
                link,
                StreamClass::Control,
                CONTROL_PAYLOAD_BYTES,
                &mut control_offset,
            )?;
            next_control += CONTROL_INTERVAL;
        }
        tick += 1;
        let due = MIRROR_INTERVAL * tick;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    Ok(())
}

fn run_single_tcp(
    wanem: &Wanem,
    args: &LinkBenchArgs,
    warmup: Duration,
    window: Duration,
) -> Result<Measured, BenchError> {
    let listener = wanem
        .run_in_b(|| TcpListener::bind((wanem.addr_b(), 0)))?
        .map_err(io_err("bind listener in namespace B"))?;
    let addr = listener.local_addr().map_err(io_err("listener address"))?;
    let stream = wanem
        .run_in_a(|| TcpStream::connect(addr))?
        .map_err(io_err("connect from namespace A"))?;
    let (peer, _) = listener.accept().map_err(io_err("accept in namespace B"))?;
    peer.set_read_timeout(Some(POLL))
        .map_err(io_err("set read timeout"))?;
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let payload_bytes = args.payload_kib << 10;
    thread::scope(|s| {
        let receiver = s.spawn(|| receive_tcp(peer, &counters, &stop));
        let sender = s.spawn(|| send_tcp(&stream, payload_bytes, &stop));
        let sample = |counters: &Counters| (counters.snapshot(), 0);
        let srtt = || tcp_srtt_ms(&stream);
        let measured = measure(wanem, &counters, warmup, window, sample, srtt);
        stop.store(true, Ordering::Relaxed);
        // The sender may sit in a blocking write against a full window; a shutdown
        // wakes it.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let sent = sender.join().map_err(|_| BenchError::Panicked)?;
        let received = receiver.join().map_err(|_| BenchError::Panicked)?;
        received?;
        sent?;
        measured
    })
}

fn send_tcp(
    mut stream: &TcpStream,
    payload_bytes: usize,
    stop: &AtomicBool,
) -> Result<(), BenchError> {
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let buf = payload(payload_bytes, offset);
        match stream.write_all(&buf) {
            Ok(()) => offset += buf.len() as u64,
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => {
                return Err(BenchError::Io {
                    op: "TCP write",
                    source: e,
                })
            }
        }
    }
    Ok(())
}

fn receive_tcp(
    mut peer: TcpStream,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(), BenchError> {
    let mut buf = vec![0; TCP_READ_BYTES];
    let mut offset = 0u64;
    let bulk = CLASSES.len() - 1;
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                if !check(&buf[..n], offset) {
                    return Err(BenchError::Corrupt {
                        class: "bulk",
                        offset,
                    });
                }
                offset += n as u64;
                counters.verified_bytes[bulk].fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => {
                return Err(BenchError::Io {
                    op: "TCP read",
                    source: e,
                })
            }
        }
    }
}

/// The kernel's smoothed RTT of `stream`, from `TCP_INFO`.
fn tcp_srtt_ms(stream: &TcpStream) -> Option<f64> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow of `stream`; `info` and `len` are valid for
    // writes of `len` bytes, and the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| f64::from(info.tcpi_rtt) / 1e3)
}

/// User plus system CPU seconds of this process (both link ends and the forwarder).
fn process_cpu_s() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid for writes; RUSAGE_SELF needs nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `RetransSegs` of the calling thread's namespace. `/proc/thread-self`, not
/// `/proc/self`: the latter shows the main thread's namespace.
fn read_retrans_segs() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/snmp") else {
        return 0;
    };
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `tcp_rmem` and `tcp_wmem` as the calling thread's namespace sees them.
fn read_tcp_buffers() -> Value {
    let read = |key: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{key}"))
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    json!({ "tcp_rmem": read("tcp_rmem"), "tcp_wmem": read("tcp_wmem") })
}

fn mbit(bytes: u64, window: Duration) -> f64 {
    bytes as f64 * 8.0 / window.as_secs_f64() / 1e6
}

fn drops(start: &DirectionStats, end: &DirectionStats) -> Value {
    json!({
        "dropped_loss": end.dropped_loss - start.dropped_loss,
        "dropped_queue": end.dropped_queue - start.dropped_queue,
        "dropped_overload": end.dropped_overload - start.dropped_overload,
        "dropped_tun_queue": end.dropped_tun_queue.saturating_sub(start.dropped_tun_queue),
        "bytes_forwarded": end.bytes_forwarded - start.bytes_forwarded,
        "reader_cpu_ms": end.reader_cpu_ms.zip(start.reader_cpu_ms).map(|(e, s)| e - s),
        "release_cpu_ms": end.release_cpu_ms.zip(start.release_cpu_ms).map(|(e, s)| e - s),
    })
}

fn report(args: &LinkBenchArgs, m: &Measured) -> Value {
    let session = args.mode == LinkBenchMode::Session;
    let total: u64 = m.bytes.iter().sum();
    let goodput = mbit(total, m.window);
    let class =
        |i: usize| json!({ "bytes": m.bytes[i], "goodput_mbit": mbit(m.bytes[i], m.window) });
    json!({
        "mode": if session { "session" } else { "single-tcp" },
        "goodput_mbit": goodput,
        "link_rate_mbit": args.rate_mbit,
        "utilization": if args.rate_mbit == 0 { 0.0 } else { goodput / f64::from(args.rate_mbit) },
        "rtt_ms": args.rtt_ms,
        "srtt_ms": m.srtt_ms,
        "retransmitted_bytes": m.retransmitted_bytes,
        "tcp_retrans_segs": m.tcp_retrans_segs,
        "connections": if session { args.connections } else { 1 },
        "tls": session && !args.insecure,
        "loss_pct": args.loss_pct,
        "seconds": m.window.as_secs_f64(),
        "process_cpu_s": m.process_cpu_s,
        "recv_window_mib": if session { Some(args.recv_window_mib) } else { None },
        "conn_inflight_mib": if session { Some(args.conn_inflight_mib) } else { None },
        "tcp_buffers_ns_a": m.tcp_buffers,
        "classes": { "control": class(0), "mirror": class(1), "bulk": class(2) },
        "wanem": {
            "a_to_b": drops(&m.wanem_start[0], &m.wanem_end[0]),
            "b_to_a": drops(&m.wanem_start[1], &m.wanem_end[1]),
        },
    })
}

fn print_summary(r: &Value) {
    println!(
        "{} tls={} connections={} rtt={} ms loss={}%: goodput {:.1} Mbit/s of {} \
         (utilization {:.3}), srtt {} ms, retransmitted {} B, {} TCP segments retransmitted",
        r["mode"],
        r["tls"],
        r["connections"],
        r["rtt_ms"],
        r["loss_pct"],
        r["goodput_mbit"].as_f64().unwrap_or(0.0),
        r["link_rate_mbit"],
        r["utilization"].as_f64().unwrap_or(0.0),
        r["srtt_ms"],
        r["retransmitted_bytes"],
        r["tcp_retrans_segs"],
    );
}
