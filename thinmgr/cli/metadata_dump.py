"""`thinmgr metadata dump`: thin_dump-compatible XML, JSON or human-readable output."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from thinmgr.cli.metadata import app
from thinmgr.cli.output import settings, write_chunks
from thinmgr.cli.snapopt import parse_snap


class DumpFormat(StrEnum):
    xml = "xml"
    json = "json"
    human_readable = "human_readable"


@app.command("dump")
def dump(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Metadata file or device.")],
    metadata_snap: Annotated[
        str | None,
        typer.Option(
            "--metadata-snap",
            metavar="[=BLOCK]",
            help="Dump the held metadata snapshot (-m, --metadata-snap), or the one at BLOCK "
            "(--metadata-snap=BLOCK), as on a live pool.",
        ),
    ] = None,
    fmt: Annotated[
        DumpFormat | None,
        typer.Option(
            "--format", "-f", help="Output format [default: xml; json with the global --json]."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file (atomically) instead of stdout."),
    ] = None,
    dev_id: Annotated[
        list[int] | None, typer.Option("--dev-id", help="Only this device (repeatable).")
    ] = None,
    skip_mappings: Annotated[
        bool, typer.Option("--skip-mappings", help="Devices only, without their mappings.")
    ] = False,
) -> None:
    """Dump metadata; the XML is byte-identical to thin_dump 0.9.0's."""
    from thinmgr.format.dump import DumpOptions, dump_human, dump_json, dump_xml
    from thinmgr.ops.metadata import open_metadata

    if fmt is None:
        fmt = DumpFormat.json if settings(ctx).json else DumpFormat.xml
    options = DumpOptions(
        dev_ids=frozenset(dev_id) if dev_id else None, skip_mappings=skip_mappings
    )
    emitter = {
        DumpFormat.xml: dump_xml,
        DumpFormat.json: dump_json,
        DumpFormat.human_readable: dump_human,
    }[fmt]
    with open_metadata(source, snap=parse_snap(metadata_snap)) as md:
        write_chunks(emitter(md, options), output)
