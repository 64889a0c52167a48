//! Driver-neutral types of a VM's state and of a migration: what the orchestration reads and
//! sets, whichever VMM runs the guest.
//!
//! They decode from QEMU's QMP replies directly (the `rename(deserialize = ...)` names are
//! QEMU's) and serialize with strait's own names, units last, for the control API.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The VM's run state (QEMU's `RunState`; a Cloud Hypervisor driver maps its `VmState`
/// `Running`/`Paused`/`Created`/`Shutdown` onto the first few).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Stopped by a client (`stop`), or by a completed incoming migration of a VM that was
    /// started with `-S`.
    Paused,
    /// Created with `-S`, never started.
    Prelaunch,
    /// A destination waiting for or loading an incoming migration.
    #[serde(rename = "inmigrate")]
    InMigrate,
    /// A source after its migration completed: the VM runs elsewhere now.
    #[serde(rename = "postmigrate")]
    PostMigrate,
    /// A source in the final phase of migration (also while held at `pre-switchover`).
    FinishMigrate,
    /// The guest shut down (with `-no-shutdown`).
    Shutdown,
    /// The guest suspended itself (ACPI S3).
    Suspended,
    /// QEMU hit an internal error.
    InternalError,
    /// A disk error stopped the VM (`werror=stop`).
    IoError,
    /// The guest panicked (pvpanic).
    GuestPanicked,
    /// Stopped by the debugger.
    Debug,
    /// Saving a snapshot.
    SaveVm,
    /// Loading a snapshot.
    RestoreVm,
    /// Stopped by a watchdog.
    Watchdog,
    /// COLO fault tolerance.
    Colo,
    /// A state this crate does not know.
    #[serde(other)]
    Other,
}

/// The state of a migration (QEMU's `MigrationStatus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has run.
    #[default]
    None,
    /// Connecting and negotiating.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled; the source runs on (terminal).
    Cancelled,
    /// Copying memory while the guest runs.
    Active,
    /// Postcopy: the destination runs and pulls pages.
    PostcopyActive,
    /// Postcopy paused by a network failure.
    PostcopyPaused,
    /// Postcopy recovering.
    PostcopyRecover,
    /// Done (terminal).
    Completed,
    /// Failed; the source runs on (terminal).
    Failed,
    /// COLO.
    Colo,
    /// The source is paused before sending device state and waits for
    /// `migrate-continue` (capability `pause-before-switchover`).
    PreSwitchover,
    /// Sending device state, after `pre-switchover`.
    Device,
    /// Waiting for the guest to unplug failover devices.
    WaitUnplug,
    /// A status this crate does not know.
    #[serde(other)]
    Other,
}

impl MigrationStatus {
    /// True for the states a migration does not leave: completed, failed, cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// A snapshot of a migration's progress (QEMU's `query-migrate`). Fields a VMM does not
/// report (or QEMU omits in the current state) are `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Where the migration is.
    #[serde(default)]
    pub status: MigrationStatus,
    /// Memory statistics (absent before the migration starts sending).
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Time since the migration started, in ms.
    #[serde(default, rename(deserialize = "total-time"))]
    pub total_time_ms: Option<u64>,
    /// Time from `setup` to `active`, in ms.
    #[serde(default, rename(deserialize = "setup-time"))]
    pub setup_time_ms: Option<u64>,
    /// QEMU's estimate of the downtime if it switched over now, in ms (while active).
    #[serde(default, rename(deserialize = "expected-downtime"))]
    pub expected_downtime_ms: Option<u64>,
    /// The measured downtime, in ms (once completed). On a source held at
    /// `pre-switchover` it includes the time held.
    #[serde(default, rename(deserialize = "downtime"))]
    pub downtime_ms: Option<u64>,
    /// The vCPU throttle auto-converge applies now, in percent (only while throttling).
    #[serde(default, rename(deserialize = "cpu-throttle-percentage"))]
    pub cpu_throttle_pct: Option<u8>,
    /// Why the migration failed.
    #[serde(default, rename(deserialize = "error-desc"))]
    pub error_desc: Option<String>,
}

