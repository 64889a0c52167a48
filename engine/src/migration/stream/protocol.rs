//! The memory stream's messages, carried as payloads of the link's `Memory` class.
//!
//! The link delivers the class in order, exactly once, with its own framing, checksums,
//! flow control and resume; what it does not say is where one VMM migration stream starts
//! and ends. These messages do, so that an end or an abort is explicit, never inferred
//! from silence.
//!
//! # Message sequence
//!
//! 1. The orchestration binds the source end's Unix socket and tells the source VMM to
//!    migrate into it (`migrate uri=unix:PATH`). The destination VMM already listens on its
//!    own socket (`-incoming unix:PATH`, or `-incoming defer` then `migrate-incoming`), and
//!    the destination end runs, waiting for step 3.
//! 2. The source VMM connects; the source end accepts exactly one connection.
//! 3. Source → destination: `Start { version }` with a fresh stream id. The destination end
//!    discards every earlier message of any id (leftovers of an aborted stream), connects
//!    to its VMM's socket, or answers `Abort` with the reason it could not.
//! 4. Both ways, `Data`: source → destination the VMM's migration stream, destination →
//!    source its return path (QEMU's `return-path`: acknowledgements and the final
//!    `SHUT`). Each message carries bytes as the VMM wrote them, in order.
//! 5. Each side, when its VMM closes its end of the socket: `End`. The receiver then shuts
//!    the writing half of its own VMM's socket, so that VMM reads end-of-stream exactly
//!    where the other VMM stopped.
//! 6. Either side, at any time instead of 4–5: `Abort { reason }` (an error, a timeout, a
//!    cancel). The receiver closes its VMM's socket and reports the reason; nothing
//!    follows on that stream.
//!
//! Every message names its stream; a message of another stream than the current one is
//! discarded (and counted), so the leftovers of an aborted stream never leak into the next.
//!
//! # Encoding
//!
//! A one-byte type, the stream id (u32, little-endian), then the body:
//!
//! | type | name  | body                                              |
//! |------|-------|---------------------------------------------------|
//! | 1    | Start | the protocol version, one byte ([`VERSION`])      |
//! | 2    | Data  | 1..=[`DATA_BYTES_MAX`] bytes of the VMM's stream  |
//! | 3    | End   | nothing                                           |
//! | 4    | Abort | a UTF-8 reason, at most [`ABORT_REASON_BYTES_MAX`] |
//!
//! Everything decoded here comes from the peer: [`decode`] checks the whole message and
//! never panics.

use thiserror::Error;

/// Bytes before the body: the type and the stream id.
pub const HEADER_BYTES: usize = 5;

/// Most VMM bytes one `Data` message carries: half the link's largest frame (1 MiB), as
/// the replication messages do, so a message always fits one frame with room to spare.
pub const DATA_BYTES_MAX: usize = 512 << 10;

/// Longest abort reason: a full error chain with paths, and still a negligible message.
/// A longer reason is cut at a character boundary by [`Message::encode`].
pub const ABORT_REASON_BYTES_MAX: usize = 1024;

/// The version of this protocol that `Start` announces; a destination refuses others.
pub const VERSION: u8 = 1;

const TYPE_START: u8 = 1;
const TYPE_DATA: u8 = 2;
const TYPE_END: u8 = 3;
const TYPE_ABORT: u8 = 4;

/// Identifies one migration stream within a link session.
pub type StreamId = u32;

/// One memory-stream message; `Data` borrows its bytes from the payload it was decoded
/// from, so the relay writes them to the VMM without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Source → destination: a stream begins; connect to the VMM.
    Start { stream: StreamId, version: u8 },
    /// Bytes of the VMM's stream (either direction).
    Data { stream: StreamId, bytes: &'a [u8] },
    /// The sender's VMM closed its end: no more `Data` this way.
    End { stream: StreamId },
    /// The sender gave up on the stream.
    Abort { stream: StreamId, reason: String },
}

