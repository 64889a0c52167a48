//! Verify: compares the source's disk with the destination's chunk by chunk, by digest,
//! while the guest keeps writing, and reports the chunks that differ. This module holds
//! the digests and the source's bookkeeping of one verify run; [`super::ReplicaSource`]
//! decides which chunks may be compared (see `docs/replication.md`, "Verify", for why a
//! comparison made here is sound while writes, mirror and bulk copy go on).
//!
//! The exchange, per batch of chunks:
//!
//! 1. Source: takes chunks that are neither dirty nor being copied, notes that the
//!    destination holds every write up to the current `seq` S for them once the mirror
//!    stream up to S is applied, and hashes its own copy of them now.
//! 2. Source → destination, on the Mirror class, after every mirror write up to S:
//!    `VerifyRequest { id, first, count }`.
//! 3. Destination: applies mirror messages in order, so when it reaches the request every
//!    write up to S is applied (and no later one); it hashes the chunks and answers
//!    `VerifyReply { id, first, digests }` on Control.
//! 4. Source, an RTT later: a chunk that a write touched since step 1 (any captured write
//!    has a seq above S), that went dirty or was copied again, is *changed*: it is compared
//!    again in a later pass. Otherwise equal digests mean equal chunks. A difference is
//!    looked at again, with a new request hashed at least [`VERIFY_CONFIRM_DELAY_NS`]
//!    later, and reported only if that look sees the same two digests: a write that
//!    completed in the source's image but was not yet captured in step 1 cannot be
//!    reported as a difference unless its capture is late by that long.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use thiserror::Error;

use super::wire::{Digest, Message, VERIFY_CHUNKS_MAX};
use super::{chunk_len, CHUNK_BYTES};

/// Chunks the source asks for in one request: 8 chunks, 4 MiB. The destination hashes a
/// request before it applies the mirror writes queued behind it, and the source hashes
/// its own copy on the replication thread before it drains the capture rings again: at
/// about 1 GB/s of SHA-256 that is 4 ms each, well inside the 16 ms a capture shard holds
/// (`capture::SHARD_BYTES_MAX` at 1 GB/s).
pub const VERIFY_BATCH_CHUNKS: u64 = 8;

/// Chunks asked for and not yet answered, at most: 256 chunks, 128 MiB of disk. That is
/// what the destination hashes in one 250 ms round trip at about 512 MiB/s (a fast SSD's
/// read rate): fewer would leave it idle while requests cross the WAN, more would only
/// queue there, in front of the mirror writes that follow the requests on the Mirror
/// class (each request delays them by its hashing time).
pub const VERIFY_INFLIGHT_CHUNKS_MAX: u64 = 256;

/// Passes over the chunks that were busy (dirty, being copied, or written while their
/// comparison was in flight): a chunk the guest keeps writing cannot be compared without
/// pausing the guest, so after this many passes it is reported as busy instead.
pub const VERIFY_PASSES_MAX: u32 = 8;

/// Least time between the starts of two passes: 1 s, four round trips of a 250 ms link, so
/// a re-copy of a chunk (confirmed one round trip after it is sent) and a burst of writes
/// have passed before the chunk is tried again. Eight passes give a busy chunk about 8 s.
pub const VERIFY_RETRY_DELAY_NS: u64 = 1_000_000_000;

/// Least time between the two looks at a chunk that differed: 1 s. A difference is
/// reported only if a second look, hashed this long after the first, sees the same
/// digests on both sides; a write that completed in the source's image but was not yet
/// captured at the first look would have to stay uncaptured this long (plus the second
/// round trip) to be reported as a difference. The capture runs right after the write
/// completes, on the same core, before the guest sees the completion, so that is a core
/// stalled for a second. Mismatches are rare and their second looks run side by side, so
/// the wait costs a run about a second, once.
pub const VERIFY_CONFIRM_DELAY_NS: u64 = 1_000_000_000;

/// Mismatching (and busy) chunks whose position a report lists, at most; beyond it only
/// the count grows. 1024 chunks are 512 MiB of disk in at most 1024 ranges: enough to
/// see where a disk went wrong, small enough for a `status` answer.
pub const VERIFY_REPORTED_CHUNKS_MAX: usize = 1024;

