//! The migration's own messages between the two engines, on the link's Control class beside
//! the replication messages ([`crate::replication::wire`]). They share that encoding's
//! 32-byte header (a type byte, seven zero bytes, three little-endian u64 fields) and use
//! type bytes of their own ([`FIRST_TYPE`] and up), so a receiver tells them apart by the
//! first byte alone ([`is_migration`]) and the replication state machines never see them.
//!
//! The conversation (`docs/migration.md`, "The switchover protocol"):
//!
//! ```text
//! source                                  destination
//!   Offer { id, vmm }        ──────▶        point the VMM at its incoming socket,
//!                                           start the memory stream's end
//!                            ◀──────        Ready { id }   or   Failed { id, reason }
//!   (memory stream, pre-switchover, disk drained and demoted, migrate-continue)
//!   Commit { id }            ──────▶        record the commit durably, promote, resume
//!                            ◀──────        Committed { id }   or   Refused { id, reason }
//!   Abort { id, reason }     ──────▶        (any time before Commit) discard
//! ```
//!
//! `Commit` is idempotent: a source in doubt sends it again on every new session until it
//! gets an answer, and the destination answers from its durable record.

use thiserror::Error;

/// Bytes of the fixed part, as in the replication encoding.
pub const HEADER_BYTES: usize = 32;

/// Longest text a message carries (a reason, a VMM address): a reason is a sentence, and a
/// Unix socket path is at most 108 bytes.
pub const TEXT_BYTES_MAX: usize = 1024;

/// The first migration type byte; replication uses 1 to 30.
pub const FIRST_TYPE: u8 = 50;

const T_OFFER: u8 = 50;
const T_READY: u8 = 51;
const T_FAILED: u8 = 52;
const T_ABORT: u8 = 53;
const T_COMMIT: u8 = 54;
const T_COMMITTED: u8 = 55;
const T_REFUSED: u8 = 56;
const LAST_TYPE: u8 = T_REFUSED;

/// A migration id: the source picks a random one per attempt.
pub type MigrationId = u64;

/// One migration message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationMessage {
    /// Source → destination: get ready to receive migration `id`. `vmm` names the
    /// destination's VMM (`qemu:PATH`) when the source forwards it (one-machine setups);
    /// empty: the destination engine's own `--vmm`.
    Offer { id: MigrationId, vmm: String },
    /// Destination → source: its VMM listens and its end of the memory stream runs.
    Ready { id: MigrationId },
    /// Destination → source: its side of `id` failed and is discarded; it will not commit.
    Failed { id: MigrationId, reason: String },
    /// Source → destination: give up `id` (before any `Commit`).
    Abort { id: MigrationId, reason: String },
    /// Source → destination: the source VM is stopped for good unless refused; run it.
    Commit { id: MigrationId },
    /// Destination → source: the commit of `id` is recorded; the VM runs here.
    Committed { id: MigrationId },
    /// Destination → source: `id` will never commit here (recorded before it is sent).
    Refused { id: MigrationId, reason: String },
}

/// A migration message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MigrationWireError {
    #[error("migration message of {len} bytes is shorter than the {HEADER_BYTES}-byte header")]
    Short { len: usize },
    #[error("unknown migration message type {code}")]
    Type { code: u8 },
    #[error("migration message type {code} has non-zero padding or unused fields")]
    Malformed { code: u8 },
    #[error("migration message carries {len} bytes of text, more than {TEXT_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("migration message type {code} carries text that is not UTF-8")]
    NotUtf8 { code: u8 },
    #[error("migration message type {code} carries text where it takes none")]
    UnexpectedText { code: u8 },
}

/// Whether a Control payload is a migration message (by its type byte).
pub fn is_migration(bytes: &[u8]) -> bool {
    bytes
        .first()
        .is_some_and(|&b| (FIRST_TYPE..=LAST_TYPE).contains(&b))
}

impl MigrationMessage {
    /// The migration this message is about.
    pub fn id(&self) -> MigrationId {
        match self {
            MigrationMessage::Offer { id, .. }
            | MigrationMessage::Ready { id }
            | MigrationMessage::Failed { id, .. }
            | MigrationMessage::Abort { id, .. }
            | MigrationMessage::Commit { id }
            | MigrationMessage::Committed { id }
            | MigrationMessage::Refused { id, .. } => *id,
        }
    }

