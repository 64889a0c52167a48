//! `strait demo`, the README's first command, run as a user runs it: the real binary boots
//! the test guest under QEMU, migrates it across `strait wanem` and prints its report as
//! JSON on the last line. The test checks the data, not the wording: the migration
//! committed, the guest's counter went on on the destination, every block it wrote is
//! there, the destination image holds what it read back, and the chart was written.
//!
//! The full run needs root (network namespaces) and QEMU: skipped with a loud message where
//! they are unusable, except under CI (env `CI` set), where that fails the test. The
//! missing-guest case needs neither.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strait_net::wanem::WanemConfig;

/// The guest's workload: boot and a 5 s baseline, the migration (about 12 s here, up to
/// 25 s on a loaded machine), and some time on the destination; keeps the test near a
/// minute.
const WORKLOAD_S: &str = "45";
/// The whole demo: the workload, the read-back, the setup; the demo bounds each of its own
/// waits well inside this, so reaching it means the demo hung.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);
/// A missing guest is found before anything starts.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often to look whether the demo exited.
const POLL: Duration = Duration::from_millis(50);

/// Every series the chart draws (its `data-series` names).
const SERIES: [&str; 10] = [
    "memory",
    "mirror",
    "bulk",
    "dirty",
    "disk-cap",
    "throttle",
    "throttle-applied",
    "backlog",
    "heartbeats-source",
    "heartbeats-destination",
];

/// Runs `strait demo ARGS` in `cwd`, killing it after `timeout`.
fn run_demo(args: &[&str], cwd: &Path, timeout: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = common::kill_with_parent(
        Command::new(env!("CARGO_BIN_EXE_strait"))
            .arg("demo")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .spawn()
    .unwrap();
    // Drained on threads so that a chatty demo never blocks on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let stdout = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("strait demo did not exit within {timeout:?} ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(POLL);
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, started.elapsed())
}

#[test]
fn strait_demo_without_a_guest_fails_at_once_and_says_why() {
    let dir = common::test_dir("demo-noguest");
    let (output, elapsed) = run_demo(&["--guest", "/nonexistent"], dir.path(), PREFLIGHT_TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/vmlinuz") && stderr.contains("scripts/guest/build.sh"),
        "the message should name the missing file and how to build it: {stderr}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(
        !dir.path().join("strait-demo.svg").exists(),
        "nothing ran, so no chart"
    );
}

/// True if network namespaces can be made here (root); see the module doc for CI.
fn wanem_usable() -> bool {
    common::wanem_or_skip(WanemConfig::default()).is_some_and(|wanem| {
        wanem.stop();
        true
    })
}

#[test]
fn qemu_strait_demo_migrates_the_guest_across_wanem_and_reports_it() {
    if !common::require_qemu() || !wanem_usable() {
        return;
    }
    let guest = common::guest_artifacts();
    let guest_dir = guest.kernel.parent().unwrap().to_str().unwrap().to_owned();
    let dir = common::test_dir("demo");
    let (svg, workdir) = (dir.path().join("chart.svg"), dir.path().join("work"));
    let args = [
        "--guest",
        &guest_dir,
        "--workload-s",
        WORKLOAD_S,
        "--svg",
        svg.to_str().unwrap(),
        "--workdir",
        workdir.to_str().unwrap(),
        "--json",
    ];
    let (output, elapsed) = run_demo(&args, dir.path(), DEMO_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("strait demo took {elapsed:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
    if !output.status.success() {
        // The engines' and QEMUs' logs are in it: a failure here is kept to be read.
        let kept = dir.keep();
        panic!(
            "exit status {}; the work folder is kept: {}",
            output.status,
            kept.display()
        );
    }

    // A progress line per second while it migrates, with the guest's heartbeats.
    let progress = stdout
        .lines()
        .filter(|l| l.contains(" s memory ") && l.contains("heartbeats/s"))
        .count();
    assert!(progress >= 1, "no progress lines in the memory phase");

    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["outcome"], "done", "{report}");
    assert_eq!(report["passed"], true, "{report}");
    for check in report["checks"].as_array().unwrap() {
        assert_eq!(check["passed"], true, "{check}");
    }
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "committed",
            "one_side_runs",
            "counter_continued",
            "blocks_intact",
            "dma_pages",
            "md5_match"
        ]
    );

    // The counter went on on the destination: the next step, or the one after a heartbeat
    // line split between the consoles.
    let counter = &report["counter"];
    let last = counter["source_last_i"].as_u64().unwrap();
    let first = counter["destination_first_i"].as_u64().unwrap();
    let split = counter["split_heartbeat_i"].as_u64();
    assert!(
        first == last + 1 || (split == Some(last + 1) && first == last + 2),
        "{counter}"
    );
    // Every block the guest wrote is there, and the destination image holds it.
    let guest = &report["guest"];
    assert_eq!(guest["verdict"], "PASS", "{guest}");
    assert_eq!(guest["blocks_bad"], "0", "{guest}");
    assert_eq!(guest["blocks_checked"], "1024", "{guest}");
    assert_eq!(report["host_md5_region"], guest["md5_region"], "{report}");
    // Pages only the disk backend wrote arrived (the guest's DMA check).
    assert_eq!(guest["dma_ok"], "1", "{guest}");
    assert_ne!(guest["dma_refreshes"], "0", "{guest}");
    assert_eq!(report["host_md5_dma"], guest["md5_dma"], "{report}");
    assert_eq!(report["run_states"]["source"], "postmigrate");
    assert_eq!(report["run_states"]["destination"], "running");

    // The numbers the report is about are there and plausible.
    assert!(report["bytes"]["memory"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["bytes"]["bulk"].as_u64().unwrap() >= 64 << 20,
        "{report}"
    );
    let downtime = &report["downtime"];
    let switchover_gap_ms = downtime["guest_switchover_ms"].as_f64().unwrap();
    // About a second is the product's target; a loaded 2-core machine running two TCG
    // guests and the emulator gets a generous margin (as migration_e2e.rs does).
    assert!(switchover_gap_ms < 10_000.0, "{downtime}");
    assert!(downtime["guest_ms"].as_f64().unwrap() >= switchover_gap_ms);
    assert!(downtime["vmm_ms"].as_u64().is_some(), "{downtime}");
    assert!(downtime["switchover_ms"].as_f64().is_some(), "{downtime}");
    let utilization = report["memory_phase"]["link_utilization"].as_f64().unwrap();
    assert!(utilization > 0.0 && utilization <= 1.1, "{report}");
    assert!(
        report["workload"]["heartbeats_per_s_before"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let phases: Vec<&str> = report["migration"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "disk",
            "offer",
            "memory",
            "switchover",
            "completing",
            "done"
        ]
    );

    // The chart: where the report says, an SVG with every series and the phases named.
    assert_eq!(report["svg"], svg.to_str().unwrap());
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg"),
        "{}",
        &chart[..chart.len().min(200)]
    );
    assert!(chart.trim_end().ends_with("</svg>"));
    for series in SERIES {
        assert!(
            chart.contains(&format!("<polyline data-series=\"{series}\"")),
            "no {series} series"
        );
    }
    for phase in ["disk", "memory", "switchover", "done"] {
        assert!(
            chart.contains(&format!(">{phase}</text>")),
            "no {phase} label"
        );
    }
    // Each polyline holds numbers only ("x,y" pairs).
    for points in chart.split("points=\"").skip(1) {
        let points = &points[..points.find('"').unwrap()];
        assert!(
            points
                .split_whitespace()
                .all(|p| p.split(',').all(|v| v.parse::<f64>().is_ok())),
            "{points}"
        );
    }
}

