#!/usr/bin/env bash
# Runs the image `make image` built, from its OCI archive, with a real container
# runtime when one works on this machine, else in the image's own root filesystem
# under fresh mount/PID/IPC/UTS namespaces (unshare + chroot), read-only, as user
# 65532 -- and checks that
#   1. `mayfly --version` prints the version the image's label claims;
#   2. `mayfly dev` starts from the image and answers GET /healthz over TLS.
#
#   scripts/test-image.sh OCI_ARCHIVE IMAGE_REF
#
# Needs umoci (apt-get install umoci) and root (for unshare/chroot); tries crun and
# podman first (apt-get install crun podman). Prints which runtime it used.
set -euo pipefail
cd "$(dirname "$0")/.."

archive="${1:?usage: test-image.sh OCI_ARCHIVE IMAGE_REF}"
ref="${2:?usage: test-image.sh OCI_ARCHIVE IMAGE_REF}"
command -v umoci >/dev/null || { echo "test-image: umoci not found; apt-get install umoci" >&2; exit 1; }

work="$(mktemp -d)"
pid=""
cleanup() {
    # unshare passes no signal on, and the broker (pid 1 of its PID namespace, running
    # as another uid) loses the parent-death signal: stop it by its own pid first.
    if [[ -n "$pid" ]]; then
        local c
        for c in $(pgrep -P "$pid" || true); do kill -KILL "$c" 2>/dev/null || true; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir "$work/layout"
tar -xf "$archive" -C "$work/layout"
umoci unpack --image "$work/layout:$ref" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"
labels="$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(json.dumps(c.get("annotations",{})))' "$work/bundle/config.json")"
want_version="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("org.opencontainers.image.version",""))' "$labels")"
user="$(python3 -c 'import json,sys; u=json.load(open(sys.argv[1]))["process"]["user"]; print(str(u["uid"]) + ":" + str(u["gid"]))' "$work/bundle/config.json")"
echo "image $ref: user $user, labels $labels"
[[ "$user" == "65532:65532" ]] || { echo "FAIL image user is $user, want 65532:65532 (non-root)" >&2; exit 1; }
[[ -n "$want_version" ]] || { echo "FAIL no org.opencontainers.image.version label" >&2; exit 1; }
grep -q '"org.opencontainers.image.revision": "[0-9a-f]\{40\}' <<<"$labels" \
    || { echo "FAIL no source commit in org.opencontainers.image.revision" >&2; exit 1; }

# run_in_image ARGS...: the image's binary, image root read-only, as its user.
runtime=""
try_crun() {
    command -v crun >/dev/null || return 1
    python3 - "$work/bundle/config.json" <<'PY' || return 1
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/usr/local/bin/mayfly", "--version"]
c["root"]["readonly"] = True
json.dump(c, open(p, "w"))
PY
    (cd "$work/bundle" && timeout 30 crun run "mayfly-image-test-$$") >"$work/crun.out" 2>&1 || return 1
    grep -q "mayfly" "$work/crun.out"
}
if try_crun; then
    runtime="crun"
    version_out="$(cat "$work/crun.out")"
else
    runtime="unshare+chroot"
    echo "note: crun could not run a container here ($(head -1 "$work/crun.out" 2>/dev/null || echo 'not installed')); using unshare + chroot into the image's rootfs"
fi

# Mount points the read-only root needs (what the chart mounts as volumes).
mkdir -p "$rootfs/etc/mayfly/policies"
run_in_image() {
    # --kill-child: the broker dies with unshare (the PID namespace's init).
    exec unshare --mount --pid --ipc --uts --fork --kill-child sh -c '
        set -e
        root="$1"; shift
        mount --bind "$root" "$root"
        mount -o remount,bind,ro "$root"
        mount -t tmpfs -o size=64m tmpfs "$root/tmp"
        mount -t tmpfs -o size=64m,uid=65532,gid=65532 tmpfs "$root/var/lib/mayfly"
        mount --bind -o ro "$POLICIES" "$root/etc/mayfly/policies"
        exec chroot --userspec=65532:65532 "$root" "$@"
    ' sh "$rootfs" "$@"
}
export POLICIES="$PWD/config/policies"

if [[ "$runtime" != crun ]]; then
    version_out="$(run_in_image /usr/local/bin/mayfly --version)"
fi
echo "[$runtime] mayfly --version: $version_out"
[[ "$version_out" == "mayfly $want_version" ]] \
    || { echo "FAIL --version printed '$version_out', label says $want_version" >&2; exit 1; }

# `mayfly dev` from the image, on a free loopback port, then /healthz.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
run_in_image /usr/local/bin/mayfly dev --dir /var/lib/mayfly/dev --listen "127.0.0.1:$port" \
    --policies /etc/mayfly/policies >"$work/dev.log" 2>&1 &
pid=$!
deadline=$((SECONDS + 60))
until code="$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$port/healthz")" && [[ "$code" == 200 ]]; do
    if ((SECONDS > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
        echo "FAIL mayfly dev from the image did not answer /healthz (last: ${code:-none})" >&2
        sed 's/^/  | /' "$work/dev.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "[unshare+chroot, read-only root, uid 65532] mayfly dev: GET /healthz -> $code"
echo "image test: ok"
