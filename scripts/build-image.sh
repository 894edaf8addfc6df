#!/usr/bin/env bash
# `make image`: builds the OCI image from `scratch` with buildah, without pulling any
# base image (no registry needed): the root filesystem is scripts/image-rootfs.sh's
# (the binary, its shared libraries, the CA bundle), the same layout the Containerfile
# builds where a registry is reachable.
#
#   scripts/build-image.sh BINARY IMAGE_REF [OCI_ARCHIVE]
#
# Needs buildah (apt-get install buildah). Writes the image to local containers
# storage as IMAGE_REF (e.g. localhost/mayfly:0.1.0) and, if OCI_ARCHIVE is given,
# also as an OCI archive there. Push with
#   buildah push IMAGE_REF docker://REGISTRY/mayfly:TAG
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:?usage: build-image.sh BINARY IMAGE_REF [OCI_ARCHIVE]}"
ref="${2:?usage: build-image.sh BINARY IMAGE_REF [OCI_ARCHIVE]}"
archive="${3:-}"

command -v buildah >/dev/null || { echo "make image: buildah not found; apt-get install buildah" >&2; exit 1; }
version="$("$bin" --version | awk '{print $2}')"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then revision="$revision-dirty"; fi

rootfs="$(mktemp -d)"
ctr=""
cleanup() {
    [[ -n "$ctr" ]] && buildah rm "$ctr" >/dev/null 2>&1
    rm -rf "$rootfs"
}
trap cleanup EXIT
scripts/image-rootfs.sh "$bin" "$rootfs/root"

ctr="$(buildah from scratch)"
buildah copy "$ctr" "$rootfs/root/" / >/dev/null
buildah config \
    --user 65532:65532 \
    --workingdir /var/lib/mayfly \
    --env PATH=/usr/local/bin \
    --entrypoint '["/usr/local/bin/mayfly"]' \
    --cmd '["--help"]' \
    --port 8443/tcp \
    --label org.opencontainers.image.title=mayfly \
    --label "org.opencontainers.image.description=Just-in-time, task-scoped credential broker" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    "$ctr"
buildah commit --quiet --format oci "$ctr" "$ref" >/dev/null
echo "image: $ref (mayfly $version, revision $revision)"
if [[ -n "$archive" ]]; then
    mkdir -p "$(dirname "$archive")"
    rm -f "$archive"
    buildah push --quiet "$ref" "oci-archive:$archive:$ref" >/dev/null
    echo "image: OCI archive $archive"
fi
