"""What the client side of the user engine shares with the pool server: run-directory names,
the pool lock and the late import of the pool code.

Kept apart from ``server`` so that a command talking to a running server (``thinmgr run``
on every container start) does not import the server's FUSE, block-device and loop code.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from thinmgr.errors import BusyError

if TYPE_CHECKING:
    from thinmgr.engine.user.pool import UserPool

LOCK_NAME = "pool.lock"
PID_NAME = "server.pid"
LOG_NAME = "server.log"
VOLUME_DIR = "vol"
# Seconds an idle server lingers after its last volume went (server.py, linger_from_env).
LINGER_ENV = "THINMGR_SERVER_LINGER"


def user_pool_class() -> type[UserPool]:
    """Imported late: `thinmgr --help` and the client side never pay for the pool code."""
    from thinmgr.engine.user.pool import UserPool

    return UserPool


class PoolLock:
    """The exclusive flock on ``RUN_DIR/pool.lock``: whoever holds it owns the pool."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd = -1

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise BusyError(
                    f"the pool's lock {self.path} is held by another thinmgr process",
                    hint="Another command or the pool server is using the pool; try again.",
                )
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


@contextlib.contextmanager
def pool_lock(run_dir: Path, timeout: float) -> Iterator[PoolLock]:
    lock = PoolLock(run_dir)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()
