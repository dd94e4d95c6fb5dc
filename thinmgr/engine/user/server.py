"""The per-pool server: one process serves a pool's active volumes as block devices.

    python -m thinmgr.engine.user.server --spec JSON

``UserEngine.activate_volume`` starts it (detached: a new session, output to
``RUN_DIR/server.log``) when the first volume of a pool becomes active. It holds the pool's
lock (``RUN_DIR/pool.lock``, an exclusive flock) for its whole life, so no in-process access
and no second server can touch the pool meanwhile; its pid is in ``RUN_DIR/server.pid``.

It opens the ``UserPool``, attaches every active volume as a ``BlockDevice`` (FUSE + loop)
at ``RUN_DIR/vol/DEV`` with the caller's stable link, answers JSON-line requests on
``RUN_DIR/server.sock`` (one thread per connection), commits about once a second while
something changed (dm-thin's COMMIT_PERIOD is 1 s) and on every flush, and stops by itself
when its last volume is deactivated (commit, close, remove socket and pid file).

If it is killed, nothing is committed past its last commit, the loop devices clear
themselves when their users let go (autoclear), and the FUSE mounts stay as dead
(ENOTCONN) mount points until ``UserEngine.cleanup_stale`` unmounts them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinmgr.engine.base import PoolSpec
from thinmgr.engine.user import protocol
from thinmgr.engine.user.backend import BlockBackend, BytesLike
from thinmgr.engine.user.blockdev import BlockDevice, attach
from thinmgr.engine.user.client import SOCKET_NAME
from thinmgr.errors import BusyError, ConflictError, InternalError, NotFoundError, ThinmgrError
from thinmgr.kernel import loop

if TYPE_CHECKING:
    from thinmgr.engine.user.pool import UserPool

log = logging.getLogger("thinmgr.server")

LOCK_NAME = "pool.lock"
PID_NAME = "server.pid"
LOG_NAME = "server.log"
VOLUME_DIR = "vol"
COMMIT_PERIOD = 1.0  # seconds, as dm-thin's COMMIT_PERIOD (drivers/md/dm-thin.c)
SUSPEND_TIMEOUT = 10.0  # a suspend that cannot drain in-flight I/O by then gives up
IDLE_EXIT = 15.0  # a server nobody gives a volume to within this long stops


def user_pool_class() -> type[UserPool]:
    """Imported late: `thinmgr --help` and the client side never pay for the pool code."""
    from thinmgr.engine.user.pool import UserPool

    return UserPool


# -- the pool lock ------------------------------------------------------------------------------


class PoolLock:
    """The exclusive flock on ``RUN_DIR/pool.lock``: whoever holds it owns the pool."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd = -1

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise BusyError(
                    f"the pool's lock {self.path} is held by another thinmgr process",
                    hint="Another command or the pool server is using the pool; try again.",
                )
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


@contextlib.contextmanager
def pool_lock(run_dir: Path, timeout: float) -> Iterator[PoolLock]:
    lock = PoolLock(run_dir)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()


# -- volumes --------------------------------------------------------------------------------


