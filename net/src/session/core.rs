//! [`SessionCore`]: the sans-IO session state machine (see the module documentation of
//! [`crate::session`]).

use std::collections::{BTreeMap, VecDeque};

use tracing::{debug, info, warn};

use super::recv::{AppliedBeyondReceived, RecvClass};
use super::sched::{ConnTuning, Drr};
use super::send::{SendClass, SendStats};
use super::{
    ConnError, ConnId, RecvStats, SendError, SessionConfig, SessionError, SessionEvent,
    ACK_EVERY_BYTES, CONN_CONTROL_QUEUE_BYTES_MAX, CONN_DELIVERED_EVERY_BYTES, EVENTS_MAX,
    RECONNECT_BACKOFF_NS, SEND_BUFFER_FRAMES_MAX, TRANSMIT_BATCH_BYTES,
};
use crate::protocol::{
    check_hello_ack, encode_data_into, encode_frame_into, negotiate, Ack, Close, CloseReason,
    Credit, Delivered, Frame, FrameDecoder, HandshakeError, HandshakePolicy, Hello, HelloAck,
    Intent, Ping, RefuseReason, ResumePoint, ResumeToken, SessionId, CLASS_COUNT,
    MAX_FRAME_PAYLOAD_BYTES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use crate::StreamClass;

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// No handshake completed yet.
    Connecting,
    /// At least one connection is ready.
    Established,
    /// Every connection was lost at `since_ns`; waiting for one to resume.
    Reconnecting {
        /// When the last connection went down.
        since_ns: u64,
    },
    /// Both sides finished gracefully: everything either sent was acked (step 9).
    Closed,
    /// The session is over.
    Failed(SessionError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Acceptor: waiting for `Hello`.
    AwaitHello,
    /// Dialer: sent `hello`, waiting for `HelloAck`.
    AwaitHelloAck { hello: Hello },
    /// Acceptor on a join: waiting for `ResumeRequest`.
    AwaitResumeRequest,
    /// Dialer on a join: waiting for `ResumeState`.
    AwaitResumeState,
    /// Carries everything.
    Ready,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitHello => "awaiting Hello",
            Phase::AwaitHelloAck { .. } => "awaiting HelloAck",
            Phase::AwaitResumeRequest => "awaiting ResumeRequest",
            Phase::AwaitResumeState => "awaiting ResumeState",
            Phase::Ready => "ready",
        }
    }
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    index: u16,
    decoder: FrameDecoder,
    /// Invariant: `control_out.len() <= CONN_CONTROL_QUEUE_BYTES_MAX`.
    control_out: Vec<u8>,
    /// Data payload bytes sent on this connection.
    sent_bytes: u64,
    /// The peer's latest `Delivered` for this connection; never above `sent_bytes`. What
    /// lies between is in flight: the scheduler sends no data on the connection while that
    /// is at `conn_inflight_bytes_max` or more.
    delivered_bytes: u64,
    /// Data payload bytes that arrived on this connection (the peer's `sent_bytes`).
    received_bytes: u64,
    /// The last `Delivered` we sent on this connection.
    received_reported: u64,
    /// When the bytes received and not yet reported must be reported at the latest.
    report_due_at_ns: Option<u64>,
    last_rx_ns: u64,
    next_ping_ns: u64,
    /// Emit `ConnectionClosed` once `control_out` (a `Refuse`) was handed out.
    close_after_flush: Option<ConnError>,
    /// The driver says the connection's socket has as much on the network as it should:
    /// no new data goes to it (control frames still do).
    wire_full: bool,
    /// Surplus after the dialer went back to fewer connections: it carries no new data
    /// and is closed once its in-flight data is acked.
    retiring: bool,
}

