#!/usr/bin/env bash
# A snapshot of a volume that is mounted and being written to. `thinmgr snapshot` freezes
# the filesystem (FIFREEZE: dirty data flushed, new writes held), suspends the device,
# takes the O(1) snapshot, then always resumes and thaws -- the writer only pauses. The
# snapshot is a clean filesystem: e2fsck finds nothing to fix.
#
#   sudo bash examples/live-snapshot.sh [HOME]   (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE, mount)" >&2; exit 77; }
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
pool="live$$"
mnt="$home/mnt"
writer=""
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    [ -n "$writer" ] && kill "$writer" 2>/dev/null && wait "$writer" 2>/dev/null
    mountpoint -q "$mnt" && umount "$mnt"
    for v in app app-snap; do thinmgr volume deactivate "$pool" "$v" >/dev/null 2>&1; done
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT

thinmgr pool create "$pool" --size 512M
thinmgr volume create "$pool" app --size 256M
dev=$(thinmgr volume activate "$pool" app)
mkfs.ext4 -q "$dev"
mkdir -p "$mnt" && mount "$dev" "$mnt"

# The "application": appends a numbered line and rewrites a 1 MiB file, without pause.
(
    i=0
    while :; do
        i=$((i + 1))
        echo "record $i" >> "$mnt/journal.log"
        dd if=/dev/urandom of="$mnt/state.bin" bs=64K count=16 status=none
    done
) &
writer=$!
sleep 1

step "Snapshot while the writer runs (frozen, suspended, snapshotted, resumed, thawed)" \
    thinmgr snapshot "$pool" app app-snap
sleep 1
kill "$writer"; wait "$writer" 2>/dev/null || true; writer=""
echo "the writer kept going: $(wc -l < "$mnt/journal.log") records in the live volume"

snap=$(thinmgr volume activate "$pool" app-snap)
step "Check the snapshot's filesystem (read-only check, forced): it is clean" \
    e2fsck -fn "$snap"
echo "the snapshot holds $(debugfs -R 'cat /journal.log' "$snap" 2>/dev/null | wc -l) records: the moment of the freeze"
thinmgr volume deactivate "$pool" app-snap
umount "$mnt"
thinmgr volume deactivate "$pool" app
step "Both volumes; the snapshot shares every block the writer has not rewritten since" \
    thinmgr volume list "$pool"
