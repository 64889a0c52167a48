#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test`, `.ci/run`). Installs what it needs.
set -euo pipefail
readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { echo; echo "=== $*"; }

# CI builds once, from a clean checkout, where incremental compilation's caches only take
# disk (they were the larger half of the test build). A developer rerunning this who wants
# them sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The build and the tests' images need a few GiB; say so plainly rather than let a linker
# die of SIGBUS on a full disk (which is how a CI run once failed).
readonly DISK_FREE_WANTED_GIB=8
target_dir="${CARGO_TARGET_DIR:-$REPO/target}"
mkdir -p "$target_dir"
free_gib=$(df -Pk "$target_dir" | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "${free_gib:-0}" -lt "$DISK_FREE_WANTED_GIB" ]; then
    echo "test.sh: warning: only ${free_gib} GiB free under $target_dir;" \
        "the build and the tests want about ${DISK_FREE_WANTED_GIB} GiB" >&2
fi

step "host packages"
bash scripts/install-deps.sh
step "test guest"
bash scripts/guest/build.sh >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --quiet
step "tests (QEMU end-to-end included; nothing skips under CI=true)"
# The QEMU tests each boot a TCG guest; two at a time keep a 2-core machine responsive.
cargo test --workspace -- --test-threads="${STRAIT_TEST_THREADS:-2}"
step "criterion benchmarks, briefly (so they cannot rot)"
cargo bench -p strait-bench --benches -- --warm-up-time 0.2 --measurement-time 0.5
step "fuzz targets, ${FUZZ_SECONDS:-30} s each"
bash scripts/fuzz.sh
echo
echo "=== all checks passed"
