//! `strait ctl`: asks a running engine over its control socket and prints the answer, as a
//! human-readable summary or, with `--json`, as the raw `result` object (pretty-printed).
//!
//! The renderers tolerate missing fields and print what is there, so that `strait ctl`
//! keeps working against an engine whose status or stats carry fewer (or more) fields.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::cli::{CtlArgs, CtlCommand};
use crate::control::{ControlClient, ControlError};

/// What can fail in `strait ctl`.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to control socket {path}: is `strait serve` running?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot set up the connection to control socket {path}")]
    Client { path: PathBuf, source: ControlError },
    #[error("`{command}` on control socket {path} failed")]
    Call {
        command: &'static str,
        path: PathBuf,
        source: ControlError,
    },
    #[error("cannot write the `{command}` output to stdout")]
    Output {
        command: &'static str,
        source: io::Error,
    },
    #[error("verify found {chunks} chunk(s) that differ between the source and the replica")]
    Mismatches { chunks: u64 },
    #[error("verify failed: {0}")]
    VerifyFailed(String),
    #[error("the migration did not commit: {0}")]
    MigrationFailed(String),
}

/// Runs `strait ctl`.
pub fn run(args: CtlArgs) -> Result<(), CtlError> {
    if let CtlCommand::Status {
        watch: true,
        interval_ms,
        count,
    } = args.command
    {
        return watch(&args, interval_ms, count);
    }
    let (command, call_args) = match &args.command {
        CtlCommand::Status { .. } => ("status", serde_json::Map::new()),
        CtlCommand::Stats => ("stats", serde_json::Map::new()),
        CtlCommand::Replicate { to } => {
            let mut a = serde_json::Map::new();
            a.insert("to".into(), Value::String(to.to_string()));
            ("replicate", a)
        }
        CtlCommand::Verify {
            wait,
            repair,
            interval_ms,
        } => return verify(&args, *repair, wait.then_some(*interval_ms)),
        CtlCommand::Promote { force } => {
            let mut a = serde_json::Map::new();
            if *force {
                a.insert("force".into(), Value::Bool(true));
            }
            ("promote", a)
        }
        CtlCommand::Demote => ("demote", serde_json::Map::new()),
        CtlCommand::Migrate {
            to,
            vmm,
            dst_vmm,
            downtime_ms,
            converge_timeout_s,
            throttle,
            interval_ms,
            no_wait,
        } => {
            let mut a = serde_json::Map::new();
            if let Some(to) = to {
                a.insert("to".into(), Value::String(to.to_string()));
            }
            a.insert("vmm".into(), Value::String(vmm.clone()));
            if let Some(d) = dst_vmm {
                a.insert("dst_vmm".into(), Value::String(d.clone()));
            }
            a.insert("downtime_ms".into(), Value::from(*downtime_ms));
            if let Some(s) = converge_timeout_s {
                a.insert("converge_timeout_s".into(), Value::from(*s));
            }
            a.insert("throttle".into(), Value::String(throttle.clone()));
            return migrate(&args, a, (!no_wait).then_some(*interval_ms));
        }
        CtlCommand::MigrateCancel => ("migrate-cancel", serde_json::Map::new()),
    };
    let mut client = connect(&args)?;
    let result = client
        .call_with_args(command, call_args)
        .map_err(|source| CtlError::Call {
            command,
            path: args.control.clone(),
            source,
        })?;
    let text = if args.json {
        // Pretty: `jq` reads it as well as one line, and a person can read it too.
        serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string()) + "\n"
    } else {
        match args.command {
            CtlCommand::Status { .. } => render_status(&result),
            CtlCommand::Stats => render_stats(&result),
            CtlCommand::Replicate { to } => format!("replicating to {to}\n"),
            // Returned above.
            CtlCommand::Verify { .. } => String::new(),
            CtlCommand::Promote { .. } => render_promoted(&result),
            // Returned above.
            CtlCommand::Migrate { .. } => String::new(),
            CtlCommand::MigrateCancel => {
                "the migration rolls back (unless its commit was already sent)\n".into()
            }
            CtlCommand::Demote => {
                if result["replicating"] == true {
                    "demoted: the disk is fenced; the destination is told once it holds every write\n".into()
                } else {
                    "demoted: the disk is fenced\n".into()
                }
            }
        }
    };
    // This is the command's output, so it goes to stdout; writing through the handle (not
    // `println!`) turns a closed pipe (`strait ctl stats | head -1`) into an error we can
    // handle instead of a panic.
    match io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        // The reader has all it wanted.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(CtlError::Output { command, source }),
    }
}

fn print(command: &'static str, text: &str) -> Result<(), CtlError> {
    match io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(CtlError::Output { command, source }),
    }
}

