"""`thinmgr pool ...`: create, list, inspect, grow, serve, stop, destroy, check and dump pools."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from thinmgr.cli.manager_output import fields, percent, say, size, stage_reporter, warn
from thinmgr.cli.output import emit_json, settings, table, write_chunks
from thinmgr.errors import ExitCode

if TYPE_CHECKING:
    from thinmgr.ops.listings import PoolReport

app = typer.Typer(help="Create and manage thin pools.", no_args_is_help=True)


class EngineChoice(StrEnum):
    auto = "auto"
    user = "user"
    kernel = "kernel"


class NoSpaceChoice(StrEnum):
    error = "error"
    queue = "queue"


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pool name.")],
    engine: Annotated[
        EngineChoice, typer.Option(help="Engine that serves the pool.")
    ] = EngineChoice.auto,
    size_text: Annotated[
        str | None, typer.Option("--size", help="Data size of a file-backed pool (e.g. 20G).")
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Put the pool's files in DIR/NAME [default: HOME/pools/NAME]."),
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data device.")] = None,
    metadata: Annotated[Path | None, typer.Option("--metadata", help="Metadata device.")] = None,
    block_size: Annotated[
        str, typer.Option("--block-size", help="Data block size, 64K..1G.")
    ] = "64K",
    metadata_size: Annotated[
        str | None,
        typer.Option("--metadata-size", help="Metadata size [default: by the kernel's rule]."),
    ] = None,
    low_water_mark: Annotated[
        int,
        typer.Option("--low-water-mark", help="Free data blocks that trigger a low-space event."),
    ] = 0,
    no_space: Annotated[
        NoSpaceChoice,
        typer.Option("--no-space", help="Full pool: fail writes (error) or queue them."),
    ] = NoSpaceChoice.error,
    force: Annotated[
        bool,
        typer.Option("--force", help="Use devices that carry a filesystem or other signature."),
    ] = False,
) -> None:
    """Create a pool: on sparse files (--size) or on two devices (--data, --metadata)."""
    from thinmgr.engine.base import NoSpacePolicy
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import CreatePool, create_pool
    from thinmgr.ops.units import parse_size

    request = CreatePool(
        name=name,
        engine=engine.value,
        size=None if size_text is None else parse_size(size_text),
        directory=directory,
        data=data,
        metadata=metadata,
        block_size=parse_size(block_size),
        metadata_size=None if metadata_size is None else parse_size(metadata_size),
        low_water_mark=low_water_mark,
        no_space=NoSpacePolicy(no_space.value),
        force=force,
    )
    with open_manager(settings(ctx).home) as mgr:
        info = create_pool(mgr, request, stage_reporter(ctx))  # type: ignore[arg-type]
    if settings(ctx).json:
        emit_json(info.as_dict())
    else:
        say(ctx, f"created pool {info.name} ({info.engine} engine, data {info.data_path})")


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List pools (from the catalog; takes no lock)."""
    from thinmgr.ops.listings import list_pools

    pools = list_pools(settings(ctx).home)
    if settings(ctx).json:
        emit_json([p.as_dict() for p in pools])
        return
    table(
        ctx,
        None,
        ["NAME", "ENGINE", "STATE", "BLOCK", "VOLUMES", "TXN", "DATA"],
        [
            (
                p.name,
                p.engine,
                p.state,
                size(p.block_size),
                p.volumes,
                p.transaction_id,
                p.data_path,
            )
            for p in pools
        ],
        right=["BLOCK", "VOLUMES", "TXN"],
    )


