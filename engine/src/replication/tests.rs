//! Unit tests of the replication state machines against a wrong or hostile peer. The
//! convergence of the two under faults is `engine/tests/replication_sim.rs`.

#![allow(clippy::unwrap_used)]

use super::wire::{Message, RefuseReason};
use super::*;

const CHUNK: u64 = 16 << 10;
const DISK: u64 = 8 * CHUNK;

fn source() -> ReplicaSource {
    ReplicaSource::new(SourceConfig {
        disk_id: [7; 16],
        source_id: [1; 16],
        disk_bytes: DISK,
        chunk_bytes: CHUNK,
        mirror_backlog_bytes_max: 1 << 20,
        bulk_inflight_max: 2,
    })
    .unwrap()
}

fn dest(disk_bytes: u64) -> ReplicaDest {
    ReplicaDest::new(DestConfig {
        disk_id: Some([7; 16]),
        disk_bytes,
        chunk_bytes: CHUNK,
        generation: [9; 16],
        source_id: None,
        promoted: false,
    })
    .unwrap()
}

fn hello(disk_id: u8, source_id: u8, disk_bytes: u64, chunk_bytes: u64) -> Message {
    Message::Hello {
        disk_id: [disk_id; 16],
        source_id: [source_id; 16],
        disk_bytes,
        chunk_bytes,
    }
}

/// The answer to `m`: one reply, or a `Welcome` followed by the replica's id.
fn reply(d: &mut ReplicaDest, m: Message) -> Message {
    match d.on_message(m).unwrap().as_slice() {
        [Apply::Reply(r)] if *r != Message::Welcome => r.clone(),
        [Apply::Reply(Message::Welcome), Apply::Reply(Message::ReplicaId { .. })] => {
            Message::Welcome
        }
        other => panic!("expected one reply, or Welcome and ReplicaId, got {other:?}"),
    }
}

#[test]
fn bad_hellos_are_refused_with_the_reason_and_nothing_is_written() {
    let mut d = dest(DISK);
    let cases = [
        (hello(7, 1, DISK + 1, CHUNK), RefuseReason::DiskTooSmall),
        (hello(8, 1, DISK, CHUNK), RefuseReason::WrongDisk),
        (hello(7, 1, DISK, CHUNK * 2), RefuseReason::ChunkSize),
    ];
    for (m, reason) in cases {
        assert_eq!(reply(&mut d, m), Message::Refuse(reason));
    }
    // Refused, so data is still refused.
    let write = Message::Write {
        seq: 1,
        offset: 0,
        data: vec![1; 512],
    };
    assert_eq!(
        d.on_message(write.clone()),
        Err(DestError::NotWelcomed("Write"))
    );
    assert_eq!(reply(&mut d, hello(7, 1, DISK, CHUNK)), Message::Welcome);
    // A second source is refused; the first may come back.
    assert_eq!(
        reply(&mut d, hello(7, 2, DISK, CHUNK)),
        Message::Refuse(RefuseReason::Busy)
    );
    assert_eq!(reply(&mut d, hello(7, 1, DISK, CHUNK)), Message::Welcome);
    // Nothing copied yet: not a state the source was in, so no promote unless forced.
    assert_eq!(d.promote(false), Err(PromoteError::Inconsistent));
    let forced = d.promote(true).unwrap();
    assert!(forced.forced && !forced.consistent && !forced.complete);
    assert_eq!(
        reply(&mut d, hello(7, 1, DISK, CHUNK)),
        Message::Refuse(RefuseReason::Promoted)
    );
    assert_eq!(d.on_message(write), Err(DestError::NotWelcomed("Write")));
    assert_eq!(d.stats().refusals, 5);
}

#[test]
fn hostile_data_is_refused_before_anything_is_applied() {
    let mut d = dest(DISK);
    reply(&mut d, hello(7, 1, DISK, CHUNK));
    let out_of_range = Message::Write {
        seq: 1,
        offset: DISK - 256,
        data: vec![1; 512],
    };
    assert!(matches!(
        d.on_message(out_of_range),
        Err(DestError::OutOfRange { .. })
    ));
    let wraps = Message::Zero {
        seq: 1,
        offset: u64::MAX - 10,
        len: 100,
    };
    assert!(matches!(
        d.on_message(wraps),
        Err(DestError::OutOfRange { .. })
    ));
    let short_chunk = Message::Chunk {
        index: 0,
        seq: 0,
        data: vec![1; 100],
    };
    assert!(matches!(
        d.on_message(short_chunk),
        Err(DestError::ChunkLength { .. })
    ));
    let no_chunk = Message::Chunk {
        index: 8,
        seq: 0,
        data: Vec::new(),
    };
    assert!(matches!(
        d.on_message(no_chunk),
        Err(DestError::NoSuchChunk { .. })
    ));
    let w = |seq| Message::Write {
        seq,
        offset: 0,
        data: vec![1; 512],
    };
    assert_eq!(d.on_message(w(5)).unwrap().len(), 1);
    assert_eq!(
        d.on_message(w(4)),
        Err(DestError::OutOfOrder { seq: 4, applied: 5 })
    );
    assert_eq!(
        d.on_message(Message::Welcome),
        Err(DestError::Unexpected("Welcome"))
    );
}

