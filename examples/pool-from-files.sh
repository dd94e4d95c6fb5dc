#!/usr/bin/env bash
# A thin pool on two sparse files: volumes that take no space until written, the pool's
# status, and growing the pool when it fills up.
#
#   sudo bash examples/pool-from-files.sh [HOME]   (default: a temporary home, removed at the end)
#
# Works on any engine (`--engine auto`: the kernel's dm-thin where it exists, else the user
# engine). Leaves nothing behind: no mounts, no active volumes, no pools.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE, mount)" >&2; exit 77; }
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
pool="files$$"      # pool names are global (/dev/thinmgr/POOL/...): keep them unique
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    # destroy --force deactivates nothing: volumes must be inactive first
    for v in web db; do thinmgr volume deactivate "$pool" "$v" >/dev/null 2>&1; done
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT

step "A 256 MiB pool: HOME/pools/$pool/{metadata,data} are sparse files" \
    thinmgr pool create "$pool" --size 256M
ls -ls "$home/pools/$pool"          # first column: blocks really used (almost none)

step "Two 1 GiB volumes in a 256 MiB pool: thin volumes may promise more than there is" \
    thinmgr volume create "$pool" web --size 1G
thinmgr volume create "$pool" db --size 1G

step "Activate one: a real block device at a stable path" thinmgr volume activate "$pool" web
dev="/dev/thinmgr/$pool/web"
# Write 64 MiB: only now are data blocks allocated (O_DIRECT: straight to the pool).
dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
step "Mapped space of the volume" thinmgr volume show "$pool" web
thinmgr volume deactivate "$pool" web

step "Pool use: data and metadata blocks, transaction id, warnings past 80 %" \
    thinmgr pool status "$pool"

step "Grow the pool's data space (the data file grows first, then the pool)" \
    thinmgr pool extend "$pool" --size 512M
step "Scripts read JSON" thinmgr --json pool status "$pool"
