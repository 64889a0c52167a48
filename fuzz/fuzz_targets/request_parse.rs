//! Fuzzes `Request::parse` with hostile descriptor chains: arbitrary descriptors (address,
//! length, NEXT/WRITE/INDIRECT and unknown flags, next index), indirect tables, arbitrary
//! header and discard bytes in guest memory. The input format is documented in `src/lib.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_fuzz::ChainCase;

fuzz_target!(|data: &[u8]| {
    if data.len() < ChainCase::MIN_BYTES {
        return;
    }
    // Panics inside on a parser panic or a broken promise about the parsed request.
    let _ = strait_fuzz::request_parse(data);
});
