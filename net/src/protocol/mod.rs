//! The wire protocol of the engine-to-engine link: framing, the handshake and the control
//! payloads.
//!
//! # Message sequence
//!
//! The *dialer* opens the TCP connections; the *acceptor* listens. Which engine dials is a
//! deployment choice: the migration direction is stated separately, as each side's
//! [`Role`]. One session stripes its frames over several connections (TLS 1.3 on each,
//! set up before any byte below is sent); every frame is a [`FRAME_HEADER_BYTES`] header
//! followed by its payload, checked by a CRC32C.
//!
//! 1. Dialer -> Acceptor, on its first connection: `Hello { version_min..=version_max,
//!    role, intent: Open, session_id: fresh random, resume_token: zero,
//!    connection_index: 0 }`.
//! 2. Acceptor -> Dialer: the acceptor checks the Hello ([`negotiate`]). An incompatible
//!    peer gets `Refuse { reason, the acceptor's version range }` and the connection is
//!    closed; the dialer logs a sentence such as "peer supports protocol versions 2..=3,
//!    we support 1..=1" ([`HandshakeError::Refused`]) and does not retry what a retry
//!    cannot fix. Otherwise `HelloAck { version: the highest both support, the acceptor's
//!    role, session_id and connection_index echoed, resume_token: fresh random secret,
//!    connections_max }`; the dialer checks it ([`check_hello_ack`]).
//! 3. Join, once per further connection `i` in `1..connections_max`: Dialer -> Acceptor
//!    `Hello { intent: Join, session_id, resume_token, connection_index: i }`; the
//!    acceptor finds the session, compares the token in constant time
//!    ([`ResumeToken::matches`]) and answers `HelloAck` or `Refuse { UnknownSession |
//!    BadResumeToken | TooManyConnections }`. A joined connection carries every class.
//! 4. Credit, either direction, on any connection: the receiver of a class grants
//!    `Credit { class, limit_bytes }`. The limit is cumulative (the total payload bytes of
//!    that class the sender may ever have sent, counting each sequence number once), so a
//!    grant lost with a broken connection or overtaken by a later one on another
//!    connection is harmless: the sender keeps the largest it has seen.
//! 5. Data, either direction: `Data { class, seq, payload }` with `seq` counting from 1
//!    per class and direction. The sender stripes frames over the connections within its
//!    credit; the receiver puts each class back in `seq` order across connections and
//!    silently drops a `seq` it already holds (expected after a resume).
//! 6. Ack: the receiver of a class sends `Ack { class, seq }`: every frame of that class
//!    up to and including `seq` has been received and handed on. Acks are cumulative, so,
//!    like credits, the largest wins. The sender frees its retransmit buffer up to `seq`.
//!    `Delivered { bytes }`, on each connection that carries data: the total payload
//!    bytes of `Data` frames (every class, duplicates too) that arrived on *this*
//!    connection, sent on the same connection. It tells the sender what each connection
//!    has delivered, independently of `Ack`, which waits for every earlier `seq` of the
//!    class whichever connection carried it: a loss repaired on one connection then does
//!    not make the others look full ([`crate::session::CONN_INFLIGHT_BYTES_MAX`]).
//!    Cumulative, so the largest wins; more than the connection carried is a protocol
//!    violation.
//! 7. Ping/Pong: `Ping { nonce, sent_at_ns }` is echoed unchanged as `Pong`; the sender
//!    measures the connection's RTT against its own clock and counts a connection that
//!    stays silent as dead.
//! 8. Resume: a connection that breaks (reset, timeout, bad frame) loses whatever was in
//!    flight on it. The dialer joins a replacement connection (step 3, also after every
//!    connection was lost, while the acceptor keeps the session), then sends
//!    `ResumeRequest { last_seq_received per class }` and the acceptor answers
//!    `ResumeState { last_seq_received per class }`, where `last_seq_received` is the
//!    highest `seq` below which nothing is missing. Each side then retransmits from its
//!    buffer every frame after what the peer stated, flagged [`Data::retransmit`]. A
//!    stated `seq` beyond what was ever sent is a protocol violation and ends the session.
//!    A stated `seq` below what the peer already acked is stale, not wrong: with several
//!    connections rejoining at once, an `Ack` sent later on another connection can arrive
//!    first. Acks are cumulative, so a stale point is ignored.
//! 9. Close. Graceful: a side that is done refuses further payloads from its
//!    application, keeps sending (and after a resume, resending) what it queued, and once
//!    the peer acked every class sends `Close { reason: Done }` on every ready connection
//!    (again on each connection that becomes ready later, in case all were lost). A peer
//!    that receives `Close { Done }` learns that the sender has nothing more to send and
//!    that everything it sent was received; it too refuses new payloads, finishes sending
//!    what it queued, however much is still unacked, and then answers with its own
//!    `Close { Done }`. A side that has both sent and received `Done` is *closed* (not
//!    failed): every byte either side sent was acked. It flushes its last frames, ends
//!    each connection with TLS close_notify and a FIN, and stops. Both sides may start
//!    at once; duplicates of `Done` are harmless. Abrupt: `Close` with any other
//!    [`CloseReason`] ends the session at once and the peer reports it as failed.
//! 10. A bad frame (wrong magic, unknown wire version, type, class or flags, non-zero
//!     padding, a length over [`MAX_FRAME_PAYLOAD_BYTES`] or wrong for its type, a CRC
//!     mismatch, a payload field out of range) means the byte stream of that connection
//!     can no longer be trusted: [`FrameDecoder`] stops there and keeps returning the same
//!     [`DecodeError`], and the owner closes that connection with the error logged and
//!     counted. Nothing of the bad frame is acted on. The session carries on over its
//!     other connections and recovers the lost frames by a resume (step 8).
//!
//! The header's `wire_version` versions this framing; `Hello`'s version range versions
//! the protocol above it. A header with another wire version is refused before anything
//! else is read, so the magic, the wire version byte and the `Refuse` frame keep their
//! layout in every later wire version: an old peer can always say why it refuses.
//!
//! # Frame header
//!
//! ```text
//! offset size field
//!  0     4    magic          FRAME_MAGIC
//!  4     1    wire_version   WIRE_VERSION
//!  5     1    frame_type     FrameType code
//!  6     1    class          stream class code; Control on every non-Data frame
//!  7     1    flags          bit 0: retransmit, on Data only; other bits zero
//!  8     8    seq            per-class sequence number on Data (>= 1); zero otherwise
//! 16     4    payload_len    bytes after the header, <= MAX_FRAME_PAYLOAD_BYTES
//! 20     4    crc32c         CRC32C of the header (this field zeroed) then the payload
//! 24     8    reserved       zero
//! ```
//!
//! All fields are little-endian and align 1, so the struct has no implicit padding; the
//! explicit `reserved` bytes round the header to 32 bytes so a payload read into the same
//! buffer starts 32-byte aligned for the copy into guest memory or the disk.
//!
//! # Payloads
//!
//! Little-endian, fixed size per type (a different length is a bad frame), padding zero:
//!
//! ```text
//! Hello          40  version_min u16, version_max u16, role u8, intent u8,
//!                    connection_index u16, session_id [16], resume_token [16]
//! HelloAck       40  version u16, role u8, pad u8, connection_index u16,
//!                    connections_max u16, session_id [16], resume_token [16]
//! Refuse          8  reason u16, version_min u16, version_max u16, pad [2]
//! Data        1..=1M the class's bytes
//! Credit         16  class u8, pad [7], limit_bytes u64
//! Ack            16  class u8, pad [7], seq u64
//! Ping, Pong     16  nonce u64, sent_at_ns u64
//! Delivered       8  bytes u64
//! ResumeRequest,
//! ResumeState    32  last_seq_received u64 × 4 (control, mirror, memory, bulk)
//! Close           8  reason u16, pad [6]
//! ```

