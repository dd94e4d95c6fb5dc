"""A read-only path into the catalog with the stdlib ``sqlite3``, for the listing commands.

Importing SQLAlchemy costs about 300 ms on a small machine, more than the whole budget of
`volume list` or `pool status` (docs/manager.md, "Speed"). The listings need a handful of
SELECTs, so they are written here against the driver, returning plain frozen dataclasses.

``open_reader(home)`` gives ``None`` whenever the normal path (``db.open_catalog``) must run
instead: no catalog yet (it is created there), a schema that is not ``SCHEMA_HEAD`` (it is
migrated there), or any SQLite error (translated into the right ``ThinmgrError`` there).
The reader never writes: the file is opened ``mode=ro`` with ``PRAGMA query_only``, and under
WAL a reader never waits for a writer (https://sqlite.org/wal.html, "Concurrency").

The dataclass field names *are* the column names of the models (``models.Pool``,
``models.Device``); a test checks them against the models, so a schema change cannot
silently break this module. This module imports nothing heavier than ``sqlite3``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

CATALOG_FILE = "catalog.db"
BUSY_TIMEOUT_MS = 5000
# The newest schema revision this thinmgr knows (the head of migrations/versions). Kept here,
# in the module that imports no SQLAlchemy, and re-exported by ``db``; a test checks it
# against the migration scripts.
SCHEMA_HEAD = "0002"


@dataclass(frozen=True)
class PoolRow:
    """A row of ``pools`` as the listings need it (enumerations as their text values)."""

    id: int
    name: str
    engine: str
    data_path: str
    metadata_path: str
    data_block_sectors: int
    low_water_blocks: int
    no_space_policy: str
    state: str
    transaction_id: int
    pending_transaction_id: int | None
    next_device_id: int


@dataclass(frozen=True)
class DeviceRow:
    """A row of ``devices`` as the listings need it."""

    id: int
    pool_id: int
    thin_id: int
    name: str
    kind: str
    origin_id: int | None
    virtual_size_bytes: int
    read_only: bool
    state: str
    created_at: datetime


R = TypeVar("R", PoolRow, DeviceRow)


def column_names(row_type: type[PoolRow] | type[DeviceRow]) -> tuple[str, ...]:
    """The columns a row type reads: its field names (checked against the models by a test)."""
    return tuple(f.name for f in fields(row_type))


def row_of(row_type: type[R], model: object) -> R:
    """The row of an ORM object (``models.Pool``/``models.Device``) as this module reads it.

    So that the ORM path builds its results from the same row types as the fast path:
    enumerations become their text values, as they are stored.
    """
    values = {}
    for name in column_names(row_type):
        value = getattr(model, name)
        values[name] = value.value if isinstance(value, Enum) else value
    return row_type(**values)


def _select(row_type: type[R], table: str) -> str:
    return f"SELECT {', '.join(column_names(row_type))} FROM {table}"


def _parse_timestamp(text: str) -> datetime:
    # SQLAlchemy's SQLite DateTime stores "YYYY-MM-DD HH:MM:SS.ffffff" in naive UTC
    # (models.UTCDateTime); read back aware, as the ORM path does.
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _pool(values: tuple[Any, ...]) -> PoolRow:
    return PoolRow(*values)


def _device(values: tuple[Any, ...]) -> DeviceRow:
    row = DeviceRow(*values)
    # SQLite has no booleans nor timestamps: 0/1 and text, as SQLAlchemy stored them.
    return replace(row, read_only=bool(row.read_only), created_at=_parse_timestamp(values[-1]))


class CatalogReader:
    """Read-only queries on one consistent snapshot of the catalog (one read transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def pools(self) -> list[PoolRow]:
        """All pools, by name."""
        rows = self._connection.execute(_select(PoolRow, "pools") + " ORDER BY name")
        return [_pool(values) for values in rows]

    def pool(self, name: str) -> PoolRow | None:
        rows = self._connection.execute(_select(PoolRow, "pools") + " WHERE name = ?", (name,))
        values = rows.fetchone()
        return None if values is None else _pool(values)

    def device_counts(self) -> dict[int, int]:
        """Pool id -> number of devices (of every kind) in it."""
        rows = self._connection.execute("SELECT pool_id, count(*) FROM devices GROUP BY pool_id")
        return {pool_id: count for pool_id, count in rows}

    def device_states(self, pool_id: int) -> list[str]:
        rows = self._connection.execute("SELECT state FROM devices WHERE pool_id = ?", (pool_id,))
        return [state for (state,) in rows]

    def devices(self, pool_id: int | None = None) -> list[DeviceRow]:
        """Devices of one pool or of all, by pool id then name."""
        query = _select(DeviceRow, "devices")
        args: tuple[int, ...] = ()
        if pool_id is not None:
            query += " WHERE pool_id = ?"
            args = (pool_id,)
        rows = self._connection.execute(query + " ORDER BY pool_id, name", args)
        return [_device(values) for values in rows]

    def device_names(self, ids: set[int]) -> dict[int, str]:
        """Device id -> name, for origins (which may live in any pool)."""
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self._connection.execute(
            f"SELECT id, name FROM devices WHERE id IN ({marks})", tuple(sorted(ids))
        )
        return {device_id: name for device_id, name in rows}


def _connect(path: Path) -> sqlite3.Connection:
    uri = f"file:{quote(str(path))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA query_only = ON")
    except BaseException:
        connection.close()
        raise
    return connection


def _revision(connection: sqlite3.Connection) -> str | None:
    """The recorded schema revision, or None when there is none (or several) to trust."""
    try:
        versions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.OperationalError:
        return None  # no such table: an empty or foreign database; db.py says which
    return versions[0] if len(versions) == 1 else None


@contextmanager
def open_reader(home: Path) -> Iterator[CatalogReader | None]:
    """A reader on ``home/catalog.db``, or None when the normal (ORM) path must be taken.

    SQLite errors raised while the caller reads (a corrupt page, say) are not caught here:
    callers use ``read_or_none`` for the whole read.
    """
    path = home / CATALOG_FILE
    if not path.is_file():
        yield None
        return
    try:
        connection = _connect(path)
    except sqlite3.Error:
        yield None
        return
    with closing(connection):
        try:
            # One read transaction: every SELECT sees the same snapshot.
            connection.execute("BEGIN")
            current = _revision(connection)
        except sqlite3.Error:
            yield None
            return
        if current != SCHEMA_HEAD:
            yield None
            return
        try:
            yield CatalogReader(connection)
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")


T = TypeVar("T")


def read_or_none(home: Path, read: Callable[[CatalogReader], T]) -> T | None:
    """``read(reader)`` on a fast reader; None if the normal path must run instead.

    None on any SQLite error too: the normal path then reports it as the right
    ``ThinmgrError`` (``db.translate_database_error``), or succeeds after its own checks.
    """
    try:
        with open_reader(home) as reader:
            return None if reader is None else read(reader)
    except sqlite3.Error:
        return None
