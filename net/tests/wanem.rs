//! The WAN emulator end to end: real namespaces, TUN devices and kernel TCP/UDP.
//!
//! Every test here needs root and network namespaces (hence `netns` in each name). Where
//! `ip netns` is unusable they skip with a loud message, except under CI (env `CI` set),
//! where they fail. They take a process-wide lock so that their timing measurements do not
//! compete for the machine's two cores.
//!
//! `netns_capacity_report` is ignored by default: it measures what the forwarder can
//! sustain and prints it (`cargo test -p strait-net --test wanem -- --ignored --nocapture`;
//! `WANEM_CAPACITY_SECONDS` and `WANEM_CAPACITY_CASES` adjust it).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use strait_net::wanem::{run_cli, Wanem, WanemConfig, WanemError, WanemStats};

mod common;
use common::{netns_usable, serial, start};

/// Bounds every blocking socket call, so a broken forwarder fails a test instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Read and write chunk of the bulk transfers: large enough that syscalls cost nothing.
const BULK_CHUNK_BYTES: usize = 256 * 1024;

fn config(rtt_ms: u32, rate_mbit: u32) -> WanemConfig {
    WanemConfig {
        rtt_ms,
        rate_mbit,
        seed: 1,
        ..WanemConfig::default()
    }
}

