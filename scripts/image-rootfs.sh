#!/usr/bin/env bash
# Assembles the container image's root filesystem: exactly the mayfly binary, the
# shared libraries it links (as `ldd` resolves them, with the dynamic loader), the
# system CA bundle (for HTTPS to OIDC issuers, Vault, AWS STS), and /etc/passwd and
# /etc/group naming the non-root user 65532. Nothing else: no shell, no package
# manager.
#
#   scripts/image-rootfs.sh BINARY ROOTFS_DIR
#
# Used by both the Containerfile (build stage) and `make image` (scripts/build-image.sh),
# so both produce the same runtime layout.
set -euo pipefail

bin="${1:?usage: image-rootfs.sh BINARY ROOTFS_DIR}"
root="${2:?usage: image-rootfs.sh BINARY ROOTFS_DIR}"
[[ -x "$bin" ]] || { echo "image-rootfs: $bin is not an executable" >&2; exit 1; }
command -v ldd >/dev/null || { echo "image-rootfs: ldd not found (apt-get install libc-bin)" >&2; exit 1; }

rm -rf "$root"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/var/lib/mayfly"
install -m 0755 "$bin" "$root/usr/local/bin/mayfly"

# Every library the binary needs, at the path the loader looks for it. A statically
# linked binary has none ("not a dynamic executable").
if ldd "$bin" >/dev/null 2>&1; then
    while read -r lib; do
        [[ -n "$lib" && -e "$lib" ]] || continue
        mkdir -p "$root$(dirname "$lib")"
        # -L: copy the file a symlink (e.g. libc.so.6) points to, under the linked name.
        cp -L "$lib" "$root$lib"
    done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
fi

ca=/etc/ssl/certs/ca-certificates.crt
[[ -f "$ca" ]] || { echo "image-rootfs: $ca missing (apt-get install ca-certificates)" >&2; exit 1; }
install -m 0644 "$ca" "$root/etc/ssl/certs/ca-certificates.crt"

printf 'root:x:0:0:root:/root:/sbin/nologin\nmayfly:x:65532:65532:mayfly:/var/lib/mayfly:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nmayfly:x:65532:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chown -R 65532:65532 "$root/var/lib/mayfly" 2>/dev/null || true
