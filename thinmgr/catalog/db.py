"""Opening the catalog: the SQLite file, its pragmas, and the schema brought up to date.

``open_catalog(home)`` is the one way in. It creates ``home`` (mode 0700) if needed, opens
``home/catalog.db`` with WAL journaling, a 5 s busy timeout, foreign keys on and
``synchronous=NORMAL`` (durable at every checkpoint, and a crash loses at most the last
transactions, never the database: https://sqlite.org/wal.html), and upgrades the schema to
the head revision when it is behind. When it is already at head -- every command but the first
-- Alembic is not even imported; the check is one SELECT.

SQLite errors are turned into ``ThinmgrError``s here (``translate_database_error``), so that
a locked, unwritable, full or corrupted catalog reads as such to the user.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from thinmgr.catalog.fastread import BUSY_TIMEOUT_MS as BUSY_TIMEOUT_MS  # noqa: PLC0414
from thinmgr.catalog.fastread import CATALOG_FILE as CATALOG_FILE  # noqa: PLC0414
from thinmgr.catalog.fastread import SCHEMA_HEAD as SCHEMA_HEAD  # noqa: PLC0414
from thinmgr.errors import (
    BusyError,
    IOFailure,
    NoSpaceError,
    PermissionDenied,
    ThinmgrError,
    UnsupportedError,
)

# CATALOG_FILE, BUSY_TIMEOUT_MS and SCHEMA_HEAD (the head of migrations/versions, kept out of
# Alembic so that the usual open needs none) live in ``fastread``, which imports no SQLAlchemy,
# so that the listings' fast path shares them; re-exported here.
DEFAULT_HOME = Path("/var/lib/thinmgr")
# Execution option that makes a transaction start with BEGIN IMMEDIATE (see _begin).
WRITE_OPTION = "thinmgr_write"

# Primary result codes of SQLite (https://sqlite.org/rescode.html).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_AUTH = 23
_SQLITE_NOTADB = 26


class CatalogCorruptError(IOFailure):
    """The catalog file is not a readable SQLite database of thinmgr's."""

    default_hint = (
        "Move the catalog aside (keep it for a bug report), restore it from a backup, or "
        "start a new one; `thinmgr doctor` can then compare it with the pools."
    )


class CatalogTooNewError(UnsupportedError):
    """The catalog was written by a newer thinmgr whose schema this one does not know."""

    default_hint = "Upgrade thinmgr to the version that last wrote this catalog (or newer)."


def default_home(environ: Mapping[str, str]) -> Path:
    """The state directory when ``--home`` is not given: $THINMGR_HOME or /var/lib/thinmgr."""
    value = environ.get("THINMGR_HOME")
    return Path(value) if value else DEFAULT_HOME


def catalog_path(home: Path) -> Path:
    return home / CATALOG_FILE


# Connection pools a forked child inherited (``Catalog.after_fork_in_child``): referenced
# for the life of the process so that their connections are never closed in it.
_INHERITED_POOLS: list[object] = []


@dataclass(frozen=True)
class Catalog:
    """An open catalog: an engine and the sessions made from it.

    Use ``read()`` for queries and ``write()`` for changes. ``write()`` takes SQLite's write
    lock at the start of the transaction (BEGIN IMMEDIATE): a deferred transaction that
    reads, then writes, fails at once with SQLITE_BUSY under WAL when another writer came
    in between, whatever the busy timeout.
    """

    path: Path
    engine: Engine
    _reads: sessionmaker[Session]
    _writes: sessionmaker[Session]

    @contextmanager
    def read(self) -> Iterator[Session]:
        with _translated(self.path), self._reads() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error."""
        with _translated(self.path), self._writes.begin() as session:
            yield session

    def revision(self) -> str | None:
        with _translated(self.path), self.engine.connect() as connection:
            return current_revision(connection)

    def close(self) -> None:
        self.engine.dispose()

    def before_fork(self) -> None:
        """Close the pooled connections, so that a child forked next inherits none.

        SQLite connections must not cross fork() (sqlite.org/howtocorrupt.html, 2.6): the
        child would share their descriptors and SQLite's per-file lock bookkeeping. New
        connections are opened on the next use, in the parent and in the child alike.
        """
        self.engine.dispose()

    def after_fork_in_child(self) -> None:
        """In a forked child: use new connections, and never close inherited ones.

        Closing any descriptor of a file drops all of this process's POSIX locks on it, the
        locks of the child's own new connections included (howtocorrupt.html, 2.2); another
        process could then reset the WAL under the child's writes and lose them. The old
        pool is kept referenced until the process ends, so nothing of it is closed early.
        """
        _INHERITED_POOLS.append(self.engine.pool)
        self.engine.dispose(close=False)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_catalog(home: Path, *, upgrade: bool = True) -> Catalog:
    """Open ``home/catalog.db``, creating ``home`` and the schema if needed.

    With ``upgrade=False`` the schema is left as it is (for tests and ``doctor``).
    """
    _make_home(home)
    path = catalog_path(home)
    engine = create_catalog_engine(home)
    try:
        with _translated(path):
            _ensure_wal(engine, path)
            if upgrade:
                _bring_up_to_date(engine, path)
    except BaseException:
        engine.dispose()
        raise
    return Catalog(
        path=path,
        engine=engine,
        _reads=sessionmaker(engine, expire_on_commit=False),
        _writes=sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        ),
    )


def create_catalog_engine(home: Path) -> Engine:
    """An engine on ``home/catalog.db`` whose every connection has thinmgr's pragmas."""
    engine = create_engine(f"sqlite:///{catalog_path(home)}")
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _begin)
    return engine


