//! The receiving half of one stream class: reordering across connections, duplicate
//! suppression, credit grants and cumulative acks.

use std::collections::{BTreeMap, VecDeque};

use super::ConnError;
use crate::StreamClass;

/// The receiving state of one class.
#[derive(Debug)]
pub(super) struct RecvClass {
    class: StreamClass,
    window_bytes: u64,
    reorder_frames_max: u64,
    /// Every seq up to this one was received; they are in `ready` or with the app.
    contiguous_seq: u64,
    /// Delivered in order, not taken by the application yet.
    ready: VecDeque<Vec<u8>>,
    /// Invariant: every key is in `contiguous_seq + 2 ..= contiguous_seq +
    /// reorder_frames_max`.
    reorder: BTreeMap<u64, Vec<u8>>,
    /// Invariant: `received_bytes <= granted_limit`: each seq counted once, and the peer
    /// may only send within the grant.
    received_bytes: u64,
    taken_bytes: u64,
    /// Invariant: `applied_bytes <= taken_bytes <= received_bytes`.
    applied_bytes: u64,
    granted_limit: u64,
    acked_seq: u64,
    unacked_bytes: u64,
    /// When the oldest unacked delivery must be acked at the latest.
    pub ack_due_at_ns: Option<u64>,
    /// An ack should go out with the next transmit.
    pub ack_now: bool,
}

/// The application marked more bytes applied than it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{class:?}: marked {applied_bytes} bytes applied, only {taken_bytes} were received")]
pub struct AppliedBeyondReceived {
    /// The class.
    pub class: StreamClass,
    /// Cumulative bytes marked applied, including this call.
    pub applied_bytes: u64,
    /// Cumulative bytes handed to the application.
    pub taken_bytes: u64,
}

impl RecvClass {
    pub fn new(class: StreamClass, window_bytes: u64, reorder_frames_max: u64) -> Self {
        RecvClass {
            class,
            window_bytes,
            reorder_frames_max,
            contiguous_seq: 0,
            ready: VecDeque::new(),
            reorder: BTreeMap::new(),
            received_bytes: 0,
            taken_bytes: 0,
            applied_bytes: 0,
            granted_limit: 0,
            acked_seq: 0,
            unacked_bytes: 0,
            ack_due_at_ns: None,
            ack_now: false,
        }
    }

    /// A data frame. `Ok(false)` for a duplicate, dropped.
    pub fn on_data(
        &mut self,
        seq: u64,
        payload: Vec<u8>,
        now_ns: u64,
        ack_delay_ns: u64,
        ack_every_bytes: u64,
    ) -> Result<bool, ConnError> {
        if seq <= self.contiguous_seq || self.reorder.contains_key(&seq) {
            return Ok(false);
        }
        if seq - self.contiguous_seq > self.reorder_frames_max {
            return Err(ConnError::ReorderOverflow {
                class: self.class,
                seq,
                contiguous_seq: self.contiguous_seq,
            });
        }
        let len = payload.len() as u64;
        if self.received_bytes + len > self.granted_limit {
            return Err(ConnError::CreditExceeded {
                class: self.class,
                received_bytes: self.received_bytes + len,
                granted_bytes: self.granted_limit,
            });
        }
        self.received_bytes += len;
        debug_assert!(self.received_bytes <= self.granted_limit);
        self.reorder.insert(seq, payload);
        while let Some(payload) = self.reorder.remove(&(self.contiguous_seq + 1)) {
            self.contiguous_seq += 1;
            self.unacked_bytes += payload.len() as u64;
            self.ready.push_back(payload);
        }
        if self.contiguous_seq > self.acked_seq {
            self.ack_due_at_ns.get_or_insert(now_ns + ack_delay_ns);
            if self.unacked_bytes >= ack_every_bytes {
                self.ack_now = true;
            }
        }
        Ok(true)
    }

    /// The next payload in order.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        let payload = self.ready.pop_front()?;
        self.taken_bytes += payload.len() as u64;
        Some(payload)
    }

    /// The application applied (and freed) `bytes` more.
    pub fn mark_applied(&mut self, bytes: u64) -> Result<(), AppliedBeyondReceived> {
        let applied_bytes = self.applied_bytes.saturating_add(bytes);
        if applied_bytes > self.taken_bytes {
            return Err(AppliedBeyondReceived {
                class: self.class,
                applied_bytes,
                taken_bytes: self.taken_bytes,
            });
        }
        self.applied_bytes = applied_bytes;
        debug_assert!(self.applied_bytes <= self.taken_bytes);
        debug_assert!(self.taken_bytes <= self.received_bytes);
        Ok(())
    }

    /// A new grant when the window opened by a quarter since the last one (or `force`,
    /// after a reconnect, when the last grant may have been lost): applied + window.
    pub fn credit_due(&mut self, force: bool) -> Option<u64> {
        let limit = self.applied_bytes + self.window_bytes;
        let threshold = self.window_bytes / super::CREDIT_GRANT_FRACTION;
        if (force && limit > 0) || limit >= self.granted_limit + threshold.max(1) {
            self.granted_limit = self.granted_limit.max(limit);
            Some(self.granted_limit)
        } else {
            None
        }
    }

    /// The cumulative ack to send, if one is due (or `force`d).
    pub fn ack_due(&mut self, force: bool) -> Option<u64> {
        let due = self.ack_now || (force && self.contiguous_seq > 0);
        if !due {
            return None;
        }
        self.ack_now = false;
        self.ack_due_at_ns = None;
        self.unacked_bytes = 0;
        self.acked_seq = self.contiguous_seq;
        Some(self.contiguous_seq)
    }

    /// Turns an expired ack delay into a due ack.
    pub fn on_timer(&mut self, now_ns: u64) {
        if self.ack_due_at_ns.is_some_and(|t| t <= now_ns) {
            self.ack_now = true;
        }
    }

    pub fn contiguous_seq(&self) -> u64 {
        self.contiguous_seq
    }

    pub fn stats(&self) -> RecvStats {
        RecvStats {
            received_bytes: self.received_bytes,
            granted_bytes: self.granted_limit,
            taken_bytes: self.taken_bytes,
            applied_bytes: self.applied_bytes,
            contiguous_seq: self.contiguous_seq,
            reorder_frames: self.reorder.len(),
        }
    }
}

/// The receiver's view of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvStats {
    /// Cumulative distinct payload bytes received; never above `granted_bytes`.
    pub received_bytes: u64,
    /// The cumulative credit granted to the peer.
    pub granted_bytes: u64,
    /// Bytes handed to the application by `recv`.
    pub taken_bytes: u64,
    /// Bytes the application marked applied.
    pub applied_bytes: u64,
    /// Every seq up to this one was received.
    pub contiguous_seq: u64,
    /// Frames waiting for an earlier seq.
    pub reorder_frames: usize,
}
