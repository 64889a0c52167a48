//! Fuzzes `strait_net::protocol::FrameDecoder` with hostile byte streams, as a peer (or a
//! damaged connection) delivers them: arbitrary bytes, split into arbitrary reads.
//!
//! Input format:
//!
//! ```text
//! offset  bytes  field
//! 0       1      control: bit 0 reseals the stream, bit 5 builds it (both below);
//!                bits 1..=4 give the largest read, 1 << n bytes
//! 1       1      seed of the read sizes
//! 2       rest   the byte stream, or the records it is built from
//! ```
//!
//! Random bytes almost never carry a valid CRC32C, which would leave everything behind the
//! checksum unexplored. "Reseal" walks the stream frame by frame as the headers announce it
//! and writes the right CRC into each header. "Build" goes further, since 30 seconds from
//! an empty corpus rarely find a whole header: the rest of the input is a list of records
//! `frame_type u8, class u8, flags u8, seq u8, payload_len u8, payload`, each turned into
//! a frame with the right magic, wire version, zero reserved bytes and CRC, so the fuzzer
//! spends its time on the header rules and every type's payload validation.
//!
//! Besides "never panics", the harness checks what callers rely on: the frames and the
//! error do not depend on where the reads split the stream; every frame handed out
//! re-encodes to exactly the bytes it was decoded from (the decoder accepts one encoding
//! per frame and nothing unvalidated); frames are contiguous from the start of the stream.

#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use strait_net::protocol::{
    encode_frame, DecodeError, Frame, FrameDecoder, FRAME_HEADER_BYTES, FRAME_MAGIC,
    MAX_FRAME_PAYLOAD_BYTES, WIRE_VERSION,
};

/// control byte: reseal each frame's CRC before decoding.
const CONTROL_RESEAL: u8 = 1 << 0;
/// control byte: build the stream from records.
const CONTROL_BUILD: u8 = 1 << 5;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (control, seed) = (data[0], data[1]);
    let mut stream = if control & CONTROL_BUILD != 0 {
        build(&data[2..])
    } else {
        data[2..].to_vec()
    };
    if control & CONTROL_RESEAL != 0 {
        reseal(&mut stream);
    }
    let whole = decode(&stream, &mut std::iter::repeat(usize::MAX));
    let max_read = 1usize << ((control >> 1) & 0x0f);
    let mut state = u32::from(seed) | 0x100;
    let mut reads = std::iter::from_fn(|| {
        // xorshift32: cheap, deterministic read sizes from the seed.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        Some(1 + state as usize % max_read)
    });
    let split = decode(&stream, &mut reads);
    assert_eq!(whole, split, "the split points changed the result");

    let (frames, _end) = whole;
    let mut expected_start = 0;
    for (frame, range) in frames {
        assert_eq!(range.start, expected_start, "frames are not contiguous");
        expected_start = range.end;
        let bytes = encode_frame(&frame).expect("a decoded frame must be encodable");
        assert_eq!(bytes, stream[range], "{frame:?} re-encodes differently");
    }
});

type Decoded = (Vec<(Frame, Range<usize>)>, Result<(), DecodeError>);

/// Decodes `stream` in reads of the sizes `reads` yields; returns each frame with the
/// stream range it came from, and how the stream ended.
fn decode(stream: &[u8], reads: &mut dyn Iterator<Item = usize>) -> Decoded {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut frame_start = 0;
    while offset < stream.len() {
        let len = reads.next().unwrap_or(1).min(stream.len() - offset);
        let mut input = &stream[offset..offset + len];
        while !input.is_empty() {
            let before = input.len();
            let result = decoder.decode(&mut input);
            offset += before - input.len();
            match result {
                Ok(Some(frame)) => {
                    frames.push((frame, frame_start..offset));
                    frame_start = offset;
                }
                Ok(None) => assert!(input.is_empty(), "stopped early without a frame"),
                Err(err) => return (frames, Err(err)),
            }
        }
    }
    (frames, decoder.finish())
}

/// Builds a stream of frames from `records` (see the input format); a record cut short
/// by the end of the input becomes a frame cut short.
fn build(mut records: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    while let [frame_type, class, flags, seq, len, rest @ ..] = records {
        let payload = &rest[..usize::from(*len).min(rest.len())];
        let mut header = [0; FRAME_HEADER_BYTES];
        header[..4].copy_from_slice(&FRAME_MAGIC);
        header[4..8].copy_from_slice(&[WIRE_VERSION, *frame_type, *class, *flags]);
        header[8] = *seq;
        header[16] = *len;
        let crc = !crc32c(crc32c(!0, &header), payload);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        stream.extend_from_slice(&header);
        stream.extend_from_slice(payload);
        records = &rest[payload.len()..];
    }
    stream
}

/// Writes into every header the CRC its frame needs, walking frames by their announced
/// lengths; stops at a length the decoder refuses anyway.
fn reseal(stream: &mut [u8]) {
    let mut start = 0;
    while start + FRAME_HEADER_BYTES <= stream.len() {
        let header = start..start + FRAME_HEADER_BYTES;
        let len_bytes: [u8; 4] = stream[start + 16..start + 20].try_into().expect("4 bytes");
        let payload_len = u32::from_le_bytes(len_bytes);
        if payload_len > MAX_FRAME_PAYLOAD_BYTES {
            return;
        }
        let end = (header.end + payload_len as usize).min(stream.len());
        stream[start + 20..start + 24].fill(0);
        let crc = crc32c(
            crc32c(!0, &stream[header.clone()]),
            &stream[header.end..end],
        );
        stream[start + 20..start + 24].copy_from_slice(&(!crc).to_le_bytes());
        start = header.end + payload_len as usize;
    }
}

/// Bitwise CRC32C (Castagnoli, reflected), independent of the `crc32c` crate the decoder
/// uses, so a bug there shows up as a mismatch rather than being copied. Takes and returns
/// the raw register: start from `!0`, finish with `!`.
fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}