/// A payload that is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// Shorter than the header.
    #[error("memory-stream message of {len} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Short { len: usize },
    /// An unknown type byte.
    #[error("unknown memory-stream message type {code}")]
    Type { code: u8 },
    /// `Start` with a body other than one version byte.
    #[error("Start message with a {len}-byte body (expected 1)")]
    StartLength { len: usize },
    /// `Data` with no bytes or more than [`DATA_BYTES_MAX`].
    #[error("Data message with {len} bytes (expected 1..={DATA_BYTES_MAX})")]
    DataLength { len: usize },
    /// `End` with a body.
    #[error("End message with a {len}-byte body (expected none)")]
    EndLength { len: usize },
    /// `Abort` with a reason over [`ABORT_REASON_BYTES_MAX`].
    #[error("Abort reason of {len} bytes (at most {ABORT_REASON_BYTES_MAX})")]
    ReasonLength { len: usize },
    /// `Abort` with a reason that is not UTF-8.
    #[error("Abort reason is not UTF-8")]
    ReasonUtf8,
}

impl Message<'_> {
    /// The stream this message belongs to.
    pub fn stream(&self) -> StreamId {
        match self {
            Message::Start { stream, .. }
            | Message::Data { stream, .. }
            | Message::End { stream }
            | Message::Abort { stream, .. } => *stream,
        }
    }

    /// The message as a link payload. `Data` longer than [`DATA_BYTES_MAX`] is a bug of
    /// the caller (the relay reads at most that much at once): it is asserted.
    pub fn encode(&self) -> Vec<u8> {
        let (code, body): (u8, &[u8]) = match self {
            Message::Start { version, .. } => (TYPE_START, std::slice::from_ref(version)),
            Message::Data { bytes, .. } => {
                assert!(!bytes.is_empty() && bytes.len() <= DATA_BYTES_MAX);
                (TYPE_DATA, bytes)
            }
            Message::End { .. } => (TYPE_END, &[]),
            Message::Abort { reason, .. } => (TYPE_ABORT, truncate_utf8(reason).as_bytes()),
        };
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.push(code);
        out.extend_from_slice(&self.stream().to_le_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// Writes the header of a `Data` message into the first [`HEADER_BYTES`] of `payload`,
/// whose rest the caller filled with the VMM's bytes: the relay reads the VMM's socket
/// straight into a payload buffer, so the bytes are never copied on the sending side.
/// Returns `false` (and leaves `payload` alone) if the data part is empty or too long.
pub fn fill_data_header(payload: &mut [u8], stream: StreamId) -> bool {
    let data_len = payload.len().saturating_sub(HEADER_BYTES);
    if payload.len() < HEADER_BYTES || data_len == 0 || data_len > DATA_BYTES_MAX {
        return false;
    }
    payload[0] = TYPE_DATA;
    payload[1..HEADER_BYTES].copy_from_slice(&stream.to_le_bytes());
    true
}

/// Decodes one link payload; every field is checked before anything is returned.
pub fn decode(payload: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let Some((header, body)) = payload.split_at_checked(HEADER_BYTES) else {
        return Err(ProtocolError::Short { len: payload.len() });
    };
    let code = header[0];
    let mut id = [0u8; 4];
    id.copy_from_slice(&header[1..HEADER_BYTES]);
    let stream = StreamId::from_le_bytes(id);
    match code {
        TYPE_START => match body {
            [version] => Ok(Message::Start {
                stream,
                version: *version,
            }),
            _ => Err(ProtocolError::StartLength { len: body.len() }),
        },
        TYPE_DATA if body.is_empty() || body.len() > DATA_BYTES_MAX => {
            Err(ProtocolError::DataLength { len: body.len() })
        }
        TYPE_DATA => Ok(Message::Data {
            stream,
            bytes: body,
        }),
        TYPE_END if !body.is_empty() => Err(ProtocolError::EndLength { len: body.len() }),
        TYPE_END => Ok(Message::End { stream }),
        TYPE_ABORT if body.len() > ABORT_REASON_BYTES_MAX => {
            Err(ProtocolError::ReasonLength { len: body.len() })
        }
        TYPE_ABORT => match std::str::from_utf8(body) {
            Ok(reason) => Ok(Message::Abort {
                stream,
                reason: reason.to_owned(),
            }),
            Err(_) => Err(ProtocolError::ReasonUtf8),
        },
        code => Err(ProtocolError::Type { code }),
    }
}

/// `reason` cut to at most [`ABORT_REASON_BYTES_MAX`] bytes at a character boundary.
fn truncate_utf8(reason: &str) -> &str {
    if reason.len() <= ABORT_REASON_BYTES_MAX {
        return reason;
    }
    let mut end = ABORT_REASON_BYTES_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip(message: &Message<'_>) {
        let bytes = message.encode();
        assert_eq!(&decode(&bytes).unwrap(), message);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(&Message::Start {
            stream: 7,
            version: VERSION,
        });
        round_trip(&Message::Data {
            stream: u32::MAX,
            bytes: &[0, 1, 2, 3],
        });
        round_trip(&Message::Data {
            stream: 1,
            bytes: &[0xAB; DATA_BYTES_MAX],
        });
        round_trip(&Message::End { stream: 0 });
        round_trip(&Message::Abort {
            stream: 3,
            reason: "the destination QEMU socket does not exist".into(),
        });
        round_trip(&Message::Abort {
            stream: 3,
            reason: String::new(),
        });
    }

    #[test]
    fn a_filled_data_header_decodes() {
        let mut payload = vec![0u8; HEADER_BYTES + 3];
        payload[HEADER_BYTES..].copy_from_slice(b"abc");
        assert!(fill_data_header(&mut payload, 42));
        assert_eq!(
            decode(&payload).unwrap(),
            Message::Data {
                stream: 42,
                bytes: b"abc"
            }
        );
        assert!(!fill_data_header(&mut [0u8; HEADER_BYTES], 1));
        assert!(!fill_data_header(&mut [0u8; 2], 1));
        assert!(!fill_data_header(
            &mut vec![0u8; HEADER_BYTES + DATA_BYTES_MAX + 1],
            1
        ));
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(ABORT_REASON_BYTES_MAX);
        let bytes = Message::Abort { stream: 1, reason }.encode();
        let Message::Abort { reason, .. } = decode(&bytes).unwrap() else {
            panic!("not an abort");
        };
        assert!(reason.len() <= ABORT_REASON_BYTES_MAX);
        assert!(reason.len() >= ABORT_REASON_BYTES_MAX - 1);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let with = |code: u8, body: &[u8]| {
            let mut p = vec![code, 1, 0, 0, 0];
            p.extend_from_slice(body);
            p
        };
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (vec![], ProtocolError::Short { len: 0 }),
            (vec![TYPE_DATA, 1, 0, 0], ProtocolError::Short { len: 4 }),
            (with(0, b""), ProtocolError::Type { code: 0 }),
            (with(5, b"x"), ProtocolError::Type { code: 5 }),
            (with(0xFF, b""), ProtocolError::Type { code: 0xFF }),
            (with(TYPE_START, b""), ProtocolError::StartLength { len: 0 }),
            (
                with(TYPE_START, b"\x01\x01"),
                ProtocolError::StartLength { len: 2 },
            ),
            (with(TYPE_DATA, b""), ProtocolError::DataLength { len: 0 }),
            (
                with(TYPE_DATA, &[0; DATA_BYTES_MAX + 1]),
                ProtocolError::DataLength {
                    len: DATA_BYTES_MAX + 1,
                },
            ),
            (with(TYPE_END, b"x"), ProtocolError::EndLength { len: 1 }),
            (
                with(TYPE_ABORT, &[b'x'; ABORT_REASON_BYTES_MAX + 1]),
                ProtocolError::ReasonLength {
                    len: ABORT_REASON_BYTES_MAX + 1,
                },
            ),
            (with(TYPE_ABORT, b"\xFF\xFE"), ProtocolError::ReasonUtf8),
        ];
        for (payload, expected) in cases {
            assert_eq!(decode(&payload), Err(expected), "{payload:?}");
        }
    }

    #[test]
    fn random_payloads_never_panic() {
        // A small deterministic generator (xorshift): every length up to a few headers and
        // every type byte, including the valid ones with random bodies.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let payload: Vec<u8> = (0..len).map(|_| (next() % 7) as u8).collect();
            if let Ok(message) = decode(&payload) {
                // Whatever decodes encodes back to the same bytes.
                assert_eq!(message.encode(), payload);
            }
        }
    }
}
