//! The vCPU quota against a real QEMU whose guest spins on its vCPU: the quota caps the
//! vCPU thread's CPU time from the next second on, a deeper one caps it further, and
//! releasing or dropping the quota puts the thread back in its own cgroup, unslowed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{memory_dirtier, require_qemu, test_dir, Qemu, Start};
use strait_vmm::{StunError, VcpuQuota};

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
    let cgroup = quota.cgroup().to_path_buf();
    let name = cgroup.file_name().expect("a cgroup folder name");
    assert!(
        cpu_cgroup(tid).ends_with(&*name.to_string_lossy()),
        "the vCPU thread is in {} after attach, not {}",
        cpu_cgroup(tid),
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
    let cgroup = quota.cgroup().to_path_buf();
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
