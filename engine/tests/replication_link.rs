//! Replication over the real link (mutual TLS on loopback) between real image files: the
//! source and destination drivers of `strait_engine::replication`, with a writer that
//! plays the data path (write the image, then hand the write to the capture point) while
//! the bulk copy runs. At the end the destination file equals the source file.
//!
//! What this does not have yet is a VMM: the QEMU end-to-end test follows once `strait
//! serve` drives replication.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use strait_engine::replication::capture::MirrorCapture;
use strait_engine::replication::driver::{DestDriver, SourceDriver, SourceTarget};
use strait_engine::replication::identity::ReplicaIdentity;
use strait_engine::replication::{
    DestConfig, SourceConfig, SourceState, BULK_INFLIGHT_MAX, CHUNK_BYTES, MIRROR_BACKLOG_BYTES_MAX,
};
use strait_net::tls::{write_certs, TlsIdentity};
use strait_vhost_blk::{GuestWrite, WriteCapture};

const DISK: u64 = 48 << 20;
const DISK_ID: [u8; 16] = [0x44; 16];
/// Longest the copy plus the writes may take to reach in-sync on loopback.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn image(path: &Path, fill: impl Fn(u64) -> u8) {
    let f = File::create(path).unwrap();
    f.set_len(DISK).unwrap();
    let mut buf = vec![0; 1 << 20];
    for block in 0..DISK >> 20 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = fill((block << 20) + i as u64);
        }
        // Leave some megabytes as holes: the copy sends them as zeros.
        if block % 5 != 3 {
            f.write_all_at(&buf, block << 20).unwrap();
        }
    }
}

fn md5ish(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_live_disk_replicates_byte_exact_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    image(&src, |i| (i.wrapping_mul(2_654_435_761) >> 13) as u8);
    image(&dst, |i| (i >> 9) as u8 ^ 0x5a);
    let certs = dir.path().join("certs");
    write_certs(&certs, &["127.0.0.1".to_string()]).unwrap();
    let tls = Arc::new(TlsIdentity::load(&certs).unwrap());

    let dest = DestDriver::start(
        &dst,
        DestConfig {
            disk_id: Some(DISK_ID),
            disk_bytes: DISK,
            chunk_bytes: CHUNK_BYTES,
            generation: [0; 16],
            source_id: None,
            promoted: false,
        },
        ReplicaIdentity::load_or_new(&dst).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        Some(tls.clone()),
    )
    .unwrap();
    let capture = Arc::new(MirrorCapture::new(2, DISK, CHUNK_BYTES));
    let source = SourceDriver::start(
        &src,
        SourceConfig {
            disk_id: DISK_ID,
            source_id: [1; 16],
            disk_bytes: DISK,
            chunk_bytes: CHUNK_BYTES,
            mirror_backlog_bytes_max: MIRROR_BACKLOG_BYTES_MAX,
            bulk_inflight_max: BULK_INFLIGHT_MAX,
        },
        capture.clone(),
        SourceTarget {
            to: dest.local_addr(),
            tls: Some(tls),
            connections: 2,
        },
        // Nothing here promotes the destination, so nothing is ever fenced.
        Box::new(|| panic!("the source was fenced, but no destination was promoted")),
    )
    .unwrap();

    // The "guest": writes while the copy runs, each applied to the image before capture,
    // as the data path does; data, zeroes and discards, on two queues.
    let writer = {
        let src = File::options().write(true).open(&src).unwrap();
        let capture = capture.clone();
        thread::spawn(move || {
            let mut rng = Rng(0x1234_5678);
            let started = Instant::now();
            let mut writes = 0u64;
            while started.elapsed() < Duration::from_millis(1500) {
                let offset = (rng.next() % (DISK / 4096)) * 4096;
                let len = ((1 + rng.next() % 64) * 4096).min(DISK - offset);
                let queue = (writes % 2) as u16;
                if rng.next().is_multiple_of(8) {
                    src.write_all_at(&vec![0; len as usize], offset).unwrap();
                    capture.capture(queue, GuestWrite::Zeroes { offset, len });
                } else {
                    let byte = rng.next() as u8;
                    let data = vec![byte; len as usize];
                    src.write_all_at(&data, offset).unwrap();
                    capture.capture(
                        queue,
                        GuestWrite::Data {
                            offset,
                            data: &data,
                        },
                    );
                }
                writes += 1;
                thread::sleep(Duration::from_micros(200));
            }
            writes
        })
    };
    let writes = writer.join().unwrap();

    let started = Instant::now();
    loop {
        let s = source.status();
        // In sync, in a snapshot that accounts for every write the guest made.
        if s.state == SourceState::InSync && s.accounted_writes == writes {
            eprintln!(
                "{writes} writes; in sync after {:?}: {s:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < SYNC_TIMEOUT,
            "not in sync: {s:?}; destination {:?}",
            dest.status()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let s = source.status();
    assert!(s.stats.writes_mirrored > 0, "nothing was mirrored: {s:?}");
    assert!(s.stats.chunks_sent >= DISK / CHUNK_BYTES, "{s:?}");
    assert_eq!(dest.status().sessions, 1);
    source.stop();
    dest.stop();
    let (a, b) = (md5ish(&src), md5ish(&dst));
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "destination differs from source");
}
