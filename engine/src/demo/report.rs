//! What the demo recorded, and the report made of it: the migration's times, the downtime
//! three ways, the bytes per class, the link's use, the workload's slowdown, the throttle,
//! and the checks that the guest went on on the destination.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::console::{parse_heartbeat, Heartbeat, Verdict};
use super::rig::{Backend, Rig, WireSample};
use super::{passed, Plan, System};
use crate::ctl::{format_bytes_binary, format_duration};

/// The phase whose link use the report measures: the one where memory, mirror and bulk
/// (if any) share the link at full speed.
const MEMORY_PHASE: &str = "memory";

/// The report's heartbeat counts (for charts that overlay runs): bins of this length, as
/// the demo's own chart draws them.
const HEARTBEAT_BIN_S: f64 = 0.25;
/// ... from this long before `migrate` (the baseline is 5 s) ...
const HEARTBEAT_BINS_BEFORE_S: f64 = 5.0;
/// ... to this long after the migration's end (the guest going on on the destination).
const HEARTBEAT_BINS_AFTER_S: f64 = 10.0;
/// At most this many bins per console whatever the migration's length (the migration's
/// own bound is a few minutes): keeps the JSON line small.
const HEARTBEAT_BINS_MAX: usize = 4000;

/// What the demo saw. Times are host `Instant`s; the migration's own times (`status`) are
/// seconds since its start, which is `migrate_at` to within the control call's latency.
pub struct Recording {
    pub system: System,
    pub rtt_ms: u32,
    pub rate_mbit: u32,
    pub cut: Option<(f64, f64)>,
    pub link_up: Instant,
    /// The guest's first heartbeat on the source.
    pub first_heartbeat: Instant,
    /// When `migrate` was sent.
    pub migrate_at: Instant,
    /// `status.migration` once it ended.
    pub migration: Value,
    /// The run states of the source and destination QEMU after a commit.
    pub run_states: Option<(String, String)>,
    pub verdict: Option<Verdict>,
    /// The guest's `STRAIT-RESULT` pairs on the destination.
    pub guest_results: BTreeMap<String, String>,
    /// The md5 of the guest's region in the destination image, read on the host.
    pub host_md5: Option<String>,
    /// What went wrong after the commit (no heartbeat or verdict on the destination).
    pub after_error: Option<String>,
    pub src_heartbeats: Vec<Heartbeat>,
    pub dst_heartbeats: Vec<Heartbeat>,
    /// The heartbeat printed as the source's vCPUs stopped, split between the consoles:
    /// the source's unfinished last line joined with the destination's first line.
    pub split_heartbeat: Option<u64>,
    /// The md5 of the guest's DMA range in the destination image (see `dma_check`).
    pub host_md5_dma: Option<String>,
    /// The link's counters when `migrate` was sent and when the migration ended.
    pub wire_during: Option<(WireSample, WireSample)>,
    /// The link's counters over the whole run.
    pub wire: Vec<WireSample>,
    /// Checks only one system has (`--system qemu`: the destination image outside the
    /// guest's workload ranges equals the source's).
    pub extra_checks: Vec<Check>,
    /// What the migrating system itself reported beyond `migration` (QEMU's figures).
    pub system_detail: Value,
}

impl Recording {
    pub fn new(
        plan: &Plan,
        link_up: Instant,
        first_heartbeat: Instant,
        migrate_at: Instant,
        migration: Value,
    ) -> Recording {
        Recording {
            system: plan.system,
            rtt_ms: plan.rtt_ms,
            rate_mbit: plan.rate_mbit,
            cut: plan.cut,
            link_up,
            first_heartbeat,
            migrate_at,
            migration,
            run_states: None,
            verdict: None,
            guest_results: BTreeMap::new(),
            host_md5: None,
            after_error: None,
            src_heartbeats: Vec::new(),
            dst_heartbeats: Vec::new(),
            split_heartbeat: None,
            host_md5_dma: None,
            wire_during: None,
            wire: Vec::new(),
            extra_checks: Vec::new(),
            system_detail: Value::Null,
        }
    }

    pub fn committed(&self) -> bool {
        self.migration["phase"] == "done"
    }

    /// Takes the consoles' heartbeats once the QEMUs are stopped.
    pub fn take_heartbeats<E: Backend>(&mut self, rig: &Rig<E>) {
        self.src_heartbeats = rig.src_qemu.console.heartbeats();
        self.dst_heartbeats = rig.dst_qemu.console.heartbeats();
        self.split_heartbeat = split_heartbeat(
            &rig.src_qemu.console.unfinished_line(),
            &rig.dst_qemu.console.first_line().unwrap_or_default(),
        );
    }

    /// Seconds from `migrate` to `at` (negative before it).
    pub fn since_migrate_s(&self, at: Instant) -> f64 {
        match at.checked_duration_since(self.migrate_at) {
            Some(d) => d.as_secs_f64(),
            None => -self.migrate_at.duration_since(at).as_secs_f64(),
        }
    }
}

