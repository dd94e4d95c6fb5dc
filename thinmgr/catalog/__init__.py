"""The catalog: thinmgr's record of pools, devices, images, layers, containers and steps.

SQLite through SQLAlchemy 2 typed models (``models``); the schema is kept by Alembic
migrations in the top-level ``migrations/`` directory and brought up to date on first use
(``db.open_catalog``). This package's ``__init__`` imports nothing, so that importing a
submodule costs only what that submodule needs.
"""
