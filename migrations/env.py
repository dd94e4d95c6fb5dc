"""Alembic environment of thinmgr's catalog.

thinmgr runs migrations itself (``thinmgr.catalog.migrate``) and hands its connection over
in ``config.attributes["connection"]``, already inside a write transaction with foreign keys
off (SQLite's procedure for schema changes). When the alembic command line runs this file
(``alembic -c migrations/alembic.ini -x home=DIR ...``), it opens the catalog of DIR (or
$THINMGR_HOME, or /var/lib/thinmgr) through the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlalchemy.types import TypeDecorator

from thinmgr.catalog.models import Base

config = context.config


def render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render thinmgr's column types as their storage types in new revisions.

    A revision is frozen history: it must not import the models, whose Python side may change.
    """
    if kind == "type" and isinstance(item, TypeDecorator):
        return f"sa.{item.impl_instance!r}"
    return False


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=True,
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_from_command_line() -> None:
    from thinmgr.catalog.db import create_catalog_engine, default_home
    from thinmgr.catalog.migrate import run_with_connection

    home = context.get_x_argument(as_dictionary=True).get("home")
    engine = create_catalog_engine(Path(home) if home else default_home(os.environ))
    try:
        run_with_connection(engine, run_on)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("thinmgr's catalog migrations run online only (no --sql)")
connection = config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    run_from_command_line()
