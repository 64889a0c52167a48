//! Unit tests of [`SessionCore`] against a hostile or broken peer, driven by hand over
//! an in-memory pipe. They live in their own file because `core.rs` is near the house
//! limit of a file readable in one sitting.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::protocol::{encode_frame, Credit, Data, Frame, Hello, Intent, ResumeToken, SessionId};

const CONN: ConnId = ConnId(7);

fn dialer(role: Role) -> SessionCore {
    SessionCore::dialer(SessionConfig::new(role), SessionId([3; 16]), 0).unwrap()
}

fn acceptor() -> SessionCore {
    SessionCore::acceptor(
        SessionConfig::new(Role::Destination),
        ResumeToken([9; 16]),
        0,
    )
    .unwrap()
}

/// Moves bytes both ways on `CONN` until neither side has anything to send.
fn pump(a: &mut SessionCore, b: &mut SessionCore, now_ns: u64) {
    for _ in 0..1000 {
        let ab = a.poll_transmit(CONN);
        let ba = b.poll_transmit(CONN);
        if ab.is_none() && ba.is_none() {
            return;
        }
        if let Some(bytes) = ab {
            b.on_bytes(CONN, &bytes, now_ns);
        }
        if let Some(bytes) = ba {
            a.on_bytes(CONN, &bytes, now_ns);
        }
    }
    panic!("the pipe never went quiet");
}

fn events(core: &mut SessionCore) -> Vec<SessionEvent> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

fn open() -> (SessionCore, SessionCore) {
    let (mut a, mut b) = (dialer(Role::Source), acceptor());
    assert!(a.wants_connection(0));
    a.on_connection_up(CONN, 0);
    b.on_connection_up(CONN, 0);
    pump(&mut a, &mut b, 1);
    assert_eq!(events(&mut a), [SessionEvent::Connected]);
    assert_eq!(events(&mut b), [SessionEvent::Connected]);
    (a, b)
}

fn closed_reason(core: &mut SessionCore) -> ConnError {
    let events = events(core);
    match events.as_slice() {
        [SessionEvent::ConnectionClosed { conn, reason }] if *conn == CONN => reason.clone(),
        other => panic!("expected one ConnectionClosed, got {other:?}"),
    }
}

#[test]
fn data_flows_in_order_once_credit_arrives() {
    let (mut a, mut b) = open();
    for i in 1..=3u8 {
        assert_eq!(a.send(StreamClass::Memory, vec![i; 100]), Ok(u64::from(i)));
    }
    pump(&mut a, &mut b, 2);
    for i in 1..=3u8 {
        assert_eq!(b.recv(StreamClass::Memory), Some(vec![i; 100]));
    }
    assert_eq!(b.recv(StreamClass::Memory), None);
    assert!(b.mark_applied(StreamClass::Memory, 301).is_err());
    b.mark_applied(StreamClass::Memory, 300).unwrap();
    assert_eq!(
        a.send(StreamClass::Bulk, Vec::new()),
        Err(SendError::PayloadLength { len: 0 })
    );
}

#[test]
fn a_full_send_buffer_refuses_with_would_block() {
    let mut a = dialer(Role::Source);
    let frame = vec![0; MAX_FRAME_PAYLOAD_BYTES as usize];
    let fit = SEND_BUFFER_BYTES / u64::from(MAX_FRAME_PAYLOAD_BYTES);
    for _ in 0..fit {
        a.send(StreamClass::Bulk, frame.clone()).unwrap();
    }
    assert!(!a.can_send(StreamClass::Bulk, frame.len()));
    assert!(matches!(
        a.send(StreamClass::Bulk, frame),
        Err(SendError::WouldBlock { .. })
    ));
    // Another class has its own buffer.
    assert!(a.send(StreamClass::Mirror, vec![1]).is_ok());
}

