"""Write-ahead steps and the two-phase transaction id: the catalog never drifts from the pool.

Every step that changes the pool metadata (create a thin device or a snapshot, delete one)
runs in three phases (ARCHITECTURE.md, "Catalog"; prior-art.md section 6, item 1, as LVM and
Docker's devicemapper driver do it):

1. write ahead -- one catalog transaction allocates what the step needs (a device id, a row),
   records the step as ``pending`` and sets the pool's ``pending_transaction_id = tid + 1``;
2. the engine step, followed by ``set_transaction_id(tid, tid + 1)`` (a compare-and-swap, so
   the pool's id moves only after the change it vouches for, and only from the id we own);
3. confirm -- one catalog transaction moves ``transaction_id`` to ``tid + 1``, clears the
   pending id and applies the step's effect on the catalog rows.

A crash anywhere leaves a ``pending`` step. The next command on the pool (or ``doctor``)
asks the engine what really happened: pool id ``tid + 1`` -> the step is done, confirm it;
pool id ``tid`` -> look at the device ids the pool holds: the change happened (send the id and
confirm) or it did not (roll the catalog back; the allocated device id stays burned, never
reused). Any other pool id means another tool changed the pool: that is reported as
CatalogDriftError (exit 8) and nothing is touched.

Removals that find the volume busy are retried, then deferred: the device row is marked
``deleting`` with a pending ``deferred_remove`` step, and the next command or ``doctor``
finishes it. A removal is never half done: the row goes only with the device.

Test-only crash points: with ``THINMGR_TEST_CRASH_AT=KIND:POINT`` in the environment (KIND a
step kind such as ``create_thin``, POINT one of ``CRASH_POINTS``) the process kills itself
with SIGKILL at that point, so the root-tier crash tests can stop a command between any two
phases. It is not a user setting; nothing sets it outside the tests.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.models import (
    Device,
    DeviceState,
    Pool,
    PoolState,
    Step,
    StepState,
    utc_now,
)
from thinmgr.engine.base import PoolStatus
from thinmgr.errors import BusyError, CatalogDriftError, ConflictError, ThinmgrError
from thinmgr.ops.manager import Manager, PoolHandle

CREATE_THIN = "create_thin"
CREATE_SNAPSHOT = "create_snapshot"
DELETE_THIN = "delete_thin"
DEFERRED_REMOVE = "deferred_remove"
_CREATES = (CREATE_THIN, CREATE_SNAPSHOT)

# Busy device: retry deactivation this many times with these pauses (seconds) before
# deferring. Every manager ended up with bounded EBUSY retries (prior-art.md section 3, item 2).
BUSY_RETRY_DELAYS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)

CRASH_ENV = "THINMGR_TEST_CRASH_AT"
# Where a crash test may stop a step: after the write-ahead, after the engine step, after the
# pool's transaction id moved (before the catalog's did), and (removals) after the row was
# marked deleting and the volume deactivated.
CRASH_POINTS = ("written-ahead", "engine-done", "advanced", "marked")

Prepare = Callable[[Session, Pool], dict[str, Any]]
Apply = Callable[[dict[str, Any]], None]  # gets the payload `Prepare` made


def crash_point(kind: str, point: str) -> None:
    """Test-only: SIGKILL ourselves here when ``THINMGR_TEST_CRASH_AT`` names this point."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted is not None and wanted == f"{kind}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def drift_error(name: str, catalog_tid: int, pending: int | None, pool_tid: int) -> ThinmgrError:
    expected = f"{catalog_tid}" if pending is None else f"{catalog_tid} or {pending}"
    return CatalogDriftError(
        f"pool {name!r}: its transaction id is {pool_tid} but the catalog expects {expected}; "
        "another tool changed the pool",
        hint="thinmgr does not overwrite a pool another manager (lvm, a second thinmgr home, "
        "thin_restore) changed. Compare with `thinmgr pool dump` and `thinmgr doctor`; "
        "`thinmgr doctor --fix --adopt` accepts the pool's id when you are sure.",
    )


