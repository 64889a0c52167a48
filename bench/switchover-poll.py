#!/usr/bin/env python3
"""Where a migration's memory bytes are around the switchover, every 50 ms.

Polls the `status` of both engines of a running `strait demo --workdir DIR --keep ...`
and prints, for the second before and after the VM stops, the memory bytes the source's
link had acknowledged and the bytes the destination had received. A run whose bytes stop
moving after the stop shows a pause in the stream, not a queue draining.

    bench/switchover-poll.py DIR &
    strait demo --workdir DIR --keep --rtt-ms 214 --throttle cgroup

Needs the `strait` binary (STRAIT, default target/release/strait). Ends when the
migration does, or after 300 s.
"""

import json
import os
import subprocess
import sys
import time

POLL_S = 0.05
WINDOW_S = (1.0, 1.2)
TIMEOUT_S = 300


def status(strait, sock):
    try:
        r = subprocess.run([strait, "ctl", "--control", sock, "--json", "status"],
                           capture_output=True, timeout=2, text=True)
        return json.loads(r.stdout).get("migration") or {}
    except (subprocess.SubprocessError, ValueError):
        return {}


def main(workdir):
    strait = os.environ.get("STRAIT", "target/release/strait")
    src, dst = f"{workdir}/src-control.sock", f"{workdir}/dst-control.sock"
    deadline = time.time() + TIMEOUT_S
    while not (os.path.exists(src) and os.path.exists(dst)):
        if time.time() > deadline:
            sys.exit(f"no engines in {workdir}")
        time.sleep(0.2)
    rows = []
    while time.time() < deadline:
        t = time.time()
        s, d = status(strait, src), status(strait, dst)
        rows.append((t, s.get("phase"), (s.get("bytes") or {}).get("memory") or 0,
                     d.get("memory_bytes_received") or 0, d.get("state")))
        if rows[-1][1] in ("done", "rolled-back", "failed"):
            break
        time.sleep(max(0.0, POLL_S - (time.time() - t)))
    stop = next((r[0] for r in rows if r[1] in ("switchover", "completing")), None)
    if stop is None:
        sys.exit("the VM never stopped for the switchover")
    print("t_s phase src_acked_MB dst_received_MB dst_state")
    for t, phase, acked, received, state in rows:
        if -WINDOW_S[0] <= t - stop <= WINDOW_S[1]:
            print(f"{t - stop:+.2f} {phase} {acked / 1e6:.2f} {received / 1e6:.2f} {state}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