#[test]
fn data_beyond_the_granted_window_closes_the_connection() {
    let (_, mut b) = open();
    // The window is RECV_WINDOW_BYTES; send that many bytes plus one.
    let big = vec![0; MAX_FRAME_PAYLOAD_BYTES as usize];
    let mut seq = 1;
    let mut sent = 0;
    while sent + big.len() as u64 <= RECV_WINDOW_BYTES {
        let frame = Frame::Data(Data {
            class: StreamClass::Bulk,
            seq,
            retransmit: false,
            payload: big.clone(),
        });
        b.on_bytes(CONN, &encode_frame(&frame).unwrap(), 2);
        seq += 1;
        sent += big.len() as u64;
    }
    assert!(events(&mut b).is_empty(), "within the window is fine");
    let over = encode_frame(&Frame::Data(Data {
        class: StreamClass::Bulk,
        seq,
        retransmit: false,
        payload: vec![0; 1],
    }))
    .unwrap();
    b.on_bytes(CONN, &over, 3);
    assert!(matches!(
        closed_reason(&mut b),
        ConnError::CreditExceeded { .. }
    ));
}

#[test]
fn garbage_and_out_of_phase_frames_close_the_connection() {
    let mut b = acceptor();
    b.on_connection_up(CONN, 0);
    b.on_bytes(CONN, b"GET / HTTP/1.1\r\n\r\n0123456789abcdef", 1);
    assert!(matches!(closed_reason(&mut b), ConnError::Decode(_)));

    let mut b = acceptor();
    b.on_connection_up(CONN, 0);
    let credit = Frame::Credit(Credit {
        class: StreamClass::Bulk,
        limit_bytes: 1,
    });
    b.on_bytes(CONN, &encode_frame(&credit).unwrap(), 1);
    assert!(matches!(
        closed_reason(&mut b),
        ConnError::UnexpectedFrame { .. }
    ));
}

#[test]
fn an_ack_for_frames_never_sent_closes_the_connection() {
    let (mut a, _) = open();
    let ack = Frame::Ack(crate::protocol::Ack {
        class: StreamClass::Memory,
        seq: 5,
    });
    a.on_bytes(CONN, &encode_frame(&ack).unwrap(), 2);
    assert!(matches!(
        closed_reason(&mut a),
        ConnError::AckBeyondSent { seq: 5, .. }
    ));
}

#[test]
fn a_delivered_report_beyond_what_the_connection_carried_closes_it() {
    let (mut a, _) = open();
    assert_eq!(a.send(StreamClass::Bulk, vec![1; 10]), Ok(1));
    assert!(a.poll_transmit(CONN).is_some());
    let report = Frame::Delivered(crate::protocol::Delivered { bytes: 11 });
    a.on_bytes(CONN, &encode_frame(&report).unwrap(), 2);
    assert_eq!(
        closed_reason(&mut a),
        ConnError::DeliveredBeyondSent {
            delivered_bytes: 11,
            sent_bytes: 10,
        }
    );
}

