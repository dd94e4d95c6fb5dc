"""``UserEngine``: the ``Engine`` protocol served by thinmgr itself, without device-mapper.

Who touches a pool (``spec.run_dir`` holds the rendezvous):

- while any of its volumes is active, its **server process** (server.py) does, alone: every
  operation goes to it over ``RUN_DIR/server.sock``;
- otherwise the calling process opens the ``UserPool`` itself, under the exclusive flock on
  ``RUN_DIR/pool.lock`` that the server holds for its whole life, so the two never overlap.

``activate_volume`` starts the server when needed; it stops by itself a few seconds
(``THINMGR_SERVER_LINGER``) after its last volume is deactivated, at once on
``deactivate_pool`` or ``stop_idle_server``. A killed server leaves dead FUSE mounts and
stale links and sockets behind; ``cleanup_stale`` (called by ``activate_pool``/
``activate_volume`` and by `doctor`) removes them, and the pool reopens at its last commit.

Decisions (docs/architecture.md, "User engine"):

- ``deactivate_volume(force=True)`` still refuses a mounted (claimed) device: detaching under a
  file system would fail its unwritten data, and a lazy detach would leave the pool open in
  a process nobody can reach. ``force`` only skips the check for processes holding the device
  open without a claim (their later I/O fails, nothing committed is lost).
- ``metadata_view`` with a server running reserves a metadata snapshot, commits and yields
  ``snap=True`` (the held root is stable however long the view is used: blocks of the live
  tree are reused after the next commit, about a second later); it is released on exit.
  Without a server it holds the pool lock for the view's duration and yields the committed
  live tree (``snap=False``), which nothing can change meanwhile.
- ``NoSpacePolicy.QUEUE`` is not supported: writes fail with ENOSPC at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from thinmgr.engine.base import MetadataView, PoolSpec, PoolStatus, VolumeStatus
from thinmgr.engine.user import client, protocol
from thinmgr.engine.user.runstate import (
    LINGER_ENV,
    LOG_NAME,
    PID_NAME,
    VOLUME_DIR,
    PoolLock,
    user_pool_class,
)
from thinmgr.errors import (
    BusyError,
    InternalError,
    IOFailure,
    NotFoundError,
    ThinmgrError,
    UnsupportedError,
    UsageError,
)
from thinmgr.format.constants import MAX_DEV_ID
from thinmgr.kernel import loop
from thinmgr.kernel.mount import MNT_DETACH, mount_points, umount

T = TypeVar("T")

DEV_ROOT = Path("/dev/thinmgr")
LOCK_TIMEOUT = 15.0  # waiting for a server that is starting or stopping, or another command
START_TIMEOUT = 15.0


class UserEngine:
    """The user engine; one instance serves any number of pools."""

    name = "user"

    def __init__(
        self,
        *,
        dev_root: Path = DEV_ROOT,
        python: str = sys.executable,
        linger: float | None = None,
    ) -> None:
        self.dev_root = dev_root  # stable links: DEV_ROOT/POOL/VOLUME
        self._python = python
        # Seconds the servers this engine starts stay up after their last volume went;
        # None: THINMGR_SERVER_LINGER as the server finds it in its environment.
        self._linger = linger

    # --- pools -------------------------------------------------------------------------

    def format_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        with self._exclusive(spec):
            _ensure_data_size(spec, nr_data_blocks)
            pool = user_pool_class().create(
                spec.metadata, spec.data, data_block_sectors=spec.data_block_sectors
            )
            pool.close()

    def activate_pool(self, spec: PoolSpec) -> None:
        """Nothing to start (the server comes with the first volume); clears crash leftovers."""
        if not self._server_running(spec):
            self.cleanup_stale(spec)

    def deactivate_pool(self, spec: PoolSpec) -> None:
        with contextlib.suppress(client.ServerGone):
            client.call(spec.run_dir, "stop")  # BusyError while volumes are active
            self._wait_server_gone(spec)

    def stop_idle_server(self, spec: PoolSpec) -> bool:
        """Stop the pool's server now if it only lingers (no volume active); True if it did.

        For `doctor --fix`: afterwards the pool's files are free, as they are once a
        lingering server times out (server.py, ``THINMGR_SERVER_LINGER``)."""
        try:
            client.call(spec.run_dir, "stop")
        except (client.ServerGone, BusyError):
            return False  # no server, or one that serves active volumes
        self._wait_server_gone(spec)
        return True

    def pool_status(self, spec: PoolSpec) -> PoolStatus:
        def remote(conn: client.Connection) -> PoolStatus:
            return protocol.pool_status_from_dict(conn.request("status"))

        def local(pool: Any) -> PoolStatus:
            status: PoolStatus = pool.status()
            return dataclasses.replace(status, active=False)

        return self._route(spec, remote, local)

    def extend_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        self._message(spec, "extend", "extend_data", nr_data_blocks)

    # --- thin devices ------------------------------------------------------------------

    def create_thin(self, spec: PoolSpec, dev_id: int) -> None:
        _check_dev_id(dev_id)
        self._message(spec, "create_thin", "create_thin", dev_id)

    def create_snapshot(self, spec: PoolSpec, dev_id: int, origin_id: int) -> None:
        _check_dev_id(dev_id)
        self._message(spec, "create_snap", "create_snap", dev_id, origin_id)

    def delete_thin(self, spec: PoolSpec, dev_id: int) -> None:
        self._message(spec, "delete", "delete", dev_id)

    def set_transaction_id(self, spec: PoolSpec, current: int, new: int) -> None:
        self._message(spec, "set_transaction_id", "set_transaction_id", current, new)

    def thin_ids(self, spec: PoolSpec) -> set[int]:
        return self._route(
            spec,
            lambda conn: {int(dev) for dev in conn.request("thin_ids")},
            lambda pool: set(pool.thin_ids()),
        )

    # --- volumes -----------------------------------------------------------------------

    def activate_volume(
        self, spec: PoolSpec, dev_id: int, *, name: str, size_bytes: int, read_only: bool
    ) -> Path:
        if size_bytes <= 0 or size_bytes % 4096:
            raise UsageError(
                f"volume size {size_bytes} is not a positive multiple of 4096 bytes",
                hint="Give the size in whole 4 KiB blocks.",
            )
        _check_name(name)
        link = self.link_path(spec, name)
        for _attempt in range(3):  # a server may stop between our connect and our request
            self._ensure_server(spec)
            try:
                result = client.call(
                    spec.run_dir,
                    "activate",
                    dev_id=dev_id,
                    name=name,
                    size_bytes=size_bytes,
                    read_only=read_only,
                    link=str(link),
                )
            except client.ServerGone:
                continue
            except BusyError as exc:
                if "stopping" not in exc.message:
                    raise
                self._wait_server_gone(spec)
                continue
            return Path(result)
        raise BusyError(f"could not reach a server for pool {spec.name}", hint="Try again.")

    def deactivate_volume(self, spec: PoolSpec, dev_id: int, *, force: bool = False) -> None:
        try:
            stopping = client.call(spec.run_dir, "deactivate", dev_id=dev_id, force=force)
        except client.ServerGone:
            return  # no server: nothing of the pool is active
        if stopping:
            self._wait_server_gone(spec)

    def resize_volume(self, spec: PoolSpec, dev_id: int, *, size_bytes: int) -> None:
        # Growing a live volume needs the FUSE file's size changed under the loop device
        # (FUSE_NOTIFY_INVAL_INODE) and then LOOP_SET_CAPACITY; the server does not do that.
        raise UnsupportedError(
            f"thin device {dev_id} of pool {spec.name} is active: the user engine cannot "
            "grow the block device of an active volume",
            hint="Deactivate the volume, resize it, and activate it again (an inactive "
            "volume takes the new size at its next activation).",
        )

    def volume_status(self, spec: PoolSpec, dev_id: int) -> VolumeStatus:
        def local(pool: Any) -> VolumeStatus:
            from thinmgr.engine.user.server import _thin_counts

            mapped, highest = _thin_counts(pool.thin_status(dev_id))
            return VolumeStatus(dev_id, mapped, highest, False, None, 0)

        return self._route(
            spec,
            lambda conn: protocol.volume_status_from_dict(
                conn.request("volume_status", dev=dev_id)
            ),
            local,
        )

    def volume_device(self, spec: PoolSpec, dev_id: int) -> Path | None:
        try:
            with client.Connection(client.socket_path(spec.run_dir)) as conn:
                try:
                    device = conn.request("volume_device", dev=dev_id)
                except InternalError:
                    # A server started by an older thinmgr does not know the request.
                    device = conn.request("volume_status", dev=dev_id)["device"]
        except client.ServerGone:
            return None  # no server: nothing of the pool is active
        return None if device is None else Path(device)

    @contextlib.contextmanager
    def suspended(self, spec: PoolSpec, dev_id: int) -> Iterator[None]:
        """Held for as long as this connection says so: if we die, the server resumes."""
        try:
            conn = client.Connection(client.socket_path(spec.run_dir))
        except client.ServerGone as exc:
            raise NotFoundError(
                f"thin device {dev_id} of pool {spec.name} is not active: nothing to suspend"
            ) from exc
        with conn:
            conn.request("suspend", dev_id=dev_id)
            try:
                yield
            finally:
                with contextlib.suppress(client.ServerGone):
                    conn.request("resume", dev_id=dev_id)

    # --- metadata --------------------------------------------------------------------------

    def release_metadata_snapshot(self, spec: PoolSpec) -> None:
        """Release a held metadata snapshot (a reader killed inside ``metadata_view``)."""

        def remote(conn: client.Connection) -> None:
            status = protocol.pool_status_from_dict(conn.request("status"))
            if status.held_metadata_root is not None:
                conn.request("release_metadata_snap")
                conn.request("commit")

        def local(pool: Any) -> None:
            if pool.status().held_metadata_root is not None:
                pool.release_metadata_snap()

        self._route(spec, remote, local)

    @contextlib.contextmanager
    def metadata_view(self, spec: PoolSpec) -> Iterator[MetadataView]:
        from thinmgr.ops.sources import MetadataFile

        conn: client.Connection | None = None
        with contextlib.suppress(client.ServerGone):
            conn = client.Connection(client.socket_path(spec.run_dir))
        if conn is not None:
            with conn:
                conn.request("reserve_metadata_snap")
                try:
                    conn.request("commit")
                    with MetadataFile(str(spec.metadata)) as source:
                        yield MetadataView(source=source, snap=True)
                finally:
                    conn.request("release_metadata_snap")
                    conn.request("commit")
            return
        with self._exclusive(spec), MetadataFile(str(spec.metadata)) as source:
            yield MetadataView(source=source, snap=False)

    # --- crash leftovers -------------------------------------------------------------------

    def cleanup_stale(self, spec: PoolSpec) -> list[str]:
        """Remove what a killed server left: dead FUSE mounts, loop devices over them,
        stale socket, pid, links.

        Does nothing (returns []) while a live server owns the pool. Returns what it did.
        """
        return self.find_stale(spec, fix=True)

    def find_stale(self, spec: PoolSpec, *, fix: bool) -> list[str]:
        """What a killed server left behind; with ``fix``, remove it (``doctor``)."""
        lock = PoolLock(spec.run_dir)
        if not lock.try_acquire():
            return []  # a live server (or another command) owns the pool
        try:
            return self._cleanup_locked(spec, fix=fix)
        finally:
            lock.release()

    def _cleanup_locked(self, spec: PoolSpec, *, fix: bool = True) -> list[str]:
        done: list[str] = []
        volume_root = os.path.realpath(spec.run_dir / VOLUME_DIR) + os.sep
        # Loop devices are bound with autoclear, so one survives its server only while
        # something (a mount) still holds it: detaching marks it to go with its last user.
        for device, backing in loop.bound_devices():
            if backing.startswith(volume_root):
                done.append(f"leaked loop device {device} over {backing} (its server is gone)")
                if fix:
                    with contextlib.suppress(ThinmgrError):
                        fd = loop.open_device(device)
                        try:
                            loop.detach(fd, device)
                        finally:
                            os.close(fd)
        if not fix:
            for point, fstype in mount_points():
                if point.startswith(volume_root) and fstype.startswith("fuse"):
                    done.append(f"dead FUSE mount {point}")
            return done
        for point, fstype in mount_points():
            if point.startswith(volume_root) and fstype.startswith("fuse"):
                with contextlib.suppress(ThinmgrError):
                    umount(point, MNT_DETACH)  # dead (ENOTCONN): a lazy unmount is all there is
                    done.append(f"unmounted dead FUSE mount {point}")
        for name in (client.SOCKET_NAME, PID_NAME):
            path = spec.run_dir / name
            if path.exists() or path.is_symlink():
                path.unlink()
                done.append(f"removed stale {path}")
        links = self.dev_root / spec.name
        if links.is_dir():
            for link in links.iterdir():
                if link.is_symlink() and not _bound_to_pool(link, spec):
                    link.unlink()
                    done.append(f"removed stale link {link}")
        with contextlib.suppress(OSError):
            for directory in (spec.run_dir / VOLUME_DIR).glob("*/fuse"):
                directory.rmdir()
                directory.parent.rmdir()
        return done

    # --- helpers ---------------------------------------------------------------------------

    def link_path(self, spec: PoolSpec, name: str) -> Path:
        return self.dev_root / spec.name / name

    def _server_running(self, spec: PoolSpec) -> bool:
        try:
            client.call(spec.run_dir, "ping")
        except client.ServerGone:
            return False
        return True

    def _route(
        self,
        spec: PoolSpec,
        remote: Callable[[client.Connection], T],
        local: Callable[[Any], T],
    ) -> T:
        """Run an operation on the server if one runs, else in-process under the pool lock."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                with client.Connection(client.socket_path(spec.run_dir)) as conn:
                    return remote(conn)
            except client.ServerGone:
                pass
            lock = PoolLock(spec.run_dir)
            if lock.try_acquire():
                try:
                    return self._with_pool(spec, local)
                finally:
                    lock.release()
            if time.monotonic() > deadline:
                raise BusyError(
                    f"pool {spec.name} is locked by another thinmgr process",
                    hint="A server is starting or stopping, or another command runs; try again.",
                )
            time.sleep(0.05)

    @staticmethod
    def _with_pool(spec: PoolSpec, action: Callable[[Any], T]) -> T:
        pool = user_pool_class().open(spec.metadata, spec.data)
        try:
            result = action(pool)
            pool.commit()
            return result
        finally:
            pool.close()

    def _message(self, spec: PoolSpec, op: str, method: str, *args: int) -> None:
        names = {
            "extend": ("nr_data_blocks",),
            "create_thin": ("dev",),
            "create_snap": ("dev", "origin"),
            "delete": ("dev",),
            "set_transaction_id": ("current", "new"),
        }[op]

        def remote(conn: client.Connection) -> None:
            conn.request(op, **dict(zip(names, args, strict=True)))
            conn.request("commit")  # messages are durable when they return, as in the kernel

        def local(pool: Any) -> None:
            getattr(pool, method)(*args)

        self._route(spec, remote, local)

    @contextlib.contextmanager
    def _exclusive(self, spec: PoolSpec) -> Iterator[None]:
        lock = PoolLock(spec.run_dir)
        if self._server_running(spec) or not lock.try_acquire():
            raise BusyError(
                f"pool {spec.name} is in use by its server or another thinmgr process",
                hint="Deactivate its volumes first.",
            )
        try:
            yield
        finally:
            lock.release()

    def _ensure_server(self, spec: PoolSpec) -> None:
        if self._server_running(spec):
            return
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        self.cleanup_stale(spec)
        log_path = spec.run_dir / LOG_NAME
        argv = [
            self._python,
            "-m",
            "thinmgr.engine.user.server",
            "--spec",
            json.dumps(protocol.spec_to_dict(spec)),
        ]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # detached: survives this command and its terminal
                close_fds=True,
                env=_server_env(self._linger),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server_running(spec):
            code = process.poll()
            if code is not None:
                if code == 0 or _lock_busy_exit(code):
                    return  # another command's server won the race; activate goes there
                raise IOFailure(
                    f"the server for pool {spec.name} failed to start (exit {code}): "
                    f"{_log_tail(log_path)}",
                    hint=f"See {log_path}.",
                )
            if time.monotonic() > deadline:
                raise IOFailure(
                    f"the server for pool {spec.name} did not start within {START_TIMEOUT:.0f} s",
                    hint=f"See {log_path}.",
                )
            time.sleep(0.02)

    def _wait_server_gone(self, spec: PoolSpec) -> None:
        """Wait until the server process has let go of the pool lock (it has exited)."""
        lock = PoolLock(spec.run_dir)
        lock.acquire(LOCK_TIMEOUT)
        lock.release()