/// Memory statistics of a migration (QEMU's `MigrationStats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RamStats {
    /// Bytes sent so far, all passes.
    #[serde(rename(deserialize = "transferred"))]
    pub transferred_bytes: u64,
    /// Bytes still to send in this pass.
    #[serde(rename(deserialize = "remaining"))]
    pub remaining_bytes: u64,
    /// Guest RAM size.
    #[serde(rename(deserialize = "total"))]
    pub total_bytes: u64,
    /// Pages found zero (sent as a marker).
    #[serde(default, rename(deserialize = "duplicate"))]
    pub zero_pages: u64,
    /// Pages sent in full.
    #[serde(default, rename(deserialize = "normal"))]
    pub normal_pages: u64,
    /// Guest pages dirtied per second, measured over the last pass.
    #[serde(default, rename(deserialize = "dirty-pages-rate"))]
    pub dirty_pages_per_s: u64,
    /// The guest page size the rates count in.
    #[serde(default, rename(deserialize = "page-size"))]
    pub page_size_bytes: u64,
    /// How often the dirty bitmap was synchronised (one per pass).
    #[serde(default, rename(deserialize = "dirty-sync-count"))]
    pub dirty_sync_count: u64,
    /// The transfer rate QEMU measured over the last period, in Mbit/s.
    #[serde(default, rename(deserialize = "mbps"))]
    pub rate_mbit_per_s: f64,
    /// Pages sent per second over the last period.
    #[serde(default, rename(deserialize = "pages-per-second"))]
    pub pages_per_s: u64,
}

impl RamStats {
    /// The guest's dirty rate in bytes per second.
    pub fn dirty_bytes_per_s(&self) -> u64 {
        self.dirty_pages_per_s.saturating_mul(self.page_size_bytes)
    }
}

/// Migration features to turn on or off; every field is set (a `false` turns it off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilities {
    /// The source pauses the VM before the final device state and waits for
    /// [`crate::Vmm::continue_migration`]: the orchestration's hook for switchover work.
    pub pause_before_switchover: bool,
    /// The destination answers on the same stream, so the source learns the state loaded.
    /// Set on both sides.
    pub return_path: bool,
    /// Throttle the vCPUs when memory is dirtied faster than it is sent.
    pub auto_converge: bool,
    /// Emit migration status events. Set on both sides.
    pub events: bool,
}

/// Migration parameters; `None` leaves a parameter as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParameters {
    /// The longest pause the VMM aims for at switchover, in ms.
    #[serde(default, rename(deserialize = "downtime-limit"))]
    pub downtime_limit_ms: Option<u64>,
    /// The rate the migration stream may use, in bytes per second.
    #[serde(default, rename(deserialize = "max-bandwidth"))]
    pub max_bandwidth_bytes_per_s: Option<u64>,
    /// Auto-converge's first throttle, in percent (QEMU: 1..=99).
    #[serde(default, rename(deserialize = "cpu-throttle-initial"))]
    pub cpu_throttle_initial_pct: Option<u8>,
    /// Auto-converge's step at each later trigger, in percent (QEMU: 1..=99).
    #[serde(default, rename(deserialize = "cpu-throttle-increment"))]
    pub cpu_throttle_increment_pct: Option<u8>,
    /// Auto-converge's ceiling, in percent (QEMU: initial..=99).
    #[serde(default, rename(deserialize = "max-cpu-throttle"))]
    pub max_cpu_throttle_pct: Option<u8>,
    /// Auto-converge triggers when a pass dirtied more than this share of what it sent, in
    /// percent (QEMU: 1..=100).
    #[serde(default, rename(deserialize = "throttle-trigger-threshold"))]
    pub throttle_trigger_threshold_pct: Option<u8>,
    /// The rate the VMM assumes for its last pages when it decides to switch over
    /// (QEMU 8.2 and later; 0: its own measure of the stream), in bytes per second.
    #[serde(default, rename(deserialize = "avail-switchover-bandwidth"))]
    pub avail_switchover_bandwidth_bytes_per_s: Option<u64>,
}

