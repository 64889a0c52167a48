//! The QEMU driver: [`Vmm`] over QMP.
//!
//! | trait method | QMP |
//! |---|---|
//! | `run_state` | `query-status` |
//! | `pause` / `resume` | `stop` / `cont` |
//! | `set_migration_capabilities` | `migrate-set-capabilities` |
//! | `set_migration_parameters`, `set_cpu_throttle` | `migrate-set-parameters` |
//! | `migration_parameters` | `query-migrate-parameters` |
//! | `start_migration` | `migrate` |
//! | `migration_info` | `query-migrate` |
//! | `continue_migration` | `migrate-continue state=pre-switchover` |
//! | `cancel_migration` | `migrate_cancel` |
//! | `start_incoming` | `migrate-incoming` (QEMU started with `-incoming defer`) |
//! | events | `MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`, `SHUTDOWN`, ... |

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::migration::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    RunState, VmmEvent, VmmEventKind,
};
use crate::qmp::{QmpClient, QmpConfig, QmpEvent};
use crate::vmm::{Vmm, VmmError, VmmFeatures};

/// QEMU's bounds on the throttle percentages (`cpu-throttle-initial`, `max-cpu-throttle`).
const THROTTLE_PCT_MIN: u8 = 1;
const THROTTLE_PCT_MAX: u8 = 99;

/// How long a completed migration's final statistics may take to appear (see
/// `migration_info`): QEMU computes them right after setting `completed`, in microseconds
/// unless its main loop is busy; past this, the statistics are returned as they are.
const FINAL_STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to look again meanwhile.
const FINAL_STATS_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A QEMU process driven over its QMP socket.
#[derive(Debug)]
pub struct QemuVmm {
    qmp: QmpClient,
}

#[derive(Deserialize)]
struct StatusInfo {
    status: RunState,
}

#[derive(Deserialize)]
struct CpuInfo {
    #[serde(rename = "thread-id")]
    thread_id: i64,
}

impl QemuVmm {
    /// Connects to QEMU's QMP socket at `path` with the default timeouts.
    pub fn connect(path: &Path) -> Result<QemuVmm, VmmError> {
        Self::connect_with(path, QmpConfig::default())
    }

    /// Connects with the given timeouts and bounds.
    pub fn connect_with(path: &Path, config: QmpConfig) -> Result<QemuVmm, VmmError> {
        Ok(QemuVmm {
            qmp: QmpClient::connect_with(path, config)?,
        })
    }

    /// The QMP connection, for commands the trait does not cover.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The host thread ids of the guest's vCPUs (`query-cpus-fast`), for placing or
    /// slowing them from outside QEMU ([`crate::VcpuQuota`]). Ids QEMU reports as 0 or
    /// negative (no thread of their own) are left out.
    pub fn vcpu_threads(&self) -> Result<Vec<i32>, VmmError> {
        let cpus: Vec<CpuInfo> = self.qmp.execute("query-cpus-fast", None)?;
        Ok(cpus
            .into_iter()
            .filter_map(|cpu| i32::try_from(cpu.thread_id).ok())
            .filter(|&tid| tid > 0)
            .collect())
    }

    fn command(&self, command: &str, arguments: Option<Value>) -> Result<(), VmmError> {
        self.qmp.execute::<Value>(command, arguments)?;
        Ok(())
    }
}

impl Vmm for QemuVmm {
    fn describe(&self) -> String {
        let v = self.qmp.greeting().version.qemu;
        format!(
            "qemu {}.{}.{} at {}",
            v.major,
            v.minor,
            v.micro,
            self.qmp.path().display()
        )
    }

    fn features(&self) -> VmmFeatures {
        VmmFeatures {
            pause_before_switchover: true,
            return_path: true,
            cancel: true,
            dirty_rate: true,
            cpu_throttle: true,
            parameters: true,
            events: true,
            vcpu_threads: true,
        }
    }

    fn run_state(&self) -> Result<RunState, VmmError> {
        let info: StatusInfo = self.qmp.execute("query-status", None)?;
        Ok(info.status)
    }

    fn pause(&self) -> Result<(), VmmError> {
        self.command("stop", None)
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.command("cont", None)
    }

