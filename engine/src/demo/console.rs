//! The guest's serial console as the demo reads it: the `migrate` workload's heartbeat
//! lines with the host time each arrived, its `STRAIT-RESULT` pairs and its verdict.
//!
//! The guest (`scripts/guest/init.sh`, scenario `migrate`) counts i = 1, 2, 3, ...; each
//! step writes one 4 KiB block with O_DIRECT and prints `STRAIT-HB i=<i> up=<uptime s>`.
//! The counter lives in guest memory, so after a live migration the heartbeats go on, on
//! the destination QEMU's console. The host-side arrival times of the lines bound the
//! pause the guest went through.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::DemoError;

const HEARTBEAT_MARKER: &str = "STRAIT-HB ";
const RESULT_MARKER: &str = "STRAIT-RESULT ";
const VERDICT_MARKER: &str = "STRAIT-VERDICT ";

/// Heartbeats kept per console. The guest runs at most 600 s (`MIGRATE_SECONDS_MAX` in
/// init.sh) and prints at most about 170 a second under TCG (measured with no memory load):
/// about 100,000; twice that leaves room for a faster host. Beyond it heartbeats are not
/// kept (the report's rates would then undercount the end of a 600 s run).
const HEARTBEATS_MAX: usize = 200_000;

/// Console lines kept for error messages: enough to show a kernel panic or the guest's
/// `STRAIT-DIAG` lines, little enough to print.
const TAIL_LINES: usize = 40;

/// `STRAIT-RESULT` keys kept: the `migrate` scenario prints 14; a confused guest cannot
/// grow the map without end.
const RESULT_KEYS_MAX: usize = 64;

/// The longest console line kept whole; the workload's lines are under 100 bytes, so a
/// longer one is noise (a kernel dump) and is cut, which keeps the pending buffer bounded.
const LINE_BYTES_MAX: usize = 4096;

/// How often [`Console::wait_closed`] looks whether the reader saw the pipe close.
const CLOSE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// One read from the console pipe.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// One `STRAIT-HB` line: the guest has written block `i` and says so.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heartbeat {
    pub i: u64,
    /// The guest's `/proc/uptime` after the write.
    pub uptime_s: f64,
    /// When the line reached the host.
    pub arrived: Instant,
}

/// The guest's final word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

#[derive(Default)]
struct State {
    /// Invariant: in arrival order, at most [`HEARTBEATS_MAX`].
    heartbeats: Vec<Heartbeat>,
    results: BTreeMap<String, String>,
    verdict: Option<Verdict>,
    tail: VecDeque<String>,
    /// The first line, whatever it is: on a migration destination, the rest of the line
    /// the source was printing when its vCPUs stopped.
    first_line: Option<String>,
    /// Bytes after the last newline: a line still being printed, or one a stopped source
    /// QEMU will never finish.
    pending: Vec<u8>,
    closed: bool,
}

/// A QEMU's console, read by its own thread until the pipe closes.
pub struct Console {
    state: Arc<Mutex<State>>,
    reader: Option<JoinHandle<()>>,
}

impl Console {
    /// Reads `source` on a thread, copying every byte to `log`.
    pub fn start(
        name: &str,
        source: impl Read + Send + 'static,
        log: &Path,
    ) -> Result<Console, DemoError> {
        let file = File::create(log).map_err(|e| DemoError::io("create console log", log, e))?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let reader = thread::Builder::new()
            .name(format!("demo-console-{name}"))
            .spawn(move || read_console(source, file, &shared))
            .map_err(DemoError::Thread)?;
        Ok(Console {
            state,
            reader: Some(reader),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every heartbeat kept so far, in arrival order.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.lock().heartbeats.clone()
    }

    pub fn first_heartbeat(&self) -> Option<Heartbeat> {
        self.lock().heartbeats.first().copied()
    }

    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.lock().heartbeats.last().copied()
    }

    /// Heartbeats that arrived at or after `since`.
    pub fn count_since(&self, since: Instant) -> u64 {
        let state = self.lock();
        let first = state.heartbeats.partition_point(|h| h.arrived < since);
        (state.heartbeats.len() - first) as u64
    }

    pub fn verdict(&self) -> Option<Verdict> {
        self.lock().verdict.clone()
    }

    pub fn results(&self) -> BTreeMap<String, String> {
        self.lock().results.clone()
    }

    /// The unfinished line the console ends with (a source QEMU stopped mid-line: the rest
    /// of that line is printed on the destination); empty if it ends with a newline.
    pub fn unfinished_line(&self) -> String {
        String::from_utf8_lossy(&self.lock().pending).into_owned()
    }

    /// The first complete line (without its line ending).
    pub fn first_line(&self) -> Option<String> {
        self.lock().first_line.clone()
    }

    /// The last lines, for an error message.
    pub fn tail(&self) -> String {
        let state = self.lock();
        let mut text = state
            .tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        if !state.pending.is_empty() {
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&state.pending));
        }
        text
    }

    /// Waits up to `timeout` for the reader to see the pipe close (the QEMU is gone).
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.lock().closed {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(CLOSE_POLL_INTERVAL);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        true
    }
}

