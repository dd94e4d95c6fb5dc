"""What every manager use case works with: the home, the catalog and the engines.

``open_manager(home)`` opens the catalog once per command; ``Manager.writing(pool)`` is how a
command that changes a pool starts: it takes the pool's lock, makes sure the catalog and the
pool agree (finishing or rolling back a step a crash left pending, see ``journal``) and gives
back the pool's row id, spec and engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.db import Catalog, open_catalog
from thinmgr.catalog.models import Device, Pool
from thinmgr.engine.base import Engine, PoolSpec
from thinmgr.errors import NotFoundError, UsageError
from thinmgr.ops.engines import load_engine
from thinmgr.ops.locks import DEFAULT_LOCK_WAIT, pool_lock
from thinmgr.ops.poolspec import run_dir_of, spec_of

LOCK_WAIT_ENV = "THINMGR_LOCK_WAIT"


def lock_wait_from_env() -> float:
    text = os.environ.get(LOCK_WAIT_ENV)
    if not text:
        return DEFAULT_LOCK_WAIT
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{LOCK_WAIT_ENV}={text!r} is not a number of seconds") from None
    return max(0.0, value)


@dataclass(frozen=True)
class PoolHandle:
    """A pool a command works on: its catalog id, its spec and its engine."""

    id: int
    name: str
    spec: PoolSpec
    engine: Engine


@dataclass
class Manager:
    home: Path
    catalog: Catalog
    lock_wait: float = DEFAULT_LOCK_WAIT
    _engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, name: str) -> Engine:
        if name not in self._engines:
            self._engines[name] = load_engine(name)
        return self._engines[name]

    def run_dir(self, pool: str) -> Path:
        return run_dir_of(self.home, pool)

    def pools_dir(self) -> Path:
        return self.home / "pools"

    def spec(self, pool: Pool) -> PoolSpec:
        return spec_of(self.home, pool)

    def handle(self, pool: Pool) -> PoolHandle:
        return PoolHandle(pool.id, pool.name, self.spec(pool), self.engine(pool.engine.value))

    def find(self, name: str) -> PoolHandle:
        with self.catalog.read() as session:
            return self.handle(get_pool(session, name))

    @contextmanager
    def locked(self, pool: str) -> Iterator[None]:
        with pool_lock(self.home, pool, wait=self.lock_wait):
            yield

    @contextmanager
    def writing(self, pool: str, *, recover: bool = True) -> Iterator[PoolHandle]:
        """The pool, locked, with pending steps settled and the pool served by its engine."""
        from thinmgr.ops import journal

        with self.locked(pool):
            handle = self.find(pool)
            handle.spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if recover:
                status = journal.ensure_active(self, handle)
                journal.recover(self, handle, status)
                journal.finish_deferred(self, handle)
            yield handle


def get_pool(session: Session, name: str) -> Pool:
    pool = session.scalars(select(Pool).where(Pool.name == name)).one_or_none()
    if pool is None:
        raise NotFoundError(f"no pool named {name!r}", hint="See `thinmgr pool list`.")
    return pool


def get_device(session: Session, pool: Pool | int, name: str) -> Device:
    pool_id = pool if isinstance(pool, int) else pool.id
    device = session.scalars(
        select(Device).where(Device.pool_id == pool_id, Device.name == name)
    ).one_or_none()
    if device is None:
        pool_name = pool.name if isinstance(pool, Pool) else f"#{pool_id}"
        raise NotFoundError(
            f"no volume named {name!r} in pool {pool_name!r}",
            hint="See `thinmgr volume list POOL`.",
        )
    return device


@contextmanager
def open_manager(home: Path) -> Iterator[Manager]:
    catalog = open_catalog(home)
    try:
        yield Manager(home=home, catalog=catalog, lock_wait=lock_wait_from_env())
    finally:
        catalog.close()