class GatedBackend:
    """A ``BlockBackend`` wrapper that can hold new requests and drain in-flight ones.

    ``close_gate`` is how a volume is suspended: FUSE workers that arrive meanwhile wait in
    ``_enter`` until ``open_gate``. ``changes`` counts writes and discards so the server's
    periodic commit knows whether there is anything to commit.
    """

    def __init__(self, inner: BlockBackend) -> None:
        self.inner = inner
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self.changes = 0

    @property
    def size(self) -> int:
        return self.inner.size

    @contextlib.contextmanager
    def _passage(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def read(self, offset: int, length: int) -> bytes:
        with self._passage():
            return self.inner.read(offset, length)

    def write(self, offset: int, data: BytesLike) -> None:
        with self._passage():
            self.changes += 1
            self.inner.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        with self._passage():
            self.changes += 1
            self.inner.discard(offset, length)

    def flush(self) -> None:
        with self._passage():
            self.inner.flush()  # ThinVolume.flush commits the pool, as dm-thin on REQ_PREFLUSH

    def close_gate(self, timeout: float) -> None:
        """Hold new requests and wait for in-flight ones; BusyError (gate reopened) on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._closed = False
                    self._cond.notify_all()
                    raise BusyError(
                        f"in-flight I/O did not drain within {timeout:.0f} s",
                        hint="The device is under heavy load or stuck; try again.",
                    )
                self._cond.wait(left)

    def open_gate(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()


@dataclass
class ActiveVolume:
    dev_id: int
    name: str
    size_bytes: int
    read_only: bool
    backend: GatedBackend
    block: BlockDevice
    thin: Any  # the UserPool's ThinVolume
    suspended_by: object | None = None


# -- the server ---------------------------------------------------------------------------


class PoolServer:
    """Owns one open ``UserPool`` and its active volumes; requests arrive on ``serve()``."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.run_dir = spec.run_dir
        self.lock = PoolLock(self.run_dir)
        self.lock.acquire(timeout=15.0)  # a server that is stopping may still hold it
        self.pool = user_pool_class().open(spec.metadata, spec.data)
        self.volumes: dict[int, ActiveVolume] = {}
        # Volume changes and pool messages; never held by anything a FUSE worker waits for.
        # Commits take only _commit_lock: a flush arrives on a FUSE worker thread while a
        # control thread may be waiting (holding _mutex) for that very flush to finish.
        self._mutex = threading.RLock()
        self._commit_lock = threading.Lock()
        self._stop = threading.Event()
        self._committed_changes = 0
        self._messages_since_commit = False
        self._listener: socket.socket | None = None
        self._ops: dict[str, Callable[..., Any]] = {
            "ping": os.getpid,
            "activate": self.activate,
            "deactivate": self.deactivate,
            "status": self.status,
            "thin_ids": lambda: sorted(self.pool.thin_ids()),
            "thin_status": self.thin_status,
            "volume_status": self.volume_status,
            "commit": self.commit,
            "extend": self._message("extend_data"),
            "create_thin": self._message("create_thin"),
            "create_snap": self._message("create_snap"),
            "delete": self.delete,
            "set_transaction_id": self._message("set_transaction_id"),
            "reserve_metadata_snap": self._message("reserve_metadata_snap"),
            "release_metadata_snap": self._message("release_metadata_snap"),
            "stop": self.stop,
        }

    # -- requests ---------------------------------------------------------------------------

    def activate(self, dev_id: int, name: str, size_bytes: int, read_only: bool, link: str) -> str:
        with self._mutex:
            active = self.volumes.get(dev_id)
            if active is not None:
                if str(active.block.link) != link:
                    raise ConflictError(
                        f"thin device {dev_id} is already active as {active.block.link}"
                    )
                return str(active.block.link)
            if dev_id not in self.pool.thin_ids():
                raise NotFoundError(f"thin device {dev_id} does not exist in pool {self.spec.name}")
            thin = self.pool.volume(dev_id, size_bytes, read_only=read_only)
            gated = GatedBackend(thin)
            run_dir = self.run_dir / VOLUME_DIR / str(dev_id)
            try:
                block = attach(gated, run_dir=run_dir, link=link)
            except BaseException:
                _close_thin(thin)
                raise
            self.volumes[dev_id] = ActiveVolume(
                dev_id, name, size_bytes, read_only, gated, block, thin
            )
            log.info("activated thin device %d as %s (%s)", dev_id, link, block.device)
            return str(block.link)

    def deactivate(self, dev_id: int, force: bool = False) -> bool:
        """Detach; True when that was the last volume and the server is stopping."""
        with self._mutex:
            active = self.volumes.get(dev_id)
            if active is None:
                return not self.volumes and self._stop.is_set()
            if active.suspended_by is not None:
                raise BusyError(f"thin device {dev_id} is suspended", hint="Resume it first.")
            # force skips nothing that would lose data: a mounted device is still refused
            # (detaching under a file system would fail its pending writes); see engine.py.
            active.block.detach()
            _close_thin(active.thin)
            with contextlib.suppress(OSError):
                (self.run_dir / VOLUME_DIR / str(dev_id)).rmdir()
            del self.volumes[dev_id]
            self.commit()
            log.info("deactivated thin device %d", dev_id)
            if not self.volumes:
                self._shutdown()
                return True
            return False

    def suspend(self, dev_id: int, owner: object) -> None:
        active = self._active(dev_id)
        if active.suspended_by is not None:
            raise BusyError(f"thin device {dev_id} is already suspended")
        active.block.flush()  # push the loop device's cache through FUSE first
        active.backend.close_gate(SUSPEND_TIMEOUT)
        active.suspended_by = owner
        try:
            self.commit()
        except BaseException:
            self.resume(dev_id, owner)
            raise

    def resume(self, dev_id: int, owner: object) -> None:
        active = self.volumes.get(dev_id)
        if active is not None and active.suspended_by is owner:
            active.suspended_by = None
            active.backend.open_gate()

    def delete(self, dev: int) -> None:
        with self._mutex:
            if dev in self.volumes:
                raise BusyError(
                    f"thin device {dev} is active", hint="Deactivate the volume before deleting it."
                )
            self.pool.delete(dev)
            self._messages_since_commit = True

    def status(self) -> dict[str, Any]:
        with self._mutex:
            status = self.pool.status()
        return protocol.pool_status_to_dict(_with_active(status, True))

    def thin_status(self, dev: int) -> list[Any]:
        with self._mutex:
            mapped, highest = _thin_counts(self.pool.thin_status(dev))
        return [mapped, highest]

    def volume_status(self, dev: int) -> dict[str, Any]:
        mapped, highest = self.thin_status(dev)
        active = self.volumes.get(dev)
        device = None if active is None else active.block.device
        return {
            "dev_id": dev,
            "mapped_blocks": mapped,
            "highest_mapped_block": highest,
            "active": active is not None,
            "device": device,
            "open_count": 0 if device is None else open_count(device),
        }

    def commit(self) -> None:
        with self._commit_lock:
            self._commit_locked()

    def stop(self) -> None:
        with self._mutex:
            if self.volumes:
                raise BusyError(
                    f"pool {self.spec.name} has active volumes: "
                    f"{', '.join(v.name for v in self.volumes.values())}",
                    hint="Deactivate them first.",
                )
            self._shutdown()

    def _message(self, method: str) -> Callable[..., Any]:
        def run(**args: Any) -> Any:
            # the arguments arrive named, in the pool method's positional order
            with self._mutex:
                result = getattr(self.pool, method)(*args.values())
                self._messages_since_commit = True
                return result

        return run

    def _active(self, dev_id: int) -> ActiveVolume:
        active = self.volumes.get(dev_id)
        if active is None:
            raise NotFoundError(f"thin device {dev_id} is not active")
        return active

    def _commit_locked(self) -> None:
        changes = sum(v.backend.changes for v in list(self.volumes.values()))
        if changes != self._committed_changes or self._messages_since_commit:
            self.pool.commit()
            self._committed_changes = changes
            self._messages_since_commit = False

    # -- life cycle ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop listening, commit and close the pool; the process exits right after."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / SOCKET_NAME).unlink()
        self._messages_since_commit = True
        self.commit()
        self.pool.close()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / PID_NAME).unlink()
        log.info("server stopped")

    def serve(self) -> None:
        path = self.run_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket: we hold the pool lock, so its server is gone
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        (self.run_dir / PID_NAME).write_text(f"{os.getpid()}\n")
        threading.Thread(target=self._commit_loop, name="commit", daemon=True).start()
        started = time.monotonic()
        log.info("serving pool %s on %s", self.spec.name, path)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if not self.volumes and time.monotonic() - started > IDLE_EXIT:
                    with self._mutex:
                        if not self.volumes:
                            self._shutdown()
                continue
            except OSError:
                break  # the listener was closed by _shutdown
            started = time.monotonic()
            threading.Thread(target=self._handle, args=(conn,), name="control", daemon=True).start()

    def _commit_loop(self) -> None:
        while not self._stop.wait(COMMIT_PERIOD):
            try:
                self.commit()
            except ThinmgrError as exc:
                log.error("periodic commit failed: %s", exc)

    def _handle(self, conn: socket.socket) -> None:
        owner = object()  # suspensions made on this connection end with it
        suspended: set[int] = set()
        conn.settimeout(None)
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(protocol.MAX_LINE + 1)
                if not line:
                    return
                conn.sendall(self._answer(line, owner, suspended))
        except OSError:
            return
        finally:
            for dev_id in suspended:
                self.resume(dev_id, owner)
            reader.close()
            conn.close()

    def _answer(self, line: bytes, owner: object, suspended: set[int]) -> bytes:
        try:
            op, args = protocol.decode_request(line)
            if op == "suspend":
                self.suspend(int(args["dev_id"]), owner)
                suspended.add(int(args["dev_id"]))
                return protocol.encode_result(None)
            if op == "resume":
                self.resume(int(args["dev_id"]), owner)
                suspended.discard(int(args["dev_id"]))
                return protocol.encode_result(None)
            if self._stop.is_set() and op not in ("ping", "deactivate", "stop"):
                raise BusyError("the pool server is stopping", hint="Try again.")
            return protocol.encode_result(self._ops[op](**args))
        except ThinmgrError as exc:
            return protocol.encode_error(exc)
        except Exception as exc:  # a bug must fail one request, not the server
            log.exception("request failed")
            return protocol.encode_error(InternalError(f"pool server: {exc!r}"))


