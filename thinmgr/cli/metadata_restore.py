"""`thinmgr metadata restore`: build metadata from thin_dump XML (like thin_restore)."""

from __future__ import annotations

from typing import Annotated

import typer

from thinmgr.cli.metadata import app
from thinmgr.cli.output import emit_json, settings
from thinmgr.errors import UsageError


@app.command("restore")
def restore(
    ctx: typer.Context,
    input_xml: Annotated[
        str,
        typer.Option("--input", "-i", help="XML written by `thinmgr metadata dump` or thin_dump."),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Metadata file or block device to write. A file that does not exist is created.",
        ),
    ],
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            help="Size of a new output file (4M, 1G, 512K, bytes...). Default: 48 "
            "bytes per data block, at least 2 MiB, plus headroom.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Overwrite an output that already holds thin-pool metadata."),
    ] = False,
) -> None:
    """Write new metadata from an XML dump; the output changes only once it is complete."""
    from thinmgr.ops.restore import restore_metadata
    from thinmgr.ops.units import format_size, parse_size

    nbytes = None
    if size is not None:
        try:
            nbytes = parse_size(size)
        except UsageError as error:
            raise UsageError(f"--size: {error.message}", hint=error.hint) from None
    result = restore_metadata(input_xml, output, size=nbytes, force=force)
    s = result.summary
    if settings(ctx).json:
        emit_json(
            {
                "target": result.target,
                "created": result.created,
                "size": result.size,
                "devices": s.devices,
                "mappings": s.mappings,
                "metadata_blocks_used": s.metadata_blocks_used,
                "metadata_nr_blocks": s.metadata_nr_blocks,
                "data_blocks_used": s.data_blocks_used,
                "nr_data_blocks": s.nr_data_blocks,
            }
        )
        return
    created = f" (created, {format_size(result.size)})" if result.created else ""
    typer.echo(
        f"{result.target}{created}: {s.devices} devices, {s.mappings} mappings, "
        f"{s.metadata_blocks_used} of {s.metadata_nr_blocks} metadata blocks used"
    )