@app.command("status")
def status(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Pool name.")]) -> None:
    """Use of data and metadata space, transaction id, state and warnings."""
    from thinmgr.ops.listings import pool_status

    report = pool_status(settings(ctx).home, name)
    _show_report(ctx, report)


_SERVED_NOTES = {
    "idle": "no volume active; opened on demand",
    "serving": "a server process serves its active volumes",
}


def _state_text(d: dict[str, Any]) -> str:
    """E.g. "active, idle (no volume active; opened on demand)": the catalog's state, then
    how the engine serves the pool (``ops.listings.served_state``)."""
    served = d.get("served")
    if served is None:
        return str(d["state"])
    note = _SERVED_NOTES.get(served)
    return f"{d['state']}, {served}" + (f" ({note})" if note else "")


def _show_report(ctx: typer.Context, report: PoolReport) -> None:
    if settings(ctx).json:
        emit_json(report.as_dict())
        return
    d = report.as_dict()
    rows: list[tuple[str, Any]] = [
        ("pool", d["name"]),
        ("engine", d["engine"]),
        ("state", _state_text(d)),
        ("mode", d["mode"] or "-"),
        ("data", f"{percent(d['data_used_percent'])} of {size(d['data_size'])} used"),
        (
            "metadata",
            f"{percent(d['metadata_used_percent'])} of {d['total_metadata_blocks']} blocks used",
        ),
        ("block size", size(d["block_size"])),
        ("volumes", f"{d['volumes']} ({d['active_volumes']} active)"),
        ("transaction id", d["transaction_id"]),
        ("no space", d["no_space"]),
    ]
    fields(ctx, rows)
    for text in report.warnings:
        warn(ctx, text)


@app.command("extend")
def extend(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pool name.")],
    size_text: Annotated[
        str | None,
        typer.Option(
            "--size", help="New data size (file-backed pools; devices: default all of it)."
        ),
    ] = None,
) -> None:
    """Grow the pool's data space (files grow first; devices must be bigger already)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import extend_pool
    from thinmgr.ops.units import parse_size

    new_size = None if size_text is None else parse_size(size_text)
    with open_manager(settings(ctx).home) as mgr:
        report = extend_pool(mgr, name, new_size, stage_reporter(ctx))  # type: ignore[arg-type]
    _show_report(ctx, report)


@app.command("activate")
def activate(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Pool name.")]) -> None:
    """Serve the pool (after a reboot: reattach devices, bring back active volumes)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import activate_pool

    with open_manager(settings(ctx).home) as mgr:
        notes = activate_pool(mgr, name)
    if settings(ctx).json:
        emit_json({"name": name, "active": True, "notes": notes})
    else:
        for note in notes:
            say(ctx, note)
        say(ctx, f"pool {name} is active")


@app.command("deactivate")
def deactivate(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Pool name.")]) -> None:
    """Stop serving the pool (refused while volumes are active)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import deactivate_pool

    with open_manager(settings(ctx).home) as mgr:
        deactivate_pool(mgr, name)
    if settings(ctx).json:
        emit_json({"name": name, "active": False})
    else:
        say(ctx, f"pool {name} is inactive")


@app.command("destroy")
def destroy(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pool name.")],
    force: Annotated[
        bool, typer.Option("--force", help="Destroy it with its (inactive) volumes.")
    ] = False,
) -> None:
    """Remove a pool and the files thinmgr made for it (refused while volumes are active)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import destroy_pool

    with open_manager(settings(ctx).home) as mgr:
        destroy_pool(mgr, name, force=force)
    if settings(ctx).json:
        emit_json({"name": name, "destroyed": True})
    else:
        say(ctx, f"destroyed pool {name}")


@app.command("check")
def check(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Pool name.")]) -> None:
    """Check the pool's committed metadata (exit 1 on problems)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import check_pool

    with open_manager(settings(ctx).home) as mgr:
        report = check_pool(mgr, name)
    if settings(ctx).json:
        emit_json(report.as_dict())
    else:
        for problem in report.problems:
            say(ctx, str(problem))
        if report.unlisted:
            say(ctx, f"... {report.unlisted} more problems not listed")
        say(ctx, f"pool {name}: {'clean' if report.clean else 'problems found'}")
    if not report.clean:
        raise typer.Exit(int(ExitCode.CHECK_FAILED))


@app.command("dump")
def dump(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pool name.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (atomically).")
    ] = None,
) -> None:
    """thin_dump XML of the pool's committed metadata."""
    from thinmgr.format.dump import dump_xml
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import pool_metadata

    with open_manager(settings(ctx).home) as mgr, pool_metadata(mgr, name) as md:
        write_chunks(dump_xml(md), output)
