//! The sending half of one stream class: the bounded send buffer, which doubles as the
//! retransmit buffer, the peer's credit, cumulative acks and the drain-rate estimate.

use std::collections::{BTreeSet, VecDeque};

use super::{ConnId, SendError, NS_PER_S};
use crate::StreamClass;

/// How far back [`SendStats::drain_rate_bytes_per_s`] looks: long enough to smooth the
/// ack clumping of a 250 ms RTT, short enough to follow a receiver that slows down.
pub const DRAIN_RATE_WINDOW_NS: u64 = 2 * NS_PER_S;

/// Most ack samples kept for the drain rate: one per [`DRAIN_SAMPLE_SPACING_NS`] across
/// the window, plus slack for the sample at each end.
const DRAIN_SAMPLES_MAX: usize = (DRAIN_RATE_WINDOW_NS / DRAIN_SAMPLE_SPACING_NS) as usize + 2;

/// Samples closer together than this are merged: 10 ms resolves rates well enough over a
/// 2 s window and keeps the sample ring small.
const DRAIN_SAMPLE_SPACING_NS: u64 = 10_000_000;

/// One frame of the class, from `send()` until the peer acks it.
#[derive(Debug)]
struct Frame {
    seq: u64,
    payload: Vec<u8>,
    /// Cumulative payload bytes of the class up to and including this frame: the credit
    /// it needs.
    end_offset: u64,
    /// The connection it was last sent on; `None` while it waits to be (re)sent.
    sent_on: Option<ConnId>,
    /// Was sent before and lost with its connection.
    retransmit: bool,
}

/// An ack or resume point the sender cannot have earned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AckBeyondSent {
    pub seq: u64,
    pub highest_sent_seq: u64,
}

/// The sending state of one class.
#[derive(Debug)]
pub(super) struct SendClass {
    pub class: StreamClass,
    /// Invariant: `frames` holds exactly the seqs `acked_seq + 1 .. next_seq`, in order.
    frames: VecDeque<Frame>,
    next_seq: u64,
    acked_seq: u64,
    /// Invariant: the highest seq ever sent; `acked_seq <= highest_sent_seq < next_seq`.
    highest_sent_seq: u64,
    /// Invariant: the sum of the payloads in `frames`; `<= buffer_bytes_max`.
    buffered_bytes: u64,
    buffer_bytes_max: u64,
    buffer_frames_max: usize,
    enqueued_end_offset: u64,
    /// Invariant: `sent_end_offset <= credit_limit`: never beyond the grant.
    sent_end_offset: u64,
    credit_limit: u64,
    /// Seqs waiting to be sent (new or retransmit), lowest first.
    pending: BTreeSet<u64>,
    acked_bytes: u64,
    retransmitted_bytes: u64,
    /// (time, acked_bytes) samples for the drain rate, oldest first.
    drain_samples: VecDeque<(u64, u64)>,
}

impl SendClass {
    pub fn new(class: StreamClass, buffer_bytes_max: u64, buffer_frames_max: usize) -> Self {
        SendClass {
            class,
            frames: VecDeque::new(),
            next_seq: 1,
            acked_seq: 0,
            highest_sent_seq: 0,
            buffered_bytes: 0,
            buffer_bytes_max,
            buffer_frames_max,
            enqueued_end_offset: 0,
            sent_end_offset: 0,
            credit_limit: 0,
            pending: BTreeSet::new(),
            acked_bytes: 0,
            retransmitted_bytes: 0,
            drain_samples: VecDeque::new(),
        }
    }

