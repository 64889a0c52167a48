#!/usr/bin/env bash
# Two builds of strait against each other on the demo's migration, interleaved, at one
# RTT: how a change moves the downtime and what it costs (total time, workload penalty).
# Each revision is built in its own worktree under AB_DIR (default /tmp/strait-ab; remove
# it and run `git worktree prune` to clean up); every run is one
# `strait demo --json` under `flock /tmp/strait-heavy.lock`, so no other QEMU shares the
# cores. The order alternates (A B, B A, ...) so a drift in the machine's load hits both.
#
#   A=c72c232 B=HEAD bench/downtime-ab.sh                  # 3 runs each, 214 ms, 200 Mbit/s
#   A=main B=my-branch N=5 RTT_MS=100 bench/downtime-ab.sh
#   A=HEAD B=HEAD B_ARGS="--throttle cgroup" bench/downtime-ab.sh   # one build, two options
#
# A_ARGS and B_ARGS are extra `strait demo` arguments for each variant (default none); a
# variant's label is its revision, then its arguments with spaces as dashes.
#
# Writes bench/results/downtime-ab-<A>-<B>.jsonl (every report, tagged "variant") and
# bench/results/downtime-ab-<A>-<B>.md (medians and ranges, with this command). Needs root.
set -euo pipefail

cd "$(dirname "$0")/.."
A="${A:?A=REV (the baseline)}"
B="${B:?B=REV (the change)}"
N="${N:-3}"
RTT_MS="${RTT_MS:-214}"
RATE_MBIT="${RATE_MBIT:-200}"
WORKLOAD_S="${WORKLOAD_S:-90}"
GUEST="${GUEST:-.cache/guest}"
AB_DIR="${AB_DIR:-/tmp/strait-ab}"
LOCK=/tmp/strait-heavy.lock
OUT=bench/results

for v in N RTT_MS RATE_MBIT WORKLOAD_S; do
  case "${!v}" in '' | *[!0-9]*) echo "$v must be a number, not '${!v}'" >&2; exit 2 ;; esac
done
[ -f "$GUEST/vmlinuz" ] || { echo "no guest at $GUEST (scripts/guest/build.sh builds it; GUEST=DIR)" >&2; exit 2; }
command -v jq >/dev/null || bash scripts/install-deps.sh

# Builds revision $1 in its own worktree; prints the path of its binary. The revisions
# share one target directory (the dependencies build once), and each binary is copied
# out, since the next build replaces it.
build() {
  local rev sha dir
  rev="$1"
  sha="$(git rev-parse --short=12 "$rev^{commit}")"
  dir="$AB_DIR/$sha"
  if [ ! -x "$dir/strait" ]; then
    [ -d "$dir/src" ] || git worktree add -f --detach "$dir/src" "$sha" >&2
    (cd "$dir/src" && CARGO_TARGET_DIR="$AB_DIR/target" cargo build --release -q -p strait-engine --bin strait >&2)
    cp "$AB_DIR/target/release/strait" "$dir/strait"
  fi
  echo "$dir/strait"
}

A_ARGS="${A_ARGS:-}"
B_ARGS="${B_ARGS:-}"
label() {
  local l
  l="$(git rev-parse --short=7 "$1^{commit}")"
  [ -z "$2" ] || l="$l$(echo " $2" | tr -s ' ' '-' | tr -cd 'A-Za-z0-9._-')"
  echo "$l"
}
LA="$(label "$A" "$A_ARGS")"
LB="$(label "$B" "$B_ARGS")"
[ "$LA" != "$LB" ] || { echo "A and B are the same build with the same arguments" >&2; exit 2; }
BIN_A="$(build "$A")"
BIN_B="$(build "$B")"
NAME="downtime-ab-$LA-$LB"
RUNS="$OUT/$NAME.jsonl"
: > "$RUNS"
COMMAND="A=$(label "$A" "") B=$(label "$B" "")${A_ARGS:+ A_ARGS=\"$A_ARGS\"}${B_ARGS:+ B_ARGS=\"$B_ARGS\"} N=$N RTT_MS=$RTT_MS RATE_MBIT=$RATE_MBIT WORKLOAD_S=$WORKLOAD_S bench/downtime-ab.sh"

