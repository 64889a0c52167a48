//! The destination's commit record across a restart, with a real `strait serve --listen`:
//! an engine that stopped between the commit point (the record says `committed`) and the
//! promote finishes the commit when it starts again (the source may already know it
//! committed, so the VM must run here); a recorded refusal leaves the replica a replica;
//! a corrupt record stops the engine from starting instead of being read as "nothing
//! decided".

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Engine, Fill};
use serde_json::{Map, Value};
use strait_engine::migration::record::MigrationRecord;

/// A restarted engine finishes a recorded commit at once: a promote is a sync and a small
/// file write; the margin is for a loaded machine.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

fn destination(dir: &Path, image: &Path, name: &str) -> Engine {
    let args = [
        "--disk".as_ref(),
        image.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--insecure".as_ref(),
    ];
    Engine::serve(dir, name, &args, &[])
}

fn wait_migration_state(engine: &Engine, state: &str) -> Value {
    let started = Instant::now();
    loop {
        let status = engine.call("status", Map::new());
        if status["migration"]["state"] == state {
            return status;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "no migration state {state}: {status}\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_recorded_commit_is_finished_when_the_destination_starts_again() {
    let dir = common::test_dir("strait-mig-record");
    let image = dir.path().join("dst.img");
    common::make_image(&image, 8 << 20, Fill::Seeded(3)).unwrap();
    std::fs::write(
        MigrationRecord::path_for(&image),
        "00000000000000aa refused\n00000000000000bb committed\n",
    )
    .unwrap();
    let engine = destination(dir.path(), &image, "restarted");
    let status = wait_migration_state(&engine, "committed");
    assert_eq!(status["migration"]["id"], "00000000000000bb", "{status}");
    assert_eq!(status["replication"]["state"], "promoted", "{status}");
    // No VMM was configured: the engine says what is left to do.
    let detail = status["migration"]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("no VMM"), "{status}");
    drop(engine);
    // The promote itself was recorded beside the disk: a second restart finds a promoted
    // replica and leaves it so.
    let engine = destination(dir.path(), &image, "again");
    let status = engine.call("status", Map::new());
    assert_eq!(status["replication"]["state"], "promoted", "{status}");
    assert_eq!(status["migration"]["state"], "idle", "{status}");
}

#[test]
fn a_recorded_refusal_leaves_the_replica_a_replica() {
    let dir = common::test_dir("strait-mig-record");
    let image = dir.path().join("dst.img");
    common::make_image(&image, 8 << 20, Fill::Seeded(4)).unwrap();
    std::fs::write(
        MigrationRecord::path_for(&image),
        "00000000000000bb committed\n00000000000000cc refused\n",
    )
    .unwrap();
    let engine = destination(dir.path(), &image, "refused");
    // Give the migration thread its start; nothing may change.
    std::thread::sleep(Duration::from_millis(500));
    let status = engine.call("status", Map::new());
    assert_ne!(status["replication"]["state"], "promoted", "{status}");
    assert_eq!(status["migration"]["state"], "idle", "{status}");
    assert_eq!(status["replication"]["state"], "waiting", "{status}");
}

#[test]
fn a_corrupt_record_stops_the_engine_from_starting() {
    let dir = common::test_dir("strait-mig-record");
    let image = dir.path().join("dst.img");
    common::make_image(&image, 8 << 20, Fill::Seeded(5)).unwrap();
    std::fs::write(MigrationRecord::path_for(&image), "not a record\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("serve")
        .arg("--disk")
        .arg(&image)
        .args(["--listen", "127.0.0.1:0", "--insecure", "--control"])
        .arg(dir.path().join("control.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("migration record") && stderr.contains("corrupt"),
        "{stderr}"
    );
}