/// The digest of a chunk: SHA-256 of its bytes. A cryptographic digest, so two chunks
/// with the same digest hold the same bytes even if a peer or a disk were adversarial.
/// All-zero data (holes, discarded ranges: much of a typical disk) is recognised first and
/// gets its digest from a table instead of being hashed.
pub fn digest(data: &[u8]) -> Digest {
    if is_zero(data) {
        return zero_digest(data.len());
    }
    sha256(data)
}

fn sha256(data: &[u8]) -> Digest {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// Whether every byte is zero; 64 bytes at a time, which the compiler vectorises.
fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let whole = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && blocks.remainder().iter().all(|&b| b == 0)
}

/// The digest of `len` zero bytes; the full chunk's is computed once.
pub fn zero_digest(len: usize) -> Digest {
    static FULL: OnceLock<Digest> = OnceLock::new();
    if len as u64 == CHUNK_BYTES {
        return *FULL.get_or_init(|| sha256(&vec![0; len]));
    }
    sha256(&vec![0; len])
}

/// The digests of the chunks in `len` bytes of `file` at `offset`, `chunk_bytes` each (the
/// last may be shorter). A chunk that lies wholly in a hole is not read. `buf` is reused
/// between calls.
pub fn hash_file_chunks(
    file: &File,
    offset: u64,
    len: u64,
    chunk_bytes: u64,
    buf: &mut Vec<u8>,
) -> io::Result<Vec<Digest>> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < offset + len {
        let n = chunk_bytes.min(offset + len - at);
        if is_hole(file, at, n) {
            out.push(zero_digest(n as usize));
        } else {
            buf.resize(n as usize, 0);
            file.read_exact_at(buf, at)?;
            out.push(digest(buf));
        }
        at += n;
    }
    Ok(out)
}

/// Whether `len` bytes at `offset` hold no data (`SEEK_DATA` finds none before their end).
/// On a filesystem that cannot tell, the answer is "not a hole" and the bytes are read.
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on a descriptor we own; it moves only the file position, which no
    // one uses (every read and write here is positional).
    let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    u64::try_from(data).is_ok_and(|d| d >= offset + len)
}

/// Why a verify cannot start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyRefusal {
    #[error("not connected to the destination")]
    NotConnected,
    #[error(
        "the destination does not hold a full copy yet (copying or resyncing); verify once in sync"
    )]
    NotCopied,
    #[error("a verify is already running")]
    Running,
}

/// Where a verify run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyState {
    Running,
    /// Every chunk was compared or reported busy.
    Done,
    /// Stopped before the end (the session was lost, the local disk could not be read).
    Failed(String),
}

/// A range of the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// What a verify run found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub state: VerifyState,
    /// Mismatching chunks are marked dirty, so the bulk copy sends them again.
    pub repair: bool,
    pub chunks_total: u64,
    /// Chunks compared: equal, or different twice in a row.
    pub chunks_checked: u64,
    /// Chunks that differed twice in a row.
    pub mismatch_chunks: u64,
    /// Where, merged into ranges, for the first [`VERIFY_REPORTED_CHUNKS_MAX`] of them.
    pub mismatches: Vec<ByteRange>,
    /// Chunks that could not be compared in [`VERIFY_PASSES_MAX`] passes (known once done).
    pub busy_chunks: u64,
    pub busy: Vec<ByteRange>,
    /// A first comparison that differed and the second did not (or found changed).
    pub unconfirmed: u64,
    /// Comparisons voided because the chunk changed while in flight.
    pub changed: u64,
    pub passes: u32,
    pub requests: u64,
    /// The caller's clock when it started, and when it ended.
    pub started_ns: u64,
    pub finished_ns: Option<u64>,
}

impl VerifyReport {
    /// The report of a run over `chunks_total` chunks that is about to start, before the
    /// source took it up.
    pub fn starting(repair: bool, chunks_total: u64, now_ns: u64) -> VerifyReport {
        VerifyReport {
            state: VerifyState::Running,
            repair,
            chunks_total,
            chunks_checked: 0,
            mismatch_chunks: 0,
            mismatches: Vec::new(),
            busy_chunks: 0,
            busy: Vec::new(),
            unconfirmed: 0,
            changed: 0,
            passes: 0,
            requests: 0,
            started_ns: now_ns,
            finished_ns: None,
        }
    }