use std::fmt;

use thiserror::Error;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::StreamClass;

/// First four bytes of every frame: a peer that is not a strait engine, or a stream that
/// lost its place, is caught on the first header.
pub const FRAME_MAGIC: [u8; 4] = *b"STRT";

/// The framing this code speaks: the header layout and the payload layouts below.
pub const WIRE_VERSION: u8 = 1;

/// Lowest protocol version (message semantics, negotiated in `Hello`) this code speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;

/// Highest protocol version this code speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 1;

/// Size of the frame header on the wire (layout in the module documentation).
pub const FRAME_HEADER_BYTES: usize = 32;

/// Largest payload of one frame. A frame is the unit of retransmission and of
/// head-of-line blocking on its connection: at 1 Gbit/s a 1 MiB frame holds the wire for
/// about 8.4 ms, short against a 100–250 ms RTT, while the 32-byte header and the
/// per-frame work stay below 0.01 % of the bytes. It is also the most a hostile header
/// can make [`FrameDecoder`] buffer.
pub const MAX_FRAME_PAYLOAD_BYTES: u32 = 1 << 20;

/// Most connections one session stripes over. Filling 1 Gbit/s × 250 ms (about 31 MB in
/// flight) takes 8 connections at the common 4 MiB TCP window limit; 64 leaves room for a
/// 10 Gbit/s link while bounding the per-session state a peer can make the acceptor hold.
pub const MAX_CONNECTIONS_PER_SESSION: u16 = 64;

