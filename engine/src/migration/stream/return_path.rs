//! Watches QEMU's return path (destination → source) for the destination's verdict.
//!
//! The memory stream is opaque to strait except here. With the `return-path` capability,
//! everything the destination QEMU writes back on the migration socket is a sequence of
//! messages `type: be16, len: be16, data[len]` (QEMU `migrate_send_rp_message`), and the
//! last one is `SHUT` with a be32 value, 0 when the destination loaded the whole state and
//! non-zero when it failed. QEMU sends `SHUT` only after it has read the source's stream to
//! its end, so it tells a complete migration stream apart from one that a VMM closed
//! half-way (to a byte relay both look like an end of stream).
//!
//! The relay never changes these bytes; it only reads along. Message types other than
//! `SHUT` are skipped by their length. `RECV_BITMAP` (postcopy recovery) is followed by a
//! bitmap outside its length, and type 0 is invalid in QEMU itself: after either, the
//! framing cannot be followed, and the verdict stays unknown.

/// QEMU's `MIG_RP_MSG_INVALID`.
const RP_INVALID: u16 = 0;
/// QEMU's `MIG_RP_MSG_SHUT`: the destination will send nothing more; be32 error flag.
const RP_SHUT: u16 = 1;
/// QEMU's `MIG_RP_MSG_RECV_BITMAP`: its bitmap follows outside the message length.
const RP_RECV_BITMAP: u16 = 5;
/// Bytes of a message header: type and length, both be16.
const RP_HEADER_BYTES: usize = 4;
/// Bytes of `SHUT`'s body.
const RP_SHUT_BYTES: usize = 4;

/// What the return path said about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No `SHUT` yet.
    Pending,
    /// `SHUT` with value 0: the destination loaded the whole state.
    Loaded,
    /// `SHUT` with this non-zero value: the destination failed to load.
    Failed(u32),
    /// The bytes could not be followed as return-path messages (see the module docs).
    Unreadable,
}

/// A return-path reader fed with the bytes as they pass; holds at most one message header
/// and one `SHUT` body, whatever it is fed.
#[derive(Debug)]
pub struct ReturnPathObserver {
    /// The current message's header bytes seen so far.
    header: [u8; RP_HEADER_BYTES],
    header_len: usize,
    /// The current message: type and body bytes still to come.
    current: Option<(u16, usize)>,
    /// `SHUT`'s body so far.
    shut: [u8; RP_SHUT_BYTES],
    shut_len: usize,
    verdict: Verdict,
    messages: u64,
}

impl Default for ReturnPathObserver {
    fn default() -> Self {
        Self::new()
    }
}

impl ReturnPathObserver {
    /// An observer at the start of a return path.
    pub fn new() -> ReturnPathObserver {
        ReturnPathObserver {
            header: [0; RP_HEADER_BYTES],
            header_len: 0,
            current: None,
            shut: [0; RP_SHUT_BYTES],
            shut_len: 0,
            verdict: Verdict::Pending,
            messages: 0,
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Complete messages seen.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Reads along `bytes`, the next bytes of the return path.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.verdict != Verdict::Unreadable {
            let Some((kind, remaining)) = self.current else {
                let take = (RP_HEADER_BYTES - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == RP_HEADER_BYTES {
                    self.begin_message();
                }
                continue;
            };
            let take = remaining.min(bytes.len());
            if kind == RP_SHUT {
                let end = (self.shut_len + take).min(RP_SHUT_BYTES);
                let copy = end - self.shut_len;
                self.shut[self.shut_len..end].copy_from_slice(&bytes[..copy]);
                self.shut_len = end;
            }
            bytes = &bytes[take..];
            self.current = Some((kind, remaining - take));
            if remaining == take {
                self.end_message();
            }
        }
    }

    fn begin_message(&mut self) {
        self.header_len = 0;
        let kind = u16::from_be_bytes([self.header[0], self.header[1]]);
        let len = usize::from(u16::from_be_bytes([self.header[2], self.header[3]]));
        let shut_malformed = kind == RP_SHUT && len != RP_SHUT_BYTES;
        // Anything after SHUT is not QEMU: it sends nothing more once it said SHUT.
        let after_shut = self.verdict != Verdict::Pending;
        if kind == RP_INVALID || kind == RP_RECV_BITMAP || shut_malformed || after_shut {
            self.verdict = Verdict::Unreadable;
            return;
        }
        self.current = Some((kind, len));
        self.shut_len = 0;
        if len == 0 {
            self.end_message();
        }
    }

    fn end_message(&mut self) {
        if let Some((RP_SHUT, _)) = self.current {
            self.verdict = match u32::from_be_bytes(self.shut) {
                0 => Verdict::Loaded,
                value => Verdict::Failed(value),
            };
        }
        self.current = None;
        self.messages += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A precopy return path as QEMU 7.2 writes it: a few pongs, then SHUT.
    fn return_path(shut_value: u32) -> Vec<u8> {
        let mut bytes = message(2, &1u32.to_be_bytes()); // PONG
        bytes.extend(message(2, &2u32.to_be_bytes()));
        bytes.extend(message(7, &[])); // SWITCHOVER_ACK (QEMU 8.1+): skipped by length
        bytes.extend(message(RP_SHUT, &shut_value.to_be_bytes()));
        bytes
    }

    #[test]
    fn shut_zero_is_loaded_however_the_bytes_are_split() {
        let bytes = return_path(0);
        for piece in 1..=bytes.len() {
            let mut observer = ReturnPathObserver::new();
            for chunk in bytes.chunks(piece) {
                assert_eq!(observer.verdict(), Verdict::Pending);
                observer.observe(chunk);
            }
            assert_eq!(observer.verdict(), Verdict::Loaded, "pieces of {piece}");
            assert_eq!(observer.messages(), 4);
        }
    }

    #[test]
    fn shut_with_an_error_is_failed() {
        let mut observer = ReturnPathObserver::new();
        observer.observe(&return_path(1));
        assert_eq!(observer.verdict(), Verdict::Failed(1));
    }

    #[test]
    fn no_shut_is_pending() {
        let mut observer = ReturnPathObserver::new();
        let bytes = return_path(0);
        observer.observe(&bytes[..bytes.len() - 1]);
        assert_eq!(observer.verdict(), Verdict::Pending);
    }

    #[test]
    fn what_cannot_be_followed_is_unreadable() {
        for bytes in [
            message(RP_INVALID, b""),
            message(RP_RECV_BITMAP, b"ram\0"),
            message(RP_SHUT, &[0; 3]),
            [return_path(0), message(2, &[0; 4])].concat(),
        ] {
            let mut observer = ReturnPathObserver::new();
            observer.observe(&bytes);
            observer.observe(&return_path(0));
            assert_eq!(observer.verdict(), Verdict::Unreadable, "{bytes:?}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        for _ in 0..5_000 {
            let mut observer = ReturnPathObserver::new();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let len = (state % 16) as usize;
                let chunk: Vec<u8> = state
                    .to_le_bytes()
                    .iter()
                    .cycle()
                    .take(len)
                    .map(|b| b % 8)
                    .collect();
                observer.observe(&chunk);
            }
        }
    }
}
