#!/usr/bin/env bash
# What happens when the user engine's pool server dies (OOM killer, SIGKILL, a crash) while
# a volume is active, and how `thinmgr doctor` puts the catalog and the pool back in step.
# The pool's metadata is safe: the server commits every second and on every flush, and the
# on-disk format is copy-on-write, so the last commit is always whole.
#
#   sudo bash examples/doctor-after-crash.sh [HOME]  (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE)" >&2; exit 77; }
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
pool="crash$$"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    thinmgr volume deactivate "$pool" v1 >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT

thinmgr pool create "$pool" --engine user --size 128M
thinmgr volume create "$pool" v1 --size 32M
dev=$(thinmgr volume activate "$pool" v1)
dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
sync "$dev"                                    # a flush: the server commits
before=$(dd if="$dev" bs=1M count=4 iflag=direct status=none | sha256sum)

pid=$(cat "$home/run/$pool/server.pid")
step "The pool's server (pid $pid) serves v1; kill it without warning" kill -KILL "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done

printf '\n\033[1m== doctor: what is out of step (exit 8 while something is)\033[0m\n$ thinmgr doctor\n'
set +e
thinmgr doctor
echo "exit code: $?"
set -e
step "doctor --fix: clean what the dead server left, bring the catalog in step" \
    thinmgr doctor --fix
step "All well now (exit 0)" thinmgr doctor

# The data written before the crash is there.
dev=$(thinmgr volume activate "$pool" v1)
after=$(dd if="$dev" bs=1M count=4 iflag=direct status=none | sha256sum)
[ "$before" = "$after" ] && echo "the 4 MiB written before the kill are intact"
thinmgr volume deactivate "$pool" v1
step "The metadata passes every check" thinmgr pool check "$pool"
