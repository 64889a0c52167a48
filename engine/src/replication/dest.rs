//! The destination side of replication, sans-IO: it checks who is sending what, decides
//! which bytes of each mirror write and bulk chunk may land (never older data over newer,
//! see `docs/replication.md`), and what to confirm once the caller made them durable.

use thiserror::Error;

use super::wire::{Message, RefuseReason, ID_BYTES, VERIFY_CHUNKS_MAX};
use super::{chunk_count, chunk_len, ConfigError};

/// Settings of the destination's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestConfig {
    /// The disk this destination holds a replica of; `None` takes the first source's disk
    /// and holds to it from then on.
    pub disk_id: Option<[u8; ID_BYTES]>,
    /// Its size; at least the source's.
    pub disk_bytes: u64,
    /// The bulk copy's unit; the source must use the same.
    pub chunk_bytes: u64,
    /// This replica's id, told to every source after `Welcome`.
    pub generation: [u8; ID_BYTES],
    /// The source this replica belongs to, if it was bound to one before (a restart).
    pub source_id: Option<[u8; ID_BYTES]>,
    /// Promoted before (a restart): every `Hello` is refused.
    pub promoted: bool,
}

/// What the caller does to its disk, or sends back, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// Write `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// Make `len` bytes at `offset` read as zeros.
    Zero { offset: u64, len: u64 },
    /// Send this to the source on Control.
    Reply(Message),
    /// Hash `len` bytes at `offset`, chunk by chunk (the last chunk may be shorter), as
    /// they are after every action before this one, and send the digests to the source
    /// on Control as `VerifyReply { id, first, digests }`.
    Verify {
        id: u64,
        first: u64,
        offset: u64,
        len: u64,
        chunk_bytes: u64,
    },
}

/// A source message that breaks the protocol: the session is closed, nothing of the
/// message was applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DestError {
    #[error("{0} before the source was welcomed")]
    NotWelcomed(&'static str),
    #[error("{what} at {offset}+{len} is outside the source's {disk_bytes}-byte disk")]
    OutOfRange {
        what: &'static str,
        offset: u64,
        len: u64,
        disk_bytes: u64,
    },
    #[error("chunk {index} does not exist (the disk has {chunks})")]
    NoSuchChunk { index: u64, chunks: u64 },
    #[error("chunk {index} carries {len} bytes, not {expected} (or none, for zeros)")]
    ChunkLength { index: u64, len: u64, expected: u64 },
    #[error("mirror seq {seq} arrived after seq {applied}: the mirror stream is ordered")]
    OutOfOrder { seq: u64, applied: u64 },
    #[error("the source sent {0}, which only a destination sends")]
    Unexpected(&'static str),
    #[error("verify request for {count} chunks from {first}: the disk has {chunks}, a request names 1 to {VERIFY_CHUNKS_MAX}")]
    VerifyRange { first: u64, count: u64, chunks: u64 },
    #[error(
        "Synced at seq {seq} arrived after mirror seq {applied}: the mirror stream is ordered"
    )]
    SyncedBehind { seq: u64, applied: u64 },
}

/// Why a `promote` is refused (unless forced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PromoteError {
    #[error("the replica is not consistent: the copy or a resync is not finished (promote with force to take it as it is)")]
    Inconsistent,
    #[error("a source is connected and has not been demoted: it may still write (demote it first, or promote with force)")]
    SourceLive,
}

/// What a promoted replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promoted {
    /// A state the source's disk was in (every chunk copied, mirror writes applied in
    /// order); false only when forced.
    pub consistent: bool,
    /// The source was demoted and every write it made is here.
    pub complete: bool,
    /// The last mirror seq applied.
    pub applied_seq: u64,
    /// Promoted although a check refused it.
    pub forced: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestStats {
    pub mirror_bytes_applied: u64,
    /// Mirror bytes not written because a newer bulk chunk already holds them.
    pub mirror_bytes_superseded: u64,
    pub chunks_applied: u64,
    pub chunks_redone: u64,
    pub refusals: u64,
    /// Chunks hashed for the source's verify requests.
    pub chunks_hashed: u64,
}