def ensure_active(mgr: Manager, h: PoolHandle) -> PoolStatus:
    """Serve the pool (idempotent) and record that in the catalog."""
    with mgr.catalog.read() as session:
        if session.get_one(Pool, h.id).state is PoolState.DELETING:
            raise ConflictError(
                f"pool {h.name!r} is being destroyed",
                hint=f"Finish it with `thinmgr pool destroy {h.name} --force`.",
            )
    status = h.engine.pool_status(h.spec)
    if not status.active:
        h.engine.activate_pool(h.spec)
        status = h.engine.pool_status(h.spec)
    with mgr.catalog.write() as session:
        pool = session.get_one(Pool, h.id)
        if pool.state is not PoolState.ACTIVE:
            pool.state = PoolState.ACTIVE
    return status


def execute(
    mgr: Manager, h: PoolHandle, kind: str, prepare: Prepare, apply: Apply
) -> dict[str, Any]:
    """Run one metadata-changing step in the three phases; returns the step's payload."""
    with mgr.catalog.write() as session:
        pool = session.get_one(Pool, h.id)
        if pool.pending_transaction_id is not None:
            # `Manager.writing` settles pending steps first; under the lock none can appear.
            raise ConflictError(f"pool {h.name!r} has an unfinished step; run `thinmgr doctor`")
        payload = prepare(session, pool)
        tid = pool.transaction_id
        pool.pending_transaction_id = tid + 1
        step = Step(pool_id=pool.id, kind=kind, payload=payload, transaction_id=tid + 1)
        session.add(step)
        session.flush()
        step_id = step.id
    crash_point(kind, "written-ahead")
    try:
        apply(payload)
    except ThinmgrError:
        # The engine said no; ask it whether the change happened anyway, and settle.
        if settle(mgr, h) == "confirmed":
            return payload
        raise
    crash_point(kind, "engine-done")
    _advance(h, tid)
    crash_point(kind, "advanced")
    with mgr.catalog.write() as session:
        _confirm(session, session.get_one(Step, step_id))
    return payload


def _advance(h: PoolHandle, tid: int) -> None:
    try:
        h.engine.set_transaction_id(h.spec, tid, tid + 1)
    except ConflictError:
        pool_tid = h.engine.pool_status(h.spec).transaction_id
        raise drift_error(h.name, tid, tid + 1, pool_tid) from None


def recover(mgr: Manager, h: PoolHandle, status: PoolStatus | None = None) -> list[str]:
    """Finish or roll back the step a crash left pending; report what was done."""
    outcome = settle(mgr, h, status)
    return [] if outcome is None else [outcome]


def settle(mgr: Manager, h: PoolHandle, status: PoolStatus | None = None) -> str | None:
    """Bring catalog and pool into agreement about the pending step, if there is one.

    Returns None (nothing pending), "confirmed" or "rolled back"; CatalogDriftError when the
    pool's transaction id is neither ours nor our pending one.
    """
    pool_tid = (status or h.engine.pool_status(h.spec)).transaction_id
    with mgr.catalog.read() as session:
        pool = session.get_one(Pool, h.id)
        ours, pending = pool.transaction_id, pool.pending_transaction_id
        step = session.scalars(
            select(Step).where(
                Step.pool_id == h.id,
                Step.state == StepState.PENDING,
                Step.transaction_id == pending,
            )
        ).first()
    if pending is None:
        if pool_tid != ours:
            raise drift_error(h.name, ours, None, pool_tid)
        return None
    if pool_tid not in (ours, pending):
        raise drift_error(h.name, ours, pending, pool_tid)
    if step is None:
        # A pending id without its step cannot be written by this code (one transaction
        # writes both); clear it if the pool did not move, else leave it for a person.
        if pool_tid != ours:
            raise drift_error(h.name, ours, None, pool_tid)
        with mgr.catalog.write() as session:
            session.get_one(Pool, h.id).pending_transaction_id = None
        return "rolled back"
    if pool_tid == pending or _happened(h, step):
        if pool_tid == ours:
            _advance(h, ours)
        with mgr.catalog.write() as session:
            _confirm(session, session.get_one(Step, step.id))
        return "confirmed"
    with mgr.catalog.write() as session:
        _abandon(session, session.get_one(Step, step.id), "the engine step did not happen")
    return "rolled back"


