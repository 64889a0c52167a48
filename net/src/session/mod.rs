//! The session layer: one logical, resumable, flow-controlled link striped over several
//! connections, as narrated in [`crate::protocol`].
//!
//! [`SessionCore`] is *sans-IO* (in the manner of quinn-proto): it owns every protocol
//! decision and does no I/O and reads no clock. A driver feeds it what happened
//! (`on_connection_up`, `on_bytes`, `on_connection_down`, `on_timer`, each with the time
//! `now_ns`), and takes what it wants done (`poll_transmit` per connection,
//! `poll_timeout`, `poll_event`, `wants_connection`). The same core runs under the
//! deterministic [`crate::sim::SimNet`] ([`sim_driver`]) and over real sockets ([`tcp`]).
//!
//! # State machine
//!
//! ```text
//!   Connecting --first handshake--> Established --last connection lost--> Reconnecting
//!       |                              ^                                      |
//!       | Refuse / bad HelloAck        +---- a joined connection resumed -----+
//!       v                                                                     |
//!    Failed <----------- resume window expired / resume violation ------------+
//!
//!   Established or Reconnecting --both sides sent Close{Done} (step 9)--> Closed
//! ```
//!
//! [`SessionCore::close_gracefully`] (or the peer's `Close { Done }`) starts the graceful
//! close: new sends are refused, what is queued is still sent, resent and resumed, and the
//! session reaches `Closed` only once both sides saw everything they sent acked.
//!
//! Each connection has its own phase: the dialer sends `Hello` and waits for `HelloAck`;
//! the acceptor waits for `Hello`. An `Open` connection is ready after the handshake; a
//! `Join` connection is ready after the `ResumeRequest` / `ResumeState` exchange, which
//! also acts as a cumulative ack for every class. Only ready connections carry data,
//! credits, acks and pings.
//!
//! # Sending
//!
//! Each class has a bounded send buffer that is also its retransmit buffer: a frame stays
//! from `send` until it is acked. A connection pulls frames when its driver can write
//! (`poll_transmit`): Control first (strict priority), then deficit round robin by bytes
//! among Mirror, Memory and Bulk with [`DEFAULT_CLASS_WEIGHTS`], within the peer's
//! credit and the connection's in-flight bound. Striping follows from the pull: a fast or
//! idle connection pulls more. Frames in flight on a connection that goes down are queued
//! again, flagged as retransmits, for the other connections; the receiver drops
//! duplicates by sequence number.

mod core;
mod recv;
mod sched;
mod send;
pub mod sim_driver;
pub mod tcp;
#[cfg(test)]
mod tests;

use thiserror::Error;

pub use self::core::{SessionCore, SessionState, SessionStats};
pub use self::recv::{AppliedBeyondReceived, RecvStats};
pub use self::send::{SendStats, DRAIN_RATE_WINDOW_NS};
use crate::protocol::{
    CloseReason, DecodeError, FrameType, HandshakeError, Refuse, Role, MAX_FRAME_PAYLOAD_BYTES,
};
use crate::StreamClass;

const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// Receive window per class, the credit a receiver grants beyond what it applied: three
/// bandwidth-delay products of 1 Gbit/s × 250 ms (29.8 MiB each), rounded to 96 MiB. One
/// is in flight. The second is what the other connections keep delivering while one TCP
/// connection repairs a loss: TCP hands nothing after a hole to the session until the
/// retransmission arrives, about an RTT later, and at 0.1 % loss each connection has a
/// hole most of the time. The third covers the credit's own trip back and the grant
/// batching ([`CREDIT_GRANT_FRACTION`]). Measured at 214 ms with 0.1 % loss (mutual
/// TLS): 64 MiB gave 0.76 of the link, 96 MiB 0.85 (`bench/results/link.md`). Memory is
/// only used by a class that is behind; four busy classes bound a session's receive
/// buffering at 384 MiB.
pub const RECV_WINDOW_BYTES: u64 = 96 << 20;

/// Send buffer per class (queued plus unacked): a full window in flight plus a quarter
/// window queued, so the application can stay about 60 ms of link time ahead of the wire.
pub const SEND_BUFFER_BYTES: u64 = RECV_WINDOW_BYTES + RECV_WINDOW_BYTES / 4;

/// Most frames per class in the send buffer (and so the receiver's reorder span): small
/// payloads would otherwise make the per-frame bookkeeping of a byte-bounded buffer
/// unbounded. 64 Ki frames of 512 bytes fill a window.
pub const SEND_BUFFER_FRAMES_MAX: usize = 1 << 16;

/// A credit grant goes out when the window has opened by this fraction since the last:
/// a quarter keeps the sender ahead by three quarters of a window while sending about
/// four grants per window instead of one per frame.
pub const CREDIT_GRANT_FRACTION: u64 = 4;

