"""The thin client of the command service: hands a command line to the resident service
when one runs for this home, and relays the outcome (protocol in service/protocol.py).

Standard library only and no work when no service runs: one failed connect(2) on a socket
path that does not exist. Everything the command touches is passed along -- standard
descriptors, working directory, environment, umask -- and the signals a user sends to
`thinmgr` (Ctrl-C, SIGTERM, a window resize) go to the worker, so the command behaves as if
it ran here. Should the client be killed, the service kills the worker (SIGKILL), as the
command itself would have died.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import sys
import termios
from collections.abc import Iterator
from typing import Any, BinaryIO

from thinmgr.service import protocol

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGWINCH,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
LOST_EXIT = 70  # ExitCode.INTERNAL: the worker vanished without a status


def run_via_service(args: list[str]) -> int | None:
    """The command's exit code as the service ran it, or None: no service (run it here)."""
    path = protocol.socket_path(protocol.home_of(args, os.environ))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:  # no service (ENOENT), a stale socket (ECONNREFUSED), a long path
        sock.close()
        return None
    with sock:
        try:
            with _passed_descriptors() as fds:
                request = protocol.encode_request(args, dict(os.environ), _current_umask())
                sock.sendmsg(
                    [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            replies = sock.makefile("rb")
            first = _reply(replies)
        except OSError:
            return None  # the service went away meanwhile (or no cwd to pass): nothing ran
        if first is None or not isinstance(first.get("pid"), int):
            return None  # refused (e.g. thinmgr changed since it started): run it here
        return _relay(first["pid"], replies)


def _relay(pid: int, replies: BinaryIO) -> int:
    """Forwards signals to the worker until the service reports its exit code."""

    def forward(number: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)

    saved_tty = _terminal_state()
    for number in FORWARDED:
        signal.signal(number, forward)
    try:
        done = _reply(replies)
    finally:
        for number in FORWARDED:
            restored = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            signal.signal(number, restored)
        if saved_tty is not None:
            # A worker killed while the terminal was raw (`run -t`) cannot restore it.
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
    if done is None or not isinstance(done.get("exit"), int):
        sys.stderr.write("thinmgr: error: the thinmgr service lost the command's status\n")
        return LOST_EXIT
    code: int = done["exit"]
    return code


def _reply(replies: BinaryIO) -> dict[str, Any] | None:
    line = replies.readline()
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


@contextlib.contextmanager
def _passed_descriptors() -> Iterator[list[int]]:
    """0, 1, 2 (a closed one replaced by /dev/null) and the working directory."""
    opened = []
    fds = []
    try:
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                opened.append(null)
                fds.append(null)
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(cwd)
        fds.append(cwd)
        yield fds
    finally:
        for fd in opened:
            os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _terminal_state() -> list[Any] | None:
    try:
        return termios.tcgetattr(0) if os.isatty(0) else None
    except termios.error:
        return None