/// `verify`: starts a run; with `--wait` (`follow_ms`), follows it to its end.
fn verify(args: &CtlArgs, repair: bool, follow_ms: Option<u64>) -> Result<(), CtlError> {
    let command = "verify";
    let mut client = connect(args)?;
    let mut call_args = Map::new();
    call_args.insert("repair".into(), Value::Bool(repair));
    let call = |client: &mut ControlClient, cmd: &'static str, a: Map<String, Value>| {
        client
            .call_with_args(cmd, a)
            .map_err(|source| CtlError::Call {
                command: cmd,
                path: args.control.clone(),
                source,
            })
    };
    let started = call(&mut client, command, call_args)?;
    let Some(interval_ms) = follow_ms else {
        let text = if args.json {
            format!("{started}\n")
        } else {
            "verify started; `strait ctl status` shows its progress\n".to_string()
        };
        return print(command, &text);
    };
    loop {
        let status = call(&mut client, "status", Map::new())?;
        let v = &status["replication"]["verify"];
        let running = str_field(v, "state") == Some("running");
        let text = match (args.json, running) {
            (true, _) => format!("{v}\n"),
            (false, true) => verify_progress_line(v),
            (false, false) => verify_summary(v),
        };
        print(command, &text)?;
        if !running {
            return verify_outcome(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(interval_ms.max(10)));
    }
}

/// `migrate`: starts it; unless `--no-wait`, follows it to its end.
fn migrate(
    args: &CtlArgs,
    call_args: Map<String, Value>,
    follow_ms: Option<u64>,
) -> Result<(), CtlError> {
    let command = "migrate";
    let mut client = connect(args)?;
    let err = |cmd: &'static str| {
        move |source| CtlError::Call {
            command: cmd,
            path: args.control.clone(),
            source,
        }
    };
    let started = client
        .call_with_args(command, call_args)
        .map_err(err(command))?;
    let Some(interval_ms) = follow_ms else {
        let text = if args.json {
            format!("{started}\n")
        } else {
            "migration started; `strait ctl status` shows its progress\n".to_string()
        };
        return print(command, &text);
    };
    loop {
        let status = client.call("status").map_err(err("status"))?;
        let m = &status["migration"];
        let phase = str_field(m, "phase").unwrap_or("?");
        let done = matches!(phase, "done" | "rolled-back" | "failed");
        let text = match (args.json, done) {
            (true, _) => format!("{m}\n"),
            (false, false) => migration_progress_line(m),
            (false, true) => migration_summary(m),
        };
        print(command, &text)?;
        if done {
            return match phase {
                "done" => Ok(()),
                _ => Err(CtlError::MigrationFailed(
                    str_field(m, "error").unwrap_or(phase).to_string(),
                )),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(interval_ms.max(10)));
    }
}

/// `memory      [########......................]  27% 70.0 MiB of 256 MiB, 24.1 MiB/s, dirty 3.0 MiB/s, throttle 0%, expected downtime 310 ms`.
pub fn migration_progress_line(m: &Value) -> String {
    let phase = str_field(m, "phase").unwrap_or("?");
    let mut out = format!("{phase:<12}");
    let num = |k: &str| m.get(k).and_then(Value::as_u64);
    let (done, total) = match phase {
        "disk" => (
            m["disk"].get("done_bytes").and_then(Value::as_u64),
            m["disk"].get("total_bytes").and_then(Value::as_u64),
        ),
        _ => (
            num("memory_transferred_bytes"),
            num("memory_total_bytes").filter(|t| *t > 0),
        ),
    };
    if let (Some(done), Some(total)) = (done, total) {
        write_bytes_bar(&mut out, done.min(total), done, total);
    }
    // The details, comma-separated after the bar (or after the phase when there is none).
    let mut details = Vec::new();
    let rates = &m["rates_bytes_per_s"];
    for (label, key) in [("memory", "memory"), ("mirror", "mirror"), ("bulk", "bulk")] {
        if let Some(r) = rates.get(key).and_then(Value::as_u64).filter(|r| *r > 0) {
            details.push(format!("{label} {}/s", format_bytes_binary(r)));
        }
    }
    if let Some(d) = m["throttle"]
        .get("dirty_bytes_per_s")
        .and_then(Value::as_u64)
    {
        if phase == "memory" {
            details.push(format!("dirty {}/s", format_bytes_binary(d)));
        }
    }
    if let Some(t) = m["throttle"].get("asked_pct").and_then(Value::as_u64) {
        details.push(format!("throttle {t}%"));
    }
    if let Some(d) = num("expected_downtime_ms") {
        details.push(format!("expected downtime {d} ms"));
    }
    if !details.is_empty() {
        let separator = if done.is_some() && total.is_some() {
            ", "
        } else {
            " "
        };
        out.push_str(separator);
        out.push_str(&details.join(", "));
    }
    out.push('\n');
    out
}

