//! Replication end to end with real parts: a QEMU (TCG) guest writes with `O_DIRECT` to a
//! disk served by `strait serve`, which replicates it across `strait wanem` (100 ms RTT,
//! kernel TCP in two network namespaces, mutual TLS) to a second `strait serve --listen`.
//! At the end the destination image's md5 equals the source's.
//!
//! Needs root and network namespaces for the emulator: skipped with a loud message where
//! they are unusable, except under CI (env `CI` set), where that fails the test.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Engine, Fill, Qemu, QemuConfig, Scenario, BOOT_AND_SCENARIO_TIMEOUT};
use serde_json::{json, Map};
use strait_net::tls::write_certs;
use strait_net::wanem::{Wanem, WanemConfig};

const IMAGE_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;
/// 64 MiB over 100 ms at up to 1 Gbit/s, plus the guest's writes, on a loaded 2-core
/// machine with TCG running: a minute is ample.
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);
/// A link slower than the guest's writes under TCG, and above the pacer's slowest pace.
const SLOW_LINK_MBIT: u32 = 200;
/// The destination's port inside namespace B (private to the test's namespaces).
const PORT: u16 = 7400;

#[test]
fn qemu_guest_disk_replicates_across_wanem_byte_exact() {
    replicate_guest_writes(None);
}

/// The link is cut for 4 s while the guest boots and writes: the session resumes and
/// retransmits, and the destination still ends equal.
#[test]
fn qemu_guest_disk_replication_survives_a_link_cut() {
    replicate_guest_writes(Some((3.0, 4.0)));
}

/// The link (200 Mbit/s, about 23 MB/s of mirrored data after TLS and framing) is slower
/// than the guest's writes (64 MiB with `dd oflag=direct`, about 120 MB/s under TCG here): the
/// source holds the guest's write completions so the guest slows to the link, the mirror
/// backlog stays within its bound, and the destination still ends equal.
#[test]
fn a_guest_faster_than_the_link_is_paced_to_it() {
    let Some(pair) = start_pair(SLOW_LINK_MBIT, None) else {
        return;
    };
    // The copy first, so that every guest write is mirrored (none rides the bulk copy).
    pair.wait_in_sync();
    let guest = common::guest_artifacts();
    let config = QemuConfig::new(&guest, &pair.vhost, Scenario::Rw)
        .arg_mib(64)
        .offset_bytes(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (report, samples) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push(pair.source.replication());
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        let mut qemu = Qemu::spawn(&config).unwrap();
        let report = qemu.wait_verdict(BOOT_AND_SCENARIO_TIMEOUT);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (report, sampler.join().unwrap())
    });
    let report = report.unwrap_or_else(|e| panic!("no verdict: {e:?}\n{}", pair.source.log_text()));
    report.log(Scenario::Rw);
    report.assert_pass();

    let mut paced = 0;
    for (i, r) in samples.iter().enumerate() {
        let t = &r["throttle"];
        eprintln!(
            "{:>5} ms  {:>8}  backlog {:>9} of {:>9}  drain {:>9} B/s  link {:>9} B/s  pace {:>9} B/s  held {:>5} writes",
            i * 100,
            r["state"].as_str().unwrap_or("?"),
            r["mirror_backlog_bytes"],
            t["backlog_limit_bytes"],
            t["drain_bytes_per_s"],
            t["link_bytes_per_s"],
            t["rate_bytes_per_s"],
            t["delayed_writes"],
        );
        // The source mirrors a write only while the backlog is under the bound in force,
        // which the controller moves every 20 ms (it drops when pacing starts): so the
        // backlog stays under the largest bound of the last second, plus one guest write.
        let recent = &samples[i.saturating_sub(10)..=i];
        let bound = recent
            .iter()
            .map(|r| r["throttle"]["backlog_limit_bytes"].as_u64().unwrap())
            .max()
            .unwrap();
        let backlog = r["mirror_backlog_bytes"].as_u64().unwrap();
        assert!(
            backlog <= bound + MIB,
            "mirror backlog {backlog} over its bound {bound}: {r}"
        );
        paced += usize::from(t["active"] == true);
    }
    let last = pair.wait_in_sync();
    let r = &last["replication"];
    eprintln!(
        "{} samples, {paced} with the guest paced; at the end: {r}",
        samples.len()
    );
    assert!(paced > 0, "the guest was never paced: {samples:?}");
    let t = &r["throttle"];
    assert!(t["delayed_writes"].as_u64().unwrap() > 0, "{r}");
    assert!(t["delay_ms_max"].as_f64().unwrap() <= 1000.0, "{r}");
    // The pacing kept the guest within what the link drains: writes that went to the
    // bitmap instead of the mirror are a small part at most.
    let (mirrored, tracked) = (
        r["writes_mirrored"].as_u64().unwrap(),
        r["writes_tracked"].as_u64().unwrap(),
    );
    assert!(
        tracked * 10 <= mirrored,
        "{tracked} writes to the bitmap against {mirrored} mirrored"
    );
    assert_eq!(
        common::md5_file_range(&pair.dst, 0, 64 * MIB).unwrap(),
        report.value("md5_written"),
        "the destination does not hold what the guest wrote"
    );
    pair.assert_images_equal();
}