fn listen_in_b(wanem: &Wanem) -> (TcpListener, u16) {
    let listener = wanem
        .run_in_b(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn connect_from_a(wanem: &Wanem, port: u16) -> TcpStream {
    let addr_b = wanem.addr_b();
    let stream = wanem
        .run_in_a(move || TcpStream::connect((addr_b, port)))
        .unwrap()
        .unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Round trips of one byte over TCP from A to an echo server in B.
fn echo_rtts(wanem: &Wanem, count: usize) -> Vec<Duration> {
    let (listener, port) = listen_in_b(wanem);
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut byte = [0u8; 1];
        while let Ok(1) = stream.read(&mut byte) {
            stream.write_all(&byte).unwrap();
        }
    });
    let mut client = connect_from_a(wanem, port);
    client.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    for i in 0..count {
        let mut byte = [i as u8];
        let sent = Instant::now();
        client.write_all(&byte).unwrap();
        client.read_exact(&mut byte).unwrap();
        rtts.push(sent.elapsed());
        assert_eq!(byte[0], i as u8);
    }
    drop(client);
    server.join().unwrap();
    rtts
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

#[test]
fn netns_rtt_is_emulated() {
    let _serial = serial();
    let Some(wanem) = start(config(100, 0)) else {
        return;
    };
    let rtts = echo_rtts(&wanem, 7);
    eprintln!("rtt 100 ms: measured {rtts:?}");
    for rtt in &rtts {
        assert!(
            *rtt >= Duration::from_millis(100),
            "an echo came back faster than the RTT: {rtts:?}"
        );
    }
    assert!(median(&rtts) <= Duration::from_millis(130), "{rtts:?}");
    let stats = wanem.stats();
    eprintln!("{stats}");
    drop(wanem);

    let wanem = start(config(0, 0)).unwrap();
    let rtts = echo_rtts(&wanem, 7);
    eprintln!("rtt 0 ms: measured {rtts:?}");
    assert!(median(&rtts) < Duration::from_millis(10), "{rtts:?}");
}

/// The result of a bulk transfer from A to B.
struct Bulk {
    goodput_mbit: f64,
    stats_before: WanemStats,
    stats_after: WanemStats,
    measured: Duration,
}

/// Sends from A to B over `streams` TCP connections for `warmup + measure`; goodput is the
/// payload received in B during `measure`.
fn bulk(wanem: &Wanem, streams: usize, warmup: Duration, measure: Duration) -> Bulk {
    let (listener, port) = listen_in_b(wanem);
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let received = received.clone();
        thread::spawn(move || {
            let mut readers = Vec::new();
            for _ in 0..streams {
                let (mut stream, _) = listener.accept().unwrap();
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let received = received.clone();
                readers.push(thread::spawn(move || {
                    let mut buf = vec![0u8; BULK_CHUNK_BYTES];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                received.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(err) => panic!("receive failed: {err}"),
                        }
                    }
                }));
            }
            for reader in readers {
                reader.join().unwrap();
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..streams)
        .map(|_| {
            let mut stream = connect_from_a(wanem, port);
            let stop = stop.clone();
            thread::spawn(move || {
                let chunk = vec![0x5au8; BULK_CHUNK_BYTES];
                while !stop.load(Ordering::Relaxed) {
                    stream.write_all(&chunk).unwrap();
                }
                stream.shutdown(Shutdown::Write).unwrap();
            })
        })
        .collect();
    thread::sleep(warmup);
    let stats_before = wanem.stats();
    let (start, bytes_start) = (Instant::now(), received.load(Ordering::Relaxed));
    thread::sleep(measure);
    let (end, bytes_end) = (Instant::now(), received.load(Ordering::Relaxed));
    let stats_after = wanem.stats();
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().unwrap();
    }
    receiver.join().unwrap();
    let measured = end - start;
    Bulk {
        goodput_mbit: (bytes_end - bytes_start) as f64 * 8.0 / measured.as_secs_f64() / 1e6,
        stats_before,
        stats_after,
        measured,
    }
}

#[test]
fn netns_rate_limit_holds() {
    let _serial = serial();
    let Some(wanem) = start(config(20, 100)) else {
        return;
    };
    let result = bulk(
        &wanem,
        1,
        Duration::from_millis(500),
        Duration::from_secs(3),
    );
    eprintln!(
        "rate 100 Mbit/s, rtt 20 ms: goodput {:.1} Mbit/s\n{}",
        result.goodput_mbit, result.stats_after
    );
    assert!(
        (80.0..=100.0).contains(&result.goodput_mbit),
        "goodput {:.1} Mbit/s",
        result.goodput_mbit
    );
}

/// Sends `count` numbered UDP datagrams from A to B, paced so that neither the TUN queue
/// nor the receiver's socket overflows, and returns the numbers received, in order.
fn udp_flood(wanem: &Wanem, count: u32, pause_every: u32, pause: Duration) -> Vec<(u32, u64)> {
    let receiver_socket = wanem
        .run_in_b(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap();
    let port = receiver_socket.local_addr().unwrap().port();
    // Room for about 100 ms of the flood, so a receiver thread that waits for a CPU does not
    // lose datagrams (the namespace's rmem_max is the host's 4 MiB).
    let rcvbuf_bytes: libc::c_int = 4 << 20;
    // SAFETY: the option value points at a c_int that lives for the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&receiver_socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf_bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    // After the last datagram, this much silence means the flood is over (the longest path
    // in these tests delays by 30 ms).
    receiver_socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let base = Instant::now();
    let receiver = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = receiver_socket.recv(&mut buf) {
            assert_eq!(n, 100);
            let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
            let sent_ns = u64::from_le_bytes(buf[4..12].try_into().unwrap());
            let delay_ns = base.elapsed().as_nanos() as u64 - sent_ns;
            got.push((seq, delay_ns));
        }
        got
    });
    let sender = wanem
        .run_in_a(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap();
    let to = (wanem.addr_b(), port);
    for seq in 0..count {
        let mut datagram = [0u8; 100];
        datagram[..4].copy_from_slice(&seq.to_le_bytes());
        let sent_ns = base.elapsed().as_nanos() as u64;
        datagram[4..12].copy_from_slice(&sent_ns.to_le_bytes());
        sender.send_to(&datagram, to).unwrap();
        if seq % pause_every == pause_every - 1 {
            thread::sleep(pause);
        }
    }
    receiver.join().unwrap()
}

#[test]
fn netns_random_loss_is_seeded() {
    let _serial = serial();
    const SENT: u32 = 20_000;
    // A run in which the machine was too busy for an exact count (the forwarder or the
    // receiver fell behind and lost packets outside the emulated path) is repeated.
    const ATTEMPTS: u32 = 3;
    let lossy = WanemConfig {
        loss_pct: 5.0,
        seed: 42,
        ..config(0, 0)
    };
    let mut drops = Vec::new();
    for run in 0..2 {
        for attempt in 1..=ATTEMPTS {
            let Some(wanem) = start(lossy.clone()) else {
                return;
            };
            let got = udp_flood(&wanem, SENT, 20, Duration::from_millis(1));
            let stats = wanem.stats().a_to_b;
            let rcvbuf_errors = wanem
                .run_in_b(|| snmp_counter("Udp", "RcvbufErrors"))
                .unwrap();
            eprintln!(
                "loss run {run} attempt {attempt}: received {} of {SENT}, \
                 {rcvbuf_errors} receive buffer overflows, {stats:?}",
                got.len()
            );
            let outside_path = stats.dropped_tun_queue + stats.dropped_overload + rcvbuf_errors;
            if outside_path > 0 && attempt < ATTEMPTS {
                eprintln!("machine too busy for an exact count; again");
                continue;
            }
            assert_eq!(outside_path, 0, "too busy in {ATTEMPTS} attempts");
            assert_eq!(
                stats.packets_forwarded + stats.dropped_loss,
                u64::from(SENT)
            );
            assert_eq!(stats.dropped_queue + stats.dropped_cut, 0);
            assert_eq!(got.len() as u64, stats.packets_forwarded);
            let loss = stats.dropped_loss as f64 / f64::from(SENT);
            assert!((0.04..=0.06).contains(&loss), "loss {loss}");
            drops.push(stats.dropped_loss);
            break;
        }
    }
    assert_eq!(
        drops[0], drops[1],
        "same seed, same traffic, different losses"
    );
}

#[test]
fn netns_jitter_keeps_order() {
    let _serial = serial();
    let Some(wanem) = start(WanemConfig {
        jitter_ms: 20,
        ..config(20, 0)
    }) else {
        return;
    };
    let got = udp_flood(&wanem, 600, 1, Duration::from_millis(5));
    let seqs: Vec<u32> = got.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(seqs, (0..600).collect::<Vec<_>>(), "lost or reordered");
    let delays_ms: Vec<f64> = got.iter().map(|&(_, ns)| ns as f64 / 1e6).collect();
    let min = delays_ms.iter().cloned().fold(f64::MAX, f64::min);
    let max = delays_ms.iter().cloned().fold(0.0, f64::max);
    eprintln!("one-way delay with 20 ms jitter: {min:.2}..{max:.2} ms");
    assert!(min >= 10.0, "faster than the propagation delay: {min} ms");
    // Delay plus jitter is 30 ms; the rest is the scheduling of the release and receiver
    // threads, which a busy machine stretches (the exact bound is a unit test of `path`).
    assert!(max <= 100.0, "far more than delay + jitter: {max} ms");
    assert!(max - min >= 10.0, "jitter not applied: {min}..{max} ms");
}

/// A deterministic byte stream (xorshift), so the receiver can tell corruption apart.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// What a checked TCP stream from A to B sent and received.
struct Checked {
    sent_bytes: u64,
    sent_crc: u32,
    received_bytes: u64,
    received_crc: u32,
    /// Time since `t0` of each read, with the bytes received so far.
    arrivals: Vec<(Duration, u64)>,
}

/// Streams a deterministic pattern from A to B until `until` after `t0`, with a CRC32C of
/// everything sent and everything received.
fn checked_stream(wanem: &Wanem, t0: Instant, until: Duration) -> Checked {
    let (listener, port) = listen_in_b(wanem);
    let receiver = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut crc, mut total, mut arrivals) = (0u32, 0u64, Vec::new());
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            total += n as u64;
            arrivals.push((t0.elapsed(), total));
        }
        (crc, total, arrivals)
    });
    let mut stream = connect_from_a(wanem, port);
    let mut pattern = Pattern(0x1234_5678_9abc_def1);
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut sent_crc, mut sent_bytes) = (0u32, 0u64);
    while t0.elapsed() < until {
        pattern.fill(&mut chunk);
        stream.write_all(&chunk).unwrap();
        sent_crc = crc32c::crc32c_append(sent_crc, &chunk);
        sent_bytes += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let (received_crc, received_bytes, arrivals) = receiver.join().unwrap();
    Checked {
        sent_bytes,
        sent_crc,
        received_bytes,
        received_crc,
        arrivals,
    }
}

