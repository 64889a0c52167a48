//! The source side of replication, sans-IO: it decides, for each completed guest write,
//! whether it is mirrored or only remembered in the dirty bitmap; which chunk the bulk
//! copy reads next and under which snapshot; and what a lost session must copy again.
//! The caller reads the disk, moves the messages and reports what came back.

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

use super::verify::{self, VerifyRefusal, VerifyReport, VerifyRun};
use super::wire::{Digest, Message, RefuseReason, ID_BYTES};
use super::{chunk_count, chunk_len, ConfigError};

/// Settings of one replicated disk on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    /// The disk's identity, which the destination checks.
    pub disk_id: [u8; ID_BYTES],
    /// This engine's identity: a destination serves one source.
    pub source_id: [u8; ID_BYTES],
    /// The disk's size.
    pub disk_bytes: u64,
    /// The bulk copy's unit, see [`super::CHUNK_BYTES`].
    pub chunk_bytes: u64,
    /// Mirrored bytes the destination has not yet confirmed durable, at most; see
    /// [`super::MIRROR_BACKLOG_BYTES_MAX`].
    pub mirror_backlog_bytes_max: u64,
    /// Bulk chunks sent and not yet confirmed, at most; see [`super::BULK_INFLIGHT_MAX`].
    pub bulk_inflight_max: usize,
}

/// What became of a guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteVerdict {
    /// Send it on the Mirror class as `Write`/`Zero` with this `seq`.
    Mirror { seq: u64 },
    /// Not sent: the chunks it touched are dirty and the bulk copy carries it.
    Tracked { seq: u64 },
}

/// A chunk for the caller to read and send as `Chunk { index, seq, .. }`. The read must
/// start after this is returned (it may include newer writes; never older ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkJob {
    pub index: u64,
    pub offset: u64,
    pub len: u64,
    /// Every guest write with a `seq` up to this one completed before the read.
    pub seq: u64,
}

/// Where replication of this disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// No session.
    Disconnected,
    /// A session, waiting for the destination's answer to `Hello`.
    Connecting,
    /// The destination refused this source.
    Refused(RefuseReason),
    /// First full copy in progress.
    Copying { done_bytes: u64, total_bytes: u64 },
    /// Copying again what changed while the link was lost (or overflowed).
    Resyncing { dirty_bytes: u64, total_bytes: u64 },
    /// Every chunk copied; mirrored writes the destination has not yet confirmed.
    Behind { lag_bytes: u64 },
    /// The destination holds everything acknowledged to the guest so far.
    InSync,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    pub writes_mirrored: u64,
    pub writes_tracked: u64,
    pub bytes_mirrored: u64,
    /// Mirrored bytes the destination confirmed durable.
    pub bytes_confirmed: u64,
    pub chunks_sent: u64,
    pub chunks_redone: u64,
    /// Sessions lost with something unconfirmed, which went back to the bitmap.
    pub sessions_lost: u64,
    /// Times the destination turned out to be another replica: everything copied again.
    pub full_resyncs: u64,
}

/// A reply the source cannot have earned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SourceError {
    #[error("destination confirmed mirror seq {seq}, but the last write is {last}")]
    AppliedBeyondWritten { seq: u64, last: u64 },
    #[error("destination named chunk {index}, but the disk has {chunks}")]
    NoSuchChunk { index: u64, chunks: u64 },
    #[error("destination sent {0:?}, which only a source sends")]
    Unexpected(&'static str),
    #[error("guest write at {offset}+{len} is outside the {disk_bytes}-byte disk")]
    OutOfRange {
        offset: u64,
        len: u64,
        disk_bytes: u64,
    },
    #[error(
        "destination answered verify request {id}, which was not asked or was already answered"
    )]
    UnaskedVerify { id: u64 },
    #[error("destination answered verify request {id} for {count} chunks from {first}, not the chunks asked")]
    VerifyReplyShape { id: u64, first: u64, count: u64 },
}

#[derive(Debug)]
struct Unacked {
    seq: u64,
    first: u64,
    last: u64,
    bytes: u64,
}

