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
