"""`thinmgr volume ...`: thin volumes in a pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from thinmgr.cli.manager_output import fields, listing, say, size, warn
from thinmgr.cli.output import emit_json, settings

if TYPE_CHECKING:
    from thinmgr.ops.listings import VolumeInfo

app = typer.Typer(help="Create and manage thin volumes.", no_args_is_help=True)

Pool = Annotated[str, typer.Argument(help="Pool name.")]
Name = Annotated[str, typer.Argument(help="Volume name.")]


def show(ctx: typer.Context, info: VolumeInfo) -> None:
    if settings(ctx).json:
        emit_json(info.as_dict())
        return
    rows = [
        ("pool", info.pool),
        ("volume", info.name),
        ("thin id", info.dev_id),
        ("kind", info.kind + (f" of {info.origin}" if info.origin else "")),
        ("size", size(info.size)),
        ("read-only", "yes" if info.read_only else "no"),
        ("state", info.state),
        ("created", info.created_at),
    ]
    if info.mapped_bytes is not None:
        rows.append(("mapped", f"{size(info.mapped_bytes)} ({info.mapped_blocks} blocks)"))
    if info.path is not None:
        rows.append(("path", info.path))
    if info.device is not None:
        rows.append(("device", f"{info.device} (open: {info.open_count})"))
    fields(ctx, rows)


@app.command("create")
def create(
    ctx: typer.Context,
    pool: Pool,
    name: Name,
    size_text: Annotated[str, typer.Option("--size", help="Virtual size, e.g. 10G.")],
) -> None:
    """Create a thin volume (no space is used until it is written)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.units import parse_size
    from thinmgr.ops.volumes import create_volume

    nbytes = parse_size(size_text)
    with open_manager(settings(ctx).home) as mgr:
        info = create_volume(mgr, pool, name, nbytes)
    if settings(ctx).json:
        emit_json(info.as_dict())
    else:
        say(ctx, f"created volume {pool}/{name} ({size(info.size)}, thin id {info.dev_id})")


@app.command("list")
def list_(
    ctx: typer.Context, pool: Annotated[str | None, typer.Argument(help="Only this pool.")] = None
) -> None:
    """List volumes (from the catalog; takes no lock)."""
    from thinmgr.ops.listings import list_volumes

    volumes = list_volumes(settings(ctx).home, pool)
    if settings(ctx).json:
        emit_json([v.as_dict() for v in volumes])
        return
    listing(
        ctx,
        ["POOL", "NAME", "ID", "KIND", "ORIGIN", "SIZE", "RO", "STATE"],
        [
            (
                v.pool,
                v.name,
                v.dev_id,
                v.kind,
                v.origin or "",
                size(v.size),
                "ro" if v.read_only else "",
                v.state,
            )
            for v in volumes
        ],
        right=("ID", "SIZE"),
    )


@app.command("show")
def show_cmd(ctx: typer.Context, pool: Pool, name: Name) -> None:
    """A volume's catalog record and what the engine reports (mapped space, device)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import show_volume

    with open_manager(settings(ctx).home) as mgr:
        show(ctx, show_volume(mgr, pool, name))


@app.command("resize")
def resize(
    ctx: typer.Context,
    pool: Pool,
    name: Name,
    size_text: Annotated[str, typer.Option("--size", help="New virtual size (grow only).")],
) -> None:
    """Grow a volume's virtual size."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.units import parse_size
    from thinmgr.ops.volumes import resize_volume

    nbytes = parse_size(size_text)
    with open_manager(settings(ctx).home) as mgr:
        show(ctx, resize_volume(mgr, pool, name, nbytes))


@app.command("activate")
def activate(ctx: typer.Context, pool: Pool, name: Name) -> None:
    """Expose the volume as a block device; prints its path."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import activate_volume

    with open_manager(settings(ctx).home) as mgr:
        info = activate_volume(mgr, pool, name)
    if settings(ctx).json:
        emit_json(info.as_dict())
    else:
        typer.echo(info.path or info.device)


@app.command("deactivate")
def deactivate(
    ctx: typer.Context,
    pool: Pool,
    name: Name,
    force: Annotated[bool, typer.Option("--force", help="Even while it is open.")] = False,
) -> None:
    """Remove the volume's block device (refused while open unless --force)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import deactivate_volume

    with open_manager(settings(ctx).home) as mgr:
        deactivate_volume(mgr, pool, name, force=force)
    if settings(ctx).json:
        emit_json({"pool": pool, "name": name, "state": "inactive"})
    else:
        say(ctx, f"deactivated {pool}/{name}")


@app.command("remove")
def remove(
    ctx: typer.Context,
    pool: Pool,
    name: Name,
    force: Annotated[
        bool, typer.Option("--force", help="Even while it is mounted or open.")
    ] = False,
) -> None:
    """Delete a volume (refused while open unless --force; busy removals are deferred)."""
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import remove_volume

    with open_manager(settings(ctx).home) as mgr:
        result = remove_volume(mgr, pool, name, force=force)
    if settings(ctx).json:
        emit_json(result.as_dict())
    elif result.deferred:
        warn(
            ctx,
            f"{pool}/{name} is busy: its removal is deferred; the next command on the pool "
            "or `thinmgr doctor --fix` finishes it",
        )
    else:
        say(ctx, f"removed {pool}/{name}")