/// The end of a migration: the outcome, the times, the bytes.
pub fn migration_summary(m: &Value) -> String {
    let phase = str_field(m, "phase").unwrap_or("?");
    let mut out = String::new();
    let head = match phase {
        "done" => "migrated: the VM runs on the destination",
        "rolled-back" => "rolled back: the VM runs here again",
        _ => "migration failed",
    };
    let _ = write!(out, "{head}");
    if let Some(e) = str_field(m, "error") {
        let _ = write!(out, " ({e})");
    }
    out.push('\n');
    if let Some(t) = f64_field(m, "elapsed_s") {
        let _ = writeln!(out, "  total time        {}", format_duration(t));
    }
    if let Some(d) = f64_field(m, "switchover_ms") {
        let _ = writeln!(out, "  switchover        {d:.0} ms (VM stopped at pre-switchover until the destination resumed it)");
    }
    if let Some(d) = m.get("vmm_downtime_ms").and_then(Value::as_u64) {
        let _ = writeln!(out, "  QEMU's downtime   {d} ms");
    }
    let bytes = &m["bytes"];
    for key in ["memory", "mirror", "bulk"] {
        if let Some(b) = bytes.get(key).and_then(Value::as_u64) {
            let _ = writeln!(out, "  {key:<17} {}", format_bytes_binary(b));
        }
    }
    out
}

/// The exit status of `verify --wait`: an error when a chunk differs or the run failed.
fn verify_outcome(v: &Value) -> Result<(), CtlError> {
    match str_field(v, "state") {
        Some("done") => match v.get("mismatch_chunks").and_then(Value::as_u64) {
            Some(0) => Ok(()),
            Some(chunks) => Err(CtlError::Mismatches { chunks }),
            None => Err(CtlError::VerifyFailed(
                "the engine reported no result".into(),
            )),
        },
        Some("failed") => Err(CtlError::VerifyFailed(
            str_field(v, "error")
                .unwrap_or("no reason given")
                .to_string(),
        )),
        _ => Err(CtlError::VerifyFailed(format!(
            "unexpected verify status {v}"
        ))),
    }
}

/// `verifying   [#######.......................]  23% 942 of 4096 chunks, 0 differ, 1 changed`.
pub fn verify_progress_line(v: &Value) -> String {
    let checked = v.get("chunks_checked").and_then(Value::as_u64).unwrap_or(0);
    let total = v.get("chunks_total").and_then(Value::as_u64).unwrap_or(0);
    let (bar, percent) = bar(checked, total, false);
    let count = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    format!(
        "{:<12} [{bar}] {percent:>3}% {checked} of {total} chunks, {} differ, {} changed while compared\n",
        "verifying",
        count("mismatch_chunks"),
        count("changed"),
    )
}

/// The end of a run: what was compared, and every listed range that differs.
pub fn verify_summary(v: &Value) -> String {
    let count = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    if str_field(v, "state") == Some("failed") {
        let _ = writeln!(
            out,
            "verify failed: {}",
            str_field(v, "error").unwrap_or("no reason given")
        );
        return out;
    }
    let elapsed = match (
        f64_field(v, "started_unix_s"),
        f64_field(v, "finished_unix_s"),
    ) {
        (Some(a), Some(b)) => format!(" in {}", format_duration(b - a)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "verify done{elapsed}: {} of {} chunks compared, {} differ, {} stayed busy (not compared)",
        count("chunks_checked"),
        count("chunks_total"),
        count("mismatch_chunks"),
        count("busy_chunks"),
    );
    for (label, key) in [("differs", "mismatches"), ("busy", "busy")] {
        for r in v.get(key).and_then(Value::as_array).into_iter().flatten() {
            let offset = r.get("offset").and_then(Value::as_u64).unwrap_or(0);
            let len = r.get("len").and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(
                out,
                "  {label:<8} offset {offset} len {len} ({} at {})",
                format_bytes_binary(len),
                format_bytes_binary(offset)
            );
        }
    }
    if v.get("repair").and_then(Value::as_bool) == Some(true) && count("mismatch_chunks") > 0 {
        out.push_str("  the chunks that differ are being copied again (repair)\n");
    }
    out
}

fn connect(args: &CtlArgs) -> Result<ControlClient, CtlError> {
    ControlClient::connect(&args.control).map_err(|err| match err {
        ControlError::Connect { path, source } => CtlError::Connect { path, source },
        source => CtlError::Client {
            path: args.control.clone(),
            source,
        },
    })
}

/// Characters of the progress bar of `status --watch`.
const BAR_WIDTH: u64 = 30;

/// The progress bar of `done` out of `total` and its percentage; an empty total reads as
/// complete when `empty_is_full`, as not started otherwise.
fn bar(done: u64, total: u64, empty_is_full: bool) -> (String, u64) {
    let (empty_filled, empty_percent) = if empty_is_full {
        (BAR_WIDTH, 100)
    } else {
        (0, 0)
    };
    let filled = (done * BAR_WIDTH)
        .checked_div(total)
        .unwrap_or(empty_filled);
    let percent = (done * 100).checked_div(total).unwrap_or(empty_percent);
    let bar = (0..BAR_WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    (bar, percent)
}

/// ` [####....]  42% 1.00 MiB of 2.00 MiB`: the bar drawn for `shown`, the text saying
/// `done` (which may run past `total`, as QEMU's resent pages do).
fn write_bytes_bar(out: &mut String, shown: u64, done: u64, total: u64) {
    let (bar, percent) = bar(shown, total, true);
    let _ = write!(
        out,
        " [{bar}] {percent:>3}% {} of {}",
        format_bytes_binary(done),
        format_bytes_binary(total)
    );
}

/// `status --watch`: one progress line per interval.
fn watch(args: &CtlArgs, interval_ms: u64, count: Option<u64>) -> Result<(), CtlError> {
    let command = "status";
    let mut client = connect(args)?;
    let mut previous: Option<(std::time::Instant, u64)> = None;
    let mut lines = 0u64;
    loop {
        let status = client.call(command).map_err(|source| CtlError::Call {
            command,
            path: args.control.clone(),
            source,
        })?;
        let r = &status["replication"];
        let now = std::time::Instant::now();
        let done = r["done_bytes"]
            .as_u64()
            .or_else(|| r["bytes_mirrored"].as_u64())
            .unwrap_or(0);
        let rate = previous.map(|(at, bytes)| {
            done.saturating_sub(bytes) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
        });
        previous = Some((now, done));
        let text = if args.json {
            format!("{r}\n")
        } else {
            progress_line(r, rate)
        };
        match io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(source) => return Err(CtlError::Output { command, source }),
        }
        lines += 1;
        if count.is_some_and(|c| lines >= c) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(interval_ms.max(10)));
    }
}

