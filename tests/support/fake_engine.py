"""An engine for unit tests: the ``Engine`` protocol over a JSON file, no kernel needed.

It behaves like an engine where the manager can tell: device ids (24-bit, no duplicates),
the transaction id's compare-and-swap, ENOSPC when data runs out, busy (open) volumes,
suspend, a held metadata snapshot, and a committed metadata view (made with thin_restore,
so `pool check` and `pool dump` read real metadata). Its state lives in
``RUN_DIR/fake-engine.json``, replaced atomically, so that several processes (the
concurrency test) share one pool, and a crash can be simulated between any two steps:
``CRASH.arm(n)`` raises ``SimulatedCrash`` (a BaseException, as uncatchable by the code
under test as SIGKILL is) at the n-th step boundary -- before or after each call that
changes the pool. Select it with THINMGR_ENGINE_FACTORY=tests.support.fake_engine:factory.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinmgr.engine.base import MetadataView, PoolMode, PoolSpec, PoolStatus, VolumeStatus
from thinmgr.errors import (
    BusyError,
    ConflictError,
    NoSpaceError,
    NotFoundError,
    UsageError,
)

STATE_FILE = "fake-engine.json"
MAX_DEV_ID = (1 << 24) - 1
FACTORY = "tests.support.fake_engine:factory"


class SimulatedCrash(BaseException):
    """The process "dies" here: nothing after this point runs (no except, but finally)."""


@dataclass
class CrashPlan:
    countdown: int | None = None
    boundaries: int = 0  # step boundaries passed since the last arm()

    def arm(self, n: int | None) -> None:
        self.countdown, self.boundaries = n, 0

    def boundary(self, what: str) -> None:
        self.boundaries += 1
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown < 0:
                self.countdown = None
                raise SimulatedCrash(what)


CRASH = CrashPlan()


def state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def load(run_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(state_path(run_dir).read_text())
    except FileNotFoundError:
        raise NotFoundError(f"fake engine: no pool in {run_dir}") from None
    return data


def save(run_dir: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".fake-")
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)
    os.replace(tmp, state_path(run_dir))


@contextmanager
def changing(run_dir: Path) -> Iterator[dict[str, Any]]:
    state = load(run_dir)
    yield state
    save(run_dir, state)


# --- helpers tests use to make the pool misbehave ---------------------------------------------


def set_volume(
    run_dir: Path, dev_id: int, *, open_count: int | None = None, busy: int | None = None
) -> None:
    """Make an active volume open (``open_count``) or busy for the next ``busy`` deactivations."""
    with changing(run_dir) as state:
        volume = state["volumes"][str(dev_id)]
        if open_count is not None:
            volume["open"] = open_count
        if busy is not None:
            volume["busy"] = busy


def write_blocks(run_dir: Path, dev_id: int, blocks: int) -> None:
    """Map ``blocks`` more data blocks to a device; NoSpaceError past the data space."""
    with changing(run_dir) as state:
        if state["used"] + blocks > state["nr_data_blocks"]:
            raise NoSpaceError("fake engine: no data space left (ENOSPC)")
        state["used"] += blocks
        state["devices"][str(dev_id)]["mapped"] += blocks


def tamper(run_dir: Path, **changes: Any) -> None:
    """Change the pool behind the manager's back (another tool)."""
    with changing(run_dir) as state:
        for key, value in changes.items():
            if key == "add_device":
                state["devices"][str(value)] = {"mapped": 0, "origin": None}
            elif key == "drop_device":
                state["devices"].pop(str(value), None)
            else:
                state[key] = value


