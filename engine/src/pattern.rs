//! The verified byte stream of `strait bench link` and `strait link`: every byte is a
//! function of its offset in the stream, so the receiver checks each payload where it
//! lands, and a lost, repeated, reordered or corrupted byte shows.

/// The byte at stream offset `offset`: a 64-bit word per 8 bytes, mixed so that a shifted
/// or repeated block never matches.
fn word(index: u64) -> u64 {
    (index ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fills `buf` with the stream's content starting at `offset`.
pub(crate) fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = word(at / 8).to_le_bytes()[(at % 8) as usize];
    }
}

/// The stream's content as a vector, aligned fast path for the common 8-aligned offsets.
pub(crate) fn payload(len: usize, offset: u64) -> Vec<u8> {
    let mut buf = vec![0; len];
    if offset.is_multiple_of(8) && len.is_multiple_of(8) {
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&word(offset / 8 + i as u64).to_le_bytes());
        }
    } else {
        fill(&mut buf, offset);
    }
    buf
}

/// Whether `buf` is the stream's content at `offset`.
pub(crate) fn check(buf: &[u8], offset: u64) -> bool {
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    let (first, rest) = buf.split_at(head);
    let mut expect = vec![0; first.len()];
    fill(&mut expect, offset);
    if first != expect.as_slice() {
        return false;
    }
    let base = (offset + head as u64) / 8;
    let mut chunks = rest.chunks_exact(8);
    for (i, chunk) in chunks.by_ref().enumerate() {
        if chunk != word(base + i as u64).to_le_bytes() {
            return false;
        }
    }
    let tail = chunks.remainder();
    let mut expect = vec![0; tail.len()];
    fill(&mut expect, offset + (buf.len() - tail.len()) as u64);
    tail == expect.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_checks_at_any_offset() {
        let stream = payload(4096, 0);
        for (start, end) in [(0, 4096), (3, 17), (5, 4096), (8, 16), (1000, 1001)] {
            assert!(check(&stream[start..end], start as u64));
        }
        assert!(!check(&stream[8..16], 0));
        let mut bad = stream.clone();
        bad[100] ^= 1;
        assert!(!check(&bad, 0));
        assert_eq!(payload(13, 5), stream[5..18].to_vec());
    }
}