/// `Delivered` frees a connection's in-flight bound on its own, before the class's
/// cumulative `Ack` (which, across connections, may wait for a loss elsewhere).
#[test]
fn delivered_reopens_a_full_connection_before_any_ack() {
    const FRAME: usize = 64 << 10;
    const INFLIGHT: u64 = 8 * FRAME as u64;
    let mut config = SessionConfig::new(Role::Source);
    config.conn_inflight_bytes_max = INFLIGHT;
    let mut a = SessionCore::dialer(config, SessionId([3; 16]), 0).unwrap();
    let mut b = acceptor();
    a.on_connection_up(CONN, 0);
    b.on_connection_up(CONN, 0);
    pump(&mut a, &mut b, 1);
    for i in 0..16u8 {
        a.send(StreamClass::Bulk, vec![i; FRAME]).unwrap();
    }
    let bulk = StreamClass::ALL.len() - 1;
    let mut wire = Vec::new();
    while let Some(bytes) = a.poll_transmit(CONN) {
        wire.extend_from_slice(&bytes);
    }
    assert_eq!(a.stats().send[bulk].sent_bytes, INFLIGHT, "the bound holds");
    b.on_bytes(CONN, &wire, 1);
    // 512 KiB arrived at once: past CONN_DELIVERED_EVERY_BYTES, short of ACK_EVERY_BYTES,
    // and no time passed, so the answer is a Delivered and no Ack.
    let answer = b.poll_transmit(CONN).unwrap();
    a.on_bytes(CONN, &answer, 1);
    assert_eq!(a.stats().send[bulk].acked_bytes, 0, "no ack yet");
    while let Some(bytes) = a.poll_transmit(CONN) {
        b.on_bytes(CONN, &bytes, 1);
    }
    assert_eq!(a.stats().send[bulk].sent_bytes, 2 * INFLIGHT);
    pump(&mut a, &mut b, 1 + ACK_DELAY_NS);
    let received: Vec<u8> = std::iter::from_fn(|| b.recv(StreamClass::Bulk))
        .flatten()
        .collect();
    let expected: Vec<u8> = (0..16u8).flat_map(|i| vec![i; FRAME]).collect();
    assert_eq!(received, expected);
}

#[test]
fn a_refused_open_fails_the_session_with_the_reason() {
    // Both ends claim to be the source.
    let (mut a, mut b) = (dialer(Role::Destination), acceptor());
    a.on_connection_up(CONN, 0);
    b.on_connection_up(CONN, 0);
    pump(&mut a, &mut b, 1);
    let failed = events(&mut a);
    let Some(SessionEvent::Failed { reason }) = failed.last() else {
        panic!("{failed:?}");
    };
    let text = format!("{reason}: {}", std::error::Error::source(reason).unwrap());
    assert!(text.contains("same role"), "{text}");
    assert!(matches!(a.state(), SessionState::Failed(_)));
    assert!(!a.wants_connection(u64::MAX));
    assert!(matches!(closed_reason(&mut b), ConnError::Refused(_)));
}

#[test]
fn a_join_with_a_wrong_token_is_refused() {
    let (_, mut b) = open();
    let other = ConnId(8);
    b.on_connection_up(other, 2);
    let hello = Hello {
        version_min: crate::protocol::PROTOCOL_VERSION_MIN,
        version_max: crate::protocol::PROTOCOL_VERSION_MAX,
        role: Role::Source,
        intent: Intent::Join,
        connection_index: 1,
        session_id: SessionId([3; 16]),
        resume_token: ResumeToken([8; 16]),
    };
    b.on_bytes(other, &encode_frame(&Frame::Hello(hello)).unwrap(), 3);
    let reply = b.poll_transmit(other).unwrap();
    let mut decoder = crate::protocol::FrameDecoder::new();
    let frame = decoder.decode(&mut reply.as_slice()).unwrap();
    assert!(matches!(
        frame,
        Some(Frame::Refuse(r)) if r.reason == crate::protocol::RefuseReason::BadResumeToken
    ));
}

#[test]
fn pings_measure_the_rtt() {
    let (mut a, mut b) = open();
    a.on_timer(10);
    let ping = a.poll_transmit(CONN).unwrap();
    b.on_bytes(CONN, &ping, 60);
    let pong = b.poll_transmit(CONN).unwrap();
    a.on_bytes(CONN, &pong, 110);
    assert_eq!(a.srtt_ns(), Some(100));
}

#[test]
fn a_handshake_that_never_completes_times_out() {
    let mut a = dialer(Role::Source);
    a.on_connection_up(CONN, 0);
    let _hello = a.poll_transmit(CONN).unwrap();
    assert!(!a.wants_connection(1));
    let deadline = a.poll_timeout().unwrap();
    assert_eq!(deadline, CONN_IDLE_TIMEOUT_NS);
    a.on_timer(deadline);
    assert!(matches!(
        closed_reason(&mut a),
        ConnError::IdleTimeout { .. }
    ));
    // It backs off, then dials again.
    assert!(!a.wants_connection(deadline));
    assert!(a.wants_connection(deadline + RECONNECT_BACKOFF_NS[0]));
}

