#!/usr/bin/env bash
# Builds a tiny root file system tarball offline from Debian's busybox-static:
#
#   bash examples/lib/busybox-rootfs.sh OUT.tar[.gz]
#
# The tree holds the static busybox with a link for each of its applets, /etc/passwd and
# /etc/group (root, nobody) and the usual empty mount points; owners are numeric 0:0, as in a
# real image layer. Nothing is downloaded (runtime-and-images.md 4.5: the Alpine minirootfs and
# Docker Hub are not reachable from the development machines, busybox-static is a package).
set -euo pipefail
out=${1:?usage: busybox-rootfs.sh OUT.tar[.gz]}
busybox=$(command -v busybox) || { echo "busybox not found: apt-get install busybox-static" >&2; exit 3; }
if ldd "$busybox" >/dev/null 2>&1; then # ldd fails on a static binary
    echo "$busybox is dynamically linked: install busybox-static" >&2
    exit 3
fi
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
chmod 755 "$tree"
mkdir -p "$tree"/{bin,sbin,etc,dev,proc,sys,tmp,root,var,run,usr/bin}
chmod 1777 "$tree/tmp"
cp "$busybox" "$tree/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$tree/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$tree/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$tree/etc/group"
echo busybox >"$tree/etc/hostname"
case "$out" in
*.gz | *.tgz) compress=--gzip ;;
*) compress= ;;
esac
tar -C "$tree" --numeric-owner --owner=0 --group=0 $compress -cf "$out" .
