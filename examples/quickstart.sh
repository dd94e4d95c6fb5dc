#!/usr/bin/env bash
# The main job on the embedded default (user engine, SQLite catalog), as root, offline:
# a pool on sparse files, a tiny busybox image built from busybox-static, a command run in a
# thin snapshot of it, a change committed as a new layer, the image tree with shared and
# exclusive space, and the block and file diff between the two layers read from the pool.
#
#   sudo bash examples/quickstart.sh [HOME]   (default: a temporary home, removed at the end)
#
# With HOME given, the pool, images and catalog are kept there to explore afterwards
# (`THINMGR_HOME=HOME thinmgr image tree`); remove them with
# `THINMGR_HOME=HOME thinmgr pool destroy demo --force`.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (it uses loop devices, FUSE, mount and namespaces)" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-demo.XXXXXX")"; keep=0; fi
mkdir -p "$home"
export THINMGR_HOME="$home"
started=$SECONDS
n=0
step() { n=$((n + 1)); printf '\n\033[1m[%d/9 %3ds] %s\033[0m\n' "$n" $((SECONDS - started)) "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    local status=$?
    set +e
    if [ "$keep" = 0 ]; then
        thinmgr rm --force builder >/dev/null 2>&1
        thinmgr pool destroy demo --force >/dev/null 2>&1
        rm -rf "$home"
        echo "cleaned up: pool destroyed, $home removed"
    else
        echo "kept in $home: THINMGR_HOME=$home thinmgr image tree;" \
            "remove with: THINMGR_HOME=$home thinmgr pool destroy demo --force"
    fi
    [ "$status" = 0 ] || echo "quickstart failed (exit $status); see the messages above" >&2
}
trap cleanup EXIT

step "A 2 GiB thin pool on sparse files (the user engine: no device-mapper needed)"
run thinmgr pool create demo --size 2G

step "A busybox root file system, built offline from busybox-static"
bash "$here/lib/busybox-rootfs.sh" "$home/busybox.tar.gz"
ls -lh "$home/busybox.tar.gz" | awk '{print $5, $NF}'

step "Import it as an image: a thin volume with ext4, the layer applied in a chrooted child"
run thinmgr image import demo busybox "$home/busybox.tar.gz"

step "Run a command in a writable thin snapshot of the image (new namespaces and cgroups)"
run thinmgr run --rm --hostname demo busybox -- sh -c 'echo "hello from $(hostname), pid $$"; ps'

step "Change something in a container, then commit its snapshot as a new layer"
run thinmgr run --name builder busybox -- sh -c \
    'echo "built by the quickstart" >/etc/motd; mkdir -p /app; seq 1 20000 >/app/numbers'
run thinmgr commit builder busybox:v2
run thinmgr rm builder

step "The new image sees the change; the first one does not"
run thinmgr run --rm busybox:v2 -- cat /etc/motd
run thinmgr run --rm busybox -- sh -c 'test -e /etc/motd && echo "motd present" || echo "no motd in busybox:latest"'

step "The image tree: layers as snapshots, with exclusive and shared space"
run thinmgr image tree demo

layer() { # layer IMAGE: the thin volume holding the image's top layer
    thinmgr --json image show "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][-1]["device"])'
}
base=$(layer busybox)
top=$(layer busybox:v2)

step "Block diff between the two layers, read from the pool metadata (shared subtrees skipped)"
run thinmgr diff demo "$base" "$top"

step "The same diff as files, found from the changed blocks (unchanged files are never read)"
run thinmgr diff demo "$base" "$top" --files

echo
echo "quickstart finished in $((SECONDS - started)) s"
