"""`thinmgr layer export|import`: a volume's changed blocks as a layer-diff file, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from thinmgr.cli.manager_output import say
from thinmgr.cli.output import emit_json, settings

app = typer.Typer(
    help="Layer-diff files: export a volume's changed blocks, import them on any pool "
    "(format: docs/layer-diff-format.md).",
    no_args_is_help=True,
)


@app.command("export")
def export(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name.")],
    device: Annotated[str, typer.Argument(help="Volume to export.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write (a directory with --digest-name).")
    ],
    parent: Annotated[
        str | None,
        typer.Option("--parent", help="Export only the blocks that differ from this volume."),
    ] = None,
    digest_name: Annotated[
        bool,
        typer.Option("--digest-name", help="Name the file <sha256>.thindiff inside OUTPUT."),
    ] = False,
) -> None:
    """Write DEVICE's blocks that differ from PARENT (or all its mapped blocks)."""
    from thinmgr.ops.layers import export_layer
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        result = export_layer(mgr, pool, device, output, parent=parent, name_by_digest=digest_name)
    if settings(ctx).json:
        emit_json(result.as_dict())
    else:
        say(
            ctx,
            f"wrote {result.file}: {result.data_extents} data extents ({result.data_bytes} "
            f"bytes), {result.discard_extents} discards, {result.file_bytes} bytes, "
            f"sha256 {result.digest}",
        )


@app.command("import")
def import_(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name.")],
    file: Annotated[Path, typer.Argument(help="Layer-diff file.")],
    name: Annotated[str, typer.Argument(help="Name of the new volume.")],
    parent: Annotated[
        str | None,
        typer.Option("--parent", help="Volume the file was exported against (its copy)."),
    ] = None,
) -> None:
    """Rebuild a volume: a snapshot of PARENT plus the file (checked whole before any write)."""
    from thinmgr.ops.layers import import_layer
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        result = import_layer(mgr, pool, file, name, parent=parent)
    if settings(ctx).json:
        emit_json(result.as_dict())
    else:
        say(ctx, f"imported {file} as {pool}/{name} ({result.data_bytes} bytes of data)")
