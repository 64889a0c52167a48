#!/usr/bin/env python3
# What a migration costs this guest under TCG before any throttle, and without strait
# (docs/migration.md, "What keeps the penalty above 5%"): the demo's guest and workload on
# QEMU's own virtio-blk, its vCPU alone on the last core like `strait demo` pins it, the
# rest of QEMU on the other cores. Per round, four windows of at most WINDOW_S seconds:
#   idle       no migration: the heartbeat rate to compare with;
#   migrating  QEMU migrates the guest to a second QEMU on this host (`migrate unix:`) at
#              RATE_MBIT (the sweep's link rate) with no throttle (auto-converge off),
#              counted while QEMU reports it active: until it completes (the guest goes on
#              in the new QEMU) or WINDOW_S (then `migrate_cancel`);
#   idle2      no migration again, in whichever QEMU the guest now runs;
#   unlimited  the same migration at QEMU's unlimited bandwidth over the unix socket.
# Prints per round heartbeats per second and the slowdown against the idle window before
# it, then the medians over ROUNDS. Needs root, QEMU and the test guest
# (scripts/guest/build.sh); about a minute per round:
#
#   flock /tmp/strait-heavy.lock python3 bench/penalty-floor.py   # ROUNDS=3 WINDOW_S=10 RATE_MBIT=200
import json, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestrig import QMP, guest_core, heartbeats, scratch_image, start_qemu  # noqa: E402

W = '/tmp/strait-penalty-floor'
ROUNDS = int(os.environ.get('ROUNDS', '3'))
WINDOW_S = float(os.environ.get('WINDOW_S', '10'))
RATE_MBIT = int(os.environ.get('RATE_MBIT', '200'))
# The guest's workload runs this long; enough for ROUNDS rounds of four windows plus boot.
WORKLOAD_S = int(ROUNDS * (4 * WINDOW_S + 15) + 60)
# How often the migration's status is read while it runs.
POLL_S = 0.05
# QEMU's states between `active` and `completed` (the guest is stopped in them).
COMPLETING = ('device', 'pre-switchover', 'wait-unplug')
UNCAPPED_BYTES_PER_S = 1 << 40

img = scratch_image(W)
guest_cpu = guest_core()  # every QEMU thread starts on the others; the vCPU moves


def qemu(name, incoming=None):
    return start_qemu(W, name, img, WORKLOAD_S, incoming)


def beats(lines, t0, t1):
    return sum(1 for t, _, _ in heartbeats(lines) if t0 <= t < t1)


def pin_vcpu(q):
    for cpu in q.cmd('query-cpus-fast'):
        os.sched_setaffinity(cpu['thread-id'], [guest_cpu])


def window(lines):
    """Heartbeats per second over WINDOW_S."""
    t0 = time.monotonic()
    time.sleep(WINDOW_S)
    return beats(lines, t0, time.monotonic()) / WINDOW_S


def migrating(q, lines, bytes_per_s, k):
    """Migrates the guest to a new QEMU at `bytes_per_s` with no throttle, counting its
    heartbeats while the migration is active: until QEMU completes it (then the guest goes
    on in the new QEMU, which the caller uses from then on) or for WINDOW_S (then it is
    cancelled). Returns (heartbeats per second, seconds measured, MiB sent, the QEMU and
    console the guest now runs in)."""
    dst, dst_lines = qemu(f'dst{k}', incoming=f'unix:{W}/mig{k}.sock')
    children.append(dst)
    qd = QMP(f'{W}/dst{k}.qmp')
    pin_vcpu(qd)
    q.cmd('migrate-set-capabilities', capabilities=[
        {'capability': 'auto-converge', 'state': False}])
    q.cmd('migrate-set-parameters', **{'max-bandwidth': bytes_per_s})
    t0 = time.monotonic()
    q.cmd('migrate', uri=f'unix:{W}/mig{k}.sock')
    last_active, info = t0, {}
    while time.monotonic() - t0 < WINDOW_S:
        time.sleep(POLL_S)
        info = q.cmd('query-migrate')
        if info.get('status') != 'active':
            break
        last_active = time.monotonic()
    status = info.get('status')
    # Only the time QEMU was seen active counts: the stop for the switchover is not the
    # throttle-free cost this measures.
    rate = beats(lines, t0, last_active) / (last_active - t0)
    sent = info.get('ram', {}).get('transferred', 0)
    if status == 'active':
        q.cmd('migrate_cancel')
        for _ in range(200):
            if q.cmd('query-migrate').get('status') in ('cancelled', 'failed'):
                break
            time.sleep(0.05)
        else:
            raise SystemExit('migrate_cancel did not end the migration within 10 s')
        dst.kill()
        return rate, last_active - t0, sent, q, lines
    # Past `active` QEMU stops the guest and sends the rest (`device`, then `completed`).
    for _ in range(200):
        if status not in COMPLETING:
            break
        time.sleep(POLL_S)
        info = q.cmd('query-migrate')
        status = info.get('status')
    if status != 'completed':
        raise SystemExit(f'the migration ended {status}: {info}')
    while qd.cmd('query-status')['status'] != 'running':
        time.sleep(0.01)
    q.cmd('quit')  # the old QEMU, in postmigrate: off the host's core
    return rate, last_active - t0, sent, qd, dst_lines


children = []
src, lines = qemu('src')
children.append(src)
try:
    q = QMP(f'{W}/src.qmp')
    pin_vcpu(q)
    while beats(lines, 0, float('inf')) < 300:
        time.sleep(0.2)
    time.sleep(3)
    cap = RATE_MBIT * 1_000_000 // 8
    rows = []
    for r in range(ROUNDS):
        idle = window(lines)
        cap_rate, cap_s, cap_sent, q, lines = migrating(q, lines, cap, 2 * r)
        time.sleep(3)  # a new QEMU's first steps are slow (bench/resume-first-step.py)
        idle2 = window(lines)
        unl_rate, unl_s, unl_sent, q, lines = migrating(q, lines, UNCAPPED_BYTES_PER_S, 2 * r + 1)
        time.sleep(3)
        row = {'round': r + 1, 'idle_hb_per_s': idle,
               f'migrating_{RATE_MBIT}mbit_hb_per_s': round(cap_rate, 1),
               f'migrating_{RATE_MBIT}mbit_s': round(cap_s, 1),
               f'migrating_{RATE_MBIT}mbit_slowdown_pct': round((1 - cap_rate / idle) * 100, 1),
               f'migrating_{RATE_MBIT}mbit_mib_sent': round(cap_sent / 2**20),
               'idle2_hb_per_s': idle2,
               'unlimited_hb_per_s': round(unl_rate, 1),
               'unlimited_s': round(unl_s, 1),
               'unlimited_slowdown_pct': round((1 - unl_rate / idle2) * 100, 1),
               'unlimited_mib_sent': round(unl_sent / 2**20)}
        rows.append(row)
        print(json.dumps(row), flush=True)
finally:
    for p in children:
        p.kill()
for key in (f'migrating_{RATE_MBIT}mbit_slowdown_pct', 'unlimited_slowdown_pct'):
    vals = [row[key] for row in rows]
    print(f'{key}: median {statistics.median(vals)} [{min(vals)}-{max(vals)}] over {len(vals)} rounds')
