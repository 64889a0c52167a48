//! Fuzzes `strait_net::session::SessionCore` as a hostile peer would: arbitrary bytes on a
//! connection to a dialer or an acceptor, after an optional valid handshake, interleaved
//! with timers, transmits and the application's own sends.
//!
//! Input format:
//!
//! ```text
//! offset  bytes  field
//! 0       1      bit 0: role (0 the core dials, 1 it accepts); bit 1: open with a valid
//!                handshake first; bit 2: ops mode (below); bits 3..7: chunk size / 97
//! 1..     rest   raw mode: the peer's byte stream, fed in chunks
//!                ops mode: 4-byte ops (kind, class, arg u16 LE), each encoded as a
//!                well-formed frame (or a raw byte, a timer tick, a connection loss)
//! ```
//!
//! A valid handshake and valid CRCs are out of reach of random mutation, so the harness
//! builds them and the fuzzer spends its time on what follows them.
//!
//! Besides "never panics", the harness checks that every payload the core delivers is
//! the payload of the first well-formed `Data` frame with that class and sequence number
//! in the peer's stream (decoded independently here), delivered in sequence order: the
//! core never invents, alters, reorders or duplicates data.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strait_net::protocol::{
    encode_frame, Ack, Close, CloseReason, Credit, Data, Frame, FrameDecoder, Hello, HelloAck,
    Intent, Ping, ResumePoint, ResumeToken, Role, SessionId, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};
use strait_net::session::{ConnId, SessionConfig, SessionCore};
use strait_net::StreamClass;

const CONN: ConnId = ConnId(1);
/// Simulated time per step: enough for ack delays and pings to fire now and then.
const STEP_NS: u64 = 3_000_000;

struct Harness {
    core: SessionCore,
    /// Decodes the peer's stream as the core does; `None` after the first bad frame.
    reference: Option<FrameDecoder>,
    /// First payload of each (class, seq) the peer sent.
    sent: BTreeMap<(usize, u64), Vec<u8>>,
    /// Payloads delivered so far per class.
    delivered: [u64; 4],
    now_ns: u64,
}

impl Harness {
    fn feed(&mut self, bytes: &[u8]) {
        if let Some(decoder) = self.reference.as_mut() {
            let mut rest = bytes;
            while !rest.is_empty() {
                match decoder.decode(&mut rest) {
                    Ok(Some(Frame::Data(d))) => {
                        let class = class_index(d.class);
                        self.sent.entry((class, d.seq)).or_insert(d.payload);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        self.reference = None;
                        break;
                    }
                }
            }
        }
        self.core.on_bytes(CONN, bytes, self.now_ns);
        self.settle();
    }

    fn settle(&mut self) {
        self.now_ns += STEP_NS;
        self.core.on_timer(self.now_ns);
        while self.core.poll_transmit(CONN).is_some() {}
        while self.core.poll_event().is_some() {}
        for (i, class) in StreamClass::ALL.into_iter().enumerate() {
            while let Some(payload) = self.core.recv(class) {
                self.delivered[i] += 1;
                let seq = self.delivered[i];
                assert_eq!(
                    self.sent.get(&(i, seq)),
                    Some(&payload),
                    "{class:?} seq {seq} delivered but not sent so"
                );
                let _ = self.core.mark_applied(class, payload.len() as u64);
            }
        }
        let _ = self.core.send(StreamClass::Memory, vec![0x5a; 700]);
    }
}

fn class_index(class: StreamClass) -> usize {
    StreamClass::ALL
        .iter()
        .position(|c| *c == class)
        .unwrap_or(0)
}

fn frame(f: &Frame) -> Vec<u8> {
    encode_frame(f).unwrap_or_default()
}

/// The frame (or action) one 4-byte op stands for.
fn op_bytes(h: &mut Harness, op: &[u8]) -> Option<Vec<u8>> {
    let class = StreamClass::ALL[usize::from(op[1] & 3)];
    let arg = u16::from_le_bytes([op[2], op[3]]);
    let bytes = match op[0] % 10 {
        0 | 1 | 2 => frame(&Frame::Data(Data {
            class,
            seq: u64::from(arg % 64),
            retransmit: op[1] & 4 != 0,
            payload: vec![op[1]; usize::from(arg >> 6) + 1],
        })),
        3 => frame(&Frame::Credit(Credit {
            class,
            limit_bytes: u64::from(arg) << (op[1] >> 3),
        })),
        4 => frame(&Frame::Ack(Ack {
            class,
            seq: u64::from(arg % 64),
        })),
        5 => frame(&Frame::Ping(Ping {
            nonce: u64::from(arg),
            sent_at_ns: u64::from(arg) * 1000,
        })),
        6 => frame(&Frame::Close(Close {
            reason: if arg & 1 == 0 {
                CloseReason::Done
            } else {
                CloseReason::Cancelled
            },
        })),
        7 => frame(&Frame::ResumeRequest(ResumePoint {
            last_seq_received: [0, 1, 2, 3].map(|i| u64::from(op[1].rotate_left(i) % 8)),
        })),
        8 => vec![op[1]],
        _ => {
            if arg == 0 {
                h.core.on_connection_down(CONN, h.now_ns);
            }
            h.now_ns += u64::from(arg) * 1_000_000;
            h.settle();
            return None;
        }
    };
    Some(bytes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let accepts = flags & 1 != 0;
    let core = if accepts {
        SessionCore::acceptor(
            SessionConfig::new(Role::Destination),
            ResumeToken([7; 16]),
            0,
        )
    } else {
        SessionCore::dialer(SessionConfig::new(Role::Source), SessionId([3; 16]), 0)
    };
    let Ok(core) = core else {
        return;
    };
    let mut h = Harness {
        core,
        reference: Some(FrameDecoder::new()),
        sent: BTreeMap::new(),
        delivered: [0; 4],
        now_ns: 0,
    };
    h.core.on_connection_up(CONN, 0);
    let greeting = h.core.poll_transmit(CONN);
    if flags & 2 != 0 {
        let reply = if accepts {
            Frame::Hello(Hello {
                version_min: PROTOCOL_VERSION_MIN,
                version_max: PROTOCOL_VERSION_MAX,
                role: Role::Source,
                intent: Intent::Open,
                connection_index: 0,
                session_id: SessionId([1; 16]),
                resume_token: ResumeToken::NONE,
            })
        } else {
            let mut decoder = FrameDecoder::new();
            let hello = greeting.and_then(|g| decoder.decode(&mut g.as_slice()).ok().flatten());
            let Some(Frame::Hello(hello)) = hello else {
                return;
            };
            Frame::HelloAck(HelloAck {
                version: PROTOCOL_VERSION_MAX,
                role: Role::Destination,
                connection_index: hello.connection_index,
                connections_max: 16,
                session_id: hello.session_id,
                resume_token: ResumeToken([7; 16]),
            })
        };
        h.feed(&frame(&reply));
    }
    if flags & 4 != 0 {
        for op in rest.chunks_exact(4) {
            if let Some(bytes) = op_bytes(&mut h, op) {
                h.feed(&bytes);
            }
        }
    } else {
        let chunk = usize::from(flags >> 3) * 97 + 1;
        for piece in rest.chunks(chunk) {
            h.feed(piece);
        }
    }
});
