//! The block backend driven without a VM (see `common/mod.rs`): Queues on several cores, ring stops that drain in-flight requests, and reconnecting frontends.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use vhost::VhostBackend;

#[test]
fn two_queues_on_two_cores() {
    let cores = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0]
    };
    let rig = Rig::start(RigOptions {
        queues: 2,
        cores: cores.clone(),
        ..RigOptions::default()
    });
    let fe = rig.connect(rig.default_features());
    let cfg = rig.config_space(&fe);
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    assert!(rig.backend.status().acked_features.contains(&"MQ"));
    let mut q0 = rig.queue(&fe, 0);
    let mut q1 = rig.queue(&fe, 1);

    // Both queues busy at once: several writes in flight on each before waiting.
    let mut tickets = Vec::new();
    for i in 0..4u64 {
        let d0 = pattern(20 + i as u8, 4096);
        let d1 = pattern(40 + i as u8, 4096);
        rig.write_guest(0x20_0000 + i * PAGE, &d0);
        rig.write_guest(0x28_0000 + i * PAGE, &d1);
        tickets.push((
            0,
            q0.submit(T_OUT, 8 * i, &[Buf::from_guest(0x20_0000 + i * PAGE, 4096)]),
        ));
        tickets.push((
            1,
            q1.submit(
                T_OUT,
                1000 + 8 * i,
                &[Buf::from_guest(0x28_0000 + i * PAGE, 4096)],
            ),
        ));
    }
    q0.notify();
    q1.notify();
    let used0 = q0.wait_used(4);
    let used1 = q1.wait_used(4);
    assert_eq!(used0.len() + used1.len(), 8);
    for (queue, t) in &tickets {
        let q = if *queue == 0 { &q0 } else { &q1 };
        assert_eq!(q.status(*t), S_OK);
    }
    for i in 0..4u64 {
        assert_bytes!(rig.disk(8 * i * SECTOR, 4096), pattern(20 + i as u8, 4096));
        assert_bytes!(
            rig.disk((1000 + 8 * i) * SECTOR, 4096),
            pattern(40 + i as u8, 4096)
        );
    }
    // Each queue reads what the other wrote.
    assert_bytes!(q1.read(0, DATA_AREA, 4096), pattern(20, 4096));
    assert_bytes!(q0.read(1000, DATA_AREA + 0x1_0000, 4096), pattern(40, 4096));

    let stats = rig.backend.stats();
    assert_eq!(stats.len(), 2);
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(s.index as usize, i);
        assert_eq!(s.core, cores[i % cores.len()]);
        assert_eq!((s.counters.writes, s.counters.reads), (4, 1), "queue {i}");
        assert_eq!(s.counters.bytes_written, 4 * 4096, "queue {i}");
    }
}

/// `GET_VRING_BASE` stops the ring only once every request it popped is complete: the base
/// it returns is exactly the used index, so nothing is lost when the VMM moves the ring.
#[test]
fn get_vring_base_drains_requests_in_flight() {
    let rig = Rig::start(RigOptions::default());
    let fe = rig.connect(rig.default_features());
    let mut q = rig.queue(&fe, 0);
    let mut tickets = Vec::new();
    rig.write_guest(DATA_AREA, &pattern(60, 1 << 20));
    for i in 0..4u64 {
        tickets.push(q.submit(T_OUT, i * 2048, &[Buf::from_guest(DATA_AREA, 1 << 20)]));
    }
    q.notify();
    // Stop the ring once the device has taken all four (it publishes how far it walked in
    // `avail_event` before it waits); 1 MiB O_DIRECT writes are then usually still running.
    wait_until("the device to pop the requests", || q.avail_event() == 4);
    let base = fe.get_vring_base(0).unwrap();
    assert_eq!(base, 4);
    // Every popped request has its used entry and status byte by the time the base is
    // returned; none of the others has.
    assert_eq!(
        q.vq.used().idx().load(),
        base as u16,
        "used index at GET_VRING_BASE"
    );
    for (i, t) in tickets.iter().enumerate() {
        let want = if (i as u32) < base {
            S_OK
        } else {
            STATUS_UNTOUCHED
        };
        assert_eq!(q.status(*t), want, "request {i}");
    }
    let used = q.wait_used(base as u16);
    assert_eq!(used.len(), base as usize);

    // The next VMM resumes at the base; the rest complete.
    drop(fe);
    wait_until("the disconnect", || !rig.backend.status().vmm_connected);
    let fe = rig.connect(rig.default_features());
    rig.attach(&fe, &q, base as u16);
    q.notify();
    q.wait_used(4 - base as u16);
    for t in &tickets {
        assert_eq!(q.status(*t), S_OK);
    }
    assert_eq!(fe.get_vring_base(0).unwrap(), 4);
    assert_eq!(rig.counters(0).writes, 4);
    for i in 0..4u64 {
        assert_bytes!(
            rig.disk(i << 20, 1 << 20),
            pattern(60, 1 << 20),
            "write {i}"
        );
    }
}

