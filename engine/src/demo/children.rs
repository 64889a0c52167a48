//! The demo's child processes (two engines, two QEMUs): none outlives the demo.
//!
//! Each child runs in its own process group, so a Ctrl-C at the terminal reaches only the
//! demo, which then stops the children in order (QEMUs before the engines they are
//! attached to). Each also gets `PR_SET_PDEATHSIG`, so a demo killed outright (SIGKILL)
//! still takes them with it. Dropping a [`ChildProcess`] stops it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{DemoError, Interrupt};

/// How long an engine may take to exit after SIGTERM: it disconnects its VMM, finishes the
/// requests in flight and flushes its image, which takes milliseconds; a loaded 2-core
/// machine gets a margin. After it, SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// How long a process may take to be reaped after SIGKILL (the kernel tears down its
/// memory: QEMU's 256 MiB guest RAM); beyond this it is stuck in the kernel and is left.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often to look whether a child exited or a socket appeared.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The end of a log shown in an error: the last lines of an engine's or QEMU's stderr
/// say why it stopped.
const LOG_TAIL_BYTES: u64 = 4096;

/// How a child is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, then SIGKILL after [`TERM_GRACE`] (an engine flushes its image).
    Graceful,
    /// SIGKILL at once (a QEMU whose guest is no longer needed).
    Kill,
}

/// A running child process with its stderr log.
pub struct ChildProcess {
    pub name: String,
    child: Child,
    log: PathBuf,
    stop: Stop,
    /// Set once it has been reaped.
    status: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `command` with stdin from /dev/null, stderr to `log`, and stdout piped if
    /// `pipe_stdout` (to /dev/null otherwise).
    pub fn spawn(
        name: &str,
        command: &mut Command,
        log: &Path,
        pipe_stdout: bool,
        stop: Stop,
    ) -> Result<ChildProcess, DemoError> {
        let stderr = File::create(log).map_err(|e| DemoError::io("create log", log, e))?;
        command
            .stdin(Stdio::null())
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(stderr)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; prctl is a plain system call and touches
        // no memory of the parent. Linux ties the signal to the forking thread: the demo
        // spawns every child from its main thread, which lives as long as the demo.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| DemoError::Spawn {
            what: name.to_owned(),
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            stop,
            status: None,
        })
    }

    /// The piped stdout, once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Fails if it has exited (it should be running).
    pub fn ensure_running(&mut self) -> Result<(), DemoError> {
        match self.exited() {
            Some(status) => Err(DemoError::ChildExited {
                what: self.name.clone(),
                status: status.to_string(),
                log: self.log_tail(),
            }),
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until `path` is a Unix socket (the child created it), failing early if the
    /// child exits, on interrupt, or after `timeout`.
    pub fn wait_socket(
        &mut self,
        path: &Path,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            let is_socket = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if is_socket {
                return Ok(());
            }
            self.ensure_running()?;
            interrupt.check()?;
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: format!("{} to create {}", self.name, path.display()),
                    timeout,
                    log: self.log_tail(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The end of its stderr log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Stops it as its [`Stop`] says, and reaps it.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if self.stop == Stop::Graceful {
            // SAFETY: kill(2) with a pid and a signal number touches no memory. The pid is
            // our own child, not yet reaped (exited() above returned None and nothing else
            // waits for it), so it cannot name a recycled process.
            let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if rc == 0 && self.wait_exit(TERM_GRACE).is_some() {
                return;
            }
            tracing::warn!(child = %self.name, "did not exit on SIGTERM; killing it");
        }
        let _ = self.child.kill();
        if self.wait_exit(KILL_REAP_TIMEOUT).is_none() {
            tracing::warn!(child = %self.name, "still not reaped after SIGKILL");
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last [`LOG_TAIL_BYTES`] of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_ignores_sigterm_is_killed_and_an_exited_one_reports() {
        let dir = std::env::temp_dir().join(format!("strait-demo-children-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut quick = ChildProcess::spawn(
            "quick",
            Command::new("sh").args(["-c", "echo bye >&2; exit 3"]),
            &dir.join("quick.log"),
            false,
            Stop::Graceful,
        )
        .unwrap();
        assert!(quick.wait_exit(Duration::from_secs(10)).is_some());
        let err = quick.ensure_running().unwrap_err().to_string();
        assert!(err.contains("quick") && err.contains("bye"), "{err}");

        let mut sleeper = ChildProcess::spawn(
            "sleeper",
            Command::new("sleep").arg("600"),
            &dir.join("sleeper.log"),
            false,
            Stop::Kill,
        )
        .unwrap();
        let started = Instant::now();
        sleeper.stop();
        assert!(sleeper.exited().is_some());
        assert!(started.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
