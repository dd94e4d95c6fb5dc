"""Starting, stopping and finding the command service of a home (`thinmgr service ...`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import ConflictError, IOFailure, UsageError
from thinmgr.service import protocol

START_TIMEOUT = 20.0  # seconds: the imports take ~0.3 s; a loaded CI machine is slower
STOP_TIMEOUT = 10.0  # seconds for running commands to end before SIGKILL
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux (unix(7))
SERVER_MODULE = "thinmgr.service.server"


@dataclass(frozen=True)
class ServiceStatus:
    home: str
    socket: str
    pid: int | None  # None: not running

    def as_dict(self) -> dict[str, object]:
        return {"home": self.home, "socket": self.socket, "pid": self.pid,
                "running": self.pid is not None}  # fmt: skip


def status(home: Path) -> ServiceStatus:
    return ServiceStatus(str(home), protocol.socket_path(str(home)), _running_pid(home))


def start(home: Path) -> ServiceStatus:
    """Start the service for ``home`` in the background; returns once it accepts commands."""
    path = protocol.socket_path(str(home))
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise UsageError(
            f"the service socket {path} is longer than {SUN_PATH_MAX} bytes (unix(7))",
            hint="Use a shorter --home.",
        )
    running = _running_pid(home)
    if running is not None:
        raise ConflictError(
            f"a thinmgr service already runs for {home} (pid {running})",
            hint="`thinmgr service stop` first, or keep using it.",
        )
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / protocol.LOG_NAME
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", SERVER_MODULE, "--home", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # no signals from the starting terminal
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise IOFailure(
                f"the thinmgr service exited at start (status {process.returncode})",
                hint=f"See {log_path}.",
            )
        if _accepts(path):
            return ServiceStatus(str(home), path, process.pid)
        time.sleep(0.02)
    process.kill()
    process.wait()
    raise IOFailure(f"the thinmgr service did not start within {START_TIMEOUT:.0f} s",
                    hint=f"See {log_path}.")  # fmt: skip


def stop(home: Path) -> int | None:
    """Stop the service (running commands are let finish, up to STOP_TIMEOUT, then killed).
    The pid it had, or None when none ran."""
    pid = _running_pid(home)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(protocol.socket_path(str(home)))  # left by a killed service
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in (protocol.SOCKET_NAME, protocol.PID_NAME):
        with contextlib.suppress(FileNotFoundError):
            (home / name).unlink()
    return pid


def _running_pid(home: Path) -> int | None:
    """The pid in HOME/service.pid if that process is alive and is a service of this home."""
    try:
        pid = int((home / protocol.PID_NAME).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if SERVER_MODULE.encode() not in cmdline or os.fsencode(str(home)) not in cmdline:
        return None  # a recycled pid
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for us (the service's parent may be gone, leaving it to init).
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state != "Z"
    return False


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