/// `copying   [#########.....................]  31% 80.0 MiB of 256 MiB, 95.2 MiB/s`.
pub fn progress_line(r: &Value, rate_bytes_per_s: Option<f64>) -> String {
    if r.is_null() {
        return "replication: none\n".into();
    }
    let state = str_field(r, "state").unwrap_or("?");
    let mut out = format!("{state:<12}");
    let done = r.get("done_bytes").and_then(Value::as_u64);
    let total = r.get("total_bytes").and_then(Value::as_u64);
    if let (Some(done), Some(total)) = (done, total) {
        write_bytes_bar(&mut out, done, done, total);
    }
    if let Some(rate) = rate_bytes_per_s {
        let _ = write!(out, ", {}/s", format_bytes_binary(rate as u64));
    }
    if let Some(lag) = r.get("lag_bytes").and_then(Value::as_u64) {
        let _ = write!(out, ", {} behind", format_bytes_binary(lag));
        if let Some(seconds) = f64_field(r, "lag_seconds") {
            let _ = write!(out, " ({seconds:.1} s)");
        }
    }
    if let Some(t) = throttle_text(r) {
        let _ = write!(out, ", {t}");
    }
    if let Some(e) = str_field(r, "last_error") {
        let _ = write!(out, " (last error: {e})");
    }
    out.push('\n');
    out
}

/// "guest paced at R/s (D ms held)" while back-pressure is on; None when off.
fn throttle_text(r: &Value) -> Option<String> {
    let t = r.get("throttle")?;
    if !t.get("active").and_then(Value::as_bool).unwrap_or(false) {
        return None;
    }
    let rate = t.get("rate_bytes_per_s").and_then(Value::as_u64)?;
    let mut text = format!("guest paced at {}/s", format_bytes_binary(rate));
    if let Some(held) = f64_field(t, "delay_ms_total") {
        let _ = write!(text, " ({} held so far)", format_duration(held / 1000.0));
    }
    Some(text)
}

/// The answer to `promote`, in words.
fn render_promoted(r: &Value) -> String {
    let mut out = String::from("promoted");
    if r["forced"] == true {
        out.push_str(" (forced)");
    }
    out.push_str(if r["complete"] == true {
        ": the replica holds every write of the demoted source"
    } else if r["consistent"] == true {
        ": the replica is consistent, but its source was not demoted (it may miss the last writes)"
    } else {
        ": the replica is NOT consistent (a copy or resync was unfinished)"
    });
    if r["serving"] == true {
        out.push_str("; the VMM may write the disk now");
    }
    out.push('\n');
    out
}

/// Width of the label column of `render_status`.
const LABEL_WIDTH: usize = 11;

