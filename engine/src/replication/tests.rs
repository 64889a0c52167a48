//! Unit tests of the replication state machines against a wrong or hostile peer. The
//! convergence of the two under faults is `engine/tests/replication_sim.rs`.

#![allow(clippy::unwrap_used)]

use super::wire::{Message, RefuseReason};
use super::*;

const CHUNK: u64 = 16 << 10;
const DISK: u64 = 8 * CHUNK;

fn source_config() -> SourceConfig {
    SourceConfig {
        disk_id: [7; 16],
        source_id: [1; 16],
        disk_bytes: DISK,
        chunk_bytes: CHUNK,
        mirror_backlog_bytes_max: 1 << 20,
        bulk_inflight_max: 2,
    }
}

fn source() -> ReplicaSource {
    ReplicaSource::new(source_config()).unwrap()
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
    // A migration rolled back: the destination must hear it is no longer complete before
    // any later write, and is told consistent again (not complete) after.
    assert_eq!(s.undemote(), Some(Message::Unsynced));
    assert!(!s.is_demoted());
    assert_eq!(s.undemote(), None);
    assert_eq!(
        s.take_synced(),
        Some(Message::Synced {
            seq: 0,
            last: false,
            chunks
        })
    );
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

/// A source whose destination holds every chunk: welcomed and copied.
fn synced(mut s: ReplicaSource) -> ReplicaSource {
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    while let Some(job) = s.next_bulk() {
        s.on_message(Message::ChunkDone {
            index: job.index,
            seq: job.seq,
        })
        .unwrap();
    }
    assert_eq!(s.state(), SourceState::InSync);
    s
}

fn welcomed(d: &mut ReplicaDest, disk_bytes: u64) {
    reply(d, hello(7, 1, disk_bytes, CHUNK));
}

fn digests_of(disk: &[u8], offset: u64, len: u64, chunk_bytes: u64) -> Vec<wire::Digest> {
    disk[offset as usize..(offset + len) as usize]
        .chunks(chunk_bytes as usize)
        .map(verify::digest)
        .collect()
}

/// The source's next request, hashing `src`.
fn ask(s: &mut ReplicaSource, src: &[u8], now_ns: u64) -> Option<Message> {
    s.next_verify(now_ns, |offset, len, chunk| {
        Ok::<_, ()>(digests_of(src, offset, len, chunk))
    })
    .unwrap()
}

/// The destination's answer to `request`, hashing `dst`.
fn answer(d: &mut ReplicaDest, dst: &[u8], request: Message) -> Message {
    match d.on_message(request).unwrap().as_slice() {
        [Apply::Verify {
            id,
            first,
            offset,
            len,
            chunk_bytes,
        }] => Message::VerifyReply {
            id: *id,
            first: *first,
            digests: digests_of(dst, *offset, *len, *chunk_bytes),
        },
        other => panic!("expected a verify, got {other:?}"),
    }
}

/// Runs verify to its end with the guest idle; the clock moves a retry delay per round.
fn run_verify(s: &mut ReplicaSource, d: &mut ReplicaDest, src: &[u8], dst: &[u8]) -> VerifyReport {
    let mut now = 0;
    for _ in 0..1000 {
        while let Some(request) = ask(s, src, now) {
            let a = answer(d, dst, request);
            s.on_message(a).unwrap();
        }
        let report = s.verify_report().unwrap();
        if !report.running() {
            return report;
        }
        now += verify::VERIFY_RETRY_DELAY_NS;
    }
    panic!("verify never ended: {:?}", s.verify_report());
}

fn disk_with(len: u64, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ salt)
        .collect()
}

#[test]
fn verify_refuses_without_a_full_copy_or_while_one_runs() {
    let mut s = source();
    assert_eq!(s.start_verify(false, 0), Err(VerifyRefusal::NotConnected));
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    assert_eq!(s.start_verify(false, 0), Err(VerifyRefusal::NotCopied));
    let mut s = synced(source());
    s.start_verify(false, 0).unwrap();
    assert_eq!(s.start_verify(true, 0), Err(VerifyRefusal::Running));
}

