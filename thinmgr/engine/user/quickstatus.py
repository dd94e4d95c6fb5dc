"""``pool status`` of a user-engine pool without opening the pool (for the listing commands).

``UserEngine.pool_status`` on an idle pool opens a ``UserPool``: that imports numpy and the
transactional metadata code and decodes every space-map bitmap (about 250 ms of a 300 ms
budget). The status needs none of it: the committed superblock holds the transaction id, the
held metadata root, the flags and both space-map roots, whose ``nr_blocks``/``nr_allocated``
are exactly what the kernel reports in its thin-pool status line (``dm_sm_get_nr_free`` reads
``ll_disk.nr_allocated``; dm-thin-format.md section 6.1), and what this engine writes from its
recounted bitmaps at every commit.

``quick_pool_status(spec)`` answers only the ordinary cases and returns None for anything
else, so that the caller asks the engine proper (which gives the full error or warning):
NEEDS_CHECK or read-only compat flags, a superblock that does not verify, a data device
smaller than its space map, a metadata space map larger than the device.

No lock is taken: a server (if one runs) is asked over its socket, otherwise the superblock
is read as last committed, which a writer replaces in one 4 KiB write. A read torn by that
write fails the checksum and is retried.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from thinmgr.engine.base import PoolMode, PoolSpec, PoolStatus
from thinmgr.engine.user import client, protocol
from thinmgr.errors import ThinmgrError
from thinmgr.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG, SECTOR_SIZE
from thinmgr.format.superblock import Superblock, parse_superblock

SUPERBLOCK_READ_TRIES = 3


def quick_pool_status(spec: PoolSpec) -> PoolStatus | None:
    """The pool's status as ``UserEngine.pool_status`` gives it, or None: ask the engine."""
    try:
        with client.Connection(client.socket_path(spec.run_dir)) as conn:
            return protocol.pool_status_from_dict(conn.request("status"))
    except client.ServerGone:
        pass
    except ThinmgrError:
        return None
    return idle_pool_status(spec.metadata, spec.data)


def idle_pool_status(metadata: Path, data: Path) -> PoolStatus | None:
    """The committed status of a pool no server holds, from its superblock alone."""
    try:
        meta_size = _size(metadata)
        data_size = _size(data)
        sb = _read_superblock(metadata)
    except (OSError, ThinmgrError):
        return None
    if sb is None or sb.flags & NEEDS_CHECK_FLAG or sb.compat_ro_flags:
        return None  # UserPool.open refuses these; let the engine say why
    if sb.metadata_sm.nr_blocks > meta_size // BLOCK_SIZE:
        return None
    if data_size < sb.data_sm.nr_blocks * sb.data_block_size * SECTOR_SIZE:
        return None
    return PoolStatus(
        transaction_id=sb.trans_id,
        data_block_sectors=sb.data_block_size,
        used_data_blocks=sb.data_sm.nr_allocated,
        total_data_blocks=sb.data_sm.nr_blocks,
        used_metadata_blocks=sb.metadata_sm.nr_allocated,
        total_metadata_blocks=sb.metadata_sm.nr_blocks,
        held_metadata_root=sb.held_root or None,
        mode=PoolMode.READ_WRITE,
        needs_check=False,
        active=False,
    )


def _size(path: Path) -> int:
    """Bytes in a regular file or a block device (as ``store.device_size``)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fstat(fd).st_size
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END)
        raise OSError(f"{path} is not a regular file or a block device")
    finally:
        os.close(fd)


def _read_superblock(metadata: Path) -> Superblock | None:
    fd = os.open(metadata, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(SUPERBLOCK_READ_TRIES):
            block = os.pread(fd, BLOCK_SIZE, 0)
            try:
                return parse_superblock(block, 0)
            except ThinmgrError:
                continue  # torn by a concurrent commit, or corrupt: read again
        return None
    finally:
        os.close(fd)
