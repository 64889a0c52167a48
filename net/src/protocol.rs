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
//! 9. Close: `Close` with a [`CloseReason`] ends the session at once. (Planned: a graceful
//!    `Close { reason: Done }` once everything sent is acked, answered by the peer's own
//!    `Close`, then TLS close_notify; the session layer does not implement it yet.)
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
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 11] = [
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

/// A payload field out of range; the frame's CRC was good, so the peer sent it as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// The payload is not the exact size of its type.
    #[error("{frame_type:?} payload is {len} bytes, expected {expected}")]
    Length {
        /// The frame's type.
        frame_type: FrameType,
        /// Bytes received.
        len: usize,
        /// Bytes its type has.
        expected: usize,
    },
    /// A padding byte is not zero.
    #[error("{frame_type:?} payload has non-zero padding")]
    Padding {
        /// The frame's type.
        frame_type: FrameType,
    },
    /// A role code is unknown.
    #[error("unknown role code {code}")]
    Role {
        /// The code received.
        code: u8,
    },
    /// An intent code is unknown.
    #[error("unknown hello intent code {code}")]
    Intent {
        /// The code received.
        code: u8,
    },
    /// A stream class code is unknown.
    #[error("unknown stream class code {code}")]
    Class {
        /// The code received.
        code: u8,
    },
    /// A refuse reason code is unknown.
    #[error("unknown refuse reason code {code}")]
    RefuseReason {
        /// The code received.
        code: u16,
    },
    /// A close reason code is unknown.
    #[error("unknown close reason code {code}")]
    CloseReason {
        /// The code received.
        code: u16,
    },
}

fn wire<T: FromBytes + KnownLayout + Immutable>(
    frame_type: FrameType,
    payload: &[u8],
) -> Result<&T, PayloadError> {
    T::ref_from_bytes(payload).map_err(|_| PayloadError::Length {
        frame_type,
        len: payload.len(),
        expected: size_of::<T>(),
    })
}

fn zero_padding(frame_type: FrameType, padding: &[u8]) -> Result<(), PayloadError> {
    if padding.iter().all(|b| *b == 0) {
        Ok(())
    } else {
        Err(PayloadError::Padding { frame_type })
    }
}

fn role(code: u8) -> Result<Role, PayloadError> {
    Role::from_code(code).ok_or(PayloadError::Role { code })
}

fn class(code: u8) -> Result<StreamClass, PayloadError> {
    class_from_code(code).ok_or(PayloadError::Class { code })
}

impl Hello {
    /// Decodes and validates a `Hello` payload (the fields' ranges; [`negotiate`] judges
    /// whether the acceptor can serve it).
    pub fn decode(payload: &[u8]) -> Result<Hello, PayloadError> {
        let w: &HelloWire = wire(FrameType::Hello, payload)?;
        Ok(Hello {
            version_min: w.version_min.get(),
            version_max: w.version_max.get(),
            role: role(w.role)?,
            intent: Intent::from_code(w.intent).ok_or(PayloadError::Intent { code: w.intent })?,
            connection_index: w.connection_index.get(),
            session_id: SessionId(w.session_id),
            resume_token: ResumeToken(w.resume_token),
        })
    }

    /// The payload bytes of this `Hello`.
    pub fn encode(&self) -> Vec<u8> {
        HelloWire {
            version_min: self.version_min.into(),
            version_max: self.version_max.into(),
            role: self.role as u8,
            intent: self.intent as u8,
            connection_index: self.connection_index.into(),
            session_id: self.session_id.0,
            resume_token: self.resume_token.0,
        }
        .as_bytes()
        .to_vec()
    }
}

impl HelloAck {
    /// Decodes and validates a `HelloAck` payload.
    pub fn decode(payload: &[u8]) -> Result<HelloAck, PayloadError> {
        let w: &HelloAckWire = wire(FrameType::HelloAck, payload)?;
        zero_padding(FrameType::HelloAck, &[w.padding])?;
        Ok(HelloAck {
            version: w.version.get(),
            role: role(w.role)?,
            connection_index: w.connection_index.get(),
            connections_max: w.connections_max.get(),
            session_id: SessionId(w.session_id),
            resume_token: ResumeToken(w.resume_token),
        })
    }

    /// The payload bytes of this `HelloAck`.
    pub fn encode(&self) -> Vec<u8> {
        HelloAckWire {
            version: self.version.into(),
            role: self.role as u8,
            padding: 0,
            connection_index: self.connection_index.into(),
            connections_max: self.connections_max.into(),
            session_id: self.session_id.0,
            resume_token: self.resume_token.0,
        }
        .as_bytes()
        .to_vec()
    }
}