/// Size of a [`SessionId`]: 128 random bits never collide between concurrent sessions.
pub const SESSION_ID_BYTES: usize = 16;

/// Size of a [`ResumeToken`]: 128 random bits cannot be guessed by an attacker who can
/// try a connection per round trip.
pub const RESUME_TOKEN_BYTES: usize = 16;

/// Number of stream classes, the length of [`ResumePoint::last_seq_received`].
pub const CLASS_COUNT: usize = StreamClass::ALL.len();

/// [`FrameHeader::flags`] bit: this data frame is a retransmission after a resume.
const FLAG_RETRANSMIT: u8 = 1 << 0;

/// The fixed header in front of every frame; layout in the module documentation.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct FrameHeader {
    magic: [u8; 4],
    wire_version: u8,
    frame_type: u8,
    class: u8,
    flags: u8,
    seq: U64,
    payload_len: U32,
    crc32c: U32,
    reserved: [u8; 8],
}

const _: () = assert!(size_of::<FrameHeader>() == FRAME_HEADER_BYTES);

/// The kinds of frame, with their wire codes. Zero is never a valid code, so a zeroed
/// header reads as an error rather than as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Opens or joins a session (step 1, 3).
    Hello = 1,
    /// Accepts a `Hello` (step 2).
    HelloAck = 2,
    /// Refuses a `Hello` with a reason (step 2).
    Refuse = 3,
    /// Carries a class's payload (step 5).
    Data = 4,
    /// Grants flow-control credit (step 4).
    Credit = 5,
    /// Acknowledges a class cumulatively (step 6).
    Ack = 6,
    /// Measures RTT (step 7).
    Ping = 7,
    /// Answers a `Ping` (step 7).
    Pong = 8,
    /// Starts a resume (step 8).
    ResumeRequest = 9,
    /// Answers a `ResumeRequest` (step 8).
    ResumeState = 10,
    /// Ends the session (step 9).
    Close = 11,
    /// Reports what one connection delivered (step 6).
    Delivered = 12,
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 12] = [
        FrameType::Hello,
        FrameType::HelloAck,
        FrameType::Refuse,
        FrameType::Data,
        FrameType::Credit,
        FrameType::Ack,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::ResumeRequest,
        FrameType::ResumeState,
        FrameType::Close,
        FrameType::Delivered,
    ];

    /// The type with wire code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == code)
    }

    /// The exact payload size of a fixed-size control frame; `None` for `Data`.
    fn fixed_payload_len(self) -> Option<usize> {
        Some(match self {
            FrameType::Data => return None,
            FrameType::Hello => size_of::<HelloWire>(),
            FrameType::HelloAck => size_of::<HelloAckWire>(),
            FrameType::Refuse => size_of::<RefuseWire>(),
            FrameType::Credit => size_of::<CreditWire>(),
            FrameType::Ack => size_of::<AckWire>(),
            FrameType::Ping | FrameType::Pong => size_of::<PingWire>(),
            FrameType::ResumeRequest | FrameType::ResumeState => size_of::<ResumeWire>(),
            FrameType::Close => size_of::<CloseWire>(),
            FrameType::Delivered => size_of::<DeliveredWire>(),
        })
    }
}