/// Bytes delivered in order after which an ack goes out at once: 1 MiB, a thirty-second
/// of the window, so the retransmit buffer is freed well before the sender stalls.
pub const ACK_EVERY_BYTES: u64 = 1 << 20;

/// Longest an ack waits for more data: short against the RTT, so it barely delays the
/// freeing of the sender's buffer, while batching the acks of a burst.
pub const ACK_DELAY_NS: u64 = 5 * NS_PER_MS;

/// Data bytes one connection may have sent and the peer not yet reported delivered on it
/// (`Delivered`, not the class `Ack`, so a loss being repaired on one connection does not
/// hold back the others). It counts what is on the wire *and* what the peer's TCP holds
/// behind a hole, so it is twice the TCP driver's network bound per connection (10 MiB,
/// see `tcp::CONN_WIRE_BYTES_MAX`), rounded up: the driver keeps the network from
/// being overfilled, this bound keeps a connection that stalls from taking every byte of
/// credit. It also bounds what one lost connection makes the session retransmit.
pub const CONN_INFLIGHT_BYTES_MAX: u64 = 16 << 20;

/// Bytes delivered on one connection after which the receiver reports them at once with
/// `Delivered`: 256 KiB, a fiftieth of [`CONN_INFLIGHT_BYTES_MAX`], so the sender's view of
/// a connection lags by well under its bound; [`ACK_DELAY_NS`] reports the rest.
pub const CONN_DELIVERED_EVERY_BYTES: u64 = 256 << 10;

/// Most bytes one `poll_transmit` returns (one frame may exceed it, up to a full frame):
/// large enough to amortise a write call, small enough that a Control frame waits for at
/// most this much of the same connection's queue.
pub const TRANSMIT_BATCH_BYTES: usize = 256 << 10;

/// Bytes of control frames (pongs, handshake, resume) queued on one connection. A peer
/// that floods pings without reading pongs is closed once this is reached.
pub const CONN_CONTROL_QUEUE_BYTES_MAX: usize = 64 << 10;

/// Interval between pings on a connection: often enough for an RTT estimate that
/// follows path changes and for a liveness signal, negligible in bytes.
pub const PING_INTERVAL_NS: u64 = NS_PER_S;

/// A ready connection that received nothing for this long is dead: ten pings at 1 s
/// against at most 250 ms RTT, so only a dead or badly stalled path trips it.
pub const CONN_IDLE_TIMEOUT_NS: u64 = 10 * NS_PER_S;

/// How long a session waits for a connection to come back before failing.
pub const DEFAULT_RESUME_WINDOW_NS: u64 = 30 * NS_PER_S;

/// Delay before retrying after the n-th consecutive failed connection attempt (the last
/// entry repeats). The first dial after a connection is lost goes at once (a single reset
/// is common); failures then back off to 2 s, so a dead peer costs at most a few dials
/// per second, and a 5 s outage is noticed within 2 s of its end, well inside the
/// resume window.
pub const RECONNECT_BACKOFF_NS: [u64; 5] = [
    100 * NS_PER_MS,
    200 * NS_PER_MS,
    500 * NS_PER_MS,
    NS_PER_S,
    2 * NS_PER_S,
];

/// Default DRR weights of Mirror, Memory and Bulk. Guest writes (Mirror) and the memory
/// stream both sit on the migration's critical path, so they share equally; the
/// background disk copy gets a ninth of a saturated link, enough to make progress.
pub const DEFAULT_CLASS_WEIGHTS: [u32; 3] = [4, 4, 1];

/// DRR quantum per unit of weight: 64 KiB, so a weight-1 class sends a 1 MiB frame
/// after 16 rounds and the shares are exact within a few frames.
pub const DRR_QUANTUM_BYTES: u64 = 64 << 10;

/// Default number of connections a dialer keeps: 4 × 8 MiB in flight covers the BDP.
pub const DEFAULT_CONNECTIONS: u16 = 4;

/// Fewest connections a dialer that sizes its connection count
/// ([`SessionConfig::connections_grow_max`]) starts with: two survive one reset without a
/// resume stall and double what one TCP window carries.
pub const MIN_CONNECTIONS: u16 = 2;

/// Most connections a dialer grows to: 1 Gbit/s × 250 ms is 31 MB in flight, eight
/// connections at the 4 MiB window a default Linux sender reaches; sixteen leave room
/// for windows halved by loss, and stay within [`DEFAULT_CONNECTIONS_MAX`] so a default
/// acceptor admits them all.
pub const MAX_CONNECTIONS: u16 = 16;

/// How long the dialer runs at a connection count before judging it: a join takes a few
/// RTTs (at most about a second at 250 ms), then the drain rate needs its whole
/// [`DRAIN_RATE_WINDOW_NS`] at the new count.
pub const CONN_PROBE_INTERVAL_NS: u64 = DRAIN_RATE_WINDOW_NS + NS_PER_S;

