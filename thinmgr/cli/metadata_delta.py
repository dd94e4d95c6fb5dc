"""`thinmgr metadata delta`: thin_delta-compatible changed ranges between two thin devices."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from thinmgr.cli.metadata import app
from thinmgr.cli.output import settings, write_chunks
from thinmgr.cli.snapopt import parse_snap
from thinmgr.errors import UsageError


class DeltaFormat(StrEnum):
    xml = "xml"
    json = "json"


@app.command("delta")
def delta(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Metadata file or device.")],
    snap1: Annotated[
        int | None,
        typer.Option("--snap1", "--thin1", metavar="DEV", help="The left thin device id."),
    ] = None,
    snap2: Annotated[
        int | None,
        typer.Option("--snap2", "--thin2", metavar="DEV", help="The right thin device id."),
    ] = None,
    metadata_snap: Annotated[
        str | None,
        typer.Option(
            "--metadata-snap",
            metavar="[=BLOCK]",
            help="Read the held metadata snapshot (-m, --metadata-snap), or the one at BLOCK "
            "(--metadata-snap=BLOCK), as on a live pool.",
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="List every range with its data blocks, grouped by kind."),
    ] = False,
    fmt: Annotated[
        DeltaFormat, typer.Option("--format", "-f", help="Output format.")
    ] = DeltaFormat.xml,
    changed_only: Annotated[
        bool,
        typer.Option(
            "--changed-only",
            help="Leave out `same` ranges; subtrees both devices share are then not read at "
            "all, so the cost follows what changed.",
        ),
    ] = False,
) -> None:
    """Changed ranges between two thin devices; the XML is byte-identical to thin_delta
    0.9.0's (plus --changed-only, which drops the `same` ranges)."""
    from thinmgr.format.delta import compute_delta, delta_json, delta_xml
    from thinmgr.ops.metadata import open_metadata

    # Checked here rather than by click so that the message names both spellings.
    if snap1 is None:
        raise UsageError("--snap1 (or --thin1) not specified: which device is the left side?")
    if snap2 is None:
        raise UsageError("--snap2 (or --thin2) not specified: which device is the right side?")
    use_json = fmt is DeltaFormat.json or settings(ctx).json
    with open_metadata(source, snap=parse_snap(metadata_snap)) as md:
        result = compute_delta(md, snap1, snap2, verbose=verbose, changed_only=changed_only)
        write_chunks((delta_json if use_json else delta_xml)(md, result))