    /// The report of a run that could not start.
    pub fn refused(refusal: &VerifyRefusal, repair: bool, now_ns: u64) -> VerifyReport {
        VerifyReport {
            state: VerifyState::Failed(refusal.to_string()),
            finished_ns: Some(now_ns),
            ..VerifyReport::starting(repair, 0, now_ns)
        }
    }

    /// Still comparing.
    pub fn running(&self) -> bool {
        self.state == VerifyState::Running
    }
}

#[derive(Debug)]
struct Awaiting {
    local: Digest,
    /// Touched by a write, dirtied or copied since its local digest was taken.
    changed: bool,
    /// The first look's (local, remote) digests, when this is the second comparison of
    /// a chunk that differed once.
    first_look: Option<(Digest, Digest)>,
    /// When `local` was hashed.
    hashed_ns: u64,
}

/// One verify run on the source.
#[derive(Debug)]
pub(crate) struct VerifyRun {
    disk_bytes: u64,
    chunk_bytes: u64,
    chunks: u64,
    /// Chunks still to compare, in this pass or a later one.
    todo: Vec<bool>,
    todo_count: u64,
    /// Where this pass's scan continues.
    cursor: u64,
    pass_started_ns: u64,
    /// Chunks that differed once, to compare again before anything else once
    /// [`VERIFY_CONFIRM_DELAY_NS`] passed: (chunk, the first look's local and remote
    /// digests, when the second look is due).
    confirm: VecDeque<(u64, Digest, Digest, u64)>,
    /// Requests of this run have ids from `first_id` on.
    first_id: u64,
    /// Requests sent and not answered: (first, count).
    outstanding: BTreeMap<u64, (u64, u64)>,
    /// Invariant: exactly the chunks of `outstanding`'s requests.
    awaiting: BTreeMap<u64, Awaiting>,
    mismatch_listed: BTreeSet<u64>,
    report: VerifyReport,
}

/// A batch the source hashes locally and asks the destination for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VerifyBatch {
    pub first: u64,
    pub count: u64,
    /// A second look at one chunk: the first look's (local, remote) digests.
    pub first_look: Option<(Digest, Digest)>,
}

