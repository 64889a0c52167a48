#!/usr/bin/env bash
# What replication costs the guest: 4 KiB random writes (strait-bench-blk, a vhost-user
# frontend, queue depth $IODEPTH, at most $RATE_IOPS per second) on a strait-served disk,
# first without replication ("before"), then while it replicates across `strait wanem`
# (100 ms RTT, mutual TLS) to a second strait ("replicating", from in-sync on), then for as
# long again, still replicating ("after"). Three links: loopback (no emulator), one that
# keeps up (1000 Mbit/s) and one slower than the workload ($SLOW_MBIT Mbit/s); $ROUNDS
# rounds of each; two placements of the peers (below). Writes bench/results/mirror.md and
# the raw runs to bench/results/mirror-runs.jsonl. Needs root (network namespaces).
#
#   bench/mirror.sh      # ROUNDS=3 SECONDS_PER_RUN=5 IODEPTH=4 RATE_IOPS=10000 SLOW_MBIT=100
#                        # PEERS="idle same" LOAD_CPUS=1; about 15 minutes
#
# PEERS: where the destination engine and the WAN emulator's forwarder get their CPU.
# "same": at the priority of everything else, as any process here. "idle": at SCHED_IDLE
# (`chrt --idle 0`), so they run on what the source side leaves idle. Both stand for
# another host and the network, which on this 2-core machine otherwise take turns on
# the cores the backend and the load generator run on; "idle" is the nearest this machine
# gets to a destination on its own host. The source engine (all its threads, replication
# and link included) and the load generator run at normal priority in both.
set -euo pipefail

cd "$(dirname "$0")/.."
command -v jq >/dev/null || bash scripts/install-deps.sh
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
S_RUN="${SECONDS_PER_RUN:-5}"
IODEPTH="${IODEPTH:-4}"
ROUNDS="${ROUNDS:-3}"
# The load generator's CPU: the one the backend (core 0) does not poll on. Unpinned, it
# landed on either core from run to run and the "before" p50 moved between 42 and 53 us.
LOAD_CPUS="${LOAD_CPUS:-1}"
PEERS="${PEERS:-idle same}"
SLOW_MBIT="${SLOW_MBIT:-100}"
# The workload's rate (4 KiB writes per second): 10 000 is 41 MB/s, a third of a 1 Gbit/s
# link (so that link keeps up) and three times the slow one. 0: as fast as it goes.
RATE_IOPS="${RATE_IOPS:-10000}"
OUT=bench/results/mirror.md
RAW=bench/results/mirror-runs.jsonl

cargo build --release -p strait-engine --bin strait -p strait-bench --bin strait-bench-blk >&2
STRAIT="$PWD/$CARGO_TARGET_DIR/release/strait"
LOADGEN="$PWD/$CARGO_TARGET_DIR/release/strait-bench-blk"

