# unbusy: the build and test entry points. `make test` is the one command CI runs (.ci/run).
# Every target installs what it needs through `setup`, idempotently.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

# wasm32v1-none has no std at all: building the core for it proves the core is no_std.
WASM_TARGETS := wasm32-unknown-unknown wasm32-wasip1 wasm32v1-none

.PHONY: setup fmt-check clippy test-rust wasm test bench bench-core simulate

## setup: the Rust targets and components the build needs (idempotent).
setup:
	@installed="$$(rustup target list --installed)"; \
	for t in $(WASM_TARGETS); do \
	  grep -qx "$$t" <<<"$$installed" || rustup target add "$$t"; \
	done
	@components="$$(rustup component list --installed)"; \
	for c in clippy rustfmt; do \
	  grep -q "^$$c" <<<"$$components" || rustup component add "$$c"; \
	done

## fmt-check: formatting, as `cargo fmt` leaves it.
fmt-check: setup
	$(CARGO) fmt --all -- --check

## clippy: every crate and target, warnings denied; the wasm builds too.
clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	for t in $(WASM_TARGETS); do \
	  $(CARGO) clippy -p unbusy-core --no-default-features --target $$t -- -D warnings; \
	done
	$(CARGO) clippy -p unbusy-envoy --target wasm32-wasip1 -- -D warnings
	$(CARGO) clippy -p unbusy-js --target wasm32-unknown-unknown -- -D warnings

## test-rust: unit, property and doc tests of every crate, closing with one total line.
test-rust: setup
	mkdir -p target
	$(CARGO) test --workspace 2>&1 | tee target/test-rust.log
	@awk '/^test result:/ { passed += $$4; failed += $$6 } \
	  END { printf "%d passed, %d failed\n", passed, failed }' target/test-rust.log

## wasm: the release builds of the core and its two wasm hosts.
wasm: setup
	for t in $(WASM_TARGETS); do \
	  $(CARGO) build -p unbusy-core --no-default-features --release --target $$t; \
	done
	$(CARGO) build -p unbusy-envoy --release --target wasm32-wasip1
	$(CARGO) build -p unbusy-js --release --target wasm32-unknown-unknown

## test: everything that checks the project; the tests run last so their total closes the output.
test: fmt-check clippy wasm
	$(MAKE) --no-print-directory test-rust

## bench: every benchmark (numbers for BENCHMARKS.md; nothing is asserted).
bench: bench-core simulate

bench-core: setup
	$(CARGO) bench -p unbusy-core --bench hot_paths

## simulate: every policy over every scenario (the tables and plot in BENCHMARKS.md).
SCENARIOS := $(wildcard tests/scenarios/shared/*.json) $(wildcard tests/scenarios/*.json)
simulate: setup
	$(CARGO) build --release -p unbusy-tests --bin simulate
	./target/release/simulate $(addprefix --scenario ,$(SCENARIOS)) --markdown --svg docs/simulation.svg