/// The source's replication state for one disk.
#[derive(Debug)]
pub struct ReplicaSource {
    config: SourceConfig,
    chunks: u64,
    /// Chunks the destination may hold older than the source.
    dirty: Vec<bool>,
    dirty_count: u64,
    /// Chunks sent by bulk and not yet confirmed, with their snapshot seq.
    inflight: BTreeMap<u64, u64>,
    /// Where the bulk scan continues.
    cursor: u64,
    /// The last guest write's seq.
    seq: u64,
    unacked: VecDeque<Unacked>,
    unacked_bytes: u64,
    /// Mirrored bytes past this go to the bitmap; see [`Self::set_mirror_backlog_limit`].
    backlog_limit: u64,
    connected: bool,
    welcomed: bool,
    refused: Option<RefuseReason>,
    /// The first full copy finished once.
    copied_once: bool,
    /// What the destination was last told: `Synced` (true) or `Unsynced`/new session.
    dest_consistent: bool,
    /// The disk is fenced and every write captured: the next `Synced` is the last.
    demoted: bool,
    /// The last `Synced` (with `last` set) was sent on this session.
    last_sent: bool,
    /// Chunks sent on this session.
    session_chunks: u64,
    /// The replica id the destination gave (`ReplicaId`), once one did.
    replica: Option<[u8; ID_BYTES]>,
    stats: SourceStats,
    /// The current or last verify run.
    verify: Option<VerifyRun>,
    /// The id of the next verify request; ids are never reused, so a late answer to an
    /// abandoned run is recognised.
    verify_next_id: u64,
    /// A verify with `repair` marked chunks dirty that the destination took for copied:
    /// it must be told `Unsynced` (see [`ReplicaSource::take_repaired`]).
    repaired: bool,
}

impl ReplicaSource {
    /// A source whose destination holds nothing yet: every chunk is dirty.
    pub fn new(config: SourceConfig) -> Result<ReplicaSource, ConfigError> {
        let chunks = chunk_count(config.disk_bytes, config.chunk_bytes)?;
        if config.bulk_inflight_max == 0 {
            return Err(ConfigError::Zero("bulk_inflight_max"));
        }
        let len = usize::try_from(chunks).map_err(|_| ConfigError::TooManyChunks { chunks })?;
        Ok(ReplicaSource {
            config,
            chunks,
            dirty: vec![true; len],
            dirty_count: chunks,
            inflight: BTreeMap::new(),
            cursor: 0,
            seq: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            backlog_limit: config.mirror_backlog_bytes_max,
            connected: false,
            welcomed: false,
            refused: None,
            copied_once: false,
            dest_consistent: false,
            demoted: false,
            last_sent: false,
            session_chunks: 0,
            replica: None,
            stats: SourceStats::default(),
            verify: None,
            verify_next_id: 0,
            repaired: false,
        })
    }

    /// A session is up: send this first, on Control.
    pub fn on_connected(&mut self) -> Message {
        self.connected = true;
        self.welcomed = false;
        self.dest_consistent = false;
        self.last_sent = false;
        self.session_chunks = 0;
        Message::Hello {
            disk_id: self.config.disk_id,
            source_id: self.config.source_id,
            disk_bytes: self.config.disk_bytes,
            chunk_bytes: self.config.chunk_bytes,
        }
    }