/// The mirror race both ways: a chunk read before a write that already landed is
/// dropped and asked again; a write older than a chunk that already landed is skipped.
#[test]
fn neither_side_of_the_race_lands_older_data() {
    let mut d = dest(DISK);
    reply(&mut d, hello(7, 1, DISK, CHUNK));
    let newer_write = Message::Write {
        seq: 9,
        offset: 100 * 512,
        data: vec![9; 512],
    };
    assert_eq!(d.on_message(newer_write).unwrap().len(), 1);
    let stale_chunk = Message::Chunk {
        index: 3,
        seq: 8,
        data: vec![8; CHUNK as usize],
    };
    assert_eq!(
        d.on_message(stale_chunk).unwrap(),
        vec![Apply::Reply(Message::Redo { index: 3 })]
    );
    let fresh_chunk = Message::Chunk {
        index: 5,
        seq: 20,
        data: vec![2; CHUNK as usize],
    };
    assert_eq!(d.on_message(fresh_chunk).unwrap().len(), 1);
    // Seq 15 spans chunks 4 and 5: only chunk 4's part may land.
    let spanning = Message::Write {
        seq: 15,
        offset: 5 * CHUNK - 512,
        data: vec![15; 1024],
    };
    assert_eq!(
        d.on_message(spanning).unwrap(),
        vec![Apply::Write {
            offset: 5 * CHUNK - 512,
            data: vec![15; 512]
        }]
    );
    assert_eq!(d.stats().mirror_bytes_superseded, 512);
    assert_eq!(
        d.on_synced(),
        vec![
            Message::ChunkDone { index: 5, seq: 20 },
            Message::Applied { seq: 15 }
        ]
    );
}

#[test]
fn the_source_copies_everything_then_mirrors_and_reports_sync() {
    let mut s = source();
    assert_eq!(s.state(), SourceState::Disconnected);
    assert!(matches!(s.on_connected(), Message::Hello { .. }));
    assert_eq!(s.next_bulk(), None, "nothing before Welcome");
    s.on_message(Message::Welcome).unwrap();
    // A write to a chunk not copied yet is left to the copy.
    assert_eq!(
        s.on_guest_write(0, 512).unwrap(),
        WriteVerdict::Tracked { seq: 1 }
    );
    let mut done = 0;
    while done < 8 {
        let a = s.next_bulk().unwrap();
        let b = s.next_bulk().unwrap();
        assert_eq!(s.next_bulk(), None, "the in-flight bound holds");
        for job in [a, b] {
            s.on_message(Message::ChunkDone {
                index: job.index,
                seq: job.seq,
            })
            .unwrap();
            done += 1;
        }
    }
    assert_eq!(s.state(), SourceState::InSync);
    assert_eq!(
        s.on_guest_write(CHUNK, 4096).unwrap(),
        WriteVerdict::Mirror { seq: 2 }
    );
    assert_eq!(s.state(), SourceState::Behind { lag_bytes: 4096 });
    assert_eq!(
        s.on_message(Message::Applied { seq: 3 }),
        Err(SourceError::AppliedBeyondWritten { seq: 3, last: 2 })
    );
    s.on_message(Message::Applied { seq: 2 }).unwrap();
    assert_eq!(s.state(), SourceState::InSync);
    // A lost session puts the unconfirmed mirror write back in the bitmap.
    s.on_guest_write(2 * CHUNK, 512).unwrap();
    s.on_disconnected();
    assert_eq!(s.state(), SourceState::Disconnected);
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    assert_eq!(
        s.state(),
        SourceState::Resyncing {
            dirty_bytes: CHUNK,
            total_bytes: DISK
        }
    );
    assert_eq!(s.next_bulk().map(|j| j.index), Some(2));
    assert!(s.on_guest_write(DISK - 256, 512).is_err());
    assert!(matches!(
        s.on_message(Message::Redo { index: 99 }),
        Err(SourceError::NoSuchChunk { .. })
    ));
}

