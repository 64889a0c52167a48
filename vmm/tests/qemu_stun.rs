//! The vCPU quota against a real QEMU whose guest spins on its vCPU: the quota caps the
//! vCPU thread's CPU time from the next second on, a deeper one caps it further, and
//! releasing or dropping the quota puts the thread back in its own cgroup, unslowed. A
//! limit on the thread's own cgroup keeps applying under the quota, and a quota left by a
//! process that died is undone by the next one, or by the sweep an engine runs as it
//! starts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{memory_dirtier, require_qemu, test_dir, Qemu, Start};
use strait_vmm::{sweep_stale_quotas, StunError, VcpuQuota};

/// How long each share of a core is measured.
const WINDOW: Duration = Duration::from_secs(1);
/// The kernel charges run time per CFS period (10–20 ms here): over a one-second window
/// a capped thread may show up to a period's worth beyond its share.
const SLACK: f64 = 0.04;
/// How long the guest may take to start spinning, on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The thread's time on a CPU so far (`/proc/TID/schedstat`, nanoseconds).
fn cpu_ns(tid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).expect("schedstat");
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat's first field")
}

/// The share of one core the thread used over the next [`WINDOW`].
fn share(tid: i32) -> f64 {
    let (t0, c0) = (Instant::now(), cpu_ns(tid));
    std::thread::sleep(WINDOW);
    let (c1, elapsed) = (cpu_ns(tid), t0.elapsed());
    (c1 - c0) as f64 / elapsed.as_nanos() as f64
}

/// The thread's cgroup in the v1 `cpu` hierarchy.
fn cpu_cgroup(tid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{tid}/cgroup")).expect("cgroup");
    text.lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpu")
                .then(|| path.to_string())
        })
        .expect("a cpu cgroup line")
}

#[test]
fn vcpu_quota_caps_the_vcpu_thread_and_gives_it_back() {
    if !require_qemu() {
        return;
    }
    let dir = test_dir("stun");
    let kernel = memory_dirtier(dir.path());
    let kernel = kernel.to_str().expect("UTF-8 path");
    let qemu = Qemu::start_with(dir.path(), "guest", Start::Running, &["-kernel", kernel]);
    let vmm = common::connect(&qemu);
    let tids = vmm.vcpu_threads().expect("query-cpus-fast");
    assert_eq!(tids.len(), 1, "one vCPU: {tids:?}");
    let tid = tids[0];
    let home = cpu_cgroup(tid);

    // The guest spins once the firmware has loaded it.
    let started = Instant::now();
    let baseline = loop {
        let s = share(tid);
        if s > 0.3 {
            break s;
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "the vCPU never spun: {s:.2}"
        );
    };

    let mut quota = match VcpuQuota::attach(&tids) {
        Err(StunError::NoCpuHierarchy) if std::env::var_os("CI").is_none() => {
            eprintln!("\n**********\n*** SKIPPED: no cgroup v1 cpu hierarchy here\n**********\n");
            return;
        }
        other => other.expect("attach"),
    };
    let cgroup = only_cgroup(&quota);
    let name = cgroup.file_name().expect("a cgroup folder name");
    assert_eq!(
        cpu_cgroup(tid),
        Path::new(&home).join(name).to_string_lossy(),
        "the vCPU thread is not in a child of its own cgroup after attach ({})",
        cgroup.display()
    );
    let unslowed = share(tid);
    quota.set_throttle(50).expect("50%");
    assert_eq!(quota.throttle_pct(), 50);
    let half = share(tid);
    quota.set_throttle(95).expect("95%");
    let twentieth = share(tid);
    eprintln!(
        "vCPU share of a core: {baseline:.2} before, {unslowed:.2} attached, \
         {half:.2} at 50%, {twentieth:.2} at 95%"
    );
    assert!(half <= 0.5 + SLACK, "50% throttle, yet {half:.2} of a core");
    assert!(
        twentieth <= 0.05 + SLACK,
        "95% throttle, yet {twentieth:.2}"
    );
    assert!(twentieth > 0.0, "a 95% throttle stopped the vCPU dead");

    quota.release().expect("release");
    assert!(!cgroup.exists(), "{} is still there", cgroup.display());
    assert_eq!(cpu_cgroup(tid), home, "the vCPU thread did not go home");
    let after = share(tid);
    assert!(
        after > 0.05 + 2.0 * SLACK,
        "released, yet the vCPU ran only {after:.2} of a core"
    );

    // Dropped without a release (an error path): the same undoing.
    let mut quota = VcpuQuota::attach(&tids).expect("attach again");
    let cgroup = only_cgroup(&quota);
    quota.set_throttle(95).expect("95%");
    drop(quota);
    assert!(
        !Path::new(&cgroup).exists(),
        "{} survived drop",
        cgroup.display()
    );
    assert_eq!(
        cpu_cgroup(tid),
        home,
        "drop did not send the vCPU thread home"
    );
    let dropped = share(tid);
    assert!(
        dropped > 0.05 + 2.0 * SLACK,
        "dropped, yet the vCPU ran only {dropped:.2} of a core"
    );
}

