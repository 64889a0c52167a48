//! A hostile replication peer: arbitrary bytes as a sequence of messages (each prefixed by
//! a one-byte length class) to a destination and to a source. Decoding must reject what is
//! malformed and the state machines must answer with an error, never panic, and never
//! ask the caller to write outside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_engine::replication::wire::Message;
use strait_engine::replication::{
    Apply, DestConfig, ReplicaDest, ReplicaSource, SourceConfig,
};

const CHUNK: u64 = 16 << 10;
const DISK: u64 = 8 * CHUNK + 4096;

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
    let mut source = ReplicaSource::new(SourceConfig {
        disk_id: [1; 16],
        source_id: [2; 16],
        disk_bytes: DISK,
        chunk_bytes: CHUNK,
        mirror_backlog_bytes_max: 1 << 20,
        bulk_inflight_max: 4,
    })
    .expect("valid config");
    source.on_connected();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (usize::from(len) * 8).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
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
                    Apply::Reply(_) => {}
                }
            }
        }
        let _ = source.on_message(message);
        let _ = source.next_bulk();
        let _ = source.on_guest_write(u64::from(len) * 512 % DISK, 512);
        let _ = dest.on_synced();
    }
});
