#!/usr/bin/env bash
# The live-migration sweep (issues 5 and 6B): strait against QEMU's own migration (what
# libvirt does for --copy-storage-all: NBD mirror, copy-mode background or write-blocking,
# then QEMU's migrate over TCP), the same guest, workload and `strait wanem` link, at each
# RTT, without and with a link cut in the middle of the memory phase. Every run is one
# `strait demo --json` (docs/demo.md) under `flock /tmp/strait-heavy.lock`, so that no
# other QEMU shares the 2 cores. Interleaved: per round, per RTT, every system without the
# cut, then every system with it.
#
# Writes bench/results/migration-runs.jsonl (every run's report, raw), migration.md
# (strait against issue 5's targets), migration-vs-qemu.md (all systems: medians, ranges,
# bytes on the wire, survivors) and migration-timelines.svg. Needs root.
#
#   bench/migration.sh                         # 3 rounds x 4 RTTs x 2 cuts x 3 systems = 72 runs of
#                                              # about 110 s each (the 90 s workload): over 2 h
#   ROUNDS=1 RTTS="100" bench/migration.sh     # a short run: 6 runs, about 12 min
#   OUT=bench/results/migration-1000mbit RATE_MBIT=1000 bench/migration.sh
#                                              # the same files in another folder
#
# The cut (CUT_FOR_S seconds) is placed per system and RTT from where that system's memory
# phase fell in the same round's uncut run: link-up to migrate, plus the memory phase's
# start, plus half its length, minus half the cut (so the cut is centred in it). Without
# such a run it falls back to FALLBACK_CUT_AT_S_STRAIT / _QEMU, measured at 100 ms here
# (strait's memory phase starts about 15 s after the link comes up, QEMU's about 20 s).
set -euo pipefail

cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
ROUNDS="${ROUNDS:-3}"
# wanem accepts 0 ms (no added delay; its queue then holds its minimum, not a BDP).
RTTS="${RTTS:-0 50 100 214}"
SYSTEMS="${SYSTEMS:-strait qemu-background qemu-write-blocking}"
CUT_FOR_S="${CUT_FOR_S:-3}"
RATE_MBIT="${RATE_MBIT:-200}"
# Boot and baseline (about 12 s), the slowest migration (QEMU at 214 ms with a cut: about
# 45 s), then about 20 s on the destination.
WORKLOAD_S="${WORKLOAD_S:-90}"
GUEST="${GUEST:-.cache/guest}"
FALLBACK_CUT_AT_S_STRAIT="${FALLBACK_CUT_AT_S_STRAIT:-18}"
FALLBACK_CUT_AT_S_QEMU="${FALLBACK_CUT_AT_S_QEMU:-28}"
LOCK=/tmp/strait-heavy.lock
OUT="${OUT:-bench/results}"
OUT_ARG=""
[ "$OUT" = bench/results ] || OUT_ARG="OUT=$OUT "
RUNS="$OUT/migration-runs.jsonl"
COMMAND="${OUT_ARG}ROUNDS=$ROUNDS RTTS=\"$RTTS\" SYSTEMS=\"$SYSTEMS\" CUT_FOR_S=$CUT_FOR_S RATE_MBIT=$RATE_MBIT WORKLOAD_S=$WORKLOAD_S bench/migration.sh"

case "$ROUNDS" in '' | *[!0-9]*) echo "ROUNDS must be a number, not '$ROUNDS'" >&2; exit 2 ;; esac
for rtt in $RTTS; do
  case "$rtt" in '' | *[!0-9]*) echo "RTTS must be numbers (ms), not '$rtt'" >&2; exit 2 ;; esac
done
for system in $SYSTEMS; do
  case "$system" in strait | qemu-background | qemu-write-blocking) ;;
    *) echo "SYSTEMS: unknown system '$system' (strait, qemu-background, qemu-write-blocking)" >&2; exit 2 ;;
  esac
done
[ -f "$GUEST/vmlinuz" ] || { echo "no guest at $GUEST (scripts/guest/build.sh builds it; GUEST=DIR)" >&2; exit 2; }
bash scripts/install-deps.sh