/// The one cgroup a quota made (the test's vCPU threads share one cgroup).
fn only_cgroup(quota: &VcpuQuota) -> std::path::PathBuf {
    let cgroups: Vec<_> = quota.cgroups().map(Path::to_path_buf).collect();
    assert_eq!(cgroups.len(), 1, "{cgroups:?}");
    cgroups[0].clone()
}

/// The mount point of the v1 hierarchy with the `cpu` controller (read here, not with the
/// module's parser, so the test does not lean on the code it tests).
fn cpu_mount() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        let is_cpu = fs.next()? == "cgroup" && fs.nth(1)?.split(',').any(|o| o == "cpu");
        let fields: Vec<&str> = mount.split_whitespace().collect();
        (is_cpu && fields.get(3) == Some(&"/")).then(|| fields[4].into())
    })
}

/// Held by the tests that plant a dead owner's cgroup: the sweep of one would undo the
/// other's before it measured it.
static STALE_PLANTED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// [`cpu_mount`], or `None` with a loud skip (a failure on CI, which has the hierarchy).
fn cpu_mount_or_skip() -> Option<std::path::PathBuf> {
    let mount = cpu_mount();
    if mount.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI has a v1 cpu hierarchy"
        );
        eprintln!("\n**********\n*** SKIPPED: no cgroup v1 cpu hierarchy here\n**********\n");
    }
    mount
}

