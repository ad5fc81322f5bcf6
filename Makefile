# ferry's front door. `make demo` tells the product's story; `make test` is what CI runs.
CARGO ?= cargo
# Debian's cargo/rustc 1.85 (rustc-web), the toolchain that builds the ARM release binaries.
MSRV_CARGO ?= /usr/bin/cargo

.PHONY: bench-fleet bench-fleet-pg all build test lint unit msrv demo deps bench clean fuzz torture torture-ci torture-build \
	cross test-arm test-arm-ci footprint

all: build

# The product's crates: the agent, the receiver (ferry-cloud) and the crates they are built from.
PACKAGES = -p ferry -p ferry-cloud -p ferry-journal -p ferry-protocol -p ferry-tls -p ferry-util -p ferry-bench

build:
	$(CARGO) build --release -p ferry -p ferry-cloud

# The bench's SQLite headers too: `make lint` checks every crate of the workspace, the bench's
# included (it once stopped compiling unseen).
deps:
	@scripts/ensure-deps.sh --bench

## The whole suite: formatting, lints with warnings denied, unit and integration tests.
# The agent's integration tests run the ferry-cloud binary found beside them (tests/util): cargo
# builds a package's binaries for its own integration tests only, and crates/cloud has none.
test: deps lint
	$(CARGO) build -p ferry-cloud --bins
	$(CARGO) test --all-targets $(PACKAGES)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## The fuzz suite (tests/fuzz.rs) at length, optimised: `make fuzz CASES=100000`. `make test` runs it
## briefly (256 cases). Replay a failure with FERRY_FUZZ_SEED=<seed it printed>.
CASES ?= 25600
fuzz:
	FERRY_FUZZ_CASES=$(CASES) $(CARGO) test --profile fuzz --test fuzz -- --nocapture

## Build with the minimum supported Rust (1.85) from Debian; install it with scripts/ensure-deps.sh --msrv.
## The gateway's binaries, and ferry-cloud's: both crates declare 1.85.
msrv:
	PATH=/usr/bin:$$PATH CARGO_TARGET_DIR=target/msrv $(MSRV_CARGO) build --locked --bins -p ferry -p ferry-cloud

## Static release binaries for ARM gateways, sizes checked against the 6 MiB budget:
## `make cross TARGET=aarch64-unknown-linux-gnu` (or armv7-unknown-linux-gnueabihf; both if unset).
## cross (Docker) when available, else Debian's rustc-web 1.85 route (scripts/cross.sh).
cross:
	MSRV_CARGO=$(MSRV_CARGO) scripts/cross.sh $(TARGET)

## The test suite for both ARM targets (or TARGET), run under qemu-user (scripts/test-arm.sh).
test-arm: deps
	MSRV_CARGO=$(MSRV_CARGO) scripts/test-arm.sh $(TARGET)

## What CI runs on ARM: the outage and crash tests on both targets.
test-arm-ci: deps
	MSRV_CARGO=$(MSRV_CARGO) scripts/test-arm.sh --ci $(TARGET)

## Binary size, RSS idle and with a backlog, CPU per 1,000 msg/s; x86_64 and ARM under qemu.
footprint: deps
	scripts/footprint.sh

## The outage story end to end: broker, cloud, agent; the cloud goes away and comes back.
demo: deps build
	@scripts/demo.sh

## Benchmarks side by side, ratios against baselines from the same run (docs/BENCHMARKS.md).
## QUICK=1: about a tenth of the records. The numbers go into docs/BENCHMARKS.md, except with
## ONLY=<section> (size, append, churn, backlog, ingest), which runs that section alone.
bench:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release -p ferry -p ferry-cloud
	$(CARGO) build --release -p ferry-bench
	target/release/ferry-bench $(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY),--doc docs/BENCHMARKS.md)

## The center under simulated fleets (2,000 to 100,000 gateways; QUICK=1: a tenth of the devices),
## side by side: a null receiver (the harness's ceiling), the files store, PostgreSQL behind one
## replica and behind two with nginx (against a COPY of the same rows, in key order and in the
## fleet's); prints its table. The full run takes about 50 min and up to 50 GB under target/
## (100,000 x 250 records on PostgreSQL);
## FLEET=DEVICESxRECORDS/BATCH (as 100000x250/250) runs that one fleet instead.
bench-fleet:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release -p ferry-cloud -p ferry-bench
	target/release/ferry-bench $(if $(QUICK),--quick) --only fleet $(if $(FLEET),--fleet $(FLEET))

## The same fleets on PostgreSQL alone (one replica, then two behind nginx), against a COPY.
bench-fleet-pg:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release -p ferry-cloud -p ferry-bench
	target/release/ferry-bench $(if $(QUICK),--quick) --only fleet-pg $(if $(FLEET),--fleet $(FLEET))

## Power-cut torture (README "Power-cut torture"): ferry's journal on ferry-crashfs, the journal
## regression tests on it, the slow-fsync, crash-then-cut, eio and overlap scenarios, then CUTS power cuts
## of every kind; each run's last line is its tally. Needs /dev/fuse. `make torture CUTS=N`, `TORTURE_ARGS="--seed S"` to repeat a run.
CUTS ?= 1000
# Cycles of the mosquitto-bridge peer run (README "Power-cut torture"): reported, not judged.
PEER_CUTS ?= 20
TORTURE_ARGS ?=
TORTURE = target/debug/ferry-torture

torture-build: deps
	$(CARGO) build -p ferry -p ferry-cloud --bins
	$(CARGO) build -p ferry-crashfs --bins

torture: torture-build
	$(CARGO) test -p ferry-crashfs
	$(TORTURE) --scenario slow-fsync
	$(TORTURE) --scenario crash-then-cut
	$(TORTURE) --scenario eio
	$(TORTURE) --scenario overlap
	$(TORTURE) --cuts $(CUTS) $(TORTURE_ARGS)
	$(TORTURE) --peer mosquitto-bridge --cuts $(PEER_CUTS)

## The short campaign CI runs after `make test`.
torture-ci:
	$(MAKE) torture CUTS=50 PEER_CUTS=5

clean:
	$(CARGO) clean