/// The heartbeat split between the consoles, if there is one: the source ends in an
/// unfinished line, the destination's first line is not a heartbeat by itself, and the two
/// joined are one.
fn split_heartbeat(src_unfinished: &str, dst_first_line: &str) -> Option<u64> {
    if src_unfinished.trim().is_empty() || parse_heartbeat(dst_first_line).is_some() {
        return None;
    }
    parse_heartbeat(&format!("{src_unfinished}{dst_first_line}")).map(|(i, _)| i)
}

/// One row of `status.migration.timeline`, read by the names in `timeline_columns`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub t_s: f64,
    pub phase: String,
    pub memory_bytes_per_s: f64,
    pub mirror_bytes_per_s: f64,
    pub bulk_bytes_per_s: f64,
    pub dirty_bytes_per_s: f64,
    pub throttle_pct: f64,
    pub applied_throttle_pct: f64,
    pub mirror_backlog_bytes: f64,
    /// The cap the migration's controller put on the guest's disk write rate (0: none).
    pub disk_cap_bytes_per_s: f64,
}

/// The timeline's rows; columns it lacks read as 0.
pub fn timeline(migration: &Value) -> Vec<Row> {
    let columns: Vec<&str> = migration["timeline_columns"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let index = |name: &str| columns.iter().position(|c| *c == name);
    let rows = migration["timeline"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    rows.iter()
        .filter_map(Value::as_array)
        .map(|row| {
            let num = |name: &str| {
                index(name)
                    .and_then(|i| row.get(i))
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            };
            Row {
                t_s: num("t_s"),
                phase: index("phase")
                    .and_then(|i| row.get(i))
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                memory_bytes_per_s: num("memory_bytes_per_s"),
                mirror_bytes_per_s: num("mirror_bytes_per_s"),
                bulk_bytes_per_s: num("bulk_bytes_per_s"),
                dirty_bytes_per_s: num("dirty_bytes_per_s"),
                throttle_pct: num("throttle_pct"),
                applied_throttle_pct: num("applied_throttle_pct"),
                mirror_backlog_bytes: num("mirror_backlog_bytes"),
                disk_cap_bytes_per_s: num("disk_cap_bytes_per_s"),
            }
        })
        .collect()
}

/// A phase and when it ran, in seconds since the migration's start; the final phase
/// (`done`, `rolled-back`, `failed`) has `end_s == start_s`.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseSpan {
    pub name: String,
    pub start_s: f64,
    pub end_s: f64,
}

pub fn phase_spans(migration: &Value) -> Vec<PhaseSpan> {
    let marks: Vec<(String, f64)> = migration["phases"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|p| Some((p["phase"].as_str()?.to_owned(), p["at_s"].as_f64()?)))
        .collect();
    marks
        .iter()
        .enumerate()
        .map(|(i, (name, start_s))| PhaseSpan {
            name: name.clone(),
            start_s: *start_s,
            end_s: marks.get(i + 1).map_or(*start_s, |next| next.1),
        })
        .collect()
}

/// The longest host-side silence between consecutive heartbeats of both consoles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gap {
    pub seconds: f64,
    /// How far the guest's own clock (`/proc/uptime`) moved between the two heartbeats.
    /// The guest's clock stands still while its vCPUs are stopped (QEMU stops the virtual
    /// clock with them and migrates it), so `seconds - guest_s` is the time the VM did
    /// not run: the silence less the guest's own slowness (a throttled or busy guest).
    pub guest_s: f64,
    /// Seconds since the migration's start when the silence began.
    pub start_s: f64,
    pub before_i: u64,
    pub after_i: u64,
}

impl Gap {
    /// The time the VM did not run during the silence: the silence less the guest's own
    /// time between the heartbeats (none if its clock went back).
    pub fn stopped_s(&self) -> f64 {
        (self.seconds - self.guest_s.max(0.0)).max(0.0)
    }
}

/// One check of the guest's continuity.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// The report.
pub struct Report {
    pub outcome: String,
    pub phases: Vec<PhaseSpan>,
    /// The longest silence between heartbeats in the whole run (the guest-side downtime,
    /// unless the guest stalled longer elsewhere: throttled, or on a busy host).
    pub gap: Option<Gap>,
    /// From the source's last heartbeat to the destination's first: the switchover as the
    /// guest's console shows it.
    pub switchover_gap: Option<Gap>,
    /// Link use in the memory phase: seconds, bytes delivered, share of the link.
    pub memory_phase: Option<(f64, f64, f64)>,
    /// Heartbeats per second before the migration, during it, and in its memory phase.
    pub rates: (Option<f64>, Option<f64>, Option<f64>),
    pub throttle_peak: (f64, f64),
    /// The applied throttle integrated over the timeline, in percent-seconds: a throttle
    /// of 50% for 2 s is 100, one second of the guest's CPU taken.
    pub throttle_integral_pct_s: f64,
    /// The lowest cap the controller put on the guest's disk writes, if it capped them.
    pub disk_cap_min: Option<f64>,
    pub checks: Vec<Check>,
    json: Value,
}

