//! Test fixtures: the "is QEMU installed" gate, per-test folders, QEMU processes that never
//! outlive the test, and a fake QMP server for hostile-input tests.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The QEMU system emulator.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// QEMU creates its QMP socket within milliseconds of starting; 30 s covers a machine whose
/// two cores are busy with builds and other guests.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Unix socket paths must fit in `sun_path` (108 bytes); this leaves room for file names.
const TEST_DIR_PATH_MAX: usize = 80;
/// Guest RAM. Enough for the firmware; small so a migration takes a fraction of a second.
pub const GUEST_MEMORY_MIB: u32 = 64;
/// How long the fake server waits for a client's line before giving up (so a broken test
/// ends instead of hanging).
const FAKE_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// True if QEMU is installed. If not, the test must not silently pass: under CI (the `CI`
/// variable is set) this panics, elsewhere it prints a loud skip message and returns false.
/// The same rule as the engine's test harness (`engine/tests/common/guest.rs`).
pub fn require_qemu() -> bool {
    if on_path(QEMU_BINARY) {
        return true;
    }
    let message =
        format!("QEMU test needs {QEMU_BINARY} on PATH (run scripts/install-deps.sh as root)");
    if std::env::var_os("CI").is_some() {
        panic!("{message}; CI must not skip it");
    }
    eprintln!("\n**********\n*** SKIPPED: {message}\n**********\n");
    false
}

/// A fresh temporary folder for one test, removed on drop, short enough for sockets.
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("strait-{prefix}-"))
        .tempdir()
        .expect("create a temporary test folder");
    let length = dir.path().as_os_str().len();
    assert!(
        length <= TEST_DIR_PATH_MAX,
        "temporary folder {} is {length} bytes long, too long for Unix sockets inside it; \
         point TMPDIR at a shorter path",
        dir.path().display()
    );
    dir
}

/// How a test QEMU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Running at once.
    Running,
    /// `-S`: created paused (prelaunch), for `cont`.
    Paused,
    /// `-incoming defer`: a migration destination waiting for `migrate-incoming`.
    Incoming,
    /// `-incoming defer -S`: a destination that stays paused after the migration.
    IncomingPaused,
}

/// A QEMU with no disk, no kernel and no devices (the guest sits in the firmware), killed
/// and reaped on drop.
pub struct Qemu {
    child: Child,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Qemu {
    /// Starts QEMU named `name` in `dir` and waits for its QMP socket.
    pub fn start(dir: &Path, name: &str, start: Start) -> Qemu {
        Self::start_with(dir, name, start, &[])
    }

    /// [`Qemu::start`] with more arguments on QEMU's command line.
    pub fn start_with(dir: &Path, name: &str, start: Start, extra_args: &[&str]) -> Qemu {
        let qmp = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(QEMU_BINARY);
        command.args([
            // KVM hangs on these machines (FACTS.md); TCG works everywhere.
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-m",
        ]);
        command.arg(format!("{GUEST_MEMORY_MIB}M"));
        command
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if matches!(start, Start::Paused | Start::IncomingPaused) {
            command.arg("-S");
        }
        if matches!(start, Start::Incoming | Start::IncomingPaused) {
            command.args(["-incoming", "defer"]);
        }
        command.args(extra_args);
        let log_file = std::fs::File::create(&log).expect("create the QEMU log");
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log file"))
            .stderr(log_file);
        kill_with_parent(&mut command);
        let child = command.spawn().expect("spawn QEMU");
        let mut qemu = Qemu { child, qmp, log };
        qemu.wait_for_qmp_socket();
        qemu
    }

    fn wait_for_qmp_socket(&mut self) {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            let is_socket = std::fs::metadata(&self.qmp)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before creating {}: {}",
                    self.qmp.display(),
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no QMP socket at {} after {SOCKET_TIMEOUT:?}",
                self.qmp.display()
            );
            thread::sleep(SOCKET_POLL_INTERVAL);
        }
    }

    /// Waits up to `timeout` for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(SOCKET_POLL_INTERVAL);
        }
    }

    /// What QEMU wrote to stdout and stderr.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the child die with SIGKILL when the spawning thread exits, so a killed test binary
/// leaves no QEMU behind. Linux ties the signal to the thread that forks: spawn from the
/// test's own thread.
fn kill_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; prctl is a plain system call and touches no
    // memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Connects the QEMU driver to a QEMU the test has just started: QEMU creates its socket
