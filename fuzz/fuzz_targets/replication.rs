//! A hostile replication peer: arbitrary bytes as a sequence of messages (each prefixed by
//! a one-byte length class) to a destination and to two sources, one of them in sync and
//! verifying (so verify replies reach its bookkeeping). Decoding must reject what is
//! malformed and the state machines must answer with an error, never panic, and never
//! ask the caller to write or hash outside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_engine::replication::wire::{decode_payload, Message, VERIFY_CHUNKS_MAX};
use strait_engine::replication::{
    Apply, DestConfig, ReplicaDest, ReplicaSource, SourceConfig,
};

const CHUNK: u64 = 16 << 10;
const DISK: u64 = 8 * CHUNK + 4096;

fn config() -> SourceConfig {
    SourceConfig {
        disk_id: [1; 16],
        source_id: [2; 16],
        disk_bytes: DISK,
        chunk_bytes: CHUNK,
        mirror_backlog_bytes_max: 1 << 20,
        bulk_inflight_max: 4,
    }
}

/// A source whose destination holds every chunk, with a verify running and its first
/// requests out (ids from 0).
fn verifying() -> ReplicaSource {
    let mut s = ReplicaSource::new(config()).expect("valid config");
    s.on_connected();
    s.on_message(Message::Welcome).expect("welcome");
    while let Some(job) = s.next_bulk() {
        let done = Message::ChunkDone {
            index: job.index,
            seq: job.seq,
        };
        s.on_message(done).expect("chunk done");
    }
    s.start_verify(true, 0).expect("in sync");
    ask(&mut s);
    s
}

/// Lets the source send what verify requests it may, hashing an imaginary disk.
fn ask(s: &mut ReplicaSource) {
    let hash = |offset: u64, len: u64, chunk: u64| {
        assert!(offset + len <= DISK && len > 0);
        Ok::<_, ()>(vec![[0; 32]; len.div_ceil(chunk) as usize])
    };
    while let Ok(Some(_)) = s.next_verify(0, hash) {}
}

fuzz_target!(|data: &[u8]| {
    let mut dest = ReplicaDest::new(DestConfig {
        disk_id: None,
        disk_bytes: DISK,
        chunk_bytes: CHUNK,
        generation: [9; 16],
        source_id: None,
        promoted: false,
    })
    .expect("valid config");
    let mut source = ReplicaSource::new(config()).expect("valid config");
    source.on_connected();
    let mut verifier = verifying();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (usize::from(len) * 8).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        // The batch decoder too (a batch's messages then go through `decode` again).
        let _ = decode_payload(bytes);
        let Ok(message) = Message::decode(bytes) else {
            continue;
        };
        if let Ok(actions) = dest.on_message(message.clone()) {
            for action in actions {
                match action {
                    Apply::Write { offset, data } => {
                        assert!(offset + data.len() as u64 <= DISK);
                    }
                    Apply::Zero { offset, len } => assert!(offset + len <= DISK),
                    Apply::Verify {
                        offset,
                        len,
                        chunk_bytes,
                        ..
                    } => {
                        assert!(len > 0 && offset + len <= DISK);
                        assert!(len.div_ceil(chunk_bytes) <= VERIFY_CHUNKS_MAX);
                    }
                    Apply::Reply(_) => {}
                }
            }
        }
        let _ = source.on_message(message.clone());
        let _ = verifier.on_message(message);
        ask(&mut verifier);
        let _ = verifier.on_guest_write(u64::from(len) * 4096 % DISK, 4096);
        let _ = source.next_bulk();
        let _ = source.on_guest_write(u64::from(len) * 512 % DISK, 512);
        let _ = dest.on_synced();
    }
});
