//! Promote and fencing between real `strait serve` processes on loopback with mutual TLS,
//! and real QEMU (TCG) guests: a destination refuses to be promoted while its source may
//! still write; a demoted source's disk refuses the guest's writes; once the destination
//! holds every write it is promoted, its image equals the source's, and a guest writes to
//! it through its own vhost-user socket. `promote` where it does not apply is refused with
//! a clear error.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Engine, Fill, Qemu, QemuConfig, Scenario, Verdict, BOOT_AND_SCENARIO_TIMEOUT};
use serde_json::{json, Map, Value};
use strait_engine::control::ControlClient;
use strait_net::tls::write_certs;

const MIB: u64 = 1 << 20;
/// Copying 32 MiB over loopback takes about a second; a minute covers a loaded host.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `check` holds for the engine's `status`.
fn wait_for(engine: &Engine, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let status = engine.call("status", Map::new());
        if check(&status) {
            return status;
        }
        assert!(
            started.elapsed() < STATE_TIMEOUT,
            "not {what} after {STATE_TIMEOUT:?}: {status}\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn call_err(engine: &Engine, cmd: &str, args: Map<String, Value>) -> String {
    ControlClient::connect(&engine.control)
        .unwrap()
        .call_with_args(cmd, args)
        .unwrap_err()
        .to_string()
}

fn guest_writes(vhost: &Path) -> common::GuestReport {
    let guest = common::guest_artifacts();
    let config = QemuConfig::new(&guest, vhost, Scenario::Rw).arg_mib(4);
    let mut qemu = Qemu::spawn(&config).unwrap();
    let report = qemu.wait_verdict(BOOT_AND_SCENARIO_TIMEOUT).unwrap();
    report.log(Scenario::Rw);
    report
}

#[test]
fn a_demoted_source_hands_over_to_a_promoted_destination() {
    if !common::require_qemu() {
        return;
    }
    let dir = common::test_dir("strait-promote");
    let certs = dir.path().join("certs");
    write_certs(&certs, &["127.0.0.1".to_string()]).unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, 32 * MIB, Fill::Seeded(1)).unwrap();
    common::make_image(&dst, 32 * MIB, Fill::Seeded(2)).unwrap();

    // The destination serves its disk to a VMM too, fenced until it is promoted.
    let dst_vhost = dir.path().join("dst-vhost.sock");
    let args = [
        "--disk".as_ref(),
        dst.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--tls-dir".as_ref(),
        certs.as_os_str(),
        "--vhost-socket".as_ref(),
        dst_vhost.as_os_str(),
    ];
    let destination = Engine::serve(dir.path(), "destination", &args, &[&dst_vhost]);
    let status = destination.call("status", Map::new());
    assert_eq!(status["disk"]["fenced"], true, "{status}");
    let to = status["replication"]["listening"]
        .as_str()
        .unwrap()
        .to_string();

    let src_vhost = dir.path().join("src-vhost.sock");
    let args = [
        "--disk".as_ref(),
        src.as_os_str(),
        "--vhost-socket".as_ref(),
        src_vhost.as_os_str(),
        "--tls-dir".as_ref(),
        certs.as_os_str(),
    ];
    let source = Engine::serve(dir.path(), "source", &args, &[&src_vhost]);
    // Not a destination: promote is refused and says why.
    let err = call_err(&source, "promote", Map::new());
    assert!(err.contains("holds no replica"), "{err}");
    let mut args = Map::new();
    args.insert("to".into(), json!(to));
    source.call("replicate", args);
    let err = call_err(&source, "promote", Map::new());
    assert!(err.contains("is a replication source"), "{err}");

    wait_for(&source, "in sync", |s| {
        s["replication"]["state"] == "in-sync"
    });
    wait_for(&destination, "consistent", |s| {
        s["replication"]["consistent"] == true
    });
    // Consistent, but the source may still write: refused, with what to do.
    let err = call_err(&destination, "promote", Map::new());
    assert!(err.contains("demote"), "{err}");
    let mut bad = Map::new();
    bad.insert("force".into(), json!("yes"));
    let err = call_err(&destination, "promote", bad);
    assert!(err.contains("`force` must be true or false"), "{err}");

    // Demoted: the source's disk is fenced, and the destination learns it has it all.
    let demoted = source.call("demote", Map::new());
    assert_eq!(demoted, json!({ "fenced": true, "replicating": true }));
    let status = source.call("status", Map::new());
    assert_eq!(status["disk"]["fenced"], true, "{status}");
    wait_for(&destination, "complete", |s| {
        s["replication"]["complete"] == true
    });
    let promoted = destination.call("promote", Map::new());
    assert_eq!(promoted["complete"], true, "{promoted}");
    assert_eq!(promoted["forced"], false, "{promoted}");
    let status = destination.call("status", Map::new());
    assert_eq!(status["disk"]["fenced"], false, "{status}");
    assert_eq!(status["replication"]["state"], "promoted", "{status}");
    // Complete means equal: every write the source took is in the replica.
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&src).unwrap(),
        "the promoted replica differs from its source"
    );
    // The source is told it was superseded.
    wait_for(&source, "superseded", |s| {
        s["replication"]["superseded"] == true
    });

    // A guest on the fenced source cannot write; nothing reaches its image.
    let src_before = common::md5_file(&src).unwrap();
    let report = guest_writes(&src_vhost);
    assert!(
        matches!(&report.verdict, Verdict::Fail { reason } if reason.contains("write")),
        "a guest wrote to a fenced disk: {:?}",
        report.verdict
    );
    assert_eq!(common::md5_file(&src).unwrap(), src_before);
    let stats = source.call("stats", Map::new());
    assert!(
        stats["totals"]["errors"]["fenced"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // A guest on the promoted destination writes, and its data is on the image.
    let report = guest_writes(&dst_vhost);
    report.assert_pass();
    let offset = report.value_u64("offset");
    assert_eq!(
        common::md5_file_range(&dst, offset, 4 * MIB).unwrap(),
        report.value("md5_written")
    );
}

/// `strait ctl promote` on an engine that holds no replica fails with the reason.
#[test]
fn ctl_promote_where_it_does_not_apply_fails_clearly() {
    let dir = common::test_dir("strait-promote-ctl");
    let image = dir.path().join("disk.img");
    common::make_image(&image, 8 * MIB, Fill::Seeded(1)).unwrap();
    let vhost = dir.path().join("vhost.sock");
    let args = [
        "--disk".as_ref(),
        image.as_os_str(),
        "--vhost-socket".as_ref(),
        vhost.as_os_str(),
    ];
    let engine = Engine::serve(dir.path(), "engine", &args, &[&vhost]);
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["ctl", "--control"])
        .arg(&engine.control)
        .arg("promote")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no replica"), "{stderr}");
    // Demote without replication fences the disk all the same.
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["ctl", "--control"])
        .arg(&engine.control)
        .arg("demote")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "demoted: the disk is fenced\n"
    );
    assert_eq!(engine.call("status", Map::new())["disk"]["fenced"], true);
}
