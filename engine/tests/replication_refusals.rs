//! Replication refuses what it must, between real `strait serve` processes on loopback
//! with mutual TLS: a destination disk smaller than the source's, and a second source
//! (another disk) once a destination holds a replica. Each refusal is reported by the
//! source with its reason, and the destination's image is left as it was. And `migrate`
//! refuses bad arguments before it starts anything.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Engine, Fill};
use serde_json::{json, Map, Value};
use strait_engine::control::{ControlClient, ControlError};
use strait_net::tls::write_certs;

const MIB: u64 = 1 << 20;
/// A refusal takes one session setup on loopback: milliseconds; a minute on a loaded host.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);

fn destination(dir: &Path, image: &Path, certs: &Path) -> (Engine, String) {
    let args = [
        "--disk".as_ref(),
        image.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--tls-dir".as_ref(),
        certs.as_os_str(),
    ];
    let engine = Engine::serve(dir, "destination", &args, &[]);
    let listening = engine.replication()["listening"]
        .as_str()
        .unwrap()
        .to_string();
    (engine, listening)
}

fn source(dir: &Path, name: &str, image: &Path, certs: &Path) -> Engine {
    let vhost = dir.join(format!("{name}-vhost.sock"));
    let args = [
        "--disk".as_ref(),
        image.as_os_str(),
        "--vhost-socket".as_ref(),
        vhost.as_os_str(),
        "--tls-dir".as_ref(),
        certs.as_os_str(),
    ];
    Engine::serve(dir, name, &args, &[])
}

fn replicate(source: &Engine, to: &str) {
    let mut args = Map::new();
    args.insert("to".into(), json!(to));
    source.call("replicate", args);
}

/// Waits until the source's replication state is one of `states`.
fn wait_state(source: &Engine, states: &[&str]) -> Value {
    let started = Instant::now();
    loop {
        let r = source.replication();
        if states.iter().any(|s| r["state"] == *s) {
            return r;
        }
        assert!(
            started.elapsed() < VERDICT_TIMEOUT,
            "still {r} after {VERDICT_TIMEOUT:?}\n{}",
            source.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    write_certs(&certs, &["127.0.0.1".to_string()]).unwrap();
    certs
}

#[test]
fn a_destination_smaller_than_the_source_is_refused_and_untouched() {
    let dir = common::test_dir("strait-refuse-small");
    let certs = certs(dir.path());
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, 32 * MIB, Fill::Seeded(1)).unwrap();
    common::make_image(&dst, 16 * MIB, Fill::Seeded(2)).unwrap();
    let before = common::md5_file(&dst).unwrap();
    let (destination, to) = destination(dir.path(), &dst, &certs);
    let source = source(dir.path(), "source", &src, &certs);
    replicate(&source, &to);
    let r = wait_state(&source, &["refused"]);
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("smaller"), "{r}");
    assert_eq!(destination.replication()["refusals"], 1);
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        before,
        "the destination was written"
    );
    // A second replicate on the same engine is refused, with the reason.
    let mut args = Map::new();
    args.insert("to".into(), json!(to));
    let err = ControlClient::connect(&source.control)
        .unwrap()
        .call_with_args("replicate", args)
        .unwrap_err();
    assert!(err.to_string().contains("already replicating"), "{err}");
}

/// While a destination holds a source's session, a second source is told the destination
/// is busy; nothing of its disk is written.
#[test]
fn a_second_source_is_refused_while_the_first_replicates() {
    let dir = common::test_dir("strait-refuse-second");
    let certs = certs(dir.path());
    let (a, b, dst) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("dst.img"),
    );
    common::make_image(&a, 8 * MIB, Fill::Seeded(1)).unwrap();
    common::make_image(&b, 8 * MIB, Fill::Seeded(3)).unwrap();
    common::make_image(&dst, 8 * MIB, Fill::Seeded(2)).unwrap();
    let (destination, to) = destination(dir.path(), &dst, &certs);
    let first = source(dir.path(), "first", &a, &certs);
    replicate(&first, &to);
    wait_state(&first, &["in-sync"]);
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&a).unwrap()
    );
    let second = source(dir.path(), "second", &b, &certs);
    replicate(&second, &to);
    let started = Instant::now();
    let error = loop {
        let r = second.replication();
        if let Some(e) = r["last_error"].as_str().filter(|e| e.contains("busy")) {
            break e.to_string();
        }
        assert_ne!(r["state"], "copying", "a second source got in: {r}");
        assert!(started.elapsed() < VERDICT_TIMEOUT, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("second source: {error}");
    assert_eq!(first.replication()["state"], "in-sync");
    let watch = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["ctl", "--control"])
        .arg(&first.control)
        .args(["status", "--watch", "--count", "2", "--interval-ms", "50"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&watch.stdout);
    assert!(watch.status.success(), "{text}");
    let in_sync = text.lines().filter(|l| l.starts_with("in-sync")).count();
    assert_eq!(in_sync, 2, "{text}");
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&a).unwrap()
    );
    assert_eq!(destination.replication()["sessions"], 1);
}

