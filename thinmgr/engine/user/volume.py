"""A thin volume's data path: dm-thin's ``thin`` target rules in Python (format section 5.3).

``ThinVolume`` is a ``BlockBackend``. A request is cut at data-block boundaries and each
piece is handled whole (no per-4 KiB work); pieces that land on consecutive data blocks are
merged into one ``preadv``/``pwritev``:

* read: unmapped reads zeros; mapped reads the data device at
  ``data_block * block_bytes + offset_in_block``;
* write: an unmapped block is provisioned (a partial write zero-fills the rest of the new
  block in the same ``pwritev``); a *shared* block (``snapshotted_time > mapping time``) is
  copied to a new block first (no copy when the write covers it) and remapped, which drops
  the old block's reference; otherwise the block is written in place;
* discard: whole blocks are unmapped; the covered part of a partially covered mapped block
  is overwritten with zeros (through the write rules, so a shared block is not changed
  under a snapshot);
* flush: the pool's commit (data device flushed, then the metadata).

Everything runs under the pool's lock: provisioning decisions and the I/O they order are
atomic with respect to other requests, discards and commits (a block freed by a discard
can be handed out again after a commit; nobody may still be reading it then).
"""

from __future__ import annotations

import os

from thinmgr.engine.user.backend import BytesLike
from thinmgr.engine.user.pool import UserPool
from thinmgr.errors import IOFailure, PermissionDenied, UsageError

_ZERO_CHUNK = 1 << 20  # zero-fill comes from one shared 1 MiB buffer
_ZEROS = memoryview(bytes(_ZERO_CHUNK))
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def zeros(length: int) -> list[memoryview]:
    """``length`` zero bytes as views of the shared zero buffer (no allocation)."""
    full, rest = divmod(length, _ZERO_CHUNK)
    parts = [_ZEROS] * full
    if rest:
        parts.append(_ZEROS[:rest])
    return parts


