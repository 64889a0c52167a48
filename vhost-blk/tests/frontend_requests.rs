//! The block backend driven without a VM (see `common/mod.rs`): Every request type, with and without EVENT_IDX, through indirect tables, on a read-only disk, and through the capture point.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use strait_vhost_blk::{GuestWrite, WriteCapture};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const CAPACITY_SECTORS: u64 = IMAGE_BYTES / SECTOR;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn every_request_type_reaches_the_image() {
    let rig = Rig::start(RigOptions::default());
    let features = rig.default_features();
    let fe = rig.connect(features);
    let mut q = rig.queue(&fe, 0);
    wait_until("the backend to see the VMM", || {
        rig.backend.status().vmm_connected
    });

    let status = rig.backend.status();
    for name in [
        "VERSION_1",
        "PROTOCOL_FEATURES",
        "EVENT_IDX",
        "INDIRECT_DESC",
        "FLUSH",
    ] {
        assert!(
            status.acked_features.contains(&name),
            "{name} not acked: {status:?}"
        );
    }
    assert!(!status.acked_features.contains(&"LOG_ALL"));
    assert_eq!(status.size_bytes, IMAGE_BYTES);

    // Config space, as a VMM reads it.
    let cfg = rig.config_space(&fe);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        CAPACITY_SECTORS
    );
    assert_eq!(le32(&cfg, 8), 64 * 1024, "size_max");
    assert_eq!(le32(&cfg, 12), 126, "seg_max");
    let blk_size = le32(&cfg, 20);
    assert_eq!(blk_size, status.block_size_bytes);
    assert!(blk_size.is_power_of_two() && (512..=4096).contains(&blk_size));
    assert_eq!(cfg[32], 1, "writeback by default");
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 1, "num_queues");
    assert_eq!(le32(&cfg, 40), 32, "max_discard_seg");
    assert_eq!(cfg[56], 1, "write_zeroes_may_unmap");
    // (A config read past the end is not tried: the backend answers it with the protocol's
    // zero-size error reply, on which vhost 0.18's `Frontend::get_config` blocks forever
    // waiting for a payload.)

    // IN: one buffer, then a scatter list over three pages at unaligned addresses.
    assert_bytes!(q.read(24, DATA_AREA, 8192), image_bytes(24 * SECTOR, 8192));
    let parts = [(0x12_0200u64, 1024u32), (0x13_0000, 512), (0x14_0e00, 2560)];
    let bufs: Vec<Buf> = parts.iter().map(|(a, l)| Buf::to_guest(*a, *l)).collect();
    let done = q.request(T_IN, 40, &bufs);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 4097
        }
    );
    let mut got = Vec::new();
    for (a, l) in parts {
        got.extend(rig.read_guest(a, l as usize));
    }
    assert_bytes!(got, image_bytes(40 * SECTOR, 4096));

    // OUT: 16 KiB, then a single 512-byte sector (not block-aligned for a 4 KiB filesystem).
    let data = pattern(1, 16384);
    let done = q.write(100, 0x20_0000, &data);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 1
        }
    );
    assert_bytes!(rig.disk(100 * SECTOR, data.len()), data);
    assert_bytes!(rig.disk(99 * SECTOR, 512), image_bytes(99 * SECTOR, 512));
    assert_bytes!(rig.disk(132 * SECTOR, 512), image_bytes(132 * SECTOR, 512));
    let small = pattern(2, 512);
    assert_eq!(q.write(3, 0x20_0000, &small).status, S_OK);
    assert_bytes!(rig.disk(3 * SECTOR, 512), small);
    assert_bytes!(rig.disk(2 * SECTOR, 512), image_bytes(2 * SECTOR, 512));
    assert_bytes!(rig.disk(4 * SECTOR, 512), image_bytes(4 * SECTOR, 512));
    // Written data reads back through the device too.
    assert_bytes!(q.read(100, DATA_AREA, 16384), data);

    // FLUSH.
    let done = q.request(T_FLUSH, 0, &[]);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 1
        }
    );
    assert_eq!(rig.counters(0).flushes, 1);

    // GET_ID: the configured serial, NUL-padded to 20 bytes.
    rig.write_guest(0x30_0000, &[0xFF; 20]);
    let done = q.request(T_GET_ID, 0, &[Buf::to_guest(0x30_0000, 20)]);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 21
        }
    );
    let mut expected = b"strait-test-serial".to_vec();
    expected.resize(20, 0);
    assert_bytes!(rig.read_guest(0x30_0000, 20), expected);

    // DISCARD and WRITE_ZEROES (keep-allocated and unmap) read as zeros afterwards.
    assert_eq!(q.ranges(T_DISCARD, 0x31_0000, &[(200, 16, 0)]).status, S_OK);
    assert_bytes!(rig.disk(200 * SECTOR, 8192), vec![0u8; 8192]);
    assert_bytes!(rig.disk(199 * SECTOR, 512), image_bytes(199 * SECTOR, 512));
    assert_bytes!(rig.disk(216 * SECTOR, 512), image_bytes(216 * SECTOR, 512));
    assert_eq!(
        q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(301, 3, 0)]).status,
        S_OK
    );
    assert_bytes!(rig.disk(301 * SECTOR, 1536), vec![0u8; 1536]);
    assert_bytes!(rig.disk(300 * SECTOR, 512), image_bytes(300 * SECTOR, 512));
    assert_bytes!(rig.disk(304 * SECTOR, 512), image_bytes(304 * SECTOR, 512));
    let done = q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(400, 24, 1), (500, 8, 0)]);
    assert_eq!(
        done,
        Done {
            status: S_OK,
            used_len: 1
        }
    );
    assert_bytes!(rig.disk(400 * SECTOR, 24 * 512), vec![0u8; 24 * 512]);
    assert_bytes!(rig.disk(500 * SECTOR, 4096), vec![0u8; 4096]);
    assert_bytes!(rig.disk(424 * SECTOR, 512), image_bytes(424 * SECTOR, 512));
    // ... and through the device.
    assert_bytes!(q.read(400, DATA_AREA, 4096), vec![0u8; 4096]);

    let c = rig.counters(0);
    assert_eq!(c.reads, 4);
    assert_eq!(c.bytes_read, 8192 + 4096 + 16384 + 4096);
    assert_eq!(c.writes, 2);
    assert_eq!(c.bytes_written, 16384 + 512);
    assert_eq!(c.flushes, 1);
    assert_eq!(c.get_id, 1);
    assert_eq!(c.discards, 1);
    assert_eq!(c.write_zeroes, 2);
    assert_eq!(c.requests, 11);
    assert_eq!(c.errors.total(), 0, "{:?}", c.errors);
    assert!(q.interrupts >= 11);

    // The guest switches the cache to writethrough (CONFIG_WCE); writes still land.
    let mut fe2 = fe.clone();
    fe2.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert!(!rig.backend.status().writeback);
    assert_eq!(rig.config_space(&fe)[32], 0);
    let data = pattern(3, 4096);
    assert_eq!(q.write(600, 0x20_0000, &data).status, S_OK);
    assert_bytes!(rig.disk(600 * SECTOR, 4096), data);
    // Only `writeback` is writable.
    assert!(fe2
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .is_err());
}