    /// Queues `payload` (already checked for size) as the next frame; refuses when the
    /// buffer is full.
    pub fn enqueue(&mut self, payload: Vec<u8>) -> Result<u64, SendError> {
        let len = payload.len() as u64;
        if self.buffered_bytes + len > self.buffer_bytes_max
            || self.frames.len() >= self.buffer_frames_max
        {
            return Err(SendError::WouldBlock {
                class: self.class,
                backlog_bytes: self.buffered_bytes,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enqueued_end_offset += len;
        self.buffered_bytes += len;
        self.frames.push_back(Frame {
            seq,
            payload,
            end_offset: self.enqueued_end_offset,
            sent_on: None,
            retransmit: false,
        });
        self.pending.insert(seq);
        debug_assert!(self.buffered_bytes <= self.buffer_bytes_max);
        debug_assert_eq!(self.frames.len() as u64, self.next_seq - 1 - self.acked_seq);
        Ok(seq)
    }

    /// True when a payload of `len` bytes would be accepted now.
    pub fn fits(&self, len: usize) -> bool {
        self.buffered_bytes + len as u64 <= self.buffer_bytes_max
            && self.frames.len() < self.buffer_frames_max
    }

    fn frame(&self, seq: u64) -> Option<&Frame> {
        let index = usize::try_from(seq.checked_sub(self.acked_seq + 1)?).ok()?;
        self.frames.get(index)
    }

    fn frame_mut(&mut self, seq: u64) -> Option<&mut Frame> {
        let index = usize::try_from(seq.checked_sub(self.acked_seq + 1)?).ok()?;
        self.frames.get_mut(index)
    }

    /// The lowest waiting frame, `(seq, len)`, if the credit allows it. A retransmit was
    /// within the credit when first sent, and credit never shrinks, so one test serves.
    pub fn next_sendable(&self) -> Option<(u64, usize)> {
        let seq = *self.pending.first()?;
        let frame = self.frame(seq)?;
        (frame.end_offset <= self.credit_limit).then_some((seq, frame.payload.len()))
    }

    /// Marks `seq` sent on `conn`; returns its payload and retransmit flag.
    pub fn take(&mut self, seq: u64, conn: ConnId) -> Option<(&[u8], bool)> {
        if !self.pending.remove(&seq) {
            return None;
        }
        let credit_limit = self.credit_limit;
        let frame = self.frame_mut(seq)?;
        assert!(
            frame.end_offset <= credit_limit,
            "data beyond the granted credit"
        );
        frame.sent_on = Some(conn);
        let (end_offset, retransmit, len) = (
            frame.end_offset,
            frame.retransmit,
            frame.payload.len() as u64,
        );
        self.sent_end_offset = self.sent_end_offset.max(end_offset);
        self.highest_sent_seq = self.highest_sent_seq.max(seq);
        if retransmit {
            self.retransmitted_bytes += len;
        }
        let frame = self.frame(seq)?;
        Some((&frame.payload, retransmit))
    }

    /// A cumulative ack (or a resume point): frees every frame up to `seq`.
    pub fn on_ack(&mut self, seq: u64, now_ns: u64) -> Result<(), AckBeyondSent> {
        if seq > self.highest_sent_seq {
            return Err(AckBeyondSent {
                seq,
                highest_sent_seq: self.highest_sent_seq,
            });
        }
        while self.acked_seq < seq {
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            debug_assert_eq!(frame.seq, self.acked_seq + 1);
            self.acked_seq = frame.seq;
            let len = frame.payload.len() as u64;
            self.buffered_bytes -= len;
            self.acked_bytes += len;
            self.pending.remove(&frame.seq);
        }
        debug_assert_eq!(self.frames.len() as u64, self.next_seq - 1 - self.acked_seq);
        self.sample_drain(now_ns);
        Ok(())
    }

    /// Every frame last sent on `conn` and not acked goes back in the queue, flagged as
    /// a retransmit. Returns the bytes requeued.
    pub fn requeue(&mut self, conn: ConnId) -> u64 {
        let mut bytes = 0;
        for frame in self.frames.iter_mut() {
            if frame.sent_on == Some(conn) {
                frame.sent_on = None;
                frame.retransmit = true;
                bytes += frame.payload.len() as u64;
                self.pending.insert(frame.seq);
            }
        }
        bytes
    }

    /// Bytes waiting to be sent again.
    pub fn pending_retransmit_bytes(&self) -> u64 {
        self.pending
            .iter()
            .filter_map(|seq| self.frame(*seq))
            .filter(|f| f.retransmit)
            .map(|f| f.payload.len() as u64)
            .sum()
    }

    /// A credit grant; cumulative, so the largest wins.
    pub fn on_credit(&mut self, limit_bytes: u64) {
        self.credit_limit = self.credit_limit.max(limit_bytes);
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    pub fn highest_sent_seq(&self) -> u64 {
        self.highest_sent_seq
    }

    pub fn stats(&self, now_ns: u64) -> SendStats {
        SendStats {
            backlog_bytes: self.buffered_bytes,
            credit_limit_bytes: self.credit_limit,
            sent_bytes: self.sent_end_offset,
            credit_available_bytes: self.credit_limit - self.sent_end_offset,
            acked_bytes: self.acked_bytes,
            retransmitted_bytes: self.retransmitted_bytes,
            drain_rate_bytes_per_s: self.drain_rate_bytes_per_s(now_ns),
        }
    }

    fn sample_drain(&mut self, now_ns: u64) {
        match self.drain_samples.back_mut() {
            Some(last) if now_ns.saturating_sub(last.0) < DRAIN_SAMPLE_SPACING_NS => {
                last.1 = self.acked_bytes;
            }
            _ => self.drain_samples.push_back((now_ns, self.acked_bytes)),
        }
        self.trim_samples(now_ns);
    }

    fn trim_samples(&mut self, now_ns: u64) {
        let horizon_ns = now_ns.saturating_sub(DRAIN_RATE_WINDOW_NS);
        // Keep one sample at or before the horizon so the window is fully covered.
        while self.drain_samples.len() >= 2
            && (self.drain_samples[1].0 <= horizon_ns
                || self.drain_samples.len() > DRAIN_SAMPLES_MAX)
        {
            self.drain_samples.pop_front();
        }
    }

    /// Acked bytes per second over the last [`DRAIN_RATE_WINDOW_NS`] (less at the start).
    fn drain_rate_bytes_per_s(&self, now_ns: u64) -> u64 {
        let Some(&(first_ns, first_bytes)) = self.drain_samples.front() else {
            return 0;
        };
        let from_ns = first_ns.max(now_ns.saturating_sub(DRAIN_RATE_WINDOW_NS));
        let span_ns = now_ns.saturating_sub(from_ns);
        if span_ns == 0 {
            return 0;
        }
        let bytes = self.acked_bytes - first_bytes;
        u64::try_from(u128::from(bytes) * u128::from(NS_PER_S) / u128::from(span_ns))
            .unwrap_or(u64::MAX)
    }
}

/// The sender's view of one class, for the application and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Bytes queued or sent but not yet acked (the send buffer's fill).
    pub backlog_bytes: u64,
    /// The peer's cumulative grant.
    pub credit_limit_bytes: u64,
    /// Cumulative bytes sent at least once; never above `credit_limit_bytes`.
    pub sent_bytes: u64,
    /// Bytes the sender may still send before the next grant.
    pub credit_available_bytes: u64,
    /// Cumulative bytes the peer acked.
    pub acked_bytes: u64,
    /// Cumulative bytes sent again after a connection was lost.
    pub retransmitted_bytes: u64,
    /// Acked bytes per second over the last [`DRAIN_RATE_WINDOW_NS`].
    pub drain_rate_bytes_per_s: u64,
}
