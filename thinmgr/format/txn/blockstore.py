"""Where a metadata transaction reads and writes its 4 KiB blocks.

``BlockStore`` is what the transaction layer needs from a metadata device: random reads,
whole-block writes and a flush (the cache flush that orders a commit, format section 8).
Opening files or devices belongs to ``thinmgr/ops``; ``MemoryBlockStore`` serves tests and
any caller that wants to build an image in memory and write it out itself.
"""

from __future__ import annotations

from typing import Protocol

from thinmgr.errors import UsageError
from thinmgr.format.constants import BLOCK_SIZE


class BlockStore(Protocol):
    """Random access to the 4 KiB blocks of a metadata device, readable and writable."""

    @property
    def nr_blocks(self) -> int:
        """Number of whole 4 KiB blocks of the device."""
        ...

    def read_block(self, blocknr: int) -> bytes | memoryview:
        """The 4096 bytes of block ``blocknr`` (the caller has checked the range)."""
        ...

    def write_block(self, blocknr: int, data: bytes | bytearray) -> None:
        """Replace block ``blocknr`` with exactly 4096 bytes."""
        ...

    def flush(self) -> None:
        """Make every write so far durable before any later write (a cache flush)."""
        ...


class MemoryBlockStore:
    """A block store over a bytearray; ``flushes`` counts flush calls (tests look at it)."""

    def __init__(self, nr_blocks: int = 0, *, image: bytes | bytearray | None = None) -> None:
        if image is not None:
            if len(image) % BLOCK_SIZE:
                raise UsageError(
                    f"a metadata image of {len(image)} bytes is not a whole "
                    f"number of {BLOCK_SIZE}-byte blocks"
                )
            self._data = bytearray(image)
        else:
            self._data = bytearray(nr_blocks * BLOCK_SIZE)
        self._view = memoryview(self._data)
        self.flushes = 0

    @property
    def nr_blocks(self) -> int:
        return len(self._data) // BLOCK_SIZE

    def read_block(self, blocknr: int) -> bytes:
        start = blocknr * BLOCK_SIZE
        return bytes(self._view[start : start + BLOCK_SIZE])

    def write_block(self, blocknr: int, data: bytes | bytearray) -> None:
        if len(data) != BLOCK_SIZE or not 0 <= blocknr < self.nr_blocks:
            raise UsageError(
                f"bad block write: block {blocknr}, {len(data)} bytes "
                f"(device has {self.nr_blocks} blocks)"
            )
        start = blocknr * BLOCK_SIZE
        self._view[start : start + BLOCK_SIZE] = data

    def flush(self) -> None:
        self.flushes += 1

    def image(self) -> bytes:
        """A copy of the whole device, e.g. to keep the state at a commit point."""
        return bytes(self._data)
