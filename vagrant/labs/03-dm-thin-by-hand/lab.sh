#!/usr/bin/env bash
# Lab 3: device-mapper thin provisioning by hand, then the same with thinmgr.
#
#   sudo bash lab.sh          (in the lab VM, or anywhere the kernel has dm-thin)
#
# Part 1 builds a thin pool from two loop devices with dmsetup alone: a thin volume
# (`create_thin`), data written to it, a snapshot (`create_snap`), and `thin_dump` of the
# metadata the kernel wrote. Part 2 does the same with `thinmgr --engine kernel`.
# Runs unattended (the qemu lab tier runs it); cleans up everything it made, even on failure.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 77; }
work="$(mktemp -d "${TMPDIR:-/var/tmp}/lab3.XXXXXX")"
export THINMGR_HOME="$work/home"
tag="lab3-$$"                      # dm names are global: keep ours unique
meta_loop="" data_loop=""
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    set +e
    for dev in "$tag-snap" "$tag-thin"; do dmsetup remove "$dev" 2>/dev/null; done
    dmsetup remove "$tag-pool" 2>/dev/null
    [ -n "$meta_loop" ] && losetup -d "$meta_loop"
    [ -n "$data_loop" ] && losetup -d "$data_loop"
    thinmgr volume deactivate "$tag" snap >/dev/null 2>&1
    thinmgr volume deactivate "$tag" vol >/dev/null 2>&1
    thinmgr pool destroy "$tag" --force >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
# major:minor of a block device. Tables name devices this way: it needs no /dev node and no
# udev (the lab guest has none).
devnum() { printf '%d:%d' "0x$(stat -L -c %t "$1")" "0x$(stat -L -c %T "$1")"; }

step "Part 1: two sparse files on loop devices: 4 MiB of metadata, 64 MiB of data"
truncate -s 4M "$work/meta"
truncate -s 64M "$work/data"
meta_loop=$(losetup -f --show "$work/meta")
data_loop=$(losetup -f --show "$work/data")
# A new pool needs zeroed metadata: the kernel formats it when the superblock is all zeros.
dd if=/dev/zero of="$meta_loop" bs=4096 count=1 status=none
echo "metadata $meta_loop ($(devnum "$meta_loop")), data $data_loop ($(devnum "$data_loop"))"

step "The thin-pool target: 0 LENGTH thin-pool META DATA BLOCK_SECTORS LOW_WATER_MARK"
# 64 MiB = 131072 sectors; 128 sectors = 64 KiB data blocks; low water mark 0.
run dmsetup create "$tag-pool" --table "0 131072 thin-pool $(devnum "$meta_loop") $(devnum "$data_loop") 128 0"
pool="$(dmsetup info -c --noheadings -o major,minor "$tag-pool" | tr -d ' ')"
run dmsetup status "$tag-pool"     # transaction id, used/total metadata and data blocks

step "A thin volume: create_thin allocates device id 0 in the metadata, a thin target maps it"
run dmsetup message "$tag-pool" 0 "create_thin 0"
run dmsetup create "$tag-thin" --table "0 65536 thin $pool 0"     # 32 MiB
thin_node="/dev/mapper/$tag-thin"
[ -b "$thin_node" ] || dmsetup mknodes "$tag-thin"
run dd if=/dev/urandom of="$thin_node" bs=64K count=32 oflag=direct status=none  # 2 MiB
run dmsetup status "$tag-thin"     # mapped sectors, highest mapped sector

step "A snapshot: suspend the origin (flushes it), create_snap 1 0, resume"
run dmsetup suspend "$tag-thin"
run dmsetup message "$tag-pool" 0 "create_snap 1 0"
run dmsetup resume "$tag-thin"
run dmsetup create "$tag-snap" --table "0 65536 thin $pool 1"
[ -b "/dev/mapper/$tag-snap" ] || dmsetup mknodes "$tag-snap"
dd if="$thin_node" of="$work/origin.img" bs=64K count=32 iflag=direct status=none
dd if="/dev/mapper/$tag-snap" of="$work/snap.img" bs=64K count=32 iflag=direct status=none
cmp "$work/origin.img" "$work/snap.img"
echo "the snapshot reads the same data, from the same blocks (nothing was copied)"
run dmsetup message "$tag-pool" 0 "set_transaction_id 0 1"   # how managers track changes

step "thin_dump of the live pool: reserve a metadata snapshot, dump it, release it"
run dmsetup message "$tag-pool" 0 reserve_metadata_snap
run thin_dump -m "$meta_loop"      # both devices map the same data blocks
run dmsetup message "$tag-pool" 0 release_metadata_snap

step "Tear down: thin devices first, then the pool, then the loop devices"
run dmsetup remove "$tag-snap"
run dmsetup remove "$tag-thin"
run dmsetup remove "$tag-pool"
run losetup -d "$meta_loop"; meta_loop=""
run losetup -d "$data_loop"; data_loop=""

step "Part 2: the same with thinmgr (kernel engine: the same dm targets, through DM ioctls)"
run thinmgr pool create "$tag" --engine kernel --size 64M
run thinmgr volume create "$tag" vol --size 32M
dev=$(thinmgr volume activate "$tag" vol)
run dd if=/dev/urandom of="$dev" bs=64K count=32 oflag=direct status=none
run thinmgr snapshot "$tag" vol snap
run thinmgr pool dump "$tag"       # thin_dump XML of the committed metadata: as in part 1
run thinmgr volume deactivate "$tag" vol
run thinmgr pool destroy "$tag" --force
echo "lab 3 done"
