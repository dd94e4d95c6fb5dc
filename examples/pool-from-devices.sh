#!/usr/bin/env bash
# A thin pool on two block devices: one for the metadata, one for the data. Loop devices
# over sparse files stand in for real disks here; with real ones, pass /dev/sdX instead.
#
#   sudo bash examples/pool-from-devices.sh
#
# thinmgr refuses a device that is mounted, held by another device, or that carries a
# signature (a filesystem, LVM, LUKS, swap, dm-thin metadata) unless --force: this shows the
# refusal and the override. Leaves nothing behind: no loop devices, no pool.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices)" >&2; exit 77; }
work="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"
export THINMGR_HOME="$work/home"
pool="devs$$"
meta_dev="" data_dev=""
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    thinmgr volume deactivate "$pool" v1 >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1   # leaves the devices themselves alone
    [ -n "$meta_dev" ] && losetup -d "$meta_dev"
    [ -n "$data_dev" ] && losetup -d "$data_dev"
    rm -rf "$work"
}
trap cleanup EXIT

# The stand-in disks: 8 MiB of metadata, 256 MiB of data.
truncate -s 8M "$work/disk-meta"
truncate -s 256M "$work/disk-data"
meta_dev=$(losetup -f --show "$work/disk-meta")
data_dev=$(losetup -f --show "$work/disk-data")
echo "metadata device: $meta_dev   data device: $data_dev"

# Put an ext4 filesystem on the data disk, as if it had been used before.
mkfs.ext4 -q -F "$data_dev"
printf '\n\033[1m== A device with a filesystem signature is refused (exit 4)\033[0m\n'
set +e
thinmgr pool create "$pool" --data "$data_dev" --metadata "$meta_dev"
echo "exit code: $?"
set -e

step "--force: you know the device is yours to overwrite" \
    thinmgr pool create "$pool" --data "$data_dev" --metadata "$meta_dev" --force
step "A volume on the device pool" thinmgr volume create "$pool" v1 --size 64M
thinmgr volume activate "$pool" v1
dd if=/dev/zero of="/dev/thinmgr/$pool/v1" bs=1M count=8 oflag=direct status=none
thinmgr volume deactivate "$pool" v1
step "Status: the data size is the device's" thinmgr pool status "$pool"
step "Destroy: the pool leaves the catalog; the devices are not removed" \
    thinmgr pool destroy "$pool" --force