# -- helpers --------------------------------------------------------------------------------


def _close_thin(thin: Any) -> None:
    close = getattr(thin, "close", None)
    if callable(close):
        close()


def _with_active(status: Any, active: bool) -> Any:
    import dataclasses

    return dataclasses.replace(status, active=active)


def _thin_counts(status: Any) -> tuple[int, int | None]:
    """(mapped blocks, highest mapped block) from whatever ``UserPool.thin_status`` returns."""
    if isinstance(status, tuple):
        return int(status[0]), None if status[1] is None else int(status[1])
    mapped = int(status.mapped_blocks)
    highest = getattr(status, "highest_mapped_block", None)
    return mapped, None if highest is None else int(highest)


def open_count(device: str) -> int:
    """Holders of ``device`` other than this process: a mount (claim) counts as one."""
    count = 0
    try:
        fd = loop.open_device(device, exclusive=True)
    except BusyError:
        count += 1  # mounted or otherwise claimed
    except ThinmgrError:
        return 0
    else:
        os.close(fd)
    real = os.path.realpath(device)
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        with contextlib.suppress(OSError):
            for fd_name in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd_name}") == real:
                        count += 1
                        break
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinmgr.engine.user.server")
    parser.add_argument("--spec", required=True, help="the PoolSpec as JSON")
    args = parser.parse_args(argv)
    spec = protocol.spec_from_dict(json.loads(args.spec))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s server[{os.getpid()}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a detached server ignores the terminal
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        server = PoolServer(spec)
    except ThinmgrError as exc:
        log.error("cannot start: %s", exc)
        return int(exc.exit_code)
    try:
        server.serve()
    finally:
        if not server._stop.is_set():
            with contextlib.suppress(ThinmgrError, OSError):
                server._shutdown()
        server.lock.release()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
    sys.exit(errno.EPIPE)