WORK=$(mktemp -d /dev/shm/strait-mirror.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Side B: find our address, make the certificates for it, receive the replica.
cat > "$WORK/side_b.sh" <<'EOF'
set -eu
addr=${ADDR_B:-$(ip -4 -o addr show dev wan0 | awk '{print $4}' | cut -d/ -f1)}
"$STRAIT" certs --out "$RUN/certs" --names "$addr" >/dev/null
$PEER_SCHED "$STRAIT" serve --disk "$RUN/dst.img" --control "$RUN/dst.sock" \
  --listen "$addr:7400" --tls-dir "$RUN/certs" 2>"$RUN/dst.log" &
pid=$!
echo "$addr" > "$RUN/addr_b"
while [ ! -e "$RUN/done" ]; do sleep 0.2; done
kill "$pid" 2>/dev/null || true
EOF

# Side A: serve the disk, measure, replicate, wait for in-sync, measure, measure again.
cat > "$WORK/side_a.sh" <<'EOF'
set -eu
trap 'touch "$RUN/done"' EXIT
while [ ! -e "$RUN/addr_b" ]; do sleep 0.2; done
addr_b=$(cat "$RUN/addr_b")
chrt --other 0 "$STRAIT" serve --disk "$RUN/src.img" --vhost-socket "$RUN/vhost.sock" \
  --control "$RUN/src.sock" --tls-dir "$RUN/certs" 2>"$RUN/src.log" &
pid=$!
while [ ! -S "$RUN/src.sock" ]; do sleep 0.1; done
job() {
  chrt --other 0 "$LOADGEN" --socket "$RUN/vhost.sock" --rw randwrite --bs 4k --iodepth "$IODEPTH" \
    --seconds "$S_RUN" --warmup-seconds 1 --rounds 1 --load-cpus "$LOAD_CPUS" --rate-iops "$RATE_IOPS" --json | tail -n 1 > "$RUN/$1.json"
  "$STRAIT" ctl --control "$RUN/src.sock" --json status > "$RUN/$1.status.json"
}
job before
"$STRAIT" ctl --control "$RUN/src.sock" replicate --to "$addr_b:7400" >/dev/null
for _ in $(seq 600); do
  state=$("$STRAIT" ctl --control "$RUN/src.sock" --json status | jq -r .replication.state)
  [ "$state" = in-sync ] && break
  sleep 0.5
done
job replicating
job after
kill "$pid"
wait "$pid" || true
EOF

: > "$WORK/runs.jsonl"
# "loopback": both engines on this host's loopback, no emulator: what replication itself
# costs the guest here, without the emulator's forwarder on the same 2 cores.
for round in $(seq "$ROUNDS"); do
  for peers in $PEERS; do
    case "$peers" in
      idle) PEER_SCHED="chrt --idle 0" ;;
      same) PEER_SCHED="" ;;
      *) echo "PEERS: idle or same, not $peers" >&2; exit 2 ;;
    esac
    for rate in loopback 1000 "$SLOW_MBIT"; do
      RUN="$WORK/r$round-$peers-$rate"
      mkdir -p "$RUN"
      truncate -s 1G "$RUN/src.img" "$RUN/dst.img"
      echo "round $round, peers $peers, link $rate" >&2
      if [ "$rate" = loopback ]; then
        RUN="$RUN" STRAIT="$STRAIT" ADDR_B=127.0.0.1 PEER_SCHED="$PEER_SCHED" sh "$WORK/side_b.sh" &
        RUN="$RUN" STRAIT="$STRAIT" LOADGEN="$LOADGEN" S_RUN="$S_RUN" IODEPTH="$IODEPTH" \
          RATE_IOPS="$RATE_IOPS" LOAD_CPUS="$LOAD_CPUS" sh "$WORK/side_a.sh" >&2
        wait
      else
        # The forwarder runs at the peers' priority; side A puts itself back to normal.
        RUN="$RUN" STRAIT="$STRAIT" LOADGEN="$LOADGEN" S_RUN="$S_RUN" IODEPTH="$IODEPTH" \
          RATE_IOPS="$RATE_IOPS" PEER_SCHED="$PEER_SCHED" LOAD_CPUS="$LOAD_CPUS" \
          $PEER_SCHED "$STRAIT" wanem --rtt-ms 100 --rate-mbit "$rate" --seed 1 \
            --run-a "sh $WORK/side_a.sh" --run-b "sh $WORK/side_b.sh" >&2
      fi
      for phase in before replicating after; do
        r=$(jq -c --arg p "$phase" --arg rate "$rate" --arg peers "$peers" --argjson round "$round" \
          '{round: $round, peers: $peers, rate: $rate, phase: $p, iops: .iops, p50: .p50_us, p99: .p99_us, p999: .p999_us, max: .max_us}' \
          "$RUN/$phase.json")
        s=$(jq -c '.replication // {} | {state, backlog: .mirror_backlog_bytes, mirrored: .writes_mirrored, tracked: .writes_tracked, overflowed: .overflowed_writes, dirty: .dirty_bytes, limit: .throttle.backlog_limit_bytes, drain: .throttle.drain_bytes_per_s, pace: .throttle.rate_bytes_per_s, delayed: .throttle.delayed_writes, held_ms: .throttle.delay_ms_total}' \
          "$RUN/$phase.status.json")
        jq -nc --argjson r "$r" --argjson s "$s" '$r + $s' >> "$WORK/runs.jsonl"
      done
    done
  done
done
COMMIT=$(git rev-parse --short HEAD)
jq -c --arg c "$COMMIT" --arg d "$(date -u +%F)" '. + {commit: $c, date: $d}' "$WORK/runs.jsonl" > "$RAW"

