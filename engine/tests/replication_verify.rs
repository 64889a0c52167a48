//! `verify` between real `strait serve` processes on loopback with mutual TLS: once a
//! replica is in sync, `strait ctl verify --wait` finds no chunk that differs; after the
//! test changes bytes of the destination's image behind the engines' backs, it names
//! exactly that chunk and exits non-zero; `--repair` copies it again, after which the
//! images are equal and verify is clean. And the drivers alone, over the real link, with a
//! writer playing the guest: a verify beside it reports no difference.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Engine, Fill};
use serde_json::{json, Map, Value};
use strait_engine::control::ControlClient;
use strait_engine::replication::capture::MirrorCapture;
use strait_engine::replication::driver::{DestDriver, SourceDriver, SourceStatus, SourceTarget};
use strait_engine::replication::identity::ReplicaIdentity;
use strait_engine::replication::{
    DestConfig, SourceConfig, SourceState, VerifyReport, VerifyState, BULK_INFLIGHT_MAX,
    CHUNK_BYTES, MIRROR_BACKLOG_BYTES_MAX,
};
use strait_net::tls::{write_certs, TlsIdentity};
use strait_vhost_blk::{GuestWrite, WriteCapture};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = CHUNK_BYTES;
/// A 16 MiB copy and a verify on loopback take well under a second; a minute covers a
/// loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(60);

fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    write_certs(&certs, &["127.0.0.1".to_string()]).unwrap();
    certs
}