/// The destination's replication state for one disk.
#[derive(Debug)]
pub struct ReplicaDest {
    config: DestConfig,
    /// The source this replica belongs to, once one was welcomed.
    source: Option<[u8; ID_BYTES]>,
    /// Its disk size, once welcomed.
    source_bytes: u64,
    welcomed: bool,
    promoted: bool,
    /// Per chunk: the highest mirror seq applied to any byte of it.
    mirror_seq: Vec<u64>,
    /// Per chunk: the snapshot seq of the bulk copy last applied.
    bulk_seq: Vec<u64>,
    /// The last mirror seq applied, and the last one confirmed durable.
    applied_seq: u64,
    confirmed_seq: u64,
    /// Chunks applied and not yet confirmed.
    chunks_unconfirmed: Vec<(u64, u64)>,
    /// Chunks received on this session (compared with `Synced`'s count).
    session_chunks: u64,
    /// Every chunk is copied and the mirror applied in order: a state the source was in.
    consistent: bool,
    /// The source said it is demoted and its last write is here.
    complete: bool,
    /// The seq of the last `Synced` that made the replica consistent.
    synced_seq: u64,
    stats: DestStats,
}

impl ReplicaDest {
    /// A destination that has received nothing yet.
    pub fn new(config: DestConfig) -> Result<ReplicaDest, ConfigError> {
        let chunks = chunk_count(config.disk_bytes, config.chunk_bytes)?;
        let len = usize::try_from(chunks).map_err(|_| ConfigError::TooManyChunks { chunks })?;
        Ok(ReplicaDest {
            config,
            source: config.source_id,
            source_bytes: 0,
            welcomed: false,
            promoted: config.promoted,
            mirror_seq: vec![0; len],
            bulk_seq: vec![0; len],
            applied_seq: 0,
            confirmed_seq: 0,
            chunks_unconfirmed: Vec::new(),
            session_chunks: 0,
            consistent: false,
            complete: false,
            synced_seq: 0,
            stats: DestStats::default(),
        })
    }

    /// The session ended: the next one starts with a `Hello` again.
    pub fn on_disconnected(&mut self) {
        self.welcomed = false;
    }

    /// Makes this replica a disk of its own: every later `Hello` is refused, and the
    /// session in progress ends (its next message is refused). Refused while the replica
    /// is inconsistent, or while a source that was not demoted is connected, unless
    /// `force` (disaster recovery: the source is gone, and what is here is all there is).
    pub fn promote(&mut self, force: bool) -> Result<Promoted, PromoteError> {
        if !force && !self.promoted {
            if !self.consistent {
                return Err(PromoteError::Inconsistent);
            }
            if self.welcomed && !self.complete {
                return Err(PromoteError::SourceLive);
            }
        }
        let forced = !self.promoted && (!self.consistent || (self.welcomed && !self.complete));
        self.promoted = true;
        self.welcomed = false;
        Ok(Promoted {
            consistent: self.consistent,
            complete: self.complete,
            applied_seq: self.applied_seq,
            forced,
        })
    }

    /// What must survive a restart: the disk and source this replica is bound to (once a
    /// source was welcomed) and whether it was promoted. The caller stores it beside the
    /// disk when it changes.
    pub fn identity(&self) -> (Option<[u8; ID_BYTES]>, Option<[u8; ID_BYTES]>, bool) {
        (self.config.disk_id, self.source, self.promoted)
    }

    /// Whether [`Self::promote`] succeeded.
    pub fn is_promoted(&self) -> bool {
        self.promoted
    }

    /// Whether the replica is a state the source's disk was in.
    pub fn is_consistent(&self) -> bool {
        self.consistent
    }

    /// Whether the source was demoted and every write it made is here.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// When consistent: the seq of the source's state the replica holds (every write up
    /// to it; when it is the last mirror write applied, that write may be partly applied,
    /// as a crash would leave a write in flight).
    pub fn consistent_at(&self) -> Option<u64> {
        self.consistent
            .then(|| self.synced_seq.max(self.applied_seq))
    }