#[test]
fn netns_link_cut_stalls_and_resumes() {
    let _serial = serial();
    let Some(wanem) = start(WanemConfig {
        cut_at_s: Some(1.0),
        cut_for_s: 2.0,
        ..config(40, 50)
    }) else {
        return;
    };
    let t0 = Instant::now();
    let checked = checked_stream(&wanem, t0, Duration::from_secs(6));
    let stats = wanem.stats();
    eprintln!("{stats}");
    assert_eq!(
        (checked.received_bytes, checked.received_crc),
        (checked.sent_bytes, checked.sent_crc),
        "stream corrupted"
    );
    let reads_in = |range: std::ops::Range<Duration>| {
        checked
            .arrivals
            .iter()
            .filter(|(t, _)| range.contains(t))
            .count()
    };
    let ms = Duration::from_millis;
    let before_cut = reads_in(ms(0)..ms(1000));
    // Packets already past the cut when it starts arrive within the one-way delay.
    let during_cut = reads_in(ms(1100)..ms(2950));
    let after_cut = reads_in(ms(3000)..ms(60_000));
    let resumed_at = checked
        .arrivals
        .iter()
        .find(|(t, _)| *t >= ms(3000))
        .map(|(t, _)| *t);
    eprintln!(
        "reads before cut {before_cut}, during {during_cut}, after {after_cut}; resumed at {resumed_at:?}"
    );
    assert!(before_cut > 0 && after_cut > 0);
    assert_eq!(during_cut, 0, "data crossed a cut link");
    assert!(stats.a_to_b.dropped_cut > 0 && stats.b_to_a.dropped_cut > 0);
}