/// Renders a `status` result as an aligned block of `label  value` lines.
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let mut heading = String::from("strait engine");
    if let Some(version) = str_field(status, "engine_version") {
        let _ = write!(heading, " {version}");
    }
    if let Some(api) = status.get("api_version").and_then(Value::as_u64) {
        let _ = write!(heading, " (control API {api})");
    }
    if let Some(uptime) = f64_field(status, "uptime_s") {
        let _ = write!(heading, ", up {}", format_duration(uptime));
    }
    line(&mut out, &heading);

    if let Some(disk) = status.get("disk") {
        render_disk(&mut out, disk);
    }
    if let Some(queues) = render_queues(status) {
        labelled(&mut out, "queues", &queues);
    }
    if let Some(connected) = status.get("vmm_connected").and_then(Value::as_bool) {
        let text = if connected {
            "connected"
        } else {
            "not connected"
        };
        labelled(&mut out, "VMM", text);
    }
    if let Some(features) = status.get("features") {
        render_features(&mut out, features);
    }
    if let Some(r) = status.get("replication").filter(|r| !r.is_null()) {
        render_replication(&mut out, r);
    }
    out
}

fn render_replication(out: &mut String, r: &Value) {
    let state = str_field(r, "state").unwrap_or("?");
    let mut text = state.to_string();
    if let Some(to) = str_field(r, "to") {
        let _ = write!(text, " (to {to})");
    }
    let done = r.get("done_bytes").and_then(Value::as_u64);
    let total = r.get("total_bytes").and_then(Value::as_u64);
    if let (Some(done), Some(total)) = (done, total) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let _ = write!(
            text,
            ", {percent}% copied ({} of {})",
            format_bytes_binary(done),
            format_bytes_binary(total)
        );
    }
    if let Some(lag) = r.get("lag_bytes").and_then(Value::as_u64) {
        let _ = write!(text, ", {} behind", format_bytes_binary(lag));
    }
    if let Some(t) = throttle_text(r) {
        let _ = write!(text, ", {t}");
    }
    if let Some(from) = str_field(r, "listening") {
        let _ = write!(text, " (listening on {from})");
        let consistency = if r["complete"] == true {
            ", complete (its source was demoted)"
        } else if r["consistent"] == true {
            ", consistent"
        } else {
            ", not consistent yet"
        };
        text.push_str(consistency);
    }
    if r["demoted"] == true {
        text.push_str(", demoted");
    }
    if r["superseded"] == true {
        text.push_str(", superseded by the promoted destination");
    }
    labelled(out, "replication", &text);
    if let Some(error) = str_field(r, "last_error") {
        labelled(out, "last error", error);
    }
    if let Some(v) = r.get("verify").filter(|v| !v.is_null()) {
        let text = if str_field(v, "state") == Some("running") {
            verify_progress_line(v)
        } else {
            verify_summary(v)
        };
        let mut lines = text.lines();
        labelled(out, "verify", lines.next().unwrap_or(""));
        for rest in lines {
            labelled(out, "", rest);
        }
    }
}

fn render_disk(out: &mut String, disk: &Value) {
    labelled(out, "disk", str_field(disk, "path").unwrap_or("?"));
    let mut size = Vec::new();
    if let Some(bytes) = disk.get("size_bytes").and_then(Value::as_u64) {
        size.push(format!("{bytes} bytes ({})", format_bytes_binary(bytes)));
    }
    if let Some(block) = disk.get("block_size_bytes").and_then(Value::as_u64) {
        size.push(format!("{block}-byte blocks"));
    }
    if !size.is_empty() {
        labelled(out, "  size", &size.join(", "));
    }
    let mut mode = Vec::new();
    if let Some(read_only) = disk.get("read_only").and_then(Value::as_bool) {
        mode.push(if read_only { "read-only" } else { "read-write" });
    }
    if disk.get("fenced").and_then(Value::as_bool) == Some(true) {
        mode.push("FENCED (guest writes fail)");
    }
    if let Some(direct) = disk.get("direct_io").and_then(Value::as_bool) {
        mode.push(if direct { "direct I/O" } else { "buffered I/O" });
    }
    if !mode.is_empty() {
        labelled(out, "  mode", &mode.join(", "));
    }
    if let Some(serial) = str_field(disk, "serial") {
        labelled(out, "  serial", serial);
    }
}

