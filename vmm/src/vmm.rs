//! The [`Vmm`] trait: what the migration orchestration asks of the VMM beside the engine,
//! whichever VMM it is. See `docs/vmm.md` for how QEMU and Cloud Hypervisor map onto it.

use std::time::{Duration, Instant};

use crate::migration::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    RunState, VmmEvent,
};
use crate::qmp::QmpError;

/// How often the waiting methods re-read the state when the VMM reports nothing. QEMU's
/// events wake the waiter at once, so for QEMU this only matters if an event was lost; for
/// a VMM without events (Cloud Hypervisor) it is the delay in noticing a change. A query
/// costs well under a millisecond, so 100 ms is cheap and a small share of a 0.5 s downtime.
pub const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What a driver can do; the orchestration picks its plan from these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmFeatures {
    /// The source can pause before the final state and wait for
    /// [`Vmm::continue_migration`] (QEMU's `pause-before-switchover`).
    pub pause_before_switchover: bool,
    /// The destination can answer on the migration stream (QEMU's `return-path`).
    pub return_path: bool,
    /// [`Vmm::cancel_migration`] works.
    pub cancel: bool,
    /// [`Vmm::migration_info`] reports the guest's dirty rate.
    pub dirty_rate: bool,
    /// [`Vmm::set_cpu_throttle`] works.
    pub cpu_throttle: bool,
    /// [`Vmm::set_migration_parameters`] takes a downtime limit and a bandwidth cap.
    pub parameters: bool,
    /// [`Vmm::next_event`] reports events (otherwise the waits poll).
    pub events: bool,
    /// [`Vmm::vcpu_threads`] names the host threads that run the vCPUs.
    pub vcpu_threads: bool,
}

/// Errors of a VMM driver.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The QMP conversation with QEMU failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The driver cannot do this.
    #[error("{vmm} cannot {what}")]
    Unsupported {
        /// The driver.
        vmm: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// An argument out of the range the VMM accepts.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The argument.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The migration reached a final status other than the awaited ones.
    #[error("the migration ended as {status:?} while waiting for {waiting_for:?}{}",
        error_desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    MigrationEnded {
        /// The final status.
        status: MigrationStatus,
        /// The VMM's reason, if it gave one.
        error_desc: Option<String>,
        /// What was awaited.
        waiting_for: Vec<MigrationStatus>,
    },
    /// A wait ran out of time.
    #[error("no {what} within {timeout:?} (last seen: {last_seen})")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The last state read.
        last_seen: String,
        /// How long it waited.
        timeout: Duration,
    },
}

/// A VMM running one guest, as the migration orchestration drives it.
///
/// A migration, by side:
///
/// * destination: [`set_migration_capabilities`](Vmm::set_migration_capabilities) (the
///   ones both sides need), [`start_incoming`](Vmm::start_incoming) on the socket strait
///   serves, then wait for [`MigrationStatus::Completed`] and
///   [`resume`](Vmm::resume) if the VM was started paused;
/// * source: capabilities and [`set_migration_parameters`](Vmm::set_migration_parameters),
///   [`start_migration`](Vmm::start_migration) into strait's socket, watch
///   [`migration_info`](Vmm::migration_info) (and adjust
///   [`set_cpu_throttle`](Vmm::set_cpu_throttle)), wait for
///   [`MigrationStatus::PreSwitchover`], do the switchover work, then
///   [`continue_migration`](Vmm::continue_migration) or
///   [`cancel_migration`](Vmm::cancel_migration).
///
/// Every method returns within its driver's timeouts; the waits take their own. Methods
/// take `&self` and drivers are `Send + Sync`, so a controller thread can read statistics
/// while the orchestration waits.
pub trait Vmm: Send + Sync {
    /// A short description for logs, e.g. `qemu 7.2.22 at /run/vm/qmp.sock`.
    fn describe(&self) -> String;

    /// What this driver can do.
    fn features(&self) -> VmmFeatures;

    /// The VM's run state.
    fn run_state(&self) -> Result<RunState, VmmError>;

    /// Stops the vCPUs (QEMU `stop`; Cloud Hypervisor `vm.pause`).
    fn pause(&self) -> Result<(), VmmError>;

    /// Starts or resumes the vCPUs (QEMU `cont`; Cloud Hypervisor `vm.resume`).
    fn resume(&self) -> Result<(), VmmError>;

    /// Turns migration features on or off; before a migration starts, on either side.
    fn set_migration_capabilities(&self, caps: &MigrationCapabilities) -> Result<(), VmmError>;

    /// Sets the parameters that are `Some`; on the source, also during a migration.
    fn set_migration_parameters(&self, params: &MigrationParameters) -> Result<(), VmmError>;

