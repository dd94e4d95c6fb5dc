"""`thinmgr metadata ...`: offline tools over pool metadata files and devices.

Each command lives in a module of its own; importing them registers them on ``app``.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Read, check, dump, restore and diff dm-thin pool metadata "
    "(compatible with thin-provisioning-tools).",
    no_args_is_help=True,
)

from thinmgr.cli import (  # noqa: E402  (the modules register on `app` above)
    metadata_check,
    metadata_delta,
    metadata_dump,
    metadata_ls,
    metadata_restore,
)

__all__ = [
    "app",
    "metadata_check",
    "metadata_delta",
    "metadata_dump",
    "metadata_ls",
    "metadata_restore",
]
