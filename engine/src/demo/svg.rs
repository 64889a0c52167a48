//! The migration's timeline as an SVG chart, written by hand (no plotting dependency).
//!
//! Four panels share the x axis (seconds since `migrate`; the baseline before it is
//! negative): what the link delivered per class and the guest's dirty rate (MB/s), the
//! vCPU throttle (%), the mirror backlog (MB), and the guest's heartbeats per second as
//! the two consoles show them, where the downtime is the gap. The phases are bands across
//! all panels. Data: `status.migration.timeline` and `phases`, and the consoles.

use std::fmt::Write as _;

use super::console::Heartbeat;
use super::report::{phase_spans, timeline, Report, Row};
use super::Recording;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// Room for the title, two rows of phase labels and the first panel's header.
const TOP: f64 = 96.0;
const PANEL_HEIGHT: f64 = 120.0;
/// Room between panels for the next panel's header (its title and legend).
const PANEL_GAP: f64 = 38.0;
/// The header line sits this far above its panel.
const HEADER_OFFSET: f64 = 8.0;
/// The phase labels' lowest row sits this far above the first panel, the others a line
/// higher each.
const PHASE_LABEL_OFFSET: f64 = 30.0;
const LINE_HEIGHT: f64 = 12.0;
/// Rows of phase labels: the phases around the switchover (switchover, completing,
/// in-doubt, done) last fractions of a second, so their labels need rows of their own.
const PHASE_LABEL_ROWS: usize = 3;
/// Space between two labels in a row.
const LABEL_PAD: f64 = 6.0;
/// The chart ends this long after the migration (or at the last heartbeat): enough to see
/// the guest go on at its old rate on the destination.
const AFTER_MIGRATION_S: f64 = 10.0;
/// Legend text width per character at font size 11 (sans-serif averages about 6 px).
const CHAR_WIDTH: f64 = 6.2;
/// Room under the last panel for the x axis labels.
const BOTTOM: f64 = 44.0;
/// Aim for about this many ticks on an axis.
const X_TICKS: f64 = 12.0;
const Y_TICKS: f64 = 4.0;
/// Heartbeats are counted in bins this long: the guest prints tens a second, so a bin
/// holds enough for a steady line and is short enough to show a sub-second pause.
const HEARTBEAT_BIN_S: f64 = 0.25;
/// Bins drawn at most, whatever the run's length (a 600 s workload is 2400 bins per
/// console: small enough for any SVG viewer).
const HEARTBEAT_BINS_MAX: usize = 4000;
const BYTES_PER_MB: f64 = 1e6;
const BYTES_PER_KB: f64 = 1e3;

/// A phase's band colour; unknown phases get grey.
fn phase_colour(phase: &str) -> &'static str {
    match phase {
        "disk" => "#2ca02c",
        "offer" => "#bcbd22",
        "memory" => "#1f77b4",
        "switchover" => "#d62728",
        "completing" => "#ff7f0e",
        "in-doubt" => "#9467bd",
        _ => "#7f7f7f",
    }
}

/// A series: its name (the `data-series` attribute), colour, dash pattern and points.
struct Series<'a> {
    name: &'a str,
    label: &'a str,
    colour: &'a str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Where a panel is and what it maps.
struct Frame {
    top: f64,
    x0: f64,
    x1: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, t: f64) -> f64 {
        let width = WIDTH - LEFT - RIGHT;
        LEFT + (t.clamp(self.x0, self.x1) - self.x0) / (self.x1 - self.x0) * width
    }

    fn y(&self, v: f64) -> f64 {
        self.top + PANEL_HEIGHT - v.clamp(0.0, self.y_max) / self.y_max * PANEL_HEIGHT
    }
}

/// Escapes text for an XML text node or attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks.
fn nice_step(range: f64, ticks: f64) -> f64 {
    let raw = (range / ticks).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, class: &str, content: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" class="{class}">{}</text>"#,
        escape(content)
    );
}