/// The same with the cut ordered while the stream runs (`Wanem::cut`), as a test does
/// that cuts at a moment it observes.
#[test]
fn netns_link_cut_ordered_at_run_time_stalls_and_resumes() {
    let _serial = serial();
    let Some(wanem) = start(config(40, 50)) else {
        return;
    };
    let t0 = Instant::now();
    let checked = std::thread::scope(|scope| {
        let stream = scope.spawn(|| checked_stream(&wanem, t0, Duration::from_secs(6)));
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
        wanem.cut(Duration::from_secs(2));
        stream.join().unwrap()
    });
    let stats = wanem.stats();
    eprintln!("{stats}");
    assert_eq!(
        (checked.received_bytes, checked.received_crc),
        (checked.sent_bytes, checked.sent_crc),
        "stream corrupted"
    );
    let ms = Duration::from_millis;
    let reads_in = |range: std::ops::Range<Duration>| {
        checked
            .arrivals
            .iter()
            .filter(|(t, _)| range.contains(t))
            .count()
    };
    let (before, during, after) = (
        reads_in(ms(0)..ms(1000)),
        reads_in(ms(1150)..ms(2950)),
        reads_in(ms(3100)..ms(60_000)),
    );
    eprintln!("reads before cut {before}, during {during}, after {after}");
    assert!(before > 0 && after > 0);
    assert_eq!(during, 0, "data crossed a cut link");
    assert!(stats.a_to_b.dropped_cut > 0 && stats.b_to_a.dropped_cut > 0);
}

/// Reads a counter of `/proc/net/snmp` (`Tcp`, `InCsumErrors`) in the calling thread's
/// namespace.
fn snmp_counter(group: &str, name: &str) -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut lines = snmp
        .lines()
        .filter(|line| line.starts_with(&format!("{group}:")));
    let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let index = names.iter().position(|n| *n == name).unwrap();
    values[index].parse().unwrap()
}

