"""Where the prepared lab kernel lives: never in the repository.

Layout of the cache directory (``$THINMGR_LAB_CACHE``, default /var/cache/thinmgr-lab)::

    current                     name of the prepared kernel release, e.g. 6.1.0-56-amd64
    <release>/vmlinux           uncompressed kernel, booted through its PVH entry
    <release>/modules/<m>.ko    the modules the lab may load, by canonical name
    <release>/package           the .deb it came from (name_version)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from thinmgr.lab.errors import KernelNotFetchedError

DEFAULT_CACHE = Path("/var/cache/thinmgr-lab")


def cache_dir() -> Path:
    return Path(os.environ.get("THINMGR_LAB_CACHE") or DEFAULT_CACHE)


@dataclass(frozen=True)
class PreparedKernel:
    release: str
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    @property
    def package(self) -> str:
        path = self.root / "package"
        return path.read_text().strip() if path.exists() else "?"


def find_kernel(cache: Path | None = None) -> PreparedKernel | None:
    """The prepared kernel named by ``current``, if it is complete."""
    base = cache or cache_dir()
    try:
        release = (base / "current").read_text().strip()
    except OSError:
        return None
    kernel = PreparedKernel(release, base / release)
    if not kernel.vmlinux.is_file() or not kernel.modules_dir.is_dir():
        return None
    return kernel


def require_kernel(cache: Path | None = None) -> PreparedKernel:
    kernel = find_kernel(cache)
    if kernel is None:
        raise KernelNotFetchedError(f"no lab kernel prepared in {cache or cache_dir()}")
    return kernel
