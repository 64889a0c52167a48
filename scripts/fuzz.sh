#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for ${FUZZ_SECONDS:-30} seconds each, installing
# cargo-fuzz first if it is missing. Exits non-zero on the first crash; the input is left
# in fuzz/artifacts/<target>/ and fuzz/README.md says how to reproduce it.
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); only a stable toolchain is
# installed, so RUSTC_BOOTSTRAP=1 lets stable accept them. CARGO_TARGET_DIR is honoured.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${FUZZ_SECONDS:-30}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"

# Seeds that reach every stage of the parser: they start request_parse at the ~600 edges
# a run saturates at, where 30 seconds from an empty corpus reach ~530. Regenerated on
# every run (the corpus directory is gitignored), so a changed input format cannot leave
# stale seeds behind.
cargo run --quiet --example seed_corpus -- corpus/request_parse

# Listed first so a failure to list stops the script (set -e skips command substitutions
# inside a for list) rather than fuzzing nothing and reporting success.
targets=$(cargo fuzz list)
[ -n "$targets" ] || {
    echo "fuzz.sh: cargo fuzz list found no targets" >&2
    exit 1
}
for target in $targets; do
    echo "fuzz.sh: fuzzing $target for ${seconds}s" >&2
    cargo fuzz run "$target" -- -max_total_time="$seconds"
done
echo "fuzz.sh: no crash" >&2
