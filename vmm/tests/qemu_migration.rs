//! Live migrations between two real local QEMUs (TCG, 64 MiB, the guest in its firmware),
//! driven through the `Vmm` trait the way the orchestration will: the destination started
//! with `-incoming defer` and pointed at a Unix socket with `migrate-incoming`, the source
//! held at `pre-switchover`, then continued or cancelled.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{require_qemu, test_dir, Qemu, Start};
use strait_vmm::{
    MigrationCapabilities, MigrationParameters, MigrationStatus, MigrationUri, QemuVmm, RunState,
    Vmm, VmmError, VmmEventKind,
};

/// A 64 MiB firmware guest migrates locally in well under a second; the margin is for a
/// loaded 2-core machine.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// A failed incoming migration makes the destination QEMU exit within milliseconds.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The downtime the source aims for.
const DOWNTIME_LIMIT_MS: u64 = 300;
/// A bandwidth cap that makes the ~640 KB a firmware guest sends take a few seconds, so the
/// test can act while the migration is active.
const SLOW_BANDWIDTH_BYTES_PER_S: u64 = 128 * 1024;

struct Pair {
    source: QemuVmm,
    destination: QemuVmm,
    // Declared after the drivers, so their connections close before QEMU is killed; the
    // source process is only held for that.
    _source_qemu: Qemu,
    destination_qemu: Qemu,
    uri: MigrationUri,
}

/// Starts a running source and a deferred-incoming destination, sets capabilities and
/// parameters on both the way the orchestration does, and points the destination at the
/// migration socket.
fn pair(dir: &Path, destination_start: Start, bandwidth: Option<u64>) -> Pair {
    let source_qemu = Qemu::start(dir, "src", Start::Running);
    let destination_qemu = Qemu::start(dir, "dst", destination_start);
    let source = common::connect(&source_qemu);
    let destination = common::connect(&destination_qemu);
    assert_eq!(
        destination.run_state().expect("status"),
        RunState::InMigrate
    );

    destination
        .set_migration_capabilities(&MigrationCapabilities {
            return_path: true,
            events: true,
            ..MigrationCapabilities::default()
        })
        .expect("destination capabilities");
    source
        .set_migration_capabilities(&MigrationCapabilities {
            pause_before_switchover: true,
            return_path: true,
            auto_converge: true,
            events: true,
        })
        .expect("source capabilities");
    let parameters = MigrationParameters {
        downtime_limit_ms: Some(DOWNTIME_LIMIT_MS),
        max_bandwidth_bytes_per_s: bandwidth,
        throttle_trigger_threshold_pct: Some(10),
        ..MigrationParameters::default()
    };
    source
        .set_migration_parameters(&parameters)
        .expect("parameters");
    let read_back = source.migration_parameters().expect("query parameters");
    assert_eq!(read_back.downtime_limit_ms, Some(DOWNTIME_LIMIT_MS));
    assert_eq!(read_back.throttle_trigger_threshold_pct, Some(10));
    if let Some(bandwidth) = bandwidth {
        assert_eq!(read_back.max_bandwidth_bytes_per_s, Some(bandwidth));
    }

    let uri = MigrationUri::Unix(dir.join("mig.sock"));
    destination.start_incoming(&uri).expect("migrate-incoming");
    Pair {
        source,
        destination,
        _source_qemu: source_qemu,
        destination_qemu,
        uri,
    }
}

/// Starts the migration and waits until the source holds it at `pre-switchover`; checks the
/// source is paused and the events arrived in order.
fn migrate_to_pre_switchover(pair: &Pair) -> Duration {
    let started = Instant::now();
    pair.source.start_migration(&pair.uri).expect("migrate");
    let info = pair
        .source
        .wait_migration_status(&[MigrationStatus::PreSwitchover], MIGRATION_TIMEOUT)
        .expect("pre-switchover");
    let held_after = started.elapsed();
    assert_eq!(info.status, MigrationStatus::PreSwitchover);
    let ram = info.ram.expect("ram stats at pre-switchover");
    assert!(ram.transferred_bytes > 0, "{ram:?}");
    // Guest RAM plus QEMU's smaller RAM blocks (firmware, option ROMs).
    assert!(
        ram.total_bytes >= u64::from(common::GUEST_MEMORY_MIB) << 20,
        "{ram:?}"
    );
    assert!(ram.page_size_bytes > 0);
    // Held: the vCPUs are stopped, the device state not yet sent.
    assert_eq!(
        pair.source.run_state().expect("status"),
        RunState::FinishMigrate
    );
    // The waits consume no events: the whole sequence is still in the queue.
    let mut statuses = Vec::new();
    let mut stopped_before_hold = false;
    while let Some(event) = pair.source.next_event(Duration::ZERO).expect("events") {
        match event.kind {
            VmmEventKind::Migration { status } => statuses.push(status),
            VmmEventKind::Stop => {
                stopped_before_hold = statuses.last() == Some(&MigrationStatus::Active)
            }
            _ => {}
        }
    }
    assert_eq!(
        statuses,
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::PreSwitchover
        ]
    );
    assert!(
        stopped_before_hold,
        "no STOP between active and pre-switchover"
    );
    held_after
}

