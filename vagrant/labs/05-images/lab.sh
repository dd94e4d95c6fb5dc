#!/usr/bin/env bash
# Lab 5: images as chains of thin snapshots — import, run, commit, image tree.
#
#   sudo bash lab.sh          (in the lab VM; any engine)
#
# A busybox rootfs tarball (built offline) is imported as an image: a base thin volume with
# ext4 and the layer applied. A container changes a file; `thinmgr commit` turns its snapshot
# into a new layer on top of the same base, so the two images share the base's blocks, as
# `thinmgr image tree` shows. The block diff and the file diff between the two layers come
# from the pool metadata. Runs unattended (the qemu lab tier runs it); cleans up after itself.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
work="$(mktemp -d "${TMPDIR:-/var/tmp}/lab5.XXXXXX")"
export THINMGR_HOME="$work/home"
pool="lab5-$$"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
expect() { # expect WHAT ACTUAL WANTED
    if [ "$2" != "$3" ]; then echo "unexpected $1: got '$2', wanted '$3'" >&2; exit 1; fi
    echo "ok: $1 = $2"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

cleanup() {
    set +e
    thinmgr rm --force builder >/dev/null 2>&1
    thinmgr image rm bb-hello >/dev/null 2>&1
    thinmgr image rm bb >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

step "A pool, and a busybox root file system tarball built offline"
run thinmgr pool create "$pool" --size 1G
bash "$repo/examples/lib/busybox-rootfs.sh" "$work/busybox.tar.gz"
ls -l "$work/busybox.tar.gz"

step "Import it: a base thin volume gets ext4, the layer is applied in a chrooted child"
run thinmgr image import "$pool" bb "$work/busybox.tar.gz"
run thinmgr image list
run thinmgr image show bb

step "Run a container on a writable snapshot of the image and change a file"
run thinmgr run --name builder bb -- sh -c 'echo "hello from a layer" >/etc/hello; rm /etc/hostname'
expect "the image itself is unchanged" "$(thinmgr run --rm bb -- sh -c 'cat /etc/hello 2>/dev/null || echo absent')" "absent"

step "Commit the container's snapshot as a new image: one new layer on the same base"
run thinmgr commit builder bb-hello
run thinmgr rm builder
expect "the new image sees the change" "$(thinmgr run --rm bb-hello -- cat /etc/hello)" "hello from a layer"
expect "and the deletion" "$(thinmgr run --rm bb-hello -- sh -c 'test -e /etc/hostname && echo present || echo gone')" "gone"
run thinmgr image tree "$pool"

step "What changed between the two layers, from the pool metadata"
base=$(thinmgr --json image show bb | json 'd["layers"][-1]["device"]')
top=$(thinmgr --json image show bb-hello | json 'd["layers"][-1]["device"]')
run thinmgr diff "$pool" "$base" "$top"
run thinmgr diff "$pool" "$base" "$top" --files

step "Removing the first image keeps the base layer: bb-hello still uses it"
run thinmgr image rm bb
run thinmgr image tree "$pool"
expect "bb-hello still runs" "$(thinmgr run --rm bb-hello -- cat /etc/hello)" "hello from a layer"
run thinmgr image rm bb-hello
echo done