/// Rise of the drain rate, in percent, that justifies the connections added last: less
/// means the bottleneck is the path or the receiver, where more connections only add
/// state and retransmission exposure, so the dialer goes back to the previous count.
pub const CONN_PROBE_GAIN_MIN_PERCENT: u64 = 10;

/// Default connections an acceptor admits per session: room for replacements of
/// connections it has not yet noticed are dead.
pub const DEFAULT_CONNECTIONS_MAX: u16 = 16;

/// Most events queued for the driver; they follow connection changes, so a driver that
/// polls at all never comes near it. Past it the oldest is dropped and counted.
pub const EVENTS_MAX: usize = 1024;

/// Settings of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// This engine's role in the migration.
    pub role: Role,
    /// See [`RECV_WINDOW_BYTES`]; at least one frame.
    pub recv_window_bytes: u64,
    /// See [`SEND_BUFFER_BYTES`]; at least one frame.
    pub send_buffer_bytes: u64,
    /// See [`CONN_INFLIGHT_BYTES_MAX`].
    pub conn_inflight_bytes_max: u64,
    /// See [`DEFAULT_RESUME_WINDOW_NS`].
    pub resume_window_ns: u64,
    /// DRR weights of Mirror, Memory, Bulk; each at least 1.
    pub class_weights: [u32; 3],
    /// Connections the dialer keeps up (the starting count when it grows).
    pub connections: u16,
    /// The dialer doubles its connections up to this count while each doubling raises the
    /// drain rate by [`CONN_PROBE_GAIN_MIN_PERCENT`] with data waiting to be sent, and
    /// returns to the previous count when one does not. At most `connections` (the
    /// default) keeps the count fixed.
    pub connections_grow_max: u16,
    /// Connections the acceptor admits.
    pub connections_max: u16,
    /// See [`ACK_DELAY_NS`].
    pub ack_delay_ns: u64,
    /// See [`PING_INTERVAL_NS`].
    pub ping_interval_ns: u64,
    /// See [`CONN_IDLE_TIMEOUT_NS`].
    pub idle_timeout_ns: u64,
}

impl SessionConfig {
    /// The defaults for `role`.
    pub fn new(role: Role) -> SessionConfig {
        SessionConfig {
            role,
            recv_window_bytes: RECV_WINDOW_BYTES,
            send_buffer_bytes: SEND_BUFFER_BYTES,
            conn_inflight_bytes_max: CONN_INFLIGHT_BYTES_MAX,
            resume_window_ns: DEFAULT_RESUME_WINDOW_NS,
            class_weights: DEFAULT_CLASS_WEIGHTS,
            connections: DEFAULT_CONNECTIONS,
            connections_grow_max: DEFAULT_CONNECTIONS,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            ack_delay_ns: ACK_DELAY_NS,
            ping_interval_ns: PING_INTERVAL_NS,
            idle_timeout_ns: CONN_IDLE_TIMEOUT_NS,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let frame = u64::from(MAX_FRAME_PAYLOAD_BYTES);
        if self.recv_window_bytes < frame || self.send_buffer_bytes < frame {
            return Err(ConfigError::BufferBelowFrame);
        }
        if self.class_weights.contains(&0) {
            return Err(ConfigError::ZeroWeight);
        }
        let max = crate::protocol::MAX_CONNECTIONS_PER_SESSION;
        if self.connections == 0
            || self.connections >= max
            || self.connections_grow_max >= max
            || !(1..=max).contains(&self.connections_max)
        {
            return Err(ConfigError::Connections);
        }
        Ok(())
    }
}

/// A session configuration that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A window or buffer below [`MAX_FRAME_PAYLOAD_BYTES`] could never pass a full frame.
    #[error("receive window and send buffer must hold at least one {MAX_FRAME_PAYLOAD_BYTES}-byte frame")]
    BufferBelowFrame,
    /// A zero weight would starve its class.
    #[error("class weights must be at least 1")]
    ZeroWeight,
    /// Connection counts outside the protocol's range.
    #[error(
        "connections must be in 1..{}",
        crate::protocol::MAX_CONNECTIONS_PER_SESSION
    )]
    Connections,
}

/// Names a connection; chosen by the driver, unique for the life of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Why `send` refused a payload; the payload is not queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendError {
    /// The class's send buffer is full; retry once acks free it.
    #[error("{class:?} send buffer full ({backlog_bytes} bytes queued or unacked)")]
    WouldBlock {
        /// The class.
        class: StreamClass,
        /// Bytes in its buffer.
        backlog_bytes: u64,
    },
    /// Payloads are 1..=[`MAX_FRAME_PAYLOAD_BYTES`] bytes.
    #[error("payload of {len} bytes is outside 1..={MAX_FRAME_PAYLOAD_BYTES}")]
    PayloadLength {
        /// The payload's length.
        len: usize,
    },
    /// This side closed the session.
    #[error("session closed")]
    Closed,
    /// The session failed; nothing more is sent.
    #[error("session failed: {0}")]
    Failed(SessionError),
}

