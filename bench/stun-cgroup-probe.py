#!/usr/bin/env python3
# Can strait slow a guest's vCPU at once, without QEMU's auto-converge (docs/migration.md,
# "What keeps the penalty above 5%")? The demo's guest and workload on QEMU's own
# virtio-blk, no strait, its vCPU thread alone on the last core; the thread is put in a
# cgroup of the v1 `cpu` controller (per-thread placement: its `tasks` file takes thread
# ids) and the cgroup's CFS quota is set to each of QUOTAS_PCT of one core in turn, for
# WINDOW_S seconds each, starting and ending unlimited. Prints per quota the heartbeat
# rate (from 0.5 s after the change), the rate in 0.25 s bins right after the change (how
# soon it acts), and QMP's round trip meanwhile (whether a throttled vCPU holds up QEMU's
# main loop). Needs root, a v1 `cpu` hierarchy at /sys/fs/cgroup/cpu (cgroup v2 would need a
# threaded subtree), QEMU and the test guest (scripts/guest/build.sh); under a minute:
#
#   flock /tmp/strait-heavy.lock python3 bench/stun-cgroup-probe.py
import os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestrig import QMP, guest_core, heartbeats, scratch_image, start_qemu  # noqa: E402

W = '/tmp/strait-stun-cgroup-probe'
CPU_HIERARCHY = '/sys/fs/cgroup/cpu'
CGROUP = f'{CPU_HIERARCHY}/strait-stun-probe-{os.getpid()}'
# The CFS period: 10 ms, as QEMU's own throttle slices time (CPU_THROTTLE_TIMESLICE_NS).
PERIOD_US = 10_000
# None: unlimited (-1).
QUOTAS_PCT = (None, 50, 20, 10, None)
WINDOW_S = 5.0
BIN_S = 0.25
QMP_EVERY_S = 0.25

if not os.path.exists(f'{CPU_HIERARCHY}/tasks'):
    raise SystemExit(f'no v1 cpu cgroup hierarchy at {CPU_HIERARCHY}')
img = scratch_image(W)
vcpu_core = guest_core()


def write(path, value):
    with open(path, 'w') as f:
        f.write(value)


def rate(lines, t0, t1):
    return sum(1 for t, _, _ in heartbeats(lines) if t0 <= t < t1) / (t1 - t0)


proc, lines = start_qemu(W, 'guest', img, int(len(QUOTAS_PCT) * WINDOW_S + 60))
os.makedirs(CGROUP)
try:
    q = QMP(f'{W}/guest.qmp')
    vcpus = [c['thread-id'] for c in q.cmd('query-cpus-fast')]
    for tid in vcpus:
        os.sched_setaffinity(tid, [vcpu_core])
    while len(heartbeats(lines)) < 300:
        time.sleep(0.2)
    time.sleep(3)
    write(f'{CGROUP}/cpu.cfs_period_us', str(PERIOD_US))
    for tid in vcpus:
        write(f'{CGROUP}/tasks', str(tid))
    for pct in QUOTAS_PCT:
        write(f'{CGROUP}/cpu.cfs_quota_us', '-1' if pct is None else str(PERIOD_US * pct // 100))
        t0 = time.monotonic()
        rtts = []
        while time.monotonic() - t0 < WINDOW_S:
            time.sleep(QMP_EVERY_S)
            t = time.monotonic()
            q.cmd('query-status')
            rtts.append((time.monotonic() - t) * 1000)
        t1 = time.monotonic()
        bins = [round(rate(lines, t0 + i * BIN_S, t0 + (i + 1) * BIN_S)) for i in range(8)]
        print(f'quota {"unlimited" if pct is None else f"{pct}%"}: '
              f'{rate(lines, t0 + 0.5, t1):.0f} heartbeats/s; in {BIN_S} s bins after the change '
              f'{bins}; QMP round trip median {statistics.median(rtts):.1f} ms, '
              f'max {max(rtts):.1f} ms', flush=True)
finally:
    proc.kill()
    proc.wait()
    # The vCPU thread is gone with QEMU, so the cgroup is empty and can go.
    os.rmdir(CGROUP)