/// file a moment before it listens, so the connection is retried for a while.
pub fn connect(qemu: &Qemu) -> strait_vmm::QemuVmm {
    let config = strait_vmm::qmp::QmpConfig {
        connect_timeout: SOCKET_TIMEOUT,
        ..strait_vmm::qmp::QmpConfig::default()
    };
    strait_vmm::QemuVmm::connect_with(&qemu.qmp, config).expect("connect to QEMU's QMP socket")
}

/// The QEMU 7.2 greeting, verbatim.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// The server end of one fake QMP connection.
pub struct FakeConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl FakeConn {
    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        // The client may have gone already (that is often the point of the test).
        let _ = self.writer.write_all(bytes);
    }

    /// Sends one line (adds QEMU's `\r\n`).
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Reads the client's next command; `None` once the client closed.
    pub fn read_command(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("the client sends JSON")),
        }
    }

    /// Sends the greeting and answers `qmp_capabilities`.
    pub fn handshake(&mut self) {
        self.send(GREETING);
        let command = self.read_command().expect("qmp_capabilities");
        assert_eq!(command["execute"], "qmp_capabilities");
        self.send(&format!(r#"{{"return": {{}}, "id": {}}}"#, command["id"]));
    }

    /// Closes the server's sending direction (the client reads end-of-stream).
    pub fn writer_shutdown(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }

    /// Waits until the client closes its end (or the read timeout passes).
    pub fn wait_client_close(&mut self) {
        while self.read_command().is_some() {}
    }
}

/// A fake QMP server on a Unix socket: accepts one client and runs `script` with it on a
/// thread. Join with [`FakeServer::join`] to see the script's panics.
pub struct FakeServer {
    pub path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(dir: &Path, script: impl FnOnce(FakeConn) + Send + 'static) -> FakeServer {
        let path = dir.join("fake.qmp");
        let listener = UnixListener::bind(&path).expect("bind the fake QMP socket");
        let thread = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(FAKE_READ_TIMEOUT))
                .expect("read timeout");
            let writer = stream.try_clone().expect("clone");
            script(FakeConn {
                reader: BufReader::new(stream),
                writer,
            });
        });
        FakeServer {
            path,
            thread: Some(thread),
        }
    }

    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the fake server's script panicked");
        }
    }
}

/// Where the memory-dirtying guest is loaded (the multiboot convention, 1 MiB).
const DIRTIER_LOAD_ADDRESS: u32 = 0x0010_0000;

/// Writes a tiny multiboot kernel that dirties guest memory forever (for QEMU's `-kernel`)
/// and returns its path. It needs no disk and no initramfs: QEMU's multiboot loader enters
/// it in 32-bit protected mode, and it stores a counter into the first word of every 4 KiB
/// page from 4 MiB to 8 MiB (1024 pages), over and over, so every migration pass finds
/// those pages dirty again.
pub fn memory_dirtier(dir: &Path) -> PathBuf {
    const MAGIC: u32 = 0x1BAD_B002;
    // Bit 16: the header gives the load addresses (the "a.out kludge"): a flat binary.
    const FLAGS: u32 = 0x0001_0000;
    const HEADER_BYTES: u32 = 32;
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)), // checksum: the three sum to 0
        DIRTIER_LOAD_ADDRESS,                         // header_addr
        DIRTIER_LOAD_ADDRESS,                         // load_addr
        0,                                            // load_end_addr: the whole file
        0,                                            // bss_end_addr: none
        DIRTIER_LOAD_ADDRESS + HEADER_BYTES,          // entry_addr: right after the header
    ];
    #[rustfmt::skip]
    let code: [u8; 26] = [
        0x31, 0xC0,                         //        xor eax, eax
        0xBF, 0x00, 0x00, 0x40, 0x00,       // outer: mov edi, 0x400000
        0x89, 0x07,                         // inner: mov [edi], eax
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, //        add edi, 0x1000
        0x81, 0xFF, 0x00, 0x00, 0x80, 0x00, //        cmp edi, 0x800000
        0x72, 0xF0,                         //        jb inner
        0x40,                               //        inc eax
        0xEB, 0xE8,                         //        jmp outer
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|word| word.to_le_bytes()).collect();
    image.extend_from_slice(&code);
    let path = dir.join("dirtier.bin");
    std::fs::write(&path, image).expect("write the memory-dirtying guest");
    path
}