    /// One message from the source.
    pub fn on_message(&mut self, message: Message) -> Result<Vec<Apply>, DestError> {
        match message {
            Message::Hello {
                disk_id,
                source_id,
                disk_bytes,
                chunk_bytes,
            } => {
                let answer = self.on_hello(disk_id, source_id, disk_bytes, chunk_bytes);
                let mut out = vec![Apply::Reply(answer.clone())];
                if answer == Message::Welcome {
                    let generation = self.config.generation;
                    out.push(Apply::Reply(Message::ReplicaId { generation }));
                }
                Ok(out)
            }
            Message::Write { seq, offset, data } => {
                let len = data.len() as u64;
                self.check_mirror("Write", seq, offset, len)?;
                Ok(self.mirror(seq, offset, len, Some(&data)))
            }
            Message::Zero { seq, offset, len } => {
                self.check_mirror("Zero", seq, offset, len)?;
                Ok(self.mirror(seq, offset, len, None))
            }
            Message::Chunk { index, seq, data } => self.chunk(index, seq, data),
            Message::VerifyRequest { id, first, count } => self.verify(id, first, count),
            Message::Synced { seq, last, chunks } => {
                if !self.welcomed {
                    return Err(DestError::NotWelcomed("Synced"));
                }
                if seq < self.applied_seq {
                    return Err(DestError::SyncedBehind {
                        seq,
                        applied: self.applied_seq,
                    });
                }
                // A chunk sent after this Synced may have overtaken it on the Bulk class:
                // then the counts differ and the next Synced decides.
                self.consistent = chunks == self.session_chunks;
                self.complete = last && self.consistent;
                self.synced_seq = seq;
                Ok(Vec::new())
            }
            Message::Unsynced => {
                if !self.welcomed {
                    return Err(DestError::NotWelcomed("Unsynced"));
                }
                self.consistent = false;
                self.complete = false;
                Ok(Vec::new())
            }
            Message::Welcome => Err(DestError::Unexpected("Welcome")),
            Message::ReplicaId { .. } => Err(DestError::Unexpected("ReplicaId")),
            Message::Refuse(_) => Err(DestError::Unexpected("Refuse")),
            Message::Applied { .. } => Err(DestError::Unexpected("Applied")),
            Message::ChunkDone { .. } => Err(DestError::Unexpected("ChunkDone")),
            Message::Redo { .. } => Err(DestError::Unexpected("Redo")),
            Message::VerifyReply { .. } => Err(DestError::Unexpected("VerifyReply")),
        }
    }

    /// Everything applied so far is durable (the caller synced its disk): the
    /// confirmations to send on Control.
    pub fn on_synced(&mut self) -> Vec<Message> {
        let mut out: Vec<Message> = self
            .chunks_unconfirmed
            .drain(..)
            .map(|(index, seq)| Message::ChunkDone { index, seq })
            .collect();
        if self.applied_seq > self.confirmed_seq {
            self.confirmed_seq = self.applied_seq;
            out.push(Message::Applied {
                seq: self.applied_seq,
            });
        }
        out
    }

    /// Counters.
    pub fn stats(&self) -> DestStats {
        self.stats
    }

    fn on_hello(
        &mut self,
        disk_id: [u8; ID_BYTES],
        source_id: [u8; ID_BYTES],
        disk_bytes: u64,
        chunk_bytes: u64,
    ) -> Message {
        let refusal = if self.promoted {
            Some(RefuseReason::Promoted)
        } else if chunk_bytes != self.config.chunk_bytes {
            Some(RefuseReason::ChunkSize)
        } else if self.config.disk_id.is_some_and(|d| d != disk_id) {
            Some(RefuseReason::WrongDisk)
        } else if disk_bytes > self.config.disk_bytes {
            Some(RefuseReason::DiskTooSmall)
        } else if self.source.is_some_and(|s| s != source_id) {
            Some(RefuseReason::Busy)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.stats.refusals += 1;
            return Message::Refuse(reason);
        }
        self.source = Some(source_id);
        self.config.disk_id = Some(disk_id);
        self.source_bytes = disk_bytes;
        self.welcomed = true;
        self.session_chunks = 0;
        // Writes of the last session may be missing (they go to the source's bitmap):
        // consistent again only when the source says so.
        self.consistent = false;
        self.complete = false;
        Message::Welcome
    }

