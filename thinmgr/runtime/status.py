"""The status pipe between the launcher and its children (runc's "sync pipe", simplified).

The launcher creates the pipe with O_CLOEXEC and every process of the start-up chain keeps a
copy of the write end: the intermediate process reports PID 1's host pid, any process reports a
setup failure or the errno of a failed execve. The command's copy closes itself when execve
succeeds, and every other copy is closed on the way, so end-of-file on the read side means
"the command is running" (known before ``on_started`` is called: 126/127 are never reported
as a start). Each message is one JSON line, written with a single write(2) below PIPE_BUF so
that messages from different processes never interleave. ``mark`` messages carry the
CLOCK_MONOTONIC time a child reached a step of the start-up (the clock is system-wide, so
the launcher can subtract its own readings): they split the launch time into its parts for
``THINMGR_TRACE_TIMINGS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

_MAX_MESSAGE = 3000  # < PIPE_BUF (4096): one atomic write


@dataclass
class StartReport:
    """What the launcher learned by reading the pipe to its end."""

    pid: int | None = None
    error: str | None = None
    exec_errno: int | None = None
    command: str = ""
    marks: dict[str, float] = field(default_factory=dict)  # step -> time.monotonic()


def send(fd: int, **message: object) -> None:
    """Writes one message; errors are ignored (the reader may be gone: nothing to tell)."""
    raw = json.dumps(message).encode()
    if len(raw) > _MAX_MESSAGE:
        if "error" in message:
            message["error"] = str(message["error"])[: _MAX_MESSAGE // 2] + "..."
        raw = json.dumps(message).encode()[:_MAX_MESSAGE]
    with contextlib.suppress(OSError):
        os.write(fd, raw + b"\n")


def mark(fd: int, step: str) -> None:
    """Tells the launcher that this process reached ``step`` now."""
    send(fd, mark=step, at=time.monotonic())


def read_all(fd: int) -> StartReport:
    """Reads until every write end is closed; the first error and exec errno win."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    report = StartReport()
    for line in b"".join(chunks).splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("pid"), int) and report.pid is None:
            report.pid = message["pid"]
        if isinstance(message.get("error"), str) and report.error is None:
            report.error = message["error"]
        if isinstance(message.get("exec_errno"), int) and report.exec_errno is None:
            report.exec_errno = message["exec_errno"]
            report.command = str(message.get("command", ""))
        step, at = message.get("mark"), message.get("at")
        if isinstance(step, str) and isinstance(at, float):
            report.marks.setdefault(step, at)
    return report