impl Report {
    pub fn new(rec: &Recording, plan: &Plan) -> Report {
        let m = &rec.migration;
        let rows = timeline(m);
        let phases = phase_spans(m);
        let gap = largest_gap(rec);
        let switchover_gap = switchover_gap(rec);
        let memory_phase = link_use(&rows, rec.rate_mbit);
        let end_s = phases.last().map_or(0.0, |p| p.end_s);
        let memory = phases.iter().find(|p| p.name == MEMORY_PHASE);
        let rates = (
            rate_between(rec, rec.since_migrate_s(rec.first_heartbeat), 0.0),
            rate_between(rec, 0.0, end_s),
            memory.and_then(|p| rate_between(rec, p.start_s, p.end_s)),
        );
        let peak = |f: fn(&Row) -> f64| rows.iter().map(f).fold(0.0, f64::max);
        let throttle_peak = (peak(|r| r.throttle_pct), peak(|r| r.applied_throttle_pct));
        let throttle_integral_pct_s = throttle_integral(&rows);
        let disk_cap_min = rows
            .iter()
            .map(|r| r.disk_cap_bytes_per_s)
            .filter(|c| *c > 0.0)
            .reduce(f64::min);
        let checks = checks(rec);
        let mut report = Report {
            outcome: m["phase"].as_str().unwrap_or("unknown").to_owned(),
            phases,
            gap,
            switchover_gap,
            memory_phase,
            rates,
            throttle_peak,
            throttle_integral_pct_s,
            disk_cap_min,
            checks,
            json: Value::Null,
        };
        report.json = report.make_json(rec, plan);
        report
    }

    pub fn failed_checks(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }

    /// The slowdown of the workload during the migration, in percent of its rate before.
    fn slowdown_pct(&self) -> Option<f64> {
        match self.rates {
            (Some(before), Some(during), _) if before > 0.0 => {
                Some((1.0 - during / before) * 100.0)
            }
            _ => None,
        }
    }

    fn make_json(&self, rec: &Recording, plan: &Plan) -> Value {
        let m = &rec.migration;
        let r = &rec.guest_results;
        let (src_last, dst_first) = counter_ends(rec);
        json!({
            "system": rec.system.name(),
            "outcome": self.outcome,
            "survived": rec.committed(),
            "passed": self.checks.iter().all(|c| c.passed),
            "error": m["error"],
            "link": {
                "rtt_ms": rec.rtt_ms,
                "rate_mbit": rec.rate_mbit,
                "cut_at_s": rec.cut.map(|c| c.0),
                "cut_for_s": rec.cut.map(|c| c.1),
            },
            "cores": plan.cpu_split.as_ref().map(|c| json!({"guest": c.guest, "host": c.host})),
            "migration": {
                "id": m["id"],
                "started_after_link_up_s": rec.migrate_at.duration_since(rec.link_up).as_secs_f64(),
                "total_s": m["elapsed_s"],
                "phases": self.phases.iter().map(|p| json!({
                    "phase": p.name, "start_s": p.start_s, "duration_s": p.end_s - p.start_s,
                })).collect::<Vec<_>>(),
            },
            "downtime": {
                "guest_ms": self.gap.map(|g| (g.seconds * 1e3).round()),
                "guest_gap_before_i": self.gap.map(|g| g.before_i),
                "guest_gap_after_i": self.gap.map(|g| g.after_i),
                "guest_gap_at_s": self.gap.map(|g| g.start_s),
                "guest_switchover_ms": self.switchover_gap.map(|g| (g.seconds * 1e3).round()),
                "guest_stopped_ms": self.switchover_gap.map(|g| (g.stopped_s() * 1e3).round()),
                "vmm_ms": m["vmm_downtime_ms"],
                "switchover_ms": m["switchover_ms"],
                "at_stop": m["at_stop"],
            },
            "bytes": m["bytes"],
            "wire": wire_json(rec),
            "timeline": {"columns": m["timeline_columns"], "rows": m["timeline"]},
            "heartbeat_bins": heartbeat_bins(rec, self.phases.last().map_or(0.0, |p| p.end_s)),
            "system_detail": rec.system_detail,
            "memory_phase": self.memory_phase.map(|(s, b, u)| json!({
                "duration_s": s, "bytes_delivered": b.round(), "link_utilization": u,
            })),
            "workload": {
                "heartbeats_per_s_before": self.rates.0,
                "heartbeats_per_s_during": self.rates.1,
                "heartbeats_per_s_memory_phase": self.rates.2,
                "slowdown_pct": self.slowdown_pct(),
                "heartbeats_source": rec.src_heartbeats.len(),
                "heartbeats_destination": rec.dst_heartbeats.len(),
            },
            "throttle": {
                "actuator": m["throttle"]["actuator"],
                "peak_asked_pct": self.throttle_peak.0,
                "peak_applied_pct": self.throttle_peak.1,
                "integral_pct_s": (self.throttle_integral_pct_s * 10.0).round() / 10.0,
                "disk_cap_min_bytes_per_s": self.disk_cap_min,
            },
            "counter": {
                "source_last_i": src_last,
                "split_heartbeat_i": rec.split_heartbeat,
                "destination_first_i": dst_first,
            },
            "guest": {
                "verdict": rec.verdict.as_ref().map(|v| match v {
                    Verdict::Pass => "PASS".to_owned(),
                    Verdict::Fail(why) => format!("FAIL {why}"),
                }),
                "migrate_iterations": r.get("migrate_iterations"),
                "blocks_checked": r.get("blocks_checked"),
                "blocks_bad": r.get("blocks_bad"),
                "md5_region": r.get("md5_region"),
                "dma_refreshes": r.get("dma_refreshes"),
                "dma_ok": r.get("dma_ok"),
                "dma_from_cache": r.get("dma_from_cache"),
                "md5_dma": r.get("md5_dma"),
            },
            "host_md5_region": rec.host_md5,
            "host_md5_dma": rec.host_md5_dma,
            "run_states": rec.run_states.as_ref().map(|(s, d)| json!({"source": s, "destination": d})),
            "checks": self.checks.iter().map(|c| json!({
                "name": c.name, "passed": c.passed, "detail": c.detail,
            })).collect::<Vec<_>>(),
            "workload_s": plan.workload_s,
        })
    }

