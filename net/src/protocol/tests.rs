//! Unit tests of the wire protocol.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

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
        Frame::Delivered(Delivered {
            bytes: 0x1122_3344_5566_7788,
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
            raw_frame(|h| h.frame_type = 13, &[1]),
            DecodeError::FrameType { code: 13 },
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