/// With loss, the forwarder cuts lost segments out of TCP super-packets and rebuilds the
/// survivors; the receiving kernel checks every checksum, and the stream must arrive whole.
#[test]
fn netns_lossy_tcp_stream_arrives_intact() {
    let _serial = serial();
    let Some(wanem) = start(WanemConfig {
        loss_pct: 1.0,
        ..config(20, 200)
    }) else {
        return;
    };
    let checked = checked_stream(&wanem, Instant::now(), Duration::from_secs(3));
    let stats = wanem.stats();
    eprintln!("lossy stream: {} bytes\n{stats}", checked.received_bytes);
    assert_eq!(
        (checked.received_bytes, checked.received_crc),
        (checked.sent_bytes, checked.sent_crc),
        "stream corrupted"
    );
    assert!(stats.a_to_b.dropped_loss > 0);
    assert!(
        stats.a_to_b.segments_rebuilt > 0,
        "no super-packet was split: the offload path is not exercised"
    );
    let (csum_errors, ip_header_errors) = wanem
        .run_in_b(|| {
            (
                snmp_counter("Tcp", "InCsumErrors"),
                snmp_counter("Ip", "InHdrErrors"),
            )
        })
        .unwrap();
    assert_eq!(
        (csum_errors, ip_header_errors),
        (0, 0),
        "bad rebuilt segments"
    );
    // Rebuilt segments that the kernel took are counted by TCP as received segments.
    let in_segs = wanem.run_in_b(|| snmp_counter("Tcp", "InSegs")).unwrap();
    assert!(in_segs > 0);
}

