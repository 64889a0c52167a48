# The two commands a newcomer runs (see README.md). Both install what they need first.
.PHONY: demo test check deps guest

deps:
	bash scripts/install-deps.sh

guest: deps
	bash scripts/guest/build.sh >/dev/null

# The main job: live-migrate a running VM (disk and memory) across an emulated WAN on this
# machine, prove it went on over there, report and chart it (strait demo, docs/demo.md).
# Options go in DEMO_ARGS, e.g. make demo DEMO_ARGS='--rtt-ms 200 --json'.
DEMO_ARGS ?=
demo:
	bash scripts/demo.sh $(DEMO_ARGS)

# Everything CI runs: formatting, lints, docs, all tests (QEMU ones included), the
# benchmarks briefly, and the fuzz targets for 30 s each.
test:
	bash scripts/test.sh