/// Decodes the payload of a validated header into its typed frame.
fn decode_payload(
    frame_type: FrameType,
    header: &FrameHeader,
    payload: Vec<u8>,
) -> Result<Frame, PayloadError> {
    let t = frame_type;
    Ok(match frame_type {
        FrameType::Hello => Frame::Hello(Hello::decode(&payload)?),
        FrameType::HelloAck => Frame::HelloAck(HelloAck::decode(&payload)?),
        FrameType::Refuse => {
            let w: &RefuseWire = wire(t, &payload)?;
            zero_padding(t, &w.padding)?;
            let code = w.reason.get();
            Frame::Refuse(Refuse {
                reason: RefuseReason::from_code(code).ok_or(PayloadError::RefuseReason { code })?,
                version_min: w.version_min.get(),
                version_max: w.version_max.get(),
            })
        }
        FrameType::Data => Frame::Data(Data {
            class: class(header.class)?,
            seq: header.seq.get(),
            retransmit: header.flags & FLAG_RETRANSMIT != 0,
            payload,
        }),
        FrameType::Credit => {
            let w: &CreditWire = wire(t, &payload)?;
            zero_padding(t, &w.padding)?;
            let limit_bytes = w.limit_bytes.get();
            Frame::Credit(Credit {
                class: class(w.class)?,
                limit_bytes,
            })
        }
        FrameType::Ack => {
            let w: &AckWire = wire(t, &payload)?;
            zero_padding(t, &w.padding)?;
            Frame::Ack(Ack {
                class: class(w.class)?,
                seq: w.seq.get(),
            })
        }
        FrameType::Ping | FrameType::Pong => {
            let w: &PingWire = wire(t, &payload)?;
            let ping = Ping {
                nonce: w.nonce.get(),
                sent_at_ns: w.sent_at_ns.get(),
            };
            if t == FrameType::Ping {
                Frame::Ping(ping)
            } else {
                Frame::Pong(ping)
            }
        }
        FrameType::ResumeRequest | FrameType::ResumeState => {
            let w: &ResumeWire = wire(t, &payload)?;
            let point = ResumePoint {
                last_seq_received: w.last_seq_received.map(|s| s.get()),
            };
            if t == FrameType::ResumeRequest {
                Frame::ResumeRequest(point)
            } else {
                Frame::ResumeState(point)
            }
        }
        FrameType::Close => {
            let w: &CloseWire = wire(t, &payload)?;
            zero_padding(t, &w.padding)?;
            let code = w.reason.get();
            Frame::Close(Close {
                reason: CloseReason::from_code(code).ok_or(PayloadError::CloseReason { code })?,
            })
        }
    })
}

/// A frame the encoder will not build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A data payload is empty or over [`MAX_FRAME_PAYLOAD_BYTES`].
    #[error("data payload of {len} bytes is outside 1..={MAX_FRAME_PAYLOAD_BYTES}")]
    PayloadLength {
        /// The payload's length.
        len: usize,
    },
    /// Data sequence numbers start at 1; 0 means "nothing" in acks and resume points.
    #[error("data frame with sequence number 0")]
    ZeroSequence,
}

/// Encodes `frame` into a new buffer.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_frame_into(frame, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `frame` to `out`; on error `out` is unchanged.
pub fn encode_frame_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let frame_type = frame.frame_type();
    let payload = match frame {
        Frame::Data(d) => return encode_data_into(d.class, d.seq, d.retransmit, &d.payload, out),
        Frame::Hello(h) => h.encode(),
        Frame::HelloAck(a) => a.encode(),
        Frame::Refuse(r) => RefuseWire {
            reason: (r.reason as u16).into(),
            version_min: r.version_min.into(),
            version_max: r.version_max.into(),
            padding: [0; 2],
        }
        .as_bytes()
        .to_vec(),
        Frame::Credit(c) => {
            let limit_bytes = c.limit_bytes.into();
            CreditWire {
                class: class_code(c.class),
                padding: [0; 7],
                limit_bytes,
            }
            .as_bytes()
            .to_vec()
        }
        Frame::Ack(a) => AckWire {
            class: class_code(a.class),
            padding: [0; 7],
            seq: a.seq.into(),
        }
        .as_bytes()
        .to_vec(),
        Frame::Ping(p) | Frame::Pong(p) => PingWire {
            nonce: p.nonce.into(),
            sent_at_ns: p.sent_at_ns.into(),
        }
        .as_bytes()
        .to_vec(),
        Frame::ResumeRequest(r) | Frame::ResumeState(r) => ResumeWire {
            last_seq_received: r.last_seq_received.map(U64::new),
        }
        .as_bytes()
        .to_vec(),
        Frame::Close(c) => CloseWire {
            reason: (c.reason as u16).into(),
            padding: [0; 6],
        }
        .as_bytes()
        .to_vec(),
    };
    debug_assert_eq!(frame_type.fixed_payload_len(), Some(payload.len()));
    write_frame(frame_type, StreamClass::Control, 0, 0, &payload, out);
    Ok(())
}

/// Appends a data frame to `out` straight from a borrowed payload (no [`Frame`] copy);
/// on error `out` is unchanged.
pub fn encode_data_into(
    class: StreamClass,
    seq: u64,
    retransmit: bool,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if payload.is_empty() || payload.len() > MAX_FRAME_PAYLOAD_BYTES as usize {
        return Err(EncodeError::PayloadLength { len: payload.len() });
    }
    if seq == 0 {
        return Err(EncodeError::ZeroSequence);
    }
    let flags = if retransmit { FLAG_RETRANSMIT } else { 0 };
    write_frame(FrameType::Data, class, seq, flags, payload, out);
    Ok(())
}

/// Writes header and payload. Callers have checked the payload length against its type.
fn write_frame(
    frame_type: FrameType,
    class: StreamClass,
    seq: u64,
    flags: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut header = FrameHeader {
        magic: FRAME_MAGIC,
        wire_version: WIRE_VERSION,
        frame_type: frame_type as u8,
        class: class_code(class),
        flags,
        seq: seq.into(),
        payload_len: payload_len.into(),
        crc32c: 0.into(),
        reserved: [0; 8],
    };
    header.crc32c = frame_crc(&header, payload).into();
    // The decoder's rules and the encoder's must agree, or an engine would send frames
    // its peer closes the connection over: check every frame built in debug builds.
    debug_assert_eq!(validate_header(&header).map(|_| ()), Ok(()));
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
}