#[test]
fn close_tells_the_peer_and_refuses_further_sends() {
    let (mut a, mut b) = open();
    a.close(crate::protocol::CloseReason::Shutdown);
    assert!(a.has_unsent_control());
    assert_eq!(a.send(StreamClass::Bulk, vec![1]), Err(SendError::Closed));
    pump(&mut a, &mut b, 2);
    assert!(matches!(
        b.state(),
        SessionState::Failed(SessionError::PeerClosed { .. })
    ));
}

#[test]
fn a_graceful_close_with_nothing_unacked_ends_both_sides_closed() {
    let (mut a, mut b) = open();
    a.send(StreamClass::Memory, vec![5; 300]).unwrap();
    a.close_gracefully();
    assert_eq!(a.send(StreamClass::Bulk, vec![1]), Err(SendError::Closed));
    pump(&mut a, &mut b, 2);
    assert_eq!(b.recv(StreamClass::Memory), Some(vec![5; 300]));
    // Nothing goes before the ack, which waits for its delay.
    assert_eq!(a.state(), &SessionState::Established);
    b.on_timer(2 + ACK_DELAY_NS);
    pump(&mut a, &mut b, 3 + ACK_DELAY_NS);
    assert_eq!(a.state(), &SessionState::Closed);
    assert_eq!(b.state(), &SessionState::Closed);
    for core in [&mut a, &mut b] {
        let events = events(core);
        assert!(events.contains(&SessionEvent::Closed), "{events:?}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SessionEvent::Failed { .. })),
            "{events:?}"
        );
        assert_eq!(core.stats().connections_closed, 0);
        assert_eq!(core.poll_timeout(), None);
    }
    assert_eq!(b.send(StreamClass::Bulk, vec![1]), Err(SendError::Closed));
}

