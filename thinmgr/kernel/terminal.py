"""Terminal window size ioctls (TIOCGWINSZ/TIOCSWINSZ of asm-generic/ioctls.h)."""

from __future__ import annotations

import contextlib
import fcntl
import struct
import termios

# struct winsize: unsigned short ws_row, ws_col, ws_xpixel, ws_ypixel (asm-generic/termios.h)
_WINSIZE = struct.Struct("HHHH")


def get_window_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on ``fd``, or None when ``fd`` is not a terminal."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
    except OSError:
        return None
    rows, columns, _, _ = _WINSIZE.unpack(raw)
    return rows, columns


def set_window_size(fd: int, size: tuple[int, int]) -> None:
    """Sets the window size of the pty on ``fd``; the kernel sends SIGWINCH to its foreground
    process group. Errors are ignored: a pty that has gone away needs no size."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(size[0], size[1], 0, 0))