/// The chart.
pub fn render(rec: &Recording, report: &Report) -> String {
    let rows = timeline(&rec.migration);
    let spans = phase_spans(&rec.migration);
    let end_s = spans.last().map_or(0.0, |p| p.end_s);
    let last_heartbeat_s = rec
        .src_heartbeats
        .last()
        .into_iter()
        .chain(rec.dst_heartbeats.last())
        .map(|h| rec.since_migrate_s(h.arrived))
        .fold(end_s, f64::max);
    let x0 = rec.since_migrate_s(rec.first_heartbeat).min(0.0).floor();
    let x1 = last_heartbeat_s
        .min(end_s + AFTER_MIGRATION_S)
        .max(x0 + 1.0)
        .ceil();
    let panels = panels(rec, &rows, x0, x1);
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + PANEL_GAP) - PANEL_GAP + BOTTOM;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    out.push_str(
        "<style>.title{font-size:15px;font-weight:bold}.panel{font-weight:bold}\
         .tick{fill:#555}.phase{font-size:11px}.note{fill:#b00;font-weight:bold}</style>\n",
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let title = format!(
        "strait demo ({}): live migration across {} ms RTT, {} Mbit/s: {}",
        rec.system.name(),
        rec.rtt_ms,
        rec.rate_mbit,
        report.outcome
    );
    text(&mut out, LEFT, 22.0, "start", "title", &title);
    let bottom = TOP + panels.len() as f64 * (PANEL_HEIGHT + PANEL_GAP) - PANEL_GAP;
    let frame = Frame {
        top: TOP,
        x0,
        x1,
        y_max: 1.0,
    };
    phase_bands(&mut out, &frame, &spans, bottom);
    if let Some((at_s, for_s)) = rec.cut {
        // The cut is timed from the link's start; the chart from `migrate`.
        let start_s = at_s - rec.migrate_at.duration_since(rec.link_up).as_secs_f64();
        let (a, b) = (frame.x(start_s), frame.x(start_s + for_s));
        let _ = writeln!(
            out,
            r##"<rect x="{a:.1}" y="{TOP:.1}" width="{:.1}" height="{:.1}" fill="#000" fill-opacity="0.08" stroke="#555" stroke-dasharray="2 2"/>"##,
            (b - a).max(1.0),
            bottom - TOP
        );
        text(&mut out, a + 3.0, TOP + 12.0, "start", "note", "link cut");
    }
    for (index, (title, y_max, series)) in panels.iter().enumerate() {
        let frame = Frame {
            top: TOP + index as f64 * (PANEL_HEIGHT + PANEL_GAP),
            x0,
            x1,
            y_max: *y_max,
        };
        panel(&mut out, &frame, title, series, index + 1 == panels.len());
    }
    let frame = Frame {
        top: TOP + (panels.len() - 1) as f64 * (PANEL_HEIGHT + PANEL_GAP),
        x0,
        x1,
        y_max: 1.0,
    };
    if let Some(gap) = report.switchover_gap {
        gap_marker(
            &mut out,
            &frame,
            gap,
            &format!("switchover: {:.0} ms", gap.seconds * 1e3),
        );
    }
    let elsewhere = report
        .gap
        .filter(|g| Some(g.before_i) != report.switchover_gap.map(|s| s.before_i));
    if let Some(gap) = elsewhere.filter(|g| g.start_s < x1) {
        let label = format!("longest silence: {:.0} ms", gap.seconds * 1e3);
        gap_marker(&mut out, &frame, gap, &label);
    }
    out.push_str("</svg>\n");
    out
}

/// A silence in the guest's heartbeats, shaded on the heartbeat panel and labelled.
fn gap_marker(out: &mut String, frame: &Frame, gap: super::report::Gap, label: &str) {
    let (a, b) = (frame.x(gap.start_s), frame.x(gap.start_s + gap.seconds));
    let _ = writeln!(
        out,
        r##"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="{PANEL_HEIGHT}" fill="#d62728" fill-opacity="0.25"/>"##,
        frame.top,
        (b - a).max(1.0)
    );
    text(out, b + 4.0, frame.top + 14.0, "start", "note", label);
}