/// A destination restarted on the same disk is the same replica: the source copies only
/// what it had not confirmed. One whose identity file is gone (a replaced disk) is another
/// replica: the source copies everything again. A promoted one stays promoted.
#[test]
fn a_restarted_destination_is_recognised_and_a_replaced_one_recopied() {
    let dir = common::test_dir("strait-restart-dest");
    let certs = certs(dir.path());
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    common::make_image(&src, 8 * MIB, Fill::Seeded(1)).unwrap();
    common::make_image(&dst, 8 * MIB, Fill::Seeded(2)).unwrap();
    // A fixed port, so the source finds the restarted destination where it was.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    let start_destination = |name: &str| {
        let args = [
            "--disk".as_ref(),
            dst.as_os_str(),
            "--listen".as_ref(),
            to.as_ref(),
            "--tls-dir".as_ref(),
            certs.as_os_str(),
        ];
        Engine::serve(dir.path(), name, &args, &[])
    };
    let destination = start_destination("dst-1");
    let source = source(dir.path(), "source", &src, &certs);
    replicate(&source, &to);
    let first = wait_state(&source, &["in-sync"]);
    let all_chunks = first["chunks_sent"].as_u64().unwrap();
    assert_eq!(all_chunks, 8 * MIB / (512 << 10));
    let identity = std::fs::read_to_string(dir.path().join("dst.img.strait-replica")).unwrap();
    assert!(identity.contains("source="), "{identity}");

    // Restarted: the same replica; nothing to copy again.
    drop(destination);
    let sessions_before = source.replication()["sessions_lost"].as_u64().unwrap();
    let destination = start_destination("dst-2");
    let started = Instant::now();
    let r = loop {
        let r = source.replication();
        let reconnected = destination.replication()["sessions"].as_u64().unwrap() > 0;
        if reconnected && r["state"] == "in-sync" {
            break r;
        }
        assert!(started.elapsed() < VERDICT_TIMEOUT, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r["full_resyncs"], 0, "{r}");
    assert_eq!(r["chunks_sent"], all_chunks, "{r}");
    assert!(
        r["sessions_lost"].as_u64().unwrap() >= sessions_before,
        "{r}"
    );

    // Replaced: another disk behind the same address; everything is copied again.
    drop(destination);
    std::fs::remove_file(dir.path().join("dst.img.strait-replica")).unwrap();
    common::make_image(&dst, 8 * MIB, Fill::Seeded(3)).unwrap();
    let destination = start_destination("dst-3");
    let started = Instant::now();
    let r = loop {
        let r = source.replication();
        if r["full_resyncs"] == 1 && r["state"] == "in-sync" {
            break r;
        }
        assert!(started.elapsed() < VERDICT_TIMEOUT, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(r["chunks_sent"].as_u64().unwrap() >= 2 * all_chunks, "{r}");
    assert_eq!(
        common::md5_file(&dst).unwrap(),
        common::md5_file(&src).unwrap()
    );

    // Promoted, then restarted: still its own disk, and the source is still refused.
    source.call("demote", Map::new());
    let started = Instant::now();
    while destination.replication()["complete"] != true {
        assert!(started.elapsed() < VERDICT_TIMEOUT);
        std::thread::sleep(Duration::from_millis(50));
    }
    destination.call("promote", Map::new());
    drop(destination);
    let destination = start_destination("dst-4");
    assert_eq!(destination.replication()["state"], "promoted");
    let err = ControlClient::connect(&destination.control)
        .unwrap()
        .call_with_args("promote", Map::new())
        .map(|v| v.to_string());
    // Promoting again is harmless (idempotent).
    assert!(err.is_ok(), "{err:?}");
}

/// `migrate` checks its arguments before it starts anything: each bad one is refused as
/// `invalid_args`, naming the argument, and neither a migration nor a replication starts.
#[test]
fn migrate_refuses_bad_arguments_before_it_starts() {
    let dir = common::test_dir("strait-refuse-migrate-args");
    let certs = certs(dir.path());
    let src = dir.path().join("src.img");
    common::make_image(&src, 8 * MIB, Fill::Seeded(1)).unwrap();
    let source = source(dir.path(), "source", &src, &certs);
    // Never reached: the arguments are refused first.
    let vmm = format!("qemu:{}", dir.path().join("no-qmp.sock").display());
    let to = "127.0.0.1:9";
    let cases = [
        (
            json!({"vmm": vmm, "to": to, "converge_timeout_s": 0}),
            "`converge_timeout_s`",
        ),
        (
            json!({"vmm": vmm, "to": to, "converge_timeout_s": 86_401}),
            "`converge_timeout_s`",
        ),
        (
            json!({"vmm": vmm, "to": to, "converge_timeout_s": "30"}),
            "`converge_timeout_s`",
        ),
        (
            json!({"vmm": vmm, "to": to, "converge_timeout_s": 2.5}),
            "`converge_timeout_s`",
        ),
        (
            json!({"vmm": vmm, "to": to, "converge_timeout_s": -1}),
            "`converge_timeout_s`",
        ),
        (
            json!({"vmm": vmm, "to": to, "downtime_ms": 49}),
            "`downtime_ms`",
        ),
        (
            json!({"vmm": vmm, "to": to, "timeout": 30}),
            "not `timeout`",
        ),
        (json!({"vmm": "kvm:/x", "to": to}), "qemu:"),
        (json!({"to": to, "converge_timeout_s": 30}), "`vmm`"),
    ];
    for (args, needle) in cases {
        let Value::Object(map) = args.clone() else {
            unreachable!("the cases are objects")
        };
        let err = ControlClient::connect(&source.control)
            .unwrap()
            .call_with_args("migrate", map)
            .unwrap_err();
        match err {
            ControlError::Remote { code, message } => {
                assert_eq!(code, "invalid_args", "{args}: {message}");
                assert!(message.contains(needle), "{args}: {message}");
            }
            other => panic!("{args}: expected an error answer, got {other}"),
        }
    }
    let status = source.call("status", Map::new());
    assert_eq!(status["migration"], Value::Null, "{status}");
    assert_eq!(status["replication"], Value::Null, "{status}");
}