/// The wire code of a stream class. Codes start at 1 so a zeroed byte is no class.
pub fn class_code(class: StreamClass) -> u8 {
    match class {
        StreamClass::Control => 1,
        StreamClass::Mirror => 2,
        StreamClass::Memory => 3,
        StreamClass::Bulk => 4,
    }
}

/// The stream class with wire code `code`, if there is one.
pub fn class_from_code(code: u8) -> Option<StreamClass> {
    StreamClass::ALL
        .into_iter()
        .find(|c| class_code(*c) == code)
}

fn class_index(class: StreamClass) -> usize {
    usize::from(class_code(class) - 1)
}

/// Which end of the migration an engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// Sends the VM: the disk, its writes and its memory.
    Source = 1,
    /// Receives the VM.
    Destination = 2,
}

impl Role {
    fn from_code(code: u8) -> Option<Role> {
        [Role::Source, Role::Destination]
            .into_iter()
            .find(|r| *r as u8 == code)
    }
}

/// What a `Hello` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Intent {
    /// Open a new session on this connection.
    Open = 1,
    /// Add this connection to an existing session (also to replace a lost one).
    Join = 2,
}

impl Intent {
    fn from_code(code: u8) -> Option<Intent> {
        [Intent::Open, Intent::Join]
            .into_iter()
            .find(|i| *i as u8 == code)
    }
}

/// Names one session; chosen at random by the dialer. All zeroes is "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; SESSION_ID_BYTES]);

impl SessionId {
    /// True for the all-zero id, which names no session.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; SESSION_ID_BYTES]
    }
}

/// The secret that lets a connection join a session; issued by the acceptor in
/// `HelloAck`. All zeroes is "none". `Debug` hides it so it never reaches a log.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; RESUME_TOKEN_BYTES]);

impl ResumeToken {
    /// The absent token, as sent in an opening `Hello`.
    pub const NONE: ResumeToken = ResumeToken([0; RESUME_TOKEN_BYTES]);

    /// True for [`ResumeToken::NONE`].
    pub fn is_none(&self) -> bool {
        self.0 == [0; RESUME_TOKEN_BYTES]
    }

    /// Compares in time independent of where the tokens differ, so a peer cannot find the
    /// token byte by byte from response times.
    pub fn matches(&self, other: &ResumeToken) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_none() {
            "ResumeToken(none)"
        } else {
            "ResumeToken(..)"
        })
    }
}

/// Why an acceptor refuses a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
#[repr(u16)]
pub enum RefuseReason {
    /// The version ranges do not overlap.
    #[error("no protocol version in common")]
    VersionMismatch = 1,
    /// Both ends claim the same role.
    #[error("both ends have the same role")]
    RoleConflict = 2,
    /// The fields contradict the intent (a join without a token, an open with one, ...).
    #[error("the hello's fields contradict its intent")]
    InvalidHello = 3,
    /// A join names a session the acceptor does not hold (any more).
    #[error("unknown session")]
    UnknownSession = 4,
    /// A join's token does not match the session's.
    #[error("wrong resume token")]
    BadResumeToken = 5,
    /// The session already has as many connections as the acceptor allows.
    #[error("too many connections for the session")]
    TooManyConnections = 6,
    /// The acceptor takes no new session now.
    #[error("acceptor busy")]
    Busy = 7,
}