/// "2 × 256 descriptors on cores 0,1", or what part of it the status carries.
fn render_queues(status: &Value) -> Option<String> {
    let count = status.get("queues").and_then(Value::as_u64);
    let size = status.get("queue_size").and_then(Value::as_u64);
    let cores = status.get("cores").and_then(Value::as_array).map(|cores| {
        cores
            .iter()
            .map(|core| core.to_string())
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut text = match (count, size) {
        (Some(count), Some(size)) => format!("{count} × {size} descriptors"),
        (Some(count), None) => count.to_string(),
        (None, Some(size)) => format!("{size} descriptors each"),
        (None, None) if cores.is_none() => return None,
        (None, None) => String::new(),
    };
    if let Some(cores) = cores {
        if !text.is_empty() {
            text.push(' ');
        }
        let _ = write!(text, "on cores {cores}");
    }
    Some(text)
}

fn render_features(out: &mut String, features: &Value) {
    let mut label = "features";
    for name in ["offered", "acked", "protocol"] {
        if let Some(list) = features.get(name).and_then(Value::as_array) {
            let names: Vec<String> = list
                .iter()
                .map(|feature| match feature.as_str() {
                    Some(name) => name.to_string(),
                    None => feature.to_string(),
                })
                .collect();
            let names = if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(" ")
            };
            labelled(out, label, &format!("{:<9} {names}", format!("{name}:")));
            label = "";
        }
    }
    if let Some(logging) = features.get("dirty_logging").and_then(Value::as_bool) {
        let text = format!("dirty logging {}", if logging { "on" } else { "off" });
        labelled(out, label, &text);
    }
}

/// One column of the stats table: its heading, width and how to get its text from a queue
/// (or totals) object.
struct Column {
    heading: &'static str,
    width: usize,
    cell: fn(&Value) -> String,
}

const STATS_COLUMNS: [Column; 10] = [
    Column {
        heading: "queue",
        width: 5,
        cell: |row| u64_cell(row, &["index"]),
    },
    Column {
        heading: "core",
        width: 4,
        cell: |row| u64_cell(row, &["core"]),
    },
    Column {
        heading: "requests",
        width: 12,
        cell: |row| u64_cell(row, &["requests"]),
    },
    Column {
        heading: "IOPS",
        width: 10,
        cell: |row| f64_cell(row, "iops", 1.0, 1),
    },
    Column {
        heading: "read MB/s",
        width: 10,
        cell: |row| f64_cell(row, "read_bytes_per_s", BYTES_PER_MB, 2),
    },
    Column {
        heading: "write MB/s",
        width: 10,
        cell: |row| f64_cell(row, "write_bytes_per_s", BYTES_PER_MB, 2),
    },
    Column {
        heading: "p50 us",
        width: 8,
        cell: |row| u64_cell(row, &["latency_us", "p50"]),
    },
    Column {
        heading: "p99 us",
        width: 8,
        cell: |row| u64_cell(row, &["latency_us", "p99"]),
    },
    Column {
        heading: "p99.9 us",
        width: 8,
        cell: |row| u64_cell(row, &["latency_us", "p999"]),
    },
    Column {
        heading: "errors",
        width: 7,
        cell: error_cell,
    },
];

/// Throughput is shown in decimal megabytes, as disk vendors and `fio` quote it.
const BYTES_PER_MB: f64 = 1e6;

/// Renders a `stats` result as a table: one row per queue and a total row.
pub fn render_stats(stats: &Value) -> String {
    let mut out = String::new();
    let mut heading = Vec::new();
    if let Some(uptime) = f64_field(stats, "uptime_s") {
        heading.push(format!("up {}", format_duration(uptime)));
    }
    if let Some(interval) = f64_field(stats, "interval_s") {
        heading.push(format!("rates over the last {}", format_duration(interval)));
    }
    if !heading.is_empty() {
        line(&mut out, &heading.join(", "));
    }
    let cells: Vec<String> = STATS_COLUMNS
        .iter()
        .map(|column| format!("{:>width$}", column.heading, width = column.width))
        .collect();
    line(&mut out, &cells.join("  "));
    let queues = stats.get("queues").and_then(Value::as_array);
    for queue in queues.into_iter().flatten() {
        stats_row(&mut out, queue, None);
    }
    if let Some(totals) = stats.get("totals") {
        stats_row(&mut out, totals, Some("total"));
    }
    out
}

fn stats_row(out: &mut String, row: &Value, label: Option<&str>) {
    let cells: Vec<String> = STATS_COLUMNS
        .iter()
        .enumerate()
        .map(|(index, column)| {
            let text = match (index, label) {
                (0, Some(label)) => label.to_string(),
                (1, Some(_)) => String::new(),
                _ => (column.cell)(row),
            };
            format!("{text:>width$}", width = column.width)
        })
        .collect();
    line(out, &cells.join("  "));
}

/// Shown where a field is missing.
const MISSING: &str = "-";

fn u64_cell(row: &Value, path: &[&str]) -> String {
    let value = path.iter().try_fold(row, |value, key| value.get(key));
    match value {
        Some(Value::Number(number)) => number.to_string(),
        _ => MISSING.to_string(),
    }
}

fn f64_cell(row: &Value, key: &str, divisor: f64, decimals: usize) -> String {
    match f64_field(row, key) {
        Some(value) => format!("{:.decimals$}", value / divisor),
        None => MISSING.to_string(),
    }
}

/// The sum of every counter in the row's `errors` object.
fn error_cell(row: &Value) -> String {
    match row.get("errors").and_then(Value::as_object) {
        Some(errors) => sum_counters(errors).to_string(),
        None => MISSING.to_string(),
    }
}

fn sum_counters(counters: &Map<String, Value>) -> u64 {
    counters
        .values()
        .filter_map(Value::as_u64)
        .fold(0, u64::saturating_add)
}

fn str_field<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str)
}

