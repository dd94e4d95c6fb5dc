"""Run a piece of a test in a forked child that first joins a container's cgroups."""

from __future__ import annotations

import os
from collections.abc import Callable

from thinmgr.runtime.cgroups import ContainerCgroups


def in_child(
    cgroups: ContainerCgroups, body: Callable[[], bytes], *, devices: bool = False
) -> tuple[int, bytes]:
    """Fork; the child joins the cgroups, runs ``body`` and sends its result back.
    Returns the child's wait status and what it sent (``error: ...`` when it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            cgroups.join(0)
            if devices:
                cgroups.join_devices(0)
            os.write(w, body())
        except BaseException as exc:
            os.write(w, f"error: {exc!r}".encode())
            code = 1
        os._exit(code)
    os.close(w)
    # Wait for the child, not for EOF: processes it forked may hold the pipe open.
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    try:
        return status, os.read(r, 1 << 16)
    except BlockingIOError:
        return status, b""
    finally:
        os.close(r)