def _check_dev_id(dev_id: int) -> None:
    if not 0 <= dev_id <= MAX_DEV_ID:
        raise UsageError(f"thin device id {dev_id} is outside 0..{MAX_DEV_ID} (24 bits)")


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"volume name {name!r} cannot be used as a device link name")


def _ensure_data_size(spec: PoolSpec, nr_data_blocks: int) -> None:
    """A regular data file is grown (sparsely) to hold ``nr_data_blocks``; devices are as is."""
    wanted = nr_data_blocks * spec.data_block_sectors * 512
    if spec.data.is_file() and spec.data.stat().st_size < wanted:
        os.truncate(spec.data, wanted)


def _bound_to_pool(link: Path, spec: PoolSpec) -> bool:
    """True while ``link`` points at a loop device still bound to a file of this pool."""
    target = os.readlink(link)
    if not target.startswith("/dev/loop"):
        return True  # not ours to judge
    try:
        backing = loop.status(target).backing_file
    except ThinmgrError:
        return False
    # LOOP_GET_STATUS64 gives at most 63 bytes of the name: a long path comes truncated
    run_dir = os.path.realpath(spec.run_dir)
    return bool(backing) and (backing.startswith(run_dir) or run_dir.startswith(backing))


def _lock_busy_exit(code: int) -> bool:
    from thinmgr.errors import ExitCode

    return code == ExitCode.BUSY


def _server_env(linger: float | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if linger is not None:
        env[LINGER_ENV] = repr(float(linger))
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
