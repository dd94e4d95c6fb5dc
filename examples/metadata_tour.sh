#!/usr/bin/env bash
# A tour of thinmgr's metadata tools on a small pool: a base volume (dev 1), a snapshot of
# it that was then written to (dev 2), and a snapshot of that snapshot (dev 3).
#
#   bash examples/metadata_tour.sh [WORKDIR]
#
# Everything happens in WORKDIR (default: a fresh temporary directory, removed at the end).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ]; then work="$1"; mkdir -p "$work"; keep=1; else work="$(mktemp -d)"; keep=0; fi
cleanup() { [ "$keep" = 1 ] || rm -rf "$work"; }
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Build pool metadata from thin_dump XML (the kernel's on-disk format, version 2)" \
    thinmgr metadata restore -i "$here/data/pool.xml" -o "$work/meta.bin"
step "Check it: every checksum, btree invariant and reference count, data blocks included" \
    thinmgr metadata check "$work/meta.bin"
step "Per-device usage: mapped, exclusive and shared blocks (like thin_ls)" \
    thinmgr metadata ls "$work/meta.bin"
step "What changed between the base volume and its snapshot (like thin_delta)" \
    thinmgr metadata delta "$work/meta.bin" --snap1 1 --snap2 2
step "The snapshot of the snapshot, changes only, as JSON for scripts" \
    thinmgr metadata delta "$work/meta.bin" --snap1 2 --snap2 3 --changed-only --format json
step "Dump device 3 (thin_dump-compatible XML)" \
    thinmgr metadata dump "$work/meta.bin" --dev-id 3

printf '\n\033[1m== Corrupt one byte of a btree node and check again\033[0m\n'
python3 - "$work/meta.bin" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    sb = f.read(4096)
    root = int.from_bytes(sb[320:328], "little")  # data_mapping_root
    f.seek(root * 4096 + 100)
    byte = f.read(1)
    f.seek(root * 4096 + 100)
    f.write(bytes([byte[0] ^ 0x40]))
    print(f"flipped a bit in block {root} (the mapping tree's root)")
PY
set +e
thinmgr metadata check "$work/meta.bin"
echo "exit code: $?  (1: problems found)"
thinmgr metadata dump "$work/meta.bin" >/dev/null
echo "exit code: $?  (7: corrupt metadata, with the block and structure named)"
set -e
[ "$keep" = 1 ] && echo "files kept in $work" || echo "done; temporary files removed"