impl Conn {
    /// Data bytes sent on this connection that the peer has not reported delivered.
    fn inflight_bytes(&self) -> u64 {
        self.sent_bytes - self.delivered_bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Dialer { session_id: SessionId },
    Acceptor { session_id: Option<SessionId> },
}

/// Counters for the application and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Per class, in [`StreamClass::ALL`] order.
    pub send: [SendStats; CLASS_COUNT],
    /// Per class, in [`StreamClass::ALL`] order.
    pub recv: [RecvStats; CLASS_COUNT],
    /// Smoothed RTT, once a pong arrived.
    pub srtt_ns: Option<u64>,
    /// Ready connections.
    pub ready_connections: usize,
    /// Connections the dialer wants now: its chosen count (zero on the acceptor).
    pub connections_target: u16,
    /// Connections closed by the session for a protocol error.
    pub connections_closed: u64,
    /// Times the session resumed after losing every connection.
    pub resumes: u64,
    /// Events dropped because the driver did not poll them.
    pub events_dropped: u64,
}

/// The session state machine. See [`crate::session`].
#[derive(Debug)]
pub struct SessionCore {
    config: SessionConfig,
    policy: HandshakePolicy,
    side: Side,
    token: ResumeToken,
    state: SessionState,
    conns: BTreeMap<ConnId, Conn>,
    send: [SendClass; CLASS_COUNT],
    recv: [RecvClass; CLASS_COUNT],
    /// Shares the link among Mirror, Memory and Bulk.
    drr: Drr,
    /// After a connection becomes ready, resend every credit and ack: the last ones may
    /// have been lost with the connection that carried them.
    resend_control: bool,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
    failed_attempts: usize,
    next_attempt_ns: u64,
    ping_nonce: u64,
    now_ns: u64,
    /// `close` or `close_gracefully` was called, or the peer finished: nothing more is
    /// queued.
    closing: bool,
    /// The graceful close of step 9.
    finish: Finish,
    tuning: ConnTuning,
}

/// Progress of the graceful close (step 9 of [`crate::protocol`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Finish {
    /// This side wants to finish: `Close { Done }` goes out once everything is acked.
    wanted: bool,
    /// Our `Close { Done }` is queued. Invariant: only once every class was acked.
    done_sent: bool,
    /// The peer's `Close { Done }` arrived: it has nothing more to send.
    peer_done: bool,
}

mod close;
mod join;

fn class_index(class: StreamClass) -> usize {
    StreamClass::ALL
        .iter()
        .position(|c| *c == class)
        .unwrap_or(0)
}

/// The classes DRR shares the link between, in its round order.
const DRR_CLASSES: [StreamClass; 3] = [StreamClass::Mirror, StreamClass::Memory, StreamClass::Bulk];

impl SessionCore {
    /// The dialing side of a new session named `session_id` (fresh random, non-zero).
    pub fn dialer(
        config: SessionConfig,
        session_id: SessionId,
        now_ns: u64,
    ) -> Result<SessionCore, SessionError> {
        Self::new(
            config,
            Side::Dialer { session_id },
            ResumeToken::NONE,
            now_ns,
        )
    }

    /// The accepting side; `resume_token` (fresh random, non-zero) is handed to the dialer.
    pub fn acceptor(
        config: SessionConfig,
        resume_token: ResumeToken,
        now_ns: u64,
    ) -> Result<SessionCore, SessionError> {
        Self::new(
            config,
            Side::Acceptor { session_id: None },
            resume_token,
            now_ns,
        )
    }

    fn new(
        config: SessionConfig,
        side: Side,
        token: ResumeToken,
        now_ns: u64,
    ) -> Result<SessionCore, SessionError> {
        config.validate()?;
        let frames_max = SEND_BUFFER_FRAMES_MAX;
        Ok(SessionCore {
            config,
            policy: HandshakePolicy {
                version_min: PROTOCOL_VERSION_MIN,
                version_max: PROTOCOL_VERSION_MAX,
                role: config.role,
            },
            side,
            token,
            state: SessionState::Connecting,
            conns: BTreeMap::new(),
            send: StreamClass::ALL.map(|c| SendClass::new(c, config.send_buffer_bytes, frames_max)),
            recv: StreamClass::ALL
                .map(|c| RecvClass::new(c, config.recv_window_bytes, frames_max as u64)),
            drr: Drr::new(config.class_weights),
            resend_control: false,
            events: VecDeque::new(),
            stats: SessionStats::default(),
            failed_attempts: 0,
            next_attempt_ns: now_ns,
            ping_nonce: 0,
            now_ns,
            closing: false,
            finish: Finish::default(),
            tuning: ConnTuning::new(config.connections, config.connections_grow_max, now_ns),
        })
    }