def pwrite_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write the buffers back to back at ``offset``, resuming after short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_MAX]
        done = os.pwritev(fd, batch, offset)
        if done <= 0:
            raise OSError(0, "pwritev wrote nothing")
        offset += done
        while done:
            head = pending[0]
            if done >= len(head):
                done -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[done:]
                done = 0


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the device stay as they are
    (zero in the caller's fresh buffer)."""
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done <= 0:
            return
        view, offset = view[done:], offset + done


class ThinVolume:
    """Thin device ``dev`` of ``pool`` as a ``BlockBackend`` of ``size`` bytes."""

    def __init__(self, pool: UserPool, dev: int, size: int, *, read_only: bool = False) -> None:
        self._pool = pool
        self.dev = dev
        self._size = size
        self.read_only = read_only
        self._bb = pool.block_bytes
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.volume_closed(self.dev)

    def __enter__(self) -> ThinVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks --------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise UsageError(f"volume of thin device {self.dev} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(
                f"request [{offset}, {offset + length}) is outside the volume's {self._size} bytes"
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionDenied(
                f"volume of thin device {self.dev} is read-only (EROFS)",
                hint="Activate the volume read-write to change it.",
            )

    # -- read ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        bb = self._bb
        pool = self._pool
        with pool.lock:
            mappings = pool.cache(self.dev).mappings
            fd = pool.data_fd
            # Pieces (request offset, data offset, length), merged when both run on.
            pieces: list[list[int]] = []
            pos, end = offset, offset + length
            while pos < end:
                vblock, in_block = divmod(pos, bb)
                n = min(bb - in_block, end - pos)
                packed = mappings.get(vblock)
                if packed is not None:
                    data_at = (packed >> 24) * bb + in_block
                    last = pieces[-1] if pieces else None
                    if last and last[0] + last[2] == pos - offset and last[1] + last[2] == data_at:
                        last[2] += n
                    else:
                        pieces.append([pos - offset, data_at, n])
                pos += n
            if not pieces:
                return bytes(length)
            try:
                if len(pieces) == 1 and pieces[0][2] == length:
                    data = os.pread(fd, length, pieces[0][1])
                    return data if len(data) == length else data + bytes(length - len(data))
                out = bytearray(length)
                view = memoryview(out)
                for at, data_at, n in pieces:
                    pread_into(fd, view[at : at + n], data_at)
            except OSError as exc:
                raise IOFailure(f"reading data device {pool.data_path}: {exc}") from exc
        return bytes(out)

    # -- write ---------------------------------------------------------------------------

    def write(self, offset: int, data: BytesLike) -> None:
        src = memoryview(data).cast("B")
        self._check_range(offset, len(src))
        self._check_writable()
        with self._pool.lock:
            self._pool.check_writable()
            try:
                self._write_locked(offset, src)
            except OSError as exc:
                raise IOFailure(f"writing data device {self._pool.data_path}: {exc}") from exc

    def _write_locked(self, offset: int, src: memoryview) -> None:
        bb = self._bb
        pool = self._pool
        fd = pool.data_fd
        cache = pool.cache(self.dev)
        mappings = cache.mappings
        # A run of in-place or whole-block writes to consecutive data blocks, written at
        # once: [data offset, start in src, length].
        run: list[int] | None = None
        pos, end = offset, offset + len(src)
        try:
            while pos < end:
                vblock, in_block = divmod(pos, bb)
                n = min(bb - in_block, end - pos)
                at = pos - offset
                packed = mappings.get(vblock)
                shared = packed is not None and cache.snapshotted_time > (packed & 0xFFFFFF)
                if packed is not None and not shared:
                    data_at: int | None = (packed >> 24) * bb + in_block
                else:
                    new_block = pool.alloc_data_block()  # OutOfDataSpaceError: nothing mapped
                    block_at = new_block * bb
                    if n == bb:
                        data_at = block_at  # covers the block: no zeroing, no copy
                    else:
                        if run is not None:
                            pwrite_all(fd, [src[run[1] : run[1] + run[2]]], run[0])
                            run = None
                        piece = src[at : at + n]
                        if packed is None:  # new block: the rest reads as zeros
                            head = zeros(in_block)
                            tail = zeros(bb - in_block - n)
                        else:  # break sharing: the rest comes from the old block
                            old_at = (packed >> 24) * bb
                            head = [memoryview(os.pread(fd, in_block, old_at))]
                            tail_len = bb - in_block - n
                            tail = [memoryview(os.pread(fd, tail_len, old_at + in_block + n))]
                        pwrite_all(fd, [*head, piece, *tail], block_at)
                        data_at = None
                    pool.map_block(self.dev, vblock, new_block)
                if data_at is not None:
                    if run is not None and run[0] + run[2] == data_at and run[1] + run[2] == at:
                        run[2] += n
                    else:
                        if run is not None:
                            pwrite_all(fd, [src[run[1] : run[1] + run[2]]], run[0])
                        run = [data_at, at, n]
                pos += n
        finally:
            # Blocks mapped before a failure (e.g. out of space) get their data.
            if run is not None:
                pwrite_all(fd, [src[run[1] : run[1] + run[2]]], run[0])

    # -- flush, discard ------------------------------------------------------------------

    def flush(self) -> None:
        """dm-thin commits on REQ_PREFLUSH: data device flushed, then the metadata."""
        if self._closed:
            raise UsageError(f"volume of thin device {self.dev} is closed")
        self._pool.commit()

    def discard(self, offset: int, length: int) -> None:
        """Unmap the blocks the range covers whole; zero the covered part of a mapped block
        it covers in part (dm-thin passes partial discards down; zeros keep the contract
        that discarded bytes read back as zeros). Freed blocks are reusable after a commit.
        """
        self._check_range(offset, length)
        self._check_writable()
        bb = self._bb
        pool = self._pool
        end = offset + length
        with pool.lock:
            pool.check_writable()
            mappings = pool.cache(self.dev).mappings
            first_whole = -(-offset // bb)
            end_whole = end // bb
            if first_whole >= end_whole:  # inside one block
                self._zero_mapped(offset, length)
                return
            self._zero_mapped(offset, first_whole * bb - offset)
            self._zero_mapped(end_whole * bb, end - end_whole * bb)
            if end_whole - first_whole > len(mappings):
                doomed = sorted(v for v in mappings if first_whole <= v < end_whole)
            else:
                doomed = [v for v in range(first_whole, end_whole) if v in mappings]
            for vblock in doomed:
                pool.unmap_block(self.dev, vblock)

    def _zero_mapped(self, offset: int, length: int) -> None:
        """Zero ``length`` bytes at ``offset`` (inside one block) if that block is mapped."""
        if length <= 0:
            return
        if offset // self._bb in self._pool.cache(self.dev).mappings:
            try:
                self._write_locked(offset, memoryview(bytes(length)))
            except OSError as exc:
                raise IOFailure(f"writing data device {self._pool.data_path}: {exc}") from exc
