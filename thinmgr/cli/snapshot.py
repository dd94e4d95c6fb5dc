"""`thinmgr snapshot POOL ORIGIN NAME`: an O(1) snapshot, consistent on a mounted origin."""

from __future__ import annotations

from typing import Annotated

import typer

from thinmgr.cli.manager_output import say
from thinmgr.cli.output import emit_json, settings


def snapshot(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name.")],
    origin: Annotated[str, typer.Argument(help="Volume to snapshot.")],
    name: Annotated[str, typer.Argument(help="Name of the new snapshot.")],
    read_only: Annotated[bool, typer.Option("--read-only", help="Activate it read-only.")] = False,
) -> None:
    """Snapshot a volume (a mounted origin is frozen, suspended, snapshotted, resumed, thawed)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.snapshots import create_snapshot

    with open_manager(settings(ctx).home) as mgr:
        info = create_snapshot(mgr, pool, origin, name, read_only=read_only)
    if settings(ctx).json:
        emit_json(info.as_dict())
    else:
        say(ctx, f"created snapshot {pool}/{name} of {origin} (thin id {info.dev_id})")