    // ----- Application -----

    /// Queues `payload` as the next frame of `class`.
    pub fn send(&mut self, class: StreamClass, payload: Vec<u8>) -> Result<u64, SendError> {
        if let SessionState::Failed(reason) = &self.state {
            return Err(SendError::Failed(reason.clone()));
        }
        if self.closing || self.state == SessionState::Closed {
            return Err(SendError::Closed);
        }
        if payload.is_empty() || payload.len() > MAX_FRAME_PAYLOAD_BYTES as usize {
            return Err(SendError::PayloadLength { len: payload.len() });
        }
        self.send[class_index(class)].enqueue(payload)
    }

    /// True when `send(class, payload)` with a `len`-byte payload would be queued.
    pub fn can_send(&self, class: StreamClass, len: usize) -> bool {
        self.send[class_index(class)].fits(len)
    }

    /// The next payload of `class`, in order, exactly once.
    pub fn recv(&mut self, class: StreamClass) -> Option<Vec<u8>> {
        self.recv[class_index(class)].take()
    }

    /// The application applied `bytes` more of `class`; this is what opens the window.
    pub fn mark_applied(
        &mut self,
        class: StreamClass,
        bytes: u64,
    ) -> Result<(), AppliedBeyondReceived> {
        self.recv[class_index(class)].mark_applied(bytes)
    }

    /// The session's state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Counters and per-class flow-control state.
    pub fn stats(&self) -> SessionStats {
        let mut stats = self.stats;
        for i in 0..CLASS_COUNT {
            stats.send[i] = self.send[i].stats(self.now_ns);
            stats.recv[i] = self.recv[i].stats();
        }
        stats.ready_connections = self.ready_count();
        stats.connections_target = match self.side {
            Side::Dialer { .. } => self.tuning.target,
            Side::Acceptor { .. } => 0,
        };
        stats
    }

    /// The smoothed RTT, once measured.
    pub fn srtt_ns(&self) -> Option<u64> {
        self.stats.srtt_ns
    }

    /// True when everything sent was acked and nothing waits to be sent.
    pub fn is_send_idle(&self) -> bool {
        self.send
            .iter()
            .all(|s| s.stats(self.now_ns).backlog_bytes == 0)
    }

    // ----- Driver inputs -----

    /// True when the dialer should open a connection now (it is short of connections and
    /// the backoff allows). The acceptor never dials.
    pub fn wants_connection(&self, now_ns: u64) -> bool {
        self.connections_missing(now_ns) > 0
    }

    /// How many connections the dialer should open now, all at once: a driver that dials
    /// them one after the other starts each TCP flow's slow start an RTT or two after the
    /// previous one, which at 200 ms is a second of a half-empty pipe. Zero while the
    /// backoff holds, and on the acceptor.
    pub fn connections_missing(&self, now_ns: u64) -> usize {
        if now_ns < self.next_attempt_ns {
            return 0;
        }
        self.connections_wanted().saturating_sub(self.live_count())
    }

    /// Connections the dialer keeps: one until the session is open (the others join it).
    fn connections_wanted(&self) -> usize {
        match (self.side, &self.state) {
            (Side::Acceptor { .. }, _)
            | (_, SessionState::Failed(_))
            | (_, SessionState::Closed) => 0,
            (Side::Dialer { .. }, SessionState::Connecting) => 1,
            (Side::Dialer { .. }, _) => usize::from(self.tuning.target),
        }
    }

    /// A dial failed before any connection existed: back off.
    pub fn on_connect_failed(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        // Parallel dials fail together: one failed round backs off one step.
        if now_ns >= self.next_attempt_ns {
            self.back_off(now_ns);
        }
    }