{
  echo "# Mirror: what replication costs the guest"
  echo
  echo "Generated by \`bench/mirror.sh\` on $(date -u +%F) at commit $COMMIT (rounds: $ROUNDS; raw runs in"
  echo "[mirror-runs.jsonl](mirror-runs.jsonl))."
  echo "4 KiB random writes at up to $RATE_IOPS per second (\`--rate-iops\`; 0: unlimited), queue depth $IODEPTH, one queue, ${S_RUN} s per phase after 1 s of"
  echo "warm-up, from \`strait-bench-blk --socket --load-cpus $LOAD_CPUS\` (a vhost-user frontend, no VM) on a 1 GiB"
  echo "image on tmpfs served by \`strait serve\` (its executor on core 0). Replication runs across \`strait wanem\`"
  echo "at 100 ms RTT with mutual TLS to a second \`strait serve --listen\`; the replicating phase"
  echo "starts once the initial copy is in sync, and \"after\" is the next ${S_RUN} s, still"
  echo "replicating. State and counters are the source's \`status\` right after each phase."
  echo "Peers \"idle\": the destination engine and the emulator's forwarder at SCHED_IDLE, on"
  echo "what the source side leaves of the 2 cores (the nearest this machine gets to another"
  echo "host); \"same\": at normal priority, taking turns with the backend and the load generator."
  echo "The source engine (replication and link threads included) runs at normal priority in both."
  echo
  echo "Figures are medians over the rounds, \`[min-max]\` the spread; \"× before\" is the median"
  echo "over rounds of the phase's figure divided by the same round's \"before\" (the same"
  echo "processes, replication not started yet). Max µs is the largest of the rounds."
  echo
  echo "| peers | link (Mbit/s, 100 ms) | phase | IOPS | × before | p50 µs | × before | p99 µs | × before | p99.9 µs | max µs | replication after the phase | mirror backlog max / bound | drain MB/s | pace MB/s | writes mirrored / to bitmap | completions held (s) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  jq -rs '
    def med: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def r0: if . == null then "-" else round | tostring end;
    def r2: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
    def mb: if . == null then "-" else (. / 1e6 * 10 | round / 10 | tostring) end;
    def spread(f): (map(f) | med | r0) + " [" + (map(f) | min | r0) + "-" + (map(f) | max | r0) + "]";
    . as $all
    | [group_by([.peers, .rate])[] | group_by(.phase)[]]
    | sort_by(.[0].peers, (.[0].rate | if . == "loopback" then 0 else 1e6 / tonumber end),
        (.[0].phase | {"before": 0, "replicating": 1, "after": 2}[.]))
    | .[] as $g
    | ($g | map(. as $x | ($all[] | select(.round == $x.round and .peers == $x.peers
        and .rate == $x.rate and .phase == "before")) as $b
        | {iops: (.iops / $b.iops), p50: (.p50 / $b.p50), p99: (.p99 / $b.p99)})) as $ratio
    | "| \($g[0].peers) | \($g[0].rate) | \($g[0].phase) | \($g | spread(.iops)) | \($ratio | map(.iops) | med | r2) | \($g | spread(.p50)) | \($ratio | map(.p50) | med | r2) | \($g | spread(.p99)) | \($ratio | map(.p99) | med | r2) | \($g | map(.p999) | med | r0) | \($g | map(.max) | max | r0) | \($g | map(.state // "none") | unique | join(", ")) | \($g | map(.backlog) | if all(. == null) then "-" else max | tostring end) / \($g | map(.limit) | if all(. == null) then "-" else min | tostring end) | \($g | map(.drain) | if all(. == null) then null else med end | mb) | \($g | map(.pace) | if all(. == null) then null else med end | mb) | \($g | map(.mirrored) | if all(. == null) then "-" else med | r0 end) / \($g | map(.tracked) | if all(. == null) then "-" else max | r0 end) | \($g | map(.held_ms) | if all(. == null) then "-" else (med / 1000 | r2) end) |"
  ' "$RAW"
  if [ -f "$OUT" ] && grep -q '^## Reading' "$OUT"; then
    echo
    sed -n '/^## Reading/,$p' "$OUT"
  fi
} > "$OUT.new"
mv "$OUT.new" "$OUT"
echo "wrote $OUT" >&2