    /// The session is gone for good (past the link's resume window): whatever the
    /// destination did not confirm goes back to the bitmap, to be copied again.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.welcomed = false;
        self.fail_verify("the replication session was lost");
        let lost = !self.inflight.is_empty() || !self.unacked.is_empty();
        let inflight = std::mem::take(&mut self.inflight);
        for index in inflight.into_keys() {
            self.mark_dirty(index);
        }
        while let Some(u) = self.unacked.pop_front() {
            for index in u.first..=u.last {
                self.mark_dirty(index);
            }
        }
        self.unacked_bytes = 0;
        self.stats.sessions_lost += u64::from(lost);
    }

    /// A guest write of `len` bytes at `offset` completed on the local disk (data,
    /// zeroes or discard alike).
    pub fn on_guest_write(&mut self, offset: u64, len: u64) -> Result<WriteVerdict, SourceError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.config.disk_bytes);
        if len == 0 || end.is_none() {
            return Err(SourceError::OutOfRange {
                offset,
                len,
                disk_bytes: self.config.disk_bytes,
            });
        }
        self.seq += 1;
        let seq = self.seq;
        let first = offset / self.config.chunk_bytes;
        let last = (offset + len - 1) / self.config.chunk_bytes;
        if let Some(v) = self.verify.as_mut() {
            v.touch(first, last);
        }
        // A write only to chunks the bulk copy has yet to read needs no mirroring.
        let all_pending =
            (first..=last).all(|i| self.dirty[i as usize] && !self.inflight.contains_key(&i));
        let room = self.unacked_bytes + len <= self.backlog_limit;
        if self.welcomed && room && !all_pending {
            self.unacked.push_back(Unacked {
                seq,
                first,
                last,
                bytes: len,
            });
            self.unacked_bytes += len;
            self.stats.writes_mirrored += 1;
            self.stats.bytes_mirrored += len;
            return Ok(WriteVerdict::Mirror { seq });
        }
        for index in first..=last {
            self.mark_dirty(index);
        }
        self.stats.writes_tracked += 1;
        Ok(WriteVerdict::Tracked { seq })
    }

    /// The next chunk to copy, if one is dirty and the in-flight bound allows.
    pub fn next_bulk(&mut self) -> Option<BulkJob> {
        if !self.welcomed
            || self.dirty_count == 0
            || self.inflight.len() >= self.config.bulk_inflight_max
        {
            return None;
        }
        let index = (0..self.chunks)
            .map(|k| (self.cursor + k) % self.chunks)
            .find(|&i| self.dirty[i as usize] && !self.inflight.contains_key(&i))?;
        self.dirty[index as usize] = false;
        self.dirty_count -= 1;
        self.inflight.insert(index, self.seq);
        self.cursor = (index + 1) % self.chunks;
        self.stats.chunks_sent += 1;
        self.session_chunks += 1;
        Some(BulkJob {
            index,
            offset: index * self.config.chunk_bytes,
            len: chunk_len(index, self.config.disk_bytes, self.config.chunk_bytes),
            seq: self.seq,
        })
    }

    /// A message from the destination.
    pub fn on_message(&mut self, message: Message) -> Result<(), SourceError> {
        match message {
            Message::Welcome => self.welcomed = self.connected,
            Message::Refuse(reason) => {
                self.refused = Some(reason);
                self.welcomed = false;
            }
            Message::Applied { seq } => {
                if seq > self.seq {
                    return Err(SourceError::AppliedBeyondWritten {
                        seq,
                        last: self.seq,
                    });
                }
                while self.unacked.front().is_some_and(|u| u.seq <= seq) {
                    if let Some(u) = self.unacked.pop_front() {
                        self.unacked_bytes -= u.bytes;
                        self.stats.bytes_confirmed += u.bytes;
                    }
                }
            }
            Message::ChunkDone { index, seq } => {
                self.check_index(index)?;
                if self.inflight.get(&index) == Some(&seq) {
                    self.inflight.remove(&index);
                }
            }
            Message::Redo { index } => {
                self.check_index(index)?;
                self.inflight.remove(&index);
                self.mark_dirty(index);
                self.stats.chunks_redone += 1;
            }
            Message::VerifyReply { id, first, digests } => {
                self.on_verify_reply(id, first, &digests)?;
            }
            Message::Hello { .. } => return Err(SourceError::Unexpected("Hello")),
            Message::Write { .. } => return Err(SourceError::Unexpected("Write")),
            Message::Zero { .. } => return Err(SourceError::Unexpected("Zero")),
            Message::Chunk { .. } => return Err(SourceError::Unexpected("Chunk")),
            Message::VerifyRequest { .. } => return Err(SourceError::Unexpected("VerifyRequest")),
            Message::Synced { .. } => return Err(SourceError::Unexpected("Synced")),
            Message::Unsynced => return Err(SourceError::Unexpected("Unsynced")),
            Message::ReplicaId { generation } => {
                if self.replica.is_some_and(|r| r != generation) {
                    // Another replica than the one synced so far (the destination's disk
                    // was replaced, or its state lost): nothing there can be trusted.
                    for index in 0..self.chunks {
                        self.mark_dirty(index);
                    }
                    self.stats.full_resyncs += 1;
                }
                self.replica = Some(generation);
            }
        }
        if self.dirty_count == 0 && self.inflight.is_empty() {
            self.copied_once = true;
        }
        Ok(())
    }

    /// Where replication stands.
    pub fn state(&self) -> SourceState {
        let total_bytes = self.config.disk_bytes;
        let pending = (self.dirty_count + self.inflight.len() as u64) * self.config.chunk_bytes;
        let pending = pending.min(total_bytes);
        if let Some(reason) = self.refused {
            SourceState::Refused(reason)
        } else if !self.connected {
            SourceState::Disconnected
        } else if !self.welcomed {
            SourceState::Connecting
        } else if pending > 0 && !self.copied_once {
            SourceState::Copying {
                done_bytes: total_bytes - pending,
                total_bytes,
            }
        } else if pending > 0 {
            SourceState::Resyncing {
                dirty_bytes: pending,
                total_bytes,
            }
        } else if self.unacked_bytes > 0 {
            SourceState::Behind {
                lag_bytes: self.unacked_bytes,
            }
        } else {
            SourceState::InSync
        }
    }

    /// The source's disk is fenced and every write it will ever make is captured and
    /// handed to this state machine: once in sync, the destination is told it is complete.
    pub fn demote(&mut self) {
        self.demoted = true;
    }

    /// Takes a [`Self::demote`] back: the source's disk will take writes again (a
    /// migration rolled back before its commit). Returns the message to send on Mirror
    /// before any later write, if the destination may believe its replica complete: it is
    /// then consistent at most, never complete, so it cannot be promoted as if the source
    /// had stopped.
    pub fn undemote(&mut self) -> Option<Message> {
        self.demoted = false;
        if !self.last_sent {
            return None;
        }
        self.last_sent = false;
        self.dest_consistent = false;
        self.welcomed.then_some(Message::Unsynced)
    }

    /// Whether [`Self::demote`] was called.
    pub fn is_demoted(&self) -> bool {
        self.demoted
    }

    /// `Synced` to send on Mirror, when the destination became consistent (every chunk
    /// copied and confirmed) since it was last told otherwise, or complete (demoted).
    pub fn take_synced(&mut self) -> Option<Message> {
        let copied = self.dirty_count == 0 && self.inflight.is_empty();
        if !self.welcomed || !copied {
            return None;
        }
        let last = self.demoted;
        if self.dest_consistent && (!last || self.last_sent) {
            return None;
        }
        self.dest_consistent = true;
        self.last_sent = last;
        Some(Message::Synced {
            seq: self.seq,
            last,
            chunks: self.session_chunks,
        })
    }

    /// `Unsynced` to send on Mirror before the next mirror write, if the destination
    /// believes it is consistent: call it when a write went to the bitmap (a `Tracked`
    /// verdict, or a capture overflow before the write about to be mirrored).
    pub fn take_unsynced(&mut self) -> Option<Message> {
        if !self.welcomed || !self.dest_consistent {
            return None;
        }
        self.dest_consistent = false;
        Some(Message::Unsynced)
    }

    /// Whether the destination accepted this session: mirror writes flow.
    pub fn is_welcomed(&self) -> bool {
        self.welcomed
    }

    /// Counters.
    pub fn stats(&self) -> SourceStats {
        self.stats
    }

    /// Mirrored bytes the destination has not confirmed: what the guest's back-pressure
    /// and the switchover's drain are computed from.
    pub fn mirror_backlog_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// Sets the backlog bound: mirrored bytes past it go to the dirty bitmap. The driver
    /// follows the downtime budget at the measured drain rate, never above the configured
    /// `mirror_backlog_bytes_max` (which bounds the memory).
    pub fn set_mirror_backlog_limit(&mut self, bytes: u64) {
        self.backlog_limit = bytes.min(self.config.mirror_backlog_bytes_max);
    }

    /// The backlog bound in force.
    pub fn mirror_backlog_limit(&self) -> u64 {
        self.backlog_limit
    }

    /// A write to chunk `index` completed without a seq of its own (its capture shard
    /// was full): the bulk copy carries it.
    pub fn mark_chunk_dirty(&mut self, index: u64) {
        if index < self.chunks {
            self.mark_dirty(index);
            self.stats.writes_tracked += 1;
        }
    }

    fn mark_dirty(&mut self, index: u64) {
        if let Some(v) = self.verify.as_mut() {
            v.touch(index, index);
        }
        let i = index as usize;
        if !self.dirty[i] {
            self.dirty[i] = true;
            self.dirty_count += 1;
        }
    }

    /// Starts comparing the destination with this disk (see [`super::verify`]); with
    /// `repair`, chunks found different are marked dirty so the bulk copy sends them
    /// again. Only once the destination holds a full copy (in sync or behind).
    pub fn start_verify(&mut self, repair: bool, now_ns: u64) -> Result<(), VerifyRefusal> {
        if self.verify.as_ref().is_some_and(VerifyRun::running) {
            return Err(VerifyRefusal::Running);
        }
        match self.state() {
            SourceState::InSync | SourceState::Behind { .. } => {}
            SourceState::Copying { .. } | SourceState::Resyncing { .. } => {
                return Err(VerifyRefusal::NotCopied)
            }
            _ => return Err(VerifyRefusal::NotConnected),
        }
        self.verify = Some(VerifyRun::new(
            self.config.disk_bytes,
            self.config.chunk_bytes,
            self.chunks,
            repair,
            self.verify_next_id,
            now_ns,
        ));
        Ok(())
    }

    /// The next verify request to send on the Mirror class, after every mirror write
    /// handed out so far, if a verify runs and its in-flight bound allows. `hash_local`
    /// hashes this disk's bytes at (offset, len) in pieces of (chunk bytes), now: after
    /// this call chose the chunks and before any later guest write is handed to the
    /// source.
    pub fn next_verify<E>(
        &mut self,
        now_ns: u64,
        hash_local: impl FnOnce(u64, u64, u64) -> Result<Vec<Digest>, E>,
    ) -> Result<Option<Message>, E> {
        let Some(v) = self.verify.as_mut() else {
            return Ok(None);
        };
        v.stamp(now_ns);
        if !self.welcomed {
            return Ok(None);
        }
        let (dirty, inflight) = (&self.dirty, &self.inflight);
        let busy = |i: u64| dirty[i as usize] || inflight.contains_key(&i);
        let Some(batch) = v.next(now_ns, busy) else {
            return Ok(None);
        };
        let offset = batch.first * self.config.chunk_bytes;
        let end =
            ((batch.first + batch.count) * self.config.chunk_bytes).min(self.config.disk_bytes);
        let local = hash_local(offset, end - offset, self.config.chunk_bytes)?;
        if local.len() as u64 != batch.count {
            // A caller that hashed something else: compare nothing rather than wrongly.
            v.fail("the local disk was hashed in the wrong pieces".into());
            v.stamp(now_ns);
            return Ok(None);
        }
        let id = self.verify_next_id;
        self.verify_next_id += 1;
        v.sent(id, batch, &local, now_ns);
        Ok(Some(verify::request(id, batch)))
    }

    /// Stops a running verify (the caller could not read its own disk); the next
    /// [`ReplicaSource::next_verify`] notes the time it ended.
    pub fn fail_verify(&mut self, reason: &str) {
        if let Some(v) = self.verify.as_mut() {
            v.fail(reason.to_string());
        }
    }

    /// The current or last verify run's findings.
    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.verify.as_ref().map(|v| v.report().clone())
    }

    fn on_verify_reply(
        &mut self,
        id: u64,
        first: u64,
        digests: &[Digest],
    ) -> Result<(), SourceError> {
        if id >= self.verify_next_id {
            return Err(SourceError::UnaskedVerify { id });
        }
        // An answer to a run that was abandoned (it failed) or replaced is dropped.
        let Some(v) = self
            .verify
            .as_mut()
            .filter(|v| id >= v.first_id() && v.running())
        else {
            return Ok(());
        };
        let Some((asked_first, asked_count)) = v.outstanding(id) else {
            return Err(SourceError::UnaskedVerify { id });
        };
        let count = digests.len() as u64;
        if (first, count) != (asked_first, asked_count) {
            return Err(SourceError::VerifyReplyShape { id, first, count });
        }
        let confirmed = v.answered(id, digests);
        if v.report().repair && !confirmed.is_empty() {
            for index in confirmed {
                self.mark_dirty(index);
            }
            self.repaired = true;
        }
        Ok(())
    }

    /// Whether a verify's repair marked chunks dirty since last asked: the destination
    /// holds a chunk that differs, so it is no longer a state the source was in, and the
    /// caller sends what [`ReplicaSource::take_unsynced`] gives (the next `Synced` comes
    /// once the chunks are copied again).
    pub fn take_repaired(&mut self) -> bool {
        std::mem::take(&mut self.repaired)
    }

    fn check_index(&self, index: u64) -> Result<(), SourceError> {
        if index < self.chunks {
            Ok(())
        } else {
            Err(SourceError::NoSuchChunk {
                index,
                chunks: self.chunks,
            })
        }
    }
}
