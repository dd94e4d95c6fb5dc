"""The per-pool writer lock: ``flock`` on ``HOME/run/POOL/lock``.

Every command that changes a pool (or its catalog rows) holds the pool's lock exclusively for
its whole run, so the write-ahead journal sees one writer per pool at a time. Readers
(``pool list``, ``pool status``, ``volume list``) never take it: they read the catalog (SQLite
WAL: readers do not wait for writers) and the engine's status.

The wait is bounded: after ``wait`` seconds a BusyError names the holder (its pid and
command, which the holder writes into the lock file). ``flock`` locks die with their process,
so a crashed thinmgr never leaves a pool locked. The lock file is never removed: unlinking a
flock'ed file lets a second process lock a new inode while a first still holds the old one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from thinmgr.errors import BusyError, IOFailure

DEFAULT_LOCK_WAIT = 30.0
_POLL = 0.02


def lock_path(home: Path, pool: str) -> Path:
    return home / "run" / pool / "lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return "another process"
    pid, _, rest = text.partition(" ")
    since, _, command = rest.partition(" ")
    if not pid.isdigit():
        return "another process"
    try:
        held = f", for {time.time() - float(since):.1f} s"
    except ValueError:
        held = ""
    return f"pid {pid} ({command or 'thinmgr'}{held})"


@contextmanager
def pool_lock(home: Path, pool: str, *, wait: float = DEFAULT_LOCK_WAIT) -> Iterator[None]:
    """Hold the pool's writer lock; BusyError naming the holder after ``wait`` seconds."""
    path = lock_path(home, pool)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise IOFailure(f"cannot open the lock of pool {pool!r} ({path}): {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise IOFailure(f"cannot lock pool {pool!r}: {exc.strerror}") from exc
            if time.monotonic() >= deadline:
                raise BusyError(
                    f"pool {pool!r} is busy: {_holder(fd)} holds its lock; waited {wait:g} s",
                    hint="Wait for that command to finish (set THINMGR_LOCK_WAIT to wait "
                    "longer), or check that it is not hung.",
                )
            time.sleep(_POLL)
        command = " ".join(["thinmgr", *sys.argv[1:]])[:300].replace("\n", " ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.3f} {command}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