impl VerifyRun {
    pub(crate) fn new(
        disk_bytes: u64,
        chunk_bytes: u64,
        chunks: u64,
        repair: bool,
        first_id: u64,
        now_ns: u64,
    ) -> VerifyRun {
        VerifyRun {
            disk_bytes,
            chunk_bytes,
            chunks,
            todo: vec![true; chunks as usize],
            todo_count: chunks,
            cursor: 0,
            pass_started_ns: now_ns,
            confirm: VecDeque::new(),
            first_id,
            outstanding: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            mismatch_listed: BTreeSet::new(),
            report: VerifyReport {
                passes: 1,
                ..VerifyReport::starting(repair, chunks, now_ns)
            },
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.report.running()
    }

    pub(crate) fn first_id(&self) -> u64 {
        self.first_id
    }

    /// The next batch to compare, if the in-flight bound allows; `busy` says which chunks
    /// cannot be compared now (dirty, or a copy of them in flight). Ends the run (at
    /// `now_ns`) once nothing is left to do.
    pub(crate) fn next(&mut self, now_ns: u64, busy: impl Fn(u64) -> bool) -> Option<VerifyBatch> {
        if !self.running() {
            return None;
        }
        while let Some(&(index, local, remote, due_ns)) = self.confirm.front() {
            if due_ns > now_ns {
                break;
            }
            self.confirm.pop_front();
            if busy(index) {
                self.requeue(index);
                continue;
            }
            return Some(VerifyBatch {
                first: index,
                count: 1,
                first_look: Some((local, remote)),
            });
        }
        if self.awaiting.len() as u64 + VERIFY_BATCH_CHUNKS > VERIFY_INFLIGHT_CHUNKS_MAX {
            return None;
        }
        while self.cursor < self.chunks {
            let i = self.cursor;
            self.cursor += 1;
            if !self.todo[i as usize] || busy(i) {
                continue;
            }
            let mut count = 1;
            while count < VERIFY_BATCH_CHUNKS
                && i + count < self.chunks
                && self.todo[(i + count) as usize]
                && !busy(i + count)
            {
                count += 1;
            }
            self.cursor = i + count;
            return Some(VerifyBatch {
                first: i,
                count,
                first_look: None,
            });
        }
        self.end_of_pass(now_ns);
        None
    }

    fn end_of_pass(&mut self, now_ns: u64) {
        let settled = self.awaiting.is_empty() && self.confirm.is_empty();
        if self.todo_count == 0 && settled {
            self.finish(now_ns);
        } else if self.todo_count > 0
            && self.report.passes < VERIFY_PASSES_MAX
            && now_ns >= self.pass_started_ns.saturating_add(VERIFY_RETRY_DELAY_NS)
        {
            self.report.passes += 1;
            self.pass_started_ns = now_ns;
            self.cursor = 0;
        } else if self.report.passes >= VERIFY_PASSES_MAX && settled {
            // What is still to do stayed busy through every pass.
            self.report.busy_chunks = self.todo_count;
            let busy: Vec<u64> = (0..self.chunks)
                .filter(|&i| self.todo[i as usize])
                .take(VERIFY_REPORTED_CHUNKS_MAX)
                .collect();
            self.report.busy = self.ranges(busy.into_iter());
            self.finish(now_ns);
        }
    }

    fn finish(&mut self, now_ns: u64) {
        self.report.state = VerifyState::Done;
        self.report.finished_ns = Some(now_ns);
    }

    /// The caller hashed `batch` locally at `now_ns` (after `next` returned it) and sends
    /// it as request `id`.
    pub(crate) fn sent(&mut self, id: u64, batch: VerifyBatch, local: &[Digest], now_ns: u64) {
        debug_assert_eq!(local.len() as u64, batch.count);
        for (k, digest) in local.iter().enumerate() {
            let index = batch.first + k as u64;
            if self.todo[index as usize] {
                self.todo[index as usize] = false;
                self.todo_count -= 1;
            }
            self.awaiting.insert(
                index,
                Awaiting {
                    local: *digest,
                    changed: false,
                    first_look: batch.first_look,
                    hashed_ns: now_ns,
                },
            );
        }
        self.outstanding.insert(id, (batch.first, batch.count));
        self.report.requests += 1;
    }

    /// Chunks `first..=last` were written, dirtied or are being copied again: whatever
    /// comparison of them is in flight no longer means anything.
    pub(crate) fn touch(&mut self, first: u64, last: u64) {
        for (_, a) in self.awaiting.range_mut(first..=last) {
            a.changed = true;
        }
    }

    /// Whether request `id` is one of this run's, sent and not yet answered: (first, count).
    pub(crate) fn outstanding(&self, id: u64) -> Option<(u64, u64)> {
        self.outstanding.get(&id).copied()
    }

    /// The destination's digests for request `id` (checked by the caller to be
    /// outstanding with this `first` and count). Returns the chunks found different twice.
    pub(crate) fn answered(&mut self, id: u64, digests: &[Digest]) -> Vec<u64> {
        let Some((first, _)) = self.outstanding.remove(&id) else {
            return Vec::new();
        };
        let mut confirmed = Vec::new();
        for (k, remote) in digests.iter().enumerate() {
            let index = first + k as u64;
            let Some(a) = self.awaiting.remove(&index) else {
                continue;
            };
            if a.changed {
                self.report.changed += 1;
                self.requeue(index);
            } else if a.local == *remote {
                self.report.chunks_checked += 1;
                self.report.unconfirmed += u64::from(a.first_look.is_some());
            } else if a.first_look == Some((a.local, *remote)) {
                // The same difference twice, neither side moving in between.
                self.report.chunks_checked += 1;
                self.report.mismatch_chunks += 1;
                if self.mismatch_listed.len() < VERIFY_REPORTED_CHUNKS_MAX {
                    self.mismatch_listed.insert(index);
                }
                confirmed.push(index);
            } else if a.first_look.is_some() {
                // Different again, but not the same difference: a side moved between the
                // looks (a write not yet captured at either). Try again later.
                self.report.unconfirmed += 1;
                self.requeue(index);
            } else {
                let due_ns = a.hashed_ns.saturating_add(VERIFY_CONFIRM_DELAY_NS);
                self.confirm.push_back((index, a.local, *remote, due_ns));
            }
        }
        if !confirmed.is_empty() {
            let listed: Vec<u64> = self.mismatch_listed.iter().copied().collect();
            self.report.mismatches = self.ranges(listed.into_iter());
        }
        confirmed
    }

    /// Compare `index` again in a later pass (or later in this one).
    fn requeue(&mut self, index: u64) {
        if !self.todo[index as usize] {
            self.todo[index as usize] = true;
            self.todo_count += 1;
        }
    }

    /// Stops the run; [`VerifyRun::stamp`] notes when.
    pub(crate) fn fail(&mut self, reason: String) {
        if self.running() {
            self.report.state = VerifyState::Failed(reason);
        }
        self.outstanding.clear();
        self.awaiting.clear();
        self.confirm.clear();
    }

    /// Notes `now_ns` as the end of a run that ended where no clock was at hand.
    pub(crate) fn stamp(&mut self, now_ns: u64) {
        if !self.running() && self.report.finished_ns.is_none() {
            self.report.finished_ns = Some(now_ns);
        }
    }

    pub(crate) fn report(&self) -> &VerifyReport {
        &self.report
    }

    /// Bytes of chunk `index`.
    pub(crate) fn chunk_range(&self, index: u64) -> ByteRange {
        ByteRange {
            offset: index * self.chunk_bytes,
            len: chunk_len(index, self.disk_bytes, self.chunk_bytes),
        }
    }

    /// Ascending chunk indices, merged into byte ranges.
    fn ranges(&self, chunks: impl Iterator<Item = u64>) -> Vec<ByteRange> {
        let mut out: Vec<ByteRange> = Vec::new();
        for index in chunks {
            let r = self.chunk_range(index);
            match out.last_mut() {
                Some(last) if last.offset + last.len == r.offset => last.len += r.len,
                _ => out.push(r),
            }
        }
        out
    }
}

/// The request for `batch` as request `id`.
pub(crate) fn request(id: u64, batch: VerifyBatch) -> Message {
    debug_assert!(batch.count >= 1 && batch.count <= VERIFY_CHUNKS_MAX);
    Message::VerifyRequest {
        id,
        first: batch.first,
        count: batch.count,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn zero_data_gets_the_digest_of_zeros_without_hashing_twice() {
        let zeros = vec![0; CHUNK_BYTES as usize];
        assert_eq!(digest(&zeros), sha256(&zeros));
        assert_eq!(digest(&zeros[..4096 + 3]), sha256(&zeros[..4096 + 3]));
        let mut one = zeros.clone();
        one[CHUNK_BYTES as usize - 1] = 1;
        assert_ne!(digest(&one), digest(&zeros));
        assert!(!is_zero(&one[CHUNK_BYTES as usize - 70..]));
    }

    #[test]
    fn file_chunks_hash_the_same_with_holes_data_and_a_short_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let chunk = 64 << 10;
        let len = 5 * chunk + 4096;
        file.set_len(len).unwrap();
        // Chunk 1 has data at its end, chunk 3 written zeros; the rest are holes.
        file.write_all_at(&[9; 512], 2 * chunk - 512).unwrap();
        file.write_all_at(&vec![0; chunk as usize], 3 * chunk)
            .unwrap();
        let mut buf = Vec::new();
        let got = hash_file_chunks(&file, 0, len, chunk, &mut buf).unwrap();
        let content = std::fs::read(&path).unwrap();
        let expected: Vec<Digest> = content.chunks(chunk as usize).map(sha256).collect();
        assert_eq!(got, expected);
        assert!(is_hole(&file, 4 * chunk, chunk));
        assert!(!is_hole(&file, chunk, chunk));
    }
}
