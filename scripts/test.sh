#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test`, `.ci/run`). Installs what it needs.
set -euo pipefail
readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { echo; echo "=== $*"; }

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
