//! Fuzzes the handshake of `strait_net::protocol`: arbitrary `Hello` payloads against an
//! arbitrary acceptor policy (`Hello::decode`, then `negotiate`), and arbitrary `HelloAck`
//! payloads against the `Hello` that was sent (`check_hello_ack`).
//!
//! Input format:
//!
//! ```text
//! offset  bytes  field
//! 0       2      acceptor's version_min, u16 LE
//! 2       2      acceptor's version_max, u16 LE
//! 4       1      bit 0: acceptor's role (0 source, 1 destination); bit 6: echo (below);
//!                bit 7: give Hello::decode one byte too many
//! 5       40(+1) the Hello payload (shorter if the input ends)
//! ..      rest   the HelloAck payload
//! ```
//!
//! A `HelloAck` that echoes a 16-byte session id and a 16-byte token is out of reach of
//! random mutation in 30 seconds, so "echo" copies the `Hello`'s connection index, session
//! id and (on a join) token into the `HelloAck` bytes before they are decoded, and the
//! fuzzer spends its time on the other fields.
//!
//! Besides "never panics", the harness checks: a decoded payload re-encodes to the same
//! bytes; an agreement lies inside both version ranges, at the highest common version,
//! between different roles, with the fields its intent requires; a refusal carries the
//! acceptor's range; a refusal crosses the wire and reaches the dialer as `Refused`; an
//! accepted `HelloAck` echoes what was sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_net::protocol::{
    check_hello_ack, encode_frame, Frame, FrameDecoder, HandshakeError, HandshakePolicy, Hello,
    HelloAck, Intent, Role, MAX_CONNECTIONS_PER_SESSION,
};

/// Size of a `Hello` payload on the wire.
const HELLO_BYTES: usize = 40;
/// Flags byte: echo the `Hello` into the `HelloAck`.
const ECHO: u8 = 1 << 6;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let acceptor = HandshakePolicy {
        version_min: u16::from_le_bytes([data[0], data[1]]),
        version_max: u16::from_le_bytes([data[2], data[3]]),
        role: if data[4] & 1 == 0 {
            Role::Source
        } else {
            Role::Destination
        },
    };
    let hello_len = HELLO_BYTES + usize::from(data[4] >> 7);
    let rest = &data[5..];
    let (hello_bytes, ack_bytes) = rest.split_at(hello_len.min(rest.len()));
    let Ok(hello) = Hello::decode(hello_bytes) else {
        return;
    };
    assert_eq!(hello.encode(), hello_bytes, "Hello re-encodes differently");
    assert_eq!(round_trip(&Frame::Hello(hello)), Frame::Hello(hello));

    match strait_net::protocol::negotiate(&hello, &acceptor) {
        Ok(agreed) => {
            let low = hello.version_min.max(acceptor.version_min);
            let high = hello.version_max.min(acceptor.version_max);
            assert!(
                low <= agreed.version && agreed.version == high,
                "{agreed:?}"
            );
            assert_ne!(hello.role, acceptor.role);
            assert!(!hello.session_id.is_zero());
            assert_eq!(agreed.connection_index, hello.connection_index);
            match agreed.intent {
                Intent::Open => {
                    assert_eq!(agreed.connection_index, 0);
                    assert!(agreed.resume_token.is_none());
                }
                Intent::Join => {
                    assert!((1..MAX_CONNECTIONS_PER_SESSION).contains(&agreed.connection_index));
                    assert!(!agreed.resume_token.is_none());
                }
            }
        }
        Err(refuse) => {
            assert_eq!(
                (refuse.version_min, refuse.version_max),
                (acceptor.version_min, acceptor.version_max)
            );
            let dialer = HandshakePolicy::current(hello.role);
            let reply = round_trip(&Frame::Refuse(refuse));
            let result = check_hello_ack(&hello, &reply, &dialer);
            assert!(
                matches!(result, Err(HandshakeError::Refused { reason, .. }) if reason == refuse.reason),
                "{result:?}"
            );
        }
    }

    let mut ack_bytes = ack_bytes.to_vec();
    if data[4] & ECHO != 0 && ack_bytes.len() >= HELLO_BYTES {
        ack_bytes[4..6].copy_from_slice(&hello.connection_index.to_le_bytes());
        ack_bytes[8..24].copy_from_slice(&hello.session_id.0);
        if hello.intent == Intent::Join {
            ack_bytes[24..40].copy_from_slice(&hello.resume_token.0);
        }
    }
    let Ok(ack) = HelloAck::decode(&ack_bytes) else {
        return;
    };
    assert_eq!(ack.encode(), ack_bytes, "HelloAck re-encodes differently");
    let dialer = HandshakePolicy::current(hello.role);
    if let Ok(accepted) = check_hello_ack(&hello, &round_trip(&Frame::HelloAck(ack)), &dialer) {
        assert_eq!(accepted, ack);
        assert!((hello.version_min..=hello.version_max).contains(&ack.version));
        assert_ne!(ack.role, hello.role);
        assert_eq!(
            (ack.session_id, ack.connection_index),
            (hello.session_id, hello.connection_index)
        );
        // An open gets a fresh token; a join is answered with the token it sent (which
        // this target may build as the none token: a real dialer joins with the token
        // its open received).
        match hello.intent {
            Intent::Open => assert!(!ack.resume_token.is_none()),
            Intent::Join => assert_eq!(ack.resume_token, hello.resume_token),
        }
        assert!(ack.connection_index < ack.connections_max);
        assert!(ack.connections_max <= MAX_CONNECTIONS_PER_SESSION);
    }
});

/// Encodes a frame and decodes it again, as it would cross the wire.
fn round_trip(frame: &Frame) -> Frame {
    let bytes = encode_frame(frame).expect("handshake frames always encode");
    let mut input = bytes.as_slice();
    let decoded = FrameDecoder::new().decode(&mut input);
    assert!(input.is_empty());
    decoded
        .expect("an encoded frame decodes")
        .expect("a whole frame was given")
}
