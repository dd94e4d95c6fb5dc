"""Crash safety of the user pool: cut the metadata device off at every write of a workload.

``CrashStore`` is a metadata device with a volatile cache: writes since the last flush are
pending, a flush makes them durable. After ``limit`` writes the "power fails": the next write
raises ``PowerCut`` and the device keeps what was durable plus a random subset of the
pending writes (a disk may have written any of them). The workload is replayed once per
cut point (and per seed); after each cut the pool must open at its last commit, thin_check
0.9.0 must pass, and every device must read back what it held when that commit was made
(or a later write to the same block, which the data device may already hold: un-flushed
writes may land, as on a disk with a volatile cache; format section 8).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.txn_oracle import thin_check
from tests.unit.test_user_pool import BB, make_files
from thinmgr.engine.user.pool import UserPool
from thinmgr.format.txn import MemoryBlockStore

VOL = 16 * BB
DATA_BLOCKS = 400  # ample: no commit inside a write, so cuts fall in commits only
META_BLOCKS = 1024


class PowerCut(Exception):
    """The simulated power failure (not a ThinmgrError: nothing may catch it)."""


class CrashStore(MemoryBlockStore):
    def __init__(self, nr_blocks: int) -> None:
        super().__init__(nr_blocks)
        self.pending: dict[int, bytes] = {}
        self.writes = 0
        self.limit: int | None = None
        self.on_superblock: Callable[[int], None] | None = None

    def read_block(self, blocknr: int) -> bytes:
        pending = self.pending.get(blocknr)
        return pending if pending is not None else super().read_block(blocknr)

    def write_block(self, blocknr: int, data: bytes | bytearray) -> None:
        if self.limit is not None and self.writes >= self.limit:
            raise PowerCut
        self.writes += 1
        self.pending[blocknr] = bytes(data)
        if blocknr == 0 and self.on_superblock is not None:
            self.on_superblock(self.writes)

    def flush(self) -> None:
        for blocknr, data in self.pending.items():
            super().write_block(blocknr, data)
        self.pending.clear()
        super().flush()

    def load(self, image: bytes) -> None:
        """Start from a durable image (a formatted pool)."""
        for blocknr in range(self.nr_blocks):
            super().write_block(blocknr, image[blocknr * 4096 : (blocknr + 1) * 4096])

    def crash_image(self, rng: random.Random) -> bytes:
        for blocknr, data in self.pending.items():
            if rng.random() < 0.5:
                super().write_block(blocknr, data)
        self.pending.clear()
        return self.image()


State = dict[int, bytes]


class Workload:
    """A seeded program of writes, discards, snapshots, deletes, flushes and metadata
    snapshots; records the model after every step and which step each commit reflects."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.history: list[State] = [{}]
        # (write count of the superblock write, history index the commit starts from)
        self.commits: list[tuple[int, int]] = []

    def run(self, pool: UserPool, store: CrashStore) -> None:
        rng = random.Random(self.seed)
        model: dict[int, bytearray] = {}
        store.on_superblock = lambda n: self.commits.append((n, len(self.history) - 1))
        next_dev = 0
        for step in range(45):
            roll = rng.random()
            devs = sorted(model)
            if not devs or roll < 0.08:
                pool.create_thin(next_dev)
                model[next_dev] = bytearray(VOL)
                next_dev += 1
            elif roll < 0.55:
                dev = rng.choice(devs)
                offset = rng.randrange(VOL)
                length = min(rng.randrange(1, 3 * BB), VOL - offset)
                payload = bytes([step + 1]) * length
                with pool.volume(dev, VOL) as volume:
                    volume.write(offset, payload)
                model[dev][offset : offset + length] = payload
            elif roll < 0.63:
                dev = rng.choice(devs)
                offset = rng.randrange(VOL)
                length = min(rng.randrange(1, 4 * BB), VOL - offset)
                with pool.volume(dev, VOL) as volume:
                    volume.discard(offset, length)
                model[dev][offset : offset + length] = bytes(length)
            elif roll < 0.75:
                origin = rng.choice(devs)
                pool.create_snap(next_dev, origin)
                model[next_dev] = bytearray(model[origin])
                next_dev += 1
            elif roll < 0.8 and len(devs) > 2:
                dev = rng.choice(devs)
                pool.delete(dev)
                del model[dev]
            elif roll < 0.85:
                if pool.status().held_metadata_root is None:
                    pool.reserve_metadata_snap()
                else:
                    pool.release_metadata_snap()
            else:
                pool.commit()
            self.history.append({dev: bytes(data) for dev, data in model.items()})


_FORMATTED: dict[str, bytes] = {}


def new_pool(tmp: Path) -> tuple[UserPool, CrashStore, Path]:
    """A fresh pool on a ``CrashStore``; formatted once, then copied per trial."""
    tmp.mkdir()
    _, data = make_files(tmp, DATA_BLOCKS)
    if "image" not in _FORMATTED:
        store = CrashStore(META_BLOCKS)
        UserPool.create(tmp / "unused", data, store=store).close(commit=False)
        store.flush()
        _FORMATTED["image"] = store.image()
    store = CrashStore(META_BLOCKS)
    store.load(_FORMATTED["image"])
    return UserPool.open(tmp / "unused", data, store=store), store, data


def check_after_cut(tmp: Path, workload: Workload, image: bytes, data: Path, cut: int) -> None:
    meta = tmp / "crashed-meta"
    meta.write_bytes(image)
    thin_check(meta)
    durable = [start for n, start in workload.commits if n <= cut]
    start = durable[-1] if durable else 0  # formatting: the pool with no devices
    pool = UserPool.open(meta, data)
    try:
        later = workload.history[start:]
        # A commit made by a message reflects that message's result (history[start + 1]).
        assert pool.thin_ids() in [set(state) for state in later[:2]], (workload.seed, cut)
        for dev in pool.thin_ids():
            with pool.volume(dev, VOL, read_only=True) as volume:
                got = volume.read(0, VOL)
            for at in range(0, VOL, BB):
                block = got[at : at + BB]
                choices = {state[dev][at : at + BB] for state in later if dev in state}
                assert block in choices, (workload.seed, cut, dev, at // BB)
    finally:
        pool.close(commit=False)


def test_every_cut_point_reopens_at_the_last_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data file is never cut here (every data write lands), so its fdatasync only
    # costs time; the metadata device's flushes are what the cut points sit between.
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    # Hundreds of small pools: in memory (tmpfs) when the host has one.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as scratch:
        run_cuts(Path(scratch))


def run_cuts(tmp_path: Path) -> None:
    started = time.monotonic()
    trials = 0
    for seed, stride in ((11, 1), (12, 2)):  # every cut of one run, half of another
        reference = Workload(seed)
        pool, store, _ = new_pool(tmp_path / f"ref{seed}")
        base = store.writes
        reference.run(pool, store)
        total = store.writes - base
        assert len(reference.commits) > 20
        pool.close(commit=False)
        for cut in range(0, total + 1, stride):
            trial_dir = tmp_path / f"s{seed}c{cut}"
            pool, store, data = new_pool(trial_dir)
            store.limit = store.writes + cut
            workload = Workload(seed)
            with contextlib.suppress(PowerCut):
                workload.run(pool, store)
            pool.close(commit=False)
            image = store.crash_image(random.Random(cut))
            check_after_cut(trial_dir, workload, image, data, store.limit)
            trials += 1
    print(f"{trials} cut points checked")
    assert trials >= 200, trials
    assert time.monotonic() - started < 120