type Panel<'a> = (&'static str, f64, Vec<Series<'a>>);

/// The four panels, each with its title, its y maximum and its series.
fn panels(rec: &Recording, rows: &[Row], x0: f64, x1: f64) -> Vec<Panel<'static>> {
    let series = |name, label, colour, dashed, f: fn(&Row) -> f64, scale: f64| Series {
        name,
        label,
        colour,
        dashed,
        points: rows.iter().map(|r| (r.t_s, f(r) / scale)).collect(),
    };
    let rates = vec![
        series(
            "memory",
            "memory",
            "#1f77b4",
            false,
            |r| r.memory_bytes_per_s,
            BYTES_PER_MB,
        ),
        series(
            "mirror",
            "mirror",
            "#ff7f0e",
            false,
            |r| r.mirror_bytes_per_s,
            BYTES_PER_MB,
        ),
        series(
            "bulk",
            "bulk (disk copy)",
            "#2ca02c",
            false,
            |r| r.bulk_bytes_per_s,
            BYTES_PER_MB,
        ),
        series(
            "dirty",
            "guest dirty rate",
            "#d62728",
            true,
            |r| r.dirty_bytes_per_s,
            BYTES_PER_MB,
        ),
        Series {
            name: "disk-cap",
            label: "guest write cap",
            colour: "#e377c2",
            dashed: true,
            // Only while there is one (0 means none, not a cap of 0).
            points: rows
                .iter()
                .filter(|r| r.disk_cap_bytes_per_s > 0.0)
                .map(|r| (r.t_s, r.disk_cap_bytes_per_s / BYTES_PER_MB))
                .collect(),
        },
    ];
    let throttle = vec![
        series(
            "throttle",
            "asked",
            "#9467bd",
            false,
            |r| r.throttle_pct,
            1.0,
        ),
        series(
            "throttle-applied",
            "applied by QEMU",
            "#9467bd",
            true,
            |r| r.applied_throttle_pct,
            1.0,
        ),
    ];
    let backlog_max = rows
        .iter()
        .map(|r| r.mirror_backlog_bytes)
        .fold(0.0, f64::max);
    let (backlog_title, backlog_scale) = if backlog_max >= BYTES_PER_MB {
        ("mirror backlog (MB)", BYTES_PER_MB)
    } else {
        ("mirror backlog (kB)", BYTES_PER_KB)
    };
    let backlog = vec![series(
        "backlog",
        "mirror backlog",
        "#8c564b",
        false,
        |r| r.mirror_backlog_bytes,
        backlog_scale,
    )];
    let heartbeats = vec![
        Series {
            name: "heartbeats-source",
            label: "on the source",
            colour: "#7f7f7f",
            dashed: false,
            points: heartbeat_rate(rec, &rec.src_heartbeats, x0, x1),
        },
        Series {
            name: "heartbeats-destination",
            label: "on the destination",
            colour: "#17becf",
            dashed: false,
            points: heartbeat_rate(rec, &rec.dst_heartbeats, x0, x1),
        },
    ];
    let y_max = |s: &[Series]| {
        let max = s
            .iter()
            .flat_map(|s| &s.points)
            .map(|p| p.1)
            .fold(0.0, f64::max);
        let step = nice_step(max.max(1e-9), Y_TICKS);
        ((max / step).ceil() * step).max(step)
    };
    vec![
        (
            "link per class and guest dirty rate (MB/s)",
            y_max(&rates),
            rates,
        ),
        ("vCPU throttle (%)", 100.0, throttle),
        (backlog_title, y_max(&backlog), backlog),
        (
            "guest heartbeats per second (console)",
            y_max(&heartbeats),
            heartbeats,
        ),
    ]
}