cargo build --release -p strait-engine --bin strait -p strait-bench --bin strait-bench-migration >&2
# The commit the binaries were built from (the sweep takes an hour; HEAD may move meanwhile).
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results' || echo -dirty)"
case "$CARGO_TARGET_DIR" in /*) TARGET="$CARGO_TARGET_DIR" ;; *) TARGET="$PWD/$CARGO_TARGET_DIR" ;; esac
STRAIT="$TARGET/release/strait"
AGGREGATE="$TARGET/release/strait-bench-migration"

# Short: the demo's Unix sockets live in its work folders.
WORK=$(mktemp -d /tmp/strait-mig.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
: > "$RUNS.new"

system_args() {
  case "$1" in
    strait) echo "--system strait" ;;
    qemu-background) echo "--system qemu --copy-mode background" ;;
    qemu-write-blocking) echo "--system qemu --copy-mode write-blocking" ;;
  esac
}

# Where to cut for system $1 at RTT $2 in round $3: the middle of the memory phase of the
# same round's uncut run.
cut_at() {
  local at
  at=$(jq -r --arg s "$1" --argjson r "$2" --argjson n "$3" --argjson c "$CUT_FOR_S" '
    select(.bench.system == $s and .bench.rtt_ms == $r and .bench.round == $n and .bench.cut_for_s == 0)
    | (.migration.phases // [] | map(select(.phase == "memory")) | first) as $m
    | select($m != null and .migration.started_after_link_up_s != null)
    | .migration.started_after_link_up_s + $m.start_s + ([($m.duration_s - $c) / 2, 0] | max)
    | . * 10 | round / 10' "$RUNS.new" | tail -n 1)
  if [ -z "$at" ]; then
    if [ "$1" = strait ]; then at=$FALLBACK_CUT_AT_S_STRAIT; else at=$FALLBACK_CUT_AT_S_QEMU; fi
  fi
  echo "$at"
}

n=0
for round in $(seq "$ROUNDS"); do
  for rtt in $RTTS; do
    for cut in 0 "$CUT_FOR_S"; do
      for system in $SYSTEMS; do
        n=$((n + 1))
        cut_args=()
        cut_at_s=null
        if [ "$cut" != 0 ]; then
          cut_at_s=$(cut_at "$system" "$rtt" "$round")
          cut_args=(--cut-at-s "$cut_at_s" --cut-for-s "$cut")
        fi
        echo "run $n: round $round, $system, ${rtt} ms, cut ${cut} s${cut_args[*]:+ at $cut_at_s s}" >&2
        set +e
        # shellcheck disable=SC2046 # system_args is several words on purpose
        flock "$LOCK" "$STRAIT" demo $(system_args "$system") --guest "$GUEST" \
          --rtt-ms "$rtt" --rate-mbit "$RATE_MBIT" --workload-s "$WORKLOAD_S" \
          "${cut_args[@]}" --svg "$WORK/run-$n.svg" --json > "$WORK/run-$n.out" 2> "$WORK/run-$n.err"
        rc=$?
        set -e
        bench=$(jq -nc --argjson round "$round" --arg system "$system" --argjson rtt "$rtt" \
          --argjson cut "$cut" --argjson at "$cut_at_s" --argjson rc "$rc" \
          '{round: $round, system: $system, rtt_ms: $rtt, cut_for_s: $cut, cut_at_s: $at, exit_status: $rc}')
        last=$(tail -n 1 "$WORK/run-$n.out")
        if [ "${last:0:1}" = "{" ] && echo "$last" | jq -e . >/dev/null 2>&1; then
          echo "$last" | jq -c --argjson bench "$bench" '. + {bench: $bench}' >> "$RUNS.new"
          echo "$last" | jq -r '"  \(.outcome): total \(.migration.total_s // "-" | tostring | .[0:5]) s, downtime guest \(.downtime.guest_switchover_ms) ms, QEMU \(.downtime.vmm_ms) ms, penalty \(.workload.slowdown_pct // "-" | tostring | .[0:4]) %, wire \(.wire.total_bytes) bytes, passed \(.passed)"' >&2
        else
          err=$(tail -n 5 "$WORK/run-$n.err" | tr '\n' ' ')
          jq -nc --argjson bench "$bench" --arg e "$err" '{bench: ($bench + {error: $e})}' >> "$RUNS.new"
          echo "  no report (exit $rc): $err" >&2
        fi
      done
    done
  done
done
mv "$RUNS.new" "$RUNS"

machine="$(uname -sr), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)), $(free -g | awk '/^Mem:/ {print $2}') GiB, QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{print $4}')"
"$AGGREGATE" --runs "$RUNS" --out-dir "$OUT" --command "$COMMAND" \
  --date "$(date -u +%F)" --commit "$COMMIT" --machine "$machine"