/// Where a migration stream goes to or comes from. Both QEMU and Cloud Hypervisor take
/// these as `unix:PATH` and `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUri {
    /// A Unix socket: strait's local end of the link.
    Unix(PathBuf),
    /// A TCP address.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// Something the VMM reported on its own.
#[derive(Clone, Debug, PartialEq)]
pub struct VmmEvent {
    /// What happened.
    pub kind: VmmEventKind,
    /// When, in microseconds since the Unix epoch, if the VMM said.
    pub timestamp_us: Option<u64>,
}

/// The kinds of [`VmmEvent`] the orchestration acts on; anything else is `Other`.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmEventKind {
    /// The migration changed status (QEMU `MIGRATION`, capability `events`).
    Migration {
        /// The new status.
        status: MigrationStatus,
    },
    /// A new memory pass began (QEMU `MIGRATION_PASS`).
    MigrationPass {
        /// The pass number, from 1.
        pass: u64,
    },
    /// The vCPUs stopped (QEMU `STOP`).
    Stop,
    /// The vCPUs resumed (QEMU `RESUME`).
    Resume,
    /// The guest or the host shut the VM down (QEMU `SHUTDOWN`).
    Shutdown {
        /// True if the guest asked for it.
        guest: bool,
        /// The VMM's reason, e.g. `host-qmp-quit`, `guest-shutdown`.
        reason: String,
    },
    /// Any other event, by name with its data.
    Other {
        /// The event's name.
        name: String,
        /// Its data (`Null` if none).
        data: Value,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_migrate_of_qemu_7_2_decodes() {
        let reply = json!({"expected-downtime": 300, "status": "pre-switchover", "setup-time": 1,
            "total-time": 38, "ram": {"total": 67641344, "postcopy-requests": 0,
            "dirty-sync-count": 1, "multifd-bytes": 0, "pages-per-second": 0,
            "downtime-bytes": 0, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0,
            "mbps": 142.4834, "transferred": 636023, "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": 636023, "duplicate": 16395, "dirty-pages-rate": 10,
            "skipped": 0, "normal-bytes": 487424, "normal": 119}});
        let info: MigrationInfo = serde_json::from_value(reply).expect("decodes");
        assert_eq!(info.status, MigrationStatus::PreSwitchover);
        assert_eq!(info.expected_downtime_ms, Some(300));
        let ram = info.ram.expect("ram stats");
        assert_eq!(ram.transferred_bytes, 636_023);
        assert_eq!(ram.dirty_bytes_per_s(), 40_960);
        // Serialised with strait's names.
        let out = serde_json::to_value(MigrationInfo {
            ram: Some(ram),
            ..Default::default()
        })
        .expect("serialises");
        assert_eq!(out["ram"]["transferred_bytes"], json!(636_023));
        assert_eq!(out["status"], json!("none"));
    }

    #[test]
    fn no_migration_yet_is_status_none() {
        let info: MigrationInfo = serde_json::from_value(json!({})).expect("decodes");
        assert_eq!(info.status, MigrationStatus::None);
        assert!(info.ram.is_none());
    }

    #[test]
    fn run_states_and_unknown_values() {
        let states: Vec<RunState> = serde_json::from_value(json!([
            "running",
            "inmigrate",
            "postmigrate",
            "finish-migrate",
            "prelaunch",
            "brand-new"
        ]))
        .expect("decodes");
        assert_eq!(
            states,
            [
                RunState::Running,
                RunState::InMigrate,
                RunState::PostMigrate,
                RunState::FinishMigrate,
                RunState::Prelaunch,
                RunState::Other
            ]
        );
        let status: MigrationStatus =
            serde_json::from_value(json!("some-future-state")).expect("decodes");
        assert_eq!(status, MigrationStatus::Other);
    }

    #[test]
    fn uris_in_the_vmm_syntax() {
        assert_eq!(
            MigrationUri::Unix("/run/strait/mig.sock".into()).to_string(),
            "unix:/run/strait/mig.sock"
        );
        assert_eq!(
            MigrationUri::Tcp {
                host: "10.0.0.2".into(),
                port: 7401
            }
            .to_string(),
            "tcp:10.0.0.2:7401"
        );
    }
}
