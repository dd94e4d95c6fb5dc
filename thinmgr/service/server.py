"""The command service: one resident process per home that has thinmgr's modules imported
(SQLAlchemy, the catalog models, typer and every command) and forks a worker per command.

A command that runs in its own process spends ~230 ms importing and tearing down before and
after its work (docs/containers.md, "Speed"); a worker forked from here starts with all of it
done. The worker becomes the client's stand-in: it takes the client's standard descriptors,
working directory, environment and umask, nests containers under the client's cgroup
(runtime/caller.py) and runs the ordinary command-line code path (cli/main.py).

The service's loop (single-threaded, so fork is safe): accept a request, check the peer
(same user, same mount and pid namespaces, or refused), check that thinmgr's files have not
changed since the service started (else refuse and stop: a worker must not run old code),
fork, answer ``{"pid"}``; when a worker ends, answer ``{"exit"}`` with its status (128+n for
a signal, as a shell reports it); when a client hangs up before that, SIGKILL its worker --
the client's death must not leave a command running that it no longer waits for, exactly as
if the command had been killed with its process.

Run as ``python -m thinmgr.service.server --home HOME`` (by `thinmgr service start`); SIGTERM
stops it once its running workers have ended.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from thinmgr.service import protocol

# Modules every worker would otherwise import itself, heaviest first. A command that needs
# another one still imports it (in the worker only).
PRELOAD = (
    "sqlalchemy.orm",
    "thinmgr.catalog.models",
    "thinmgr.catalog.fastread",
    "thinmgr.ops.manager",
    "thinmgr.ops.containers",
    "thinmgr.ops.volumes",
    "thinmgr.ops.snapshots",
    "thinmgr.ops.listings",
    "thinmgr.ops.images",
    "thinmgr.ops.commit",
    "thinmgr.runtime.launch",
    "thinmgr.engine.user.engine",
    "rich.console",
    "rich.table",
)
COMMAND_MODULES = (
    "metadata", "pool", "volume", "snapshot", "doctor", "lab", "diff", "layer", "image",
    "commit", "container",
)  # fmt: skip
SO_PEERCRED_SIZE = struct.calcsize("3i")
SHARED_NAMESPACES = ("mnt", "pid", "user")
REQUEST_TIMEOUT = 5.0  # seconds for a client to send its request once connected
WORKER_FAILED = 70  # ExitCode.INTERNAL: the worker could not even start the command


@dataclass
class _Request:
    argv: list[str]
    env: dict[str, str]
    umask: int
    fds: list[int]  # stdin, stdout, stderr, working directory
    client_pid: int


class Refused(Exception):
    """The request cannot be served here; the client runs the command itself."""


def preload() -> None:
    """Imports what workers need, builds the command tree once, freezes the heap so that
    workers' collections do not touch (and copy) the service's pages."""
    from thinmgr.cli import app

    for name in (*PRELOAD, *(f"thinmgr.cli.{module}" for module in COMMAND_MODULES)):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import typer

    typer.main.get_command(app.build_app())
    gc.collect()
    gc.freeze()


def fingerprint() -> str:
    """A digest of thinmgr's source files (names, sizes, modification times) and the
    interpreter: any change means the loaded code is no longer what is installed."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(sys.executable.encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                digest.update(f"{dirpath}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Service:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = protocol.socket_path(str(home))
        self.built = fingerprint()
        self.listener: socket.socket | None = None
        self.workers: dict[int, socket.socket] = {}  # worker pid -> its client's connection
        self.by_fd: dict[int, int] = {}  # connection fd -> worker pid
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller = select.poll()

    # -- the loop ----------------------------------------------------------------------

    def serve(self) -> None:
        self._listen()
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)
        self.poller.register(self.wake_r, select.POLLIN)
        try:
            while not (self.stopping and not self.workers):
                for fd, events in self._poll():
                    if self.listener is not None and fd == self.listener.fileno():
                        self._accept()
                    elif fd == self.wake_r:
                        self._drain_wakeups()
                    elif fd in self.by_fd:
                        self._client_gone(fd, events)
                self._reap()
                if self.stopping:
                    self._close_listener()
        finally:
            self._close_listener()

    def _poll(self) -> list[tuple[int, int]]:
        try:
            return self.poller.poll()
        except InterruptedError:
            return []

    def _on_signal(self, number: int, _frame: object) -> None:
        if number in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass

    def _listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_mask = os.umask(0o177)  # the socket is born 0600: commands are root's to send
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_mask)
        listener.listen(64)
        self.listener = listener
        self.poller.register(listener.fileno(), select.POLLIN)

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        self.poller.unregister(self.listener.fileno())
        self.listener.close()
        self.listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- one request -------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            request = self._read_request(conn)
        except Refused as refusal:
            with contextlib.suppress(OSError):
                conn.sendall(protocol.encode_reply(refused=str(refusal)))
            conn.close()
            return
        except (OSError, ValueError):
            conn.close()
            return
        try:
            pid = os.fork()
        except OSError as exc:
            _close_all(request.fds)
            with contextlib.suppress(OSError):
                conn.sendall(protocol.encode_reply(refused=f"cannot fork: {exc.strerror}"))
            conn.close()
            return
        if pid == 0:
            try:
                self._become_worker(request, conn)
            finally:
                os._exit(WORKER_FAILED)
        _close_all(request.fds)
        self.workers[pid] = conn
        self.by_fd[conn.fileno()] = pid
        try:
            conn.sendall(protocol.encode_reply(pid=pid))
        except OSError:
            self._kill(pid)  # the client is already gone
        # Readable (end of file) or hung up: the client died; it sends nothing else.
        self.poller.register(conn.fileno(), select.POLLIN | select.POLLHUP)

    def _read_request(self, conn: socket.socket) -> _Request:
        conn.settimeout(REQUEST_TIMEOUT)
        pid, uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_SIZE)
        )
        data, fds = _receive(conn)
        if uid != os.geteuid():
            _close_all(fds)
            raise Refused(f"the service serves uid {os.geteuid()} only")
        if len(fds) != protocol.PASSED_FDS:
            _close_all(fds)
            raise ValueError("wrong number of descriptors")
        try:
            for namespace in SHARED_NAMESPACES:
                if os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(
                    f"/proc/self/ns/{namespace}"
                ):
                    raise Refused(f"the client is in another {namespace} namespace")
            if fingerprint() != self.built:
                self.stopping = True
                raise Refused("thinmgr changed since the service started; the service stops")
            message = json.loads(data)
            request = _Request(
                argv=[str(a) for a in message["argv"]],
                env={str(k): str(v) for k, v in message["env"].items()},
                umask=int(message["umask"]) & 0o777,
                fds=fds,
                client_pid=pid,
            )
        except (Refused, OSError, ValueError, KeyError, TypeError, AttributeError):
            _close_all(fds)
            raise
        conn.settimeout(None)
        return request

    # -- workers -----------------------------------------------------------------------

    def _become_worker(self, request: _Request, conn: socket.socket) -> NoReturn:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        inherited = [self.wake_r, self.wake_w, conn.fileno(), *self.by_fd]
        if self.listener is not None:
            inherited.append(self.listener.fileno())
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        run_command(request)

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.workers.pop(pid, None)
            if conn is None:
                continue
            self.by_fd.pop(conn.fileno(), None)
            with contextlib.suppress(KeyError, ValueError):
                self.poller.unregister(conn.fileno())
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(protocol.encode_reply(exit=code if code >= 0 else 128 - code))
            conn.close()

    def _client_gone(self, fd: int, _events: int) -> None:
        pid = self.by_fd.pop(fd)
        self.poller.unregister(fd)
        self._kill(pid)

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request's JSON and the descriptors that came with its first bytes."""
    space = socket.CMSG_SPACE(protocol.PASSED_FDS * 4)
    data, ancillary, _flags, _address = conn.recvmsg(65536, space)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    for fd in fds:
        os.set_inheritable(fd, False)
    if len(data) < protocol.HEADER.size:
        _close_all(fds)
        raise ValueError("short request")
    (length,) = protocol.HEADER.unpack_from(data)
    if length > protocol.MAX_REQUEST:
        _close_all(fds)
        raise ValueError("request too large")
    body = data[protocol.HEADER.size :]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            _close_all(fds)
            raise ValueError("truncated request")
        body += chunk
    return body, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def run_command(request: _Request) -> NoReturn:
    """In the worker: take the client's place, then run the command line as `thinmgr` would."""
    from thinmgr.cli.main import main
    from thinmgr.runtime import caller

    stdin, stdout, stderr, cwd = request.fds
    for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(source, target)  # inheritable: the command's children share them
    os.fchdir(cwd)
    _close_all(request.fds)
    os.umask(request.umask)
    os.environ.clear()
    os.environ.update(request.env)
    caller.set_caller(request.client_pid)
    with _streams():
        sys.argv = ["thinmgr", *request.argv]
        try:
            main(request.argv, use_service=False)
        except SystemExit as done:
            code = done.code
            if isinstance(code, str):
                sys.stderr.write(code + "\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code if isinstance(code, int) else (0 if code is None else 1))
    os._exit(0)


@contextlib.contextmanager
def _streams() -> Iterator[None]:
    """Fresh sys.stdin/stdout/stderr over descriptors 0-2, buffered as the interpreter would
    have made them for the client (line buffering on a terminal)."""
    encoding = sys.stdout.encoding if sys.stdout is not None else "utf-8"
    sys.stdin = open(0, encoding=encoding, closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1, "w", encoding=encoding, closefd=False, buffering=1 if os.isatty(1) else -1
    )
    sys.stderr = open(  # noqa: SIM115
        2, "w", encoding=encoding, errors="backslashreplace", closefd=False, buffering=1
    )
    yield


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--home":
        sys.stderr.write("usage: python -m thinmgr.service.server --home HOME\n")
        return 2
    home = Path(argv[1])
    preload()
    service = Service(home)
    pid_file = home / protocol.PID_NAME
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        service.serve()
    finally:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