#[test]
fn qemu_live_migration_held_at_pre_switchover_then_continued() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let pair = pair(dir.path(), Start::Incoming, None);
    let held_after = migrate_to_pre_switchover(&pair);

    // The orchestration's switchover work would happen here, with the source paused.
    std::thread::sleep(Duration::from_millis(200));
    let continued = Instant::now();
    pair.source.continue_migration().expect("migrate-continue");
    let info = pair
        .source
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
        .expect("completed on the source");
    let completed_after = continued.elapsed();
    pair.destination
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
        .expect("completed on the destination");
    pair.destination
        .wait_run_state(&[RunState::Running], MIGRATION_TIMEOUT)
        .expect("the destination runs");
    assert_eq!(
        pair.source.run_state().expect("status"),
        RunState::PostMigrate
    );

    let ram = info.ram.as_ref().expect("ram stats");
    assert!(ram.transferred_bytes > 0);
    assert_eq!(ram.remaining_bytes, 0);
    let total_ms = info.total_time_ms.expect("total time");
    let downtime_ms = info.downtime_ms.expect("downtime");
    // QEMU counts the downtime from the stop, so it includes the time held.
    assert!(
        downtime_ms >= 200,
        "downtime {downtime_ms} ms < the 200 ms hold"
    );
    assert!(total_ms >= downtime_ms);
    eprintln!(
        "held at pre-switchover after {:.0} ms; completed {:.0} ms after continue; \
         QEMU: total {total_ms} ms, downtime {downtime_ms} ms (incl. the 200 ms hold), \
         {} bytes sent",
        held_after.as_secs_f64() * 1e3,
        completed_after.as_secs_f64() * 1e3,
        ram.transferred_bytes
    );
    drop(pair);
}

#[test]
fn qemu_destination_started_paused_waits_for_resume() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let pair = pair(dir.path(), Start::IncomingPaused, None);
    migrate_to_pre_switchover(&pair);
    pair.source.continue_migration().expect("migrate-continue");
    pair.destination
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
        .expect("completed on the destination");
    // With -S the destination does not run until told: the orchestration's commit point.
    assert_eq!(
        pair.destination.run_state().expect("status"),
        RunState::Paused
    );
    pair.destination.resume().expect("cont");
    pair.destination
        .wait_run_state(&[RunState::Running], MIGRATION_TIMEOUT)
        .expect("the destination runs");
}

#[test]
fn qemu_cancel_at_pre_switchover_resumes_the_source() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let mut pair = pair(dir.path(), Start::Incoming, None);
    migrate_to_pre_switchover(&pair);

    pair.source.cancel_migration().expect("migrate_cancel");
    let error = pair
        .source
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
        .expect_err("cancelled, not completed");
    assert!(
        matches!(
            error,
            VmmError::MigrationEnded {
                status: MigrationStatus::Cancelled,
                ..
            }
        ),
        "{error:?}"
    );
    pair.source
        .wait_run_state(&[RunState::Running], MIGRATION_TIMEOUT)
        .expect("the source runs again");
    // QEMU's destination exits when its incoming migration fails.
    let status = pair
        .destination_qemu
        .wait_exit(EXIT_TIMEOUT)
        .expect("the destination QEMU exits");
    assert!(!status.success(), "{status}");
    assert!(pair.destination.run_state().is_err());
}

#[test]
fn qemu_cancel_while_active_and_throttle_settings() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let pair = pair(
        dir.path(),
        Start::Incoming,
        Some(SLOW_BANDWIDTH_BYTES_PER_S),
    );
    pair.source.start_migration(&pair.uri).expect("migrate");
    let info = pair
        .source
        .wait_migration_status(&[MigrationStatus::Active], MIGRATION_TIMEOUT)
        .expect("active");
    assert_eq!(info.status, MigrationStatus::Active);
    assert_eq!(pair.source.run_state().expect("status"), RunState::Running);

    // The throttle knob is accepted during the migration and lands in the parameters.
    pair.source.set_cpu_throttle(30).expect("throttle");
    let parameters = pair.source.migration_parameters().expect("parameters");
    assert_eq!(parameters.cpu_throttle_initial_pct, Some(30));
    assert_eq!(parameters.max_cpu_throttle_pct, Some(30));
    pair.source.set_cpu_throttle(5).expect("throttle down");
    let parameters = pair.source.migration_parameters().expect("parameters");
    assert_eq!(parameters.max_cpu_throttle_pct, Some(5));

    let progress = pair.source.migration_info().expect("query-migrate");
    assert_eq!(progress.status, MigrationStatus::Active, "{progress:?}");
    assert!(progress.expected_downtime_ms.is_some(), "{progress:?}");

    pair.source.cancel_migration().expect("migrate_cancel");
    let info = pair
        .source
        .wait_migration_status(&[MigrationStatus::Cancelled], MIGRATION_TIMEOUT)
        .expect("cancelled");
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert_eq!(pair.source.run_state().expect("status"), RunState::Running);
}

#[test]
fn qemu_migration_to_nowhere_fails_with_qemu_reason() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let qemu = Qemu::start(dir.path(), "src", Start::Running);
    let source = common::connect(&qemu);
    source
        .start_migration(&MigrationUri::Unix(dir.path().join("nobody.sock")))
        .expect("migrate starts, then fails");
    let error = source
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATION_TIMEOUT)
        .expect_err("fails");
    let VmmError::MigrationEnded {
        status, error_desc, ..
    } = &error
    else {
        panic!("expected MigrationEnded, got {error:?}");
    };
    assert_eq!(*status, MigrationStatus::Failed);
    assert!(
        error_desc.as_deref().unwrap_or("").contains("nobody.sock"),
        "{error}"
    );
    assert_eq!(source.run_state().expect("status"), RunState::Running);
}
