//! Slowing a guest's vCPU threads from outside the VMM: a CFS bandwidth quota on a cgroup
//! of the kernel's v1 `cpu` controller that holds only those threads, a child of the
//! cgroup they were in.
//!
//! QEMU's own throttle (auto-converge) applies a new value only at its next trigger, 1–8 s
//! after it is asked in the migration sweep (`docs/vmm.md`, "The throttle"). A quota acts
//! within the kernel's next period: measured with `bench/stun-cgroup-probe.py`, the first
//! 0.25 s after a change already ran at the new rate, and QMP stayed responsive
//! (`bench/results/stun-cgroup.md`). This module is that actuator; the migration uses it
//! with `throttle` "cgroup" (`engine/src/migration/stun.rs`).
//!
//! The v1 `cpu` controller places single threads (its `tasks` file takes thread ids); in
//! cgroup v2 that needs a threaded subtree, which is not handled here. The threads go back
//! to the cgroup each was in, and the cgroups are removed, on [`VcpuQuota::release`] or on
//! drop: a guest must never stay slowed after the migration that slowed it has ended,
//! whatever the way it ended.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The CFS period while the throttle leaves at least [`QUOTA_MIN_US`] per period: 10 ms,
/// the slice QEMU's own throttle runs a vCPU for between its sleeps, so a guest sees the
/// same granularity either way.
pub const PERIOD_US: u64 = 10_000;

/// The smallest quota the kernel accepts (1 ms, `min_cfs_quota_period`). Deeper throttles
/// lengthen the period instead of shrinking the quota below it.
pub const QUOTA_MIN_US: u64 = 1_000;

/// The longest period used: at 99%, 1 ms of run time per 100 ms. QEMU's throttle at 99%
/// sleeps 990 ms per 10 ms slice; a shorter period keeps the guest's timers ticking.
pub const PERIOD_MAX_US: u64 = 100_000;

/// The deepest throttle: the guest keeps 1% of a core per vCPU.
pub const THROTTLE_MAX_PCT: u8 = 99;

/// Where the kernel lists mounts, to find the v1 `cpu` hierarchy.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Distinguishes the cgroups of several quotas in one process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Why the quota could not be set up, changed or undone.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    /// No v1 `cpu` controller is mounted (cgroup v2 only, or no cgroups at all).
    #[error(
        "no cgroup v1 `cpu` hierarchy is mounted (in {MOUNTINFO}, nor where the vCPU threads \
         run); a vCPU quota needs one"
    )]
    NoCpuHierarchy,
    /// Nothing to slow.
    #[error("no vCPU thread ids were given")]
    NoThreads,
    /// A thread's own `cpu` cgroup could not be found.
    #[error("thread {tid} has no `cpu` cgroup in /proc/{tid}/cgroup")]
    NoThreadCgroup {
        /// The thread id.
        tid: i32,
    },
    /// A file operation on the cgroup filesystem failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
}

/// vCPU threads in cgroups of their own with a CFS quota: [`VcpuQuota::set_throttle`]
/// slows them at once.
///
/// Each thread's new cgroup is a child of the cgroup it was in (one child per distinct
/// origin), not a sibling at the hierarchy's root: a limit the VM's manager put on the
/// origin (libvirt's `vcpu_quota`, a systemd slice's `CPUQuota`) keeps applying on top,
/// since the kernel enforces every ancestor's quota, so a migration never gives a guest
/// more CPU than it had. It also makes the way back exact after a crash: the origin is the
/// parent, so a later [`VcpuQuota::attach`] that finds a child left by a process that no
/// longer runs lifts its quota and moves its threads up.
#[derive(Debug)]
pub struct VcpuQuota {
    groups: Vec<Group>,
    throttle_pct: u8,
    released: bool,
}

/// One cgroup made by a [`VcpuQuota`]: a child of `origin`, holding `tids`.
#[derive(Debug)]
struct Group {
    origin: PathBuf,
    dir: PathBuf,
    tids: Vec<i32>,
}

/// The prefix of the cgroups this module makes. The name goes on with the owner's process
/// id, the owner's start time (clock ticks since boot, field 22 of `/proc/PID/stat`) and a
/// counter: `strait-stun-PID-START-N`. The start time tells the owner from a later process
/// that reused its id. Names of the older form `strait-stun-PID-N` are still recognised.
const GROUP_PREFIX: &str = "strait-stun-";

