//! Child processes (QEMU, qemu-storage-daemon, a backend under test) that never outlive the
//! test, and waiting for a backend's listening socket.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use super::HarnessError;

/// How often to look for a socket file; a backend creates it within milliseconds.
const SOCKET_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Makes `command`'s child die with SIGKILL when the spawning thread exits, so a test binary
/// that is itself killed (a CI timeout) leaves no QEMU behind holding sockets and images.
///
/// Linux ties the signal to the *thread* that forks: spawn from the test's own thread, not
/// from a helper thread that ends early.
pub fn kill_with_parent(command: &mut Command) -> &mut Command {
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

/// Kills and reaps `child`; the errors are ignored because the child may have exited already.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until `path` is a Unix socket, failing early if `child` (the process expected to
/// create it) exits. `log` is read into the error when it does, to show why.
pub fn wait_for_socket(
    path: &Path,
    child: &mut Child,
    what: &str,
    log: Option<&Path>,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        let is_socket = std::fs::metadata(path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if is_socket {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = log
                .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                .unwrap_or_default();
            return Err(HarnessError::ExitedBeforeSocket {
                what: what.to_owned(),
                path: path.to_owned(),
                status: status.to_string(),
                log,
            });
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::SocketTimeout {
                path: path.to_owned(),
                timeout,
            });
        }
        thread::sleep(SOCKET_POLL_INTERVAL);
    }
}