/// Without `EVENT_IDX` the device suppresses kicks with `VRING_USED_F_NO_NOTIFY` and
/// interrupts every batch; a batch of requests still completes with interrupts.
#[test]
fn requests_complete_without_event_idx() {
    let rig = Rig::start(RigOptions::default());
    let fe = rig.connect(rig.default_features() & !bit(VIRTIO_RING_F_EVENT_IDX));
    assert!(!rig.backend.status().acked_features.contains(&"EVENT_IDX"));
    let mut q = rig.queue(&fe, 0);
    for round in 0..3u64 {
        let tickets: Vec<Ticket> = (0..8u64)
            .map(|i| {
                let addr = DATA_AREA + i * 2 * PAGE;
                q.submit(T_IN, round * 64 + i * 8, &[Buf::to_guest(addr, 4096)])
            })
            .collect();
        q.notify();
        assert_eq!(q.wait_used(8).len(), 8);
        for (i, t) in tickets.iter().enumerate() {
            assert_eq!(q.status(*t), S_OK);
            let sector = round * 64 + i as u64 * 8;
            assert_bytes!(
                rig.read_guest(DATA_AREA + i as u64 * 2 * PAGE, 4096),
                image_bytes(sector * SECTOR, 4096),
                "round {round} read {i}"
            );
        }
    }
    assert_eq!(rig.counters(0).reads, 24);
}

