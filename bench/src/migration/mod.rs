//! The migration sweep's aggregation (`bench/migration.sh`, `strait-bench-migration`):
//! every run of `strait demo --json` (strait, and QEMU's own migration in two mirror
//! modes) at each RTT, with and without a link cut, read from a JSON-lines file, then
//! medians and spreads per system and condition, the two results files and a chart that
//! overlays the systems' timelines.
//!
//! Each line is the demo's report with a `bench` object the script adds: `round`,
//! `system`, `rtt_ms`, `cut_for_s` (0: no cut), `cut_at_s`, `exit_status`, and `error`
//! (the end of the demo's stderr) when the demo printed no report.

pub mod chart;
pub mod stats;
pub mod tables;

use serde_json::Value;

/// Why the runs file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("line {line} of the runs file is not JSON")]
    Json {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line} of the runs file lacks bench.{field}")]
    MissingField { line: usize, field: &'static str },
    #[error("the runs file holds no run")]
    Empty,
}

/// One run of the sweep.
#[derive(Clone, Debug)]
pub struct Run {
    pub round: u64,
    /// `strait`, `qemu-background`, `qemu-write-blocking`.
    pub system: String,
    pub rtt_ms: u64,
    /// Length of the link cut in seconds; 0 for none.
    pub cut_for_s: f64,
    /// The migration committed (the VM runs on the destination).
    pub survived: bool,
    /// Every check of the demo passed.
    pub passed: bool,
    /// `done`, `failed`, `rolled-back`, or `no report` when the demo printed none.
    pub outcome: String,
    pub error: Option<String>,
    /// The demo's whole report (for the chart); `Null` when there is none.
    pub report: Value,
}

impl Run {
    fn number(&self, pointer: &str) -> f64 {
        self.report
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    /// Seconds from the start to the VM running on the destination.
    pub fn total_s(&self) -> f64 {
        self.number("/migration/total_s")
    }

    /// From the source console's last heartbeat to the destination console's first.
    pub fn guest_switchover_ms(&self) -> f64 {
        self.number("/downtime/guest_switchover_ms")
    }

    /// Of that silence, the time the VM stood still: the silence less how far the guest's
    /// own clock moved between the two heartbeats (it stands still with the vCPUs).
    pub fn guest_stopped_ms(&self) -> f64 {
        self.number("/downtime/guest_stopped_ms")
    }

    /// The longest silence between heartbeats over the whole run.
    pub fn guest_longest_ms(&self) -> f64 {
        self.number("/downtime/guest_ms")
    }

    /// QEMU's own downtime figure.
    pub fn vmm_ms(&self) -> f64 {
        self.number("/downtime/vmm_ms")
    }

    /// The workload's heartbeat rate during the migration against before, in percent.
    pub fn penalty_pct(&self) -> f64 {
        self.number("/workload/slowdown_pct")
    }

    /// IP bytes the link delivered in both directions during the migration.
    pub fn wire_bytes(&self) -> f64 {
        self.number("/wire/total_bytes")
    }

    /// Where the link cut started, seconds since `migrate` (negative: before).
    pub fn cut_start_s(&self) -> f64 {
        self.number("/link/cut_at_s") - self.number("/migration/started_after_link_up_s")
    }
}

/// Parses the JSON-lines runs file; blank lines are skipped.
pub fn parse_runs(text: &str) -> Result<Vec<Run>, RunsError> {
    let mut runs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut value: Value = serde_json::from_str(line).map_err(|source| RunsError::Json {
            line: line_number,
            source,
        })?;
        let bench = value["bench"].take();
        let missing = |field| RunsError::MissingField {
            line: line_number,
            field,
        };
        let has_report = value.get("outcome").is_some();
        runs.push(Run {
            round: bench["round"].as_u64().ok_or(missing("round"))?,
            system: bench["system"]
                .as_str()
                .ok_or(missing("system"))?
                .to_owned(),
            rtt_ms: bench["rtt_ms"].as_u64().ok_or(missing("rtt_ms"))?,
            cut_for_s: bench["cut_for_s"].as_f64().ok_or(missing("cut_for_s"))?,
            survived: value["survived"] == true,
            passed: value["passed"] == true,
            outcome: value["outcome"].as_str().unwrap_or("no report").to_owned(),
            error: value["error"]
                .as_str()
                .or(bench["error"].as_str())
                .map(str::to_owned),
            report: if has_report { value } else { Value::Null },
        });
    }
    if runs.is_empty() {
        return Err(RunsError::Empty);
    }
    Ok(runs)
}

