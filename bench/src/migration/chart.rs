//! One SVG that overlays the systems' migration timelines: per condition (the sweep's
//! highest RTT, without and with the cut), what the link carried from source to
//! destination (MB/s) and the guest's heartbeats per second, one line per system, with
//! each system's memory phase start (dotted) and end of migration (dashed) marked and its
//! downtime in the legend. One representative run per system: the committed run with the
//! median total time.

use std::fmt::Write as _;

use serde_json::Value;

use super::{cuts, rtts, select, systems, Run};

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const PANEL_HEIGHT: f64 = 140.0;
/// Room between panels for the next panel's title and legend.
const PANEL_GAP: f64 = 56.0;
const BOTTOM: f64 = 40.0;
const BYTES_PER_MB: f64 = 1e6;
/// A colour per system, in the order the tables list them; more systems reuse them.
const COLOURS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
/// About this many ticks on an axis.
const TICKS: f64 = 8.0;
/// Heartbeats are drawn per second: the reports' 0.25 s bins summed four at a time (short
/// bins show a pause best, but several systems' lines at that resolution are a blur).
const HEARTBEAT_WINDOW_S: f64 = 1.0;

/// The run shown for a system: the committed one with the median total time, else any.
fn representative<'a>(runs: &[&'a Run]) -> Option<&'a Run> {
    let mut committed: Vec<&Run> = runs.iter().copied().filter(|r| r.survived).collect();
    committed.sort_by(|a, b| a.total_s().total_cmp(&b.total_s()));
    committed
        .get(committed.len() / 2)
        .copied()
        .or(runs.iter().copied().find(|r| !r.report.is_null()))
}

/// A series' points: the link's A-to-B rate (MB/s) over time.
fn wire_points(report: &Value) -> Vec<(f64, f64)> {
    report["wire"]["timeline"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r[0].as_f64()?, r[1].as_f64()? / BYTES_PER_MB)))
                .collect()
        })
        .unwrap_or_default()
}

/// Heartbeats per second of both consoles, bin by bin.
fn heartbeat_points(report: &Value) -> Vec<(f64, f64)> {
    let bins = &report["heartbeat_bins"];
    let (Some(bin_s), Some(start_s)) = (bins["bin_s"].as_f64(), bins["start_s"].as_f64()) else {
        return Vec::new();
    };
    let counts = |side: &str| -> Vec<f64> {
        bins[side]
            .as_array()
            .map(|c| c.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_default()
    };
    let (src, dst) = (counts("source"), counts("destination"));
    let per_window = ((HEARTBEAT_WINDOW_S / bin_s).round() as usize).max(1);
    let bins = src.len().max(dst.len());
    (0..bins.div_ceil(per_window))
        .map(|w| {
            let range = w * per_window..((w + 1) * per_window).min(bins);
            let width_s = range.len() as f64 * bin_s;
            let centre_s = start_s + (range.start as f64 + range.len() as f64 / 2.0) * bin_s;
            let n: f64 = range
                .map(|i| src.get(i).unwrap_or(&0.0) + dst.get(i).unwrap_or(&0.0))
                .sum();
            (centre_s, n / width_s)
        })
        .collect()
}

fn phase_start(report: &Value, name: &str) -> Option<f64> {
    report["migration"]["phases"]
        .as_array()?
        .iter()
        .find(|p| p["phase"] == name)?["start_s"]
        .as_f64()
}

fn nice_step(range: f64) -> f64 {
    let raw = (range / TICKS).max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

struct Frame {
    top: f64,
    x0: f64,
    x1: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, t: f64) -> f64 {
        LEFT + (t.clamp(self.x0, self.x1) - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        self.top + PANEL_HEIGHT - v.clamp(0.0, self.y_max) / self.y_max * PANEL_HEIGHT
    }
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, weight: &str, content: &str) {
    let escaped = content
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-weight="{weight}">{escaped}</text>"#
    );
}

/// A system's line in a panel: its label, colour, points and the report it comes from
/// (for the phase marks).
type Line<'a> = (String, &'a str, Vec<(f64, f64)>, &'a Value);

/// One panel: frame, ticks, title, a line per system and its phase marks.
fn panel(out: &mut String, frame: &Frame, title: &str, lines: &[Line]) {
    let (top, bottom, right) = (frame.top, frame.top + PANEL_HEIGHT, WIDTH - RIGHT);
    text(out, LEFT, top - 26.0, "start", "bold", title);
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top:.1}" width="{:.1}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##,
        right - LEFT
    );
    let step = nice_step(frame.y_max);
    let mut v = 0.0;
    while v <= frame.y_max * (1.0 + 1e-9) {
        let y = frame.y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eee"/>"##
        );
        text(
            out,
            LEFT - 6.0,
            y + 4.0,
            "end",
            "normal",
            &format!("{v:.0}"),
        );
        v += step;
    }
    let step = nice_step(frame.x1 - frame.x0);
    let mut t = (frame.x0 / step).ceil() * step;
    while t <= frame.x1 {
        let x = frame.x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#eee"/>"##
        );
        text(
            out,
            x,
            bottom + 14.0,
            "middle",
            "normal",
            &format!("{:.0}", t + 0.0),
        );
        t += step;
    }
    let mut legend_x = LEFT;
    for (label, colour, points, report) in lines {
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"/>"#,
            top - 12.0,
            legend_x + 14.0,
            top - 12.0
        );
        text(out, legend_x + 18.0, top - 8.0, "start", "normal", label);
        legend_x += 26.0 + 6.2 * label.len() as f64;
        let pts: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", frame.x(*t), frame.y(*v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline data-series="{}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            label.split_whitespace().next().unwrap_or(""),
            pts.join(" ")
        );
        for (t, dash) in [
            (phase_start(report, "memory"), "2 3"),
            (report["migration"]["total_s"].as_f64(), "6 3"),
        ] {
            if let Some(t) = t {
                let x = frame.x(t);
                let _ = writeln!(
                    out,
                    r#"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="{colour}" stroke-dasharray="{dash}"/>"#
                );
            }
        }
    }
}