/// Tests of graceful close over the simulated WAN and over TLS sockets.
mod finish {
    use super::*;
    use crate::session::sim_driver::SimPair;
    use crate::session::tcp::{Link, LinkError};
    use crate::sim::SimConfig;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    fn payload(tag: u8, i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| tag ^ (i as u8) ^ (j >> 7) as u8).collect()
    }

    /// Takes and applies everything `core` received of `class` into `into`.
    fn drain(core: &mut SessionCore, class: StreamClass, into: &mut Vec<u8>) {
        while let Some(p) = core.recv(class) {
            core.mark_applied(class, p.len() as u64).unwrap();
            into.extend_from_slice(&p);
        }
    }

    #[test]
    fn sim_graceful_close_delivers_every_byte_even_while_the_peer_still_sends() {
        let mut pair = SimPair::with_defaults(11, SimConfig::default()).unwrap();
        let up = pair.run(10_000_000_000, |p| {
            p.dialer.state() == &SessionState::Established
                && p.acceptor.state() == &SessionState::Established
        });
        assert_eq!(up, Ok(true));
        // The dialer sends a little and finishes at once; the acceptor sends more than
        // a window, so the dialer's `Close { Done }` reaches it with data unacked.
        let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
        for i in 0..4 {
            let p = payload(0xa1, i, MIB);
            sent_a.extend_from_slice(&p);
            pair.dialer.send(StreamClass::Bulk, p).unwrap();
        }
        for i in 0..36 {
            let p = payload(0xb2, i, MIB);
            sent_b.extend_from_slice(&p);
            pair.acceptor.send(StreamClass::Memory, p).unwrap();
        }
        pair.dialer.close_gracefully();
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let mut refused_with_backlog = false;
        let done = pair.run(60_000_000_000, |p| {
            drain(&mut p.acceptor, StreamClass::Bulk, &mut got_a);
            drain(&mut p.dialer, StreamClass::Memory, &mut got_b);
            if !p.acceptor.is_send_idle()
                && p.acceptor.send(StreamClass::Mirror, vec![1]) == Err(SendError::Closed)
            {
                refused_with_backlog = true;
            }
            p.dialer.state() == &SessionState::Closed && p.acceptor.state() == &SessionState::Closed
        });
        assert_eq!(
            done,
            Ok(true),
            "{:?} {:?}",
            pair.dialer.state(),
            pair.acceptor.state()
        );
        drain(&mut pair.acceptor, StreamClass::Bulk, &mut got_a);
        drain(&mut pair.dialer, StreamClass::Memory, &mut got_b);
        // Mirror probes the acceptor sent before it learnt of the close also arrive.
        assert!(got_a == sent_a, "dialer -> acceptor bytes differ");
        assert!(got_b == sent_b, "acceptor -> dialer bytes differ");
        assert!(
            refused_with_backlog,
            "the peer's Done came after our backlog"
        );
        for events in &pair.events {
            assert!(events.contains(&SessionEvent::Closed), "{events:?}");
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, SessionEvent::Failed { .. })),
                "{events:?}"
            );
        }
    }

    #[test]
    fn tcp_finish_delivers_every_byte_and_both_links_end_closed() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::write_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_tls = crate::tls::TlsIdentity::load(dir.path()).unwrap();
        let acceptor = std::thread::spawn(move || {
            Link::accept(
                listener,
                Some(&server_tls),
                SessionConfig::new(Role::Destination),
            )
        });
        let client_tls = crate::tls::TlsIdentity::load(dir.path()).unwrap();
        let config = SessionConfig::new(Role::Source);
        let tx = Link::connect(addr, 4, Some(&client_tls), config).unwrap();
        let rx = acceptor.join().unwrap().unwrap();
        let mut sent = Vec::new();
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                match rx.recv(StreamClass::Bulk, Duration::from_secs(20)) {
                    Ok(Some(p)) => {
                        rx.mark_applied(StreamClass::Bulk, p.len() as u64).unwrap();
                        got.extend_from_slice(&p);
                    }
                    Ok(None) => panic!("receive timed out at {} bytes", got.len()),
                    Err(LinkError::Finished) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            (got, rx.state(), rx)
        });
        for i in 0..48 {
            let p = payload(0x3c, i, MIB - i * 1000);
            sent.extend_from_slice(&p);
            tx.send(StreamClass::Bulk, p, Duration::from_secs(20))
                .unwrap();
        }
        tx.finish(Duration::from_secs(30)).unwrap();
        assert_eq!(tx.state(), SessionState::Closed);
        let (got, rx_state, rx) = receiver.join().unwrap();
        assert!(
            got == sent,
            "{} bytes sent, {} received",
            sent.len(),
            got.len()
        );
        assert_eq!(rx_state, SessionState::Closed);
        assert!(matches!(
            tx.send(StreamClass::Bulk, vec![1], Duration::ZERO),
            Err(LinkError::Closed)
        ));
        // Finishing the answering side too is quiet and immediate.
        rx.finish(Duration::from_secs(1)).unwrap();
    }
}

/// Tests of the dialer's choice of its connection count over the simulated network.
mod tuning {
    use super::*;
    use crate::session::sim_driver::SimPair;
    use crate::sim::{LinkConfig, SimConfig};

    const FRAME_BYTES: usize = 64 << 10;

    /// A scaled-down WAN, so a debug build simulates it quickly: a 12 MB/s bottleneck
    /// and a 300 KiB window per connection (above one 256 KiB transmit batch), one-way
    /// `delay_ns`.
    fn net(delay_ns: u64) -> SimConfig {
        SimConfig {
            link: LinkConfig {
                delay_ns,
                jitter_ns: delay_ns / 20,
                bandwidth_bytes_per_s: 0,
                window_bytes: 300 << 10,
                loss_per_million: 0,
                handshake_round_trips: 2,
                reset_detect_ns: NS_PER_S,
            },
            shared_bandwidth_bytes_per_s: 12_000_000,
        }
    }