/// A cgroup the test makes and removes (after moving its threads to the root).
struct TestCgroup(std::path::PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let root = self.0.parent().expect("a parent").to_path_buf();
        // Every cgroup under it, children before their parents.
        let mut dirs = vec![self.0.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let tasks = std::fs::read_to_string(dir.join("tasks")).unwrap_or_default();
            for tid in tasks.lines() {
                let _ = std::fs::write(root.join("tasks"), tid);
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn vcpu_quota_keeps_its_origins_limit_and_undoes_a_dead_owners_quota() {
    if !require_qemu() {
        return;
    }
    let Some(mount) = cpu_mount_or_skip() else {
        return;
    };
    let _planted = STALE_PLANTED.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir("stun-nest");
    let kernel = memory_dirtier(dir.path());
    let kernel = kernel.to_str().expect("UTF-8 path");
    let qemu = Qemu::start_with(dir.path(), "guest", Start::Running, &["-kernel", kernel]);
    let vmm = common::connect(&qemu);
    let tids = vmm.vcpu_threads().expect("query-cpus-fast");
    let tid = tids[0];
    let started = Instant::now();
    while share(tid) <= 0.3 {
        assert!(started.elapsed() < START_TIMEOUT, "the vCPU never spun");
    }

    // The VM's manager limits the vCPU to 60% of a core (as libvirt's vcpu_quota would).
    let origin = TestCgroup(mount.join(format!("strait-test-origin-{}", std::process::id())));
    std::fs::create_dir(&origin.0).expect("origin cgroup");
    std::fs::write(origin.0.join("cpu.cfs_period_us"), "10000").expect("period");
    std::fs::write(origin.0.join("cpu.cfs_quota_us"), "6000").expect("quota");
    // A strait that died mid-migration left the thread in a child at 95%.
    let stale = origin.0.join("strait-stun-99999999-0");
    std::fs::create_dir(&stale).expect("stale cgroup");
    std::fs::write(stale.join("cpu.cfs_period_us"), "20000").expect("period");
    std::fs::write(stale.join("cpu.cfs_quota_us"), "1000").expect("quota");
    std::fs::write(stale.join("tasks"), tid.to_string()).expect("move the thread");
    let stuck = share(tid);

    let mut quota = VcpuQuota::attach(&tids).expect("attach");
    assert!(!stale.exists(), "the dead owner's cgroup is still there");
    let cgroup = only_cgroup(&quota);
    assert_eq!(cgroup.parent(), Some(origin.0.as_path()));
    let origin_name = origin.0.file_name().expect("name").to_string_lossy();
    let cgroup_name = cgroup.file_name().expect("name").to_string_lossy();
    assert_eq!(cpu_cgroup(tid), format!("/{origin_name}/{cgroup_name}"));
    // No throttle: the origin's 60% still holds.
    let unslowed = share(tid);
    quota.set_throttle(50).expect("50%");
    let half = share(tid);
    quota.release().expect("release");
    assert_eq!(cpu_cgroup(tid), format!("/{origin_name}"));
    let home = share(tid);
    eprintln!(
        "vCPU share of a core: {stuck:.2} left at 95% by a dead owner, {unslowed:.2} attached \
         under a 60% origin, {half:.2} at 50%, {home:.2} home"
    );
    assert!(
        stuck <= 0.05 + SLACK,
        "the stale 95% quota did not hold: {stuck:.2}"
    );
    // Above the stale 5%: the dead owner's quota is gone; at most 60%: the origin's holds.
    assert!(
        (0.05 + 2.0 * SLACK..=0.6 + SLACK).contains(&unslowed),
        "attached without a throttle under a 60% origin: {unslowed:.2}"
    );
    assert!(half <= 0.5 + SLACK, "50% throttle, yet {half:.2}");
    assert!(
        (0.05 + 2.0 * SLACK..=0.6 + SLACK).contains(&home),
        "home under the 60% origin: {home:.2}"
    );
}

#[test]
fn vcpu_quota_refuses_a_thread_that_does_not_exist() {
    // No thread has id i32::MAX (pid_max is at most 2^22): a clear error, no cgroup left.
    match VcpuQuota::attach(&[i32::MAX]) {
        Err(StunError::Io { op, path, .. }) => {
            assert_eq!(op, "read");
            assert!(path.ends_with("cgroup"), "{}", path.display());
        }
        Err(StunError::NoCpuHierarchy) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI has a v1 cpu hierarchy"
            );
        }
        other => panic!("attach to a missing thread: {other:?}"),
    }
}

#[test]
fn an_engine_start_sweeps_the_quota_a_dead_engine_left() {
    let Some(mount) = cpu_mount_or_skip() else {
        return;
    };
    let _planted = STALE_PLANTED.lock().unwrap_or_else(|e| e.into_inner());
    // A "guest" (a sleeping process) in its manager's cgroup, nested two levels down, and
    // moved by an engine that died into a child at 95%. The name carries a start time no
    // process has with that id: the owner is gone even if the id were reused.
    let manager = TestCgroup(mount.join(format!("strait-test-sweep-{}", std::process::id())));
    let vm = manager.0.join("vm");
    std::fs::create_dir_all(&vm).expect("manager cgroups");
    let stale = vm.join("strait-stun-99999999-12345-0");
    std::fs::create_dir(&stale).expect("stale cgroup");
    std::fs::write(stale.join("cpu.cfs_period_us"), "20000").expect("period");
    std::fs::write(stale.join("cpu.cfs_quota_us"), "1000").expect("quota");
    // A live owner's cgroup (ours, as `attach` names it) beside it stays.
    let live = vm.join(format!("strait-stun-{}-0-0", std::process::id()));
    std::fs::create_dir(&live).expect("live cgroup");
    let mut guest = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let pid = i32::try_from(guest.id()).expect("pid");
    std::fs::write(stale.join("tasks"), pid.to_string()).expect("move the guest");
    let vm_name = format!(
        "/{}/vm",
        manager.0.file_name().expect("name").to_string_lossy()
    );
    assert_eq!(
        cpu_cgroup(pid),
        format!("{vm_name}/strait-stun-99999999-12345-0")
    );

    let swept = sweep_stale_quotas().expect("sweep");

    let home = cpu_cgroup(pid);
    let _ = guest.kill();
    let _ = guest.wait();
    assert!(swept >= 1, "nothing swept");
    assert!(!stale.exists(), "the dead engine's cgroup is still there");
    assert_eq!(
        home, vm_name,
        "the guest did not go back to its manager's cgroup"
    );
    assert!(live.exists(), "a live owner's cgroup was swept");
}