#[test]
fn indirect_descriptor_tables() {
    let rig = Rig::start(RigOptions::default());
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let table = INDIRECT_AREA;
    let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        rig.write_guest(table + 16 * i, &d);
    };
    let header = HEADER_AREA + 16 * 255;
    let status = STATUS_AREA + 255;
    let offer_indirect = |q: &mut DriverQueue<'_>, addr: u64, len: u32| {
        rig.write_guest(status, &[STATUS_UNTOUCHED]);
        let head = q.alloc(1);
        q.store_desc(head, addr, len, F_INDIRECT, 0);
        q.offer(head);
        q.notify();
        head
    };
    let set_header = |t: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        rig.write_guest(header, &h);
    };

    // A valid read: header, two data buffers, status, all in the indirect table.
    set_header(T_IN, 56);
    put(0, header, 16, F_NEXT, 1);
    put(1, DATA_AREA, 1024, F_NEXT | F_WRITE, 2);
    put(2, DATA_AREA + 0x1_0000, 3072, F_NEXT | F_WRITE, 3);
    put(3, status, 1, F_WRITE, 0);
    rig.write_guest(DATA_AREA, &[0xCC; 0x1_1000]);
    let head = offer_indirect(&mut q, table, 64);
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(head),
            len: 4097
        }]
    );
    assert_eq!(rig.read_guest(status, 1), vec![S_OK]);
    let mut got = rig.read_guest(DATA_AREA, 1024);
    got.extend(rig.read_guest(DATA_AREA + 0x1_0000, 3072));
    assert_bytes!(got, image_bytes(56 * SECTOR, 4096));

    // A valid write, linked out of order inside the table.
    let data = pattern(7, 2048);
    rig.write_guest(DATA_AREA, &data);
    set_header(T_OUT, 70);
    put(0, header, 16, F_NEXT, 2);
    put(2, DATA_AREA, 2048, F_NEXT, 1);
    put(1, status, 1, F_WRITE, 0);
    let head = offer_indirect(&mut q, table, 48);
    assert_eq!(
        q.wait_used(1),
        vec![Used {
            id: u32::from(head),
            len: 1
        }]
    );
    assert_eq!(rig.read_guest(status, 1), vec![S_OK]);
    assert_bytes!(rig.disk(70 * SECTOR, 2048), data);

    // Malformed tables: no status, used length 0, counted; the queue keeps serving.
    set_header(T_IN, 0);
    // Each case writes its table and returns the indirect descriptor's address and length.
    type Setup<'a> = &'a dyn Fn() -> (u64, u32);
    let broken: [(&str, Setup<'_>); 6] = [
        ("length not a multiple of 16", &|| (table, 40)),
        ("empty table", &|| (table, 0)),
        ("table beyond guest memory", &|| (MEM_BYTES as u64, 48)),
        ("nested indirect", &|| {
            put(0, table + 0x100, 48, F_INDIRECT, 0);
            (table, 16)
        }),
        ("loop inside the table", &|| {
            put(0, header, 16, F_NEXT, 1);
            put(1, DATA_AREA, 512, F_NEXT | F_WRITE, 0);
            (table, 32)
        }),
        ("link past the table", &|| {
            put(0, header, 16, F_NEXT, 1);
            put(1, DATA_AREA, 512, F_NEXT | F_WRITE, 2);
            put(2, status, 1, F_WRITE, 0);
            (table, 32)
        }),
    ];
    for (name, setup) in broken {
        let before = rig.counters(0).errors.bad_descriptor;
        let (addr, len) = setup();
        let head = offer_indirect(&mut q, addr, len);
        assert_eq!(
            q.wait_used(1),
            vec![Used {
                id: u32::from(head),
                len: 0
            }],
            "{name}"
        );
        assert_eq!(rig.read_guest(status, 1), vec![STATUS_UNTOUCHED], "{name}");
        assert_eq!(rig.counters(0).errors.bad_descriptor, before + 1, "{name}");
        assert_bytes!(
            q.read(16, DATA_AREA, 4096),
            image_bytes(16 * SECTOR, 4096),
            "{name}"
        );
    }
}

