"""Tiny root file systems built offline from Debian's busybox-static (runtime-and-images.md 4.5).

Used wherever a test needs a real image or container root: ``populate_rootfs`` lays out a
minimal tree (busybox with an applet link for each applet, /etc/passwd and /etc/group, the
usual empty mount points), ``rootfs_tar`` packs it as a rootfs tarball with numeric owners
0:0, as a real image layer would have them.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"
DIRECTORIES = ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "root", "var", "usr/bin", "run")


@functools.cache
def applets() -> tuple[str, ...]:
    """The applets this busybox was built with (``busybox --list``)."""
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return tuple(name for name in out.stdout.split() if name and "/" not in name)


def populate_rootfs(dest: Path) -> Path:
    """Writes a busybox root file system into ``dest`` (created if missing) and returns it."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    dest.mkdir(parents=True, exist_ok=True)
    for name in DIRECTORIES:
        (dest / name).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in applets():
        if applet == "busybox":
            continue
        link = dest / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(PASSWD)
    (dest / "etc" / "group").write_text(GROUP)
    (dest / "etc" / "hostname").write_text("busybox\n")
    return dest


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def rootfs_tar(path: Path, *, compression: str = "") -> Path:
    """A busybox rootfs tarball at ``path`` (``compression``: "", "gz", "bz2" or "xz")."""
    tree = path.parent / f".{path.name}.tree"
    populate_rootfs(tree)
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for child in sorted(tree.iterdir()):
            tar.add(child, arcname=child.name, filter=_as_root)
    shutil.rmtree(tree)
    return path


def rootfs_tar_bytes() -> bytes:
    """The same tarball, uncompressed, in memory (for image builders)."""
    buffer = io.BytesIO()
    tree_parent = Path(os.environ.get("TMPDIR", "/tmp"))
    tree = tree_parent / f".busybox-tree-{os.getpid()}"
    populate_rootfs(tree)
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for child in sorted(tree.iterdir()):
                tar.add(child, arcname=child.name, filter=_as_root)
    finally:
        shutil.rmtree(tree)
    return buffer.getvalue()
