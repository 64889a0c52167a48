//! A hostile peer engine and a broken QEMU against the memory stream's two parsers: the
//! messages on the link's Memory class (`strait_engine::migration::stream::protocol`) and
//! QEMU's return path read along by the relay (`ReturnPathObserver`).
//!
//! Input: a sequence of records `len u8, bytes[len]`; each is decoded as one Memory-class
//! payload and also fed to the return-path observer as the next piece of the stream.
//! Decoding must refuse what is malformed and never panic; whatever decodes re-encodes to
//! exactly the same bytes (one encoding per message); a verdict, once reached, never goes
//! back to pending.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_engine::migration::stream::protocol::decode;
use strait_engine::migration::stream::return_path::{ReturnPathObserver, Verdict};

fuzz_target!(|data: &[u8]| {
    let mut observer = ReturnPathObserver::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (payload, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        if let Ok(message) = decode(payload) {
            assert_eq!(message.encode(), payload);
        }
        let before = observer.verdict();
        observer.observe(payload);
        if before != Verdict::Pending {
            assert_ne!(observer.verdict(), Verdict::Pending);
        }
    }
    // A whole input as one payload: the long Data and Abort bodies.
    if let Ok(message) = decode(data) {
        assert_eq!(message.encode(), data);
    }
});
