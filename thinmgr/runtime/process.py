"""The last steps of a container process, in the container, up to execve of the command.

Shared by ``run`` (PID 1 without an init, PID 2 with one) and ``exec``. The order is runc's
(libcontainer/init_linux.go, standard_init_linux.go): the user is resolved from the
container's tables while still root; the pty is made; capabilities/no_new_privs/seccomp are
applied; the ids are switched (which clears the capabilities of a non-root user); every
descriptor but 0/1/2 and the status pipe is closed (runc CVE-2024-21626); the working
directory is entered and checked; and the command is found along the container's PATH, so that
127 (not found) and 126 (cannot execute) reach the launcher over the status pipe *before* it
reports a start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from thinmgr.errors import ThinmgrError
from thinmgr.kernel.terminal import set_window_size
from thinmgr.runtime import status, users

# Docker's PATH for images that do not set one (moby oci/defaults.go DefaultPathEnv).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
_MAX_FD = 2**31 - 1


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    tty: bool = False
    interactive: bool = False
    window_size: tuple[int, int] | None = None  # of the caller's terminal, copied to the pty
    hostname: str | None = None  # for $HOSTNAME, as docker sets it


@dataclass(frozen=True)
class Channels:
    """The descriptors the start-up chain keeps open: all others are closed."""

    status_fd: int
    tty_socket: socket.socket | None = None

    def keep(self) -> list[int]:
        fds = [0, 1, 2, self.status_fd]
        if self.tty_socket is not None:
            fds.append(self.tty_socket.fileno())
        return fds


def close_fds_except(keep: list[int]) -> None:
    """Closes every descriptor not in ``keep`` (close_range(2) under the hood)."""
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)


def reset_signals() -> None:
    """Default dispositions and an empty mask: execve keeps ignored signals (Python ignores
    SIGPIPE and SIGXFSZ) and the mask, so a command would inherit them (subprocess's
    ``restore_signals`` does the same)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def command_environment(spec: ProcessSpec, creds: users.Credentials) -> dict[str, str]:
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", spec.hostname or os.uname().nodename)
    env.setdefault("HOME", creds.home)
    if spec.tty:
        env.setdefault("TERM", "xterm")
    return env


def candidates(command: str, path: str) -> list[str]:
    """Where execve should look for ``command``: itself when it has a slash, else each
    directory of PATH (an empty entry meaning the working directory, as in execvp)."""
    if "/" in command:
        return [command]
    return [os.path.join(directory or ".", command) for directory in path.split(":")]


def exit_code_for_exec_errno(code: int) -> int:
    """Docker's: 127 when the command does not exist, 126 when it cannot be executed."""
    return EXIT_NOT_FOUND if code in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_EXECUTE


def _attach_tty(spec: ProcessSpec, channels: Channels, creds: users.Credentials) -> None:
    """A pty from the container's own devpts (/dev/ptmx -> pts/ptmx after pivot_root); the
    master goes to the launcher, the slave becomes the controlling terminal of a new session
    (never the caller's terminal: TIOCSTI injection, CVE-2017-5226)."""
    assert channels.tty_socket is not None
    master, slave = os.openpty()
    socket.send_fds(channels.tty_socket, [b"pty"], [master])
    os.close(master)
    channels.tty_socket.close()
    if spec.window_size is not None:
        set_window_size(slave, spec.window_size)
    os.fchown(slave, creds.uid, -1)
    os.login_tty(slave)  # setsid + TIOCSCTTY + dup2 onto 0/1/2


def _switch_user(creds: users.Credentials) -> None:
    os.setgroups(list(creds.groups))
    os.setresgid(creds.gid, creds.gid, creds.gid)
    os.setresuid(creds.uid, creds.uid, creds.uid)  # drops every capability of a non-root uid


def _enter_workdir(workdir: str) -> None:
    try:
        os.chdir(workdir)
        cwd = os.getcwd()
    except OSError as exc:
        raise ThinmgrError(
            f"cannot use {workdir!r} as the working directory: {exc.strerror or exc}"
        ) from None
    if not cwd.startswith("/"):  # outside the root, e.g. a leaked descriptor (CVE-2024-21626)
        raise ThinmgrError(f"working directory {workdir!r} is outside the container")


def _fail(channels: Channels, reason: str) -> NoReturn:
    status.send(channels.status_fd, error=reason)
    os._exit(EXIT_SETUP_FAILED)


def exec_command(
    spec: ProcessSpec, channels: Channels, *, confine: Callable[[], None] | None
) -> NoReturn:
    """Becomes the command; on any failure reports it on the status pipe and exits with
    125 (setup), 126 or 127 (execve). Never returns."""
    try:
        if not spec.argv or not spec.argv[0]:
            raise ThinmgrError("no command to run")
        creds = users.resolve(spec.user)
        env = command_environment(spec, creds)
        if spec.tty:
            _attach_tty(spec, channels, creds)
        elif not spec.interactive:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        if not os.path.isdir(spec.workdir):
            # docker creates a missing WORKDIR (as root, before the user switch)
            with contextlib.suppress(OSError):  # if it fails, the chdir below says why
                os.makedirs(spec.workdir, 0o755, exist_ok=True)
        if confine is not None:
            confine()
        _switch_user(creds)
        close_fds_except([0, 1, 2, channels.status_fd])
        _enter_workdir(spec.workdir)
        reset_signals()
    except ThinmgrError as exc:
        _fail(channels, exc.message)
    except OSError as exc:
        _fail(channels, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    except BaseException as exc:
        _fail(channels, f"{type(exc).__name__}: {exc}")
    sys.stdout.flush()
    first_error: OSError | None = None
    for path in candidates(spec.argv[0], env["PATH"]):
        try:
            os.execve(path, spec.argv, env)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                first_error = first_error or exc
                continue
            if exc.errno == errno.EACCES:  # keep looking, as execvp does, but remember it
                if first_error is None or first_error.errno != errno.EACCES:
                    first_error = exc
                continue
            first_error = exc
            break
    code = first_error.errno if first_error is not None and first_error.errno else errno.ENOENT
    status.send(channels.status_fd, exec_errno=code, command=spec.argv[0])
    os._exit(exit_code_for_exec_errno(code))
