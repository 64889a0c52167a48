//! QEMU booting the test guest with a vhost-user-blk disk, and the guest's report read from
//! the serial console.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::guest::{Guest, QEMU_BINARY};
use super::migrate::{parse_heartbeat, Heartbeat, HeartbeatArrival};
use super::process::{kill_and_reap, kill_with_parent};
use super::HarnessError;

/// Boot plus one scenario. A run takes 4-7 s under TCG on an idle 2-core machine; the margin
/// covers both cores being busy with cargo builds and other guests (tests run in parallel).
pub const BOOT_AND_SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);
/// From the guest's verdict to QEMU's exit. `poweroff -f` takes milliseconds; a QEMU still
/// alive after this is stuck, typically waiting on the vhost-user backend while stopping the
/// device (GET_VRING_BASE).
pub const QEMU_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Guest RAM. The guest stages at most 64 MiB of test data in its RAM-backed rootfs.
const GUEST_MEMORY_MIB: u32 = 256;
/// How often to look whether QEMU has exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How often [`Qemu::wait_heartbeat`] looks at the heartbeats so far; the guest prints about
/// a hundred a second, so this costs a couple of them in latency.
const HEARTBEAT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// `quiet` keeps kernel messages out of the report lines; `panic=-1` turns a guest panic
/// (e.g. /init dying) into a reboot, which `-no-reboot` turns into QEMU exiting.
const KERNEL_CMDLINE_BASE: &str = "console=ttyS0 quiet panic=-1";
/// Set this variable to see the guest's console live on stderr (with `--nocapture`).
const ECHO_ENV: &str = "STRAIT_GUEST_ECHO";
const RESULT_MARKER: &str = "STRAIT-RESULT ";
/// One read from a QEMU output pipe.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The longest line kept whole: the guest's lines are under 200 bytes, so a longer one is
/// noise (a kernel dump); cutting it keeps the unfinished-line buffer bounded.
const LINE_BYTES_MAX: usize = 4096;
const VERDICT_MARKER: &str = "STRAIT-VERDICT ";

/// The scenarios of `scripts/guest/init.sh`; see there for what each does and prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Random data written and read back with O_DIRECT: `offset length md5_written md5_read
    /// md5_disk`.
    Rw,
    /// Data written, then fsync (virtio FLUSH): `offset length write_cache md5_written flush`.
    Flush,
    /// Data written, discarded, read back as zeros: `offset length discard_max_bytes
    /// discard_granularity md5_before md5_after md5_zeros`.
    Discard,
    /// A read-only disk refuses a write and serves reads: `ro write md5_disk`.
    ReadOnly,
    /// Geometry: `size_sectors size_bytes logical_block_size physical_block_size num_queues ro
    /// serial discard_max_bytes write_zeroes_max_bytes write_cache`.
    Info,
    /// Reads a range and the whole disk: `offset length md5_read md5_disk`.
    Verify,
    /// The live-migration workload for `strait.arg` seconds (see `common::migrate`): a
    /// heartbeat per 4 KiB block written, memory rewritten meanwhile, the region checked at
    /// the end: `duration_s`, then at the end (so a migrated guest reports them on the
    /// destination) `offset length block_size mem_copies end_uptime_s migrate_iterations
    /// blocks_checked blocks_bad md5_region`.
    Migrate,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Rw => "rw",
            Scenario::Flush => "flush",
            Scenario::Discard => "discard",
            Scenario::ReadOnly => "ro",
            Scenario::Info => "info",
            Scenario::Verify => "verify",
            Scenario::Migrate => "migrate",
        }
    }
}