#[test]
fn read_only_backend_refuses_every_mutation() {
    let rig = Rig::start(RigOptions {
        read_only: true,
        ..RigOptions::default()
    });
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    assert!(rig.backend.status().acked_features.contains(&"RO"));
    let ioerr = Done {
        status: S_IOERR,
        used_len: 1,
    };

    assert_eq!(q.write(0, DATA_AREA, &pattern(5, 4096)), ioerr);
    assert_eq!(q.ranges(T_DISCARD, 0x31_0000, &[(0, 8, 0)]), ioerr);
    assert_eq!(q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(8, 8, 1)]), ioerr);
    assert_eq!(rig.counters(0).errors.read_only, 3);
    assert_bytes!(rig.disk(0, 8192), image_bytes(0, 8192), "image unchanged");
    assert_bytes!(q.read(0, DATA_AREA, 8192), image_bytes(0, 8192));
    assert_eq!(q.request(T_FLUSH, 0, &[]).status, S_OK);
    let c = rig.counters(0);
    assert_eq!(
        (c.writes, c.discards, c.write_zeroes, c.reads),
        (0, 0, 0, 1)
    );
}

/// What a `WriteCapture` records, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Captured {
    Data {
        queue: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Zeroes {
        queue: u16,
        offset: u64,
        len: u64,
    },
    Discard {
        queue: u16,
        offset: u64,
        len: u64,
    },
    Flush {
        queue: u16,
    },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Captured>>);

impl WriteCapture for Recorder {
    fn capture(&self, queue: u16, write: GuestWrite<'_>) {
        let event = match write {
            GuestWrite::Data { offset, data } => Captured::Data {
                queue,
                offset,
                data: data.to_vec(),
            },
            GuestWrite::Zeroes { offset, len } => Captured::Zeroes { queue, offset, len },
            GuestWrite::Discard { offset, len } => Captured::Discard { queue, offset, len },
            GuestWrite::Flush => Captured::Flush { queue },
        };
        self.0.lock().unwrap().push(event);
    }
}

#[test]
fn capture_sees_every_mutation_before_its_completion() {
    let rig = Rig::start(RigOptions::default());
    let recorder = Arc::new(Recorder::default());
    rig.backend.set_capture(recorder.clone()).unwrap();
    assert!(
        rig.backend.set_capture(recorder.clone()).is_err(),
        "only one capture"
    );
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let events = || recorder.0.lock().unwrap().clone();

    // A write from three scattered buffers is captured as one contiguous range.
    let data = pattern(11, 12288);
    rig.write_guest(0x20_0000, &data[..4096]);
    rig.write_guest(0x22_0000, &data[4096..5120]);
    rig.write_guest(0x23_0800, &data[5120..]);
    let done = q.request(
        T_OUT,
        16,
        &[
            Buf::from_guest(0x20_0000, 4096),
            Buf::from_guest(0x22_0000, 1024),
            Buf::from_guest(0x23_0800, 7168),
        ],
    );
    assert_eq!(done.status, S_OK);
    // The event is there as soon as the guest sees the completion.
    assert_eq!(
        events(),
        vec![Captured::Data {
            queue: 0,
            offset: 8192,
            data: data.clone()
        }]
    );

    assert_eq!(
        q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(64, 8, 0)]).status,
        S_OK
    );
    assert_eq!(
        q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(80, 16, 1)]).status,
        S_OK
    );
    assert_eq!(
        q.ranges(T_DISCARD, 0x31_0000, &[(128, 16, 0), (256, 1, 0)])
            .status,
        S_OK
    );
    assert_eq!(q.request(T_FLUSH, 0, &[]).status, S_OK);
    // Reads and failed requests are not mutations.
    q.read(16, DATA_AREA, 4096);
    let t = q.submit(T_OUT, CAPACITY_SECTORS, &[Buf::from_guest(0x20_0000, 512)]);
    assert_eq!(q.complete(t).status, S_IOERR);
    let t = q.submit(T_OUT, 0, &[Buf::from_guest(0x20_0000, 100)]);
    assert_eq!(q.complete(t).status, S_IOERR);

    assert_eq!(
        events(),
        vec![
            Captured::Data {
                queue: 0,
                offset: 8192,
                data
            },
            Captured::Zeroes {
                queue: 0,
                offset: 64 * 512,
                len: 4096
            },
            Captured::Zeroes {
                queue: 0,
                offset: 80 * 512,
                len: 8192
            },
            Captured::Discard {
                queue: 0,
                offset: 128 * 512,
                len: 8192
            },
            Captured::Discard {
                queue: 0,
                offset: 256 * 512,
                len: 512
            },
            Captured::Flush { queue: 0 },
        ]
    );
}

