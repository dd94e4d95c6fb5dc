"""Property test: random programs against the user pool's data path and a bytes model.

Writes of random sizes across block boundaries, snapshots of snapshots, deletes, discards,
metadata snapshots, commits and clean reopens run on a ``UserPool``; a dict of device ->
bytearray says what every device must read. Every device's full contents are compared at
the end of each example, and the oracle (thin_check, thin_dump, data file) judges the pool.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_user_pool import BB, make_files, verify
from thinmgr.engine.user.pool import UserPool

VOL = 12 * BB  # small volumes: many boundaries, fast full comparisons
DEVS = 5

offsets = st.integers(0, VOL - 1)
op = st.one_of(
    st.tuples(st.just("create"), st.integers(0, DEVS - 1)),
    st.tuples(st.just("snap"), st.integers(0, DEVS - 1), st.integers(0, DEVS - 1)),
    st.tuples(st.just("delete"), st.integers(0, DEVS - 1)),
    st.tuples(st.just("write"), st.integers(0, DEVS - 1), offsets, st.integers(1, 3 * BB)),
    st.tuples(st.just("discard"), st.integers(0, DEVS - 1), offsets, st.integers(1, 4 * BB)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("reserve")),
    st.tuples(st.just("release")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(op, min_size=1, max_size=20))
def test_random_programs_match_the_bytes_model(program: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        meta, data = make_files(tmp, 160)
        pool = UserPool.create(meta, data)
        model: dict[int, bytearray] = {}
        try:
            for number, step in enumerate(program):
                args = [int(str(x)) for x in step[1:]]
                pool = run_step(pool, model, str(step[0]), args, number, meta, data)
            for dev, contents in model.items():
                with pool.volume(dev, VOL, read_only=True) as volume:
                    assert volume.read(0, VOL) == contents, dev
            assert pool.thin_ids() == set(model)
            verify(pool, meta, data, dict.fromkeys(model, VOL))
        finally:
            pool.close()


def run_step(
    pool: UserPool,
    model: dict[int, bytearray],
    kind: str,
    args: list[int],
    number: int,
    meta: Path,
    data: Path,
) -> UserPool:
    if kind == "create" and args[0] not in model:
        pool.create_thin(args[0])
        model[args[0]] = bytearray(VOL)
    elif kind == "snap" and args[0] not in model and args[1] in model:
        pool.create_snap(args[0], args[1])
        model[args[0]] = bytearray(model[args[1]])
    elif kind == "delete" and args[0] in model:
        pool.delete(args[0])
        del model[args[0]]
    elif kind == "write" and args[0] in model:
        dev, offset, length = args
        length = min(length, VOL - offset)
        payload = bytes([number & 0xFF or 1]) * length
        with pool.volume(dev, VOL) as volume:
            volume.write(offset, payload)
        model[dev][offset : offset + length] = payload
    elif kind == "discard" and args[0] in model:
        dev, offset, length = args
        length = min(length, VOL - offset)
        with pool.volume(dev, VOL) as volume:
            volume.discard(offset, length)
        model[dev][offset : offset + length] = bytes(length)
    elif kind == "commit":
        pool.commit()
    elif kind == "reopen":
        pool.close()
        pool = UserPool.open(meta, data)
    elif kind == "reserve" and pool.status().held_metadata_root is None:
        pool.reserve_metadata_snap()
    elif kind == "release" and pool.status().held_metadata_root is not None:
        pool.release_metadata_snap()
    return pool