    /// A new connection (TLS established) is up. The dialer greets on it.
    pub fn on_connection_up(&mut self, conn: ConnId, now_ns: u64) {
        self.now_ns = now_ns;
        if self.is_over() {
            self.push_event(SessionEvent::ConnectionClosed {
                conn,
                reason: ConnError::SessionEnded,
            });
            return;
        }
        let mut c = Conn {
            phase: Phase::AwaitHello,
            index: 0,
            decoder: FrameDecoder::new(),
            control_out: Vec::new(),
            wire_full: false,
            sent_bytes: 0,
            delivered_bytes: 0,
            received_bytes: 0,
            received_reported: 0,
            report_due_at_ns: None,
            last_rx_ns: now_ns,
            next_ping_ns: now_ns,
            close_after_flush: None,
            retiring: false,
        };
        if let Side::Dialer { session_id } = self.side {
            let opened = self.state != SessionState::Connecting;
            let index = if opened { self.free_index() } else { 0 };
            let hello = Hello {
                version_min: self.policy.version_min,
                version_max: self.policy.version_max,
                role: self.config.role,
                intent: if opened { Intent::Join } else { Intent::Open },
                connection_index: index,
                session_id,
                resume_token: if opened {
                    self.token
                } else {
                    ResumeToken::NONE
                },
            };
            c.index = index;
            c.phase = Phase::AwaitHelloAck { hello };
            push_control(&mut c, &Frame::Hello(hello));
        }
        self.conns.insert(conn, c);
    }

    /// The lowest join index no live connection uses.
    fn free_index(&self) -> u16 {
        (1..self.config.connections_max.max(2))
            .find(|i| self.conns.values().all(|c| c.index != *i))
            .unwrap_or(1)
    }