class FakeEngine:
    def __init__(self, name: str = "user") -> None:
        self.name = name

    # --- pools -------------------------------------------------------------------------
    def format_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        CRASH.boundary("before format_pool")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "tid": 0,
            "nr_data_blocks": nr_data_blocks,
            "block_sectors": spec.data_block_sectors,
            "metadata_blocks": max(os.path.getsize(spec.metadata) // 4096, 1),
            "active": False,
            "used": 0,
            "devices": {},
            "volumes": {},
            "held": None,
            "suspended": [],
        }
        save(spec.run_dir, state)
        CRASH.boundary("after format_pool")

    def activate_pool(self, spec: PoolSpec) -> None:
        with changing(spec.run_dir) as state:
            state["active"] = True

    def deactivate_pool(self, spec: PoolSpec) -> None:
        with changing(spec.run_dir) as state:
            if state["volumes"]:
                raise BusyError("fake engine: the pool has active volumes")
            state["active"] = False

    def pool_status(self, spec: PoolSpec) -> PoolStatus:
        state = load(spec.run_dir)
        full = state["used"] >= state["nr_data_blocks"]
        return PoolStatus(
            transaction_id=state["tid"],
            data_block_sectors=state["block_sectors"],
            used_data_blocks=state["used"],
            total_data_blocks=state["nr_data_blocks"],
            used_metadata_blocks=min(6 + 2 * len(state["devices"]), state["metadata_blocks"]),
            total_metadata_blocks=state["metadata_blocks"],
            held_metadata_root=state["held"],
            mode=PoolMode.OUT_OF_DATA_SPACE if full else PoolMode.READ_WRITE,
            needs_check=False,
            active=state["active"],
        )

    def extend_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        if os.path.getsize(spec.data) < nr_data_blocks * spec.data_block_sectors * 512:
            raise UsageError("fake engine: the data device is smaller than the new size")
        with changing(spec.run_dir) as state:
            if nr_data_blocks < state["nr_data_blocks"]:
                raise UsageError("fake engine: pools cannot shrink")
            state["nr_data_blocks"] = nr_data_blocks

    # --- thin devices -------------------------------------------------------------------
    def _message(self, spec: PoolSpec, what: str) -> dict[str, Any]:
        CRASH.boundary(f"before {what}")
        state = load(spec.run_dir)
        if not state["active"]:
            raise BusyError("fake engine: the pool is not active")
        return state

    def _new_device(self, state: dict[str, Any], dev_id: int, origin: int | None) -> None:
        if not 0 <= dev_id <= MAX_DEV_ID:
            raise UsageError(f"fake engine: device id {dev_id} out of range")
        if str(dev_id) in state["devices"]:
            raise ConflictError(f"fake engine: device {dev_id} exists")
        mapped = 0 if origin is None else state["devices"][str(origin)]["mapped"]
        state["devices"][str(dev_id)] = {"mapped": mapped, "origin": origin}

    def create_thin(self, spec: PoolSpec, dev_id: int) -> None:
        state = self._message(spec, "create_thin")
        self._new_device(state, dev_id, None)
        save(spec.run_dir, state)
        CRASH.boundary("after create_thin")

    def create_snapshot(self, spec: PoolSpec, dev_id: int, origin_id: int) -> None:
        state = self._message(spec, "create_snapshot")
        if str(origin_id) not in state["devices"]:
            raise NotFoundError(f"fake engine: no origin device {origin_id}")
        if str(origin_id) in state["volumes"] and origin_id not in state["suspended"]:
            # The manager must suspend an active origin first (prior-art.md 3.11).
            raise ConflictError("fake engine: snapshot of an active origin that is not suspended")
        self._new_device(state, dev_id, origin_id)
        save(spec.run_dir, state)
        CRASH.boundary("after create_snapshot")

    def delete_thin(self, spec: PoolSpec, dev_id: int) -> None:
        state = self._message(spec, "delete_thin")
        if str(dev_id) not in state["devices"]:
            raise NotFoundError(f"fake engine: no device {dev_id}")
        if str(dev_id) in state["volumes"]:
            raise BusyError(f"fake engine: device {dev_id} is active")
        state["devices"].pop(str(dev_id))
        save(spec.run_dir, state)
        CRASH.boundary("after delete_thin")

    def set_transaction_id(self, spec: PoolSpec, current: int, new: int) -> None:
        state = self._message(spec, "set_transaction_id")
        if state["tid"] != current:
            raise ConflictError(f"fake engine: transaction id is {state['tid']}, not {current}")
        state["tid"] = new
        save(spec.run_dir, state)
        CRASH.boundary("after set_transaction_id")

    def thin_ids(self, spec: PoolSpec) -> set[int]:
        return {int(k) for k in load(spec.run_dir)["devices"]}

    # --- volumes -------------------------------------------------------------------------
    def activate_volume(
        self, spec: PoolSpec, dev_id: int, *, name: str, size_bytes: int, read_only: bool
    ) -> Path:
        device = Path(f"/dev/fake-thinmgr/{spec.name}/{name}")
        with changing(spec.run_dir) as state:
            if str(dev_id) not in state["devices"]:
                raise NotFoundError(f"fake engine: no device {dev_id}")
            volume = state["volumes"].setdefault(str(dev_id), {"open": 0, "busy": 0})
            volume.update(device=str(device), size=size_bytes, ro=read_only)
        return device

    def deactivate_volume(self, spec: PoolSpec, dev_id: int, *, force: bool = False) -> None:
        with changing(spec.run_dir) as state:
            volume = state["volumes"].get(str(dev_id))
            if volume is None:
                return
            if volume["busy"] > 0:
                volume["busy"] -= 1
                save(spec.run_dir, state)
                raise BusyError(f"fake engine: device {dev_id} is busy (EBUSY)")
            if volume["open"] > 0 and not force:
                raise BusyError(f"fake engine: device {dev_id} is open")
            state["volumes"].pop(str(dev_id))

    def resize_volume(self, spec: PoolSpec, dev_id: int, *, size_bytes: int) -> None:
        with changing(spec.run_dir) as state:
            volume = state["volumes"].get(str(dev_id))
            if volume is None:
                raise NotFoundError(f"fake engine: device {dev_id} is not active")
            if size_bytes < volume["size"]:
                raise UsageError("fake engine: volumes only grow")
            volume["size"] = size_bytes

    def volume_device(self, spec: PoolSpec, dev_id: int) -> Path | None:
        volume = load(spec.run_dir)["volumes"].get(str(dev_id))
        return Path(volume["device"]) if volume else None

    def volume_status(self, spec: PoolSpec, dev_id: int) -> VolumeStatus:
        state = load(spec.run_dir)
        device = state["devices"].get(str(dev_id))
        if device is None:
            raise NotFoundError(f"fake engine: no device {dev_id}")
        volume = state["volumes"].get(str(dev_id))
        return VolumeStatus(
            dev_id=dev_id,
            mapped_blocks=device["mapped"],
            highest_mapped_block=device["mapped"] - 1 if device["mapped"] else None,
            active=volume is not None,
            device=Path(volume["device"]) if volume else None,
            open_count=volume["open"] if volume else 0,
        )

    @contextmanager
    def suspended(self, spec: PoolSpec, dev_id: int) -> Iterator[None]:
        with changing(spec.run_dir) as state:
            if str(dev_id) not in state["volumes"]:
                raise NotFoundError(f"fake engine: device {dev_id} is not active")
            state["suspended"].append(dev_id)
        try:
            yield
        finally:
            with changing(spec.run_dir) as state:
                state["suspended"].remove(dev_id)

    # --- metadata --------------------------------------------------------------------------
    def link_path(self, spec: PoolSpec, name: str) -> Path | None:
        return None

    def find_stale(self, spec: PoolSpec, *, fix: bool) -> list[str]:
        return []

    def release_metadata_snapshot(self, spec: PoolSpec) -> None:
        with changing(spec.run_dir) as state:
            state["held"] = None

    @contextmanager
    def metadata_view(self, spec: PoolSpec) -> Iterator[MetadataView]:
        from thinmgr.ops.sources import MetadataFile

        state = load(spec.run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            xml, out = Path(tmp) / "pool.xml", Path(tmp) / "metadata"
            xml.write_text(_xml(state))
            with open(out, "wb") as handle:
                handle.truncate(8 << 20)
            subprocess.run(
                ["thin_restore", "-i", str(xml), "-o", str(out)], check=True, capture_output=True
            )
            with MetadataFile(str(out)) as source:
                yield MetadataView(source=source, snap=False)


def _xml(state: dict[str, Any]) -> str:
    lines = [
        f'<superblock uuid="" time="0" transaction="{state["tid"]}" flags="0" version="2" '
        f'data_block_size="{state["block_sectors"]}" nr_data_blocks="{state["nr_data_blocks"]}">'
    ]
    for dev_id in sorted(state["devices"], key=int):
        lines.append(
            f'  <device dev_id="{dev_id}" mapped_blocks="0" transaction="0" '
            'creation_time="0" snap_time="0">\n  </device>'
        )
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


def factory(name: str) -> FakeEngine:
    return FakeEngine(name)
