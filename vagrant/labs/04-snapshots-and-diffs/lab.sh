#!/usr/bin/env bash
# Lab 4: live snapshots and block diffs.
#
#   sudo bash lab.sh          (in the lab VM; any engine: the kernel's dm-thin where it exists)
#
# A volume with ext4 is mounted and written to by a background loop; `thinmgr snapshot`
# takes a consistent snapshot of it without stopping the writer (freeze, suspend, snapshot,
# resume, thaw) and e2fsck finds the snapshot clean. `thinmgr diff` then shows which blocks
# the writer changed since, read from the pool metadata alone; `thinmgr layer export` writes
# exactly those blocks to a file and `thinmgr layer import` rebuilds the volume from the
# snapshot plus the file: the copy's sha256 equals the original's.
# Runs unattended (the qemu lab tier runs it); cleans up everything it made, even on failure.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 77; }
work="$(mktemp -d "${TMPDIR:-/var/tmp}/lab4.XXXXXX")"
export THINMGR_HOME="$work/home"
pool="lab4-$$"
mnt="$work/mnt"
writer=""
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    set +e
    [ -n "$writer" ] && kill "$writer" 2>/dev/null && wait "$writer" 2>/dev/null
    mountpoint -q "$mnt" && umount "$mnt"
    for v in app app-snap app-copy; do thinmgr volume deactivate "$pool" "$v" >/dev/null 2>&1; done
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

step "A pool and a 64 MiB volume with ext4, mounted"
run thinmgr pool create "$pool" --size 128M
run thinmgr volume create "$pool" app --size 64M
dev=$(thinmgr volume activate "$pool" app)
run mkfs.ext4 -q "$dev"
mkdir -p "$mnt" && run mount "$dev" "$mnt"

step "A writer that never stops: a growing log and a file rewritten in place"
(
    i=0
    while :; do
        i=$((i + 1))
        echo "record $i" >> "$mnt/log"
        dd if=/dev/urandom of="$mnt/state" bs=64K count=4 conv=notrunc status=none
    done
) &
writer=$!
sleep 1

step "Snapshot it live: the writer is held for the freeze, then carries on"
run thinmgr snapshot "$pool" app app-snap
sleep 1
kill "$writer"; wait "$writer" 2>/dev/null || true; writer=""
umount "$mnt"
snap=$(thinmgr volume activate "$pool" app-snap)
run e2fsck -fn "$snap"              # a consistent filesystem: nothing to fix

step "Which blocks changed since the snapshot, from the metadata (no data is read)"
run thinmgr diff "$pool" app-snap app

step "Export those changes as a layer-diff file, rebuild the volume from snapshot + file"
run thinmgr layer export "$pool" app --parent app-snap -o "$work/app.thindiff"
ls -l "$work/app.thindiff"
run thinmgr layer import "$pool" "$work/app.thindiff" app-copy --parent app-snap
copy=$(thinmgr volume activate "$pool" app-copy)
a=$(sha256sum < "$dev" | cut -d' ' -f1)
b=$(sha256sum < "$copy" | cut -d' ' -f1)
echo "sha256 app:      $a"
echo "sha256 app-copy: $b"
[ "$a" = "$b" ] || { echo "the copy differs from the original" >&2; exit 1; }
echo "identical: the file carried exactly the blocks that changed"
echo "lab 4 done (the cleanup deactivates the volumes and destroys the pool)"
