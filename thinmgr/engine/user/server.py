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
(commit, close, remove socket and pid file) ``linger`` seconds after its last volume was
deactivated, when nothing asked it anything meanwhile (``THINMGR_SERVER_LINGER``, default
``DEFAULT_LINGER``; 0 stops at once). The linger is for back-to-back commands such as
``thinmgr run --rm`` in a loop: starting a server costs a Python start, the pool code's
imports and a pool open (~300 ms), while a lingering one costs an idle process holding the
pool lock, through which every command on the pool goes meanwhile. ``stop`` (`pool
deactivate`, `pool destroy`) ends it at once, lingering or not.

If it is killed, nothing is committed past its last commit, the loop devices clear
themselves when their users let go (autoclear), and the FUSE mounts stay as dead
(ENOTCONN) mount points until ``UserEngine.cleanup_stale`` unmounts them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thinmgr.engine.base import PoolSpec
from thinmgr.engine.user import protocol
from thinmgr.engine.user.backend import BlockBackend, BytesLike
from thinmgr.engine.user.blockdev import BlockDevice, attach
from thinmgr.engine.user.client import SOCKET_NAME
from thinmgr.engine.user.runstate import (  # noqa: F401 (re-exported: the server's names)
    LINGER_ENV,
    LOCK_NAME,
    LOG_NAME,
    PID_NAME,
    VOLUME_DIR,
    PoolLock,
    pool_lock,
    user_pool_class,
)
from thinmgr.errors import BusyError, ConflictError, InternalError, NotFoundError, ThinmgrError
from thinmgr.kernel import loop

if TYPE_CHECKING:
    pass

log = logging.getLogger("thinmgr.server")

COMMIT_PERIOD = 1.0  # seconds, as dm-thin's COMMIT_PERIOD (drivers/md/dm-thin.c)
SUSPEND_TIMEOUT = 10.0  # a suspend that cannot drain in-flight I/O by then gives up
IDLE_EXIT = 15.0  # a server nobody gives a volume to within this long stops
# A stopping server waits this long for its clients to read their answers and hang up.
STOP_DRAIN_TIMEOUT = 2.0
# Seconds an idle server stays up after its last volume went. A few seconds cover a script's
# next command (commands on a pool follow each other within about a second) without keeping
# an idle process (and the pool's files open) around for long once the user is done.
DEFAULT_LINGER = 3.0


def linger_from_env(environ: dict[str, str] | None = None) -> float:
    """``THINMGR_SERVER_LINGER`` in seconds (>= 0); the default when unset or malformed (a
    server must not fail to start over a tuning knob)."""
    text = (os.environ if environ is None else environ).get(LINGER_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_LINGER
    if not math.isfinite(value):
        return DEFAULT_LINGER
    return max(0.0, value)


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

    def __init__(self, spec: PoolSpec, *, linger: float = DEFAULT_LINGER) -> None:
        self.spec = spec
        self.linger = linger
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
        self._terminate_requested = False  # set by the SIGTERM handler
        self._stopped = threading.Event()  # _shutdown has finished: the pool is closed
        self._committed_changes = 0
        self._messages_since_commit = False
        self._listener: socket.socket | None = None
        # Idle exit: no volume and no open connection for _idle_limit seconds since
        # _last_activity (IDLE_EXIT until a volume came, the linger after the last one went).
        self._activity_lock = threading.Lock()  # never held while taking another lock
        self._connections = 0
        self._last_activity = time.monotonic()
        self._idle_limit = IDLE_EXIT
        self._ops: dict[str, Callable[..., Any]] = {
            "ping": os.getpid,
            "activate": self.activate,
            "deactivate": self.deactivate,
            "status": self.status,
            "thin_ids": lambda: sorted(self.pool.thin_ids()),
            "thin_status": self.thin_status,
            "volume_status": self.volume_status,
            "volume_device": self.volume_device,
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
            if self.volumes:
                return False
            if self.linger <= 0:
                self._shutdown()
                return True
            # Everything is committed: a server killed while it lingers loses nothing.
            with self._activity_lock:
                self._idle_limit = self.linger
                self._last_activity = time.monotonic()
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

    def volume_device(self, dev: int) -> str | None:
        active = self.volumes.get(dev)
        return None if active is None else active.block.device

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

    def request_termination(self) -> None:
        """SIGTERM's handler: only note it; the accepting thread acts (``_terminate``)."""
        self._terminate_requested = True

    def _terminate(self) -> None:
        """SIGTERM: commit at once, then stop as ``stop`` does, detaching the active volumes
        first, unless one is in use (a mounted file system, a device stacked on it): the
        I/O of its user would fail, so the server stays up and says why in its log. The
        catalog still has the volumes active: `thinmgr pool activate` brings them back, as
        after a reboot (``volumes.reactivate``)."""
        with self._mutex:
            self._messages_since_commit = True
            self.commit()
            busy = [v.name for v in self.volumes.values() if v.block.in_use()]
            if busy:
                log.warning(
                    "SIGTERM: staying up, volumes in use: %s (metadata committed; "
                    "deactivate them, or stop what uses them, and send SIGTERM again)",
                    ", ".join(busy),
                )
                return
            for dev_id in list(self.volumes):
                self.deactivate(dev_id)
            log.info("SIGTERM: volumes detached, stopping")
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
        try:
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
        finally:
            self._stopped.set()

    def _wait_stopped(self) -> None:
        """After the accept loop ended: wait for a ``_shutdown`` running on a control thread
        (`stop`, the last `deactivate`) to finish and its answer to go out. Control threads
        are daemons: returning from ``main`` while one still commits and closes the pool
        would cut that short and release the pool lock under it."""
        self._stopped.wait(SUSPEND_TIMEOUT)
        deadline = time.monotonic() + STOP_DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            with self._activity_lock:
                if not self._connections:
                    return
            time.sleep(0.005)

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
        log.info("serving pool %s on %s (linger %g s)", self.spec.name, path, self.linger)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if self._terminate_requested:
                    self._terminate_requested = False
                    try:
                        self._terminate()
                    except ThinmgrError as exc:
                        log.error("SIGTERM: cannot stop: %s", exc)
                    continue
                self._stop_when_idle()
                continue
            except OSError:
                break  # the listener was closed by _shutdown
            with self._activity_lock:
                self._connections += 1
                self._last_activity = time.monotonic()
            threading.Thread(target=self._handle, args=(conn,), name="control", daemon=True).start()
        self._wait_stopped()

    def _stop_when_idle(self) -> None:
        """Stop when no volume is active and no connection was open for ``_idle_limit``.

        Checked in the accepting thread, so no connection can be accepted meanwhile; one
        still waiting in the backlog sees its socket closed (ServerGone) and its client
        goes on without a server. An open connection (a held metadata snapshot, a
        suspension) keeps the server up whatever its age."""
        with self._mutex:
            with self._activity_lock:
                idle = time.monotonic() - self._last_activity
                quiet = not self._connections and idle > self._idle_limit
            if quiet and not self.volumes:
                self._shutdown()

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
            with self._activity_lock:
                self._connections -= 1
                self._last_activity = time.monotonic()

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
        server = PoolServer(spec, linger=linger_from_env())
    except ThinmgrError as exc:
        log.error("cannot start: %s", exc)
        return int(exc.exit_code)
    # SIGTERM (kill, systemd, a shutdown) stops the server cleanly when nothing uses its
    # volumes; the default action would leave dead FUSE mounts behind.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: server.request_termination())
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
