#!/usr/bin/env bash
# Images and containers: a root file system tarball imported as an image (a thin volume with
# ext4, the layer applied in a chrooted child), then containers on writable thin snapshots of
# it: a one-off command whose exit status is thinmgr's, limits (memory, processes), and a
# detached container with ps, exec, logs, stop and rm.
#
#   sudo bash examples/image-run.sh [HOME]   (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE, mount, namespaces)" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
pool="img$$"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
# status CMD...: run CMD, print and return its exit status without ending the script.
status() { local s=0; printf '$ %s\n' "$*"; "$@" || s=$?; echo "exit status: $s"; return "$s"; }

cleanup() {
    set +e
    thinmgr rm --force web >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT

thinmgr pool create "$pool" --size 1G
bash "$here/lib/busybox-rootfs.sh" "$home/busybox.tar.gz"
step "Import the tarball as image busybox:latest" \
    thinmgr image import "$pool" busybox "$home/busybox.tar.gz"
step "What the catalog knows: images, and the layers of one" thinmgr image list
thinmgr image show busybox

printf '\n\033[1m== A one-off container (--rm): the command'"'"'s exit status is thinmgr'"'"'s\033[0m\n'
status thinmgr run --rm busybox -- sh -c 'echo "in $(hostname) as $(id -un), PID $$"; exit 3' || [ $? = 3 ]
printf '\n\033[1m== 32 MiB of memory: a 100 MiB buffer is OOM-killed (128 + SIGKILL = 137)\033[0m\n'
status thinmgr run --rm --memory 32M busybox -- dd if=/dev/zero of=/dev/null bs=100M count=1 || [ $? = 137 ]
printf '\n\033[1m== At most 8 processes: the ninth fork is refused\033[0m\n'
forks='for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1 & done; wait'
printf '$ %s\n' "thinmgr run --rm --pids-limit 8 busybox -- sh -c '$forks'"
out=$(thinmgr run --rm --pids-limit 8 busybox -- sh -c "$forks" 2>&1 || true)
grep -m1 "can't fork" <<<"$out"

step "A detached container (prints its name)" \
    thinmgr run --detach --name web --hostname web busybox -- \
    sh -c 'i=0; while :; do i=$((i + 1)); echo "tick $i"; sleep 0.2; done'
sleep 1
step "Running containers" thinmgr ps
step "exec joins its namespaces and cgroups: the same hostname, its processes only" \
    thinmgr exec web -- sh -c 'hostname; ps'
step "Its output so far" thinmgr logs web
step "stop: SIGTERM, then SIGKILL after --time seconds" thinmgr stop web --time 2
step "Stopped containers stay listed (-a) until rm, which removes the snapshot" thinmgr ps -a
thinmgr rm web
thinmgr volume list "$pool"
