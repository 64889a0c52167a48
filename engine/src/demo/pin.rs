//! The demo's cores: the guest's vCPU gets a core of its own, everything else shares the
//! rest (`--share-cores` turns this off).
//!
//! On two hosts the source guest's vCPU would compete with nothing strait or the WAN does:
//! the destination QEMU, the destination engine and the WAN's forwarder live elsewhere, and
//! a host's migration work runs on other cores than a pinned vCPU (libvirt's `vcpupin`).
//! On one 2-core machine they all compete with it, and the workload's slowdown during a
//! migration measured mostly that: in the sweep at 760bd8e, before any throttle, the
//! guest's heartbeats ran 19–53% slower in the memory phase than before the migration.
//! So the demo moves itself (and with it every child it starts: engines, the WAN emulator,
//! both QEMUs) onto all allowed cores but the last, and then each QEMU's vCPU thread onto
//! the last one. Both guests' vCPUs share that core: the destination's runs only after the
//! source's stopped.

use std::path::Path;

use strait_vmm::{QemuVmm, VmmError};

use super::DemoError;

/// Which cores the demo's processes run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSplit {
    /// Every thread but the guests' vCPUs.
    pub host: Vec<usize>,
    /// The guests' vCPU threads.
    pub guest: usize,
}

impl CpuSplit {
    /// The split of the cores this thread may run on, or `None` with fewer than two.
    pub fn detect() -> Result<Option<CpuSplit>, DemoError> {
        let allowed = allowed_cpus().map_err(|e| DemoError::Pin {
            what: "read this thread's CPU affinity".into(),
            source: e,
        })?;
        Ok(CpuSplit::of(&allowed))
    }

    fn of(allowed: &[usize]) -> Option<CpuSplit> {
        let (&guest, host) = allowed.split_last()?;
        if host.is_empty() {
            return None;
        }
        Some(CpuSplit {
            host: host.to_vec(),
            guest,
        })
    }

    /// Moves the calling thread (and so everything it starts from now on) to the host
    /// cores.
    pub fn pin_self(&self) -> Result<(), DemoError> {
        set_affinity(0, &self.host).map_err(|e| DemoError::Pin {
            what: format!("move the demo to cores {:?}", self.host),
            source: e,
        })
    }

    /// Moves the vCPU threads of the QEMU behind `qmp` to the guest core.
    pub fn pin_vcpus(&self, qemu: &'static str, qmp: &Path) -> Result<(), DemoError> {
        for tid in vcpu_threads(qemu, qmp)? {
            set_affinity(tid, &[self.guest]).map_err(|e| DemoError::Pin {
                what: format!("move the {qemu}'s vCPU thread {tid} to core {}", self.guest),
                source: e,
            })?;
        }
        Ok(())
    }
}

/// The thread ids of a QEMU's vCPUs (`query-cpus-fast`).
fn vcpu_threads(qemu: &'static str, qmp: &Path) -> Result<Vec<i32>, DemoError> {
    let command = "query-cpus-fast";
    let vmm = QemuVmm::connect(qmp).map_err(|e| DemoError::Pin {
        what: format!("connect to the {qemu}'s QMP socket {}", qmp.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let threads = vmm.vcpu_threads().map_err(|e| match e {
        VmmError::Qmp(source) => DemoError::Qmp {
            qemu,
            command: command.into(),
            source: Box::new(source),
        },
        other => DemoError::Pin {
            what: format!("ask the {qemu} for its vCPU threads"),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    if threads.is_empty() {
        return Err(DemoError::Pin {
            what: format!("find the {qemu}'s vCPU threads: `{command}` named none"),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    Ok(threads)
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; 0 is this thread.
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // CPU_SETSIZE is 1024: the set's own size, so the loop reads only inside it.
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
fn set_affinity(tid: i32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; `tid` is a thread id or 0.
    let ret = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_allowed_core_is_the_guests_and_one_core_is_not_split() {
        assert_eq!(
            CpuSplit::of(&[0, 1]),
            Some(CpuSplit {
                host: vec![0],
                guest: 1
            })
        );
        assert_eq!(
            CpuSplit::of(&[2, 5, 7]),
            Some(CpuSplit {
                host: vec![2, 5],
                guest: 7
            })
        );
        assert_eq!(CpuSplit::of(&[3]), None);
        assert_eq!(CpuSplit::of(&[]), None);
    }

    #[test]
    fn a_thread_pinned_to_one_of_its_cores_reads_back_that_core() {
        // A thread of its own, so the test runner's threads keep their affinity.
        std::thread::spawn(|| {
            let allowed = allowed_cpus().expect("sched_getaffinity");
            let &last = allowed.last().expect("a thread runs on some core");
            set_affinity(0, &[last]).expect("sched_setaffinity to an allowed core");
            assert_eq!(allowed_cpus().expect("sched_getaffinity"), vec![last]);
            // A core beyond the set is refused, not truncated.
            let err = set_affinity(0, &[libc::CPU_SETSIZE as usize])
                .expect_err("a core beyond CPU_SETSIZE");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        })
        .join()
        .expect("the pinned thread's checks");
    }
}
