"""The guest's PID 1: a busybox sh script (kernel-lab.md §3.5).

It mounts the pseudo file systems, loads the modules in ``/lib/modules/load-order``, then
either runs ``lab.script`` from the initramfs (``lab.mode=initramfs``) or, by default,
switches to the host's root shared read-only over 9p under a tmpfs overlay
(``lab.mode=hostroot``) with the results share mounted read-write at its host path. It
reports on the console with ``LAB_T <phase> <uptime>`` and ``LAB_EXIT=<rc>`` (exit 125: the
guest set-up failed before the command could run), then powers off.
"""

from __future__ import annotations

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# No udev in the guest: libdevmapper must make /dev/mapper nodes itself (pitfall 1).
export DM_DISABLE_UDEV=1 THINMGR_IN_LAB=1
mark() { read -r up _ </proc/uptime; echo "LAB_T $1 $up"; }
finish() {
    echo "LAB_EXIT=$1"
    sync
    poweroff -f
}
fail() {
    echo "lab init: $*"
    finish 125
}
mark init
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod failed"
done </lib/modules/load-order
mark modules
MODE=hostroot SCRIPT= RES=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    lab.mode=*) MODE=${arg#lab.mode=} ;;
    lab.script=*) SCRIPT=${arg#lab.script=} ;;
    lab.results=*) RES=${arg#lab.results=} ;;
    esac
done
[ -n "$SCRIPT" ] || fail "no lab.script= on the kernel command line"

if [ "$MODE" = initramfs ]; then
    mount -t tmpfs tmpfs /tmp
    mark ready
    sh "$SCRIPT" </dev/null
    finish $?
fi

opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o ro,$opts,cache=loose hostroot /host || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    fail "cannot mount the overlay"
# Cover the host's pseudo file systems that 9p would show (pitfall 5).
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
if [ -n "$RES" ]; then
    mkdir -p "/newroot$RES"
    mount -t 9p -o $opts,cache=none results "/newroot$RES" || fail "cannot mount the results share"
fi
mark ready
# A mount move, not a plain chroot: user namespaces need it (pitfall 4). PID 1 keeps the
# initramfs as its root, its current directory is the new root.
cd /newroot && mount --move . / || fail "cannot switch root"
chroot . /bin/sh "$SCRIPT" </dev/null
rc=$?
mark done
if [ -n "$RES" ]; then
    echo "$rc" >".$RES/exitcode"
    sync
    umount ".$RES"
fi
finish $rc
"""