/// How to start QEMU; build with [`QemuConfig::new`] and the chained setters.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub guest: Guest,
    /// The vhost-user socket the backend listens on; QEMU connects to it.
    pub socket: PathBuf,
    pub scenario: Scenario,
    /// `strait.arg`: the scenario's length in MiB (1..=64), or for [`Scenario::Migrate`] its
    /// duration in seconds (1..=600); `None` for the scenario's default.
    pub arg: Option<u32>,
    /// `strait.off`: byte offset of the tested range (4 KiB aligned); `None` for 1 MiB.
    pub offset_bytes: Option<u64>,
    pub num_queues: u16,
    pub cpus: u16,
    /// Reconnect to the backend this many seconds after it goes away (chardev `reconnect`).
    pub reconnect_s: Option<u32>,
    /// Where QEMU serves QMP, one monitor per socket (as servers that do not wait for a
    /// client): a migration test holds one, the engine another.
    pub qmp_sockets: Vec<PathBuf>,
    /// Start as a migration destination: `-incoming defer` (the address comes later, with
    /// QMP `migrate-incoming`) and `-S`: the guest stays paused (`query-status` says
    /// `inmigrate`, then `paused`) even once the incoming migration completed, until QMP
    /// `cont`.
    pub incoming_paused: bool,
    /// Appended to QEMU's command line.
    pub extra_args: Vec<String>,
    /// Appended to the kernel command line.
    pub extra_append: Vec<String>,
}

impl QemuConfig {
    /// One vCPU, one queue, the scenario's default length and offset.
    pub fn new(guest: &Guest, socket: &Path, scenario: Scenario) -> Self {
        QemuConfig {
            guest: guest.clone(),
            socket: socket.to_owned(),
            scenario,
            arg: None,
            offset_bytes: None,
            num_queues: 1,
            cpus: 1,
            reconnect_s: None,
            qmp_sockets: Vec::new(),
            incoming_paused: false,
            extra_args: Vec::new(),
            extra_append: Vec::new(),
        }
    }

    pub fn arg_mib(mut self, mib: u32) -> Self {
        self.arg = Some(mib);
        self
    }

    /// How long [`Scenario::Migrate`] runs, in seconds of guest uptime (1..=600; default 60).
    pub fn duration_s(mut self, seconds: u32) -> Self {
        self.arg = Some(seconds);
        self
    }

    pub fn offset_bytes(mut self, offset: u64) -> Self {
        self.offset_bytes = Some(offset);
        self
    }

    /// Queues of the virtio-blk device; also gives the guest as many vCPUs (the guest maps
    /// one queue per CPU, so extra queues on one CPU would sit idle).
    pub fn num_queues(mut self, num_queues: u16) -> Self {
        self.num_queues = num_queues;
        self.cpus = num_queues;
        self
    }

    pub fn cpus(mut self, cpus: u16) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn reconnect_s(mut self, seconds: u32) -> Self {
        self.reconnect_s = Some(seconds);
        self
    }

    /// Adds a QMP monitor on `path`; call again for another one.
    pub fn qmp_socket(mut self, path: &Path) -> Self {
        self.qmp_sockets.push(path.to_owned());
        self
    }

    /// A migration destination: waits, paused, for QMP `migrate-incoming`, and after the
    /// migration for `cont`. Give it the same configuration as the source (machine, memory,
    /// kernel, scenario) and its own backend socket; QEMU refuses incoming state that does
    /// not match its devices.
    pub fn incoming_paused(mut self) -> Self {
        self.incoming_paused = true;
        self
    }