/// CRC32C over the header with its CRC field zeroed, then the payload.
fn frame_crc(header: &FrameHeader, payload: &[u8]) -> u32 {
    let mut zeroed = *header;
    zeroed.crc32c = 0.into();
    crc32c::crc32c_append(crc32c::crc32c(zeroed.as_bytes()), payload)
}

/// Why a byte stream stopped decoding. After one, the stream cannot be resynchronised:
/// close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The stream does not start with [`FRAME_MAGIC`] where a header is due.
    #[error("bad frame magic {found:02x?}, expected {FRAME_MAGIC:02x?}")]
    Magic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The peer frames with a wire version this code does not speak.
    #[error("peer speaks wire version {found}; this engine speaks wire version {WIRE_VERSION}")]
    WireVersion {
        /// The version byte found.
        found: u8,
    },
    /// Unknown frame type code.
    #[error("unknown frame type {code}")]
    FrameType {
        /// The code found.
        code: u8,
    },
    /// Unknown stream class code, or a class other than control on a non-data frame.
    #[error("{frame_type:?} frame with stream class code {code}")]
    Class {
        /// The frame's type.
        frame_type: FrameType,
        /// The code found.
        code: u8,
    },
    /// Flag bits that the frame type does not define.
    #[error("{frame_type:?} frame with undefined flags {flags:#04x}")]
    Flags {
        /// The frame's type.
        frame_type: FrameType,
        /// The flags byte found.
        flags: u8,
    },
    /// The reserved header bytes are not zero.
    #[error("{frame_type:?} frame with non-zero reserved header bytes")]
    Reserved {
        /// The frame's type.
        frame_type: FrameType,
    },
    /// A data frame with sequence number 0, or another frame with a non-zero one.
    #[error("{frame_type:?} frame with invalid sequence number {seq}")]
    Sequence {
        /// The frame's type.
        frame_type: FrameType,
        /// The sequence number found.
        seq: u64,
    },
    /// A payload length over the bound, or not the size its frame type has.
    #[error("{frame_type:?} frame announces a {len}-byte payload, allowed {min}..={max}")]
    PayloadLength {
        /// The frame's type.
        frame_type: FrameType,
        /// The announced length.
        len: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The CRC does not match: the bytes were damaged or the stream lost its place.
    #[error("{frame_type:?} frame checksum mismatch: computed {computed:#010x}, received {received:#010x}")]
    Checksum {
        /// The frame's type as the (damaged) header states it.
        frame_type: FrameType,
        /// CRC32C of the bytes received.
        computed: u32,
        /// The CRC in the header.
        received: u32,
    },
    /// A payload field out of range.
    #[error("invalid frame payload")]
    Payload(#[from] PayloadError),
    /// The stream ended inside a frame.
    #[error("stream ended {buffered} bytes into a frame")]
    Truncated {
        /// Bytes of the unfinished frame received.
        buffered: usize,
    },
}

/// Checks a complete header; returns its type and payload length.
fn validate_header(h: &FrameHeader) -> Result<(FrameType, usize), DecodeError> {
    if h.magic != FRAME_MAGIC {
        return Err(DecodeError::Magic { found: h.magic });
    }
    if h.wire_version != WIRE_VERSION {
        return Err(DecodeError::WireVersion {
            found: h.wire_version,
        });
    }
    let frame_type =
        FrameType::from_code(h.frame_type).ok_or(DecodeError::FrameType { code: h.frame_type })?;
    let is_data = frame_type == FrameType::Data;
    let class_ok = match class_from_code(h.class) {
        Some(class) => is_data || class == StreamClass::Control,
        None => false,
    };
    if !class_ok {
        return Err(DecodeError::Class {
            frame_type,
            code: h.class,
        });
    }
    let flags_allowed = if is_data { FLAG_RETRANSMIT } else { 0 };
    if h.flags & !flags_allowed != 0 {
        return Err(DecodeError::Flags {
            frame_type,
            flags: h.flags,
        });
    }
    if h.reserved != [0; 8] {
        return Err(DecodeError::Reserved { frame_type });
    }
    let seq = h.seq.get();
    if (seq == 0) == is_data {
        return Err(DecodeError::Sequence { frame_type, seq });
    }
    let len = h.payload_len.get();
    let (min, max) = match frame_type.fixed_payload_len() {
        Some(fixed) => (fixed as u32, fixed as u32),
        None => (1, MAX_FRAME_PAYLOAD_BYTES),
    };
    if !(min..=max).contains(&len) {
        return Err(DecodeError::PayloadLength {
            frame_type,
            len,
            min,
            max,
        });
    }
    Ok((frame_type, len as usize))
}

/// A header that passed [`validate_header`] and the payload received so far.
#[derive(Debug)]
struct PartialFrame {
    header: FrameHeader,
    frame_type: FrameType,
    payload_len: usize,
    // Invariant: payload.len() <= payload_len <= MAX_FRAME_PAYLOAD_BYTES, and its capacity
    // never exceeds payload_len, so memory follows the bytes that really arrived.
    payload: Vec<u8>,
}

/// Decodes frames from one connection's byte stream, split at any points.
///
/// Nothing is handed out before its header, length and CRC are checked and its payload
/// is decoded into typed fields. After an error the decoder keeps returning it: a stream
/// that lost its place cannot be trusted again.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; FRAME_HEADER_BYTES],
    // Invariant: header_len <= FRAME_HEADER_BYTES; equal only while `partial` is Some.
    header_len: usize,
    partial: Option<PartialFrame>,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Consumes bytes from the front of `input` until one frame is complete, and returns
    /// it; `Ok(None)` means `input` was used up inside a frame. Never consumes past the
    /// end of the frame it returns, so call it in a loop until `input` is empty.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let result = self.decode_step(input);
        if let Err(err) = result {
            self.failed = Some(err);
            self.partial = None;
        }
        result
    }

    /// At end of stream: `Ok` if the stream ended between frames.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let buffered = self.header_len + self.partial.as_ref().map_or(0, |p| p.payload.len());
        if buffered == 0 {
            Ok(())
        } else {
            Err(DecodeError::Truncated { buffered })
        }
    }

    fn decode_step(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        if self.partial.is_none() {
            let take = (FRAME_HEADER_BYTES - self.header_len).min(input.len());
            let (head, rest) = input.split_at(take);
            self.header[self.header_len..self.header_len + take].copy_from_slice(head);
            self.header_len += take;
            *input = rest;
            if self.header_len < FRAME_HEADER_BYTES {
                return Ok(None);
            }
            let header =
                FrameHeader::read_from_bytes(&self.header).map_err(|_| DecodeError::Truncated {
                    buffered: self.header_len,
                })?;
            let (frame_type, payload_len) = validate_header(&header)?;
            self.partial = Some(PartialFrame {
                header,
                frame_type,
                payload_len,
                payload: Vec::new(),
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            return Ok(None);
        };
        let take = (partial.payload_len - partial.payload.len()).min(input.len());
        let (head, rest) = input.split_at(take);
        let wanted = partial.payload.len() + take;
        if wanted > partial.payload.capacity() {
            // Double for amortised growth, but never past the announced length.
            let target = wanted
                .max(partial.payload.capacity() * 2)
                .min(partial.payload_len);
            partial
                .payload
                .reserve_exact(target - partial.payload.len());
        }
        partial.payload.extend_from_slice(head);
        *input = rest;
        if partial.payload.len() < partial.payload_len {
            return Ok(None);
        }
        let Some(done) = self.partial.take() else {
            return Ok(None);
        };
        self.header_len = 0;
        let computed = frame_crc(&done.header, &done.payload);
        let received = done.header.crc32c.get();
        if computed != received {
            let frame_type = done.frame_type;
            return Err(DecodeError::Checksum {
                frame_type,
                computed,
                received,
            });
        }
        Ok(Some(decode_payload(
            done.frame_type,
            &done.header,
            done.payload,
        )?))
    }
}

/// What this engine accepts in a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakePolicy {
    /// Lowest protocol version spoken.
    pub version_min: u16,
    /// Highest protocol version spoken.
    pub version_max: u16,
    /// This engine's role; the peer must have the other.
    pub role: Role,
}