    /// Keeps the dialer's Bulk buffer full for `run_ns`; returns the dialer's stats.
    fn saturate(delay_ns: u64, run_ns: u64) -> (SessionStats, usize) {
        let mut dialer = SessionConfig::new(Role::Source);
        dialer.connections = MIN_CONNECTIONS;
        dialer.connections_grow_max = MAX_CONNECTIONS;
        let acceptor = SessionConfig::new(Role::Destination);
        let mut pair = SimPair::new(5, net(delay_ns), dialer, acceptor).unwrap();
        let mut received = 0u64;
        let done = pair.run(run_ns, |p| {
            while p.dialer.can_send(StreamClass::Bulk, FRAME_BYTES) {
                p.dialer
                    .send(StreamClass::Bulk, vec![7; FRAME_BYTES])
                    .unwrap();
            }
            while let Some(data) = p.acceptor.recv(StreamClass::Bulk) {
                received += data.len() as u64;
                p.acceptor
                    .mark_applied(StreamClass::Bulk, data.len() as u64)
                    .unwrap();
            }
            false
        });
        assert_eq!(done, Ok(false));
        assert!(
            received > 0,
            "{:?} {:?} {:?} {:?}",
            pair.dialer.state(),
            pair.events,
            pair.dialer.stats(),
            pair.acceptor.stats()
        );
        let failed = pair.events[0]
            .iter()
            .chain(&pair.events[1])
            .any(|e| matches!(e, SessionEvent::Failed { .. }));
        assert!(!failed, "{:?}", pair.events);
        (pair.dialer.stats(), pair.live_connections().len())
    }

    #[test]
    fn connections_grow_on_a_long_fat_link_where_one_window_limits() {
        // 150 ms RTT: a 300 KiB window carries about 2 MB/s, so the 12 MB/s
        // bottleneck needs about six connections.
        let (stats, live) = saturate(75 * NS_PER_MS, 14 * NS_PER_S);
        eprintln!(
            "long link: target {} live {live} rate {} B/s",
            stats.connections_target, stats.send[3].drain_rate_bytes_per_s
        );
        assert!(stats.connections_target >= 8, "{stats:?}");
        assert_eq!(live, usize::from(stats.connections_target));
        assert!(
            stats.send[3].drain_rate_bytes_per_s > 10_000_000,
            "{stats:?}"
        );
    }

    #[test]
    fn tcp_connect_auto_starts_with_the_minimum_and_reports_its_count() {
        use crate::session::tcp::Link;
        use std::time::{Duration, Instant};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = std::thread::spawn(move || {
            Link::accept(listener, None, SessionConfig::new(Role::Destination))
        });
        let tx = Link::connect_auto(addr, None, SessionConfig::new(Role::Source)).unwrap();
        let rx = acceptor.join().unwrap().unwrap();
        assert_eq!(tx.stats().connections_target, MIN_CONNECTIONS);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tx.stats().ready_connections < usize::from(MIN_CONNECTIONS) {
            assert!(Instant::now() < deadline, "{:?}", tx.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        tx.send(StreamClass::Bulk, vec![1; 1000], Duration::from_secs(5))
            .unwrap();
        let got = rx.recv(StreamClass::Bulk, Duration::from_secs(5)).unwrap();
        assert_eq!(got, Some(vec![1; 1000]));
        rx.mark_applied(StreamClass::Bulk, 1000).unwrap();
        tx.finish(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn connections_stay_few_on_a_short_link() {
        // 2 ms RTT: one window carries 150 MB/s, ten times the bottleneck.
        let (stats, live) = saturate(NS_PER_MS, 8 * NS_PER_S);
        eprintln!(
            "short link: target {} live {live} rate {} B/s",
            stats.connections_target, stats.send[3].drain_rate_bytes_per_s
        );
        assert_eq!(stats.connections_target, MIN_CONNECTIONS, "{stats:?}");
        assert_eq!(live, usize::from(MIN_CONNECTIONS));
    }
}
