"""The caller's side of a container's pty: raw mode and the copy loop.

The pty itself is made inside the container (see ``process._attach_tty``); the launcher gets its
master over a socket and copies stdin to it and its output to stdout until the container's
side is closed and the process that owns it has exited.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import termios
import tty
from collections.abc import Iterator

_CHUNK = 65536


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode for the duration (restored however we leave);
    nothing happens when ``fd`` is not a terminal."""
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield
        return
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


def relay(master: int, *, stdin: int | None, stdout: int, done_fd: int) -> None:
    """Copies ``stdin`` -> ``master`` and ``master`` -> ``stdout``.

    Returns when the pty's slave side is gone (EIO on the master) or when ``done_fd`` (a pidfd
    of the process that owns the container's side) becomes readable, after draining what is
    left. Input that the container does not read yet is buffered, so a container that writes
    much without reading never deadlocks against us.
    """
    os.set_blocking(master, False)
    pending = b""
    reading_stdin = stdin is not None
    finished = False
    while not finished:
        readers = [master, done_fd] + ([stdin] if reading_stdin and stdin is not None else [])
        writers = [master] if pending else []
        ready, writable, _ = select.select(readers, writers, [])
        if master in writable and pending:
            try:
                pending = pending[os.write(master, pending) :]
            except BlockingIOError:
                pass
            except OSError:
                pending = b""
        if stdin is not None and stdin in ready:
            data = os.read(stdin, _CHUNK)
            if data:
                pending += data
            else:
                reading_stdin = False
        if master in ready and _copy_output(master, stdout) is _CLOSED:
            return
        if done_fd in ready:
            finished = True
    while _copy_output(master, stdout) is _COPIED:  # what was written before the end
        pass


_COPIED, _AGAIN, _CLOSED = "copied", "again", "closed"


def _copy_output(master: int, stdout: int) -> str:
    """One read from the master: _COPIED, _AGAIN (nothing yet) or _CLOSED (nothing will come)."""
    try:
        data = os.read(master, _CHUNK)
    except BlockingIOError:
        return _AGAIN
    except OSError as exc:
        if exc.errno == errno.EIO:  # every slave descriptor is closed
            return _CLOSED
        raise
    if not data:
        return _CLOSED
    _write_all(stdout, data)
    return _COPIED