/// Emulator namespaces of this process that exist now.
fn own_namespaces() -> Vec<String> {
    let pid = std::process::id();
    namespaces_listed()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.starts_with(&format!("strait-wa-{pid}-"))
                || name.starts_with(&format!("strait-wb-{pid}-"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn netns_run_cli_runs_both_sides_and_cleans_up() {
    let _serial = serial();
    if start(config(0, 0)).is_none() {
        return;
    }
    // Each command runs in its own namespace: A's sees its device and address there.
    let ok = run_cli(
        config(10, 0),
        Some("ip -o addr show dev wan0 | grep -q 10.213.".into()),
        Some("test -e /proc/net/dev".into()),
        0.0,
    );
    assert!(ok.is_ok(), "{ok:?}");
    assert!(own_namespaces().is_empty(), "{:?}", own_namespaces());

    let failed = run_cli(config(0, 0), None, Some("exit 3".into()), 0.0);
    assert!(
        matches!(failed, Err(WanemError::ChildFailed { .. })),
        "{failed:?}"
    );

    // A time limit stops a command that would run on.
    let t = Instant::now();
    let limited = run_cli(config(0, 0), Some("sleep 60".into()), None, 0.5);
    assert!(limited.is_ok(), "{limited:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(own_namespaces().is_empty(), "{:?}", own_namespaces());
}

#[test]
fn netns_run_cli_cleans_up_on_sigint() {
    let _serial = serial();
    if start(config(0, 0)).is_none() {
        return;
    }
    // run_cli installs its handler before anything else; 1.5 s leaves it ample time.
    let interrupter = thread::spawn(|| {
        thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill takes no pointers; the signal goes to this test process, whose
        // SIGINT handler run_cli has installed by now.
        unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
    });
    let t = Instant::now();
    let interrupted = run_cli(config(0, 0), Some("sleep 60".into()), None, 0.0);
    interrupter.join().unwrap();
    assert!(interrupted.is_ok(), "{interrupted:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(own_namespaces().is_empty(), "{:?}", own_namespaces());
}

fn namespaces_listed() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_cleanup_removes_namespaces() {
    let _serial = serial();
    let Some(wanem) = start(config(0, 0)) else {
        return;
    };
    let names = [
        wanem.namespace_a().to_string(),
        wanem.namespace_b().to_string(),
    ];
    let listed = namespaces_listed();
    assert!(names.iter().all(|name| listed.contains(name.as_str())));
    wanem.stop();
    let listed = namespaces_listed();
    assert!(
        !names.iter().any(|name| listed.contains(name.as_str())),
        "{listed}"
    );

    let wanem = start(config(0, 0)).unwrap();
    let names = [
        wanem.namespace_a().to_string(),
        wanem.namespace_b().to_string(),
    ];
    drop(wanem);
    let listed = namespaces_listed();
    assert!(
        !names.iter().any(|name| listed.contains(name.as_str())),
        "{listed}"
    );
}

#[test]
fn netns_stale_namespaces_of_dead_processes_are_removed() {
    let _serial = serial();
    if netns_usable().is_err() {
        // `start` reports the skip (or fails under CI).
        assert!(start(config(0, 0)).is_none());
        return;
    }
    // A pid that just exited: its namespaces are stale.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = format!("strait-wa-{dead_pid}-0");
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());
    let wanem = start(config(0, 0)).unwrap();
    let listed = namespaces_listed();
    drop(wanem);
    if !listed.contains(&stale) {
        return;
    }
    // The pid was reused by a live process in the meantime: clean up by hand.
    let _ = Command::new("ip")
        .args(["netns", "delete", &stale])
        .status();
    assert!(
        std::path::Path::new(&format!("/proc/{dead_pid}")).exists(),
        "stale namespace {stale} survived"
    );
}

/// Measures what the forwarder sustains: goodput of bulk TCP from A to B with 1 and 4
/// streams, without a rate limit and at 1 Gbit/s, at RTT 0 and 200 ms, with the CPU time
/// the forwarder threads used. Prints a table; asserts nothing about speed.
#[test]
#[ignore = "a measurement (tens of seconds); run with --ignored --nocapture"]
fn netns_capacity_report() {
    let _serial = serial();
    let seconds: u64 = std::env::var("WANEM_CAPACITY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut lines = Vec::new();
    // WANEM_CAPACITY_CASES="rate_mbit:rtt_ms,..." replaces the default cases.
    let cases: Vec<(u32, u32)> = match std::env::var("WANEM_CAPACITY_CASES") {
        Ok(list) => list
            .split(',')
            .map(|case| {
                let (rate, rtt) = case.split_once(':').unwrap();
                (rate.trim().parse().unwrap(), rtt.trim().parse().unwrap())
            })
            .collect(),
        Err(_) => vec![(0, 0), (1000, 0), (0, 200), (1000, 200), (1000, 250)],
    };
    for (rate_mbit, rtt_ms) in cases {
        for streams in [1, 4] {
            let Some(wanem) = start(config(rtt_ms, rate_mbit)) else {
                return;
            };
            // At 200 ms the window needs a few seconds of startup to reach the BDP.
            let warmup = Duration::from_millis(if rtt_ms > 0 { 4000 } else { 1000 });
            let result = bulk(&wanem, streams, warmup, Duration::from_secs(seconds));
            let cpu = |s: &WanemStats| {
                [&s.a_to_b, &s.b_to_a]
                    .iter()
                    .map(|d| (d.reader_cpu_ms.unwrap_or(0), d.release_cpu_ms.unwrap_or(0)))
                    .collect::<Vec<_>>()
            };
            let (before, after) = (cpu(&result.stats_before), cpu(&result.stats_after));
            let pct = |a: u64, b: u64| {
                (b - a) as f64 / result.measured.as_secs_f64() / 10.0 // ms per s -> %
            };
            let s = &result.stats_after.a_to_b;
            let line = format!(
                "rate {rate_mbit:>4} Mbit/s rtt {rtt_ms:>3} ms streams {streams}: goodput {:>6.1} Mbit/s; \
                 cpu % a2b reader {:.0} release {:.0}, b2a reader {:.0} release {:.0}; \
                 drops queue {} overload {}; release late max {} us mean {} us; queue delay max {} us",
                result.goodput_mbit,
                pct(before[0].0, after[0].0),
                pct(before[0].1, after[0].1),
                pct(before[1].0, after[1].0),
                pct(before[1].1, after[1].1),
                s.dropped_queue,
                s.dropped_overload,
                s.release_late_us_max,
                s.release_late_us_mean,
                s.queue_delay_us_max,
            );
            eprintln!("{line}");
            lines.push(line);
        }
    }
    eprintln!("\ncapacity summary:\n{}", lines.join("\n"));
}
