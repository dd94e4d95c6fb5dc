#!/usr/bin/env bash
# Volumes without images: a file-backed pool, a thin volume with ext4, a live O(1) snapshot,
# and the block diff between the two read straight from the pool metadata.
#
#   sudo bash examples/volume-snapshot-diff.sh [HOME]   (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "volume-snapshot-diff: run as root (it uses loop devices, FUSE and mount)" >&2; exit 77; }
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-vsd.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
mnt="$home/mnt"
mkdir -p "$mnt"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    mountpoint -q "$mnt" && umount "$mnt"
    thinmgr pool destroy demo --force >/dev/null 2>&1
    if [ "$keep" = 0 ]; then rm -rf "$home"; echo "cleaned up (pool destroyed, $home removed)";
    else echo "pool 'demo' destroyed; catalog kept in $home"; fi
}
trap cleanup EXIT

step "Create a 2 GiB pool on sparse files (user engine: no device-mapper needed)" \
    thinmgr pool create demo --size 2G
step "Create a 1 GiB thin volume; nothing is allocated until it is written" \
    thinmgr volume create demo base --size 1G
dev=$(thinmgr volume activate demo base)
echo "block device: $dev"
step "Make a filesystem and write some files" mkfs.ext4 -q "$dev"
mount "$dev" "$mnt"
mkdir -p "$mnt/etc" && echo "hello from the base volume" > "$mnt/etc/motd"
dd if=/dev/urandom of="$mnt/blob" bs=1M count=16 status=none
sync
step "Snapshot the mounted volume: freeze, suspend, O(1) snapshot, resume, thaw" \
    thinmgr snapshot demo base snap1
echo "changed after the snapshot" > "$mnt/etc/motd"
dd if=/dev/urandom of="$mnt/blob" bs=1M count=2 seek=4 conv=notrunc status=none
sync
step "Pool and volumes" thinmgr pool status demo
step "Volumes: the snapshot shares every block it has not diverged on" thinmgr volume list demo
umount "$mnt"
thinmgr volume deactivate demo base
base_id=$(thinmgr --json volume show demo base | python3 -c 'import json,sys; print(json.load(sys.stdin)["dev_id"])')
snap_id=$(thinmgr --json volume show demo snap1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["dev_id"])')
meta="$home/pools/demo/metadata"
step "Block diff base vs snapshot, from the metadata (shared subtrees are not read)" \
    thinmgr metadata delta "$meta" --snap1 "$snap_id" --snap2 "$base_id" --changed-only
step "Exclusive and shared space per thin device (like thin_ls)" \
    thinmgr metadata ls "$meta" -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS
step "Check the pool's metadata: checksums, btrees, metadata and data reference counts" \
    thinmgr pool check demo
step "Catalog and pool agree" thinmgr doctor
