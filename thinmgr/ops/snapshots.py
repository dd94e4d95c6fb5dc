"""``thinmgr snapshot``: an O(1) snapshot, consistent even of a mounted, busy origin.

For an active origin the order is freeze (FIFREEZE: the filesystem flushes and blocks new
writes) -> suspend the thin device (in-flight I/O drains) -> create the snapshot -> resume
-> thaw (prior-art.md section 3, item 11, and section 6, item 7: resume and thaw always run,
in that order, also on error). Freezing is bounded in time: a freeze that does not finish
within ``FREEZE_TIMEOUT`` seconds fails the snapshot, and the filesystem is thawed as soon
as the freeze completes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from thinmgr.catalog.models import Device, DeviceKind, DeviceState, Pool
from thinmgr.errors import BusyError, ThinmgrError
from thinmgr.kernel.freeze import freeze_fd, hold_mount, open_directory, thaw_fd
from thinmgr.ops import journal
from thinmgr.ops.manager import Manager
from thinmgr.ops.naming import check_name
from thinmgr.ops.volumes import VolumeInfo, _usable, allocate, show_volume

FREEZE_TIMEOUT = 10.0


def _freeze_bounded(fd: int, what: str, timeout: float) -> None:
    """FIFREEZE of the file system of ``fd`` in a worker thread, waited for ``timeout`` s.

    The ioctl cannot be interrupted; when we stop waiting, the worker thaws the filesystem
    itself once its freeze returns, and then closes ``fd``, which it owns from then on (the
    thread is not a daemon, so the interpreter waits for it at exit and the thaw is never
    skipped). A freeze that fails closes ``fd`` too: it stays the caller's only once frozen.
    """
    guard = threading.Lock()
    done = threading.Event()
    abandoned = False
    failure: list[ThinmgrError] = []

    def work() -> None:
        try:
            freeze_fd(fd, what)
        except ThinmgrError as exc:
            failure.append(exc)
        with guard:
            if abandoned:
                if not failure:
                    with contextlib.suppress(ThinmgrError):
                        thaw_fd(fd, what)
                os.close(fd)
            done.set()

    threading.Thread(target=work, name="thinmgr-freeze").start()
    if not done.wait(timeout):
        with guard:
            if not done.is_set():
                abandoned = True
                raise BusyError(
                    f"freezing {what} took more than {timeout:g} s",
                    hint="The filesystem is flushing a lot of dirty data; try again, or "
                    "sync first.",
                )
    if failure:
        os.close(fd)
        raise failure[0]


@contextmanager
def frozen(
    mount_point: str | None, timeout: float = FREEZE_TIMEOUT, *, label: str | None = None
) -> Iterator[None]:
    """The filesystem at ``mount_point`` frozen while the context lasts (nothing if None);
    ``label`` names it in errors when the path says little (``/proc/self/fd/N``).

    One descriptor serves freeze and thaw: the thaw must not depend on the path still
    resolving (``/proc/PID/root`` of a process that may exit meanwhile).
    """
    if mount_point is None:
        yield
        return
    what = label or mount_point
    fd = open_directory(mount_point)
    _freeze_bounded(fd, what, timeout)
    try:
        yield
    finally:
        try:
            thaw_fd(fd, what)
        finally:
            os.close(fd)


@contextmanager
def frozen_device(device: str | os.PathLike[str] | None) -> Iterator[None]:
    """The file system on block device ``device`` frozen while the context lasts, wherever
    it is mounted: here, or only in another mount namespace (a container's root). Nothing
    is done for None or a device mounted nowhere."""
    held = None if device is None else hold_mount(device)
    if held is None:
        yield
        return
    with held, frozen(held.path, label=held.origin):
        yield


def create_snapshot(
    mgr: Manager, pool_name: str, origin: str, name: str, *, read_only: bool = False
) -> VolumeInfo:
    check_name("volume", name)
    with mgr.writing(pool_name) as h:
        with mgr.catalog.read() as session:
            source = _usable(session, session.get_one(Pool, h.id), origin)
            origin_row, origin_dev, size = source.id, source.thin_id, source.virtual_size_bytes
        active_device = h.engine.volume_device(h.spec, origin_dev)

        def prepare(session: Session, pool: Pool) -> dict[str, Any]:
            dev_id = allocate(session, pool, name)
            device = Device(
                pool_id=pool.id,
                thin_id=dev_id,
                name=name,
                kind=DeviceKind.SNAPSHOT,
                origin_id=origin_row,
                virtual_size_bytes=size,
                read_only=read_only,
                state=DeviceState.CREATING,
            )
            session.add(device)
            session.flush()
            return {"dev_id": dev_id, "device": device.id, "origin_dev_id": origin_dev}

        def apply(payload: dict[str, Any]) -> None:
            dev_id = int(payload["dev_id"])
            if active_device is None:
                h.engine.create_snapshot(h.spec, dev_id, origin_dev)
                return
            with frozen_device(active_device), h.engine.suspended(h.spec, origin_dev):
                h.engine.create_snapshot(h.spec, dev_id, origin_dev)

        journal.execute(mgr, h, journal.CREATE_SNAPSHOT, prepare, apply)
    return show_volume(mgr, pool_name, name, engine=False)
