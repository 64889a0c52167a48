//! The QEMU driver against a real QEMU (TCG, no disk, the guest in its firmware): run
//! states, pause and resume with their events, QEMU's errors, QMP's one-client rule, quit.

mod common;

use std::time::{Duration, Instant};

use common::{require_qemu, test_dir, Qemu, Start};
use serde_json::Value;
use strait_vmm::qmp::{QmpClient, QmpConfig, QmpError};
use strait_vmm::{MigrationStatus, QemuVmm, RunState, Vmm, VmmError, VmmEventKind};

/// A state change under TCG takes milliseconds; the margin is for a loaded 2-core machine.
const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// The next STOP or RESUME event, skipping others.
fn next_run_event(vmm: &QemuVmm) -> VmmEventKind {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = vmm
            .next_event(remaining)
            .expect("connected")
            .expect("an event before the timeout");
        if matches!(event.kind, VmmEventKind::Stop | VmmEventKind::Resume) {
            assert!(event.timestamp_us.is_some());
            return event.kind;
        }
    }
}

#[test]
fn qemu_pause_resume_and_their_events() {
    if !require_qemu() {
        return;
    }
    let started = Instant::now();
    let dir = test_dir("vmm");
    let qemu = Qemu::start(dir.path(), "vm", Start::Paused);
    let vmm = common::connect(&qemu);
    assert!(vmm.describe().starts_with("qemu "), "{}", vmm.describe());
    assert_eq!(vmm.run_state().expect("status"), RunState::Prelaunch);

    vmm.resume().expect("cont");
    assert_eq!(next_run_event(&vmm), VmmEventKind::Resume);
    assert_eq!(
        vmm.wait_run_state(&[RunState::Running], STATE_TIMEOUT)
            .expect("running"),
        RunState::Running
    );

    vmm.pause().expect("stop");
    assert_eq!(next_run_event(&vmm), VmmEventKind::Stop);
    assert_eq!(vmm.run_state().expect("status"), RunState::Paused);

    vmm.resume().expect("cont");
    assert_eq!(next_run_event(&vmm), VmmEventKind::Resume);
    assert_eq!(vmm.run_state().expect("status"), RunState::Running);

    // No migration has run.
    let info = vmm.migration_info().expect("query-migrate");
    assert_eq!(info.status, MigrationStatus::None);
    eprintln!(
        "pause/resume test took {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn qemu_errors_are_carried_with_class_and_description() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let qemu = Qemu::start(dir.path(), "vm", Start::Running);
    let vmm = common::connect(&qemu);

    let error = vmm
        .qmp()
        .execute::<Value>("no-such-command", None)
        .expect_err("unknown command");
    assert!(
        matches!(&error, QmpError::Command { class, .. } if class == "CommandNotFound"),
        "{error:?}"
    );

    // migrate-continue with no migration held at pre-switchover.
    let error = vmm.continue_migration().expect_err("nothing to continue");
    let VmmError::Qmp(QmpError::Command { class, desc, .. }) = &error else {
        panic!("expected a QEMU error, got {error:?}");
    };
    assert_eq!(class, "GenericError");
    assert!(desc.contains("not in expected state"), "{desc}");

    // A source-only QEMU has no incoming side.
    let error = vmm
        .start_incoming(&strait_vmm::MigrationUri::Unix(dir.path().join("in.sock")))
        .expect_err("not started with -incoming");
    assert!(error.to_string().contains("-incoming"), "{error}");

    // Out-of-range values are refused before QEMU sees them.
    assert!(matches!(
        vmm.set_cpu_throttle(0),
        Err(VmmError::Invalid { .. })
    ));
    // The connection is still fine.
    assert_eq!(vmm.run_state().expect("status"), RunState::Running);
}

#[test]
fn qemu_serves_one_qmp_client_at_a_time() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let qemu = Qemu::start(dir.path(), "vm", Start::Running);
    let first = common::connect(&qemu);
    let quick = QmpConfig {
        greeting_timeout: Duration::from_millis(500),
        ..QmpConfig::default()
    };
    let error = QmpClient::connect_with(&qemu.qmp, quick.clone()).expect_err("second client");
    assert!(
        matches!(error, QmpError::GreetingTimeout { .. }),
        "{error:?}"
    );
    drop(first);
    // QEMU greets the next client once the first has gone.
    let second = QmpClient::connect_with(
        &qemu.qmp,
        QmpConfig {
            greeting_timeout: STATE_TIMEOUT,
            ..quick
        },
    )
    .expect("connect after the first left");
    // scripts/install-deps.sh installs QEMU 9.0 or later (bookworm-backports).
    let version = second.greeting().version.qemu;
    assert!(version.major >= 9, "{version:?}");
}

#[test]
fn qemu_quit_reports_shutdown_then_disconnected() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let mut qemu = Qemu::start(dir.path(), "vm", Start::Running);
    let vmm = common::connect(&qemu);
    vmm.qmp().execute::<Value>("quit", None).expect("quit");
    assert!(
        qemu.wait_exit(STATE_TIMEOUT).is_some(),
        "QEMU still runs after quit"
    );
    // Events sent before the close are still delivered, then the closed connection shows.
    let event = vmm
        .next_event(STATE_TIMEOUT)
        .expect("the SHUTDOWN event first")
        .expect("an event");
    assert_eq!(
        event.kind,
        VmmEventKind::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    let error = vmm.run_state().expect_err("QEMU is gone");
    assert!(
        matches!(error, VmmError::Qmp(QmpError::Disconnected { .. })),
        "{error:?}"
    );
    let error = vmm.next_event(STATE_TIMEOUT).expect_err("QEMU is gone");
    assert!(matches!(
        error,
        VmmError::Qmp(QmpError::Disconnected { .. })
    ));
}

#[test]
fn qemu_driver_is_shared_between_threads() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("vmm");
    let qemu = Qemu::start(dir.path(), "vm", Start::Running);
    let vmm = common::connect(&qemu);
    std::thread::scope(|scope| {
        // One thread waits (it holds no lock while waiting) ...
        let waiter = scope.spawn(|| vmm.wait_run_state(&[RunState::Paused], STATE_TIMEOUT));
        // ... while this one keeps running commands, then pauses the VM.
        for _ in 0..20 {
            assert_eq!(vmm.run_state().expect("status"), RunState::Running);
            vmm.migration_info().expect("query-migrate");
        }
        vmm.pause().expect("stop");
        assert_eq!(
            waiter.join().expect("waiter thread").expect("paused"),
            RunState::Paused
        );
    });
    // The waiter consumed no events: STOP is still queued for an observer.
    assert_eq!(next_run_event(&vmm), VmmEventKind::Stop);
}
