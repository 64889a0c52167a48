#!/usr/bin/env bash
# Watches the link's TCP connections from the kernel's side while a `strait demo` runs:
# every 50 ms, `ss -tin` in the source's network namespace (strait-wa-*), one line per
# connection with its congestion control, window, BBR state (bandwidth, pacing and window
# gains: both gains at 1 is PROBE_RTT), RTT, bytes in flight and unsent, stamped with the
# wall clock (the engines' logs use the same clock).
#
#   bash bench/link-watch.sh /tmp/link.txt &      # then, in another shell:
#   strait demo --rtt-ms 214 --rate-mbit 200 --throttle cgroup --keep --workdir /tmp/d
#
# It waits up to WAIT_S (default 600) for the namespace, follows the first one it sees
# until it is gone, and exits. Needs root (ip netns exec). This is how the switchover's
# slow mode was found: all four connections at `cwnd:4` with both BBR gains at 1 from
# 98 ms to about 600 ms after the stop (docs/migration.md, "Two actuators").
set -euo pipefail
readonly OUT="${1:?usage: link-watch.sh OUT}"
readonly WAIT_S="${WAIT_S:-600}"
readonly PERIOD_S=0.05

ns=""
for _ in $(seq 1 "$((WAIT_S * 10))"); do
    ns=$(ip netns list | awk '/^strait-wa-/ { print $1; exit }')
    [ -n "$ns" ] && break
    sleep 0.1
done
[ -n "$ns" ] || { echo "no strait-wa-* namespace within ${WAIT_S} s" >&2; exit 1; }
echo "# ss -tin in $ns every ${PERIOD_S} s: epoch_s peer cc fields..." >"$OUT"
while ip netns list | grep -q "^$ns\b"; do
    now=$(date +%s.%N)
    # ss prints each connection on two lines: addresses, then its TCP state.
    ip netns exec "$ns" ss -tin state established 2>/dev/null | awk -v t="$now" '
        /^[0-9]/ { peer = $4; next }
        /cwnd:/ {
            line = t " " peer " " $1
            for (i = 2; i <= NF; i++)
                if ($i ~ /^(cwnd|rtt|unacked|notsent|bytes_acked|bbr):/) line = line " " $i
            print line
        }' >>"$OUT" || true
    sleep "$PERIOD_S"
done
