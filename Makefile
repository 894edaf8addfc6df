# Mayfly — the two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build test test-rust test-chart lint fmt bench bench-store bench-exchange clean

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

## Lease-store benchmark (not part of `make test`): release build, real redis-server.
bench-store:
	$(CARGO) bench --locked --bench store

## Credential-exchange load against the real binary (embedded store, then Redis).
bench-exchange:
	$(CARGO) bench --locked --bench exchange
	$(CARGO) bench --locked --bench exchange -- redis
	$(CARGO) bench --locked --bench exchange -- openbao-service
	$(CARGO) bench --locked --bench exchange -- openbao-batch

bench: bench-store bench-exchange

clean:
	$(CARGO) clean
	rm -rf .mayfly-dev