/// Why a connection was closed by the session (the session itself carries on).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    /// The byte stream could not be decoded.
    #[error("bad frame")]
    Decode(#[from] DecodeError),
    /// A frame that the connection's phase does not allow.
    #[error("unexpected {frame_type:?} frame while {phase}")]
    UnexpectedFrame {
        /// What came.
        frame_type: FrameType,
        /// The connection's phase.
        phase: &'static str,
    },
    /// The peer sent beyond the credit granted.
    #[error("{class:?}: peer sent {received_bytes} bytes, only {granted_bytes} granted")]
    CreditExceeded {
        /// The class.
        class: StreamClass,
        /// Distinct bytes including the offending frame.
        received_bytes: u64,
        /// The grant.
        granted_bytes: u64,
    },
    /// A seq too far ahead of what is contiguous.
    #[error("{class:?}: seq {seq} is beyond the reorder window after {contiguous_seq}")]
    ReorderOverflow {
        /// The class.
        class: StreamClass,
        /// The seq received.
        seq: u64,
        /// Every seq up to this one was received.
        contiguous_seq: u64,
    },
    /// A `Delivered` report of more than the connection carried.
    #[error(
        "peer reported {delivered_bytes} bytes delivered on a connection that carried {sent_bytes}"
    )]
    DeliveredBeyondSent {
        /// Bytes the peer reported.
        delivered_bytes: u64,
        /// Bytes sent on the connection.
        sent_bytes: u64,
    },
    /// An ack for frames never sent.
    #[error("{class:?}: ack of seq {seq}, only {highest_sent_seq} sent")]
    AckBeyondSent {
        /// The class.
        class: StreamClass,
        /// The acked seq.
        seq: u64,
        /// The highest seq sent.
        highest_sent_seq: u64,
    },
    /// We refused the peer's `Hello`.
    #[error("refused the peer's hello: {}", .0.reason)]
    Refused(Refuse),
    /// The peer refused ours for a reason a later attempt may not have.
    #[error("peer refused the connection")]
    PeerRefused(#[source] HandshakeError),
    /// The peer never read its control frames.
    #[error("control queue over {CONN_CONTROL_QUEUE_BYTES_MAX} bytes")]
    ControlQueueFull,
    /// Nothing received for the idle timeout.
    #[error("nothing received for {idle_ns} ns")]
    IdleTimeout {
        /// The timeout.
        idle_ns: u64,
    },
    /// The peer joined a new connection with this one's index.
    #[error("replaced by a new connection with the same index")]
    Replaced,
    /// The session ended.
    #[error("session ended")]
    SessionEnded,
    /// The dialer went back to fewer connections; this one finished its in-flight data.
    #[error("retired: fewer connections carry the session as fast")]
    Retired,
}

/// Why a session failed. Reported by both sides where both can tell.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// No connection came back within the resume window.
    #[error("no connection resumed within the {window_ns} ns resume window (down since {down_since_ns} ns)")]
    ResumeWindowExpired {
        /// The window.
        window_ns: u64,
        /// When the last connection went down.
        down_since_ns: u64,
    },
    /// The handshake failed in a way a retry cannot fix.
    #[error("handshake failed")]
    Handshake(#[source] HandshakeError),
    /// The peer's resume point names frames this side never sent.
    #[error("{class:?}: peer resumes from seq {stated}, we hold {acked_seq}..={highest_sent_seq}")]
    ResumeViolation {
        /// The class.
        class: StreamClass,
        /// The peer's stated seq.
        stated: u64,
        /// What the peer had acked.
        acked_seq: u64,
        /// What was sent.
        highest_sent_seq: u64,
    },
    /// The peer closed the session.
    #[error("peer closed the session: {reason:?}")]
    PeerClosed {
        /// Its reason.
        reason: CloseReason,
    },
    /// The configuration cannot work.
    #[error("invalid session configuration")]
    Config(#[from] ConfigError),
}

/// What the session tells its driver and application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The first connection completed its handshake.
    Connected,
    /// A connection came back after all were lost; `retransmitted_bytes` will be sent again.
    Resumed {
        /// Bytes queued for retransmission when the session resumed.
        retransmitted_bytes: u64,
    },
    /// The session closed `conn`: the driver closes its socket and does not report it down.
    ConnectionClosed {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: ConnError,
    },
    /// Both sides finished gracefully (step 9): everything either side sent was acked.
    /// Each connection is reported `ConnectionClosed` once its last frames are handed out.
    Closed,
    /// The session failed; drivers close every connection.
    Failed {
        /// Why.
        reason: SessionError,
    },
}