impl RefuseReason {
    const ALL: [RefuseReason; 7] = [
        RefuseReason::VersionMismatch,
        RefuseReason::RoleConflict,
        RefuseReason::InvalidHello,
        RefuseReason::UnknownSession,
        RefuseReason::BadResumeToken,
        RefuseReason::TooManyConnections,
        RefuseReason::Busy,
    ];

    fn from_code(code: u16) -> Option<RefuseReason> {
        RefuseReason::ALL.into_iter().find(|r| *r as u16 == code)
    }
}

/// Why a session closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseReason {
    /// Everything was sent and acknowledged.
    Done = 1,
    /// The engine is shutting down.
    Shutdown = 2,
    /// The operation was cancelled by the operator.
    Cancelled = 3,
    /// The peer broke the protocol (for example an impossible resume point).
    ProtocolViolation = 4,
}

impl CloseReason {
    fn from_code(code: u16) -> Option<CloseReason> {
        [
            CloseReason::Done,
            CloseReason::Shutdown,
            CloseReason::Cancelled,
            CloseReason::ProtocolViolation,
        ]
        .into_iter()
        .find(|r| *r as u16 == code)
    }
}

/// Opens or joins a session (steps 1 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the dialer speaks.
    pub version_min: u16,
    /// Highest protocol version the dialer speaks.
    pub version_max: u16,
    /// The dialer's role.
    pub role: Role,
    /// Open a session or join one.
    pub intent: Intent,
    /// Which of the session's connections this is: 0 for `Open`, then 1, 2, ...
    pub connection_index: u16,
    /// The session, chosen by the dialer on `Open`.
    pub session_id: SessionId,
    /// [`ResumeToken::NONE`] on `Open`; the token from `HelloAck` on `Join`.
    pub resume_token: ResumeToken,
}

/// Accepts a `Hello` (step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// The protocol version the session speaks: the highest both ends support.
    pub version: u16,
    /// The acceptor's role.
    pub role: Role,
    /// Echoes the `Hello`.
    pub connection_index: u16,
    /// The most connections the acceptor admits to this session.
    pub connections_max: u16,
    /// Echoes the `Hello`.
    pub session_id: SessionId,
    /// The token every later `Join` of this session must present.
    pub resume_token: ResumeToken,
}

/// Refuses a `Hello` (step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refuse {
    /// Why.
    pub reason: RefuseReason,
    /// Lowest protocol version the acceptor speaks, so the dialer can say what would work.
    pub version_min: u16,
    /// Highest protocol version the acceptor speaks.
    pub version_max: u16,
}

/// A class's payload (step 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// The stream class.
    pub class: StreamClass,
    /// Sequence number within the class and direction, from 1.
    pub seq: u64,
    /// Sent again after a resume (for metrics; the receiver deduplicates by `seq`).
    pub retransmit: bool,
    /// 1..=[`MAX_FRAME_PAYLOAD_BYTES`] bytes; empty frames would consume sequence
    /// numbers and reorder state without consuming credit.
    pub payload: Vec<u8>,
}

/// Grants credit (step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The class the grant is for.
    pub class: StreamClass,
    /// Cumulative: the total payload bytes of the class the sender may have sent.
    pub limit_bytes: u64,
}

/// Acknowledges a class cumulatively (step 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The class acknowledged.
    pub class: StreamClass,
    /// Every frame of the class with a sequence number up to this one was received.
    pub seq: u64,
}

/// What one connection delivered (step 6), sent on that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Cumulative payload bytes of the `Data` frames that arrived on the connection.
    pub bytes: u64,
}

