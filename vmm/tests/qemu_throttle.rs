//! The vCPU throttle knob against a real QEMU whose guest dirties memory faster than a
//! bandwidth-capped migration sends it: `set_cpu_throttle` moves the throttle QEMU applies
//! (as `query-migrate` reports it) up and down while the migration runs.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::{memory_dirtier, require_qemu, test_dir, Qemu, Start};
use strait_vmm::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    QemuVmm, RunState, Vmm,
};

/// The migration rate: a pass over the guest's 4 MiB of dirty pages takes about 0.25 s, so
/// auto-converge sees a full period (1 s) of dirtying well above what was sent.
const BANDWIDTH_BYTES_PER_S: u64 = 16 << 20;
/// So low that the migration never converges while the guest dirties: the test ends it.
const DOWNTIME_LIMIT_MS: u64 = 1;
/// Auto-converge re-evaluates at most once per second and throttles after two periods
/// that dirtied more than the trigger threshold; measured: the first throttle after about
/// 2 s, later changes within 0.5 s. The margin is for a loaded machine.
const THROTTLE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Waits until the guest's counter (the first word of the 4 MiB page) is non-zero: the
/// firmware has loaded the dirtier and it has swept its pages at least once.
fn wait_guest_dirtying(vmm: &QemuVmm) {
    let started = Instant::now();
    loop {
        let output: String = vmm
            .qmp()
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": "xp /1wx 0x400000"})),
            )
            .expect("read guest memory");
        // "0000000000400000: 0x0000002a"
        let word = output
            .rsplit("0x")
            .next()
            .and_then(|hex| u32::from_str_radix(hex.trim(), 16).ok());
        if word.is_some_and(|w| w > 0) {
            return;
        }
        assert!(
            started.elapsed() < THROTTLE_TIMEOUT,
            "the guest never dirtied its memory: {output:?}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn wait_throttle(vmm: &QemuVmm, percent: u8) -> (MigrationInfo, Duration) {
    let started = Instant::now();
    loop {
        let info = vmm.migration_info().expect("query-migrate");
        assert_eq!(info.status, MigrationStatus::Active, "{info:?}");
        if info.cpu_throttle_pct == Some(percent) {
            return (info, started.elapsed());
        }
        assert!(
            started.elapsed() < THROTTLE_TIMEOUT,
            "throttle still {:?}, not {percent}%, after {THROTTLE_TIMEOUT:?}: {info:?}",
            info.cpu_throttle_pct
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[test]
fn qemu_cpu_throttle_follows_set_cpu_throttle() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let kernel = memory_dirtier(dir.path());
    let kernel = kernel.to_str().expect("UTF-8 path");
    let source_qemu = Qemu::start_with(dir.path(), "src", Start::Running, &["-kernel", kernel]);
    let destination_qemu = Qemu::start(dir.path(), "dst", Start::Incoming);
    let source = common::connect(&source_qemu);
    let destination = common::connect(&destination_qemu);
    let uri = MigrationUri::Unix(dir.path().join("mig.sock"));
    destination.start_incoming(&uri).expect("migrate-incoming");

    source
        .set_migration_capabilities(&MigrationCapabilities {
            auto_converge: true,
            events: true,
            ..MigrationCapabilities::default()
        })
        .expect("capabilities");
    source
        .set_migration_parameters(&MigrationParameters {
            downtime_limit_ms: Some(DOWNTIME_LIMIT_MS),
            max_bandwidth_bytes_per_s: Some(BANDWIDTH_BYTES_PER_S),
            // Trigger whenever the guest dirtied more than 1% of what was sent: the
            // throttle then follows the asked value at every trigger.
            throttle_trigger_threshold_pct: Some(1),
            ..MigrationParameters::default()
        })
        .expect("parameters");
    // The rate strait tells QEMU to assume for its last pages (QEMU 8.2 and later): taken
    // and read back. A low one also keeps this migration from switching over while the
    // throttle is watched.
    let switchover_bytes_per_s = 1_000_000;
    source
        .set_migration_parameters(&MigrationParameters {
            avail_switchover_bandwidth_bytes_per_s: Some(switchover_bytes_per_s),
            ..MigrationParameters::default()
        })
        .expect("avail-switchover-bandwidth");
    let read_back = source.migration_parameters().expect("query parameters");
    assert_eq!(
        read_back.avail_switchover_bandwidth_bytes_per_s,
        Some(switchover_bytes_per_s)
    );
    assert_eq!(read_back.downtime_limit_ms, Some(DOWNTIME_LIMIT_MS));
    source.set_cpu_throttle(30).expect("throttle 30%");
    wait_guest_dirtying(&source);
    source.start_migration(&uri).expect("migrate");
    source
        .wait_migration_status(&[MigrationStatus::Active], THROTTLE_TIMEOUT)
        .expect("active");

    let (info, after) = wait_throttle(&source, 30);
    let ram = info.ram.expect("ram stats");
    assert!(ram.dirty_pages_per_s > 0, "{ram:?}");
    eprintln!(
        "throttle 30% after {:.1} s; dirty rate {} pages/s ({} B/s)",
        after.as_secs_f64(),
        ram.dirty_pages_per_s,
        ram.dirty_bytes_per_s()
    );
    for percent in [60, 10] {
        source.set_cpu_throttle(percent).expect("throttle");
        let (_, after) = wait_throttle(&source, percent);
        eprintln!("throttle {percent}% after {:.1} s", after.as_secs_f64());
    }

    source.cancel_migration().expect("cancel");
    source
        .wait_migration_status(&[MigrationStatus::Cancelled], THROTTLE_TIMEOUT)
        .expect("cancelled");
    assert_eq!(source.run_state().expect("status"), RunState::Running);
}
