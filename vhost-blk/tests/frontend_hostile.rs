//! The block backend driven without a VM (see `common/mod.rs`): Hostile guests: malformed chains, out-of-range requests, broken rings and a queue deeper than the in-flight budget get the right status and counter, and the backend keeps serving.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

const CAPACITY_SECTORS: u64 = IMAGE_BYTES / SECTOR;

/// Chains a hostile guest may offer: each is answered (or dropped), counted, and the queue
/// keeps serving.
#[test]
fn hostile_requests_get_the_right_status_and_counter() {
    let rig = Rig::start(RigOptions::default());
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let data = DATA_AREA;
    let mem = MEM_BYTES as u64;

    // Runs one hostile request, checks its completion and which counter moved, then checks
    // that a valid read still works.
    let case = |q: &mut DriverQueue<'_>,
                name: &str,
                t: Ticket,
                want: Done,
                counter: fn(&strait_vhost_blk::QueueSnapshot) -> u64| {
        let before = rig.counters(0);
        let done = q.complete(t);
        assert_eq!(done, want, "{name}");
        let after = rig.counters(0);
        assert_eq!(counter(&after), counter(&before) + 1, "{name}: counter");
        assert_eq!(
            after.errors.total(),
            before.errors.total() + 1,
            "{name}: exactly one error counted"
        );
        // Into a buffer of its own, so the hostile request's buffer stays observable.
        assert_bytes!(
            q.read(16, DATA_AREA + 0x8_0000, 4096),
            image_bytes(16 * SECTOR, 4096),
            "{name}"
        );
    };
    let ioerr = Done {
        status: S_IOERR,
        used_len: 1,
    };
    let no_status = Done {
        status: STATUS_UNTOUCHED,
        used_len: 0,
    };
    let bad = |c: &strait_vhost_blk::QueueSnapshot| c.errors.bad_descriptor;
    let range = |c: &strait_vhost_blk::QueueSnapshot| c.errors.out_of_range;

    let t = q.submit(T_IN, 0, &[Buf::to_guest(mem, 4096)]);
    case(&mut q, "data beyond guest memory", t, ioerr, bad);
    let t = q.submit(T_IN, 0, &[Buf::to_guest(mem - 2048, 4096)]);
    case(
        &mut q,
        "data straddling the end of guest memory",
        t,
        ioerr,
        bad,
    );
    let t = q.submit(T_IN, 0, &[Buf::to_guest(u64::MAX - 511, 512)]);
    case(
        &mut q,
        "data at the top of the address space",
        t,
        ioerr,
        bad,
    );
    rig.write_guest(data, &[0xCC; 4096]);
    let t = q.submit(T_IN, 0, &[Buf::from_guest(data, 4096)]);
    case(&mut q, "read into a device-readable buffer", t, ioerr, bad);
    assert_bytes!(rig.read_guest(data, 4096), vec![0xCC; 4096]);
    let t = q.submit(T_OUT, 0, &[Buf::to_guest(data, 4096)]);
    case(&mut q, "write from a device-writable buffer", t, ioerr, bad);
    let t = q.submit(T_IN, 0, &[Buf::to_guest(data, 100)]);
    case(&mut q, "partial sector", t, ioerr, bad);
    let t = q.submit(
        T_IN,
        0,
        &[Buf::to_guest(0, mem as u32), Buf::to_guest(0, mem as u32)],
    );
    case(&mut q, "more than MAX_REQUEST_BYTES", t, ioerr, bad);
    assert_bytes!(
        q.read(0, DATA_AREA, 512),
        image_bytes(0, 512),
        "rings intact"
    );

    let t = q.submit(T_IN, CAPACITY_SECTORS - 4, &[Buf::to_guest(data, 4096)]);
    case(&mut q, "read past the end of the disk", t, ioerr, range);
    let before = rig.disk(IMAGE_BYTES - 2048, 2048);
    let t = q.submit(T_OUT, CAPACITY_SECTORS - 4, &[Buf::from_guest(data, 4096)]);
    case(&mut q, "write past the end of the disk", t, ioerr, range);
    assert_bytes!(rig.disk(IMAGE_BYTES - 2048, 2048), before);
    let t = q.submit(T_IN, u64::MAX - 3, &[Buf::to_guest(data, 4096)]);
    case(&mut q, "sector overflow", t, ioerr, range);
    let t = q.submit(T_IN, u64::MAX / SECTOR + 1, &[Buf::to_guest(data, 512)]);
    case(&mut q, "byte offset overflow", t, ioerr, range);
    let t = {
        let mut rec = Vec::new();
        rec.extend_from_slice(&(u64::MAX - 1).to_le_bytes());
        rec.extend_from_slice(&8u32.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rig.write_guest(0x31_0000, &rec);
        q.submit(T_DISCARD, 0, &[Buf::from_guest(0x31_0000, 16)])
    };
    case(&mut q, "discard range overflow", t, ioerr, range);
    // The last sector is fine.
    assert_bytes!(
        q.read(CAPACITY_SECTORS - 1, data, 512),
        image_bytes(IMAGE_BYTES - 512, 512)
    );

    let t = q.submit(0x77, 0, &[]);
    case(
        &mut q,
        "unknown request type",
        t,
        Done {
            status: S_UNSUPP,
            used_len: 1,
        },
        |c| c.errors.unsupported,
    );

    // A header descriptor shorter than 16 bytes, or device-writable.
    let t = {
        let head = q.next_head(2);
        let header = q.write_header(head, T_IN, 0);
        rig.write_guest(STATUS_AREA + 200, &[STATUS_UNTOUCHED]);
        let h = q.offer_chain(&[(header, 8, 0), (STATUS_AREA + 200, 1, F_WRITE)]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 200,
        }
    };
    case(&mut q, "8-byte header", t, ioerr, bad);
    let t = {
        let head = q.next_head(3);
        let header = q.write_header(head, T_IN, 0);
        rig.write_guest(STATUS_AREA + 200, &[STATUS_UNTOUCHED]);
        let h = q.offer_chain(&[
            (header, 16, F_WRITE),
            (data, 512, F_WRITE),
            (STATUS_AREA + 200, 1, F_WRITE),
        ]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 200,
        }
    };
    case(&mut q, "device-writable header", t, ioerr, bad);
    let t = {
        rig.write_guest(STATUS_AREA + 200, &[STATUS_UNTOUCHED]);
        let h = q.offer_chain(&[
            (mem + 4096, 16, 0),
            (data, 512, F_WRITE),
            (STATUS_AREA + 200, 1, F_WRITE),
        ]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 200,
        }
    };
    case(&mut q, "header beyond guest memory", t, ioerr, bad);

    // A status descriptor the device may not write: no status, used length 0, and the data
    // buffer untouched (the chain is validated before any I/O).
    let t = {
        let head = q.next_head(3);
        let header = q.write_header(head, T_IN, 0);
        rig.write_guest(data, &[0xCC; 512]);
        rig.write_guest(STATUS_AREA + 201, &[STATUS_UNTOUCHED]);
        let h = q.offer_chain(&[
            (header, 16, 0),
            (data, 512, F_WRITE),
            (STATUS_AREA + 201, 1, 0),
        ]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 201,
        }
    };
    case(&mut q, "device-readable status", t, no_status, bad);
    rig.write_guest(data, &[0xCC; 512]);
    let t = {
        let head = q.next_head(2);
        let header = q.write_header(head, T_IN, 0);
        let h = q.offer_chain(&[(header, 16, 0), (mem + 100, 1, F_WRITE)]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 202,
        }
    };
    rig.write_guest(STATUS_AREA + 202, &[STATUS_UNTOUCHED]);
    case(&mut q, "status beyond guest memory", t, no_status, bad);
    let t = {
        let head = q.next_head(1);
        let header = q.write_header(head, T_IN, 0);
        let h = q.offer_chain(&[(header, 16, 0)]);
        Ticket {
            head: h,
            status_addr: STATUS_AREA + 202,
        }
    };
    case(&mut q, "header only", t, no_status, bad);

    // Discard / write-zeroes payloads that are not whole records, or carry bad flags.
    rig.write_guest(0x31_0000, &[0u8; 64]);
    let t = q.submit(T_DISCARD, 0, &[Buf::from_guest(0x31_0000, 24)]);
    case(&mut q, "partial discard record", t, ioerr, bad);
    let t = q.submit(T_WRITE_ZEROES, 0, &[]);
    case(&mut q, "write-zeroes without ranges", t, ioerr, bad);
    rig.write_guest(0x31_0000 + 12, &1u32.to_le_bytes());
    let before = rig.disk(0, 512);
    // virtio 1.2, 5.2.6.2: the unmap flag on a discard, or any reserved flag, is UNSUPP.
    let unsupp = Done {
        status: S_UNSUPP,
        used_len: 1,
    };
    let unsupported = |c: &strait_vhost_blk::QueueSnapshot| c.errors.unsupported;
    let t = q.submit(T_DISCARD, 0, &[Buf::from_guest(0x31_0000, 16)]);
    case(
        &mut q,
        "discard with the unmap flag",
        t,
        unsupp,
        unsupported,
    );
    rig.write_guest(0x31_0000 + 12, &2u32.to_le_bytes());
    let t = q.submit(T_WRITE_ZEROES, 0, &[Buf::from_guest(0x31_0000, 16)]);
    case(
        &mut q,
        "write-zeroes with a reserved flag",
        t,
        unsupp,
        unsupported,
    );
    // A range longer than max_discard_sectors (1 GiB) is refused, as QEMU does (IOERR).
    rig.write_guest(0x31_0000, &0u64.to_le_bytes());
    rig.write_guest(0x31_0000 + 8, &((1u32 << 21) + 1).to_le_bytes());
    rig.write_guest(0x31_0000 + 12, &0u32.to_le_bytes());
    let t = q.submit(T_DISCARD, 0, &[Buf::from_guest(0x31_0000, 16)]);
    case(
        &mut q,
        "discard longer than max_discard_sectors",
        t,
        ioerr,
        bad,
    );
    assert_bytes!(rig.disk(0, 512), before);

    // seg_max: 126 data segments work, 127 are refused.
    let segs: Vec<Buf> = (0..126)
        .map(|i| Buf::to_guest(data + i * 512, 512))
        .collect();
    let done = q.request(T_IN, 0, &segs);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 126 * 512 + 1
        }
    );
    assert_bytes!(rig.read_guest(data, 126 * 512), image_bytes(0, 126 * 512));
    let segs: Vec<Buf> = (0..127)
        .map(|i| Buf::to_guest(data + i * 512, 512))
        .collect();
    let t = q.submit(T_IN, 0, &segs);
    case(&mut q, "127 data segments", t, no_status, bad);

    assert_eq!(rig.counters(0).errors.io, 0);
}