/// Measures RTT (step 7); `Pong` echoes it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Matches a `Pong` to its `Ping`.
    pub nonce: u64,
    /// The sender's clock when it sent the `Ping`; only the sender interprets it.
    pub sent_at_ns: u64,
}

/// Where one side stands in every class (step 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// Indexed in [`StreamClass::ALL`] order: the highest `seq` of the class below which
    /// nothing is missing; zero when nothing was received.
    pub last_seq_received: [u64; CLASS_COUNT],
}

impl ResumePoint {
    /// The stated sequence number for `class`.
    pub fn get(&self, class: StreamClass) -> u64 {
        self.last_seq_received[class_index(class)]
    }

    /// Sets the stated sequence number for `class`.
    pub fn set(&mut self, class: StreamClass, seq: u64) {
        self.last_seq_received[class_index(class)] = seq;
    }
}

/// Ends the session (step 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// Why.
    pub reason: CloseReason,
}

/// One decoded, fully validated frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// See [`Data`].
    Data(Data),
    /// See [`Credit`].
    Credit(Credit),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Ping`].
    Ping(Ping),
    /// The echo of a [`Ping`].
    Pong(Ping),
    /// The resume point of the side that rejoined.
    ResumeRequest(ResumePoint),
    /// The resume point of the side that answers.
    ResumeState(ResumePoint),
    /// See [`Close`].
    Close(Close),
    /// See [`Delivered`].
    Delivered(Delivered),
}

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck(_) => FrameType::HelloAck,
            Frame::Refuse(_) => FrameType::Refuse,
            Frame::Data(_) => FrameType::Data,
            Frame::Credit(_) => FrameType::Credit,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::ResumeRequest(_) => FrameType::ResumeRequest,
            Frame::ResumeState(_) => FrameType::ResumeState,
            Frame::Close(_) => FrameType::Close,
            Frame::Delivered(_) => FrameType::Delivered,
        }
    }
}

// Payload layouts. Every field is align 1; the padding fields keep each u64 at an 8-byte
// offset, as a reader with natural alignment (or a hex dump) expects, and must be zero so
// that every accepted payload has exactly one encoding.

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloWire {
    version_min: U16,
    version_max: U16,
    role: u8,
    intent: u8,
    connection_index: U16,
    session_id: [u8; SESSION_ID_BYTES],
    resume_token: [u8; RESUME_TOKEN_BYTES],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloAckWire {
    version: U16,
    role: u8,
    padding: u8,
    connection_index: U16,
    connections_max: U16,
    session_id: [u8; SESSION_ID_BYTES],
    resume_token: [u8; RESUME_TOKEN_BYTES],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RefuseWire {
    reason: U16,
    version_min: U16,
    version_max: U16,
    padding: [u8; 2],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct CreditWire {
    class: u8,
    padding: [u8; 7],
    limit_bytes: U64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct AckWire {
    class: u8,
    padding: [u8; 7],
    seq: U64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PingWire {
    nonce: U64,
    sent_at_ns: U64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ResumeWire {
    last_seq_received: [U64; CLASS_COUNT],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DeliveredWire {
    bytes: U64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct CloseWire {
    reason: U16,
    padding: [u8; 6],
}

const _: () = assert!(size_of::<HelloWire>() == 40);
const _: () = assert!(size_of::<HelloAckWire>() == 40);
const _: () = assert!(size_of::<RefuseWire>() == 8);
const _: () = assert!(size_of::<CreditWire>() == 16);
const _: () = assert!(size_of::<AckWire>() == 16);
const _: () = assert!(size_of::<PingWire>() == 16);
const _: () = assert!(size_of::<ResumeWire>() == 32);
const _: () = assert!(size_of::<CloseWire>() == 8);
const _: () = assert!(size_of::<DeliveredWire>() == 8);

mod codec;
mod handshake;
#[cfg(test)]
mod tests;

pub use codec::*;
pub use handshake::*;
