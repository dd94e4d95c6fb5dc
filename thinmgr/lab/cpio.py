"""A newc ("070701") cpio writer: the format the kernel unpacks as an initramfs.

Pure Python because the host has no need for the cpio tool. Format: a 110-byte ASCII header
of 13 eight-digit hex fields, the NUL-terminated name padded to 4 bytes, then the data padded
to 4 bytes; the archive ends with the entry "TRAILER!!!" (see the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Append entries to a binary stream; ``close`` writes the trailer (not the stream)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"cpio: empty or duplicate entry name {name!r}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1])
        header = MAGIC + b"".join(b"%08X" % f for f in fields) + b"%08X" % len(encoded) + b"0" * 8
        self._out.write(header + encoded + _pad(len(header) + len(encoded)))
        self._out.write(data + _pad(len(data)))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._names.discard(TRAILER)
        self._entry(TRAILER, 0)


def parse(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Read a newc archive back: (name, mode, data, (rdevmajor, rdevminor)) per entry.

    For tests and diagnostics; stops at the trailer.
    """
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        if len(header) < 110 or header[:6] != MAGIC:
            raise ValueError(f"cpio: bad header at offset {pos}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        rdev = (fields[9], fields[10])
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + len(_pad(110 + namesize))
        data = archive[data_start : data_start + size]
        pos = data_start + size + len(_pad(size))
        if name == TRAILER:
            return entries
        entries.append((name, mode, data, rdev))