    /// The current migration parameters.
    fn migration_parameters(&self) -> Result<MigrationParameters, VmmError>;

    /// Asks for a vCPU throttle of `percent` (1..=99) while the migration runs. With QEMU it
    /// takes effect at auto-converge's next trigger (see `docs/vmm.md`), so it needs
    /// `auto_converge` on.
    fn set_cpu_throttle(&self, percent: u8) -> Result<(), VmmError>;

    /// The host thread ids that run the guest's vCPUs, for slowing them from outside the
    /// VMM ([`crate::VcpuQuota`]) when the VMM's own throttle is too slow or missing. The
    /// default: unsupported.
    fn vcpu_threads(&self) -> Result<Vec<i32>, VmmError> {
        Err(VmmError::Unsupported {
            vmm: "this VMM",
            what: "name its vCPU threads",
        })
    }

    /// Source: starts migrating to `to`; returns once the migration has started.
    fn start_migration(&self, to: &MigrationUri) -> Result<(), VmmError>;

    /// The migration's status and statistics (on either side; the destination reports
    /// less).
    fn migration_info(&self) -> Result<MigrationInfo, VmmError>;

    /// Source: lets a migration held at [`MigrationStatus::PreSwitchover`] finish.
    fn continue_migration(&self) -> Result<(), VmmError>;

    /// Source: cancels the migration; the VM runs on (or resumes) on the source.
    fn cancel_migration(&self) -> Result<(), VmmError>;

    /// Destination: starts listening for the incoming migration on `from`.
    fn start_incoming(&self, from: &MigrationUri) -> Result<(), VmmError>;

    /// Destination: ends a VMM whose incoming migration was given up, so the state it
    /// loaded can never run (QEMU `quit`). The default: unsupported.
    fn terminate(&self) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            vmm: "this VMM",
            what: "terminate",
        })
    }

    /// The oldest unconsumed event, waiting at most `timeout`; `None` if none came. A
    /// driver without events returns `None` after the timeout.
    fn next_event(&self, timeout: Duration) -> Result<Option<VmmEvent>, VmmError>;

    /// A number that changes when the VMM reports something; pair with
    /// [`wait_for_activity`](Vmm::wait_for_activity). The default never changes.
    ///
    /// Read it *before* the query whose answer decides to wait: an event that arrives
    /// between that answer and a marker read after it would not end the wait.
    fn activity_marker(&self) -> Result<u64, VmmError> {
        Ok(0)
    }

    /// Blocks until the VMM reports something after `marker` was read, or `timeout` passes.
    /// Consumes no events. The default (for VMMs without events) sleeps for `timeout`.
    fn wait_for_activity(&self, marker: u64, timeout: Duration) -> Result<(), VmmError> {
        let _ = marker;
        std::thread::sleep(timeout);
        Ok(())
    }

    /// Waits until the migration status is one of `until` and returns the info that showed
    /// it. Fails with [`VmmError::MigrationEnded`] if the migration reaches another final
    /// status, with [`VmmError::Timeout`] after `timeout`. Consumes no events.
    fn wait_migration_status(
        &self,
        until: &[MigrationStatus],
        timeout: Duration,
    ) -> Result<MigrationInfo, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let marker = self.activity_marker()?;
            let info = self.migration_info()?;
            if until.contains(&info.status) {
                return Ok(info);
            }
            if info.status.is_terminal() {
                return Err(VmmError::MigrationEnded {
                    status: info.status,
                    error_desc: info.error_desc,
                    waiting_for: until.to_vec(),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(VmmError::Timeout {
                    what: format!("migration status {until:?}"),
                    last_seen: format!("{:?}", info.status),
                    timeout,
                });
            }
            self.wait_for_activity(marker, remaining.min(STATUS_POLL_INTERVAL))?;
        }
    }

    /// Waits until the run state is one of `until` and returns it; [`VmmError::Timeout`]
    /// after `timeout`. Consumes no events.
    fn wait_run_state(&self, until: &[RunState], timeout: Duration) -> Result<RunState, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let marker = self.activity_marker()?;
            let state = self.run_state()?;
            if until.contains(&state) {
                return Ok(state);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(VmmError::Timeout {
                    what: format!("run state {until:?}"),
                    last_seen: format!("{state:?}"),
                    timeout,
                });
            }
            self.wait_for_activity(marker, remaining.min(STATUS_POLL_INTERVAL))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orchestration holds drivers as `Box<dyn Vmm>` and shares them between threads.
    #[test]
    fn drivers_are_object_safe_and_shareable() {
        fn shareable<T: Send + Sync + ?Sized>() {}
        shareable::<dyn Vmm>();
        shareable::<crate::QemuVmm>();
        let _: Option<Box<dyn Vmm>> = None;
    }
}
