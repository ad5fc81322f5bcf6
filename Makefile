# ferry's front door. `make demo` tells the product's story; `make test` is what CI runs.
CARGO ?= cargo
# Debian's cargo/rustc 1.85 (rustc-web), the toolchain that builds the ARM release binaries.
MSRV_CARGO ?= /usr/bin/cargo

.PHONY: all build test lint unit msrv demo deps clean cross test-arm test-arm-ci footprint

all: build

build:
	$(CARGO) build --release --bins

deps:
	@scripts/ensure-deps.sh

## The whole suite: formatting, lints with warnings denied, unit and integration tests.
test: deps lint
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## Build with the minimum supported Rust (1.85) from Debian; install it with scripts/ensure-deps.sh --msrv.
msrv:
	PATH=/usr/bin:$$PATH CARGO_TARGET_DIR=target/msrv $(MSRV_CARGO) build --locked --bins

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

clean:
	$(CARGO) clean