fn read_console(mut source: impl Read, mut log: File, state: &Mutex<State>) {
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = match source.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The downtime measurement: taken as soon as the bytes are in.
        let arrived = Instant::now();
        // The log is for a person reading it after a failure; losing it loses nothing else.
        let _ = log.write_all(&chunk[..n]);
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.pending.extend_from_slice(&chunk[..n]);
        while let Some(at) = s.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = s.pending.drain(..=at).collect();
            let text = String::from_utf8_lossy(&line);
            take_line(&mut s, text.trim_end_matches(['\r', '\n']), arrived);
        }
        if s.pending.len() > LINE_BYTES_MAX {
            s.pending.clear();
        }
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.closed = true;
}

fn take_line(s: &mut State, line: &str, arrived: Instant) {
    if s.first_line.is_none() {
        s.first_line = Some(line.to_owned());
    }
    if s.tail.len() >= TAIL_LINES {
        s.tail.pop_front();
    }
    s.tail.push_back(line.to_owned());
    if let Some((i, uptime_s)) = parse_heartbeat(line) {
        if s.heartbeats.len() < HEARTBEATS_MAX {
            s.heartbeats.push(Heartbeat {
                i,
                uptime_s,
                arrived,
            });
        }
    } else if let Some(at) = line.find(RESULT_MARKER) {
        for (key, value) in line[at + RESULT_MARKER.len()..]
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
        {
            if s.results.len() < RESULT_KEYS_MAX || s.results.contains_key(key) {
                s.results.insert(key.to_owned(), value.to_owned());
            }
        }
    } else if let Some(at) = line.find(VERDICT_MARKER) {
        let rest = line[at + VERDICT_MARKER.len()..].trim();
        s.verdict = Some(match rest {
            "PASS" => Verdict::Pass,
            other => Verdict::Fail(other.trim_start_matches("FAIL").trim().to_owned()),
        });
    }
}

/// Parses a heartbeat line into `(i, uptime_s)`; `None` for any other line. Strict,
/// because a source QEMU's last line may be cut short by the migration: the uptime must
/// have its two decimals and nothing may follow it.
pub fn parse_heartbeat(line: &str) -> Option<(u64, f64)> {
    let line = line.trim_end();
    // A kernel message can share the serial line, before the marker.
    let at = line.find(HEARTBEAT_MARKER)?;
    let (i, up) = line[at + HEARTBEAT_MARKER.len()..]
        .strip_prefix("i=")?
        .split_once(" up=")?;
    let (seconds, hundredths) = up.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(seconds) || hundredths.len() != 2 || !digits(hundredths) {
        return None;
    }
    Some((i.parse().ok()?, up.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_parse_strictly() {
        assert_eq!(parse_heartbeat("STRAIT-HB i=12 up=3.45"), Some((12, 3.45)));
        assert_eq!(
            parse_heartbeat("[  1.0] msg STRAIT-HB i=7 up=10.00\r"),
            Some((7, 10.0))
        );
        assert_eq!(parse_heartbeat("STRAIT-HB i=12 up=3.4"), None);
        assert_eq!(parse_heartbeat("STRAIT-HB i=12 up=3.45x"), None);
        assert_eq!(parse_heartbeat("STRAIT-HB i= up=3.45"), None);
        assert_eq!(parse_heartbeat("i=12 up=3.45"), None);
    }

    #[test]
    fn the_console_yields_heartbeats_results_verdict_and_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("strait-demo-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = b"boot\r\nSTRAIT-HB i=1 up=1.00\r\nSTRAIT-RESULT blocks_bad=0 md5_region=ab\r\n\
                     STRAIT-VERDICT PASS\r\nSTRAIT-HB i=2 u"
            .to_vec();
        let mut console =
            Console::start("t", std::io::Cursor::new(text), &dir.join("c.log")).unwrap();
        assert!(console.wait_closed(Duration::from_secs(5)));
        assert_eq!(console.heartbeats().len(), 1);
        assert_eq!(console.last_heartbeat().unwrap().i, 1);
        assert_eq!(console.results()["blocks_bad"], "0");
        assert_eq!(console.verdict(), Some(Verdict::Pass));
        assert_eq!(console.unfinished_line(), "STRAIT-HB i=2 u");
        assert_eq!(console.first_line().as_deref(), Some("boot"));
        assert!(console.tail().ends_with("STRAIT-HB i=2 u"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_verdict_keeps_its_reason() {
        let mut s = State::default();
        take_line(
            &mut s,
            "STRAIT-VERDICT FAIL reason=region_mismatch",
            Instant::now(),
        );
        assert_eq!(
            s.verdict,
            Some(Verdict::Fail("reason=region_mismatch".into()))
        );
    }
}