    /// The encoding: header (type, id), then the text if the type has one. Text longer
    /// than [`TEXT_BYTES_MAX`] is cut at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let (code, text) = match self {
            MigrationMessage::Offer { vmm, .. } => (T_OFFER, vmm.as_str()),
            MigrationMessage::Ready { .. } => (T_READY, ""),
            MigrationMessage::Failed { reason, .. } => (T_FAILED, reason.as_str()),
            MigrationMessage::Abort { reason, .. } => (T_ABORT, reason.as_str()),
            MigrationMessage::Commit { .. } => (T_COMMIT, ""),
            MigrationMessage::Committed { .. } => (T_COMMITTED, ""),
            MigrationMessage::Refused { reason, .. } => (T_REFUSED, reason.as_str()),
        };
        let text = truncate(text, TEXT_BYTES_MAX);
        let mut out = Vec::with_capacity(HEADER_BYTES + text.len());
        out.push(code);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.id().to_le_bytes());
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Decodes one message; every byte is accounted for.
    pub fn decode(bytes: &[u8]) -> Result<MigrationMessage, MigrationWireError> {
        if bytes.len() < HEADER_BYTES {
            return Err(MigrationWireError::Short { len: bytes.len() });
        }
        let code = bytes[0];
        if bytes[1..8].iter().any(|&b| b != 0) || bytes[16..32].iter().any(|&b| b != 0) {
            return Err(MigrationWireError::Malformed { code });
        }
        let mut id = [0; 8];
        id.copy_from_slice(&bytes[8..16]);
        let id = u64::from_le_bytes(id);
        let rest = &bytes[HEADER_BYTES..];
        if rest.len() > TEXT_BYTES_MAX {
            return Err(MigrationWireError::TooLong { len: rest.len() });
        }
        let text = || {
            std::str::from_utf8(rest)
                .map(str::to_owned)
                .map_err(|_| MigrationWireError::NotUtf8 { code })
        };
        let bare = |m: MigrationMessage| {
            if rest.is_empty() {
                Ok(m)
            } else {
                Err(MigrationWireError::UnexpectedText { code })
            }
        };
        match code {
            T_OFFER => Ok(MigrationMessage::Offer { id, vmm: text()? }),
            T_READY => bare(MigrationMessage::Ready { id }),
            T_FAILED => Ok(MigrationMessage::Failed {
                id,
                reason: text()?,
            }),
            T_ABORT => Ok(MigrationMessage::Abort {
                id,
                reason: text()?,
            }),
            T_COMMIT => bare(MigrationMessage::Commit { id }),
            T_COMMITTED => bare(MigrationMessage::Committed { id }),
            T_REFUSED => Ok(MigrationMessage::Refused {
                id,
                reason: text()?,
            }),
            code => Err(MigrationWireError::Type { code }),
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn all() -> Vec<MigrationMessage> {
        vec![
            MigrationMessage::Offer {
                id: 7,
                vmm: "qemu:/run/vm/qmp.sock".into(),
            },
            MigrationMessage::Offer {
                id: u64::MAX,
                vmm: String::new(),
            },
            MigrationMessage::Ready { id: 1 },
            MigrationMessage::Failed {
                id: 2,
                reason: "the VMM is not waiting for a migration".into(),
            },
            MigrationMessage::Abort {
                id: 3,
                reason: "cancelled".into(),
            },
            MigrationMessage::Commit { id: 4 },
            MigrationMessage::Committed { id: 5 },
            MigrationMessage::Refused {
                id: 6,
                reason: "déjà refusé".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_is_recognised() {
        for m in all() {
            let bytes = m.encode();
            assert!(is_migration(&bytes), "{m:?}");
            assert_eq!(MigrationMessage::decode(&bytes), Ok(m.clone()));
        }
    }

    #[test]
    fn replication_messages_are_not_migration_messages() {
        use crate::replication::wire::Message;
        for m in [
            Message::Welcome,
            Message::Applied { seq: 9 },
            Message::Unsynced,
        ] {
            assert!(!is_migration(&m.encode()), "{m:?}");
        }
        // The batch type (30) and everything below FIRST_TYPE is replication's.
        assert!(!is_migration(&[30; 40]));
        assert!(!is_migration(&[]));
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let good = MigrationMessage::Commit { id: 1 }.encode();
        assert_eq!(
            MigrationMessage::decode(&good[..31]),
            Err(MigrationWireError::Short { len: 31 })
        );
        let mut padding = good.clone();
        padding[3] = 1;
        assert_eq!(
            MigrationMessage::decode(&padding),
            Err(MigrationWireError::Malformed { code: T_COMMIT })
        );
        let mut unused = good.clone();
        unused[20] = 1;
        assert_eq!(
            MigrationMessage::decode(&unused),
            Err(MigrationWireError::Malformed { code: T_COMMIT })
        );
        let mut text = good.clone();
        text.push(b'x');
        assert_eq!(
            MigrationMessage::decode(&text),
            Err(MigrationWireError::UnexpectedText { code: T_COMMIT })
        );
        let mut unknown = good.clone();
        unknown[0] = 57;
        assert_eq!(
            MigrationMessage::decode(&unknown),
            Err(MigrationWireError::Type { code: 57 })
        );
        let mut long = MigrationMessage::Abort {
            id: 1,
            reason: String::new(),
        }
        .encode();
        long.extend(std::iter::repeat_n(b'a', TEXT_BYTES_MAX + 1));
        assert_eq!(
            MigrationMessage::decode(&long),
            Err(MigrationWireError::TooLong {
                len: TEXT_BYTES_MAX + 1
            })
        );
        let mut bad_utf8 = MigrationMessage::Abort {
            id: 1,
            reason: String::new(),
        }
        .encode();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            MigrationMessage::decode(&bad_utf8),
            Err(MigrationWireError::NotUtf8 { code: T_ABORT })
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(TEXT_BYTES_MAX);
        let m = MigrationMessage::Refused { id: 1, reason };
        let MigrationMessage::Refused { reason, .. } =
            MigrationMessage::decode(&m.encode()).unwrap()
        else {
            panic!("type changed");
        };
        assert_eq!(reason.len(), TEXT_BYTES_MAX);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