fn f64_field(object: &Value, key: &str) -> Option<f64> {
    object.get(key).and_then(Value::as_f64)
}

fn line(out: &mut String, text: &str) {
    out.push_str(text.trim_end());
    out.push('\n');
}

fn labelled(out: &mut String, label: &str, value: &str) {
    line(out, &format!("{label:<LABEL_WIDTH$} {value}"));
}

/// `12.5s`, `5m 03s`, `2h 05m 03s`, `3d 04h 05m`.
pub(crate) fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return format!("{seconds}s");
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    // Whole seconds from here on; the fraction no longer matters to a reader.
    let total = seconds as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total / 3_600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (days, hours) {
        (0, 0) => format!("{minutes}m {secs:02}s"),
        (0, _) => format!("{hours}h {minutes:02}m {secs:02}s"),
        _ => format!("{days}d {hours:02}h {minutes:02}m"),
    }
}

/// `1.00 GiB`: disk sizes are powers of two, so binary units read round.
pub(crate) fn format_bytes_binary(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migration_progress_lines_separate_details_by_commas() {
        let offer = json!({"phase": "offer", "rates_bytes_per_s": {"bulk": 2048},
            "throttle": {"asked_pct": 0}});
        assert_eq!(
            migration_progress_line(&offer),
            "offer        bulk 2.00 KiB/s, throttle 0%\n"
        );
        let memory = json!({"phase": "memory", "memory_transferred_bytes": 1024,
            "memory_total_bytes": 4096, "rates_bytes_per_s": {"memory": 1024},
            "throttle": {"asked_pct": 5, "dirty_bytes_per_s": 0}});
        let line = migration_progress_line(&memory);
        assert!(line.starts_with("memory       [#######"), "{line}");
        assert!(
            line.ends_with(
                " 25% 1.00 KiB of 4.00 KiB, memory 1.00 KiB/s, dirty 0 B/s, throttle 5%\n"
            ),
            "{line}"
        );
        assert_eq!(
            migration_progress_line(&json!({"phase": "disk"})),
            "disk        \n"
        );
    }

    #[test]
    fn progress_lines_show_state_bar_bytes_rate_and_lag() {
        let copying = json!({
            "state": "copying", "done_bytes": 128u64 << 20, "total_bytes": 256u64 << 20,
        });
        let line = progress_line(&copying, Some(64.0 * 1_048_576.0));
        assert!(line.starts_with("copying"), "{line}");
        let bar = format!("[{}{}]", "#".repeat(15), ".".repeat(15));
        assert!(line.contains(&bar), "{line}");
        assert!(line.contains(" 50% "), "{line}");
        assert!(line.contains("/s"), "{line}");
        let behind = json!({ "state": "behind", "lag_bytes": 4096 });
        assert!(progress_line(&behind, None).contains("behind"));
        let paced = json!({
            "state": "behind", "lag_bytes": 8u64 << 20, "lag_seconds": 0.5,
            "throttle": { "active": true, "rate_bytes_per_s": 16u64 << 20, "delay_ms_total": 1500.0 },
        });
        let line = progress_line(&paced, None);
        assert!(line.contains("8.00 MiB behind (0.5 s)"), "{line}");
        assert!(
            line.contains("guest paced at 16.00 MiB/s (1.5s held"),
            "{line}"
        );
        let unpaced = json!({ "state": "in-sync", "throttle": { "active": false } });
        assert!(!progress_line(&unpaced, None).contains("paced"));
        assert_eq!(progress_line(&Value::Null, None), "replication: none\n");
    }

    #[test]
    fn verify_lines_and_outcome() {
        let running = json!({
            "state": "running", "chunks_total": 4, "chunks_checked": 1,
            "mismatch_chunks": 0, "changed": 2,
        });
        let line = verify_progress_line(&running);
        assert!(line.starts_with("verifying"), "{line}");
        assert!(
            line.contains(" 25% 1 of 4 chunks, 0 differ, 2 changed"),
            "{line}"
        );
        let done = json!({
            "state": "done", "chunks_total": 4, "chunks_checked": 4, "mismatch_chunks": 2,
            "busy_chunks": 0, "started_unix_s": 10.0, "finished_unix_s": 12.5,
            "mismatches": [{"offset": 524288, "len": 1048576}], "busy": [],
        });
        let text = verify_summary(&done);
        assert_eq!(
            text,
            "verify done in 2.5s: 4 of 4 chunks compared, 2 differ, 0 stayed busy (not compared)\n  differs  offset 524288 len 1048576 (1.00 MiB at 512.00 KiB)\n"
        );
        assert!(matches!(
            verify_outcome(&done),
            Err(CtlError::Mismatches { chunks: 2 })
        ));
        let clean = json!({ "state": "done", "mismatch_chunks": 0, "busy_chunks": 3 });
        assert!(verify_outcome(&clean).is_ok());
        let failed = json!({ "state": "failed", "error": "the replication session was lost" });
        assert!(verify_summary(&failed).contains("session was lost"));
        assert!(matches!(
            verify_outcome(&failed),
            Err(CtlError::VerifyFailed(_))
        ));
    }

    fn sample_status() -> Value {
        json!({
            "engine_version": "0.1.0", "api_version": 1,
            "disk": {"path": "/x/disk.img", "size_bytes": 1073741824u64, "read_only": false,
                     "block_size_bytes": 512, "direct_io": true, "serial": "strait-abc"},
            "queues": 2, "queue_size": 256, "cores": [0, 1], "vmm_connected": true,
            "features": {"offered": ["VERSION_1", "FLUSH"], "acked": ["VERSION_1"],
                         "protocol": ["MQ", "LOG_SHMFD"], "dirty_logging": false},
            "uptime_s": 12.5
        })
    }

    fn sample_queue(index: u64) -> Value {
        json!({
            "index": index, "core": index, "requests": 100, "reads": 50, "writes": 40,
            "flushes": 5, "discards": 2, "write_zeroes": 1, "get_id": 2,
            "bytes_read": 204800, "bytes_written": 163840, "iops": 32.2,
            "read_bytes_per_s": 1000.0, "write_bytes_per_s": 2_500_000.0,
            "latency_us": {"p50": 40, "p90": 80, "p99": 200, "p999": 900, "max": 1500},
            "errors": {"bad_descriptor": 0, "out_of_range": 1, "unsupported": 0,
                       "read_only": 0, "io": 2}
        })
    }

    #[test]
    fn status_renders_every_field() {
        let text = render_status(&sample_status());
        let expected = "\
strait engine 0.1.0 (control API 1), up 12.5s
disk        /x/disk.img
  size      1073741824 bytes (1.00 GiB), 512-byte blocks
  mode      read-write, direct I/O
  serial    strait-abc
queues      2 × 256 descriptors on cores 0,1
VMM         connected
features    offered:  VERSION_1 FLUSH
            acked:    VERSION_1
            protocol: MQ LOG_SHMFD
            dirty logging off
";
        assert_eq!(text, expected);
    }

    #[test]
    fn status_tolerates_missing_fields() {
        assert_eq!(render_status(&json!({})), "strait engine\n");
        let text = render_status(&json!({
            "disk": {"read_only": true}, "cores": [3], "vmm_connected": false,
            "features": {"acked": []}
        }));
        let expected = "\
strait engine
disk        ?
  mode      read-only
queues      on cores 3
VMM         not connected
features    acked:    (none)
";
        assert_eq!(text, expected);
        // Not even an object: still no panic.
        assert_eq!(render_status(&json!([1, 2])), "strait engine\n");
    }

    #[test]
    fn stats_render_as_a_table() {
        let mut totals = sample_queue(0);
        let object = totals.as_object_mut().unwrap();
        object.remove("index");
        object.remove("core");
        object.insert("requests".to_string(), json!(200));
        let stats = json!({
            "uptime_s": 12.5, "interval_s": 3.1,
            "queues": [sample_queue(0), sample_queue(1)],
            "totals": totals,
        });
        let text = render_stats(&stats);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "up 12.5s, rates over the last 3.1s");
        assert_eq!(
            lines[1],
            "queue  core      requests        IOPS   read MB/s  write MB/s    p50 us    p99 us  p99.9 us   errors"
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            ["1", "1", "100", "32.2", "0.00", "2.50", "40", "200", "900", "3"]
        );
        let total: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            total,
            ["total", "200", "32.2", "0.00", "2.50", "40", "200", "900", "3"]
        );
        // Columns line up: every row is as wide as the header.
        for row in &lines[2..] {
            assert_eq!(row.chars().count(), lines[1].chars().count(), "{row}");
        }
    }

    #[test]
    fn stats_tolerate_missing_fields() {
        let text = render_stats(&json!({"queues": [{"index": 0}]}));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row, ["0", "-", "-", "-", "-", "-", "-", "-", "-", "-"]);
        assert_eq!(render_stats(&json!(null)).lines().count(), 1);
    }

    #[test]
    fn durations_and_sizes_read_naturally() {
        assert_eq!(format_duration(0.0), "0.0s");
        assert_eq!(format_duration(59.94), "59.9s");
        assert_eq!(format_duration(303.0), "5m 03s");
        assert_eq!(format_duration(7503.0), "2h 05m 03s");
        assert_eq!(
            format_duration(3.0 * 86_400.0 + 4.0 * 3600.0 + 300.0),
            "3d 04h 05m"
        );
        assert_eq!(format_bytes_binary(512), "512 B");
        assert_eq!(format_bytes_binary(1536), "1.50 KiB");
        assert_eq!(format_bytes_binary(u64::MAX), "16384.00 PiB");
    }
}
