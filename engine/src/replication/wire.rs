//! The replication messages, carried as payloads of the link's classes (Control, Mirror,
//! Bulk), and their encoding: a one-byte type, fixed little-endian fields, then the data.
//! Everything decoded here comes from the peer and is checked before it is acted on
//! (lengths here, ranges against the disk in [`super::dest`]).

use thiserror::Error;

/// Bytes of the fixed part of every message: type, padding, and up to three u64 fields.
pub const HEADER_BYTES: usize = 32;

/// Most data one message carries: half of the link's largest frame (1 MiB), so a chunk
/// message with its header always fits in one frame.
pub const DATA_BYTES_MAX: usize = 512 << 10;

/// Bytes of the disk and source identities.
pub const ID_BYTES: usize = 16;

/// Bytes of one chunk digest in a [`Message::VerifyReply`] (SHA-256).
pub const DIGEST_BYTES: usize = 32;

/// A chunk's digest, as [`super::verify`] computes it.
pub type Digest = [u8; DIGEST_BYTES];

/// Chunks one [`Message::VerifyRequest`] may name, at most: 64 chunks are 32 MiB of disk
/// that the destination reads and hashes before it applies the next mirror write, about
/// 30 ms at a fast disk's rate, and their digests (2 KiB) fit a reply many times over. The
/// source asks for fewer ([`super::verify::VERIFY_BATCH_CHUNKS`]); this is the bound a
/// hostile peer meets.
pub const VERIFY_CHUNKS_MAX: u64 = 64;

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source → destination, first on every session: who is sending which disk.
    Hello {
        /// The disk's identity: the destination only accepts the disk it was set up for.
        disk_id: [u8; ID_BYTES],
        /// The source engine's identity: one destination takes one source at a time.
        source_id: [u8; ID_BYTES],
        /// The source disk's size; the destination's must be at least this.
        disk_bytes: u64,
        /// The bulk copy's unit.
        chunk_bytes: u64,
    },
    /// Destination → source: the Hello is accepted; bulk and mirror may flow.
    Welcome,
    /// Destination → source: the Hello is refused; nothing was written.
    Refuse(RefuseReason),
    /// Source → destination (Mirror): guest data `data` now lives at `offset`. A write
    /// larger than [`DATA_BYTES_MAX`] travels as several messages with the same `seq`.
    Write {
        seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Source → destination (Mirror): `len` bytes at `offset` now read as zeros (write
    /// zeroes or discard).
    Zero { seq: u64, offset: u64, len: u64 },
    /// Source → destination (Bulk): chunk `index` as read after every write up to `seq`
    /// completed; `data` is the whole chunk, or empty when it reads as zeros.
    Chunk { index: u64, seq: u64, data: Vec<u8> },
    /// Destination → source: every mirror message up to `seq` is applied and durable.
    Applied { seq: u64 },
    /// Destination → source: chunk `index` (sent with snapshot `seq`) is applied and
    /// durable.
    ChunkDone { index: u64, seq: u64 },
    /// Destination → source: chunk `index` arrived older than a mirror write already
    /// applied there, so it was dropped; copy it again.
    Redo { index: u64 },
    /// Source → destination (Mirror, so after every mirror write up to `seq`): every chunk
    /// is copied and confirmed, so once the writes up to `seq` are applied the replica is
    /// consistent (a state the source's disk was in). `last`: the source is demoted (its
    /// disk fenced) and `seq` is its last write: the replica is complete. `chunks`: the
    /// chunks sent on this session so far, so the destination can tell a chunk sent after
    /// this (on the unordered Bulk class) that overtook it.
    Synced { seq: u64, last: bool, chunks: u64 },
    /// Destination → source, right after `Welcome`: which replica this is. A replica keeps
    /// its id across restarts (it is stored beside the disk); a source that synced a
    /// replica with another id copies everything again (the disk may have been replaced).
    ReplicaId { generation: [u8; ID_BYTES] },
    /// Source → destination (Mirror, so before every later mirror write): a write went to
    /// the dirty bitmap instead of the mirror, so the replica is no longer a state the
    /// source was in until the next `Synced`.
    Unsynced,
    /// Source → destination (Mirror, so it is applied after every mirror write sent
    /// before it): hash chunks `first..first + count` as they are now and answer with
    /// `VerifyReply { id, .. }`. At most [`VERIFY_CHUNKS_MAX`] chunks.
    VerifyRequest { id: u64, first: u64, count: u64 },
    /// Destination → source (Control): the digests of chunks `first..` of request `id`, one
    /// per chunk, in order.
    VerifyReply {
        id: u64,
        first: u64,
        digests: Vec<Digest>,
    },
}

/// Why a destination refuses a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[repr(u8)]
pub enum RefuseReason {
    /// The destination's disk is smaller than the source's.
    #[error("the destination disk is smaller than the source disk")]
    DiskTooSmall = 1,
    /// The source claims another disk than the one this destination replicates.
    #[error("the source sends another disk than the one this destination holds")]
    WrongDisk = 2,
    /// Another source is already replicating to this destination.
    #[error("another source is already replicating to this destination")]
    Busy = 3,
    /// The chunk size is not one this destination accepts.
    #[error("unsupported chunk size")]
    ChunkSize = 4,
    /// The destination was promoted: it is no longer a replica.
    #[error("the destination was promoted and takes no more replication")]
    Promoted = 5,
}

impl RefuseReason {
    fn from_code(code: u8) -> Option<RefuseReason> {
        [
            RefuseReason::DiskTooSmall,
            RefuseReason::WrongDisk,
            RefuseReason::Busy,
            RefuseReason::ChunkSize,
            RefuseReason::Promoted,
        ]
        .into_iter()
        .find(|r| *r as u8 == code)
    }
}

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than its fixed part.
    #[error("message of {len} bytes is shorter than the {HEADER_BYTES}-byte header")]
    Short { len: usize },
    /// An unknown type byte.
    #[error("unknown message type {code}")]
    Type { code: u8 },
    /// Padding or unused fields not zero, or data where the type carries none.
    #[error("message type {code} has non-zero padding or trailing bytes")]
    Malformed { code: u8 },
    /// More data than [`DATA_BYTES_MAX`].
    #[error("message carries {len} data bytes, more than {DATA_BYTES_MAX}")]
    TooLong { len: usize },
    /// An unknown refusal reason.
    #[error("unknown refusal reason {code}")]
    Reason { code: u8 },
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSE: u8 = 3;
const T_WRITE: u8 = 4;
const T_ZERO: u8 = 5;
const T_CHUNK: u8 = 6;
const T_APPLIED: u8 = 7;
const T_CHUNK_DONE: u8 = 8;
const T_REDO: u8 = 9;
const T_SYNCED: u8 = 20;
const T_UNSYNCED: u8 = 21;
const T_REPLICA_ID: u8 = 22;
const T_VERIFY_REQUEST: u8 = 10;
const T_VERIFY_REPLY: u8 = 11;

fn header(code: u8, a: u64, b: u64, c: u64, extra: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + extra);
    out.push(code);
    out.extend_from_slice(&[0; 7]);
    for v in [a, b, c] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

impl Message {
    /// The encoding: the fixed header, then the data (or the Hello's identities).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Hello {
                disk_id,
                source_id,
                disk_bytes,
                chunk_bytes,
            } => {
                let mut out = header(T_HELLO, *disk_bytes, *chunk_bytes, 0, 2 * ID_BYTES);
                out.extend_from_slice(disk_id);
                out.extend_from_slice(source_id);
                out
            }
            Message::Welcome => header(T_WELCOME, 0, 0, 0, 0),
            Message::Refuse(reason) => header(T_REFUSE, *reason as u64, 0, 0, 0),
            Message::Write { seq, offset, data } => {
                let mut out = header(T_WRITE, *seq, *offset, 0, data.len());
                out.extend_from_slice(data);
                out
            }
            Message::Zero { seq, offset, len } => header(T_ZERO, *seq, *offset, *len, 0),
            Message::Chunk { index, seq, data } => {
                let mut out = header(T_CHUNK, *index, *seq, 0, data.len());
                out.extend_from_slice(data);
                out
            }
            Message::Applied { seq } => header(T_APPLIED, *seq, 0, 0, 0),
            Message::ChunkDone { index, seq } => header(T_CHUNK_DONE, *index, *seq, 0, 0),
            Message::Redo { index } => header(T_REDO, *index, 0, 0, 0),
            Message::Synced { seq, last, chunks } => {
                header(T_SYNCED, *seq, u64::from(*last), *chunks, 0)
            }
            Message::Unsynced => header(T_UNSYNCED, 0, 0, 0, 0),
            Message::ReplicaId { generation } => {
                let mut out = header(T_REPLICA_ID, 0, 0, 0, ID_BYTES);
                out.extend_from_slice(generation);
                out
            }
            Message::VerifyRequest { id, first, count } => {
                header(T_VERIFY_REQUEST, *id, *first, *count, 0)
            }
            Message::VerifyReply { id, first, digests } => {
                let mut out = header(T_VERIFY_REPLY, *id, *first, 0, digests.len() * DIGEST_BYTES);
                for d in digests {
                    out.extend_from_slice(d);
                }
                out
            }
        }
    }

    /// Decodes one message; every byte is accounted for.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() < HEADER_BYTES {
            return Err(WireError::Short { len: bytes.len() });
        }
        let code = bytes[0];
        let field = |i: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(b)
        };
        let (a, b, c) = (field(0), field(1), field(2));
        let rest = &bytes[HEADER_BYTES..];
        let malformed = WireError::Malformed { code };
        if bytes[1..8].iter().any(|&x| x != 0) {
            return Err(malformed);
        }
        if rest.len() > DATA_BYTES_MAX {
            return Err(WireError::TooLong { len: rest.len() });
        }
        let bare = |fields_used: usize| {
            let unused_zero = [a, b, c][fields_used..].iter().all(|&v| v == 0);
            if rest.is_empty() && unused_zero {
                Ok(())
            } else {
                Err(WireError::Malformed { code })
            }
        };
        Ok(match code {
            T_HELLO => {
                if rest.len() != 2 * ID_BYTES || c != 0 {
                    return Err(malformed);
                }
                let mut disk_id = [0; ID_BYTES];
                let mut source_id = [0; ID_BYTES];
                disk_id.copy_from_slice(&rest[..ID_BYTES]);
                source_id.copy_from_slice(&rest[ID_BYTES..]);
                Message::Hello {
                    disk_id,
                    source_id,
                    disk_bytes: a,
                    chunk_bytes: b,
                }
            }
            T_WELCOME => bare(0).map(|()| Message::Welcome)?,
            T_REFUSE => {
                bare(1)?;
                let code = u8::try_from(a).map_err(|_| WireError::Reason { code: 0 })?;
                Message::Refuse(RefuseReason::from_code(code).ok_or(WireError::Reason { code })?)
            }
            T_WRITE => {
                if rest.is_empty() || c != 0 {
                    return Err(malformed);
                }
                Message::Write {
                    seq: a,
                    offset: b,
                    data: rest.to_vec(),
                }
            }
            T_ZERO => bare(3).map(|()| Message::Zero {
                seq: a,
                offset: b,
                len: c,
            })?,
            T_CHUNK => {
                if c != 0 {
                    return Err(malformed);
                }
                Message::Chunk {
                    index: a,
                    seq: b,
                    data: rest.to_vec(),
                }
            }
            T_APPLIED => bare(1).map(|()| Message::Applied { seq: a })?,
            T_CHUNK_DONE => bare(2).map(|()| Message::ChunkDone { index: a, seq: b })?,
            T_REDO => bare(1).map(|()| Message::Redo { index: a })?,
            T_SYNCED => {
                bare(3)?;
                if b > 1 {
                    return Err(malformed);
                }
                Message::Synced {
                    seq: a,
                    last: b == 1,
                    chunks: c,
                }
            }
            T_UNSYNCED => bare(0).map(|()| Message::Unsynced)?,
            T_REPLICA_ID => {
                if rest.len() != ID_BYTES || a != 0 || b != 0 || c != 0 {
                    return Err(malformed);
                }
                let mut generation = [0; ID_BYTES];
                generation.copy_from_slice(rest);
                Message::ReplicaId { generation }
            }
            T_VERIFY_REQUEST => bare(3).map(|()| Message::VerifyRequest {
                id: a,
                first: b,
                count: c,
            })?,
            T_VERIFY_REPLY => {
                let count = rest.len() / DIGEST_BYTES;
                if c != 0
                    || rest.is_empty()
                    || !rest.len().is_multiple_of(DIGEST_BYTES)
                    || count as u64 > VERIFY_CHUNKS_MAX
                {
                    return Err(malformed);
                }
                let digests = rest
                    .chunks_exact(DIGEST_BYTES)
                    .map(|d| {
                        let mut digest = [0; DIGEST_BYTES];
                        digest.copy_from_slice(d);
                        digest
                    })
                    .collect();
                Message::VerifyReply {
                    id: a,
                    first: b,
                    digests,
                }
            }
            code => return Err(WireError::Type { code }),
        })
    }
}

