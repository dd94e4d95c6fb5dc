"""Fetch the Debian kernel package and prepare it for the lab (kernel-lab.md §3.1, §3.2).

Only the package registry is used: ``apt-get download`` of ``linux-image-amd64`` (the
metapackage), whose Depends names the current kernel image package, which is downloaded too.
From it we keep the uncompressed ``vmlinux`` and the modules under ``MODULE_DIRS``.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from thinmgr.lab import debpkg
from thinmgr.lab.cache import PreparedKernel, cache_dir
from thinmgr.lab.errors import FetchError

METAPACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"
# Module directories kept from the package (relative to lib/modules/<release>/kernel/):
# enough for the base list and for the modules tests may add later (dm-snapshot, xfs...).
MODULE_DIRS = (
    "drivers/md/",
    "drivers/block/",
    "drivers/virtio/",
    "drivers/char/hw_random/",
    "net/9p/",
    "fs/",
    "lib/",
    "crypto/",
)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage built with CONFIG_KERNEL_XZ (Debian's).

    Booting the ELF through its PVH note skips SeaBIOS, real-mode setup and the in-guest
    decompression: about 2.5 s under TCG (kernel-lab.md §3.1).
    """
    start = vmlinuz.find(XZ_MAGIC)
    while start >= 0:
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        try:
            # The payload is followed by other bytes; the decompressor keeps them aside.
            image = decompressor.decompress(vmlinuz[start:])
        except lzma.LZMAError:
            image = b""
        if image.startswith(b"\x7fELF"):
            return image
        start = vmlinuz.find(XZ_MAGIC, start + 1)
    raise FetchError("no xz-compressed ELF kernel found in vmlinuz")


def _apt_download(package: str, where: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise FetchError("apt-get not found: the lab kernel comes from a Debian package")
    proc = subprocess.run(
        ["apt-get", "download", "-q", package],
        cwd=where,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    debs = sorted(where.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"apt-get download {package} failed: {' / '.join(detail)}")
    return debs[-1]


def image_package(meta_deb: Path) -> str:
    """The kernel image package a linux-image-amd64 metapackage depends on."""
    depends = debpkg.control_fields(meta_deb).get("Depends", "")
    match = re.search(r"\b(linux-image-[0-9][^\s,(|]*)", depends)
    if not match:
        raise FetchError(f"{meta_deb.name}: no linux-image-* in Depends: {depends!r}")
    return match.group(1)


def prepare(deb: Path, cache: Path) -> PreparedKernel:
    """Unpack ``vmlinux`` and the lab's modules from a kernel image .deb into the cache."""
    fields = debpkg.control_fields(deb)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=cache))
    try:
        found: dict[str, str] = {}

        def select(name: str) -> str | None:
            parts = name.split("/")
            if name.startswith("boot/vmlinuz-"):
                found["release"] = name.removeprefix("boot/vmlinuz-")
                return str(staging / "vmlinuz")
            if len(parts) > 4 and parts[:2] == ["lib", "modules"] and name.endswith(".ko"):
                inner = "/".join(parts[4:])
                if parts[3] == "kernel" and inner.startswith(MODULE_DIRS):
                    return str(staging / "modules" / parts[-1].replace("-", "_"))
            return None

        debpkg.extract_data(deb, select)
        if "release" not in found:
            raise FetchError(f"{deb.name}: no boot/vmlinuz-* in the package")
        vmlinuz = staging / "vmlinuz"
        (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        vmlinuz.unlink()
        (staging / "package").write_text(f"{fields.get('Package')}_{fields.get('Version')}\n")
        release = found["release"]
        final = cache / release
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    current = cache / "current.tmp"
    current.write_text(release + "\n")
    current.replace(cache / "current")  # atomically: a reader sees the old or the new kernel
    return PreparedKernel(release, final)


def fetch(package: str | None = None, cache: Path | None = None) -> PreparedKernel:
    """Download the kernel package (the current one by default) and prepare it."""
    base = cache or cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(
            f"cannot create the lab cache {base}: {exc.strerror}",
            hint="Set THINMGR_LAB_CACHE to a writable directory.",
        ) from exc
    with tempfile.TemporaryDirectory(prefix=".download-", dir=base) as tmp:
        where = Path(tmp)
        if package is None:
            package = image_package(_apt_download(METAPACKAGE, where))
        return prepare(_apt_download(package, where), base)
