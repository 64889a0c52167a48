#!/usr/bin/env bash
# The main job, shown on one machine: live-migrate a running VM, disk and memory, across an
# emulated WAN and prove that it went on over there (`strait demo`, docs/demo.md).
#
# Installs the host packages (QEMU and the guest's build tools), builds the tiny test guest
# and `strait` in release, then runs `strait demo --guest DIR` with this script's arguments
# (`strait demo --help` lists them), e.g. `bash scripts/demo.sh --rtt-ms 200 --json`.
# Needs root: the emulated WAN is two network namespaces.
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

# Everything is built from the repository, but the demo runs where this script was started,
# so that its chart (strait-demo.svg) and relative paths among the arguments land where the
# caller expects them.
(cd "$REPO" && bash scripts/install-deps.sh)
GUEST="$(cd "$REPO" && bash scripts/guest/build.sh)"
(cd "$REPO" && cargo build --release -p strait-engine --bin strait)
exec "$TARGET_DIR/release/strait" demo --guest "$GUEST" "$@"