#[test]
fn a_fenced_disk_refuses_every_mutation_until_the_fence_is_lifted() {
    let rig = Rig::start(RigOptions::default());
    let recorder = Arc::new(Recorder::default());
    rig.backend.set_capture(recorder.clone()).unwrap();
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let ioerr = Done {
        status: S_IOERR,
        used_len: 1,
    };
    rig.backend.fence(Duration::from_secs(5)).unwrap();
    assert!(rig.backend.status().fenced);

    assert_eq!(q.write(0, DATA_AREA, &pattern(5, 4096)), ioerr);
    assert_eq!(q.ranges(T_DISCARD, 0x31_0000, &[(0, 8, 0)]), ioerr);
    assert_eq!(q.ranges(T_WRITE_ZEROES, 0x31_0000, &[(8, 8, 1)]), ioerr);
    assert_eq!(rig.counters(0).errors.fenced, 3);
    assert_bytes!(rig.disk(0, 8192), image_bytes(0, 8192), "image unchanged");
    assert_bytes!(q.read(0, DATA_AREA, 8192), image_bytes(0, 8192));
    assert_eq!(q.request(T_FLUSH, 0, &[]).status, S_OK);
    assert!(
        !recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| !matches!(e, Captured::Flush { .. })),
        "a refused mutation was captured"
    );

    rig.backend.unfence();
    assert!(!rig.backend.status().fenced);
    let data = pattern(6, 4096);
    assert_eq!(q.write(0, DATA_AREA, &data).status, S_OK);
    assert_bytes!(rig.disk(0, 4096), data);
}

/// A capture that asks every data write's completion to be held.
struct Holder(Duration);

impl WriteCapture for Holder {
    fn capture(&self, _queue: u16, _write: GuestWrite<'_>) {}

    fn completion_delay(&self, _queue: u16, _bytes: u64) -> Duration {
        self.0
    }
}

#[test]
fn a_held_write_completes_later_and_a_fence_meanwhile_fails_it() {
    let hold = Duration::from_millis(300);
    let rig = Rig::start(RigOptions::default());
    rig.backend.set_capture(Arc::new(Holder(hold))).unwrap();
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);

    // Held: the completion comes no sooner than asked, and the data is on the disk.
    let data = pattern(7, 4096);
    let started = Instant::now();
    assert_eq!(q.write(0, DATA_AREA, &data).status, S_OK);
    assert!(
        started.elapsed() >= hold,
        "completed after {:?}",
        started.elapsed()
    );
    assert_bytes!(rig.disk(0, 4096), data);

    // Fenced while held: the write was applied and captured, so the fence does not wait
    // for it, but the guest is not told it succeeded.
    let data = pattern(8, 4096);
    rig.write_guest(DATA_AREA, &data);
    let t = q.submit(T_OUT, 8, &[Buf::from_guest(DATA_AREA, 4096)]);
    q.notify();
    // Until the write is on the disk (it is then captured and held).
    let applied = Instant::now();
    while rig.disk(4096, 4096) != data {
        assert!(applied.elapsed() < hold, "the write did not reach the disk");
        std::thread::sleep(Duration::from_millis(1));
    }
    let fencing = Instant::now();
    rig.backend.fence(Duration::from_secs(5)).unwrap();
    assert!(
        fencing.elapsed() < hold,
        "the fence waited for a held write"
    );
    assert_eq!(q.complete(t).status, S_IOERR);
    assert_eq!(rig.counters(0).errors.fenced, 1);
}