/// Broken chain shapes must not hang the backend: loops, links and heads past the queue
/// size, a corrupt avail index.
#[test]
fn broken_chains_do_not_hang_the_backend() {
    // Two queues on one core: a queue that spins would starve its neighbour.
    let rig = Rig::start(RigOptions {
        queues: 2,
        cores: vec![0],
        ..RigOptions::default()
    });
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let mut q1 = rig.queue(&fe, 1);
    let bad = || rig.counters(0).errors.bad_descriptor;

    // A loop: 0 -> 1 -> 0.
    let b0 = bad();
    let first = q.alloc(2);
    let header = q.write_header(first, T_IN, 0);
    q.store_desc(first, header, 16, F_NEXT, first + 1);
    q.store_desc(first + 1, DATA_AREA, 512, F_NEXT | F_WRITE, first);
    q.offer(first);
    q.notify();
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(first),
            len: 0
        }]
    );
    assert_eq!(bad(), b0 + 1);
    assert_bytes!(q.read(16, DATA_AREA, 4096), image_bytes(16 * SECTOR, 4096));

    // A descriptor that links to itself.
    let first = q.alloc(1);
    q.store_desc(first, header, 16, F_NEXT, first);
    q.offer(first);
    q.notify();
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(first),
            len: 0
        }]
    );

    // A link past the queue size.
    let first = q.alloc(1);
    q.store_desc(first, header, 16, F_NEXT, QUEUE_SIZE + 44);
    q.offer(first);
    q.notify();
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(first),
            len: 0
        }]
    );
    assert_eq!(bad(), b0 + 3);

    // A head index past the queue size, offered together with a valid read: the bad head
    // cannot be returned (the used ring only takes valid heads) and is dropped; the read
    // completes.
    q.offer(QUEUE_SIZE + 3);
    rig.write_guest(DATA_AREA, &[0xCC; 4096]);
    let t = q.submit(T_IN, 32, &[Buf::to_guest(DATA_AREA, 4096)]);
    q.notify();
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(t.head),
            len: 4097
        }]
    );
    assert_eq!(q.status(t), S_OK);
    assert_bytes!(
        rig.read_guest(DATA_AREA, 4096),
        image_bytes(32 * SECTOR, 4096)
    );
    assert_eq!(bad(), b0 + 4);
    q.assert_no_used(Duration::from_millis(50));

    // A corrupt avail index (more entries than the ring holds). The backend refuses to walk
    // the ring, counts it, and must neither spin on it nor starve the other queue.
    let avail_idx = q.vq.avail().idx().load();
    let b1 = bad();
    q.vq.avail()
        .idx()
        .store(avail_idx.wrapping_add(QUEUE_SIZE + 10));
    q.notify();
    wait_until("the corrupt ring to be counted", || bad() > b1);
    let spins_before = bad();
    std::thread::sleep(Duration::from_millis(200));
    let spins = bad() - spins_before;
    assert!(
        spins <= 2,
        "the backend re-walked the corrupt ring {spins} times in 200 ms without a kick"
    );
    assert_bytes!(q1.read(48, DATA_AREA, 4096), image_bytes(48 * SECTOR, 4096));
    q.assert_no_used(Duration::from_millis(10));
    // The driver repairs its ring; the queue serves again after the next kick.
    q.vq.avail().idx().store(avail_idx);
    assert_bytes!(q.read(16, DATA_AREA, 4096), image_bytes(16 * SECTOR, 4096));
    assert!(rig.backend.status().vmm_connected);
}

