"""Property test: random sequences of pool operations against a dict model.

Each example runs a random program (thin devices, snapshots of snapshots, kernel-style data
writes, unmaps in bulk so that nodes split and merge, deletes, metadata snapshots, commits),
then checks the result in-process, with an independent recount of every reference, and with
thin_check/thin_dump 0.9.0 (including ``thin_dump -m`` while a metadata snapshot is held).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.txn_oracle import Model, oracle, recount, write_block
from thinmgr.format.txn import MemoryBlockStore, PoolMetadata, format_metadata

VBLOCKS = 3000

op = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 7)),
    st.tuples(st.just("snap"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(
        st.just("write"), st.integers(0, 7), st.integers(0, VBLOCKS - 1), st.integers(1, 700)
    ),
    st.tuples(
        st.just("unmap"), st.integers(0, 7), st.integers(0, VBLOCKS - 1), st.integers(1, 900)
    ),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("reserve")),
    st.tuples(st.just("release")),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(op, min_size=1, max_size=25), seed=st.randoms(use_true_random=False))
def test_random_programs_match_the_model(program: list[tuple[object, ...]], seed: object) -> None:
    pool = format_metadata(2048, 128, 40000)
    model: Model = {}
    committed: Model = {}
    snapshot: Model | None = None  # the model at reserve time, while one is held
    committed_snapshot: Model | None = None  # the same as of the last commit
    for step in program:
        kind = step[0]
        if kind == "create" and step[1] not in model:
            pool.create_thin(int(str(step[1])))
            model[int(str(step[1]))] = {}
        elif kind == "snap" and step[1] not in model and step[2] in model:
            dev, origin = int(str(step[1])), int(str(step[2]))
            pool.create_snap(dev, origin)
            model[dev] = dict(model[origin])
        elif kind == "delete" and step[1] in model:
            pool.delete(int(str(step[1])))
            del model[int(str(step[1]))]
        elif kind == "write" and step[1] in model:
            dev, start, count = (int(str(x)) for x in step[1:])
            for vblock in range(start, min(start + count, VBLOCKS)):
                write_block(pool, model, dev, vblock)
        elif kind == "unmap" and step[1] in model:
            dev, start, count = (int(str(x)) for x in step[1:])
            for vblock in range(start, min(start + count, VBLOCKS)):
                if vblock in model[dev]:
                    pool.remove_mapping(dev, vblock)
                    del model[dev][vblock]
        elif kind == "commit":
            pool.commit()
            committed = {d: dict(m) for d, m in model.items()}
            committed_snapshot = snapshot
        elif kind == "reopen":
            # Drop the open transaction (a crash) and carry on from the last commit.
            pool = PoolMetadata.open(MemoryBlockStore(image=pool.store.image()))
            model = {d: dict(m) for d, m in committed.items()}
            snapshot = committed_snapshot
            assert bool(pool.held_root) == (snapshot is not None)
        elif kind == "reserve" and not pool.held_root:
            pool.reserve_metadata_snap()  # commits first; held from the next commit on
            committed = {d: dict(m) for d, m in model.items()}
            committed_snapshot = snapshot
            snapshot = committed
        elif kind == "release" and pool.held_root:
            pool.release_metadata_snap()
            snapshot = None
        for dev, mappings in model.items():
            assert pool.device_details(dev).mapped_blocks == len(mappings)
    pool.commit()
    for dev, mappings in model.items():
        assert {v: b for v, b, _ in pool.mappings(dev)} == mappings
    image = pool.store.image()
    recount(image)
    used = {b for m in model.values() for b in m.values()}
    if snapshot is None:
        assert pool.free_data_blocks == 40000 - len(used)
    with tempfile.TemporaryDirectory() as tmp:
        oracle(image, Path(tmp), model, snap_model=snapshot)
