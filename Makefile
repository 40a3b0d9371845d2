# unbusy: the build and test entry points. `make test` is the one command CI runs (.ci/run).
# Every target installs what it needs through `setup`, idempotently.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

# wasm32v1-none has no std at all: building the core for it proves the core is no_std.
WASM_TARGETS := wasm32-unknown-unknown wasm32-wasip1 wasm32v1-none

.PHONY: setup fmt-check clippy test-rust wasm test bench bench-core

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

## test-rust: unit, property and doc tests of every crate.
test-rust: setup
	$(CARGO) test --workspace

## wasm: the release builds of the core and its two wasm hosts.
wasm: setup
	for t in $(WASM_TARGETS); do \
	  $(CARGO) build -p unbusy-core --no-default-features --release --target $$t; \
	done
	$(CARGO) build -p unbusy-envoy --release --target wasm32-wasip1
	$(CARGO) build -p unbusy-js --release --target wasm32-unknown-unknown

## test: everything that checks the project.
test: fmt-check clippy test-rust wasm
	@echo "make test: all checks passed"

## bench: every benchmark (numbers for BENCHMARKS.md; nothing is asserted).
bench: bench-core

bench-core: setup
	$(CARGO) bench -p unbusy-core --bench hot_paths
