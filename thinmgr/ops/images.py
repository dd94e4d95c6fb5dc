"""Image use cases: import, list, show, tree, remove.

``import_image`` follows containerd's devmapper snapshotter (runtime-and-images.md 4.2): every
layer is read and checked first (``ImageSource.scan_layer``: digests, sizes, every tar
header) and nothing is created until all of them pass; then, bottom up, a layer whose chain
id the pool already holds is shared, and any other becomes a thin device -- a fresh ext4 for
the bottom layer, a snapshot of the parent layer's device above it -- filled by the confined
applier (``layers.apply``) while mounted on a private directory, then unmounted and
deactivated. The image row comes last. A failure or an interrupt at any point removes every
device and row this import made; layers it shared are not touched.

The whole import holds the pool's lock, so two imports of images that share layers cannot
both create the same chain id.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.models import Container, Device, DeviceState, Image, Layer, Pool
from thinmgr.errors import ConflictError, NotFoundError
from thinmgr.format.constants import SECTOR_SIZE
from thinmgr.ops import journal, layer_store
from thinmgr.ops.image_refs import ImageRef, parse_ref
from thinmgr.ops.image_tree import LayerFacts, TreeNode, Usage, build_forest
from thinmgr.ops.manager import Manager, PoolHandle, get_pool
from thinmgr.ops.volumes import round_volume_size

if TYPE_CHECKING:
    from thinmgr.layers.apply import ApplyStats
    from thinmgr.layers.image_source import ImageSource, ImportLimits, LayerScan


# --------------------------------------------------------------------------- result types


@dataclass
class LayerInfo:
    digest: str
    diff_id: str
    chain_id: str
    device: str
    thin_id: int
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageInfo:
    name: str
    tag: str
    pool: str | None
    digest: str | None
    config: dict[str, Any]
    source: str | None
    created_at: str
    layers: list[LayerInfo]  # bottom first

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_bytes for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ref"] = self.ref
        data["size_bytes"] = self.size_bytes
        return data


@dataclass(frozen=True)
class ImportEvent:
    """One step of an import, for a progress display: ``stage`` is "scan", "share",
    "create", "apply" or "commit"; ``index`` the layer (0 = bottom) of ``count``."""

    stage: str
    index: int
    count: int
    detail: str = ""


ProgressFn = Callable[[ImportEvent], None]


@dataclass
class ImportResult:
    image: ImageInfo
    layers_imported: int
    layers_shared: int
    content_bytes: int  # bytes of regular files applied (imported layers only)
    entries: int
    seconds: float
    # Wall time per stage: scan, create (mkfs or snapshot), activate, apply, commit
    # (unmount and deactivate), record (catalog rows).
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image.as_dict(),
            "layers_imported": self.layers_imported,
            "layers_shared": self.layers_shared,
            "content_bytes": self.content_bytes,
            "entries": self.entries,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class RemoveImageResult:
    name: str
    tag: str
    removed_layers: list[str]  # chain ids
    kept_layers: dict[str, str]  # chain id -> why it stays
    deferred: list[str]  # devices whose removal waits for a holder

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- queries


def _layer_info(layer: Layer) -> LayerInfo:
    return LayerInfo(
        layer.digest,
        layer.diff_id,
        layer.chain_id,
        layer.device.name,
        layer.device.thin_id,
        layer.size_bytes,
    )


def chain_of(layer: Layer | None) -> list[Layer]:
    """A layer and its parents, bottom first."""
    out: list[Layer] = []
    seen: set[int] = set()
    while layer is not None and layer.id not in seen:
        seen.add(layer.id)
        out.append(layer)
        layer = layer.parent
    out.reverse()
    return out


def image_info(session: Session, image: Image) -> ImageInfo:
    pool = session.get(Pool, image.pool_id) if image.pool_id is not None else None
    return ImageInfo(
        name=image.name,
        tag=image.tag,
        pool=None if pool is None else pool.name,
        digest=image.digest,
        config=dict(image.config or {}),
        source=image.source,
        created_at=image.created_at.isoformat(timespec="seconds"),
        layers=[_layer_info(layer) for layer in chain_of(image.top_layer)],
    )


def find_image(session: Session, ref: ImageRef) -> Image | None:
    return session.scalars(
        select(Image).where(Image.name == ref.name, Image.tag == ref.tag)
    ).one_or_none()


def get_image(session: Session, ref: ImageRef) -> Image:
    image = find_image(session, ref)
    if image is None:
        raise NotFoundError(f"no image {ref}", hint="See `thinmgr image list`.")
    return image


def list_images(mgr: Manager, pool_name: str | None = None) -> list[ImageInfo]:
    with mgr.catalog.read() as session:
        query = select(Image).order_by(Image.name, Image.tag)
        if pool_name is not None:
            query = query.where(Image.pool_id == get_pool(session, pool_name).id)
        return [image_info(session, image) for image in session.scalars(query)]


def show_image(mgr: Manager, ref_text: str) -> ImageInfo:
    ref = parse_ref(ref_text)
    with mgr.catalog.read() as session:
        return image_info(session, get_image(session, ref))


def refuse_existing(session: Session, ref: ImageRef) -> None:
    if find_image(session, ref) is not None:
        raise ConflictError(
            f"image {ref} exists already",
            hint=f"Remove it first (`thinmgr image rm {ref}`) or choose another tag.",
        )


def synthetic_config_digest(config: dict[str, Any], diff_ids: list[str]) -> str:
    """An image id for images that bring no config blob (a rootfs tar, a commit): the
    sha256 of a minimal OCI config naming the same run settings and layers."""
    document = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- import


class _Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM held back while an undo runs, so that a second Ctrl-C cannot leave
    half of it undone; delivered when it ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _quiet(_event: ImportEvent) -> None:
    return None


def import_image(
    mgr: Manager,
    pool_name: str,
    ref_text: str,
    source: Path,
    *,
    size: int | None = None,
    source_tag: str | None = None,
    limits: ImportLimits | None = None,
    progress: ProgressFn | None = None,
) -> ImportResult:
    """Import the image at ``source`` into ``pool_name`` as NAME[:TAG] (see the module doc).

    ``size`` is the virtual size of a new bottom layer's device (default 8 GiB); layers above
    inherit their parent's. ``source_tag`` picks one image of a source holding several.
    """
    from thinmgr.layers.image_formats import chain_ids
    from thinmgr.layers.image_source import DEFAULT_LIMITS, open_image_source

    ref = parse_ref(ref_text)
    report = progress or _quiet
    timer = _Timer()
    started = time.perf_counter()
    with mgr.catalog.read() as session:
        get_pool(session, pool_name)
        refuse_existing(session, ref)
    with open_image_source(source, tag=source_tag, limits=limits or DEFAULT_LIMITS) as src:
        count = len(src.description.layers)
        scans: list[LayerScan] = []
        with timer.stage("scan"):
            for index in range(count):
                report(ImportEvent("scan", index, count))
                scans.append(src.scan_layer(index))
        chains = chain_ids([scan.diff_id for scan in scans])
        with mgr.writing(pool_name) as h:
            with mgr.catalog.read() as session:
                refuse_existing(session, ref)  # again, under the lock
            made = _Made()
            try:
                result = _import_layers(mgr, h, src, scans, chains, size, made, timer, report)
                with timer.stage("record"):
                    _record_image(mgr, h, ref, src, scans, made.top, source)
            except BaseException:
                with _signals_held():
                    layer_store.forget(mgr, h, made.layers[::-1], made.devices[::-1])
                raise
    with mgr.catalog.read() as session:
        image = image_info(session, get_image(session, ref))
    result.image = image
    result.seconds = time.perf_counter() - started
    result.timings = timer.totals
    return result


@dataclass
class _Made:
    """What an import created so far (undone on failure) and where the stack stands."""

    layers: list[int] = field(default_factory=list)  # Layer rows, bottom first
    devices: list[int] = field(default_factory=list)  # Device rows, bottom first
    top: int | None = None  # the current top Layer row


def _import_layers(
    mgr: Manager,
    h: PoolHandle,
    src: ImageSource,
    scans: list[LayerScan],
    chains: list[str],
    size: int | None,
    made: _Made,
    timer: _Timer,
    report: ProgressFn,
) -> ImportResult:
    block_bytes = h.spec.data_block_sectors * SECTOR_SIZE
    base_size = round_volume_size(size or layer_store.DEFAULT_LAYER_SIZE, block_bytes)
    count = len(scans)
    imported = shared = content = entries = 0
    parent_device: layer_store.LayerDevice | None = None
    # The last filled layer stays active until the next one is: the user engine's server
    # then keeps running for the whole import instead of starting and stopping for every
    # layer (about 0.5 s each; benchmarks/image_import.py).
    held: layer_store.LayerDevice | None = None
    try:
        for index, (scan, chain) in enumerate(zip(scans, chains, strict=True)):
            with mgr.catalog.read() as session:
                existing = layer_store.find_layer(session, h.id, chain)
                if existing is not None:
                    made.top = existing.id
                    parent_device = layer_store.device_of(existing.device)
            if existing is not None:
                report(ImportEvent("share", index, count, chain))
                shared += 1
                continue
            name = layer_store.layer_device_name(chain)
            report(ImportEvent("create", index, count, name))
            with timer.stage("create"):
                if parent_device is None:
                    device = layer_store.create_base(mgr, h, name, base_size)
                else:
                    device = layer_store.create_snapshot(mgr, h, name, parent_device)
                made.devices.append(device.row)
            with timer.stage("activate"):
                path = layer_store.activate(mgr, h, device)
            if held is not None:
                with timer.stage("commit"):
                    layer_store.deactivate(mgr, h, held)
                held = None
            try:
                stats = _fill(src, index, path, h, base=parent_device is None, timer=timer)
            except BaseException:
                layer_store.deactivate(mgr, h, device)
                raise
            held = device
            report(ImportEvent("commit", index, count, name))
            with timer.stage("record"):
                made.top = layer_store.record_layer(
                    mgr,
                    h,
                    device,
                    digest=scan.digest,
                    diff_id=scan.diff_id,
                    chain_id=chain,
                    parent=made.top,
                    size_bytes=scan.content_bytes,
                )
            made.layers.append(made.top)
            parent_device = device
            imported += 1
            content += stats.content_bytes
            entries += stats.entries
    finally:
        if held is not None:
            with timer.stage("commit"):
                layer_store.deactivate(mgr, h, held)
    placeholder = ImageInfo("", "", None, None, {}, None, "", [])
    return ImportResult(placeholder, imported, shared, content, entries, 0.0)


def _fill(
    src: ImageSource, index: int, path: Path, h: PoolHandle, *, base: bool, timer: _Timer
) -> ApplyStats:
    """Apply layer ``index`` onto the active device at ``path`` (a fresh file system first
    for a base layer); unmounted and flushed to the pool when it returns."""
    from thinmgr.layers.apply import apply_layer

    if base:
        with timer.stage("mkfs"):
            layer_store.make_filesystem(path)
    with layer_store.mounted(path, h.spec.run_dir) as root:
        if base:
            layer_store.remove_empty_lost_found(root)
        with timer.stage("apply"):
            stats = apply_layer(src, index, root)
        unmount_start = time.perf_counter()
    layer_store.flush_device(path)
    timer.add("commit", time.perf_counter() - unmount_start)
    return stats


def _record_image(
    mgr: Manager,
    h: PoolHandle,
    ref: ImageRef,
    src: ImageSource,
    scans: list[LayerScan],
    top: int | None,
    source: Path,
) -> None:
    description = src.description
    config = dict(description.config)
    digest = description.config_digest or synthetic_config_digest(
        config, [scan.diff_id for scan in scans]
    )
    with mgr.catalog.write() as session:
        refuse_existing(session, ref)
        session.add(
            Image(
                name=ref.name,
                tag=ref.tag,
                top_layer_id=top,
                pool_id=h.id,
                digest=digest,
                config=config,
                source=f"{description.kind}:{source.resolve()}",
            )
        )


# --------------------------------------------------------------------------- tree


@dataclass
class PoolTree:
    pool: str
    roots: list[TreeNode]
    block_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "block_size": self.block_size,
            "layers": [root.as_dict() for root in self.roots],
        }


def image_tree(mgr: Manager, pool_name: str | None = None) -> list[PoolTree]:
    """Every pool's (or one pool's) layers as a forest, with thin_ls-style space figures."""
    from thinmgr.format.ls import device_usage
    from thinmgr.ops.diff import pool_metadata

    with mgr.catalog.read() as session:
        query = select(Pool).order_by(Pool.name)
        if pool_name is not None:
            query = query.where(Pool.id == get_pool(session, pool_name).id)
        pools = list(session.scalars(query))
        gathered = []
        for pool in pools:
            layers = session.scalars(select(Layer).where(Layer.pool_id == pool.id)).all()
            if not layers and pool_name is None:
                continue
            facts = [
                LayerFacts(
                    layer.id,
                    layer.parent_id,
                    layer.chain_id,
                    layer.diff_id,
                    layer.device.name,
                    layer.device.thin_id,
                    layer.size_bytes,
                )
                for layer in layers
            ]
            tops: dict[int, list[str]] = {}
            for image in session.scalars(select(Image).where(Image.pool_id == pool.id)):
                if image.top_layer_id is not None:
                    tops.setdefault(image.top_layer_id, []).append(f"{image.name}:{image.tag}")
            gathered.append((mgr.handle(pool), facts, tops))
    trees = []
    for h, facts, tops in gathered:
        usage: dict[int, Usage] = {}
        block_bytes = h.spec.data_block_sectors * SECTOR_SIZE
        if facts:
            with mgr.locked(h.name), pool_metadata(h) as md:
                block_bytes = md.view.data_block_size * SECTOR_SIZE
                for u in device_usage(md, sharing=True):
                    usage[u.dev] = Usage(
                        u.mapped_blocks * block_bytes, u.exclusive_blocks * block_bytes
                    )
        trees.append(PoolTree(h.name, build_forest(facts, tops, usage), block_bytes))
    return trees


# --------------------------------------------------------------------------- remove


def remove_image(mgr: Manager, ref_text: str, *, force: bool = False) -> RemoveImageResult:
    """Delete the image, then every layer of it nothing else needs (top down). A layer stays
    while another image's stack, a layer stacked on it, or any other device made from its
    device (a container's disk, a snapshot) uses it."""
    ref = parse_ref(ref_text)
    with mgr.catalog.read() as session:
        image = get_image(session, ref)
        pool = session.get(Pool, image.pool_id) if image.pool_id is not None else None
    if pool is None:
        with mgr.catalog.write() as session:
            session.delete(get_image(session, ref))
        return RemoveImageResult(ref.name, ref.tag, [], {}, [])
    result = RemoveImageResult(ref.name, ref.tag, [], {}, [])
    with mgr.writing(pool.name) as h:
        with mgr.catalog.write() as session:
            image = get_image(session, ref)
            chain = [layer.id for layer in chain_of(image.top_layer)]
            session.delete(image)
        for layer_id in reversed(chain):
            with mgr.catalog.read() as session:
                layer = session.get_one(Layer, layer_id)
                chain_id, device_row = layer.chain_id, layer.device_id
                why = _still_needed(session, layer)
            if why is not None:
                # Everything below a kept layer is its parent chain: needed as well.
                result.kept_layers[chain_id] = why
                for below in chain[: chain.index(layer_id)]:
                    with mgr.catalog.read() as session:
                        kept = session.get_one(Layer, below)
                        result.kept_layers[kept.chain_id] = f"below kept layer {chain_id[:19]}"
                break
            with mgr.catalog.write() as session:
                session.delete(session.get_one(Layer, layer_id))
            result.removed_layers.append(chain_id)
            if not journal.remove_device(mgr, h, device_row, force=force):
                result.deferred.append(chain_id)
    return result


def _still_needed(session: Session, layer: Layer) -> str | None:
    """Why ``layer`` must stay (the image being removed is already gone), or None."""
    for image in session.scalars(select(Image).where(Image.pool_id == layer.pool_id)):
        if any(above.id == layer.id for above in chain_of(image.top_layer)):
            return f"used by image {image.name}:{image.tag}"
    child = session.scalars(select(Layer).where(Layer.parent_id == layer.id)).first()
    if child is not None:
        return f"layer {child.chain_id[:19]} is stacked on it"
    made_from = session.scalars(
        select(Device).where(
            Device.origin_id == layer.device_id, Device.state != DeviceState.DELETING
        )
    ).first()
    if made_from is not None:
        owner = session.scalars(
            select(Container).where(Container.device_id == made_from.id)
        ).first()
        if owner is not None:
            return f"container {owner.name!r} runs on a snapshot of it"
        return f"device {made_from.name!r} is a snapshot of it"
    return None