/// Two engines across the emulator, the source serving a disk and replicating it.
struct Pair {
    wanem: Wanem,
    _dir: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    vhost: std::path::PathBuf,
    source: Engine,
    destination: Engine,
}

fn start_pair(rate_mbit: u32, cut: Option<(f64, f64)>) -> Option<Pair> {
    if !common::require_qemu() {
        return None;
    }
    let wanem = common::wanem_or_skip(WanemConfig {
        rtt_ms: 100,
        rate_mbit,
        seed: 1,
        cut_at_s: cut.map(|c| c.0),
        cut_for_s: cut.map_or(0.0, |c| c.1),
        ..WanemConfig::default()
    })?;
    let dir = common::test_dir("strait-replicate");
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, IMAGE_BYTES, Fill::Seeded(1)).unwrap();
    common::make_image(&dst, IMAGE_BYTES, Fill::Seeded(2)).unwrap();
    let certs = dir.path().join("certs");
    write_certs(&certs, &[wanem.addr_b().to_string()]).unwrap();
    let to = format!("{}:{PORT}", wanem.addr_b());

    let strait = env!("CARGO_BIN_EXE_strait");
    let dst_control = dir.path().join("dst.sock");
    let mut command = wanem.command_in_b(strait);
    command
        .args(["serve", "--disk"])
        .arg(&dst)
        .arg("--control")
        .arg(&dst_control)
        .args(["--listen", &to, "--tls-dir"])
        .arg(&certs);
    let destination = Engine::spawn(command, dir.path(), "destination", &[&dst_control]);

    let (vhost, src_control) = (dir.path().join("vhost.sock"), dir.path().join("src.sock"));
    let mut command = wanem.command_in_a(strait);
    command
        .args(["serve", "--disk"])
        .arg(&src)
        .arg("--vhost-socket")
        .arg(&vhost)
        .arg("--control")
        .arg(&src_control)
        .arg("--tls-dir")
        .arg(&certs);
    let source = Engine::spawn(command, dir.path(), "source", &[&vhost, &src_control]);
    let mut args = Map::new();
    args.insert("to".into(), json!(to));
    source.call("replicate", args);
    Some(Pair {
        wanem,
        _dir: dir,
        src,
        dst,
        vhost,
        source,
        destination,
    })
}

impl Pair {
    /// Waits until every captured write is accounted for and the destination holds all.
    fn wait_in_sync(&self) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let status = self.source.call("status", Map::new());
            let r = &status["replication"];
            let accounted = r["captured_writes"] == r["accounted_writes"];
            if r["state"] == "in-sync" && accounted {
                eprintln!("in sync after {:?}: {r}", started.elapsed());
                return status;
            }
            assert!(
                started.elapsed() < SYNC_TIMEOUT,
                "not in sync: {r}\nsource:\n{}\ndestination:\n{}",
                self.source.log_text(),
                self.destination.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_images_equal(&self) {
        assert_eq!(
            common::md5_file(&self.dst).unwrap(),
            common::md5_file(&self.src).unwrap(),
            "destination image differs from the source image"
        );
    }
}

fn replicate_guest_writes(cut: Option<(f64, f64)>) {
    let Some(pair) = start_pair(1000, cut) else {
        return;
    };
    let Pair {
        wanem,
        dst,
        vhost,
        source,
        destination,
        ..
    } = &pair;
    let guest = common::guest_artifacts();

    // The guest writes 16 MiB of random data while the copy runs.
    let mut qemu = Qemu::spawn(&QemuConfig::new(&guest, vhost, Scenario::Rw).arg_mib(16)).unwrap();
    let report = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no verdict: {e:?}\n{}", source.log_text()));
    report.log(Scenario::Rw);
    report.assert_pass();
    let offset = report.value_u64("offset");

    let status = pair.wait_in_sync();
    let r = &status["replication"];
    assert!(r["writes_mirrored"].as_u64().unwrap() + r["writes_tracked"].as_u64().unwrap() > 0);
    assert_eq!(
        common::md5_file_range(dst, offset, 16 * MIB).unwrap(),
        report.value("md5_written"),
        "the destination does not hold what the guest wrote"
    );
    pair.assert_images_equal();
    let d = destination.call("status", Map::new());
    assert_eq!(d["replication"]["role"], "destination", "{d}");
    let link = wanem.stats();
    assert!(link.a_to_b.bytes_forwarded >= IMAGE_BYTES / 2);
    if cut.is_some() {
        assert!(
            link.a_to_b.dropped_cut > 0,
            "the cut missed the session: {link:?}"
        );
    }
}