impl HandshakePolicy {
    /// The versions this build speaks, in `role`.
    pub fn current(role: Role) -> HandshakePolicy {
        HandshakePolicy {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            role,
        }
    }

    fn refuse(&self, reason: RefuseReason) -> Refuse {
        Refuse {
            reason,
            version_min: self.version_min,
            version_max: self.version_max,
        }
    }
}

/// A `Hello` the acceptor can serve, as far as the protocol alone can tell; whether a
/// joined session exists and its token matches is the session table's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The highest protocol version both ends speak.
    pub version: u16,
    /// Open or join.
    pub intent: Intent,
    /// The session named.
    pub session_id: SessionId,
    /// The token presented (none on `Open`).
    pub resume_token: ResumeToken,
    /// The connection's index in the session.
    pub connection_index: u16,
}

/// The acceptor's check of a `Hello` (step 2): the `Refuse` to send, or what was agreed.
pub fn negotiate(hello: &Hello, local: &HandshakePolicy) -> Result<Negotiated, Refuse> {
    if hello.version_min > hello.version_max {
        return Err(local.refuse(RefuseReason::InvalidHello));
    }
    let version = hello.version_max.min(local.version_max);
    if version < hello.version_min.max(local.version_min) {
        return Err(local.refuse(RefuseReason::VersionMismatch));
    }
    if hello.role == local.role {
        return Err(local.refuse(RefuseReason::RoleConflict));
    }
    let consistent = !hello.session_id.is_zero()
        && match hello.intent {
            Intent::Open => hello.connection_index == 0 && hello.resume_token.is_none(),
            Intent::Join => {
                (1..MAX_CONNECTIONS_PER_SESSION).contains(&hello.connection_index)
                    && !hello.resume_token.is_none()
            }
        };
    if !consistent {
        return Err(local.refuse(RefuseReason::InvalidHello));
    }
    Ok(Negotiated {
        version,
        intent: hello.intent,
        session_id: hello.session_id,
        resume_token: hello.resume_token,
        connection_index: hello.connection_index,
    })
}

