# The two commands a newcomer runs (see README.md). Both install what they need first.
.PHONY: demo test check deps guest

deps:
	bash scripts/install-deps.sh

guest: deps
	bash scripts/guest/build.sh >/dev/null

# The main job: a guest on a strait-served disk (live migration replaces it later).
demo:
	bash scripts/demo.sh

# Everything CI runs: formatting, lints, docs, all tests (QEMU ones included), the
# benchmarks briefly, and the fuzz targets for 30 s each.
test:
	bash scripts/test.sh
