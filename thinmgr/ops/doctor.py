"""``thinmgr doctor``: compare the catalog with each pool, report, and (``--fix``) repair.

What is compared (prior-art.md section 6, item 2): the pool's transaction id with the
catalog's, steps left pending by a crash, the thin device ids the pool holds with the
catalog's rows, a metadata snapshot left held, the volumes the catalog has active with what
the engine serves, removals deferred while busy, and pool directories left by a ``pool
create`` that crashed before recording the pool.

What ``--fix`` repairs: pending steps are finished or rolled back (``journal.settle``),
orphaned thin devices (in the pool, not in the catalog) are deleted, rows whose device is
gone are removed, a held metadata snapshot is released, volume states follow the engine,
deferred removals are retried, leftover directories are removed, and a pool left half
destroyed is finished. A pool whose transaction id another tool changed is only reported
(``--adopt`` accepts its id into the catalog, for when you know what happened).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from thinmgr.catalog.models import Container, Device, DeviceState, Layer, Pool, PoolState
from thinmgr.errors import ThinmgrError
from thinmgr.ops import journal
from thinmgr.ops.manager import Manager, PoolHandle
from thinmgr.ops.pools import POOL_MARKER, destroy_pool, remove_leftover


@dataclass
class Finding:
    pool: str | None
    kind: str
    detail: str
    fixable: bool = True
    fixed: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def doctor(mgr: Manager, *, fix: bool = False, adopt: bool = False) -> list[Finding]:
    with mgr.catalog.read() as session:
        pools = [(p.name, p.state) for p in session.scalars(select(Pool).order_by(Pool.name))]
    findings: list[Finding] = []
    for name, state in pools:
        if state is PoolState.DELETING:
            findings.append(_finish_destroy(mgr, name, fix))
            continue
        with mgr.locked(name):
            findings.extend(_check_pool(mgr, mgr.find(name), fix=fix, adopt=adopt))
    findings.extend(_leftovers(mgr, {n for n, _ in pools}, fix))
    return findings


def _attempt(finding: Finding, fix: bool, action: Any) -> Finding:
    if fix and finding.fixable:
        try:
            action()
            finding.fixed = True
        except ThinmgrError as exc:
            finding.error = str(exc)
    return finding


def _finish_destroy(mgr: Manager, name: str, fix: bool) -> Finding:
    finding = Finding(name, "pool-half-destroyed", f"pool {name!r} was being destroyed")
    return _attempt(finding, fix, lambda: destroy_pool(mgr, name, force=True))


def _check_pool(mgr: Manager, h: PoolHandle, *, fix: bool, adopt: bool) -> list[Finding]:
    out: list[Finding] = []
    try:
        status = h.engine.pool_status(h.spec)
    except ThinmgrError as exc:
        return [
            Finding(h.name, "pool-unreachable", f"the engine cannot read the pool: {exc}", False)
        ]
    with mgr.catalog.read() as session:
        pool = session.get_one(Pool, h.id)
        ours, pending = pool.transaction_id, pool.pending_transaction_id
    drifted = status.transaction_id not in (ours, pending)
    if drifted:
        finding = Finding(
            h.name,
            "transaction-id-drift",
            f"the pool's transaction id is {status.transaction_id}, the catalog expects "
            f"{ours}: another tool changed the pool",
            fixable=adopt,
        )
        out.append(_attempt(finding, fix, lambda: _adopt(mgr, h, status.transaction_id)))
        if not finding.fixed:
            return out + _compare(mgr, h, status.held_metadata_root, fix=False)
    elif pending is not None:
        finding = Finding(h.name, "pending-step", f"a step to transaction {pending} is unfinished")
        out.append(_attempt(finding, fix, lambda: journal.settle(mgr, h)))
    out.extend(_stale_state(h, fix=fix))
    if fix:
        try:
            journal.ensure_active(mgr, h)
        except ThinmgrError as exc:
            out.append(Finding(h.name, "pool-inactive", f"cannot serve the pool: {exc}", False))
            return out
    return out + _compare(mgr, h, status.held_metadata_root, fix=fix)


def _stale_state(h: PoolHandle, *, fix: bool) -> list[Finding]:
    """Run-time leftovers of a killed server: leaked loop devices, dead FUSE mounts, links.

    With ``fix``, a user-engine server that only lingers after its last volume went is
    stopped first (not a finding: it would stop by itself within seconds), so that the
    pool's files are free when `doctor --fix` returns, and so that the leftovers of an
    earlier, killed server are looked for under the pool lock the lingering one held."""
    stop_idle = getattr(h.engine, "stop_idle_server", None)
    if fix and callable(stop_idle):
        stop_idle(h.spec)
    return [
        Finding(h.name, "stale-runtime-state", what, fixable=True, fixed=fix)
        for what in h.engine.find_stale(h.spec, fix=fix)
    ]


def _adopt(mgr: Manager, h: PoolHandle, tid: int) -> None:
    with mgr.catalog.write() as session:
        pool = session.get_one(Pool, h.id)
        pool.transaction_id = tid
        pool.pending_transaction_id = None
        for step in pool.steps:
            if step.state.value == "pending" and step.transaction_id is not None:
                journal._abandon(session, step, "abandoned: the pool's transaction id was adopted")


def _compare(mgr: Manager, h: PoolHandle, held: int | None, *, fix: bool) -> list[Finding]:
    out: list[Finding] = []
    if held is not None:
        finding = Finding(
            h.name, "held-metadata-snapshot", f"a metadata snapshot is held at block {held}"
        )
        out.append(_attempt(finding, fix, lambda: h.engine.release_metadata_snapshot(h.spec)))
    ids = h.engine.thin_ids(h.spec)
    with mgr.catalog.read() as session:
        rows = session.execute(
            select(Device.id, Device.name, Device.thin_id, Device.state).where(
                Device.pool_id == h.id
            )
        ).all()
        used = set(session.scalars(select(Layer.device_id))) | set(
            session.scalars(select(Container.device_id))
        )
    known = {r.thin_id for r in rows}
    for dev_id in sorted(ids - known):
        finding = Finding(
            h.name, "orphan-device", f"thin device {dev_id} is in the pool but not in the catalog"
        )
        out.append(_attempt(finding, fix, lambda d=dev_id: _delete_orphan(mgr, h, d)))
    for row in rows:
        if row.thin_id in ids:
            continue
        finding = Finding(
            h.name,
            "missing-device",
            f"volume {row.name!r} (thin device {row.thin_id}) is in the catalog but not in "
            "the pool",
            fixable=row.id not in used,
        )
        out.append(_attempt(finding, fix, lambda r=row.id: _forget(mgr, r)))
    for row in rows:
        if row.thin_id not in ids:
            continue
        if row.state is DeviceState.DELETING:
            finding = Finding(
                h.name, "deferred-removal", f"the removal of {row.name!r} was deferred"
            )
            out.append(_attempt(finding, fix, lambda r=row.id: _retry_removal(mgr, h, r)))
            continue
        if row.state not in (DeviceState.ACTIVE, DeviceState.INACTIVE):
            continue
        active = h.engine.volume_device(h.spec, row.thin_id) is not None
        if active != (row.state is DeviceState.ACTIVE):
            truth = DeviceState.ACTIVE if active else DeviceState.INACTIVE
            finding = Finding(
                h.name,
                "volume-state",
                f"volume {row.name!r} is {truth.value} in the pool, {row.state.value} in the "
                "catalog",
            )
            out.append(_attempt(finding, fix, lambda r=row.id, t=truth: _set_state(mgr, r, t)))
    return out


def _delete_orphan(mgr: Manager, h: PoolHandle, dev_id: int) -> None:
    if h.engine.volume_device(h.spec, dev_id) is not None:
        journal.deactivate_with_retries(h, dev_id, force=False)
    journal.execute(
        mgr,
        h,
        journal.DELETE_THIN,
        lambda session, pool: {"dev_id": dev_id, "device": None, "orphan": True},
        lambda _: h.engine.delete_thin(h.spec, dev_id),
    )


def _forget(mgr: Manager, row: int) -> None:
    with mgr.catalog.write() as session:
        device = session.get_one(Device, row)
        session.query(Device).filter(Device.origin_id == row).update({Device.origin_id: None})
        for step in journal._deferred_steps(session, row):
            journal._abandon(session, step, "the device was gone")
        session.delete(device)


def _retry_removal(mgr: Manager, h: PoolHandle, row: int) -> None:
    if not journal.remove_device(mgr, h, row, force=False):
        raise ThinmgrError("the volume is still busy")


def _set_state(mgr: Manager, row: int, state: DeviceState) -> None:
    with mgr.catalog.write() as session:
        session.get_one(Device, row).state = state


def _leftovers(mgr: Manager, known: set[str], fix: bool) -> list[Finding]:
    out: list[Finding] = []
    try:
        entries = sorted(mgr.pools_dir().iterdir())
    except OSError:
        return out
    for directory in entries:
        if directory.name in known or not (directory / POOL_MARKER).exists():
            continue
        finding = Finding(
            directory.name,
            "leftover-files",
            f"{directory} holds the files of a pool create that did not finish",
        )

        def remove(d: Any = directory) -> None:
            with mgr.locked(d.name):
                # Checked again under the name's lock: a create may have finished meanwhile.
                with mgr.catalog.read() as session:
                    if session.scalars(select(Pool.id).where(Pool.name == d.name)).first():
                        return
                remove_leftover(d)

        out.append(_attempt(finding, fix, remove))
    return out