/// A guest may queue more data than the backend keeps in flight (`MAX_INFLIGHT_BYTES`,
/// 16 MiB): the backend must hold the rest back until completions free room, not stall.
#[test]
fn queue_deeper_than_the_inflight_budget_completes() {
    let rig = Rig::start(RigOptions::default());
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let request_bytes = strait_vhost_blk::MAX_REQUEST_BYTES as u32;
    assert_eq!(request_bytes as usize, MEM_BYTES);
    // `limits::MAX_INFLIGHT_BYTES`, which the crate does not export.
    let inflight_budget_bytes: u64 = 16 << 20;
    let requests = inflight_budget_bytes / u64::from(request_bytes) + 2;
    // Every request writes all of guest memory (the device only reads it) to the first
    // 4 MiB of the disk; data pages above 1 MiB do not change while the test runs.
    let tickets: Vec<Ticket> = (0..requests)
        .map(|_| q.submit(T_OUT, 0, &[Buf::from_guest(0, request_bytes)]))
        .collect();
    q.notify();
    let used = q.wait_used(requests as u16);
    for (t, u) in tickets.iter().zip(&used) {
        assert_eq!(q.status(*t), S_OK);
        assert_eq!(u.len, 1);
    }
    let stable = DATA_AREA as usize..MEM_BYTES;
    assert_bytes!(
        rig.disk(stable.start as u64, stable.len()),
        rig.read_guest(stable.start as u64, stable.len())
    );
    assert_eq!(rig.counters(0).writes, requests);
}