#[test]
fn consistency_follows_synced_unsynced_and_chunks() {
    let mut d = dest(DISK);
    reply(&mut d, hello(7, 1, DISK, CHUNK));
    assert!(!d.is_consistent());
    // Every chunk was sent (two) and confirmed: consistent at seq 3.
    for index in 0..2 {
        let chunk = Message::Chunk {
            index,
            seq: 3,
            data: Vec::new(),
        };
        d.on_message(chunk).unwrap();
    }
    let synced = |seq, last, chunks| Message::Synced { seq, last, chunks };
    // A Synced that counts fewer chunks than arrived: one sent after it overtook it.
    d.on_message(synced(3, false, 1)).unwrap();
    assert_eq!(d.consistent_at(), None);
    d.on_message(synced(3, false, 2)).unwrap();
    assert_eq!(d.consistent_at(), Some(3));
    assert_eq!(d.promote(false), Err(PromoteError::SourceLive));
    // Mirror writes in order keep it consistent, at their seq.
    let write = Message::Write {
        seq: 4,
        offset: 0,
        data: vec![1; 512],
    };
    d.on_message(write).unwrap();
    assert_eq!(d.consistent_at(), Some(4));
    // A write left to the bitmap: not consistent until the next Synced.
    d.on_message(Message::Unsynced).unwrap();
    assert_eq!(d.consistent_at(), None);
    d.on_message(synced(6, true, 2)).unwrap();
    assert!(d.is_complete());
    assert!(matches!(
        d.on_message(synced(3, false, 2)),
        Err(DestError::SyncedBehind { .. })
    ));
    let promoted = d.promote(false).unwrap();
    assert!(promoted.consistent && promoted.complete && !promoted.forced);
    // A new session starts inconsistent (writes of the last one may be missing).
    let mut d = dest(DISK);
    reply(&mut d, hello(7, 1, DISK, CHUNK));
    d.on_message(synced(0, false, 0)).unwrap();
    assert!(d.is_consistent());
    d.on_disconnected();
    reply(&mut d, hello(7, 1, DISK, CHUNK));
    assert!(!d.is_consistent());
}

#[test]
fn the_source_announces_synced_once_and_unsynced_after_a_tracked_write() {
    let mut s = source();
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    assert_eq!(s.take_synced(), None, "nothing copied yet");
    while let Some(job) = s.next_bulk() {
        s.on_message(Message::ChunkDone {
            index: job.index,
            seq: job.seq,
        })
        .unwrap();
    }
    let chunks = DISK.div_ceil(CHUNK);
    assert_eq!(
        s.take_synced(),
        Some(Message::Synced {
            seq: 0,
            last: false,
            chunks
        })
    );
    assert_eq!(s.take_synced(), None);
    assert_eq!(s.take_unsynced(), Some(Message::Unsynced));
    assert_eq!(s.take_unsynced(), None);
    s.demote();
    assert_eq!(
        s.take_synced(),
        Some(Message::Synced {
            seq: 0,
            last: true,
            chunks
        })
    );
    assert_eq!(s.take_synced(), None);
}

#[test]
fn another_replica_behind_the_same_address_is_copied_in_full() {
    let mut s = source();
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    s.on_message(Message::ReplicaId {
        generation: [1; 16],
    })
    .unwrap();
    while let Some(job) = s.next_bulk() {
        s.on_message(Message::ChunkDone {
            index: job.index,
            seq: job.seq,
        })
        .unwrap();
    }
    assert_eq!(s.state(), SourceState::InSync);
    // The same replica again (a restarted destination): nothing to copy.
    s.on_disconnected();
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    s.on_message(Message::ReplicaId {
        generation: [1; 16],
    })
    .unwrap();
    assert_eq!(s.next_bulk(), None);
    assert_eq!(s.stats().full_resyncs, 0);
    // Another one: every chunk again.
    s.on_disconnected();
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    s.on_message(Message::ReplicaId {
        generation: [2; 16],
    })
    .unwrap();
    let mut again = 0;
    while let Some(job) = s.next_bulk() {
        again += 1;
        s.on_message(Message::ChunkDone {
            index: job.index,
            seq: job.seq,
        })
        .unwrap();
    }
    assert_eq!(again, DISK.div_ceil(CHUNK));
    assert_eq!(s.stats().full_resyncs, 1);
}

#[test]
fn a_welcome_comes_with_the_replica_id() {
    let mut d = dest(DISK);
    let out = d.on_message(hello(7, 1, DISK, CHUNK)).unwrap();
    assert_eq!(
        out,
        vec![
            Apply::Reply(Message::Welcome),
            Apply::Reply(Message::ReplicaId {
                generation: [9; 16]
            })
        ]
    );
}
