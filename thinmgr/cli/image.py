"""`thinmgr image import|list|show|tree|rm`: container images as stacks of thin snapshots."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from thinmgr.cli.manager_output import fields, listing, say, size
from thinmgr.cli.output import emit_json, settings

if TYPE_CHECKING:
    from thinmgr.ops.images import ImageInfo, ImportEvent, PoolTree

app = typer.Typer(
    help="Import container images (docker save, OCI layout or archive, rootfs tar) as "
    "stacks of thin snapshots, one per layer (docs/images.md).",
    no_args_is_help=True,
)

Ref = Annotated[str, typer.Argument(metavar="NAME[:TAG]", help="Image name and tag.")]


@contextmanager
def _progress(ctx: typer.Context) -> Iterator[Callable[[ImportEvent], None] | None]:
    """A rich progress bar on a terminal (two steps per layer: check, then apply)."""
    s = settings(ctx)
    if s.json or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=s.err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("opening the image", total=None)

        def show(event: ImportEvent) -> None:
            total = 2 * event.count
            layer = f"layer {event.index + 1}/{event.count}"
            if event.stage == "scan":
                bar.update(task, total=total, completed=event.index, description=f"check {layer}")
            elif event.stage == "share":
                bar.update(
                    task,
                    completed=event.count + event.index + 1,
                    description=f"{layer} already in the pool",
                )
            elif event.stage == "apply":
                bar.update(task, completed=event.count + event.index, description=f"apply {layer}")
            elif event.stage == "commit":
                bar.update(task, completed=event.count + event.index + 1)

        yield show


@app.command("import")
def import_(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool to hold the layers.")],
    ref: Ref,
    source: Annotated[
        Path,
        typer.Argument(
            help="An OCI layout directory, or a docker save / OCI archive / rootfs tarball "
            "(plain, gz, bz2, xz or zstd)."
        ),
    ],
    size_text: Annotated[
        str | None,
        typer.Option("--size", help="Virtual size of a new bottom layer's volume [default: 8G]."),
    ] = None,
    source_tag: Annotated[
        str | None,
        typer.Option("--from-tag", help="Which image of a source that holds several."),
    ] = None,
) -> None:
    """Import an image: each layer becomes a snapshot of the one below; layers the pool
    already holds (same chain id) are shared."""
    from thinmgr.ops.images import import_image
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.units import parse_size

    nbytes = None if size_text is None else parse_size(size_text)
    with open_manager(settings(ctx).home) as mgr, _progress(ctx) as progress:
        result = import_image(
            mgr, pool, ref, source, size=nbytes, source_tag=source_tag, progress=progress
        )
    if settings(ctx).json:
        emit_json(result.as_dict())
        return
    seconds = max(result.seconds, 1e-6)
    say(
        ctx,
        f"imported {result.image.ref} into pool {pool}: {result.layers_imported} layer(s) "
        f"imported, {result.layers_shared} shared; {result.entries} entries, "
        f"{size(result.content_bytes)} in {result.seconds:.2f} s "
        f"({result.content_bytes / seconds / (1 << 20):.1f} MiB/s)",
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    pool: Annotated[str | None, typer.Argument(help="Only this pool.")] = None,
) -> None:
    """List images."""
    from thinmgr.ops.images import list_images
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        images = list_images(mgr, pool)
    if settings(ctx).json:
        emit_json([image.as_dict() for image in images])
        return
    listing(
        ctx,
        ["NAME", "TAG", "POOL", "ID", "LAYERS", "SIZE", "CREATED"],
        [
            (
                i.name,
                i.tag,
                i.pool or "",
                _short(i.digest),
                len(i.layers),
                size(i.size_bytes),
                i.created_at,
            )
            for i in images
        ],
        right=("LAYERS", "SIZE"),
    )


def _short(digest: str | None) -> str:
    return "" if digest is None else digest.partition(":")[2][:12]


def _show(ctx: typer.Context, info: ImageInfo) -> None:
    from thinmgr.cli.output import table

    fields(
        ctx,
        [
            ("image", info.ref),
            ("pool", info.pool or "-"),
            ("id", info.digest or "-"),
            ("source", info.source or "-"),
            ("created", info.created_at),
            ("size", size(info.size_bytes)),
            ("config", ", ".join(f"{k}={v}" for k, v in sorted(info.config.items())) or "-"),
        ],
    )
    table(
        ctx,
        None,
        ["#", "DEVICE", "THIN ID", "SIZE", "DIGEST", "DIFF ID", "CHAIN ID"],
        [
            (
                n,
                la.device,
                la.thin_id,
                size(la.size_bytes),
                _short(la.digest),
                _short(la.diff_id),
                _short(la.chain_id),
            )
            for n, la in enumerate(info.layers)
        ],
        right=("#", "THIN ID", "SIZE"),
    )


@app.command("show")
def show(ctx: typer.Context, ref: Ref) -> None:
    """An image's record and its layers, bottom first."""
    from thinmgr.ops.images import show_image
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        info = show_image(mgr, ref)
    if settings(ctx).json:
        emit_json(info.as_dict())
    else:
        _show(ctx, info)


def _render_tree(ctx: typer.Context, trees: list[PoolTree]) -> None:
    from rich.tree import Tree

    from thinmgr.ops.image_tree import TreeNode

    def label(node: TreeNode) -> str:
        u = node.usage
        space = (
            "-"
            if u is None
            else f"mapped {size(u.mapped)}, exclusive {size(u.exclusive)}, shared {size(u.shared)}"
        )
        names = f" [bold]{', '.join(node.images)}[/bold]" if node.images else ""
        chain = node.layer.chain_id.partition(":")[2][:12]
        return f"{chain} {node.layer.device} (thin {node.layer.thin_id}): {space}{names}"

    def add(branch: Tree, nodes: list[TreeNode]) -> None:
        for node in nodes:
            add(branch.add(label(node)), node.children)

    if not trees:
        say(ctx, "no images")
    for pool_tree in trees:
        root = Tree(f"pool [bold]{pool_tree.pool}[/bold]")
        add(root, pool_tree.roots)
        settings(ctx).console.print(root)


@app.command("tree")
def tree(
    ctx: typer.Context,
    pool: Annotated[str | None, typer.Argument(help="Only this pool.")] = None,
) -> None:
    """Layers of all images as a tree per pool, with each layer device's mapped, exclusive
    and shared space (as thin_ls counts it)."""
    from thinmgr.ops.images import image_tree
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        trees = image_tree(mgr, pool)
    if settings(ctx).json:
        emit_json([t.as_dict() for t in trees])
    else:
        _render_tree(ctx, trees)


@app.command("rm")
def rm(
    ctx: typer.Context,
    ref: Ref,
    force: Annotated[
        bool, typer.Option("--force", help="Remove layer devices even while open.")
    ] = False,
) -> None:
    """Remove an image and the layers no other image, container or snapshot uses."""
    from thinmgr.ops.images import remove_image
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        result = remove_image(mgr, ref, force=force)
    if settings(ctx).json:
        emit_json(result.as_dict())
        return
    say(
        ctx,
        f"removed image {result.name}:{result.tag} and {len(result.removed_layers)} layer(s)",
    )
    for chain_id, why in result.kept_layers.items():
        say(ctx, f"kept layer {chain_id.partition(':')[2][:12]}: {why}")
    for chain_id in result.deferred:
        say(ctx, f"layer {chain_id.partition(':')[2][:12]} is busy; its removal is deferred")
