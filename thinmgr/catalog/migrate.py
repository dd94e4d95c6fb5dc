"""Running the catalog's Alembic migrations from inside thinmgr.

Imported only when the schema is behind (``db._bring_up_to_date``), by tests, and by
``migrations/env.py``: Alembic costs tens of milliseconds to import, which every command
would otherwise pay.

Schema changes follow SQLite's procedure (https://sqlite.org/lang_altertable.html, "Making
Other Kinds Of Table Schema Changes"): foreign keys off, one write transaction, then
``PRAGMA foreign_key_check`` before the commit. With foreign keys on, the table copies that
Alembic's batch mode makes would cascade deletes into the rows that refer to them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

import thinmgr
from thinmgr.catalog.db import WRITE_OPTION, CatalogCorruptError, outside_transaction
from thinmgr.errors import InternalError


def migrations_dir() -> Path:
    """The top-level ``migrations/`` directory next to the ``thinmgr`` package."""
    directory = Path(thinmgr.__file__).resolve().parent.parent / "migrations"
    if not (directory / "env.py").is_file():
        raise InternalError(
            f"the catalog migrations are missing (looked in {directory})",
            hint="Reinstall thinmgr from its source tree (pip install -e .).",
        )
    return directory


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for thinmgr's migrations, independent of the current directory."""
    directory = migrations_dir()
    config = Config(str(directory / "alembic.ini"))
    config.set_main_option("script_location", str(directory))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script_directory().get_current_head()
    if head is None:
        raise InternalError("the catalog migrations have no head revision")
    return head


def known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in script_directory().walk_revisions())


def run_with_connection(engine: Engine, action: Callable[[Connection], None]) -> None:
    """Run ``action`` (a schema change) in one write transaction with foreign keys off."""
    with engine.connect() as connection:
        # Must be set outside a transaction: inside one SQLite ignores it.
        outside_transaction(connection, "PRAGMA foreign_keys = OFF")
        try:
            connection.execution_options(**{WRITE_OPTION: True})
            with connection.begin():
                action(connection)
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    tables = sorted({str(row[0]) for row in broken})
                    raise CatalogCorruptError(
                        "the catalog migration left rows that refer to missing rows in "
                        f"{', '.join(tables)}; nothing was changed"
                    )
        finally:
            if connection.in_transaction():  # an error left it open: roll it back first
                connection.rollback()
            outside_transaction(connection, "PRAGMA foreign_keys = ON")


def upgrade(engine: Engine, target: str = "head") -> None:
    run_with_connection(engine, lambda conn: command.upgrade(alembic_config(conn), target))


def downgrade(engine: Engine, target: str) -> None:
    run_with_connection(engine, lambda conn: command.downgrade(alembic_config(conn), target))
