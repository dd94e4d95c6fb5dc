"""Talking to a pool server over its unix socket (``RUN_DIR/server.sock``)."""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from thinmgr.engine.user import protocol
from thinmgr.errors import IOFailure

SOCKET_NAME = "server.sock"
# Long enough for a suspend (which waits up to its own 10 s bound) or a detach that waits for
# the loop device to unbind; a server that says nothing for this long is treated as dead.
REQUEST_TIMEOUT = 60.0


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


class ServerGone(IOFailure):
    """No server answers on the socket (none runs, or it died)."""


class Connection:
    """One connection to a pool server; requests on it are answered in order."""

    def __init__(self, path: Path, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise ServerGone(f"no pool server listens on {path}") from exc
            raise IOFailure(f"cannot connect to the pool server at {path}: {exc}") from exc
        self._reader = self._sock.makefile("rb")

    def request(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; a server-side error is raised here."""
        try:
            self._sock.sendall(protocol.encode_request(op, **args))
            line = self._reader.readline(protocol.MAX_LINE + 1)
        except TimeoutError as exc:
            raise IOFailure(
                f"the pool server at {self.path} did not answer {op!r} in time",
                hint="Look at server.log in the pool's run directory.",
            ) from exc
        except OSError as exc:
            raise ServerGone(f"the pool server at {self.path} went away during {op!r}") from exc
        if not line:
            raise ServerGone(f"the pool server at {self.path} closed the connection during {op!r}")
        return protocol.decode_response(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


def call(run_dir: Path, op: str, **args: Any) -> Any:
    """One request on a fresh connection."""
    with Connection(socket_path(run_dir)) as connection:
        return connection.request(op, **args)