    /// Bytes arrived on `conn`.
    pub fn on_bytes(&mut self, conn: ConnId, mut bytes: &[u8], now_ns: u64) {
        self.now_ns = now_ns;
        let mut frames = Vec::new();
        let mut error = None;
        {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if c.close_after_flush.is_some() {
                // Refused: nothing more it says counts; the Refuse still goes out.
                return;
            }
            c.last_rx_ns = now_ns;
            while !bytes.is_empty() {
                match c.decoder.decode(&mut bytes) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(ConnError::Decode(e));
                        break;
                    }
                }
            }
        }
        // Frames before a bad one were whole and checked: act on them, then close.
        for frame in frames {
            if let Err(e) = self.on_frame(conn, frame, now_ns) {
                error = Some(e);
                break;
            }
            if !self.conns.contains_key(&conn) {
                return;
            }
        }
        if let Some(reason) = error {
            self.close_conn(conn, reason, now_ns);
        }
    }

    /// `conn` broke or was closed by the peer. Idempotent.
    pub fn on_connection_down(&mut self, conn: ConnId, now_ns: u64) {
        self.now_ns = now_ns;
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        debug!(conn = conn.0, phase = c.phase.name(), "connection down");
        let mut requeued = 0;
        for s in self.send.iter_mut() {
            requeued += s.requeue(conn);
        }
        if requeued > 0 {
            debug!(
                conn = conn.0,
                requeued, "requeued frames of a lost connection"
            );
        }
        if c.phase != Phase::Ready {
            self.back_off(now_ns);
        }
        if self.state == SessionState::Established && self.ready_count() == 0 {
            info!(now_ns, "every connection lost; reconnecting");
            self.state = SessionState::Reconnecting { since_ns: now_ns };
        }
    }

    /// Time passed: pings, acks, idle and resume deadlines.
    pub fn on_timer(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        if self.is_over() {
            return;
        }
        if let SessionState::Reconnecting { since_ns } = self.state {
            if now_ns >= since_ns.saturating_add(self.config.resume_window_ns) {
                self.fail(SessionError::ResumeWindowExpired {
                    window_ns: self.config.resume_window_ns,
                    down_since_ns: since_ns,
                });
                return;
            }
        }
        for r in self.recv.iter_mut() {
            r.on_timer(now_ns);
        }
        self.tune_connections(now_ns);
        self.close_retired();
        let mut idle = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            // The same timeout bounds a handshake that never completes, so a silent
            // peer cannot hold a connection slot forever.
            if now_ns >= c.last_rx_ns.saturating_add(self.config.idle_timeout_ns) {
                idle.push(*id);
            } else if c.phase == Phase::Ready && now_ns >= c.next_ping_ns {
                c.next_ping_ns = now_ns + self.config.ping_interval_ns;
                self.ping_nonce += 1;
                let ping = Ping {
                    nonce: self.ping_nonce,
                    sent_at_ns: now_ns,
                };
                push_control(c, &Frame::Ping(ping));
            }
        }
        for id in idle {
            let idle_ns = self.config.idle_timeout_ns;
            self.close_conn(id, ConnError::IdleTimeout { idle_ns }, now_ns);
        }
    }

    // ----- Driver outputs -----

    /// The next time `on_timer` has work, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.is_over() {
            return None;
        }
        let mut t = None::<u64>;
        let mut at = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        if let SessionState::Reconnecting { since_ns } = self.state {
            at(since_ns.saturating_add(self.config.resume_window_ns));
        }
        // Acks leave only on a ready connection; without one, waking for them would spin.
        if self.ready_count() > 0 {
            for r in &self.recv {
                if let Some(due) = r.ack_due_at_ns {
                    at(due);
                }
            }
        }
        for c in self.conns.values() {
            if c.phase == Phase::Ready {
                at(c.next_ping_ns);
                if let Some(due) = c.report_due_at_ns {
                    at(due);
                }
            }
            at(c.last_rx_ns.saturating_add(self.config.idle_timeout_ns));
        }
        if self.live_count() < self.connections_wanted() {
            at(self.next_attempt_ns);
        }
        if let (Some(due), Side::Dialer { .. }) = (self.tuning.next_probe_ns(), self.side) {
            at(due);
        }
        t
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Tells the core whether `conn`'s socket already holds as much unacknowledged and
    /// unsent data as it should (see the driver); while it does, `conn` gets no new data.
    pub fn set_wire_full(&mut self, conn: ConnId, full: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.wire_full = full;
        }
    }

    /// Encoded frames to write on `conn`, if it has anything to send now.
    pub fn poll_transmit(&mut self, conn: ConnId) -> Option<Vec<u8>> {
        let (over, now_ns) = (self.is_over(), self.now_ns);
        let c = self.conns.get_mut(&conn)?;
        let mut out = std::mem::take(&mut c.control_out);
        if let Some(reason) = c.close_after_flush.take() {
            self.conns.remove(&conn);
            // A graceful end is not a connection closed for an error.
            let graceful = matches!(reason, ConnError::SessionEnded | ConnError::Retired);
            self.stats.connections_closed += u64::from(!graceful);
            self.push_event(SessionEvent::ConnectionClosed { conn, reason });
            return (!out.is_empty()).then_some(out);
        }
        if c.phase == Phase::Ready && !over {
            write_delivered(c, now_ns, &mut out);
            self.write_flow_control(&mut out);
            while out.len() < TRANSMIT_BATCH_BYTES {
                if !self.write_one_data(conn, &mut out) {
                    break;
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    fn write_flow_control(&mut self, out: &mut Vec<u8>) {
        let force = std::mem::take(&mut self.resend_control);
        for (i, class) in StreamClass::ALL.into_iter().enumerate() {
            if let Some(limit_bytes) = self.recv[i].credit_due(force) {
                let credit = Frame::Credit(Credit { class, limit_bytes });
                let _ = encode_frame_into(&credit, out);
            }
            if let Some(seq) = self.recv[i].ack_due(force) {
                let _ = encode_frame_into(&Frame::Ack(Ack { class, seq }), out);
            }
        }
    }

    /// Appends one data frame for `conn`; false when nothing may be sent.
    fn write_one_data(&mut self, conn: ConnId, out: &mut Vec<u8>) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        if c.inflight_bytes() >= self.config.conn_inflight_bytes_max || c.retiring || c.wire_full {
            return false;
        }
        let Some(class_i) = self.pick_class() else {
            return false;
        };
        let class = StreamClass::ALL[class_i];
        let Some((seq, _)) = self.send[class_i].next_sendable() else {
            return false;
        };
        let Some((payload, retransmit)) = self.send[class_i].take(seq, conn) else {
            return false;
        };
        let len = payload.len() as u64;
        if encode_data_into(class, seq, retransmit, payload, out).is_err() {
            return false;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.sent_bytes += len;
        }
        true
    }

    /// Control by strict priority, then deficit round robin by bytes.
    fn pick_class(&mut self) -> Option<usize> {
        if self.send[0].next_sendable().is_some() {
            return Some(0);
        }
        let ready_len = DRR_CLASSES.map(|c| {
            self.send[class_index(c)]
                .next_sendable()
                .map(|(_, len)| len)
        });
        let i = self.drr.pick(ready_len)?;
        Some(class_index(DRR_CLASSES[i]))
    }

    // ----- Frames -----

    fn on_frame(&mut self, conn: ConnId, frame: Frame, now_ns: u64) -> Result<(), ConnError> {
        let Some(phase) = self.conns.get(&conn).map(|c| c.phase) else {
            return Ok(());
        };
        let unexpected = |frame: &Frame| ConnError::UnexpectedFrame {
            frame_type: frame.frame_type(),
            phase: phase.name(),
        };
        match (phase, frame) {
            (Phase::AwaitHello, Frame::Hello(hello)) => {
                self.on_hello(conn, hello, now_ns);
                Ok(())
            }
            (Phase::AwaitHelloAck { hello }, reply) => {
                self.on_hello_reply(conn, hello, &reply, now_ns)
            }
            (Phase::AwaitResumeRequest, Frame::ResumeRequest(point)) => {
                if self.apply_resume_point(&point, now_ns) {
                    let ours = self.resume_point();
                    if let Some(c) = self.conns.get_mut(&conn) {
                        push_control(c, &Frame::ResumeState(ours));
                    }
                    self.conn_ready(conn, now_ns);
                }
                Ok(())
            }
            (Phase::AwaitResumeState, Frame::ResumeState(point)) => {
                if self.apply_resume_point(&point, now_ns) {
                    self.conn_ready(conn, now_ns);
                }
                Ok(())
            }
            (Phase::Ready, frame) => self.on_ready_frame(conn, frame, now_ns),
            (_, frame) => Err(unexpected(&frame)),
        }
    }

    fn on_ready_frame(&mut self, conn: ConnId, frame: Frame, now_ns: u64) -> Result<(), ConnError> {
        match frame {
            Frame::Data(d) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.received_bytes += d.payload.len() as u64;
                    c.report_due_at_ns
                        .get_or_insert(now_ns.saturating_add(self.config.ack_delay_ns));
                }
                let i = class_index(d.class);
                self.recv[i].on_data(
                    d.seq,
                    d.payload,
                    now_ns,
                    self.config.ack_delay_ns,
                    ACK_EVERY_BYTES,
                )?;
            }
            Frame::Credit(c) => self.send[class_index(c.class)].on_credit(c.limit_bytes),
            Frame::Delivered(d) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if d.bytes > c.sent_bytes {
                        return Err(ConnError::DeliveredBeyondSent {
                            delivered_bytes: d.bytes,
                            sent_bytes: c.sent_bytes,
                        });
                    }
                    c.delivered_bytes = c.delivered_bytes.max(d.bytes);
                }
                self.close_retired();
            }
            Frame::Ack(a) => {
                self.on_ack(a.class, a.seq, now_ns)?;
                self.close_retired();
                self.maybe_finish();
            }
            Frame::Ping(p) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    push_control(c, &Frame::Pong(p));
                    if c.control_out.len() > CONN_CONTROL_QUEUE_BYTES_MAX {
                        return Err(ConnError::ControlQueueFull);
                    }
                }
            }
            Frame::Pong(p) => {
                // Only our own clock is trusted: a forged future timestamp is ignored.
                if p.sent_at_ns <= now_ns {
                    let rtt_ns = now_ns - p.sent_at_ns;
                    let srtt = self.stats.srtt_ns.map_or(rtt_ns, |s| (s * 7 + rtt_ns) / 8);
                    self.stats.srtt_ns = Some(srtt);
                }
            }
            Frame::Close(c) if c.reason == CloseReason::Done => self.on_peer_done(),
            Frame::Close(c) => {
                self.fail(SessionError::PeerClosed { reason: c.reason });
            }
            other => {
                return Err(ConnError::UnexpectedFrame {
                    frame_type: other.frame_type(),
                    phase: Phase::Ready.name(),
                })
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, class: StreamClass, seq: u64, now_ns: u64) -> Result<(), ConnError> {
        self.send[class_index(class)]
            .on_ack(seq, now_ns)
            .map_err(|e| ConnError::AckBeyondSent {
                class,
                seq: e.seq,
                highest_sent_seq: e.highest_sent_seq,
            })?;
        // Per-connection in-flight follows `Delivered`, not this cumulative ack.
        Ok(())
    }

    // ----- Helpers -----

    fn close_conn(&mut self, conn: ConnId, reason: ConnError, now_ns: u64) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        warn!(conn = conn.0, %reason, "closing connection");
        // Forget it now, so its frames go to other connections; the driver's later
        // report of it going down is ignored.
        self.on_connection_down(conn, now_ns);
        self.stats.connections_closed += 1;
        self.push_event(SessionEvent::ConnectionClosed { conn, reason });
    }

    fn fail(&mut self, reason: SessionError) {
        if matches!(self.state, SessionState::Failed(_)) {
            return;
        }
        warn!(%reason, "session failed");
        self.state = SessionState::Failed(reason.clone());
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.conns.remove(&conn);
            self.push_event(SessionEvent::ConnectionClosed {
                conn,
                reason: ConnError::SessionEnded,
            });
        }
        self.push_event(SessionEvent::Failed { reason });
    }

    fn back_off(&mut self, now_ns: u64) {
        let i = self.failed_attempts.min(RECONNECT_BACKOFF_NS.len() - 1);
        self.next_attempt_ns = now_ns.saturating_add(RECONNECT_BACKOFF_NS[i]);
        self.failed_attempts = self.failed_attempts.saturating_add(1);
    }

    fn ready_count(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.phase == Phase::Ready)
            .count()
    }

    fn live_count(&self) -> usize {
        self.conns.len()
    }

    fn push_event(&mut self, event: SessionEvent) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Closed or failed: nothing more happens but the flush of the last control frames.
    fn is_over(&self) -> bool {
        matches!(self.state, SessionState::Closed | SessionState::Failed(_))
    }

    /// True while some connection has control frames (such as a `Close`) not yet
    /// handed to the driver.
    pub fn has_unsent_control(&self) -> bool {
        self.conns.values().any(|c| !c.control_out.is_empty())
    }
}

/// Appends `Delivered` for what arrived on `c` when enough did, or the oldest unreported
/// byte waited [`SessionConfig::ack_delay_ns`].
fn write_delivered(c: &mut Conn, now_ns: u64, out: &mut Vec<u8>) {
    let unreported = c.received_bytes - c.received_reported;
    let due = c.report_due_at_ns.is_some_and(|t| t <= now_ns);
    if unreported >= CONN_DELIVERED_EVERY_BYTES || (unreported > 0 && due) {
        let report = Frame::Delivered(Delivered {
            bytes: c.received_bytes,
        });
        let _ = encode_frame_into(&report, out);
        c.received_reported = c.received_bytes;
        c.report_due_at_ns = None;
    }
}

fn push_control(c: &mut Conn, frame: &Frame) {
    // Control frames always encode: they have fixed sizes and no sequence number.
    let _ = encode_frame_into(frame, &mut c.control_out);
}