/// The systems in the order the tables show them: strait first, then the others by name.
pub fn systems(runs: &[Run]) -> Vec<String> {
    let mut names: Vec<String> = runs.iter().map(|r| r.system.clone()).collect();
    names.sort_by_key(|s| (s != "strait", s.clone()));
    names.dedup();
    names
}

/// The RTTs present, ascending.
pub fn rtts(runs: &[Run]) -> Vec<u64> {
    let mut rtts: Vec<u64> = runs.iter().map(|r| r.rtt_ms).collect();
    rtts.sort_unstable();
    rtts.dedup();
    rtts
}

/// The cut lengths present, ascending (0 first: no cut).
pub fn cuts(runs: &[Run]) -> Vec<f64> {
    let mut cuts: Vec<f64> = runs.iter().map(|r| r.cut_for_s).collect();
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    cuts
}

/// The runs of one system under one condition.
pub fn select<'a>(runs: &'a [Run], system: &str, rtt_ms: u64, cut_for_s: f64) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| r.system == system && r.rtt_ms == rtt_ms && r.cut_for_s == cut_for_s)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn line(system: &str, rtt: u64, cut: f64, round: u64, total: f64) -> String {
        serde_json::json!({
            "bench": {"round": round, "system": system, "rtt_ms": rtt, "cut_for_s": cut},
            "outcome": "done", "survived": true, "passed": true,
            "migration": {"total_s": total, "started_after_link_up_s": 10.0},
            "link": {"cut_at_s": 14.0},
            "downtime": {"guest_switchover_ms": 900.0, "guest_stopped_ms": 450.0, "guest_ms": 1000.0, "vmm_ms": 700},
            "workload": {"slowdown_pct": 20.0},
            "wire": {"total_bytes": 1_000_000},
        })
        .to_string()
    }

    #[test]
    fn runs_parse_with_and_without_a_report() {
        let text = format!(
            "{}\n\n{}\n",
            line("qemu-background", 100, 3.0, 1, 30.0),
            r#"{"bench": {"round": 2, "system": "strait", "rtt_ms": 100, "cut_for_s": 0, "error": "boom"}}"#
        );
        let runs = parse_runs(&text).unwrap();
        assert_eq!(runs.len(), 2);
        assert!(runs[0].survived && runs[0].passed);
        assert_eq!(runs[0].total_s(), 30.0);
        assert_eq!(runs[0].vmm_ms(), 700.0);
        assert_eq!(runs[0].cut_start_s(), 4.0);
        assert_eq!(runs[0].wire_bytes(), 1e6);
        assert_eq!(runs[1].outcome, "no report");
        assert_eq!(runs[1].error.as_deref(), Some("boom"));
        assert!(runs[1].total_s().is_nan() && !runs[1].survived);
        assert_eq!(systems(&runs), ["strait", "qemu-background"]);
        assert_eq!(cuts(&runs), [0.0, 3.0]);
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(matches!(
            parse_runs("{\"bench\": {}}"),
            Err(RunsError::MissingField {
                line: 1,
                field: "round"
            })
        ));
        assert!(matches!(
            parse_runs("x"),
            Err(RunsError::Json { line: 1, .. })
        ));
        assert!(matches!(parse_runs("\n"), Err(RunsError::Empty)));
    }
}