/// Heartbeats per second in bins, drawn as steps, from the bin of the console's first
/// heartbeat to the bin of its last (so the source's line stops at the switchover and the
/// destination's starts there).
fn heartbeat_rate(rec: &Recording, heartbeats: &[Heartbeat], x0: f64, x1: f64) -> Vec<(f64, f64)> {
    let bin_s = HEARTBEAT_BIN_S.max((x1 - x0) / HEARTBEAT_BINS_MAX as f64);
    let bins = ((x1 - x0) / bin_s).ceil() as usize;
    let mut counts = vec![0u32; bins.max(1)];
    let mut used: Option<(usize, usize)> = None;
    for h in heartbeats {
        let t = rec.since_migrate_s(h.arrived);
        if !(x0..x1).contains(&t) {
            continue;
        }
        let index = (((t - x0) / bin_s).floor() as usize).min(counts.len() - 1);
        counts[index] += 1;
        used = Some(used.map_or((index, index), |(a, b)| (a.min(index), b.max(index))));
    }
    let Some((first, last)) = used else {
        return Vec::new();
    };
    let mut points = Vec::with_capacity(2 * (last - first + 1));
    for (index, count) in counts.iter().enumerate().take(last + 1).skip(first) {
        let start = x0 + index as f64 * bin_s;
        let rate = f64::from(*count) / bin_s;
        points.push((start, rate));
        points.push((start + bin_s, rate));
    }
    points
}

/// The phase bands across every panel, labelled above the first; the final phase is a line.
fn phase_bands(out: &mut String, frame: &Frame, spans: &[super::report::PhaseSpan], bottom: f64) {
    let label_y = |row: usize| frame.top - PHASE_LABEL_OFFSET - row as f64 * LINE_HEIGHT;
    // Greedy placement: each label in the lowest row where it clears the previous label,
    // else pushed right in the row that ends first; a leader line joins a moved label to
    // its band.
    let mut row_end = [f64::NEG_INFINITY; PHASE_LABEL_ROWS];
    for span in spans {
        let (a, b) = (frame.x(span.start_s), frame.x(span.end_s));
        let colour = phase_colour(&span.name);
        let width = CHAR_WIDTH * span.name.len() as f64;
        let anchor = if span.end_s > span.start_s {
            (a + b) / 2.0
        } else {
            a
        };
        if span.end_s > span.start_s {
            let _ = writeln!(
                out,
                r#"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="0.10"/>"#,
                frame.top,
                (b - a).max(1.0),
                bottom - frame.top
            );
        } else {
            let _ = writeln!(
                out,
                r#"<line x1="{a:.1}" y1="{:.1}" x2="{a:.1}" y2="{bottom:.1}" stroke="{colour}" stroke-dasharray="4 3"/>"#,
                frame.top
            );
        }
        let fits = |row: &usize| anchor - width / 2.0 >= row_end[*row] + LABEL_PAD;
        let row = (0..PHASE_LABEL_ROWS).find(fits).unwrap_or_else(|| {
            (0..PHASE_LABEL_ROWS)
                .min_by(|x, y| row_end[*x].total_cmp(&row_end[*y]))
                .unwrap_or(0)
        });
        let centre = anchor.max(row_end[row] + LABEL_PAD + width / 2.0);
        row_end[row] = centre + width / 2.0;
        let y = label_y(row);
        if row > 0 || centre > anchor + 1.0 {
            // Down to just under the lowest row: the panel's header line is below it.
            let _ = writeln!(
                out,
                r##"<line x1="{centre:.1}" y1="{:.1}" x2="{anchor:.1}" y2="{:.1}" stroke="#aaa"/>"##,
                y + 3.0,
                label_y(0) + 6.0
            );
        }
        text(out, centre, y, "middle", "phase", &span.name);
    }
}

