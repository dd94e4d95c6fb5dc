#!/usr/bin/env bash
# A container's change as a new image layer, shipped to another pool: `thinmgr commit` turns
# the container's snapshot into the top layer of busybox:v2; `thinmgr layer export` writes a
# layer's blocks that differ from its parent (read from the pool metadata) as a portable
# layer-diff file; `thinmgr layer import` rebuilds it on the other pool as a snapshot of the
# same parent plus those blocks (refused unless the parent there has the same content).
#
#   sudo bash examples/commit-export-import.sh [HOME]   (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE, mount, namespaces)" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
src="src$$" dst="dst$$"
layers="$home/layers"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    thinmgr rm --force builder >/dev/null 2>&1
    for p in "$src" "$dst"; do thinmgr pool destroy "$p" --force >/dev/null 2>&1; done
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT
# top_layer IMAGE: the thin volume holding the image's top layer.
top_layer() {
    thinmgr --json image show "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][-1]["device"])'
}

thinmgr pool create "$src" --size 1G
thinmgr pool create "$dst" --size 1G
bash "$here/lib/busybox-rootfs.sh" "$home/busybox.tar.gz"
thinmgr image import "$src" busybox "$home/busybox.tar.gz"

step "A container changes its snapshot" \
    thinmgr run --name builder busybox -- sh -c \
    'mkdir -p /srv && seq 1 50000 >/srv/numbers && echo "made in $(hostname)" >/srv/origin'
step "Commit the snapshot as the top layer of busybox:v2" thinmgr commit builder busybox:v2
thinmgr rm builder
base=$(top_layer busybox)
top=$(top_layer busybox:v2)
step "The image tree: the new layer shares everything it did not change" thinmgr image tree "$src"

mkdir -p "$layers"
step "Export the base layer whole (no parent)" \
    thinmgr layer export "$src" "$base" -o "$layers/base.thindiff"
step "Export the new layer: only its blocks that differ from the base" \
    thinmgr layer export "$src" "$top" --parent "$base" -o "$layers/v2.thindiff"
ls -l "$layers"

step "Rebuild both on the other pool: the base, then v2 as a snapshot of it plus the diff" \
    thinmgr layer import "$dst" "$layers/base.thindiff" base
thinmgr layer import "$dst" "$layers/v2.thindiff" v2 --parent base
step "The rebuilt layer is byte-identical: the same block diff against its base" \
    thinmgr diff "$dst" base v2
step "A container on the imported volume sees the change" \
    thinmgr run --rm "$dst/v2" -- sh -c 'cat /srv/origin; wc -l </srv/numbers'
