"""`thinmgr commit SOURCE IMAGE[:TAG]`: a volume or a container's disk as a new image."""

from __future__ import annotations

from typing import Annotated

import typer

from thinmgr.cli.manager_output import say, size
from thinmgr.cli.output import emit_json, settings


def commit(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="POOL/VOLUME or a container name.")
    ],
    ref: Annotated[str, typer.Argument(metavar="IMAGE[:TAG]", help="The new image.")],
) -> None:
    """Snapshot SOURCE (frozen if in use) as the top layer of a new image; the layer is
    identified by its block diff against the layer SOURCE descends from."""
    from thinmgr.ops.commit import commit as commit_source
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        result = commit_source(mgr, source, ref)
    if settings(ctx).json:
        emit_json(result.as_dict())
        return
    how = "shared an existing layer" if result.shared else f"new layer {result.layer_device}"
    say(
        ctx,
        f"committed {source} as {result.image.ref}: {how}, {size(result.data_bytes)} changed",
    )
