//! Opening, joining and resuming connections: the `Hello` exchange of steps 1 to 3 and
//! the resume of step 8 (see [`crate::protocol`]).

use super::*;

impl SessionCore {
    pub(super) fn on_hello(&mut self, conn: ConnId, hello: Hello, now_ns: u64) {
        let verdict = negotiate(&hello, &self.policy)
            .map_err(|r| r.reason)
            .and_then(|agreed| {
                let Side::Acceptor { session_id } = self.side else {
                    return Err(RefuseReason::InvalidHello);
                };
                match (agreed.intent, session_id) {
                    (Intent::Open, None) => Ok(agreed),
                    // The dialer lost the first connection before our HelloAck arrived and
                    // opens again: the same session, so it replaces connection 0.
                    (Intent::Open, Some(id)) if id == agreed.session_id => Ok(agreed),
                    (Intent::Open, Some(_)) => Err(RefuseReason::Busy),
                    (Intent::Join, Some(id)) if id != agreed.session_id => {
                        Err(RefuseReason::UnknownSession)
                    }
                    (Intent::Join, None) => Err(RefuseReason::UnknownSession),
                    (Intent::Join, Some(_)) if !self.token.matches(&agreed.resume_token) => {
                        Err(RefuseReason::BadResumeToken)
                    }
                    (Intent::Join, Some(_)) => Ok(agreed),
                }
            });
        let agreed = match verdict {
            Ok(agreed) => agreed,
            Err(reason) => {
                let refuse = self.policy_refuse(reason);
                warn!(conn = conn.0, %reason, "refusing hello");
                if let Some(c) = self.conns.get_mut(&conn) {
                    push_control(c, &Frame::Refuse(refuse));
                    c.close_after_flush = Some(ConnError::Refused(refuse));
                }
                return;
            }
        };
        // A join that reuses a live index replaces that connection: the dialer saw it
        // die before we did.
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| **id != conn && c.index == agreed.connection_index)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.close_conn(id, ConnError::Replaced, now_ns);
        }
        if self.live_count() > usize::from(self.config.connections_max) {
            let refuse = self.policy_refuse(RefuseReason::TooManyConnections);
            if let Some(c) = self.conns.get_mut(&conn) {
                push_control(c, &Frame::Refuse(refuse));
                c.close_after_flush = Some(ConnError::Refused(refuse));
            }
            return;
        }
        self.side = Side::Acceptor {
            session_id: Some(agreed.session_id),
        };
        let ack = HelloAck {
            version: agreed.version,
            role: self.config.role,
            connection_index: agreed.connection_index,
            connections_max: self.config.connections_max,
            session_id: agreed.session_id,
            resume_token: self.token,
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.index = agreed.connection_index;
        push_control(c, &Frame::HelloAck(ack));
        if agreed.intent == Intent::Open {
            self.conn_ready(conn, now_ns);
        } else {
            c.phase = Phase::AwaitResumeRequest;
        }
    }

    pub(super) fn policy_refuse(&self, reason: RefuseReason) -> crate::protocol::Refuse {
        crate::protocol::Refuse {
            reason,
            version_min: self.policy.version_min,
            version_max: self.policy.version_max,
        }
    }

    pub(super) fn on_hello_reply(
        &mut self,
        conn: ConnId,
        hello: Hello,
        reply: &Frame,
        now_ns: u64,
    ) -> Result<(), ConnError> {
        match check_hello_ack(&hello, reply, &self.policy) {
            Ok(ack) => {
                if hello.intent == Intent::Open {
                    self.token = ack.resume_token;
                    self.conn_ready(conn, now_ns);
                } else {
                    let point = self.resume_point();
                    if let Some(c) = self.conns.get_mut(&conn) {
                        push_control(c, &Frame::ResumeRequest(point));
                        c.phase = Phase::AwaitResumeState;
                    }
                }
                Ok(())
            }
            Err(
                e @ HandshakeError::Refused {
                    reason: RefuseReason::TooManyConnections | RefuseReason::Busy,
                    ..
                },
            ) if hello.intent == Intent::Join => Err(ConnError::PeerRefused(e)),
            Err(e) => {
                warn!(conn = conn.0, error = %e, "handshake failed");
                self.fail(SessionError::Handshake(e));
                Ok(())
            }
        }
    }

    pub(super) fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            last_seq_received: std::array::from_fn(|i| self.recv[i].contiguous_seq()),
        }
    }

    /// Applies the peer's resume point as a cumulative ack. False if the session failed.
    ///
    /// A point *below* what the peer already acked is stale, not a violation: with
    /// several connections joining at once, an ack sent later on another connection can
    /// overtake the `ResumeState` of this one. Acks are cumulative, so it is ignored. A
    /// point beyond what was ever sent cannot be explained and fails the session.
    pub(super) fn apply_resume_point(&mut self, point: &ResumePoint, now_ns: u64) -> bool {
        for class in StreamClass::ALL {
            let s = &self.send[class_index(class)];
            let stated = point.get(class);
            if stated > s.highest_sent_seq() {
                let reason = SessionError::ResumeViolation {
                    class,
                    stated,
                    acked_seq: s.acked_seq(),
                    highest_sent_seq: s.highest_sent_seq(),
                };
                self.fail(reason);
                return false;
            }
        }
        for class in StreamClass::ALL {
            // Checked above, so this cannot fail; a stale point frees nothing.
            let _ = self.on_ack(class, point.get(class), now_ns);
        }
        self.maybe_finish();
        true
    }

    pub(super) fn conn_ready(&mut self, conn: ConnId, now_ns: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = Phase::Ready;
            c.last_rx_ns = now_ns;
            c.next_ping_ns = now_ns;
        }
        self.failed_attempts = 0;
        self.next_attempt_ns = now_ns;
        self.resend_control = true;
        // Our `Close { Done }` may have been lost with the connections that carried it.
        if self.finish.done_sent {
            if let Some(c) = self.conns.get_mut(&conn) {
                push_control(
                    c,
                    &Frame::Close(Close {
                        reason: CloseReason::Done,
                    }),
                );
            }
        }
        match self.state {
            SessionState::Connecting => {
                info!(conn = conn.0, "session established");
                self.state = SessionState::Established;
                self.push_event(SessionEvent::Connected);
            }
            SessionState::Reconnecting { since_ns } => {
                let retransmitted_bytes =
                    self.send.iter().map(|s| s.pending_retransmit_bytes()).sum();
                info!(
                    conn = conn.0,
                    down_ns = now_ns - since_ns,
                    retransmitted_bytes,
                    "session resumed"
                );
                self.state = SessionState::Established;
                self.stats.resumes += 1;
                self.push_event(SessionEvent::Resumed {
                    retransmitted_bytes,
                });
            }
            SessionState::Established | SessionState::Closed | SessionState::Failed(_) => {}
        }
    }
}