    /// `quit`: QEMU answers, then exits (the connection closes after the reply).
    fn terminate(&self) -> Result<(), VmmError> {
        self.command("quit", None)
    }

    fn set_migration_capabilities(&self, caps: &MigrationCapabilities) -> Result<(), VmmError> {
        let list: Vec<Value> = [
            ("pause-before-switchover", caps.pause_before_switchover),
            ("return-path", caps.return_path),
            ("auto-converge", caps.auto_converge),
            ("events", caps.events),
        ]
        .into_iter()
        .map(|(capability, state)| json!({ "capability": capability, "state": state }))
        .collect();
        self.command(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
    }

    fn set_migration_parameters(&self, params: &MigrationParameters) -> Result<(), VmmError> {
        let arguments = parameters_json(params);
        if arguments.is_empty() {
            return Ok(());
        }
        self.command("migrate-set-parameters", Some(Value::Object(arguments)))
    }

    fn migration_parameters(&self) -> Result<MigrationParameters, VmmError> {
        Ok(self.qmp.execute("query-migrate-parameters", None)?)
    }

    /// auto-converge sets the throttle to `cpu-throttle-initial` at its first trigger and to
    /// `min(current + cpu-throttle-increment, max-cpu-throttle)` at each later one, so
    /// initial = max = `percent` with the largest increment makes every trigger land on
    /// exactly `percent`, up or down.
    fn set_cpu_throttle(&self, percent: u8) -> Result<(), VmmError> {
        if !(THROTTLE_PCT_MIN..=THROTTLE_PCT_MAX).contains(&percent) {
            return Err(VmmError::Invalid {
                what: "cpu throttle",
                reason: format!(
                    "{percent}% is outside QEMU's {THROTTLE_PCT_MIN}..={THROTTLE_PCT_MAX}%"
                ),
            });
        }
        self.set_migration_parameters(&MigrationParameters {
            cpu_throttle_initial_pct: Some(percent),
            cpu_throttle_increment_pct: Some(THROTTLE_PCT_MAX),
            max_cpu_throttle_pct: Some(percent),
            ..MigrationParameters::default()
        })
    }

    fn vcpu_threads(&self) -> Result<Vec<i32>, VmmError> {
        QemuVmm::vcpu_threads(self)
    }

    fn start_migration(&self, to: &MigrationUri) -> Result<(), VmmError> {
        self.command("migrate", Some(json!({ "uri": to.to_string() })))
    }

    /// QEMU's migration thread sets `completed` (and emits the event) a moment before it
    /// computes the final times and moves the source to `postmigrate`, both in one step
    /// under QEMU's big lock: a `query-migrate` in between reads `downtime` 0 (seen in the
    /// tests). So a `completed` read while the source is still `finish-migrate` is read
    /// again; reading the run state first makes the check race-free.
    fn migration_info(&self) -> Result<MigrationInfo, VmmError> {
        let info: MigrationInfo = self.qmp.execute("query-migrate", None)?;
        if info.status != MigrationStatus::Completed {
            return Ok(info);
        }
        let deadline = Instant::now() + FINAL_STATS_TIMEOUT;
        loop {
            let state = self.run_state()?;
            let info: MigrationInfo = self.qmp.execute("query-migrate", None)?;
            if state != RunState::FinishMigrate || Instant::now() >= deadline {
                return Ok(info);
            }
            std::thread::sleep(FINAL_STATS_POLL_INTERVAL);
        }
    }

    fn continue_migration(&self) -> Result<(), VmmError> {
        self.command(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
    }

    fn cancel_migration(&self) -> Result<(), VmmError> {
        self.command("migrate_cancel", None)
    }

    fn start_incoming(&self, from: &MigrationUri) -> Result<(), VmmError> {
        self.command("migrate-incoming", Some(json!({ "uri": from.to_string() })))
    }

    fn next_event(&self, timeout: Duration) -> Result<Option<VmmEvent>, VmmError> {
        Ok(self.qmp.next_event(timeout)?.map(vmm_event))
    }

    fn activity_marker(&self) -> Result<u64, VmmError> {
        Ok(self.qmp.event_count())
    }

    fn wait_for_activity(&self, marker: u64, timeout: Duration) -> Result<(), VmmError> {
        self.qmp.wait_for_events_after(marker, timeout)?;
        Ok(())
    }
}

/// `migrate-set-parameters` arguments: only the parameters that are set.
fn parameters_json(params: &MigrationParameters) -> Map<String, Value> {
    let MigrationParameters {
        downtime_limit_ms,
        max_bandwidth_bytes_per_s,
        cpu_throttle_initial_pct,
        cpu_throttle_increment_pct,
        max_cpu_throttle_pct,
        throttle_trigger_threshold_pct,
        avail_switchover_bandwidth_bytes_per_s,
    } = *params;
    let mut arguments = Map::new();
    let mut set = |name: &str, value: Option<u64>| {
        if let Some(value) = value {
            arguments.insert(name.to_owned(), json!(value));
        }
    };
    set("downtime-limit", downtime_limit_ms);
    set("max-bandwidth", max_bandwidth_bytes_per_s);
    set(
        "cpu-throttle-initial",
        cpu_throttle_initial_pct.map(u64::from),
    );
    set(
        "cpu-throttle-increment",
        cpu_throttle_increment_pct.map(u64::from),
    );
    set("max-cpu-throttle", max_cpu_throttle_pct.map(u64::from));
    set(
        "throttle-trigger-threshold",
        throttle_trigger_threshold_pct.map(u64::from),
    );
    set(
        "avail-switchover-bandwidth",
        avail_switchover_bandwidth_bytes_per_s,
    );
    arguments
}

/// Maps a QMP event onto the driver-neutral kinds; what does not decode stays `Other`.
fn vmm_event(event: QmpEvent) -> VmmEvent {
    #[derive(Deserialize)]
    struct Migration {
        status: MigrationStatus,
    }
    #[derive(Deserialize)]
    struct Pass {
        pass: u64,
    }
    #[derive(Deserialize)]
    struct Shutdown {
        guest: bool,
        reason: String,
    }
    let data = &event.data;
    let kind = match event.name.as_str() {
        "MIGRATION" => Migration::deserialize(data)
            .ok()
            .map(|m| VmmEventKind::Migration { status: m.status }),
        "MIGRATION_PASS" => Pass::deserialize(data)
            .ok()
            .map(|p| VmmEventKind::MigrationPass { pass: p.pass }),
        "STOP" => Some(VmmEventKind::Stop),
        "RESUME" => Some(VmmEventKind::Resume),
        "SHUTDOWN" => Shutdown::deserialize(data)
            .ok()
            .map(|s| VmmEventKind::Shutdown {
                guest: s.guest,
                reason: s.reason,
            }),
        _ => None,
    };
    VmmEvent {
        kind: kind.unwrap_or_else(|| VmmEventKind::Other {
            name: event.name.clone(),
            data: event.data.clone(),
        }),
        timestamp_us: event.timestamp_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qmp_event(name: &str, data: Value) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            data,
            timestamp_us: Some(7),
        }
    }

    #[test]
    fn events_map_to_kinds() {
        let kind = |name, data| vmm_event(qmp_event(name, data)).kind;
        assert_eq!(
            kind("MIGRATION", json!({"status": "pre-switchover"})),
            VmmEventKind::Migration {
                status: MigrationStatus::PreSwitchover
            }
        );
        assert_eq!(
            kind("MIGRATION_PASS", json!({"pass": 3})),
            VmmEventKind::MigrationPass { pass: 3 }
        );
        assert_eq!(kind("STOP", Value::Null), VmmEventKind::Stop);
        assert_eq!(
            kind(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"})
            ),
            VmmEventKind::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
        // A known name with data that does not decode is passed on, not dropped.
        assert_eq!(
            kind("MIGRATION", json!({"state": 1})),
            VmmEventKind::Other {
                name: "MIGRATION".into(),
                data: json!({"state": 1})
            }
        );
    }

    #[test]
    fn only_set_parameters_are_sent() {
        let args = parameters_json(&MigrationParameters {
            downtime_limit_ms: Some(500),
            max_cpu_throttle_pct: Some(40),
            avail_switchover_bandwidth_bytes_per_s: Some(25_000_000),
            ..Default::default()
        });
        assert_eq!(
            Value::Object(args),
            json!({"downtime-limit": 500, "max-cpu-throttle": 40,
                   "avail-switchover-bandwidth": 25_000_000})
        );
    }
}