#[test]
fn strait_demo_copy_mode_without_the_qemu_system_is_refused_at_once() {
    let dir = common::test_dir("demo-copymode");
    let (output, elapsed) = run_demo(
        &["--copy-mode", "write-blocking", "--guest", "/nonexistent"],
        dir.path(),
        PREFLIGHT_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--copy-mode") && stderr.contains("--system qemu"),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

/// The QEMU peer's run: a short RTT keeps it near a minute (its memory phase is bound by
/// the link's rate, not the RTT); the workload covers boot, baseline, a migration of
/// about 30 s here and the destination.
const PEER_WORKLOAD_S: &str = "60";
const PEER_RTT_MS: &str = "20";

#[test]
fn qemu_strait_demo_system_qemu_migrates_the_guest_with_qemus_own_migration() {
    if !common::require_qemu() || !wanem_usable() {
        return;
    }
    let guest = common::guest_artifacts();
    let guest_dir = guest.kernel.parent().unwrap().to_str().unwrap().to_owned();
    let dir = common::test_dir("demo-peer");
    let (svg, workdir) = (dir.path().join("chart.svg"), dir.path().join("work"));
    let args = [
        "--system",
        "qemu",
        "--copy-mode",
        "background",
        "--rtt-ms",
        PEER_RTT_MS,
        "--guest",
        &guest_dir,
        "--workload-s",
        PEER_WORKLOAD_S,
        "--svg",
        svg.to_str().unwrap(),
        "--workdir",
        workdir.to_str().unwrap(),
        "--json",
    ];
    let (output, elapsed) = run_demo(&args, dir.path(), DEMO_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("strait demo --system qemu took {elapsed:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(output.status.success(), "exit status {}", output.status);

    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["system"], "qemu-background", "{report}");
    assert_eq!(report["outcome"], "done", "{report}");
    assert_eq!(report["survived"], true, "{report}");
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|c| assert_eq!(c["passed"], true, "{c}"))
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "committed",
            "one_side_runs",
            "counter_continued",
            "blocks_intact",
            "dma_pages",
            "md5_match",
            "image_copied"
        ]
    );
    let phases: Vec<&str> = report["migration"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["disk", "memory", "switchover", "completing", "done"]
    );
    // The guest paused at the switchover: a heartbeat gap, and QEMU's own figure.
    let downtime = &report["downtime"];
    let gap_ms = downtime["guest_switchover_ms"].as_f64().unwrap();
    assert!(gap_ms > 0.0 && gap_ms < 30_000.0, "{downtime}");
    assert!(downtime["vmm_ms"].as_u64().unwrap() > 0, "{downtime}");
    assert!(
        downtime["switchover_ms"].as_f64().unwrap() > 0.0,
        "{downtime}"
    );
    // The mirror copied the whole disk, QEMU sent the RAM, and the link carried both.
    let bytes = &report["bytes"];
    assert!(bytes["bulk"].as_u64().unwrap() >= 64 << 20, "{bytes}");
    assert!(bytes["memory"].as_u64().unwrap() > 0, "{bytes}");
    let wire = report["wire"]["a_to_b_bytes"].as_u64().unwrap();
    let sent = bytes["bulk"].as_u64().unwrap() + bytes["memory"].as_u64().unwrap();
    assert!(
        wire >= sent,
        "the link delivered {wire} bytes, less than the {sent} sent"
    );
    assert!(!report["wire"]["timeline"].as_array().unwrap().is_empty());
    assert!(!report["timeline"]["rows"].as_array().unwrap().is_empty());
    let total_s = report["migration"]["total_s"].as_f64().unwrap();
    assert!(total_s > 0.0, "{report}");
    assert_eq!(
        report["system_detail"]["query_migrate"]["status"],
        "completed"
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("qemu-background") && chart.contains(">memory</text>"));
}
