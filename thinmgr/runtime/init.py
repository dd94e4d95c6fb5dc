"""The default PID 1 of a container: a tini-like reaper that is the forked launcher itself.

It is *not* a host binary executed inside the container (runc CVE-2019-5736: a container could
reach an executed host binary through /proc/PID/exe); it is the already running Python process,
made non-dumpable, so /proc/1/exe, /proc/1/mem and /proc/1/fd stay closed to the container.

A PID 1 of a pid namespace gets only the signals it has a handler for (SIGTERM from `stop`
would be ignored by ``sh`` as PID 1, measured in runtime-and-images.md §2), and it inherits
every orphan. This init forwards the usual signals to the command (PID 2), reaps every zombie
and exits with the command's status, 128+n when a signal n killed it (tini's behaviour).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


def exit_code(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit status, or 128+n for signal n."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def run_init(start_command: Callable[[], NoReturn], after_fork: Callable[[int], None]) -> NoReturn:
    """Forks the command (``start_command`` runs in the child) and stays as its reaper.

    ``after_fork`` runs in the init with the command's pid (to close the init's copies of the
    status pipe and the pty socket). The forwarded signals are blocked around the fork, so one
    that arrives early is delivered to the command, not lost.
    """
    child = 0

    def forward(sig: int, _frame: FrameType | None) -> None:
        if child > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    child = os.fork()
    if child == 0:
        try:
            for sig in FORWARDED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
            start_command()
        finally:
            os._exit(125)
    try:
        after_fork(child)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    code = 0
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)  # retried after a handler ran (PEP 475)
        except ChildProcessError:
            break
        if pid == child:
            code = exit_code(wait_status)
            break
    # Reap what is already dead; the kernel kills the rest of the namespace when we exit.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    os._exit(code)