/// One panel: its frame, grid, ticks, title, legend and series.
fn panel(out: &mut String, frame: &Frame, title: &str, series: &[Series], x_labels: bool) {
    let (top, bottom) = (frame.top, frame.top + PANEL_HEIGHT);
    let (left, right) = (LEFT, WIDTH - RIGHT);
    let header_y = top - HEADER_OFFSET;
    text(out, left, header_y, "start", "panel", title);
    let mut legend_x = right;
    for s in series.iter().rev() {
        legend_x -= 16.0 + CHAR_WIDTH * s.label.len() as f64 + 12.0;
        let dash = if s.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let y = header_y - 4.0;
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
            legend_x + 12.0,
            s.colour
        );
        text(out, legend_x + 16.0, header_y, "start", "tick", s.label);
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top:.1}" width="{:.1}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##,
        right - left
    );
    let y_step = nice_step(frame.y_max, Y_TICKS);
    let mut v = 0.0;
    while v <= frame.y_max + y_step * 1e-6 {
        let y = frame.y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eee"/>"##
        );
        text(
            out,
            left - 6.0,
            y + 4.0,
            "end",
            "tick",
            &format_tick(v, y_step),
        );
        v += y_step;
    }
    let x_step = nice_step(frame.x1 - frame.x0, X_TICKS);
    let mut t = (frame.x0 / x_step).ceil() * x_step;
    while t <= frame.x1 {
        let x = frame.x(t);
        let stroke = if t == 0.0 { "#444" } else { "#eee" };
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="{stroke}"/>"#
        );
        if x_labels {
            text(
                out,
                x,
                bottom + 14.0,
                "middle",
                "tick",
                &format_tick(t, x_step),
            );
        }
        t += x_step;
    }
    if x_labels {
        text(
            out,
            (left + right) / 2.0,
            bottom + 32.0,
            "middle",
            "tick",
            "seconds since migrate (the workload's baseline before 0)",
        );
    }
    for s in series {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", frame.x(*t), frame.y(*v)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = writeln!(
            out,
            r#"<polyline data-series="{}" fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#,
            escape(s.name),
            s.colour,
            points.join(" ")
        );
    }
}

