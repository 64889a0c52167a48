//! A hostile migration peer: arbitrary bytes as one Control payload. The engines route a
//! payload to the migration by its first byte and decode it there: decoding must reject
//! what is malformed and never panic, a decoded message must encode back to the same bytes
//! (so nothing is ignored silently), and the port's inbox must stay bounded.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_engine::migration::port::{Port, INBOX_MAX};
use strait_engine::migration::wire::{is_migration, MigrationMessage, TEXT_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = MigrationMessage::decode(data) {
        assert!(is_migration(data), "decoded a payload the router would not send here");
        assert_eq!(message.encode(), data, "{message:?} does not encode back to its bytes");
        assert!(data.len() <= 32 + TEXT_BYTES_MAX);
    }
    // The same bytes delivered again and again: the inbox refuses past its bound.
    let port = Port::new();
    let mut accepted = 0;
    for _ in 0..INBOX_MAX + 2 {
        if port.deliver(data).is_ok() {
            accepted += 1;
        }
    }
    assert!(accepted == 0 || accepted == INBOX_MAX);
});
