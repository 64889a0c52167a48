//! Ending the session (step 9 of [`crate::protocol`]) and ending surplus connections
//! when the dialer settles on fewer.

use super::*;

impl SessionCore {
    /// Ends the session from this side: sends `Close { reason }` on every ready
    /// connection (best effort: the peer that misses it fails when its resume window
    /// expires) and refuses further sends. The driver flushes, then drops the sockets.
    pub fn close(&mut self, reason: CloseReason) {
        for c in self.conns.values_mut().filter(|c| c.phase == Phase::Ready) {
            push_control(c, &Frame::Close(Close { reason }));
        }
        self.closing = true;
    }

    /// Finishes the session gracefully (step 9 of [`crate::protocol`]): refuses further
    /// sends, keeps sending and resending what is queued until the peer acked all of it,
    /// then sends `Close { Done }`. The session reaches [`SessionState::Closed`] (and
    /// reports [`SessionEvent::Closed`]) once the peer's own `Close { Done }` arrived;
    /// until then it receives, acks and resumes as before. Received payloads stay
    /// readable with [`SessionCore::recv`] after the close.
    pub fn close_gracefully(&mut self) {
        if self.is_over() {
            return;
        }
        self.closing = true;
        self.finish.wanted = true;
        self.maybe_finish();
    }

    /// The peer sent `Close { Done }`: it has sent everything and we acked it all. We
    /// stop taking new payloads, finish sending what is queued, and answer with our own.
    pub(super) fn on_peer_done(&mut self) {
        if !self.finish.peer_done {
            info!("peer finished; finishing our side");
        }
        self.finish.peer_done = true;
        self.closing = true;
        self.finish.wanted = true;
        self.maybe_finish();
    }

    /// Sends `Close { Done }` once everything is acked, and closes once both sides did.
    pub(super) fn maybe_finish(&mut self) {
        if !self.finish.wanted || self.is_over() {
            return;
        }
        if !self.finish.done_sent && self.is_send_idle() {
            let ready: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.phase == Phase::Ready)
                .map(|(id, _)| *id)
                .collect();
            // Without a ready connection, `conn_ready` sends it on the next one.
            self.finish.done_sent = true;
            // On every ready connection: one lost with its connection costs nothing.
            for id in ready {
                if let Some(c) = self.conns.get_mut(&id) {
                    push_control(
                        c,
                        &Frame::Close(Close {
                            reason: CloseReason::Done,
                        }),
                    );
                }
            }
        }
        if self.finish.done_sent && self.finish.peer_done {
            info!("session closed gracefully");
            self.state = SessionState::Closed;
            // Each connection hands out its last control frames (our `Close`), then the
            // driver closes it: `poll_transmit` reports `ConnectionClosed`.
            for c in self.conns.values_mut() {
                c.close_after_flush = Some(ConnError::SessionEnded);
            }
            self.push_event(SessionEvent::Closed);
        }
    }

    /// Judges the connection count once per [`ConnTuning`] period. A period in which the
    /// count was not all ready, or no data waited to be sent (the application, not the
    /// link, was the limit), says nothing and is skipped.
    pub(super) fn tune_connections(&mut self, now_ns: u64) {
        if !matches!(self.side, Side::Dialer { .. }) || !self.tuning.period_over(now_ns) {
            return;
        }
        let target = self.tuning.target;
        let waiting = self.send.iter().any(|s| s.next_sendable().is_some());
        if self.closing
            || self.state != SessionState::Established
            || self.ready_count() < usize::from(target)
            || !waiting
        {
            return;
        }
        let rate: u64 = self
            .send
            .iter()
            .map(|s| s.stats(now_ns).drain_rate_bytes_per_s)
            .sum();
        if self.tuning.judge(rate) {
            self.retire_surplus();
        }
    }

    /// Marks the connections beyond the target, highest index first, as retiring.
    pub(super) fn retire_surplus(&mut self) {
        let mut live: Vec<(u16, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.retiring)
            .map(|(id, c)| (c.index, *id))
            .collect();
        live.sort_unstable();
        for (_, id) in live.into_iter().skip(usize::from(self.tuning.target)) {
            if let Some(c) = self.conns.get_mut(&id) {
                c.retiring = true;
            }
        }
    }

    /// Closes retiring connections that have no data in flight any more.
    pub(super) fn close_retired(&mut self) {
        for c in self.conns.values_mut() {
            if c.retiring && c.inflight_bytes() == 0 && c.close_after_flush.is_none() {
                c.close_after_flush = Some(ConnError::Retired);
            }
        }
    }
}
