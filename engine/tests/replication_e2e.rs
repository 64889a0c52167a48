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
/// The destination's port inside namespace B (private to the test's namespaces).
const PORT: u16 = 7400;

fn wanem(config: WanemConfig) -> Option<Wanem> {
    match Wanem::start(config) {
        Ok(w) => Some(w),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: the WAN emulator cannot start here ({e})");
            None
        }
        Err(e) => panic!("the WAN emulator is required in CI: {e}"),
    }
}

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

fn replicate_guest_writes(cut: Option<(f64, f64)>) {
    if !common::require_qemu() {
        return;
    }
    let Some(wanem) = wanem(WanemConfig {
        rtt_ms: 100,
        rate_mbit: 1000,
        seed: 1,
        cut_at_s: cut.map(|c| c.0),
        cut_for_s: cut.map_or(0.0, |c| c.1),
        ..WanemConfig::default()
    }) else {
        return;
    };
    let guest = common::guest_artifacts();
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

    // The guest writes 16 MiB of random data while the copy runs.
    let mut qemu = Qemu::spawn(&QemuConfig::new(&guest, &vhost, Scenario::Rw).arg_mib(16)).unwrap();
    let report = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no verdict: {e:?}\n{}", source.log_text()));
    report.log(Scenario::Rw);
    report.assert_pass();
    let offset = report.value_u64("offset");

    let started = Instant::now();
    let status = loop {
        let status = source.call("status", Map::new());
        let r = &status["replication"];
        let accounted = r["captured_writes"] == r["accounted_writes"];
        if r["state"] == "in-sync" && accounted {
            break status;
        }
        assert!(
            started.elapsed() < SYNC_TIMEOUT,
            "not in sync: {r}\nsource:\n{}\ndestination:\n{}",
            source.log_text(),
            destination.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = &status["replication"];
    eprintln!(
        "in sync {:?} after the guest finished: {r}",
        started.elapsed()
    );
    assert!(r["writes_mirrored"].as_u64().unwrap() + r["writes_tracked"].as_u64().unwrap() > 0);
    assert_eq!(
        common::md5_file_range(&dst, offset, 16 * MIB).unwrap(),
        report.value("md5_written"),
        "the destination does not hold what the guest wrote"
    );
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&src).unwrap(),
        "destination image differs from the source image"
    );
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