def current_revision(connection: Connection) -> str | None:
    """The schema revision recorded in the catalog; None for an empty database.

    Raises ``CatalogCorruptError`` for a database that has tables but no revision (not a
    catalog of thinmgr's) or more than one (Alembic branches, which thinmgr never makes).
    """
    tables = {
        row[0]
        for row in connection.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    if "alembic_version" not in tables:
        if tables:
            raise CatalogCorruptError(
                "the catalog database has tables but no schema version: it is not a thinmgr catalog"
            )
        return None
    versions = [
        row[0] for row in connection.exec_driver_sql("SELECT version_num FROM alembic_version")
    ]
    if len(versions) > 1:
        raise CatalogCorruptError(
            f"the catalog records several schema versions ({', '.join(sorted(versions))})"
        )
    return versions[0] if versions else None


def translate_database_error(error: exc.DBAPIError | sqlite3.Error, path: Path) -> ThinmgrError:
    """The ``ThinmgrError`` a user should see for an SQLite error on the catalog at ``path``."""
    original = error.orig if isinstance(error, exc.DBAPIError) else error
    code = getattr(original, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(original)
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return BusyError(
            f"catalog {path} is locked by another thinmgr (waited {BUSY_TIMEOUT_MS // 1000} s)",
            hint="Wait for the other thinmgr command to finish, then try again.",
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_AUTH, _SQLITE_CANTOPEN):
        return PermissionDenied(
            f"cannot open catalog {path} for writing: {detail}",
            hint=f"Run as root, or make {path.parent} and the files in it writable "
            "(or choose another --home).",
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return CatalogCorruptError(f"catalog {path} is corrupted: {detail}")
    if primary == _SQLITE_FULL:
        return NoSpaceError(
            f"no space left for catalog {path}",
            hint=f"Free space on the filesystem that holds {path.parent}.",
        )
    if primary == _SQLITE_IOERR:
        return IOFailure(f"I/O error on catalog {path}: {detail}")
    if isinstance(original, sqlite3.DatabaseError) and not isinstance(
        original, sqlite3.OperationalError | sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        return CatalogCorruptError(f"catalog {path} is unreadable: {detail}")
    return IOFailure(f"catalog {path}: {detail}")


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """Turn SQLite's operational errors into ``ThinmgrError``s.

    Integrity errors (a broken constraint) pass through: they mean a bug in the layer above,
    which should have checked first, and are reported as such.
    """
    try:
        yield
    except exc.IntegrityError:
        raise
    except (exc.OperationalError, exc.DatabaseError) as error:
        raise translate_database_error(error, path) from error
    except sqlite3.DatabaseError as error:
        raise translate_database_error(error, path) from error


def _make_home(home: Path) -> None:
    """Create ``home`` with mode 0700: it holds the catalog, pool files and lock files."""
    try:
        if not home.is_dir():
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask; be exact
        writable = os.access(home, os.W_OK | os.X_OK)
    except PermissionError as error:
        raise _unwritable(home, error.strerror) from error
    except FileExistsError as error:
        raise IOFailure(
            f"thinmgr home {home} exists and is not a directory",
            hint="Choose another --home (or THINMGR_HOME), or move that file away.",
        ) from error
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unwritable(home, error.strerror) from error
        raise IOFailure(f"cannot create thinmgr home {home}: {error.strerror}") from error
    if not writable:
        raise _unwritable(home, "permission denied")


def _unwritable(home: Path, reason: str | None) -> PermissionDenied:
    return PermissionDenied(
        f"thinmgr home {home} is not writable: {reason or 'permission denied'}",
        hint="Run as root, or choose a writable directory with --home (or THINMGR_HOME).",
    )


def _on_connect(dbapi_connection: Any, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (see _begin) instead of the sqlite3
    # module's implicit transactions, which start late and never around SELECTs.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # NORMAL is durable enough in WAL mode: a power loss can lose the last commits but
        # never corrupts the database (https://sqlite.org/pragma.html#pragma_synchronous).
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _ensure_wal(engine: Engine, path: Path) -> None:
    """Switch the file to WAL journaling; the mode is stored in the file and kept."""
    with engine.connect() as connection:
        mode = outside_transaction(connection, "PRAGMA journal_mode")
        if mode != "wal":
            mode = outside_transaction(connection, "PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise UnsupportedError(
            f"catalog {path}: the filesystem does not support SQLite's WAL mode "
            f"(journal mode stays {mode!r})",
            hint="Put the thinmgr home on a local filesystem (not NFS), with --home.",
        )


def outside_transaction(connection: Connection, pragma: str) -> object:
    """Run a PRAGMA outside any transaction and return the first column of its first row.

    Some pragmas (journal_mode, foreign_keys) are refused or ignored inside a transaction,
    and SQLAlchemy would begin one before any statement; so this goes to the driver.
    """
    if connection.in_transaction():
        raise RuntimeError(f"{pragma} must run outside a transaction")
    cursor = connection.connection.driver_connection.execute(pragma)  # type: ignore[union-attr]
    try:
        row = cursor.fetchone()
    finally:
        cursor.close()
    return None if row is None else row[0]


def _bring_up_to_date(engine: Engine, path: Path) -> None:
    with engine.connect() as connection:
        revision = current_revision(connection)
    if revision == SCHEMA_HEAD:
        return
    # Behind (or new): only now is Alembic worth importing.
    from thinmgr.catalog import migrate

    if revision is not None and revision not in migrate.known_revisions():
        raise CatalogTooNewError(
            f"catalog {path} has schema revision {revision!r}, which this thinmgr does not "
            f"know (its newest is {SCHEMA_HEAD!r}): a newer thinmgr wrote it"
        )
    migrate.upgrade(engine, "head")