/// Equal chunks are equal; a chunk that differs is asked again before it is reported,
/// and the report names exactly its bytes (the last, short chunk included).
#[test]
fn verify_reports_exactly_the_chunks_that_differ() {
    let disk = DISK - 4096;
    let src = disk_with(disk, 0);
    let mut dst = src.clone();
    dst[(3 * CHUNK + 17) as usize] ^= 0x40;
    dst[(disk - 1) as usize] ^= 1;
    let mut s = ReplicaSource::new(SourceConfig {
        disk_bytes: disk,
        ..source_config()
    })
    .unwrap();
    s = synced(s);
    let mut d = dest(DISK);
    welcomed(&mut d, disk);
    s.start_verify(false, 0).unwrap();
    let r = run_verify(&mut s, &mut d, &src, &dst);
    assert_eq!(r.state, VerifyState::Done);
    assert_eq!((r.chunks_total, r.chunks_checked), (8, 8));
    assert_eq!(r.mismatch_chunks, 2);
    assert_eq!(
        r.mismatches,
        vec![
            ByteRange {
                offset: 3 * CHUNK,
                len: CHUNK
            },
            ByteRange {
                offset: 7 * CHUNK,
                len: CHUNK - 4096
            }
        ]
    );
    // One request for the whole disk, one confirmation per chunk that differed.
    assert_eq!(r.requests, 3);
    assert_eq!((r.busy_chunks, r.changed), (0, 0));
    assert_eq!(d.stats().chunks_hashed, 10);
    // Nothing was repaired: the source is still in sync.
    assert_eq!(s.state(), SourceState::InSync);
}

/// A first difference that the second look does not see (the source's disk moved on, as a
/// write completing before its capture does) is not reported.
#[test]
fn a_difference_seen_once_is_not_reported() {
    let src = disk_with(DISK, 0);
    let mut stale = src.clone();
    stale[5] ^= 1;
    let mut s = synced(source());
    let mut d = dest(DISK);
    welcomed(&mut d, DISK);
    s.start_verify(false, 0).unwrap();
    // The first request is hashed on a source disk the destination does not hold.
    let first = ask(&mut s, &stale, 0).unwrap();
    let a = answer(&mut d, &src, first);
    s.on_message(a).unwrap();
    // The second look waits until the first is VERIFY_CONFIRM_DELAY_NS old.
    assert_eq!(ask(&mut s, &src, verify::VERIFY_CONFIRM_DELAY_NS - 1), None);
    let r = run_verify(&mut s, &mut d, &src, &src);
    assert_eq!((r.mismatch_chunks, r.unconfirmed), (0, 1));
    assert_eq!(r.chunks_checked, 8);
}

/// A write to a chunk whose comparison is in flight voids it: the destination's answer
/// predates the write, so a difference means nothing. The chunk is compared again later.
#[test]
fn a_chunk_written_while_compared_is_compared_again() {
    let mut src = disk_with(DISK, 0);
    let mut s = synced(source());
    let mut d = dest(DISK);
    welcomed(&mut d, DISK);
    s.start_verify(false, 0).unwrap();
    let request = ask(&mut s, &src, 0).unwrap();
    let before = src.clone();
    // The guest writes chunk 2 and the source mirrors it; the destination answers the
    // request before it applies the write (the write travels after the request).
    src[(2 * CHUNK) as usize..(2 * CHUNK + 512) as usize].fill(0xee);
    let WriteVerdict::Mirror { seq } = s.on_guest_write(2 * CHUNK, 512).unwrap() else {
        panic!("an in-sync source mirrors");
    };
    let a = answer(&mut d, &before, request);
    // Hashed locally before the write, so the digests even agree; it is still not
    // counted, since nothing says which side of the write each saw.
    s.on_message(a).unwrap();
    let r = s.verify_report().unwrap();
    assert_eq!((r.changed, r.chunks_checked), (1, 7));
    assert!(r.running());
    // Nothing more until the retry delay passed.
    assert_eq!(ask(&mut s, &src, 1), None);
    let mut dst = before;
    dst[(2 * CHUNK) as usize..(2 * CHUNK + 512) as usize].fill(0xee);
    d.on_message(Message::Write {
        seq,
        offset: 2 * CHUNK,
        data: vec![0xee; 512],
    })
    .unwrap();
    let r = run_verify(&mut s, &mut d, &src, &dst);
    assert_eq!((r.chunks_checked, r.mismatch_chunks, r.passes), (8, 0, 2));
}

/// A chunk that stays dirty through every pass is reported busy, not as a mismatch.
#[test]
fn a_chunk_that_stays_busy_is_reported_busy() {
    let src = disk_with(DISK, 0);
    let mut s = synced(source());
    let mut d = dest(DISK);
    welcomed(&mut d, DISK);
    s.start_verify(false, 0).unwrap();
    // Dirty and never copied again (the test holds the bulk copy back).
    s.mark_chunk_dirty(6);
    let r = run_verify(&mut s, &mut d, &src, &src);
    assert_eq!(r.state, VerifyState::Done);
    assert_eq!((r.chunks_checked, r.busy_chunks), (7, 1));
    assert_eq!(r.passes, verify::VERIFY_PASSES_MAX);
    assert_eq!(
        r.busy,
        vec![ByteRange {
            offset: 6 * CHUNK,
            len: CHUNK
        }]
    );
    assert_eq!(r.mismatch_chunks, 0);
}