/// How deep [`sweep_stale_quotas`] walks the hierarchy looking for cgroups left behind. Managers
/// nest a few levels (systemd's `machine.slice/machine-qemu….scope/vcpu0` under libvirt is
/// four); 16 covers any layout seen in practice and bounds the walk of a hostile or
/// looping tree.
const SWEEP_DEPTH_MAX: usize = 16;

/// How many cgroups [`sweep_stale_quotas`] looks at before it gives up: a host with thousands of
/// VMs has a few cgroups each; the bound keeps an engine's start from walking forever.
const SWEEP_ENTRIES_MAX: usize = 100_000;

impl VcpuQuota {
    /// Moves `threads` (thread ids, such as QEMU's `query-cpus-fast` reports) into new
    /// cgroups under the v1 `cpu` hierarchy, each a child of the thread's own, not slowed
    /// yet.
    pub fn attach(threads: &[i32]) -> Result<VcpuQuota, StunError> {
        if threads.is_empty() {
            return Err(StunError::NoThreads);
        }
        // `ip netns exec` (how the demo and the tests start the engines) gives a process a
        // mount namespace of its own, with a fresh sysfs and none of the cgroup mounts.
        // The VMM's process still sees the hierarchy: through its root, as it mounted it.
        let root = match cpu_hierarchy(&read(Path::new(MOUNTINFO))?) {
            Some(root) => root,
            None => {
                let vmm = format!("/proc/{}", threads[0]);
                let mounts = read(&Path::new(&vmm).join("mountinfo"))?;
                let mount = cpu_hierarchy(&mounts).ok_or(StunError::NoCpuHierarchy)?;
                Path::new(&vmm)
                    .join("root")
                    .join(mount.strip_prefix("/").unwrap_or(&mount))
            }
        };
        // Each origin cgroup and the threads that go from it into a child.
        let mut planned: Vec<(PathBuf, Vec<i32>)> = Vec::new();
        for &tid in threads {
            let cgroups = read(Path::new(&format!("/proc/{tid}/cgroup")))?;
            let cgroup = thread_cpu_cgroup(&cgroups).ok_or(StunError::NoThreadCgroup { tid })?;
            let mut origin = root.join(cgroup.trim_start_matches('/'));
            // A thread still in a cgroup left by an owner that is gone: that cgroup goes,
            // and the thread counts as in its parent, where it came from.
            if stale_owner(&origin).is_some() {
                sweep(&origin);
                if let Some(parent) = origin.parent().filter(|p| p.starts_with(&root)) {
                    origin = parent.to_path_buf();
                }
            }
            match planned.iter_mut().find(|(o, _)| *o == origin) {
                Some((_, tids)) => tids.push(tid),
                None => planned.push((origin, vec![tid])),
            }
        }
        let own = std::process::id();
        let id = format!(
            "{GROUP_PREFIX}{own}-{}-{}",
            start_ticks(own).unwrap_or(0),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        // From here on, drop undoes whatever was done: a group is listed once its cgroup
        // exists, and a thread once it was moved.
        let mut quota = VcpuQuota {
            groups: Vec::with_capacity(planned.len()),
            throttle_pct: 0,
            released: false,
        };
        for (origin, tids) in planned {
            sweep_stale_children(&origin);
            let dir = origin.join(&id);
            fs::create_dir(&dir).map_err(|source| StunError::Io {
                op: "create the cgroup",
                path: dir.clone(),
                source,
            })?;
            quota.groups.push(Group {
                origin,
                dir,
                tids: Vec::with_capacity(tids.len()),
            });
            let Some(group) = quota.groups.last_mut() else {
                continue;
            };
            write(&group.dir, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
            write(&group.dir, "cpu.cfs_quota_us", "-1")?;
            for tid in tids {
                write(&group.dir, "tasks", &tid.to_string())?;
                group.tids.push(tid);
            }
        }
        Ok(quota)
    }

    /// Slows the threads by `pct` percent (0: not at all; at most 99, `THROTTLE_MAX_PCT`):
    /// together they may run `(100 − pct)`% of one core each.
    pub fn set_throttle(&mut self, pct: u8) -> Result<(), StunError> {
        let pct = pct.min(THROTTLE_MAX_PCT);
        for group in &self.groups {
            match quota_for(pct, group.tids.len() as u64) {
                None => write(&group.dir, "cpu.cfs_quota_us", "-1")?,
                Some((period_us, quota_us)) => {
                    // Every quota used (at least 1 ms) fits every period used (10–100
                    // ms), so the old quota under the new period is valid for the moment
                    // between.
                    write(&group.dir, "cpu.cfs_period_us", &period_us.to_string())?;
                    write(&group.dir, "cpu.cfs_quota_us", &quota_us.to_string())?;
                }
            }
        }
        self.throttle_pct = pct;
        Ok(())
    }

    /// The throttle in force, in percent.
    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// The cgroups made for the threads (one per cgroup the threads came from).
    pub fn cgroups(&self) -> impl Iterator<Item = &Path> {
        self.groups.iter().map(|g| g.dir.as_path())
    }

    /// Lifts the quota, moves every thread back to the cgroup it came from, and removes
    /// the cgroups. A thread that has exited meanwhile is skipped.
    pub fn release(mut self) -> Result<(), StunError> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), StunError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_error = None;
        for group in &self.groups {
            if let Err(e) = write(&group.dir, "cpu.cfs_quota_us", "-1") {
                first_error.get_or_insert(e);
            }
            for tid in &group.tids {
                if let Err(e) = move_back(*tid, &group.origin) {
                    first_error.get_or_insert(e);
                }
            }
            if let Err(source) = fs::remove_dir(&group.dir) {
                first_error.get_or_insert(StunError::Io {
                    op: "remove the cgroup",
                    path: group.dir.clone(),
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for VcpuQuota {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!(error = %e, "could not undo the vCPU quota");
        }
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), StunError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|source| StunError::Io {
        op: "write",
        path,
        source,
    })
}

/// Moves `tid` into `origin`; a thread that is gone (its VMM exited) needs nothing.
fn move_back(tid: i32, origin: &Path) -> Result<(), StunError> {
    let tasks = origin.join("tasks");
    match fs::write(&tasks, tid.to_string()) {
        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(StunError::Io {
            op: "move a vCPU thread back to",
            path: tasks,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The process id in the name of a cgroup this module made, if that process no longer
/// runs: no process has that id, or the one that has it started at another time than the
/// name says (the id was reused).
fn stale_owner(dir: &Path) -> Option<u32> {
    let name = dir.file_name()?.to_str()?;
    let fields: Vec<&str> = name.strip_prefix(GROUP_PREFIX)?.split('-').collect();
    let pid: u32 = fields.first()?.parse().ok()?;
    // `PID-START-N`, or the older `PID-N` (no start time to compare).
    let started: Option<u64> = match fields.len() {
        3 => Some(fields[1].parse().ok()?),
        2 => {
            fields[1].parse::<u64>().ok()?;
            None
        }
        _ => return None,
    };
    let alive = match started {
        // 0: the owner could not read its own start time; the id alone decides.
        Some(started) if started != 0 => start_ticks(pid) == Some(started),
        _ => pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists(),
    };
    (!alive).then_some(pid)
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`),
/// or `None` if no such process runs.
fn start_ticks(pid: u32) -> Option<u64> {
    parse_start_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in parentheses and
/// may hold spaces and parentheses itself, so the count starts after the last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state): field 22 is the 20th of it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Undoes every cgroup of the v1 `cpu` hierarchy this process can see that a `VcpuQuota`
/// owner which no longer runs left behind (an engine killed mid-migration leaves the guest
/// slowed by the quota in force, up to 95%). Returns how many were undone; `Ok(0)` also
/// when no hierarchy is mounted here (an engine in a mount namespace of its own, as
/// `ip netns exec` makes: the next [`VcpuQuota::attach`] there sweeps what it meets).
///
/// `strait serve` calls it as it starts. Best effort per cgroup, like the sweep in
/// `attach`: a cgroup that cannot be undone is logged and left.
pub fn sweep_stale_quotas() -> Result<usize, StunError> {
    let Some(root) = cpu_hierarchy(&read(Path::new(MOUNTINFO))?) else {
        return Ok(0);
    };
    let mut swept = 0;
    let mut seen = 0;
    let mut stack = vec![(root, 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > SWEEP_ENTRIES_MAX {
                tracing::warn!(
                    limit = SWEEP_ENTRIES_MAX,
                    "the cpu hierarchy is too large to sweep for stale vCPU quotas whole"
                );
                return Ok(swept);
            }
            // Cgroups are folders; symbolic links are not followed.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let child = entry.path();
            if stale_owner(&child).is_some() {
                sweep(&child);
                swept += 1;
            } else if depth + 1 < SWEEP_DEPTH_MAX {
                stack.push((child, depth + 1));
            }
        }
    }
    Ok(swept)
}

/// Undoes a cgroup a crashed owner left: lifts its quota, moves its threads to the parent
/// (where they came from) and removes it. Best effort: what fails is logged, and the
/// cgroup at worst stays, unlimited.
fn sweep(dir: &Path) {
    let Some(parent) = dir.parent() else {
        return;
    };
    tracing::warn!(cgroup = %dir.display(), "undoing a vCPU quota its owner left behind");
    if let Err(e) = write(dir, "cpu.cfs_quota_us", "-1") {
        tracing::warn!(error = %e, "could not lift a stale vCPU quota");
    }
    let tasks = fs::read_to_string(dir.join("tasks")).unwrap_or_default();
    for tid in tasks.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if let Err(e) = move_back(tid, parent) {
            tracing::warn!(error = %e, "could not move a thread out of a stale vCPU quota");
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::warn!(error = %e, cgroup = %dir.display(), "could not remove a stale vCPU quota");
    }
}

/// Sweeps the children of `origin` that owners which are gone left behind.
fn sweep_stale_children(origin: &Path) {
    let Ok(entries) = fs::read_dir(origin) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.is_dir() && stale_owner(&dir).is_some() {
            sweep(&dir);
        }
    }
}

fn read(path: &Path) -> Result<String, StunError> {
    fs::read_to_string(path).map_err(|source| StunError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// The CFS period and quota (µs) that let `threads` threads run `(100 − pct)`% of a core
/// each; `None` for no limit.
fn quota_for(pct: u8, threads: u64) -> Option<(u64, u64)> {
    if pct == 0 {
        return None;
    }
    let share = u64::from(100 - pct.min(THROTTLE_MAX_PCT));
    // The period at which one thread's share is at least the kernel's minimum quota.
    let period = (QUOTA_MIN_US * 100)
        .div_ceil(share)
        .clamp(PERIOD_US, PERIOD_MAX_US);
    let quota = (period * share / 100 * threads.max(1)).max(QUOTA_MIN_US);
    Some((period, quota))
}

/// The mount point of the v1 hierarchy whose controllers include `cpu`, from
/// `/proc/self/mountinfo` ("36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup
/// cgroup rw,cpu").
fn cpu_hierarchy(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        if fs.next()? != "cgroup" {
            return None;
        }
        let options = fs.nth(1)?;
        if !options.split(',').any(|o| o == "cpu") {
            return None;
        }
        // Only a mount of the hierarchy's root holds every cgroup a thread can be in.
        let mut fields = mount.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (root == "/").then(|| PathBuf::from(mount_point))
    })
}

/// A thread's cgroup in the v1 `cpu` hierarchy, from `/proc/TID/cgroup` ("4:cpu,cpuacct:/a").
fn thread_cpu_cgroup(cgroups: &str) -> Option<&str> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_gives_each_thread_its_share() {
        assert_eq!(quota_for(0, 1), None);
        assert_eq!(quota_for(50, 1), Some((10_000, 5_000)));
        assert_eq!(quota_for(50, 4), Some((10_000, 20_000)));
        assert_eq!(quota_for(80, 1), Some((10_000, 2_000)));
        // Below 10% the period grows so the quota stays at the kernel's 1 ms minimum.
        assert_eq!(quota_for(95, 1), Some((20_000, 1_000)));
        assert_eq!(quota_for(99, 1), Some((100_000, 1_000)));
        assert_eq!(quota_for(100, 1), quota_for(99, 1));
        assert_eq!(quota_for(255, 2), Some((100_000, 2_000)));
        for pct in 1..=99 {
            let (period, quota) = quota_for(pct, 1).expect("a quota");
            assert!((PERIOD_US..=PERIOD_MAX_US).contains(&period), "{pct}%");
            assert!(quota >= QUOTA_MIN_US, "{pct}%");
            // The share given is within a percent of the share asked.
            let given = quota as f64 / period as f64 * 100.0;
            assert!(
                (given - f64::from(100 - pct)).abs() < 1.0,
                "{pct}%: {given}"
            );
        }
    }

    #[test]
    fn finds_the_cpu_hierarchy_and_nothing_else() {
        let mountinfo = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
26 25 0:24 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
27 25 0:25 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n\
28 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cpu_hierarchy(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        let joint = "30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            cpu_hierarchy(joint),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        // cgroup v2 only, a cpuset-only v1 mount, a bind mount of a sub-cgroup, garbage.
        for other in [
            "31 25 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "27 25 0:25 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n",
            "32 25 0:26 /a/b /mnt/cpu rw - cgroup cgroup rw,cpu\n",
            "",
            "no separator here\n",
            " - cgroup\n",
        ] {
            assert_eq!(cpu_hierarchy(other), None, "{other:?}");
        }
    }

    #[test]
    fn finds_a_threads_cpu_cgroup() {
        let cgroups = "9:name=systemd:/\n4:memory:/x\n1:cpu:/\n0::/\n";
        assert_eq!(thread_cpu_cgroup(cgroups), Some("/"));
        let joint = "3:cpu,cpuacct:/machine/qemu-1\n2:cpuset:/\n";
        assert_eq!(thread_cpu_cgroup(joint), Some("/machine/qemu-1"));
        // cpuacct alone is not cpu; v2's line has no controllers.
        assert_eq!(thread_cpu_cgroup("2:cpuacct:/a\n0::/b\n"), None);
        assert_eq!(thread_cpu_cgroup(""), None);
        assert_eq!(thread_cpu_cgroup("garbage"), None);
    }

    #[test]
    fn only_cgroups_of_owners_that_are_gone_are_stale() {
        let own = std::process::id();
        assert_eq!(
            stale_owner(Path::new(&format!("/c/{GROUP_PREFIX}{own}-0"))),
            None
        );
        // Pid 1 always runs; a pid above the kernel's maximum (2^22) never does.
        assert_eq!(stale_owner(Path::new("/c/strait-stun-1-3")), None);
        assert_eq!(
            stale_owner(Path::new("/c/strait-stun-99999999-3")),
            Some(99_999_999)
        );
        for other in [
            "/c/machine",
            "/c/strait-stun-",
            "/c/strait-stun-x-1",
            "/c/strait-stun-1-x-1",
            "/c/strait-stun-1-2-3-4",
            "/",
        ] {
            assert_eq!(stale_owner(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn an_owner_whose_id_was_reused_is_gone() {
        let own = std::process::id();
        let started = start_ticks(own).expect("our own start time");
        let ours = format!("/c/{GROUP_PREFIX}{own}-{started}-0");
        assert_eq!(stale_owner(Path::new(&ours)), None);
        // The same id, another start: a later process reused the id of a dead owner.
        let reused = format!("/c/{GROUP_PREFIX}{own}-{}-0", started + 1);
        assert_eq!(stale_owner(Path::new(&reused)), Some(own));
        let init = start_ticks(1).expect("pid 1 runs");
        let init_name = format!("/c/{GROUP_PREFIX}1-{init}-7");
        assert_eq!(stale_owner(Path::new(&init_name)), None);
        // An owner that could not read its start time (0): the id alone decides.
        assert_eq!(stale_owner(Path::new("/c/strait-stun-1-0-7")), None);
        assert_eq!(
            stale_owner(Path::new("/c/strait-stun-99999999-0-7")),
            Some(99_999_999)
        );
    }

    #[test]
    fn reads_the_start_time_after_the_command_name() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[19] = "123456".into();
        let rest = fields.join(" ");
        assert_eq!(
            parse_start_ticks(&format!("42 (qemu) {rest}")),
            Some(123_456)
        );
        // A name with spaces and parentheses of its own.
        assert_eq!(
            parse_start_ticks(&format!("42 (a) b (c)) {rest}")),
            Some(123_456)
        );
        assert_eq!(parse_start_ticks("42 (short) S 1 2"), None);
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn attach_refuses_no_threads() {
        assert!(matches!(VcpuQuota::attach(&[]), Err(StunError::NoThreads)));
    }
}
