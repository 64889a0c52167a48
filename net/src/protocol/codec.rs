//! Encoding and decoding frames: the header, the typed payloads, the incremental decoder.

use super::*;

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

pub(super) fn wire<T: FromBytes + KnownLayout + Immutable>(
    frame_type: FrameType,
    payload: &[u8],
) -> Result<&T, PayloadError> {
    T::ref_from_bytes(payload).map_err(|_| PayloadError::Length {
        frame_type,
        len: payload.len(),
        expected: size_of::<T>(),
    })
}

pub(super) fn zero_padding(frame_type: FrameType, padding: &[u8]) -> Result<(), PayloadError> {
    if padding.iter().all(|b| *b == 0) {
        Ok(())
    } else {
        Err(PayloadError::Padding { frame_type })
    }
}

pub(super) fn role(code: u8) -> Result<Role, PayloadError> {
    Role::from_code(code).ok_or(PayloadError::Role { code })
}

pub(super) fn class(code: u8) -> Result<StreamClass, PayloadError> {
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
pub(super) fn decode_payload(
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
        FrameType::Delivered => {
            let w: &DeliveredWire = wire(t, &payload)?;
            Frame::Delivered(Delivered {
                bytes: w.bytes.get(),
            })
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
        Frame::Delivered(d) => DeliveredWire {
            bytes: d.bytes.into(),
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
pub(super) fn write_frame(
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
pub(super) fn frame_crc(header: &FrameHeader, payload: &[u8]) -> u32 {
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
pub(super) fn validate_header(h: &FrameHeader) -> Result<(FrameType, usize), DecodeError> {
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
pub(super) struct PartialFrame {
    header: FrameHeader,
    frame_type: FrameType,
    payload_len: usize,
    // Invariant: payload.len() <= payload_len <= MAX_FRAME_PAYLOAD_BYTES, and its capacity
    // never exceeds payload_len, so memory follows the bytes that really arrived.
    pub(super) payload: Vec<u8>,
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
    pub(super) partial: Option<PartialFrame>,
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
