"""The block source the format code reads from, and an in-memory one for tests and builders."""

from __future__ import annotations

from typing import Protocol

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.constants import BLOCK_SIZE


class BlockSource(Protocol):
    """Random access to 4 KiB metadata blocks."""

    @property
    def nr_blocks(self) -> int:
        """Number of whole 4 KiB blocks the source holds."""
        ...

    def read_block(self, blocknr: int) -> bytes | memoryview:
        """The 4096 bytes of block ``blocknr``; the caller has checked the range."""
        ...


class MemoryBlocks:
    """A block source over a bytes-like object (a whole metadata image)."""

    def __init__(self, image: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(image)
        self._nr = len(self._view) // BLOCK_SIZE

    @property
    def nr_blocks(self) -> int:
        return self._nr

    def read_block(self, blocknr: int) -> memoryview:
        start = blocknr * BLOCK_SIZE
        return self._view[start : start + BLOCK_SIZE]


def read_checked(source: BlockSource, blocknr: int, structure: str) -> bytes | memoryview:
    """Read a block after checking that its number lies on the device.

    A pointer past the end is the commonest form of corrupted metadata; it must be reported
    as such, naming what pointed there, rather than as a short read.
    """
    if not 0 <= blocknr < source.nr_blocks:
        raise CorruptMetadataError(
            f"block number {blocknr} is outside the metadata device ({source.nr_blocks} blocks)",
            block=blocknr,
            structure=structure,
        )
    return source.read_block(blocknr)