#[test]
fn repair_copies_a_chunk_that_differs_again() {
    let src = disk_with(DISK, 0);
    let mut dst = src.clone();
    dst[(4 * CHUNK) as usize] ^= 0xff;
    let mut s = synced(source());
    let mut d = dest(DISK);
    welcomed(&mut d, DISK);
    assert!(matches!(s.take_synced(), Some(Message::Synced { .. })));
    s.start_verify(true, 0).unwrap();
    let r = run_verify(&mut s, &mut d, &src, &dst);
    assert_eq!(r.mismatch_chunks, 1);
    assert!(matches!(s.state(), SourceState::Resyncing { .. }));
    // The destination took itself for consistent: it is told otherwise.
    assert!(s.take_repaired());
    assert_eq!(s.take_unsynced(), Some(Message::Unsynced));
    assert_eq!(s.next_bulk().map(|j| j.index), Some(4));
}

/// Requests are bounded in size and in number; the source never asks for more chunks
/// than `VERIFY_INFLIGHT_CHUNKS_MAX` at once.
#[test]
fn verify_requests_are_bounded() {
    let chunk = 4096;
    let chunks = 2 * verify::VERIFY_INFLIGHT_CHUNKS_MAX + 5;
    let mut s = ReplicaSource::new(SourceConfig {
        disk_bytes: chunks * chunk,
        chunk_bytes: chunk,
        bulk_inflight_max: 64,
        ..source_config()
    })
    .unwrap();
    s = synced(s);
    s.start_verify(false, 0).unwrap();
    let zeros = vec![0; (chunks * chunk) as usize];
    let mut asked = 0;
    while let Some(m) = ask(&mut s, &zeros, 0) {
        let Message::VerifyRequest { count, .. } = m else {
            panic!("{m:?}");
        };
        assert!((1..=verify::VERIFY_BATCH_CHUNKS).contains(&count));
        asked += count;
    }
    assert_eq!(asked, verify::VERIFY_INFLIGHT_CHUNKS_MAX);
}

#[test]
fn hostile_verify_messages_end_the_session() {
    let mut d = dest(DISK);
    let request = |first, count| Message::VerifyRequest {
        id: 1,
        first,
        count,
    };
    assert_eq!(
        d.on_message(request(0, 1)),
        Err(DestError::NotWelcomed("VerifyRequest"))
    );
    welcomed(&mut d, DISK - CHUNK);
    for (first, count) in [
        (0, 0),
        (0, wire::VERIFY_CHUNKS_MAX + 1),
        (7, 1),
        (6, 2),
        (u64::MAX, 2),
    ] {
        assert!(
            matches!(
                d.on_message(request(first, count)),
                Err(DestError::VerifyRange { .. })
            ),
            "{first} {count}"
        );
    }
    assert_eq!(d.stats().chunks_hashed, 0);
    let digests = vec![[0; wire::DIGEST_BYTES]];
    assert_eq!(
        d.on_message(Message::VerifyReply {
            id: 0,
            first: 0,
            digests: digests.clone()
        }),
        Err(DestError::Unexpected("VerifyReply"))
    );

    let src = disk_with(DISK, 0);
    let mut s = synced(source());
    assert_eq!(
        s.on_message(request(0, 1)),
        Err(SourceError::Unexpected("VerifyRequest"))
    );
    let unasked = Message::VerifyReply {
        id: 0,
        first: 0,
        digests: digests.clone(),
    };
    assert_eq!(
        s.on_message(unasked.clone()),
        Err(SourceError::UnaskedVerify { id: 0 })
    );
    s.start_verify(false, 0).unwrap();
    let Some(Message::VerifyRequest { id, first, count }) = ask(&mut s, &src, 0) else {
        panic!("a running verify asks");
    };
    assert_eq!((id, first, count), (0, 0, 8));
    // The wrong chunks, or too few of them.
    assert!(matches!(
        s.on_message(unasked),
        Err(SourceError::VerifyReplyShape { .. })
    ));
    // A session lost ends the run; a late answer to it is dropped, not an error.
    s.on_disconnected();
    let r = s.verify_report().unwrap();
    assert!(matches!(r.state, VerifyState::Failed(_)), "{r:?}");
    s.on_connected();
    s.on_message(Message::Welcome).unwrap();
    let late = Message::VerifyReply {
        id: 0,
        first: 0,
        digests: vec![[0; wire::DIGEST_BYTES]; 8],
    };
    assert_eq!(s.on_message(late), Ok(()));
}