/// Why the dialer's handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The acceptor refused.
    #[error("peer refused the session: {reason}; peer supports protocol versions {peer_min}..={peer_max}, we support {local_min}..={local_max}")]
    Refused {
        /// The acceptor's reason.
        reason: RefuseReason,
        /// Lowest version the acceptor speaks.
        peer_min: u16,
        /// Highest version the acceptor speaks.
        peer_max: u16,
        /// Lowest version we speak.
        local_min: u16,
        /// Highest version we speak.
        local_max: u16,
    },
    /// The acceptor answered with something other than `HelloAck` or `Refuse`.
    #[error("expected HelloAck or Refuse, got {frame_type:?}")]
    UnexpectedFrame {
        /// What came instead.
        frame_type: FrameType,
    },
    /// The acceptor chose a version outside what either end offered.
    #[error("peer chose protocol version {version}, outside the offered {min}..={max}")]
    Version {
        /// The version chosen.
        version: u16,
        /// Lowest offered.
        min: u16,
        /// Highest offered.
        max: u16,
    },
    /// The acceptor has the same role as we do.
    #[error("peer has our role {role:?}")]
    RoleConflict {
        /// The shared role.
        role: Role,
    },
    /// The `HelloAck` does not echo the session and connection index we sent.
    #[error("HelloAck does not match our Hello (session or connection index)")]
    Mismatch,
    /// The token is missing, or changed on a join.
    #[error("HelloAck carries a missing or changed resume token")]
    Token,
    /// The acceptor admits more connections than the protocol allows, or fewer than the
    /// index it just accepted.
    #[error(
        "peer admits {connections_max} connections, outside 1..={MAX_CONNECTIONS_PER_SESSION}"
    )]
    ConnectionsMax {
        /// The number announced.
        connections_max: u16,
    },
}