/// A batch carries this many bytes of messages at most: a quarter of a link frame, so a
/// batch never waits long to fill, and a chunk-sized message (which travels alone) never
/// shares a frame.
pub const BATCH_BYTES_MAX: usize = 256 << 10;

/// Messages in one batch at most: 4096 zero-length writes' worth of headers; a bound on
/// the work one payload can ask for.
pub const BATCH_MESSAGES_MAX: usize = 4096;

const T_BATCH: u8 = 30;

/// Bytes before each message in a batch: its length, u32 little-endian.
const BATCH_LEN_BYTES: usize = 4;

/// Several small messages of one class in one link payload: one send, one frame, one
/// credit return instead of many (a 4 KiB write costs about as much to send alone as to
/// encode). Order inside the batch is the order they were pushed.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    buf: Vec<u8>,
    count: usize,
}

impl BatchEncoder {
    /// Whether `message`, encoded as `bytes`, fits in the batch as it is.
    pub fn fits(&self, bytes: &[u8]) -> bool {
        let used = self.buf.len().saturating_sub(HEADER_BYTES);
        self.count < BATCH_MESSAGES_MAX && used + BATCH_LEN_BYTES + bytes.len() <= BATCH_BYTES_MAX
    }

    /// Adds an encoded message; the caller checked [`Self::fits`].
    pub fn push(&mut self, bytes: &[u8]) {
        if self.buf.is_empty() {
            self.buf = header(T_BATCH, 0, 0, 0, BATCH_BYTES_MAX);
        }
        self.buf
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(bytes);
        self.count += 1;
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The payload to send, and the encoder emptied.
    pub fn take(&mut self) -> Vec<u8> {
        let count = std::mem::take(&mut self.count) as u64;
        let mut out = std::mem::take(&mut self.buf);
        if out.len() >= 16 {
            out[8..16].copy_from_slice(&count.to_le_bytes());
        }
        out
    }
}

/// Decodes a payload: one message, or every message of a batch, in order.
pub fn decode_payload(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    if bytes.first() != Some(&T_BATCH) {
        return Message::decode(bytes).map(|m| vec![m]);
    }
    let malformed = WireError::Malformed { code: T_BATCH };
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Short { len: bytes.len() });
    }
    let count = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| malformed.clone())?);
    if bytes[1..8].iter().any(|&x| x != 0) || bytes[16..32].iter().any(|&x| x != 0) {
        return Err(malformed);
    }
    let mut rest = &bytes[HEADER_BYTES..];
    if rest.len() > BATCH_BYTES_MAX {
        return Err(WireError::TooLong { len: rest.len() });
    }
    if count == 0 || count > BATCH_MESSAGES_MAX as u64 {
        return Err(malformed);
    }
    let mut out = Vec::with_capacity(count as usize);
    while !rest.is_empty() {
        if rest.len() < BATCH_LEN_BYTES {
            return Err(malformed);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[BATCH_LEN_BYTES..];
        if len > rest.len() || rest.first() == Some(&T_BATCH) {
            return Err(malformed);
        }
        out.push(Message::decode(&rest[..len])?);
        rest = &rest[len..];
    }
    if out.len() as u64 != count {
        return Err(malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                disk_id: [1; ID_BYTES],
                source_id: [2; ID_BYTES],
                disk_bytes: 1 << 40,
                chunk_bytes: 512 << 10,
            },
            Message::Welcome,
            Message::Refuse(RefuseReason::Busy),
            Message::Write {
                seq: 7,
                offset: 4096,
                data: vec![9; 4096],
            },
            Message::Zero {
                seq: 8,
                offset: 0,
                len: 1 << 20,
            },
            Message::Chunk {
                index: 3,
                seq: 8,
                data: vec![5; 512 << 10],
            },
            Message::Chunk {
                index: 4,
                seq: 8,
                data: Vec::new(),
            },
            Message::Applied { seq: 8 },
            Message::ChunkDone { index: 3, seq: 8 },
            Message::Redo { index: 3 },
            Message::Synced {
                seq: 8,
                last: false,
                chunks: 3,
            },
            Message::Synced {
                seq: 9,
                last: true,
                chunks: 0,
            },
            Message::Unsynced,
            Message::ReplicaId {
                generation: [3; ID_BYTES],
            },
            Message::VerifyRequest {
                id: 1,
                first: 5,
                count: VERIFY_CHUNKS_MAX,
            },
            Message::VerifyReply {
                id: 1,
                first: 5,
                digests: vec![[3; DIGEST_BYTES], [4; DIGEST_BYTES]],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn hostile_bytes_are_errors() {
        assert_eq!(Message::decode(&[4; 10]), Err(WireError::Short { len: 10 }));
        let mut bad = Message::Welcome.encode();
        bad[0] = 99;
        assert_eq!(Message::decode(&bad), Err(WireError::Type { code: 99 }));
        let mut padded = Message::Applied { seq: 1 }.encode();
        padded[3] = 1;
        assert!(matches!(
            Message::decode(&padded),
            Err(WireError::Malformed { .. })
        ));
        let mut trailing = Message::Redo { index: 1 }.encode();
        trailing.push(0);
        assert!(matches!(
            Message::decode(&trailing),
            Err(WireError::Malformed { .. })
        ));
        let empty_write = header(T_WRITE, 1, 0, 0, 0);
        assert!(matches!(
            Message::decode(&empty_write),
            Err(WireError::Malformed { .. })
        ));
        let mut huge = header(T_CHUNK, 0, 0, 0, 0);
        huge.resize(HEADER_BYTES + DATA_BYTES_MAX + 1, 0);
        assert!(matches!(
            Message::decode(&huge),
            Err(WireError::TooLong { .. })
        ));
        let synced = header(T_SYNCED, 1, 2, 0, 0);
        assert!(matches!(
            Message::decode(&synced),
            Err(WireError::Malformed { .. })
        ));
        let refuse = header(T_REFUSE, 77, 0, 0, 0);
        assert_eq!(
            Message::decode(&refuse),
            Err(WireError::Reason { code: 77 })
        );
    }

    #[test]
    fn hostile_verify_messages_are_errors() {
        let malformed = |bytes: &[u8]| {
            assert!(
                matches!(Message::decode(bytes), Err(WireError::Malformed { .. })),
                "{bytes:?}"
            );
        };
        // A request carries no data.
        let mut request = header(T_VERIFY_REQUEST, 1, 0, 4, 0);
        request.push(0);
        malformed(&request);
        // A reply holds whole digests, at least one, at most VERIFY_CHUNKS_MAX.
        let reply = |digest_bytes: usize, c: u64| {
            let mut out = header(T_VERIFY_REPLY, 1, 0, c, digest_bytes);
            out.resize(HEADER_BYTES + digest_bytes, 7);
            out
        };
        malformed(&reply(0, 0));
        malformed(&reply(DIGEST_BYTES - 1, 0));
        malformed(&reply(DIGEST_BYTES + 1, 0));
        malformed(&reply(DIGEST_BYTES, 1));
        malformed(&reply((VERIFY_CHUNKS_MAX as usize + 1) * DIGEST_BYTES, 0));
        let most = reply(VERIFY_CHUNKS_MAX as usize * DIGEST_BYTES, 0);
        let Ok(Message::VerifyReply { digests, .. }) = Message::decode(&most) else {
            panic!("a full reply must decode");
        };
        assert_eq!(digests.len() as u64, VERIFY_CHUNKS_MAX);
        assert_eq!(digests[0], [7; DIGEST_BYTES]);
    }

    #[test]
    fn a_batch_round_trips_in_order_and_hostile_batches_are_errors() {
        let mut b = BatchEncoder::default();
        let messages: Vec<Message> = (1..=50)
            .map(|seq| Message::Write {
                seq,
                offset: seq * 4096,
                data: vec![seq as u8; 4096],
            })
            .collect();
        for m in &messages {
            let bytes = m.encode();
            assert!(b.fits(&bytes));
            b.push(&bytes);
        }
        assert_eq!(b.len(), 50);
        let payload = b.take();
        assert!(b.is_empty());
        assert_eq!(decode_payload(&payload), Ok(messages.clone()));
        // A full batch refuses what would overflow it.
        let mut full = BatchEncoder::default();
        let big = vec![0; 100 << 10];
        full.push(&big);
        full.push(&big);
        assert!(!full.fits(&big));
        // One message alone decodes as itself.
        assert_eq!(
            decode_payload(&Message::Applied { seq: 3 }.encode()),
            Ok(vec![Message::Applied { seq: 3 }])
        );
        // Wrong count, a length past the end, a nested batch, trailing bytes.
        let mut wrong_count = payload.clone();
        wrong_count[8] = 99;
        assert!(decode_payload(&wrong_count).is_err());
        let mut past_end = payload.clone();
        past_end[HEADER_BYTES] = 0xff;
        past_end[HEADER_BYTES + 1] = 0xff;
        assert!(decode_payload(&past_end).is_err());
        let mut nested = BatchEncoder::default();
        nested.push(&payload[..HEADER_BYTES + 4 + 4128]);
        assert!(decode_payload(&nested.take()).is_err());
        let mut trailing = payload;
        trailing.push(1);
        assert!(decode_payload(&trailing).is_err());
        assert!(decode_payload(&header(T_BATCH, 0, 0, 0, 0)).is_err());
    }
}
