//! Named network namespaces: creating them with `ip netns`, running code inside one,
//! configuring them, and removing them, including those a dead process left behind.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tracing::{debug, info, warn};

use super::{sys, WanemError};

/// Where `ip netns` binds named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Prefix of the namespace that holds side A; the creator's pid and an instance number
/// follow, so parallel emulators never collide and stale ones can be traced to their owner.
pub(crate) const PREFIX_A: &str = "strait-wa-";
/// Prefix of the namespace that holds side B.
pub(crate) const PREFIX_B: &str = "strait-wb-";

/// Runs `ip ARGS`, turning a failure into an error that names the whole command line.
pub(crate) fn ip(args: &[&str]) -> Result<(), WanemError> {
    let command = format!("ip {}", args.join(" "));
    debug!(%command, "run");
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| WanemError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(WanemError::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The path `ip netns` binds namespace `name` to.
pub(crate) fn ns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Runs `f` on a helper thread that has entered namespace `name`, and returns its result.
/// The caller's threads stay where they are.
pub(crate) fn run_in<T, F>(name: &str, f: F) -> Result<T, WanemError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = ns_path(name);
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, move || -> Result<T, io::Error> {
                sys::enter_netns(&path)?;
                Ok(f())
            })
            .map_err(|source| WanemError::SpawnThread {
                name: format!("netns-{name}"),
                source,
            })?;
        match handle.join() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(WanemError::EnterNamespace {
                namespace: name.to_string(),
                source,
            }),
            Err(_) => Err(WanemError::HelperPanicked {
                namespace: name.to_string(),
            }),
        }
    })
}

/// Writes `value` to the sysctl at `/proc/sys/KEY` of the calling thread's network
/// namespace (the `net` subtree follows the thread's namespace, not the process's).
/// Returns `Ok(false)` when the key does not exist in this kernel.
pub(crate) fn write_sysctl(key: &str, value: &str) -> io::Result<bool> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    match std::fs::write(&path, value) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// A namespace's `/proc/net/dev`, opened by a thread inside it: the open file keeps
/// reporting that namespace's devices whichever thread reads it later.
pub(crate) struct DeviceStatsFile {
    file: Mutex<File>,
}

impl DeviceStatsFile {
    /// Opens the calling thread's namespace's device statistics.
    pub(crate) fn open_here() -> io::Result<DeviceStatsFile> {
        Ok(DeviceStatsFile {
            file: Mutex::new(File::open("/proc/thread-self/net/dev")?),
        })
    }

    /// Packets the kernel dropped when queueing them for transmission on `device`; `None`
    /// if the statistics cannot be read.
    pub(crate) fn tx_dropped(&self, device: &str) -> Option<u64> {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.seek(SeekFrom::Start(0)).ok()?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        parse_tx_dropped(&text, device)
    }
}

/// Finds `device`'s transmit drop counter in the text of `/proc/net/dev`: after the name
/// come 8 receive counters, then transmit bytes, packets, errs, drop.
fn parse_tx_dropped(text: &str, device: &str) -> Option<u64> {
    const TX_DROP_FIELD: usize = 11;
    text.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != device {
            return None;
        }
        counters.split_whitespace().nth(TX_DROP_FIELD)?.parse().ok()
    })
}

/// A pair of named namespaces, removed when dropped.
pub(crate) struct NamespacePair {
    pub(crate) a: String,
    pub(crate) b: String,
    /// Invariant: the names in here exist (we created them and have not removed them).
    created: Vec<String>,
}

impl NamespacePair {
    /// Creates `a` and `b`. A namespace that already has one of these names can only be
    /// left from an earlier process with our pid (instance numbers are ours alone), so it is
    /// replaced.
    pub(crate) fn create(a: String, b: String) -> Result<NamespacePair, WanemError> {
        let mut pair = NamespacePair {
            a,
            b,
            created: Vec::new(),
        };
        for name in [pair.a.clone(), pair.b.clone()] {
            if ns_path(&name).exists() {
                warn!(namespace = %name, "replacing a namespace left by an earlier process with this pid");
                ip(&["netns", "delete", &name])?;
            }
            ip(&["netns", "add", &name])?;
            pair.created.push(name);
        }
        Ok(pair)
    }
}

impl Drop for NamespacePair {
    fn drop(&mut self) {
        for name in self.created.drain(..) {
            match ip(&["netns", "delete", &name]) {
                Ok(()) => debug!(namespace = %name, "deleted"),
                Err(err) => warn!(namespace = %name, error = %err, "could not delete namespace"),
            }
        }
    }
}

/// The creator pid encoded in an emulator namespace's name, if it is one of ours.
pub(crate) fn creator_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(PREFIX_A)
        .or_else(|| name.strip_prefix(PREFIX_B))?;
    let (pid, instance) = rest.split_once('-')?;
    instance.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes emulator namespaces whose creating process has exited (a crash or a kill -9
/// skips Drop). Failures are logged, not returned: another process may be cleaning up
/// the same leftovers at the same moment.
pub(crate) fn remove_stale() {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return,
        Err(err) => {
            warn!(dir = NETNS_RUN_DIR, error = %err, "cannot list namespaces");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match ip(&["netns", "delete", &name]) {
            Ok(()) => info!(namespace = %name, pid, "removed stale namespace of a dead process"),
            Err(err) => warn!(namespace = %name, error = %err, "could not remove stale namespace"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_dropped_is_found_by_device() {
        let text = "Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  wan0:    1000      10    0    0    0     0          0         0     2000      20    0   17    0     0       0          0
";
        assert_eq!(parse_tx_dropped(text, "wan0"), Some(17));
        assert_eq!(parse_tx_dropped(text, "lo"), Some(0));
        assert_eq!(parse_tx_dropped(text, "eth0"), None);
    }

    #[test]
    fn creator_pid_parses_only_our_names() {
        assert_eq!(creator_pid("strait-wa-1234-0"), Some(1234));
        assert_eq!(creator_pid("strait-wb-99-17"), Some(99));
        assert_eq!(creator_pid("strait-wa-1234"), None);
        assert_eq!(creator_pid("strait-wx-1234-0"), None);
        assert_eq!(creator_pid("other"), None);
        assert_eq!(creator_pid("strait-wa-x-1"), None);
    }
}