fn format_tick(value: f64, step: f64) -> String {
    // Ticks are sums of steps: what rounds to zero is zero, not "-0".
    let value = if value.abs() < step * 1e-6 {
        0.0
    } else {
        value
    };
    if step >= 1.0 {
        format!("{value:.0}")
    } else {
        let decimals = (-step.log10()).ceil() as usize;
        format!("{value:.decimals$}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::demo::console::Heartbeat;
    use crate::demo::{GuestFiles, Plan};
    use serde_json::json;
    use std::time::{Duration, Instant};

    /// A run like a real one: 5 s of baseline, an 11 s migration, heartbeats at 100/s
    /// with a 1.5 s silence at the switchover, then 20 s on the destination.
    fn synthetic() -> (Recording, Plan) {
        let link_up = Instant::now();
        let migrate_at = link_up + Duration::from_secs(10);
        let beat = |i: u64, t_s: f64| Heartbeat {
            i,
            uptime_s: 5.0 + t_s,
            arrived: migrate_at + Duration::from_secs_f64(t_s + 5.0) - Duration::from_secs(5),
        };
        let src: Vec<Heartbeat> = (1..=1550)
            .map(|i| beat(i, -5.0 + i as f64 * 0.01))
            .collect();
        let dst: Vec<Heartbeat> = (1551..=3550)
            .map(|i| beat(i, 12.0 + (i - 1551) as f64 * 0.01))
            .collect();
        let phases = [
            ("disk", 0.0),
            ("offer", 4.5),
            ("memory", 4.6),
            ("switchover", 10.3),
            ("completing", 10.7),
            ("in-doubt", 11.4),
            ("done", 11.5),
        ];
        let timeline: Vec<_> = (1..=23)
            .map(|k| {
                let t = k as f64 * 0.5;
                let phase = phases.iter().rev().find(|p| p.1 <= t).unwrap().0;
                json!([
                    t,
                    phase,
                    if phase == "memory" { 25e6 } else { 0.0 },
                    1e5,
                    if phase == "disk" { 20e6 } else { 0.0 },
                    if t > 9.0 { 19e6 } else { 0.0 },
                    if t > 10.0 { 11 } else { 0 },
                    1,
                    5e4,
                    500
                ])
            })
            .collect();
        let migration = json!({
            "phase": "done", "id": "00ff", "elapsed_s": 11.5,
            "phases": phases.iter().map(|(p, t)| json!({"phase": p, "at_s": t})).collect::<Vec<_>>(),
            "bytes": {"memory": 150_000_000u64, "mirror": 1_800_000u64, "bulk": 67_000_000u64},
            "vmm_downtime_ms": 1110, "switchover_ms": 1217.2,
            "timeline_columns": ["t_s", "phase", "memory_bytes_per_s", "mirror_bytes_per_s",
                "bulk_bytes_per_s", "dirty_bytes_per_s", "throttle_pct", "applied_throttle_pct",
                "mirror_backlog_bytes", "expected_downtime_ms"],
            "timeline": timeline,
        });
        let recording = Recording {
            rtt_ms: 100,
            rate_mbit: 200,
            // 5 s after `migrate`, in the memory phase.
            cut: Some((15.0, 3.0)),
            link_up,
            first_heartbeat: src[0].arrived,
            migrate_at,
            migration,
            run_states: Some(("postmigrate".into(), "running".into())),
            verdict: Some(crate::demo::console::Verdict::Pass),
            guest_results: [
                ("blocks_bad", "0"),
                ("md5_region", "ab"),
                ("blocks_checked", "1024"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            host_md5: Some("ab".into()),
            after_error: None,
            src_heartbeats: src,
            dst_heartbeats: dst,
            split_heartbeat: None,
            host_md5_dma: None,
            wire_during: None,
            wire: Vec::new(),
            extra_checks: Vec::new(),
            system_detail: serde_json::Value::Null,
            system: crate::demo::System::Strait,
        };
        let plan = Plan {
            cpu_split: None,
            actuator: crate::migration::stun::Actuator::Vmm,
            system: crate::demo::System::Strait,
            guest: GuestFiles {
                kernel: "k".into(),
                initramfs: "i".into(),
            },
            rtt_ms: 100,
            rate_mbit: 200,
            workload_s: 60,
            cut: None,
            svg: "c.svg".into(),
            workdir: None,
            keep: false,
            json: true,
        };
        (recording, plan)
    }

    #[test]
    fn a_synthetic_run_gives_a_report_and_a_chart_with_every_series() {
        let (recording, plan) = synthetic();
        let report = Report::new(&recording, &plan);
        assert!(report.failed_checks().is_empty(), "{:?}", report.checks);
        let gap = report.switchover_gap.unwrap();
        assert_eq!((gap.before_i, gap.after_i), (1550, 1551));
        assert!((gap.seconds - 1.51).abs() < 0.02, "{gap:?}");
        let (seconds, _, share) = report.memory_phase.unwrap();
        assert!(
            (seconds - 5.5).abs() < 1e-9 && (share - 1.0).abs() < 0.01,
            "{seconds} {share}"
        );
        let chart = render(&recording, &report);
        assert!(chart.starts_with("<svg"));
        assert!(chart.trim_end().ends_with("</svg>"));
        for series in [
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
        ] {
            assert!(
                chart.contains(&format!(r#"<polyline data-series="{series}""#)),
                "{series}"
            );
        }
        for phase in [
            "disk",
            "offer",
            "memory",
            "switchover",
            "completing",
            "in-doubt",
            "done",
        ] {
            assert!(chart.contains(&format!(">{phase}</text>")), "{phase}");
        }
        if let Some(path) = std::env::var_os("STRAIT_DEMO_SVG_OUT") {
            std::fs::write(path, &chart).unwrap();
        }
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape(r#"a<b & "c" 'd'>"#),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"
        );
    }

    #[test]
    fn tick_steps_are_round() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b;
        assert!(close(nice_step(100.0, 4.0), 50.0));
        assert!(close(nice_step(23.0, 12.0), 2.0));
        assert!(close(nice_step(0.3, 4.0), 0.1));
        assert_eq!(format_tick(0.30000000000000004, 0.1), "0.3");
        assert_eq!(format_tick(40.0, 20.0), "40");
        assert_eq!(format_tick(-1e-12, 2.0), "0");
    }
}
