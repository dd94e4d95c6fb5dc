"""`thinmgr commit SOURCE IMAGE[:TAG]`: a volume or a container's disk becomes an image's top layer.

1. Under the pool lock, an O(1) read-only snapshot of the source becomes the new layer's
   device. A running container's file system is frozen through ``/proc/PID/root`` (FIFREEZE
   on its root directory reaches the superblock from the host, whatever its mount namespace);
   a volume mounted on the host is frozen at its mount point, as `thinmgr snapshot` does.
   Such a live file system is trimmed first (FITRIM), so that blocks of files it deleted or
   rewrote are unmapped instead of carried into the layer.
2. The layer's identity is its block diff against the layer the source descends from (the
   first device up its origin chain that holds a layer, or none): ``ops.layers.change_digest``
   hashes the changed runs and their data, found in the pool metadata (so the cost follows
   what changed, not the image size); that sha256 is the layer's digest and diff id, and the
   chain id follows the OCI rule from the parent's. No file is written: `thinmgr layer
   export` makes a portable layer-diff file when one is wanted.
3. The layer and image rows are recorded; the image inherits the config of the image it
   descends from. When the pool already holds that chain id, it is shared and the new
   snapshot dropped.

A failure at any point removes the snapshot and whatever rows were made.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.models import Container, ContainerState, Device, Image, Layer, Pool
from thinmgr.errors import ConflictError, NotFoundError, ThinmgrError, UsageError
from thinmgr.kernel.freeze import HeldMount, hold_mount, hold_path
from thinmgr.ops import layer_store
from thinmgr.ops.image_refs import parse_ref
from thinmgr.ops.images import (
    ImageInfo,
    chain_of,
    get_image,
    image_info,
    refuse_existing,
    synthetic_config_digest,
)
from thinmgr.ops.manager import Manager, get_device, get_pool

MAX_ORIGIN_DEPTH = 4096  # a longer origin chain is a loop in a damaged catalog


@dataclass
class CommitResult:
    image: ImageInfo
    source: str
    layer_device: str
    chain_id: str
    parent_chain_id: str | None
    data_bytes: int
    discard_bytes: int
    shared: bool  # the pool held this chain id already
    seconds: float
    trimmed_bytes: int | None = None  # free space discarded first (live file systems only)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image"] = self.image.as_dict()
        return data


@dataclass(frozen=True)
class _Source:
    pool: str
    device: layer_store.LayerDevice
    freeze_at: str | None  # a running container's root (/proc/PID/root), to freeze it
    mounted_device: str | None  # a block device mounted somewhere (hold_mount finds it)
    stopped_container: bool  # a container's disk that no namespace mounts any more
    parent: layer_store.LayerDevice | None  # the parent layer's device
    parent_layer: int | None
    parent_chain: str | None
    config: dict[str, Any]
    label: str


def next_chain_id(parent_chain: str | None, diff_id: str) -> str:
    """OCI image spec, "ChainID": ChainID(L0) = DiffID(L0), else
    sha256(ChainID(parent) + " " + DiffID)."""
    if parent_chain is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()


def _find_source(session: Session, text: str) -> tuple[Pool, Device, Container | None]:
    if "/" in text:
        pool_name, _, name = text.partition("/")
        if not pool_name or not name or "/" in name:
            raise UsageError(f"commit source {text!r} is neither POOL/VOLUME nor a container name")
        pool = get_pool(session, pool_name)
        return pool, get_device(session, pool, name), None
    container = session.scalars(select(Container).where(Container.name == text)).one_or_none()
    if container is None:
        raise NotFoundError(
            f"no container named {text!r}",
            hint="Give a container name (`thinmgr ps -a`) or POOL/VOLUME.",
        )
    device = container.device
    return device.pool, device, container


def _describe(session: Session, mgr: Manager, text: str) -> _Source:
    pool, device, container = _find_source(session, text)
    parent: Layer | None = None
    cursor: Device | None = device
    for _ in range(MAX_ORIGIN_DEPTH):
        if cursor is None:
            break
        parent = session.scalars(select(Layer).where(Layer.device_id == cursor.id)).one_or_none()
        if parent is not None:
            break
        cursor = cursor.origin
    config: dict[str, Any] = {}
    if container is not None and container.image is not None:
        config = dict(container.image.config or {})
    elif parent is not None:
        image = session.scalars(select(Image).where(Image.top_layer_id == parent.id)).first()
        if image is not None:
            config = dict(image.config or {})
    freeze_at = mounted_device = None
    if container is not None and container.state is ContainerState.RUNNING:
        freeze_at = f"/proc/{container.pid}/root"
    else:
        h = mgr.handle(pool)
        active_device = h.engine.volume_device(h.spec, device.thin_id)
        if active_device is not None:
            mounted_device = str(active_device)
    parent_device = None if parent is None else layer_store.device_of(parent.device)
    if parent_device is not None and parent_device.size != device.virtual_size_bytes:
        raise ConflictError(
            f"{text!r} has {device.virtual_size_bytes} bytes but the layer it descends from "
            f"has {parent_device.size}; a layer's diff needs equal sizes",
            hint="Commit a snapshot of the layer that has not been resized.",
        )
    return _Source(
        pool=pool.name,
        device=layer_store.device_of(device),
        freeze_at=freeze_at,
        mounted_device=mounted_device,
        stopped_container=container is not None and freeze_at is None and mounted_device is None,
        parent=parent_device,
        parent_layer=None if parent is None else parent.id,
        parent_chain=None if parent is None else parent.chain_id,
        config=config,
        label=(f"commit of container {container.name}" if container else f"commit of {text}"),
    )


def commit(mgr: Manager, source: str, ref_text: str) -> CommitResult:
    """Make image ``ref_text`` whose top layer is a snapshot of ``source`` (module doc)."""
    from thinmgr.ops.layers import change_digest

    ref = parse_ref(ref_text)
    started = time.perf_counter()
    with mgr.catalog.read() as session:
        refuse_existing(session, ref)
        src = _describe(session, mgr, source)
    with _held(src) as held:
        freeze_at = None if held is None else held.path
        trimmed = _trim_stopped(mgr, src) if src.stopped_container else _trim(freeze_at)
        temp_name = f"commit-{secrets.token_hex(6)}"
        with mgr.writing(src.pool) as h:
            snap = layer_store.create_snapshot(mgr, h, temp_name, src.device, freeze_at=freeze_at)
    made_layer: list[int] = []
    try:
        exported = change_digest(
            mgr, src.pool, temp_name, parent=None if src.parent is None else src.parent.name
        )
        diff_id = f"sha256:{exported.digest}"
        chain_id = next_chain_id(src.parent_chain, diff_id)
        with mgr.writing(src.pool) as h:
            with mgr.catalog.write() as session:
                refuse_existing(session, ref)
                existing = layer_store.find_layer(session, h.id, chain_id)
                if existing is None:
                    device = session.get_one(Device, snap.row)
                    final_name = layer_store.layer_device_name(chain_id)
                    if get_device_or_none(session, h.id, final_name) is not None:
                        raise ConflictError(
                            f"pool {src.pool!r} has a device named {final_name!r} already",
                            hint=f"Remove it (`thinmgr volume remove {src.pool} {final_name}`).",
                        )
                    device.name = final_name
                    layer = Layer(
                        pool_id=h.id,
                        digest=diff_id,
                        diff_id=diff_id,
                        chain_id=chain_id,
                        parent_id=src.parent_layer,
                        device_id=snap.row,
                        size_bytes=exported.data_bytes,
                    )
                    session.add(layer)
                    session.flush()
                    made_layer.append(layer.id)
                    top, shared, layer_name = layer.id, False, final_name
                else:
                    top, shared, layer_name = existing.id, True, existing.device.name
                diff_ids = [entry.diff_id for entry in chain_of(session.get_one(Layer, top))]
                session.add(
                    Image(
                        name=ref.name,
                        tag=ref.tag,
                        top_layer_id=top,
                        pool_id=h.id,
                        digest=synthetic_config_digest(src.config, diff_ids),
                        config=src.config,
                        source=src.label,
                    )
                )
            if shared:
                layer_store.forget(mgr, h, [], [snap.row])
    except BaseException:
        with mgr.writing(src.pool) as h:
            layer_store.forget(mgr, h, made_layer, [snap.row])
        raise
    with mgr.catalog.read() as session:
        image = image_info(session, get_image(session, ref))
    return CommitResult(
        image=image,
        source=source,
        layer_device=layer_name,
        chain_id=chain_id,
        parent_chain_id=src.parent_chain,
        data_bytes=exported.data_bytes,
        discard_bytes=exported.discard_bytes,
        shared=shared,
        seconds=time.perf_counter() - started,
        trimmed_bytes=trimmed,
    )


@contextlib.contextmanager
def _held(src: _Source) -> Iterator[HeldMount | None]:
    """The source's mounted file system, held open for the trim and the frozen snapshot.

    Held, because the path it is reached by can stop resolving meanwhile: a container's
    /proc/PID/root when it exits (then there is nothing mounted left to freeze), or the root
    of whatever process ``hold_mount`` found the mount through.
    """
    held: HeldMount | None = None
    if src.freeze_at is not None:
        with contextlib.suppress(ThinmgrError):  # the container exited since: unmounted
            held = hold_path(src.freeze_at)
    elif src.mounted_device is not None:
        held = hold_mount(src.mounted_device)
    try:
        yield held
    finally:
        if held is not None:
            held.close()


def _trim(mount_point: str | None) -> int | None:
    """Discard the free space of a mounted source, so the layer maps only live data.

    Without it a layer carries every block its file system ever freed (kernel/trim.py). An
    unmounted volume is not trimmed: what it holds is the user's, file system or not. A
    trim that fails is only a missed saving: the commit goes on, as it would on a device
    that cannot discard.
    """
    from thinmgr.kernel.trim import trim_free_space

    if mount_point is None:
        return None
    try:
        return trim_free_space(mount_point)
    except ThinmgrError:
        return None


def _trim_stopped(mgr: Manager, src: _Source) -> int | None:
    """A stopped container's disk (thinmgr's own ext4) mounted briefly on the host to trim it.

    Build-and-clean-up commands (install, then delete caches) are usually committed after
    they exit; without this their deleted files would stay in the layer. Done under the pool
    lock, so that nothing else activates or removes the device meanwhile; the device is left
    as active or inactive as it was. Failures only skip the saving (``_trim``).
    """
    from thinmgr.kernel.trim import trim_free_space

    try:
        with mgr.writing(src.pool) as h:
            was_active = h.engine.volume_device(h.spec, src.device.thin_id) is not None
            path = layer_store.activate(mgr, h, src.device)
            try:
                with layer_store.mounted(path, h.spec.run_dir) as point:
                    trimmed = trim_free_space(str(point))
                layer_store.flush_device(path)
            finally:
                if not was_active:
                    layer_store.deactivate(mgr, h, src.device)
    except ThinmgrError:
        return None
    return trimmed


def get_device_or_none(session: Session, pool_id: int, name: str) -> Device | None:
    return session.scalars(
        select(Device).where(Device.pool_id == pool_id, Device.name == name)
    ).one_or_none()
