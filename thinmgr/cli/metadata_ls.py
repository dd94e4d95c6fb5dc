"""`thinmgr metadata ls`: per-device mapped, exclusive and shared blocks, like thin_ls 0.9.0."""

from __future__ import annotations

from typing import Annotated

import typer

from thinmgr.cli.metadata import app
from thinmgr.cli.output import emit_json, settings, write_chunks
from thinmgr.cli.snapopt import parse_snap


@app.command("ls")
def ls(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Metadata file or device.")],
    metadata_snap: Annotated[
        str | None,
        typer.Option(
            "--metadata-snap",
            metavar="[=BLOCK]",
            help="List the held metadata snapshot (-m, --metadata-snap), or the one at BLOCK "
            "(--metadata-snap=BLOCK), as on a live pool.",
        ),
    ] = None,
    fields: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-o",
            metavar="FIELDS",
            help="Comma-separated columns: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS, "
            "the _SECTORS and _BYTES variants, MAPPED, EXCLUSIVE, SHARED, TRANSACTION, "
            "CREATE_TIME, SNAP_TIME. [default: DEV,MAPPED,CREATE_TIME,SNAP_TIME]",
        ),
    ] = None,
    no_headers: Annotated[
        bool, typer.Option("--no-headers", help="Leave out the header line.")
    ] = False,
) -> None:
    """Per-device usage; the text is identical to thin_ls 0.9.0's (--json: every figure)."""
    from thinmgr.format.ls import (
        DEFAULT_FIELDS,
        SHARING_FIELDS,
        device_usage,
        ls_json,
        ls_rows,
        ls_text,
        parse_fields,
    )
    from thinmgr.ops.metadata import open_metadata

    columns = parse_fields(fields) if fields is not None else list(DEFAULT_FIELDS)
    as_json = settings(ctx).json
    sharing = as_json or not SHARING_FIELDS.isdisjoint(columns)
    with open_metadata(source, snap=parse_snap(metadata_snap)) as md:
        usage = device_usage(md, sharing=sharing)
        data_block_size = md.view.data_block_size
    if as_json:
        emit_json(ls_json(usage, data_block_size))
        return
    rows = ls_rows(usage, columns, data_block_size)
    write_chunks([ls_text(rows, columns, headers=not no_headers)])