run() {
  local variant="$1" bin="$2" extra="$3" raw
  raw="$(mktemp)"
  echo "== $variant: $bin demo --rtt-ms $RTT_MS --rate-mbit $RATE_MBIT $extra" >&2
  # shellcheck disable=SC2086 # the extra arguments are words
  if flock "$LOCK" "$bin" demo --guest "$GUEST" --rtt-ms "$RTT_MS" --rate-mbit "$RATE_MBIT" \
    --workload-s "$WORKLOAD_S" --json $extra > "$raw"; then :; fi
  # The report is the last line; a run that printed none is recorded as such.
  if tail -n1 "$raw" | jq -e . >/dev/null 2>&1; then
    tail -n1 "$raw" | jq -c --arg v "$variant" '. + {variant: $v}' >> "$RUNS"
  else
    jq -nc --arg v "$variant" '{variant: $v, outcome: "no report", passed: false}' >> "$RUNS"
  fi
  rm -f "$raw"
  tail -n1 "$RUNS" | jq -r '"   \(.variant): \(.outcome) passed \(.passed) switchover \(.downtime.switchover_ms // "-") ms, guest \(.downtime.guest_switchover_ms // "-") ms, after the stop \(.downtime.at_stop.vmm_bytes_after // "-") B"' >&2
}

for i in $(seq "$N"); do
  if [ $((i % 2)) -eq 1 ]; then run "$LA" "$BIN_A" "$A_ARGS"; run "$LB" "$BIN_B" "$B_ARGS"
  else run "$LB" "$BIN_B" "$B_ARGS"; run "$LA" "$BIN_A" "$A_ARGS"; fi
done

# Median and range of one figure over the runs of one variant that passed.
{
  echo "# Downtime A/B: $LA (A) against $LB (B)"
  echo
  echo "$(date -u +%Y-%m-%d), $RTT_MS ms RTT, $RATE_MBIT Mbit/s, $N runs each, interleaved. Reproduce:"
  echo
  echo "    $COMMAND"
  echo
  echo "Medians over the runs that passed, range in brackets."
  echo
  jq -rs --arg a "$LA" --arg b "$LB" '
    def stat(f): [.[] | f | select(. != null)] | sort
      | if length == 0 then "-" else
          "\((if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end) | . * 10 | round / 10) (\(.[0] | . * 10 | round / 10)–\(.[-1] | . * 10 | round / 10))"
        end;
    def rows($v): [.[] | select(.variant == $v)] as $all | [$all[] | select(.passed == true)] as $ok
      | "| \($v) | \($ok | length)/\($all | length) | \($ok | stat(.downtime.switchover_ms))"
        + " | \($ok | stat(.downtime.guest_switchover_ms))"
        + " | \($ok | stat(.downtime.guest_stopped_ms))"
        + " | \($ok | stat(.downtime.at_stop.vmm_bytes_after / 1e6))"
        + " | \($ok | stat(.downtime.at_stop.memory_in_flight_bytes / 1e6))"
        + " | \($ok | stat(.downtime.at_stop.srtt_ms))"
        + " | \($ok | stat(.migration.total_s))"
        + " | \($ok | stat(.workload.slowdown_pct))"
        + " | \($ok | stat(.throttle.peak_applied_pct))"
        + " | \($ok | stat(.throttle.integral_pct_s / 100)) |";
    "| build | passed | switchover ms | guest gap ms | stood still ms | MB after the stop | MB in flight at the stop | srtt at the stop ms | total s | penalty % | throttle peak % | CPU taken s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
    rows($a), rows($b)' "$RUNS"
  echo
  echo "Every report: [$NAME.jsonl]($NAME.jsonl)."
} > "$OUT/$NAME.md"
cat "$OUT/$NAME.md"