fn wait_in_sync(source: &Engine) {
    let started = Instant::now();
    loop {
        let r = source.replication();
        if r["state"] == "in-sync" {
            return;
        }
        assert!(started.elapsed() < TIMEOUT, "{r}\n{}", source.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `strait ctl verify --wait` (plus `extra`), bounded by `TIMEOUT`.
fn ctl_verify(source: &Engine, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["ctl", "--control"])
        .arg(&source.control)
        .args(["verify", "--wait", "--interval-ms", "50"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("verify --wait did not end\n{}", source.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn verify_finds_nothing_on_a_replica_then_exactly_the_corrupted_chunk() {
    let dir = common::test_dir("verify");
    let certs = certs(dir.path());
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, 16 * MIB, Fill::Seeded(1)).unwrap();
    common::make_image(&dst, 16 * MIB, Fill::Seeded(2)).unwrap();
    let destination = Engine::serve(
        dir.path(),
        "destination",
        &[
            "--disk".as_ref(),
            dst.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--tls-dir".as_ref(),
            certs.as_os_str(),
        ],
        &[],
    );
    let to = destination.replication()["listening"]
        .as_str()
        .unwrap()
        .to_string();
    let vhost = dir.path().join("source-vhost.sock");
    let source = Engine::serve(
        dir.path(),
        "source",
        &[
            "--disk".as_ref(),
            src.as_os_str(),
            "--vhost-socket".as_ref(),
            vhost.as_os_str(),
            "--tls-dir".as_ref(),
            certs.as_os_str(),
        ],
        &[&vhost],
    );

    // Nothing to compare with yet, and a destination compares nothing itself.
    for (engine, why) in [(&source, "not replicating"), (&destination, "receives")] {
        let err = ControlClient::connect(&engine.control)
            .unwrap()
            .call_with_args("verify", Map::new())
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }

    let mut args = Map::new();
    args.insert("to".into(), json!(to));
    source.call("replicate", args);
    wait_in_sync(&source);

    let clean = ctl_verify(&source, &[]);
    let out = text(&clean.stdout);
    assert!(clean.status.success(), "{out}{}", text(&clean.stderr));
    assert!(out.contains("32 of 32 chunks compared, 0 differ"), "{out}");

    // Behind the engines' backs: 100 bytes in chunk 10 of the replica.
    let at = 10 * CHUNK + 1000;
    File::options()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&[0x5a; 100], at)
        .unwrap();
    let found = ctl_verify(&source, &[]);
    let (out, err) = (text(&found.stdout), text(&found.stderr));
    eprintln!("{out}{err}");
    assert!(!found.status.success(), "{out}");
    assert!(err.contains("1 chunk(s) that differ"), "{err}");
    assert!(
        out.contains(&format!("differs  offset {} len {CHUNK}", 10 * CHUNK)),
        "{out}"
    );
    let v = &source.replication()["verify"];
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["mismatch_chunks"], 1, "{v}");
    assert_eq!(
        v["mismatches"],
        json!([{ "offset": 10 * CHUNK, "len": CHUNK }]),
        "{v}"
    );
    assert_eq!(
        (v["chunks_checked"].as_u64(), v["busy_chunks"].as_u64()),
        (Some(32), Some(0))
    );
    let hashed = destination.replication()["chunks_hashed"].as_u64().unwrap();
    assert!(hashed > 2 * 32, "{hashed}");

    // Repair: the chunk is found again and copied again; then all is equal.
    let repaired = ctl_verify(&source, &["--repair", "--json"]);
    assert!(!repaired.status.success());
    let last: Value =
        serde_json::from_str(text(&repaired.stdout).lines().last().unwrap_or_default()).unwrap();
    assert_eq!(last["mismatch_chunks"], 1, "{last}");
    assert_eq!(last["repair"], true, "{last}");
    wait_in_sync(&source);
    let after = ctl_verify(&source, &[]);
    assert!(after.status.success(), "{}", text(&after.stdout));
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&src).unwrap()
    );
}

/// The drivers over the real link while a writer plays the guest (writes the image, then
/// hands the write to the capture point, as the data path does): a verify started while
/// it writes reports no difference (chunks it keeps rewriting may stay busy), and one
/// after it stopped finds every chunk equal.
#[test]
fn a_verify_beside_a_writing_guest_reports_no_difference() {
    const DISK: u64 = 32 * MIB;
    let dir = common::test_dir("verify-live");
    let certs = certs(dir.path());
    let tls = Arc::new(TlsIdentity::load(&certs).unwrap());
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, DISK, Fill::Seeded(5)).unwrap();
    common::make_image(&dst, DISK, Fill::Seeded(6)).unwrap();
    let dest = DestDriver::start(
        &dst,
        DestConfig {
            disk_id: Some([9; 16]),
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
            disk_id: [9; 16],
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
    let wait_for = |what: &str, done: &dyn Fn(&SourceStatus) -> bool| {
        let started = Instant::now();
        loop {
            let s = source.status();
            if done(&s) {
                return s;
            }
            assert!(started.elapsed() < TIMEOUT, "not {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("in sync", &|s| s.state == SourceState::InSync);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let file = File::options().write(true).open(&src).unwrap();
        let (capture, stop) = (capture.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // A hot quarter of the disk takes half the writes.
                let span = if x.is_multiple_of(2) { DISK / 4 } else { DISK };
                let offset = (x >> 8) % (span / 4096) * 4096;
                let len = ((1 + (x >> 40) % 16) * 4096).min(DISK - offset);
                let data = vec![(x >> 3) as u8; len as usize];
                file.write_all_at(&data, offset).unwrap();
                let queue = (writes % 2) as u16;
                capture.capture(
                    queue,
                    GuestWrite::Data {
                        offset,
                        data: &data,
                    },
                );
                writes += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            writes
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let ready =
        |s: &SourceStatus| matches!(s.state, SourceState::InSync | SourceState::Behind { .. });
    // The writer may push the source into resyncing now and then: retry the start.
    let started = Instant::now();
    while source.start_verify(false).is_err() {
        assert!(started.elapsed() < TIMEOUT, "{:?}", source.status());
        wait_for("ready to verify", &ready);
    }
    let live = wait_for("done verifying", &|s| {
        s.verify.as_ref().is_some_and(|v| !v.running())
    })
    .verify
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{writes} writes; verify beside them: {live:?}");
    assert_eq!(live.state, VerifyState::Done, "{live:?}");
    assert_eq!(live.mismatch_chunks, 0, "{live:?}");
    assert_eq!(
        live.chunks_checked + live.busy_chunks,
        DISK / CHUNK_BYTES,
        "{live:?}"
    );

    wait_for("in sync after the writes", &|s| {
        s.state == SourceState::InSync && s.accounted_writes == writes
    });
    source.start_verify(false).unwrap();
    let after: VerifyReport = wait_for("done verifying", &|s| {
        s.verify.as_ref().is_some_and(|v| !v.running())
    })
    .verify
    .unwrap();
    assert_eq!(
        (
            after.chunks_checked,
            after.mismatch_chunks,
            after.busy_chunks
        ),
        (DISK / CHUNK_BYTES, 0, 0),
        "{after:?}"
    );
    source.stop();
    dest.stop();
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&src).unwrap()
    );
}