/// The dialer's check of the acceptor's answer to `sent` (step 2).
pub fn check_hello_ack(
    sent: &Hello,
    reply: &Frame,
    local: &HandshakePolicy,
) -> Result<HelloAck, HandshakeError> {
    let ack = match reply {
        Frame::HelloAck(ack) => ack,
        Frame::Refuse(r) => {
            return Err(HandshakeError::Refused {
                reason: r.reason,
                peer_min: r.version_min,
                peer_max: r.version_max,
                local_min: local.version_min,
                local_max: local.version_max,
            })
        }
        other => {
            return Err(HandshakeError::UnexpectedFrame {
                frame_type: other.frame_type(),
            })
        }
    };
    let (min, max) = (sent.version_min, sent.version_max);
    if !(min..=max).contains(&ack.version) {
        return Err(HandshakeError::Version {
            version: ack.version,
            min,
            max,
        });
    }
    if ack.role == sent.role {
        return Err(HandshakeError::RoleConflict { role: ack.role });
    }
    if ack.session_id != sent.session_id || ack.connection_index != sent.connection_index {
        return Err(HandshakeError::Mismatch);
    }
    let token_ok = match sent.intent {
        Intent::Open => !ack.resume_token.is_none(),
        Intent::Join => ack.resume_token.matches(&sent.resume_token),
    };
    if !token_ok {
        return Err(HandshakeError::Token);
    }
    let connections_max = ack.connections_max;
    if connections_max <= ack.connection_index || connections_max > MAX_CONNECTIONS_PER_SESSION {
        return Err(HandshakeError::ConnectionsMax { connections_max });
    }
    Ok(*ack)
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hello(intent: Intent) -> Hello {
        Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            role: Role::Source,
            intent,
            connection_index: if intent == Intent::Open { 0 } else { 3 },
            session_id: SessionId([0x5a; SESSION_ID_BYTES]),
            resume_token: if intent == Intent::Open {
                ResumeToken::NONE
            } else {
                ResumeToken([0xa5; RESUME_TOKEN_BYTES])
            },
        }
    }

    fn hello_ack(sent: &Hello) -> HelloAck {
        HelloAck {
            version: PROTOCOL_VERSION_MAX,
            role: Role::Destination,
            connection_index: sent.connection_index,
            connections_max: 8,
            session_id: sent.session_id,
            resume_token: ResumeToken([0xa5; RESUME_TOKEN_BYTES]),
        }
    }

    /// One frame of every type, with values that exercise every byte of their fields.
    fn sample_frames() -> Vec<Frame> {
        let ping = Ping {
            nonce: 0x0102_0304_0506_0708,
            sent_at_ns: u64::MAX - 1,
        };
        let point = ResumePoint {
            last_seq_received: [0, 1, u64::MAX, 1 << 40],
        };
        let frames = vec![
            Frame::Hello(hello(Intent::Open)),
            Frame::Hello(hello(Intent::Join)),
            Frame::HelloAck(hello_ack(&hello(Intent::Join))),
            Frame::Refuse(Refuse {
                reason: RefuseReason::BadResumeToken,
                version_min: 1,
                version_max: 0xfffe,
            }),
            Frame::Data(Data {
                class: StreamClass::Memory,
                seq: 1,
                retransmit: false,
                payload: (0..=255).collect(),
            }),
            Frame::Data(Data {
                class: StreamClass::Bulk,
                seq: u64::MAX,
                retransmit: true,
                payload: vec![7],
            }),
            Frame::Credit(Credit {
                class: StreamClass::Mirror,
                limit_bytes: 64 << 20,
            }),
            Frame::Ack(Ack {
                class: StreamClass::Control,
                seq: 42,
            }),
            Frame::Ping(ping),
            Frame::Pong(ping),
            Frame::ResumeRequest(point),
            Frame::ResumeState(ResumePoint {
                last_seq_received: [9; CLASS_COUNT],
            }),
            Frame::Close(Close {
                reason: CloseReason::Done,
            }),
        ];
        for t in FrameType::ALL {
            assert!(
                frames.iter().any(|f| f.frame_type() == t),
                "no sample of {t:?}"
            );
        }
        frames
    }

    /// Decodes `stream` fed in `chunks`; returns the frames and the first error.
    fn decode_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<Frame>, Result<(), DecodeError>) {
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for mut chunk in chunks {
            while !chunk.is_empty() {
                match decoder.decode(&mut chunk) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => assert!(chunk.is_empty()),
                    Err(err) => return (frames, Err(err)),
                }
            }
        }
        (frames, decoder.finish())
    }

    /// A header with every field chosen by the test and a valid CRC.
    fn raw_frame(edit: impl FnOnce(&mut FrameHeader), payload: &[u8]) -> Vec<u8> {
        let mut header = FrameHeader {
            magic: FRAME_MAGIC,
            wire_version: WIRE_VERSION,
            frame_type: FrameType::Data as u8,
            class: class_code(StreamClass::Bulk),
            flags: 0,
            seq: 1.into(),
            payload_len: (payload.len() as u32).into(),
            crc32c: 0.into(),
            reserved: [0; 8],
        };
        edit(&mut header);
        header.crc32c = frame_crc(&header, payload).into();
        [header.as_bytes(), payload].concat()
    }

    #[test]
    fn every_frame_type_round_trips() {
        for frame in sample_frames() {
            let bytes = encode_frame(&frame).unwrap();
            let (decoded, end) = decode_chunks([bytes.as_slice()]);
            assert_eq!(end, Ok(()));
            assert_eq!(decoded, std::slice::from_ref(&frame));
            assert_eq!(&bytes[..4], b"STRT");
            assert_eq!(bytes[5], frame.frame_type() as u8);
            let payload_len = bytes.len() - FRAME_HEADER_BYTES;
            assert_eq!(bytes[16..20], (payload_len as u32).to_le_bytes());
        }
    }

    #[test]
    fn decodes_across_every_split_point() {
        let frames = sample_frames();
        let stream: Vec<u8> = frames
            .iter()
            .flat_map(|f| encode_frame(f).unwrap())
            .collect();
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let (decoded, end) = decode_chunks([a, b]);
            assert_eq!(end, Ok(()), "split at {split}");
            assert_eq!(decoded, frames, "split at {split}");
        }
        let (decoded, end) = decode_chunks(stream.chunks(1));
        assert_eq!((decoded, end), (frames.clone(), Ok(())));
        let (decoded, end) = decode_chunks(stream.chunks(7));
        assert_eq!((decoded, end), (frames, Ok(())));
    }

    #[test]
    fn a_damaged_byte_is_an_error_never_a_frame() {
        for frame in sample_frames() {
            let bytes = encode_frame(&frame).unwrap();
            for index in 0..bytes.len() {
                for mask in [0x01, 0x80, 0xff] {
                    let mut damaged = bytes.clone();
                    damaged[index] ^= mask;
                    let (decoded, end) = decode_chunks([damaged.as_slice()]);
                    assert!(decoded.is_empty(), "byte {index} ^ {mask:#x} of {frame:?}");
                    assert!(end.is_err(), "byte {index} ^ {mask:#x} of {frame:?}");
                }
            }
        }
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        for len in [MAX_FRAME_PAYLOAD_BYTES + 1, u32::MAX] {
            let bytes = raw_frame(|h| h.payload_len = len.into(), &[]);
            let mut decoder = FrameDecoder::new();
            let mut input = &bytes[..FRAME_HEADER_BYTES];
            let err = decoder.decode(&mut input).unwrap_err();
            assert_eq!(
                err,
                DecodeError::PayloadLength {
                    frame_type: FrameType::Data,
                    len,
                    min: 1,
                    max: MAX_FRAME_PAYLOAD_BYTES
                }
            );
            assert!(decoder.partial.is_none(), "no payload buffer was allocated");
        }
        let huge = vec![0; MAX_FRAME_PAYLOAD_BYTES as usize + 1];
        let err = encode_data_into(StreamClass::Bulk, 1, false, &huge, &mut Vec::new());
        assert_eq!(err, Err(EncodeError::PayloadLength { len: huge.len() }));
    }

    #[test]
    fn payload_memory_follows_the_bytes_received() {
        let payload = vec![3; MAX_FRAME_PAYLOAD_BYTES as usize];
        let bytes = encode_frame(&Frame::Data(Data {
            class: StreamClass::Memory,
            seq: 5,
            retransmit: false,
            payload,
        }))
        .unwrap();
        let mut decoder = FrameDecoder::new();
        let mut input = &bytes[..FRAME_HEADER_BYTES + 100];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        let partial = decoder.partial.as_ref().unwrap();
        assert!(
            partial.payload.capacity() < 4096,
            "{}",
            partial.payload.capacity()
        );
        let mut rest = &bytes[FRAME_HEADER_BYTES + 100..];
        assert!(matches!(
            decoder.decode(&mut rest),
            Ok(Some(Frame::Data(_)))
        ));
    }

    #[test]
    fn an_unknown_wire_version_is_refused_clearly() {
        let bytes = raw_frame(|h| h.wire_version = 2, &[1]);
        let (decoded, end) = decode_chunks([bytes.as_slice()]);
        assert!(decoded.is_empty());
        let err = end.unwrap_err();
        assert_eq!(err, DecodeError::WireVersion { found: 2 });
        assert_eq!(
            err.to_string(),
            "peer speaks wire version 2; this engine speaks wire version 1"
        );
    }

    #[test]
    fn header_rules_are_enforced_even_with_a_valid_crc() {
        let ack = Ack {
            class: StreamClass::Bulk,
            seq: 1,
        };
        let ack_payload = AckWire {
            class: 4,
            padding: [0; 7],
            seq: ack.seq.into(),
        };
        let ack_payload = ack_payload.as_bytes();
        let control = |h: &mut FrameHeader| {
            h.frame_type = FrameType::Ack as u8;
            h.class = class_code(StreamClass::Control);
            h.seq = 0.into();
        };
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (
                raw_frame(|h| h.magic = *b"STRU", &[1]),
                DecodeError::Magic { found: *b"STRU" },
            ),
            (
                raw_frame(|h| h.frame_type = 0, &[1]),
                DecodeError::FrameType { code: 0 },
            ),
            (
                raw_frame(|h| h.frame_type = 12, &[1]),
                DecodeError::FrameType { code: 12 },
            ),
            (
                raw_frame(|h| h.class = 5, &[1]),
                DecodeError::Class {
                    frame_type: FrameType::Data,
                    code: 5,
                },
            ),
            (
                raw_frame(|h| h.flags = 2, &[1]),
                DecodeError::Flags {
                    frame_type: FrameType::Data,
                    flags: 2,
                },
            ),
            (
                raw_frame(|h| h.reserved[7] = 1, &[1]),
                DecodeError::Reserved {
                    frame_type: FrameType::Data,
                },
            ),
            (
                raw_frame(|h| h.seq = 0.into(), &[1]),
                DecodeError::Sequence {
                    frame_type: FrameType::Data,
                    seq: 0,
                },
            ),
            (
                raw_frame(|h| h.payload_len = 0.into(), &[]),
                DecodeError::PayloadLength {
                    frame_type: FrameType::Data,
                    len: 0,
                    min: 1,
                    max: MAX_FRAME_PAYLOAD_BYTES,
                },
            ),
            (
                raw_frame(|h| (control(h), h.seq = 9.into()).1, ack_payload),
                DecodeError::Sequence {
                    frame_type: FrameType::Ack,
                    seq: 9,
                },
            ),
            (
                raw_frame(|h| (control(h), h.class = 2).1, ack_payload),
                DecodeError::Class {
                    frame_type: FrameType::Ack,
                    code: 2,
                },
            ),
            (
                raw_frame(|h| (control(h), h.flags = FLAG_RETRANSMIT).1, ack_payload),
                DecodeError::Flags {
                    frame_type: FrameType::Ack,
                    flags: 1,
                },
            ),
            (
                raw_frame(control, &[ack_payload, &[0]].concat()),
                DecodeError::PayloadLength {
                    frame_type: FrameType::Ack,
                    len: 17,
                    min: 16,
                    max: 16,
                },
            ),
            (
                raw_frame(
                    control,
                    &[&[4, 0, 0, 1, 0, 0, 0, 0][..], &ack_payload[8..]].concat(),
                ),
                PayloadError::Padding {
                    frame_type: FrameType::Ack,
                }
                .into(),
            ),
            (
                raw_frame(control, &[&[9][..], &ack_payload[1..]].concat()),
                PayloadError::Class { code: 9 }.into(),
            ),
        ];
        for (bytes, expected) in cases {
            let (decoded, end) = decode_chunks([bytes.as_slice()]);
            assert!(decoded.is_empty(), "{expected}");
            assert_eq!(end, Err(expected));
        }
        let (decoded, end) = decode_chunks([raw_frame(control, ack_payload).as_slice()]);
        assert_eq!((decoded, end), (vec![Frame::Ack(ack)], Ok(())));
    }

    #[test]
    fn a_failed_decoder_stays_failed_and_truncation_is_reported() {
        let good = encode_frame(&Frame::Close(Close {
            reason: CloseReason::Shutdown,
        }))
        .unwrap();
        let mut bad = good.clone();
        bad[30] ^= 1;
        let mut decoder = FrameDecoder::new();
        let mut input = bad.as_slice();
        let err = decoder.decode(&mut input).unwrap_err();
        assert!(matches!(err, DecodeError::Reserved { .. }), "{err}");
        let mut input = good.as_slice();
        assert_eq!(decoder.decode(&mut input), Err(err));
        assert_eq!(decoder.finish(), Err(err));

        let mut decoder = FrameDecoder::new();
        let mut input = &good[..good.len() - 1];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        let buffered = good.len() - 1;
        assert_eq!(decoder.finish(), Err(DecodeError::Truncated { buffered }));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let frame = Frame::Data(Data {
            class: StreamClass::Bulk,
            seq: 0,
            retransmit: false,
            payload: vec![1],
        });
        assert_eq!(encode_frame(&frame), Err(EncodeError::ZeroSequence));
        let mut out = vec![9];
        assert!(encode_data_into(StreamClass::Bulk, 1, false, &[], &mut out).is_err());
        assert_eq!(out, [9], "a refused frame leaves the buffer unchanged");
    }

    #[test]
    fn payload_codes_are_validated() {
        let mut bytes = hello(Intent::Open).encode();
        bytes[4] = 3;
        assert_eq!(Hello::decode(&bytes), Err(PayloadError::Role { code: 3 }));
        bytes[4] = Role::Source as u8;
        bytes[5] = 0;
        assert_eq!(Hello::decode(&bytes), Err(PayloadError::Intent { code: 0 }));
        assert!(matches!(
            Hello::decode(&bytes[1..]),
            Err(PayloadError::Length { .. })
        ));
        let mut ack = hello_ack(&hello(Intent::Open)).encode();
        ack[3] = 1;
        let padding = PayloadError::Padding {
            frame_type: FrameType::HelloAck,
        };
        assert_eq!(HelloAck::decode(&ack), Err(padding));
    }

    #[test]
    fn handshake_agrees_on_the_highest_common_version() {
        let local = HandshakePolicy {
            version_min: 1,
            version_max: 4,
            role: Role::Destination,
        };
        let offered = Hello {
            version_min: 2,
            version_max: 7,
            ..hello(Intent::Open)
        };
        let agreed = negotiate(&offered, &local).unwrap();
        assert_eq!(agreed.version, 4);
        assert_eq!(agreed.intent, Intent::Open);
        let join = hello(Intent::Join);
        let agreed = negotiate(&join, &HandshakePolicy::current(Role::Destination)).unwrap();
        assert_eq!(
            (agreed.connection_index, agreed.resume_token),
            (3, join.resume_token)
        );
        let ack = hello_ack(&join);
        let local = HandshakePolicy::current(Role::Source);
        assert_eq!(
            check_hello_ack(&join, &Frame::HelloAck(ack), &local),
            Ok(ack)
        );
    }

    #[test]
    fn handshake_version_mismatch_is_refused_with_both_ranges() {
        let acceptor = HandshakePolicy {
            version_min: 2,
            version_max: 3,
            role: Role::Destination,
        };
        let sent = hello(Intent::Open);
        let refuse = negotiate(&sent, &acceptor).unwrap_err();
        assert_eq!(
            refuse,
            Refuse {
                reason: RefuseReason::VersionMismatch,
                version_min: 2,
                version_max: 3
            }
        );
        // The refusal crosses the wire and the dialer turns it into a sentence.
        let bytes = encode_frame(&Frame::Refuse(refuse)).unwrap();
        let (reply, end) = decode_chunks([bytes.as_slice()]);
        assert_eq!(end, Ok(()));
        let dialer = HandshakePolicy::current(Role::Source);
        let err = check_hello_ack(&sent, &reply[0], &dialer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer refused the session: no protocol version in common; peer supports protocol \
             versions 2..=3, we support 1..=1"
        );
    }

    #[test]
    fn handshake_refuses_inconsistent_hellos() {
        let local = HandshakePolicy::current(Role::Destination);
        let reason = |h: Hello| negotiate(&h, &local).map(|_| ()).map_err(|r| r.reason);
        let open = hello(Intent::Open);
        let join = hello(Intent::Join);
        use RefuseReason::*;
        assert_eq!(
            reason(Hello {
                role: Role::Destination,
                ..open
            }),
            Err(RoleConflict)
        );
        assert_eq!(
            reason(Hello {
                version_min: 2,
                version_max: 1,
                ..open
            }),
            Err(InvalidHello)
        );
        assert_eq!(
            reason(Hello {
                resume_token: join.resume_token,
                ..open
            }),
            Err(InvalidHello)
        );
        assert_eq!(
            reason(Hello {
                connection_index: 1,
                ..open
            }),
            Err(InvalidHello)
        );
        assert_eq!(
            reason(Hello {
                session_id: SessionId([0; 16]),
                ..open
            }),
            Err(InvalidHello)
        );
        assert_eq!(
            reason(Hello {
                resume_token: ResumeToken::NONE,
                ..join
            }),
            Err(InvalidHello)
        );
        assert_eq!(
            reason(Hello {
                connection_index: 0,
                ..join
            }),
            Err(InvalidHello)
        );
        let too_far = MAX_CONNECTIONS_PER_SESSION;
        assert_eq!(
            reason(Hello {
                connection_index: too_far,
                ..join
            }),
            Err(InvalidHello)
        );
    }

    #[test]
    fn dialer_rejects_a_hello_ack_that_does_not_match() {
        let local = HandshakePolicy::current(Role::Source);
        let join = hello(Intent::Join);
        let good = hello_ack(&join);
        let check = |ack: HelloAck| check_hello_ack(&join, &Frame::HelloAck(ack), &local);
        assert!(matches!(
            check(HelloAck { version: 2, ..good }),
            Err(HandshakeError::Version { .. })
        ));
        assert!(matches!(
            check(HelloAck {
                role: Role::Source,
                ..good
            }),
            Err(HandshakeError::RoleConflict { .. })
        ));
        let other_session = SessionId([1; SESSION_ID_BYTES]);
        assert_eq!(
            check(HelloAck {
                session_id: other_session,
                ..good
            }),
            Err(HandshakeError::Mismatch)
        );
        let other_token = ResumeToken([1; RESUME_TOKEN_BYTES]);
        assert_eq!(
            check(HelloAck {
                resume_token: other_token,
                ..good
            }),
            Err(HandshakeError::Token)
        );
        assert!(matches!(
            check(HelloAck {
                connections_max: 3,
                ..good
            }),
            Err(HandshakeError::ConnectionsMax { connections_max: 3 })
        ));
        let ping = Frame::Ping(Ping {
            nonce: 1,
            sent_at_ns: 2,
        });
        assert_eq!(
            check_hello_ack(&join, &ping, &local),
            Err(HandshakeError::UnexpectedFrame {
                frame_type: FrameType::Ping
            })
        );
    }

    #[test]
    fn resume_token_debug_hides_the_secret() {
        let token = ResumeToken([0xab; RESUME_TOKEN_BYTES]);
        assert_eq!(format!("{token:?}"), "ResumeToken(..)");
        assert!(token.matches(&token) && !token.matches(&ResumeToken::NONE));
    }
}