#[test]
fn reconnect_resumes_at_the_ring_base() {
    let rig = Rig::start(RigOptions::default());
    let features = rig.default_features() | bit(VHOST_F_LOG_ALL);
    let fe = rig.connect(features);
    let log = DirtyLog::new(MEM_BYTES);
    fe.set_log_base(0, Some(log.region())).unwrap();
    let mut q = rig.queue(&fe, 0);
    for i in 0..5u64 {
        assert_bytes!(
            q.read(i * 8, DATA_AREA, 4096),
            image_bytes(i * 8 * SECTOR, 4096)
        );
    }
    assert!(rig.backend.status().dirty_logging);

    // The VMM stops the ring: the base is the next avail index, and the stopped ring takes
    // no more requests.
    assert_eq!(fe.get_vring_base(0).unwrap(), 5);
    let data = pattern(30, 4096);
    rig.write_guest(0x20_0000, &data);
    let pending = q.submit(T_OUT, 2000, &[Buf::from_guest(0x20_0000, 4096)]);
    q.notify();
    q.assert_no_used(Duration::from_millis(100));

    // The VMM goes away; the backend forgets the negotiation.
    drop(fe);
    wait_until("the disconnect", || !rig.backend.status().vmm_connected);
    let status = rig.backend.status();
    assert!(!status.dirty_logging);
    assert!(
        status.acked_features.is_empty(),
        "{:?}",
        status.acked_features
    );

    // A new VMM resumes the same rings at base 5: the pending write runs first.
    let fe = rig.connect(rig.default_features());
    wait_until("the reconnect", || rig.backend.status().vmm_connected);
    rig.attach(&fe, &q, 5);
    q.notify();
    let used = q.wait_used(1);
    assert_eq!(
        used,
        vec![Used {
            id: u32::from(pending.head),
            len: 1
        }]
    );
    assert_eq!(q.status(pending), S_OK);
    assert_bytes!(rig.disk(2000 * SECTOR, 4096), data);
    assert_bytes!(q.read(2000, DATA_AREA, 4096), data);
    assert!(!rig.backend.status().dirty_logging);
    assert_eq!(fe.get_vring_base(0).unwrap(), 7);

    // An abrupt disconnect (no GET_VRING_BASE), a third VMM, more requests.
    drop(fe);
    wait_until("the second disconnect", || {
        !rig.backend.status().vmm_connected
    });
    let fe = rig.connect(rig.default_features());
    rig.attach(&fe, &q, 7);
    for i in 0..3u64 {
        assert_bytes!(
            q.read(i * 8, DATA_AREA, 4096),
            image_bytes(i * 8 * SECTOR, 4096)
        );
    }
    assert_eq!(fe.get_vring_base(0).unwrap(), 10);
    let total: u64 = rig
        .backend
        .stats()
        .iter()
        .map(|s| s.counters.requests)
        .sum();
    assert_eq!(total, 10);
    assert!(!log.dirty_pages().is_empty(), "first session logged");
}
