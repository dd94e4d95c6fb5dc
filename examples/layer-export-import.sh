#!/usr/bin/env bash
# Move a volume between pools as layers: `thinmgr layer export` writes the blocks a snapshot
# changed against its origin (read from the pool metadata: shared blocks are never read),
# `thinmgr layer import` rebuilds it on another pool as a snapshot of the same origin plus
# those blocks. The two copies are then identical, byte for byte.
#
#   sudo bash examples/layer-export-import.sh [HOME]  (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE)" >&2; exit 77; }
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
src="src$$" dst="dst$$"
layers="$home/layers"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    for p in "$src" "$dst"; do
        for v in base app; do thinmgr volume deactivate "$p" "$v" >/dev/null 2>&1; done
        thinmgr pool destroy "$p" --force >/dev/null 2>&1
    done
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT
# Fill COUNT 64 KiB blocks from block SEEK of a volume with random data.
write_blocks() {
    local dev; dev=$(thinmgr volume activate "$1" "$2")
    dd if=/dev/urandom of="$dev" bs=64K seek="$3" count="$4" oflag=direct conv=notrunc status=none
    thinmgr volume deactivate "$1" "$2" >/dev/null
}
sha_of() {
    local dev sum; dev=$(thinmgr volume activate "$1" "$2")
    sum=$(sha256sum < "$dev" | cut -d' ' -f1)
    thinmgr volume deactivate "$1" "$2" >/dev/null
    echo "$sum"
}
mkdir -p "$layers"

thinmgr pool create "$src" --size 256M
thinmgr volume create "$src" base --size 32M
write_blocks "$src" base 0 128                 # 8 MiB of "base image"
thinmgr snapshot "$src" base app
write_blocks "$src" app 40 16                  # the app changes 1 MiB of it...
write_blocks "$src" app 300 4                  # ...and adds 256 KiB past the base's data

step "The changes of app against base, from the metadata" thinmgr diff "$src" base app
step "Export base whole, and app as its changes against base" \
    thinmgr layer export "$src" base -o "$layers/base.thindiff"
thinmgr layer export "$src" app --parent base -o "$layers/app.thindiff"
ls -l "$layers"

thinmgr pool create "$dst" --size 256M
step "Import on a second pool: base first, then app on top of it" \
    thinmgr layer import "$dst" "$layers/base.thindiff" base
thinmgr layer import "$dst" "$layers/app.thindiff" app --parent base
step "app on the second pool is a snapshot of base sharing its blocks" thinmgr volume list "$dst"

a=$(sha_of "$src" app) b=$(sha_of "$dst" app)
echo "sha256 $src/app: $a"
echo "sha256 $dst/app: $b"
[ "$a" = "$b" ] && echo "identical" || { echo "DIFFERENT" >&2; exit 1; }