    /// The report as one JSON object, with where the chart and (if kept) the work folder are.
    pub fn json(&self, svg: &Path, workdir: Option<&Path>) -> Value {
        let mut json = self.json.clone();
        json["svg"] = json!(svg.display().to_string());
        json["workdir"] = json!(workdir.map(|p| p.display().to_string()));
        json
    }

    /// The report for a person.
    pub fn text(&self, svg: &Path) -> String {
        let j = &self.json;
        let mut out = String::from("\n== report\n");
        let mut line = |label: &str, value: String| {
            let _ = writeln!(out, "{label:<19}{value}");
        };
        let outcome = match self.outcome.as_str() {
            "done" => "committed: the VM runs on the destination".to_owned(),
            "rolled-back" => "rolled back: the VM runs on the source again".to_owned(),
            other => other.to_owned(),
        };
        let error = j["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        line("outcome", format!("{outcome}{error}"));
        let phases: Vec<String> = self
            .phases
            .iter()
            .filter(|p| p.end_s > p.start_s)
            .map(|p| format!("{} {:.1} s", p.name, p.end_s - p.start_s))
            .collect();
        let total = j["migration"]["total_s"]
            .as_f64()
            .map_or("-".into(), format_duration);
        line("migration time", format!("{total} ({})", phases.join(", ")));
        line("downtime, guest", match self.switchover_gap {
            Some(g) => format!(
                "{:.0} ms from the source's last heartbeat (i={}) to the destination's first (i={})",
                g.seconds * 1e3, g.before_i, g.after_i
            ),
            None => "-".into(),
        });
        if let Some(g) = self.switchover_gap {
            line(
                "",
                format!(
                    "the VM stood still {:.0} ms of it: the guest's clock moved {:.0} ms \
                     between those heartbeats",
                    g.stopped_s() * 1e3,
                    g.guest_s * 1e3
                ),
            );
        }
        if let Some(g) = self.gap {
            let same = self
                .switchover_gap
                .is_some_and(|s| s.before_i == g.before_i);
            line(
                "",
                if same {
                    "(the longest silence between heartbeats of the whole run)".into()
                } else {
                    format!(
                        "the longest silence between heartbeats of the whole run: {:.0} ms \
                     (i={} to i={}, {:.1} s after migrate)",
                        g.seconds * 1e3,
                        g.before_i,
                        g.after_i,
                        g.start_s
                    )
                },
            );
        }
        let ms = |v: &Value| v.as_f64().map_or("-".into(), |v| format!("{v:.0} ms"));
        line(
            "downtime, QEMU",
            format!("{} (QEMU's own measure)", ms(&j["downtime"]["vmm_ms"])),
        );
        let (label, held) = match j["system"].as_str() {
            Some("strait") => (
                "downtime, strait",
                "switchover: VM stopped at pre-switchover until the destination committed",
            ),
            _ => (
                "downtime, held",
                "VM stopped at pre-switchover until the destination QEMU ran: the mirror's \
                 completion, QEMU's last pages, nbd-server-stop, cont",
            ),
        };
        line(
            label,
            format!("{} ({held})", ms(&j["downtime"]["switchover_ms"])),
        );
        if let Some(text) = at_stop_line(&j["downtime"]["at_stop"]) {
            line("at the stop", text);
        }
        let bytes = |k: &str| {
            j["bytes"][k]
                .as_u64()
                .map_or("-".into(), format_bytes_binary)
        };
        line(
            "bytes",
            format!(
                "memory {}, mirror {}, bulk {}",
                bytes("memory"),
                bytes("mirror"),
                bytes("bulk")
            ),
        );
        line(
            "link utilization",
            match self.memory_phase {
                Some((s, b, u)) => format!(
                    "{:.0}% of {} Mbit/s during the memory phase ({} in {s:.1} s)",
                    u * 100.0,
                    j["link"]["rate_mbit"],
                    format_bytes_binary(b as u64)
                ),
                None => "-".into(),
            },
        );
        let wire = &j["wire"];
        line(
            "on the wire",
            match (wire["a_to_b_bytes"].as_u64(), wire["b_to_a_bytes"].as_u64()) {
                (Some(a), Some(b)) => format!(
                    "{} source to destination, {} back, during the migration (IP bytes the \
                     link delivered)",
                    format_bytes_binary(a),
                    format_bytes_binary(b)
                ),
                _ => "-".into(),
            },
        );
        let rate = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.0}/s"));
        line(
            "workload",
            format!(
                "{} heartbeats before the migration, {} during it ({} in the memory phase){}",
                rate(self.rates.0),
                rate(self.rates.1),
                rate(self.rates.2),
                self.slowdown_pct()
                    .map(|s| format!(": {s:.0}% slower"))
                    .unwrap_or_default()
            ),
        );
        line(
            "throttle peak",
            format!(
                "{:.0}% asked, {:.0}% applied by {} ({:.1} s of the guest's CPU taken){}",
                self.throttle_peak.0,
                self.throttle_peak.1,
                match j["throttle"]["actuator"].as_str() {
                    Some("cgroup") => "the vCPU quota",
                    _ => "QEMU",
                },
                self.throttle_integral_pct_s / 100.0,
                self.disk_cap_min
                    .map(|c| format!(
                        "; the guest's disk writes capped at {}/s at the lowest",
                        format_bytes_binary(c as u64)
                    ))
                    .unwrap_or_default()
            ),
        );
        out.push_str("checks\n");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if c.passed { "pass" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let _ = write!(out, "chart              {}", svg.display());
        out
    }
}

/// What the link delivered during the migration, per direction, and its rate over the
/// whole run (from wanem's counters: IP bytes, so TLS, TCP and NBD framing included).
fn wire_json(rec: &Recording) -> Value {
    let (a_to_b, b_to_a) = rec.wire_during.map_or((None, None), |(before, after)| {
        (
            Some(after.a_to_b_bytes.saturating_sub(before.a_to_b_bytes)),
            Some(after.b_to_a_bytes.saturating_sub(before.b_to_a_bytes)),
        )
    });
    let rows: Vec<Value> = rec
        .wire
        .windows(2)
        .filter_map(|pair| {
            let dt = pair[1].at.checked_duration_since(pair[0].at)?.as_secs_f64();
            (dt > 0.0).then(|| {
                let rate = |a: u64, b: u64| (b.saturating_sub(a) as f64 / dt).round();
                json!([
                    (rec.since_migrate_s(pair[1].at) * 1e3).round() / 1e3,
                    rate(pair[0].a_to_b_bytes, pair[1].a_to_b_bytes),
                    rate(pair[0].b_to_a_bytes, pair[1].b_to_a_bytes),
                ])
            })
        })
        .collect();
    json!({
        "a_to_b_bytes": a_to_b,
        "b_to_a_bytes": b_to_a,
        "total_bytes": a_to_b.zip(b_to_a).map(|(a, b)| a + b),
        "timeline_columns": ["t_s", "a_to_b_bytes_per_s", "b_to_a_bytes_per_s"],
        "timeline": rows,
    })
}

/// Heartbeats per bin on each console, from before `migrate` to after the migration's
/// end (`end_s`): what a chart that overlays runs draws.
fn heartbeat_bins(rec: &Recording, end_s: f64) -> Value {
    let start_s = -HEARTBEAT_BINS_BEFORE_S;
    let span_s = (end_s + HEARTBEAT_BINS_AFTER_S - start_s).max(HEARTBEAT_BIN_S);
    let bins = ((span_s / HEARTBEAT_BIN_S).ceil() as usize).min(HEARTBEAT_BINS_MAX);
    let counts = |heartbeats: &[Heartbeat]| {
        let mut counts = vec![0u32; bins];
        for h in heartbeats {
            let bin = (rec.since_migrate_s(h.arrived) - start_s) / HEARTBEAT_BIN_S;
            if bin >= 0.0 && (bin as usize) < bins {
                counts[bin as usize] += 1;
            }
        }
        counts
    };
    json!({
        "bin_s": HEARTBEAT_BIN_S,
        "start_s": start_s,
        "source": counts(&rec.src_heartbeats),
        "destination": counts(&rec.dst_heartbeats),
    })
}

/// The source's last heartbeat and the destination's first.
fn counter_ends(rec: &Recording) -> (Option<u64>, Option<u64>) {
    (
        rec.src_heartbeats.last().map(|h| h.i),
        rec.dst_heartbeats.first().map(|h| h.i),
    )
}

/// The longest silence between consecutive heartbeats of both consoles merged by arrival.
fn largest_gap(rec: &Recording) -> Option<Gap> {
    let mut merged: Vec<&Heartbeat> = rec
        .src_heartbeats
        .iter()
        .chain(&rec.dst_heartbeats)
        .collect();
    merged.sort_by_key(|h| h.arrived);
    merged
        .windows(2)
        .map(|pair| Gap {
            seconds: pair[1]
                .arrived
                .duration_since(pair[0].arrived)
                .as_secs_f64(),
            guest_s: pair[1].uptime_s - pair[0].uptime_s,
            start_s: rec.since_migrate_s(pair[0].arrived),
            before_i: pair[0].i,
            after_i: pair[1].i,
        })
        .max_by(|a, b| a.seconds.total_cmp(&b.seconds))
}

/// The silence from the source's last heartbeat to the destination's first.
fn switchover_gap(rec: &Recording) -> Option<Gap> {
    let (last, first) = (rec.src_heartbeats.last()?, rec.dst_heartbeats.first()?);
    Some(Gap {
        seconds: first
            .arrived
            .saturating_duration_since(last.arrived)
            .as_secs_f64(),
        guest_s: first.uptime_s - last.uptime_s,
        start_s: rec.since_migrate_s(last.arrived),
        before_i: last.i,
        after_i: first.i,
    })
}

/// Heartbeats per second that arrived between two times (seconds since the migration's
/// start) on either console; `None` for an empty interval.
fn rate_between(rec: &Recording, from_s: f64, to_s: f64) -> Option<f64> {
    if to_s <= from_s {
        return None;
    }
    let count = rec
        .src_heartbeats
        .iter()
        .chain(&rec.dst_heartbeats)
        .map(|h| rec.since_migrate_s(h.arrived))
        .filter(|t| (from_s..to_s).contains(t))
        .count();
    Some(count as f64 / (to_s - from_s))
}

/// The memory phase's seconds, the bytes the link delivered in it (all classes), and
/// their share of the link's rate. Each row's rates cover the interval since the previous
/// row, so the integral is exact at the timeline's resolution.
fn link_use(rows: &[Row], rate_mbit: u32) -> Option<(f64, f64, f64)> {
    let (mut seconds, mut bytes) = (0.0, 0.0);
    for pair in rows.windows(2) {
        if pair[1].phase != MEMORY_PHASE {
            continue;
        }
        let dt = pair[1].t_s - pair[0].t_s;
        let r = &pair[1];
        seconds += dt;
        bytes += dt * (r.memory_bytes_per_s + r.mirror_bytes_per_s + r.bulk_bytes_per_s);
    }
    (seconds > 0.0).then(|| {
        let link_bytes = seconds * f64::from(rate_mbit) * 1e6 / 8.0;
        (seconds, bytes, bytes / link_bytes)
    })
}

/// The counter went on without a step lost or repeated: the destination's first heartbeat
/// follows the source's last, or the one after it if the heartbeat between them was split
/// between the consoles (printed as the vCPUs stopped: its start on the source, its rest on
/// the destination, neither a whole line alone).
fn counter_continued(src_last: Option<u64>, dst_first: Option<u64>, split: Option<u64>) -> bool {
    match (src_last, dst_first) {
        (Some(last), Some(first)) => {
            Some(first) == last.checked_add(1)
                || (split.is_some()
                    && split == last.checked_add(1)
                    && Some(first) == last.checked_add(2))
        }
        _ => false,
    }
}

/// The workload's DMA check, if the guest ran it (`scripts/guest/init.sh`, migrate): a
/// 1 MiB range the guest rewrote with O_DIRECT and read back through its page cache, so
/// those pages of guest RAM were written only by the disk backend and a migration carries
/// them only through the backend's dirty log. At the end the guest reads the range from its
/// cache again: `dma_ok=1` if it holds the last data written; the destination image must
/// hold it too.
fn dma_check(rec: &Recording) -> Option<Check> {
    let r = &rec.guest_results;
    let refreshes = r.get("dma_refreshes")?;
    let guest_md5 = r.get("md5_dma").map(String::as_str);
    let passed = refreshes != "0"
        && r.get("dma_ok").map(String::as_str) == Some("1")
        && guest_md5.is_some()
        && guest_md5 == rec.host_md5_dma.as_deref();
    Some(Check {
        name: "dma_pages",
        passed,
        detail: format!(
            "pages only the disk backend wrote (a 1 MiB range refreshed {refreshes} times) hold the \
             last data in the guest's cache on the destination: dma_ok={} (read from the cache: {}); \
             its md5 {} in the guest, {} in the destination image",
            r.get("dma_ok").map_or("?", String::as_str),
            r.get("dma_from_cache").map_or("?", String::as_str),
            guest_md5.unwrap_or("none"),
            rec.host_md5_dma.as_deref().unwrap_or("none")
        ),
    })
}

fn checks(rec: &Recording) -> Vec<Check> {
    let m = &rec.migration;
    let mut checks = vec![Check {
        name: "committed",
        passed: rec.committed(),
        detail: match m["error"].as_str() {
            Some(e) => format!("the migration ended {}: {e}", m["phase"]),
            None => format!("the migration ended {}", m["phase"]),
        },
    }];
    if !rec.committed() {
        return checks;
    }
    let (src_state, dst_state) = rec.run_states.clone().unwrap_or_default();
    checks.push(Check {
        name: "one_side_runs",
        passed: src_state == "postmigrate" && dst_state == "running",
        detail: format!("source QEMU {src_state}, destination QEMU {dst_state}"),
    });
    let (src_last, dst_first) = counter_ends(rec);
    let continued = counter_continued(src_last, dst_first, rec.split_heartbeat);
    let show = |i: Option<u64>| i.map_or("none".into(), |i| i.to_string());
    checks.push(Check {
        name: "counter_continued",
        passed: continued,
        detail: format!(
            "the source's last heartbeat i={}{}, the destination's first i={}",
            show(src_last),
            rec.split_heartbeat
                .map(|i| format!(" (i={i} split between the consoles)"))
                .unwrap_or_default(),
            show(dst_first)
        ),
    });
    let r = &rec.guest_results;
    let blocks_bad = r.get("blocks_bad").map(String::as_str);
    checks.push(Check {
        name: "blocks_intact",
        passed: passed(rec.verdict.as_ref()) && blocks_bad == Some("0"),
        detail: match (&rec.after_error, &rec.verdict) {
            (Some(e), _) => e.clone(),
            (None, None) => "no verdict from the guest".into(),
            (None, Some(v)) => format!(
                "the guest read back {} blocks on the destination after {} steps: blocks_bad={}, verdict {:?}",
                r.get("blocks_checked").map_or("?", String::as_str),
                r.get("migrate_iterations").map_or("?", String::as_str),
                blocks_bad.unwrap_or("?"),
                v
            ),
        },
    });
    if let Some(check) = dma_check(rec) {
        checks.push(check);
    }
    let guest_md5 = r.get("md5_region");
    checks.push(Check {
        name: "md5_match",
        passed: guest_md5.is_some() && guest_md5 == rec.host_md5.as_ref(),
        detail: format!(
            "md5 of the region the guest read: {}; of the same range of the destination image: {}",
            guest_md5.map_or("none", String::as_str),
            rec.host_md5.as_deref().unwrap_or("none")
        ),
    });
    checks.extend(rec.extra_checks.iter().cloned());
    checks
}

/// What stood between the source VMM and the destination as the VM stopped, in bytes and
/// in milliseconds of the link's rate: `None` when the engine did not report it.
fn at_stop_line(a: &Value) -> Option<String> {
    let queued = a["memory_queued_bytes"].as_u64()?;
    let rate = a["link_bytes_per_s"].as_u64().filter(|r| *r > 0)?;
    let drain_ms = |b: u64| b as f64 * 1e3 / rate as f64;
    let mut text = format!(
        "memory queued on the link {} ({:.0} ms at {}/s), mirror backlog {}",
        format_bytes_binary(queued),
        drain_ms(queued),
        format_bytes_binary(rate),
        format_bytes_binary(a["mirror_backlog_bytes"].as_u64().unwrap_or(0)),
    );
    if let Some(after) = a["vmm_bytes_after"].as_u64() {
        text += &format!(
            "; QEMU sent {} after it ({:.0} ms)",
            format_bytes_binary(after),
            drain_ms(after)
        );
    }
    if let Some(limit) = a["vmm_downtime_limit_ms"].as_u64().filter(|l| *l > 0) {
        text += &format!(", aiming for {limit} ms");
    }
    Some(text)
}

/// The applied throttle integrated over the timeline (each sample holds until the next),
/// in percent-seconds.
fn throttle_integral(rows: &[Row]) -> f64 {
    rows.windows(2)
        .map(|w| w[0].applied_throttle_pct * (w[1].t_s - w[0].t_s).max(0.0))
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_integral_holds_each_sample_until_the_next() {
        let m = json!({
            "timeline_columns": ["t_s", "applied_throttle_pct"],
            "timeline": [[0.0, 0], [0.5, 50], [2.5, 90], [3.0, 0], [10.0, 0]],
        });
        // 50% for 2 s, then 90% for 0.5 s.
        assert!((throttle_integral(&timeline(&m)) - 145.0).abs() < 1e-9);
        assert_eq!(throttle_integral(&[]), 0.0);
    }

    #[test]
    fn the_timeline_is_read_by_column_name() {
        let m = json!({
            "timeline_columns": ["t_s", "phase", "memory_bytes_per_s", "throttle_pct"],
            "timeline": [[0.5, "disk", 0, 0], [1.0, "memory", 1000, 40]],
        });
        let rows = timeline(&m);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].phase, "memory");
        assert_eq!(rows[1].memory_bytes_per_s, 1000.0);
        assert_eq!(rows[1].throttle_pct, 40.0);
        assert_eq!(rows[1].bulk_bytes_per_s, 0.0);
    }

    #[test]
    fn the_vm_stood_still_for_the_silence_less_the_guests_own_time() {
        let gap = |seconds, guest_s| Gap {
            seconds,
            guest_s,
            start_s: 0.0,
            before_i: 1,
            after_i: 2,
        };
        // 645 ms of silence, 190 ms of it on the guest's clock (a throttled guest before
        // the stop): the VM stood still 455 ms.
        assert!((gap(0.645, 0.190).stopped_s() - 0.455).abs() < 1e-9);
        // A guest clock that went back counts as none: the whole silence.
        assert_eq!(gap(0.5, -0.1).stopped_s(), 0.5);
        // A clock that moved more than the host's (coarse uptime): never below zero.
        assert_eq!(gap(0.02, 0.03).stopped_s(), 0.0);
    }

    #[test]
    fn the_queue_at_the_stop_is_shown_in_milliseconds_of_the_link() {
        let a = json!({
            "memory_queued_bytes": 25 * 1024 * 1024, "memory_in_flight_bytes": 0,
            "mirror_backlog_bytes": 4096, "link_bytes_per_s": 25 * 1024 * 1024,
            "vmm_bytes": 1, "vmm_bytes_after": 5 * 1024 * 1024, "vmm_downtime_limit_ms": 180,
        });
        assert_eq!(
            at_stop_line(&a).unwrap(),
            "memory queued on the link 25.00 MiB (1000 ms at 25.00 MiB/s), mirror backlog \
             4.00 KiB; QEMU sent 5.00 MiB after it (200 ms), aiming for 180 ms"
        );
        // Not reported (QEMU's own migration), or no rate measured: no line.
        assert_eq!(at_stop_line(&Value::Null), None);
        assert_eq!(
            at_stop_line(&json!({"memory_queued_bytes": 1, "link_bytes_per_s": 0})),
            None
        );
    }

    #[test]
    fn link_use_integrates_the_memory_phase_only() {
        let row = |t_s: f64, phase: &str, memory: f64| Row {
            t_s,
            phase: phase.into(),
            memory_bytes_per_s: memory,
            ..Row::default()
        };
        // 1 Mbit/s is 125,000 bytes/s; two seconds at the full rate.
        let rows = [
            row(0.0, "disk", 0.0),
            row(1.0, "memory", 125_000.0),
            row(2.0, "memory", 125_000.0),
            row(3.0, "switchover", 1e9),
        ];
        let (seconds, bytes, share) = link_use(&rows, 1).unwrap();
        assert_eq!((seconds, bytes), (2.0, 250_000.0));
        assert!((share - 1.0).abs() < 1e-9);
        assert_eq!(link_use(&rows[..1], 1), None);
    }

    #[test]
    fn a_heartbeat_split_between_the_consoles_is_found_only_when_split() {
        assert_eq!(split_heartbeat("STRAIT-HB i=12 u", "p=3.45\r"), Some(12));
        assert_eq!(split_heartbeat("STRAIT-H", "B i=12 up=3.45"), Some(12));
        // A source that ended with a whole line, and a destination that starts with one.
        assert_eq!(split_heartbeat("", "STRAIT-HB i=12 up=3.45"), None);
        assert_eq!(split_heartbeat("\r", "STRAIT-HB i=12 up=3.45"), None);
        assert_eq!(split_heartbeat("noise", "STRAIT-HB i=12 up=3.45"), None);
        assert_eq!(split_heartbeat("STRAIT-HB i=12 u", "garbage"), None);
    }

    #[test]
    fn the_counter_continues_only_from_the_next_step() {
        assert!(counter_continued(Some(957), Some(958), None));
        assert!(counter_continued(Some(957), Some(958), Some(958)));
        assert!(counter_continued(Some(957), Some(959), Some(958)));
        assert!(!counter_continued(Some(957), Some(959), None));
        assert!(!counter_continued(Some(957), Some(959), Some(957)));
        assert!(!counter_continued(Some(957), Some(957), None));
        assert!(!counter_continued(Some(957), None, None));
        assert!(!counter_continued(Some(u64::MAX), Some(0), Some(0)));
    }

    #[test]
    fn phases_span_until_the_next_one() {
        let m = json!({"phases": [
            {"phase": "disk", "at_s": 0.0}, {"phase": "memory", "at_s": 2.5},
            {"phase": "done", "at_s": 9.0},
        ]});
        let spans = phase_spans(&m);
        assert_eq!(spans.len(), 3);
        assert_eq!((spans[0].start_s, spans[0].end_s), (0.0, 2.5));
        assert_eq!((spans[2].start_s, spans[2].end_s), (9.0, 9.0));
    }
}