    fn check_mirror(
        &self,
        what: &'static str,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), DestError> {
        if !self.welcomed {
            return Err(DestError::NotWelcomed(what));
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.source_bytes);
        if len == 0 || end.is_none() {
            return Err(DestError::OutOfRange {
                what,
                offset,
                len,
                disk_bytes: self.source_bytes,
            });
        }
        // Pieces of one large write share a seq.
        if seq < self.applied_seq || seq == 0 {
            return Err(DestError::OutOfOrder {
                seq,
                applied: self.applied_seq,
            });
        }
        Ok(())
    }

    /// Applies a mirror write chunk by chunk: a part whose chunk holds a bulk copy taken
    /// after this write (snapshot seq at or past it) is already newer and is skipped.
    fn mirror(&mut self, seq: u64, offset: u64, len: u64, data: Option<&[u8]>) -> Vec<Apply> {
        let chunk_bytes = self.config.chunk_bytes;
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let index = at / chunk_bytes;
            let part_end = ((index + 1) * chunk_bytes).min(offset + len);
            let part = part_end - at;
            let i = index as usize;
            if seq > self.bulk_seq[i] {
                let rel = (at - offset) as usize;
                out.push(match data {
                    Some(d) => Apply::Write {
                        offset: at,
                        data: d[rel..rel + part as usize].to_vec(),
                    },
                    None => Apply::Zero {
                        offset: at,
                        len: part,
                    },
                });
                self.mirror_seq[i] = self.mirror_seq[i].max(seq);
                self.stats.mirror_bytes_applied += part;
            } else {
                self.stats.mirror_bytes_superseded += part;
            }
            at = part_end;
        }
        self.applied_seq = seq;
        out
    }

    /// A verify request: hash the named chunks as they are now. It arrives on the Mirror
    /// class, so every mirror write sent before it has been handed out already.
    fn verify(&mut self, id: u64, first: u64, count: u64) -> Result<Vec<Apply>, DestError> {
        if !self.welcomed {
            return Err(DestError::NotWelcomed("VerifyRequest"));
        }
        let chunk_bytes = self.config.chunk_bytes;
        let chunks = chunk_count(self.source_bytes, chunk_bytes).unwrap_or(0);
        let end = first.checked_add(count).filter(|&e| e <= chunks);
        if count == 0 || count > VERIFY_CHUNKS_MAX || end.is_none() {
            return Err(DestError::VerifyRange {
                first,
                count,
                chunks,
            });
        }
        self.stats.chunks_hashed += count;
        let offset = first * chunk_bytes;
        let len = ((first + count) * chunk_bytes).min(self.source_bytes) - offset;
        Ok(vec![Apply::Verify {
            id,
            first,
            offset,
            len,
            chunk_bytes,
        }])
    }

    /// Applies a bulk chunk unless a mirror write newer than its snapshot already landed
    /// in it; then the chunk is dropped and the source asked to copy it again.
    fn chunk(&mut self, index: u64, seq: u64, data: Vec<u8>) -> Result<Vec<Apply>, DestError> {
        if !self.welcomed {
            return Err(DestError::NotWelcomed("Chunk"));
        }
        let chunks = chunk_count(self.source_bytes, self.config.chunk_bytes).unwrap_or(0);
        if index >= chunks {
            return Err(DestError::NoSuchChunk { index, chunks });
        }
        let expected = chunk_len(index, self.source_bytes, self.config.chunk_bytes);
        let len = data.len() as u64;
        if len != expected && len != 0 {
            return Err(DestError::ChunkLength {
                index,
                len,
                expected,
            });
        }
        self.session_chunks += 1;
        self.consistent = false;
        self.complete = false;
        let i = index as usize;
        if seq < self.mirror_seq[i] {
            self.stats.chunks_redone += 1;
            return Ok(vec![Apply::Reply(Message::Redo { index })]);
        }
        self.chunks_unconfirmed.push((index, seq));
        if seq < self.bulk_seq[i] {
            // A copy older than one already applied (only a confused peer sends it):
            // the chunk already holds newer data.
            return Ok(Vec::new());
        }
        self.bulk_seq[i] = seq;
        self.stats.chunks_applied += 1;
        let offset = index * self.config.chunk_bytes;
        Ok(vec![if data.is_empty() {
            Apply::Zero {
                offset,
                len: expected,
            }
        } else {
            Apply::Write { offset, data }
        }])
    }
}