    pub fn extra_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    pub fn append(mut self, kernel_param: impl Into<String>) -> Self {
        self.extra_append.push(kernel_param.into());
        self
    }

    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = format!("{KERNEL_CMDLINE_BASE} strait.test={}", self.scenario.name());
        if let Some(arg) = self.arg {
            cmdline.push_str(&format!(" strait.arg={arg}"));
        }
        if let Some(offset) = self.offset_bytes {
            cmdline.push_str(&format!(" strait.off={offset}"));
        }
        for param in &self.extra_append {
            cmdline.push(' ');
            cmdline.push_str(param);
        }
        cmdline
    }

    /// QEMU's arguments. No `-nographic`: it would claim stdio for a serial+monitor mux,
    /// while here stdio carries the serial console alone and there is no monitor.
    pub fn args(&self) -> Vec<String> {
        let memory = GUEST_MEMORY_MIB;
        let mut chardev = format!("socket,id=c0,path={}", self.socket.display());
        if let Some(seconds) = self.reconnect_s {
            chardev.push_str(&format!(",reconnect={seconds}"));
        }
        let mut args: Vec<String> = vec![
            // KVM hangs on these machines (FACTS.md); TCG works everywhere.
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "pc".into(),
            // No NIC, VGA, floppy or CD-ROM: less to emulate and probe at boot.
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{memory}M"),
            // vhost-user backends map guest RAM, so it must be a shareable memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!(
                "vhost-user-blk-pci,chardev=c0,num-queues={}",
                self.num_queues
            ),
            "-kernel".into(),
            self.guest.kernel.display().to_string(),
            "-initrd".into(),
            self.guest.initramfs.display().to_string(),
            "-append".into(),
            self.kernel_cmdline(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
        ];
        for qmp in &self.qmp_sockets {
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if self.incoming_paused {
            args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// The guest's final word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail { reason: String },
}

/// Everything the guest reported in one run.
#[derive(Clone, Debug)]
pub struct GuestReport {
    /// The `key=value` pairs of all `STRAIT-RESULT` lines; a repeated key keeps its last value.
    pub results: BTreeMap<String, String>,
    pub verdict: Verdict,
    /// The whole serial console, plus QEMU's stderr lines prefixed `[qemu stderr]`.
    pub console: String,
    /// From spawning QEMU to the verdict.
    pub elapsed: Duration,
}

impl GuestReport {
    /// Prints the scenario, its time and what the guest reported (shown on failure).
    pub fn log(&self, scenario: Scenario) {
        eprintln!(
            "guest {} finished in {:.1} s: {:?} {:?}",
            scenario.name(),
            self.elapsed.as_secs_f64(),
            self.verdict,
            self.results
        );
    }

    pub fn is_pass(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// Panics with the console unless the verdict is PASS.
    pub fn assert_pass(&self) {
        assert!(
            self.is_pass(),
            "guest verdict {:?}; console:\n{}",
            self.verdict,
            self.console
        );
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// The value of `key`; panics with the console if the guest did not report it.
    pub fn value(&self, key: &str) -> &str {
        match self.get(key) {
            Some(value) => value,
            None => panic!("guest did not report {key:?}; console:\n{}", self.console),
        }
    }

    /// The value of `key` as a number; panics with the console if absent or not a number.
    pub fn value_u64(&self, key: &str) -> u64 {
        let value = self.value(key);
        match value.parse() {
            Ok(number) => number,
            Err(_) => panic!(
                "guest reported {key}={value:?}, not a number; console:\n{}",
                self.console
            ),
        }
    }
}

/// What one console line says, for [`parse_console_line`].
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleLine {
    /// Not for the harness (kernel messages, tool errors).
    Other,
    Results(Vec<(String, String)>),
    Verdict(Verdict),
    /// A verdict marker with something unparsable after it.
    BadVerdict,
}

/// Parses one console line. The markers may appear after other text: a kernel message can
/// share the serial line with the guest's output.
pub fn parse_console_line(line: &str) -> ConsoleLine {
    let line = line.trim_end();
    if let Some(at) = line.find(RESULT_MARKER) {
        let pairs = line[at + RESULT_MARKER.len()..]
            .split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        return ConsoleLine::Results(pairs);
    }
    let Some(at) = line.find(VERDICT_MARKER) else {
        return ConsoleLine::Other;
    };
    let rest = line[at + VERDICT_MARKER.len()..].trim();
    if rest == "PASS" {
        return ConsoleLine::Verdict(Verdict::Pass);
    }
    match rest.strip_prefix("FAIL") {
        Some(tail) => {
            let tail = tail.trim();
            let reason = tail.strip_prefix("reason=").unwrap_or(tail);
            ConsoleLine::Verdict(Verdict::Fail {
                reason: reason.to_owned(),
            })
        }
        None => ConsoleLine::BadVerdict,
    }
}

enum ConsoleEvent {
    Line(String),
    Closed,
}

/// A running QEMU with the test guest; killed on drop.
pub struct Qemu {
    child: Child,
    events: Receiver<ConsoleEvent>,
    /// Invariant: holds every console line received so far, in order, and QEMU's stderr.
    transcript: Arc<Mutex<String>>,
    /// Invariant: every complete `STRAIT-HB` console line received so far, in order.
    heartbeats: Arc<Mutex<Vec<HeartbeatArrival>>>,
    /// Invariant: the console's bytes after its last newline, at most [`LINE_BYTES_MAX`].
    unfinished: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    results: BTreeMap<String, String>,
    started: Instant,
}

impl Qemu {
    /// Starts QEMU. The backend must already listen on `config.socket` (QEMU connects once
    /// at startup and exits if nobody answers, unless `reconnect_s` is set).
    pub fn spawn(config: &QemuConfig) -> Result<Self, HarnessError> {
        let started = Instant::now();
        let mut child = kill_with_parent(
            Command::new(QEMU_BINARY)
                .args(config.args())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            program: QEMU_BINARY.into(),
            source,
        })?;
        let transcript = Arc::new(Mutex::new(String::new()));
        let heartbeats = Arc::new(Mutex::new(Vec::new()));
        let unfinished = Arc::new(Mutex::new(Vec::new()));
        let (sender, events) = mpsc::channel();
        let echo = std::env::var_os(ECHO_ENV).is_some();
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let sink = LineSink {
                prefix: "",
                transcript: Arc::clone(&transcript),
                heartbeats: Some(Arc::clone(&heartbeats)),
                unfinished: Arc::clone(&unfinished),
                sender: Some(sender),
                echo,
            };
            readers.push(thread::spawn(move || read_lines(stdout, &sink)));
        }
        if let Some(stderr) = child.stderr.take() {
            let sink = LineSink {
                prefix: "[qemu stderr] ",
                transcript: Arc::clone(&transcript),
                heartbeats: None,
                unfinished: Arc::new(Mutex::new(Vec::new())),
                sender: None,
                echo,
            };
            readers.push(thread::spawn(move || read_lines(stderr, &sink)));
        }
        Ok(Qemu {
            child,
            events,
            transcript,
            heartbeats,
            unfinished,
            readers,
            results: BTreeMap::new(),
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.transcript
            .lock()
            .map(|t| t.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// The line the console ends with, not finished yet: on a migration source that stopped
    /// mid-line, the start of a line whose rest the destination prints. Empty when the
    /// console ends with a newline.
    pub fn unfinished_line(&self) -> String {
        let unfinished = self.unfinished.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&unfinished).into_owned()
    }

    /// The heartbeats of [`Scenario::Migrate`] so far, with the host time each line arrived,
    /// in order (see `common::migrate` for what to compute from them).
    pub fn heartbeat_arrivals(&self) -> Vec<HeartbeatArrival> {
        self.heartbeats
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Waits until the guest printed heartbeat `min_i` or a later one, and returns the latest
    /// one so far: the workload is running, e.g. time to start a migration. Fails if QEMU
    /// exits first or on timeout (QEMU is left running then).
    pub fn wait_heartbeat(
        &mut self,
        min_i: u64,
        timeout: Duration,
    ) -> Result<Heartbeat, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let latest = self.heartbeats.lock().ok().and_then(|h| h.last().copied());
            if let Some(arrival) = latest.filter(|a| a.heartbeat.i >= min_i) {
                return Ok(arrival.heartbeat);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(HarnessError::NoVerdict {
                    status: status.to_string(),
                    console: self.finish_transcript(),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::HeartbeatTimeout {
                    min_i,
                    timeout,
                    console: self.console(),
                });
            }
            thread::sleep(HEARTBEAT_POLL_INTERVAL);
        }
    }

    /// Waits for the guest's verdict, then for QEMU to exit (the guest powers off after it).
    /// On timeout QEMU is killed and the error carries the console so far.
    pub fn wait_verdict(&mut self, timeout: Duration) -> Result<GuestReport, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match self.events.recv_timeout(remaining) {
                Ok(ConsoleEvent::Line(line)) => line,
                Ok(ConsoleEvent::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(QEMU_EXIT_TIMEOUT);
                    return Err(HarnessError::NoVerdict {
                        status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                        console: self.finish_transcript(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    kill_and_reap(&mut self.child);
                    return Err(HarnessError::VerdictTimeout {
                        timeout,
                        console: self.finish_transcript(),
                    });
                }
            };
            match parse_console_line(&line) {
                ConsoleLine::Other => {}
                ConsoleLine::Results(pairs) => self.results.extend(pairs),
                ConsoleLine::BadVerdict => {
                    kill_and_reap(&mut self.child);
                    return Err(HarnessError::BadVerdict {
                        line,
                        console: self.finish_transcript(),
                    });
                }
                ConsoleLine::Verdict(verdict) => {
                    let elapsed = self.started.elapsed();
                    self.wait_exit(QEMU_EXIT_TIMEOUT)?;
                    return Ok(GuestReport {
                        results: std::mem::take(&mut self.results),
                        verdict,
                        console: self.finish_transcript(),
                        elapsed,
                    });
                }
            }
        }
    }

    /// Waits up to `timeout` for QEMU to exit; kills it and fails if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(EXIT_POLL_INTERVAL),
                Ok(None) => {
                    kill_and_reap(&mut self.child);
                    return Err(HarnessError::ExitTimeout {
                        timeout,
                        console: self.finish_transcript(),
                    });
                }
                Err(e) => return Err(HarnessError::io("wait for", QEMU_BINARY, e)),
            }
        }
    }

    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// The transcript once QEMU is gone: the readers hit end of file, so joining them makes
    /// sure the last lines (QEMU's error messages, typically) are in it.
    fn finish_transcript(&mut self) -> String {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
        }
        self.console()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Where [`read_lines`] puts what it reads from one of QEMU's outputs.
struct LineSink {
    /// Put before each line in the transcript.
    prefix: &'static str,
    transcript: Arc<Mutex<String>>,
    /// Heartbeat lines, with their arrival time (the console only).
    heartbeats: Option<Arc<Mutex<Vec<HeartbeatArrival>>>>,
    /// The bytes read after the last newline.
    unfinished: Arc<Mutex<Vec<u8>>>,
    /// Every line, for [`Qemu::wait_verdict`] (the console only); told when the output ends.
    sender: Option<Sender<ConsoleEvent>>,
    /// Also print each line on stderr.
    echo: bool,
}

/// Copies `source` line by line into `sink` until end of file. The console is bytes, not
/// necessarily UTF-8, and ends lines with "\r\n". Reads whatever the pipe holds rather than
/// waiting for a newline, so the bytes after the last newline (a source QEMU that stopped
/// mid-line never finishes that line) are visible in `sink.unfinished` at once, not only when
/// QEMU exits.
fn read_lines(mut source: impl Read, sink: &LineSink) {
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = match source.read(&mut chunk) {
            // A signal, as `read_until` retried it before.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The downtime measurement: taken as soon as the bytes are in.
        let arrived = Instant::now();
        let mut lines = Vec::new();
        {
            let mut pending = sink.unfinished.lock().unwrap_or_else(|p| p.into_inner());
            for &byte in &chunk[..n] {
                if byte == b'\n' {
                    lines.push(std::mem::take(&mut *pending));
                } else if pending.len() < LINE_BYTES_MAX {
                    pending.push(byte);
                }
            }
        }
        for line in lines {
            take_line(&line, arrived, true, sink);
        }
    }
    // End of file: a line without its newline is the end of a QEMU that stopped mid-line
    // (a migration source): it goes in the transcript, but its heartbeat, if any, is
    // incomplete.
    let rest = std::mem::take(&mut *sink.unfinished.lock().unwrap_or_else(|p| p.into_inner()));
    if !rest.is_empty() {
        take_line(&rest, Instant::now(), false, sink);
    }
    if let Some(sender) = &sink.sender {
        let _ = sender.send(ConsoleEvent::Closed);
    }
}

/// Puts one line (without its newline) that arrived at `arrived` into `sink`.
fn take_line(bytes: &[u8], arrived: Instant, complete: bool, sink: &LineSink) {
    let line = String::from_utf8_lossy(bytes)
        .trim_end_matches(['\r', '\n'])
        .to_owned();
    if sink.echo {
        eprintln!("[guest] {}{line}", sink.prefix);
    }
    {
        let mut transcript = sink.transcript.lock().unwrap_or_else(|p| p.into_inner());
        transcript.push_str(sink.prefix);
        transcript.push_str(&line);
        transcript.push('\n');
    }
    if let (Some(heartbeats), true) = (&sink.heartbeats, complete) {
        if let Some(heartbeat) = parse_heartbeat(&line) {
            let mut heartbeats = heartbeats.lock().unwrap_or_else(|p| p.into_inner());
            heartbeats.push(HeartbeatArrival { heartbeat, arrived });
        }
    }
    if let Some(sender) = &sink.sender {
        // The receiver is gone once the test stopped listening; keep draining the pipe
        // into the transcript so QEMU never blocks writing to a full pipe.
        let _ = sender.send(ConsoleEvent::Line(line));
    }
}