/// The chart, or `None` when no run has a report.
pub fn render(runs: &[Run]) -> Option<String> {
    let rtt = *rtts(runs).last()?;
    let systems = systems(runs);
    let mut panels = Vec::new();
    for cut in cuts(runs) {
        let chosen: Vec<(usize, &Run)> = systems
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, representative(&select(runs, s, rtt, cut))?)))
            .filter(|(_, r)| !r.report.is_null())
            .collect();
        if !chosen.is_empty() {
            panels.push((cut, chosen));
        }
    }
    if panels.is_empty() {
        return None;
    }
    let x1 = panels
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, r)| r.total_s()))
        .filter(|t| t.is_finite())
        .fold(10.0, f64::max)
        + 8.0;
    let (x0, x1) = (-5.0, x1.ceil());
    let count = panels.len() * 2;
    let height = TOP + count as f64 * (PANEL_HEIGHT + PANEL_GAP) - PANEL_GAP + BOTTOM;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    text(
        &mut out,
        LEFT,
        22.0,
        "start",
        "bold",
        &format!(
            "Live migration at {rtt} ms RTT: strait and QEMU's own (x: seconds since the start; dotted: memory phase starts; dashed: VM runs on the destination)"
        ),
    );
    let mut index = 0;
    for (cut, chosen) in &panels {
        let condition = if *cut == 0.0 {
            "no cut".to_owned()
        } else {
            format!("{cut} s link cut")
        };
        let wire: Vec<_> = chosen
            .iter()
            .map(|(i, r)| {
                let label = format!("{} (round {}, {:.1} s)", r.system, r.round, r.total_s());
                (
                    label,
                    COLOURS[i % COLOURS.len()],
                    wire_points(&r.report),
                    &r.report,
                )
            })
            .collect();
        let beats: Vec<_> = chosen
            .iter()
            .map(|(i, r)| {
                let label = format!(
                    "{} ({:.0} / {:.0} ms)",
                    r.system,
                    r.guest_switchover_ms(),
                    r.vmm_ms()
                );
                (
                    label,
                    COLOURS[i % COLOURS.len()],
                    heartbeat_points(&r.report),
                    &r.report,
                )
            })
            .collect();
        for (title, lines) in [
            (
                format!("{condition}: link, source to destination (MB/s)"),
                wire,
            ),
            (format!("{condition}: guest heartbeats per second (downtime: guest gap / QEMU's figure)"), beats),
        ] {
            let y_max = lines
                .iter()
                .flat_map(|l| l.2.iter().map(|p| p.1))
                .fold(1.0, f64::max)
                * 1.05;
            let frame = Frame {
                top: TOP + 30.0 + index as f64 * (PANEL_HEIGHT + PANEL_GAP),
                x0,
                x1,
                y_max,
            };
            panel(&mut out, &frame, &title, &lines);
            index += 1;
        }
    }
    out.push_str("</svg>\n");
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::parse_runs;
    use super::*;

    #[test]
    fn the_chart_overlays_one_run_per_system_and_condition() {
        let run = |system: &str, cut: f64, round: u64, total: f64| {
            serde_json::json!({
                "bench": {"round": round, "system": system, "rtt_ms": 214, "cut_for_s": cut},
                "outcome": "done", "survived": true, "passed": true,
                "migration": {"total_s": total, "phases": [{"phase": "memory", "start_s": 3.0}]},
                "downtime": {"guest_switchover_ms": 900.0, "vmm_ms": 700},
                "wire": {"timeline": [[0.5, 1e7, 1e5], [1.0, 2.5e7, 1e5]]},
                "heartbeat_bins": {"bin_s": 0.25, "start_s": -5.0, "source": [20, 20], "destination": [0, 5]},
            })
            .to_string()
        };
        let text = [
            run("strait", 0.0, 1, 12.0),
            run("strait", 0.0, 2, 14.0),
            run("qemu-background", 0.0, 1, 30.0),
            run("qemu-background", 3.0, 1, 33.0),
        ]
        .join("\n");
        let runs = parse_runs(&text).unwrap();
        let svg = render(&runs).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Two conditions, two panels each; strait only in the first.
        assert_eq!(svg.matches(r#"data-series="strait""#).count(), 2);
        assert_eq!(svg.matches(r#"data-series="qemu-background""#).count(), 4);
        // The representative strait run is the median of two: the later (index len/2).
        assert!(svg.contains("strait (round 2, 14.0 s)"), "{svg}");
        assert!(svg.contains("80,") || svg.contains("points=\""));
        // Two 0.25 s bins (20 + 0, 20 + 5 heartbeats) make one window of 0.5 s.
        assert_eq!(heartbeat_points(&runs[0].report), [(-4.75, 90.0)]);
        assert_eq!(wire_points(&runs[0].report)[1], (1.0, 25.0));
    }
}