def _happened(h: PoolHandle, step: Step) -> bool:
    """Whether the engine carried out ``step`` (pool id not yet moved); finish a delete."""
    dev_id = int(step.payload["dev_id"])
    present = dev_id in h.engine.thin_ids(h.spec)
    if step.kind in _CREATES:
        return present
    if not present:
        return True
    # A delete that did not happen yet: the user asked for it, so try it now.
    try:
        h.engine.delete_thin(h.spec, dev_id)
    except ThinmgrError:
        return False
    return True


def _confirm(session: Session, step: Step) -> None:
    pool = step.pool
    assert step.transaction_id is not None
    pool.transaction_id = step.transaction_id
    pool.pending_transaction_id = None
    step.state = StepState.DONE
    step.finished_at = utc_now()
    device = _step_device(session, step)
    if device is None:
        return
    if step.kind in _CREATES:
        device.state = DeviceState.INACTIVE
    elif step.kind == DELETE_THIN:
        for deferred in _deferred_steps(session, device.id):
            deferred.state = StepState.DONE
            deferred.finished_at = utc_now()
        session.delete(device)


def _abandon(session: Session, step: Step, reason: str) -> None:
    step.pool.pending_transaction_id = None
    step.state = StepState.FAILED
    step.error = reason
    step.finished_at = utc_now()
    device = _step_device(session, step)
    if device is not None and step.kind in _CREATES:
        session.delete(device)
    # A delete that could not be done leaves its row `deleting`: a deferred removal.


def _step_device(session: Session, step: Step) -> Device | None:
    row = step.payload.get("device")
    return None if row is None else session.get(Device, int(row))


def _deferred_steps(session: Session, device_row: int) -> list[Step]:
    steps = session.scalars(
        select(Step).where(Step.kind == DEFERRED_REMOVE, Step.state == StepState.PENDING)
    ).all()
    return [s for s in steps if s.payload.get("device") == device_row]


# --- removal -----------------------------------------------------------------------------


def deactivate_with_retries(h: PoolHandle, dev_id: int, *, force: bool, retry: bool = True) -> None:
    """Deactivate a volume, retrying a transient EBUSY a bounded number of times."""
    for delay in (*(BUSY_RETRY_DELAYS if retry else ()), None):
        try:
            h.engine.deactivate_volume(h.spec, dev_id, force=force)
            return
        except BusyError:
            if delay is None:
                raise
            time.sleep(delay)


def remove_device(
    mgr: Manager, h: PoolHandle, device_row: int, *, force: bool, retry: bool = True
) -> bool:
    """Deactivate (if needed) and delete a device and its row. False: busy, deferred."""
    with mgr.catalog.write() as session:
        device = session.get_one(Device, device_row)
        dev_id, name = device.thin_id, device.name
        device.state = DeviceState.DELETING
    if h.engine.volume_device(h.spec, dev_id) is not None:
        try:
            deactivate_with_retries(h, dev_id, force=force, retry=retry)
        except BusyError as exc:
            with mgr.catalog.write() as session:
                if not _deferred_steps(session, device_row):
                    session.add(
                        Step(
                            pool_id=h.id,
                            kind=DEFERRED_REMOVE,
                            payload={"device": device_row, "dev_id": dev_id, "force": force},
                            error=str(exc),
                        )
                    )
            return False
    crash_point(DELETE_THIN, "marked")

    def prepare(session: Session, pool: Pool) -> dict[str, Any]:
        return {"device": device_row, "dev_id": dev_id, "name": name}

    execute(mgr, h, DELETE_THIN, prepare, lambda _: h.engine.delete_thin(h.spec, dev_id))
    return True


def finish_deferred(mgr: Manager, h: PoolHandle) -> list[str]:
    """Try again the removals that found their device busy; report what was finished."""
    with mgr.catalog.read() as session:
        rows = session.execute(
            select(Device.id, Device.name).where(
                Device.pool_id == h.id, Device.state == DeviceState.DELETING
            )
        ).all()
        forced = {
            row: any(s.payload.get("force") for s in _deferred_steps(session, row))
            for row, _ in rows
        }
    done = []
    for row, name in rows:
        try:
            if remove_device(mgr, h, row, force=forced[row], retry=False):
                done.append(f"finished the deferred removal of {name!r}")
        except BusyError:
            continue
    return done
