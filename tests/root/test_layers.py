"""Block diffs and layer-diff files on the real user engine (root tier).

Round trip: a volume and a snapshot of it, both changed (writes and a discard), exported and
imported on another pool, read back byte-identical. `thinmgr diff` equals thin_delta on the
same metadata. Refused imports (wrong parent, damaged file) leave no volume behind.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tests.root.test_manager_user import Env, run
from tests.root.test_manager_user import env as env  # noqa: PLC0414 (the fixture)
from thinmgr.ops.manager import open_manager

pytestmark = pytest.mark.root

BS = 64 << 10


def write_blocks(link: str, blocks: list[int], seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(link, os.O_WRONLY)
    try:
        for block in blocks:
            os.pwrite(fd, rng.randbytes(BS), block * BS)
        os.fsync(fd)
    finally:
        os.close(fd)


def volume_sha(env: Env, pool: str, name: str) -> str:
    link = env.cli("volume", "activate", pool, name).stdout.strip()
    try:
        digest = hashlib.sha256()
        with open(link, "rb") as device:
            while chunk := device.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    finally:
        env.cli("volume", "deactivate", pool, name)


def volume_names(env: Env, pool: str) -> set[str]:
    return {v["name"] for v in env.json("volume", "list", pool)}


def test_export_import_round_trip_and_diff(env: Env, tmp_path: Path) -> None:
    a, b = env.pool_name("a"), env.pool_name("b")
    for pool in (a, b):
        env.cli("pool", "create", pool, "--size", "256M", "--engine", "user")
    env.cli("volume", "create", a, "base", "--size", "16M")
    link = env.cli("volume", "activate", a, "base").stdout.strip()
    write_blocks(link, [0, 1, 2, 7, 50, 100, 101, 200], seed=1)
    env.cli("volume", "deactivate", a, "base")
    env.cli("snapshot", a, "base", "child")
    link = env.cli("volume", "activate", a, "child").stdout.strip()
    write_blocks(link, [1, 3, 4, 5, 100, 255], seed=2)
    run("blkdiscard", "-o", str(200 * BS), "-l", str(BS), link)  # mapped in base only
    env.cli("volume", "deactivate", a, "child")

    base_file, child_file = tmp_path / "base.thindiff", tmp_path / "child.thindiff"
    whole = env.json("layer", "export", a, "base", "-o", base_file)
    assert whole["parent_digest"] is None and whole["data_bytes"] == 8 * BS
    layer = env.json("layer", "export", a, "child", "--parent", "base", "-o", child_file)
    assert layer["data_bytes"] == 6 * BS and layer["discard_bytes"] == BS
    assert layer["digest"] == hashlib.sha256(child_file.read_bytes()).hexdigest()
    named = env.json(
        "layer", "export", a, "child", "--parent", "base", "-o", tmp_path, "--digest-name"
    )
    assert Path(named["file"]).name == f"{layer['digest']}.thindiff"

    # Refused imports create nothing: the wrong parent, then a damaged file.
    env.json("layer", "import", b, base_file, "base")
    wrong = env.cli("layer", "import", b, base_file, "bad", "--parent", "base", check=False)
    assert wrong.returncode == 4 and "no parent" in wrong.stderr
    damaged = tmp_path / "damaged.thindiff"
    raw = bytearray(child_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    refused = env.cli("layer", "import", b, damaged, "bad", "--parent", "base", check=False)
    assert refused.returncode == 7 and "Traceback" not in refused.stderr
    assert volume_names(env, b) == {"base"}

    env.json("layer", "import", b, child_file, "child", "--parent", "base")
    for name in ("base", "child"):
        assert volume_sha(env, a, name) == volume_sha(env, b, name), name

    # A parent whose content changed is not the parent any more.
    link = env.cli("volume", "activate", b, "base").stdout.strip()
    write_blocks(link, [9], seed=3)
    env.cli("volume", "deactivate", b, "base")
    moved = env.cli("layer", "import", b, child_file, "again", "--parent", "base", check=False)
    assert moved.returncode == 4 and "wrong parent" in moved.stderr
    assert volume_names(env, b) == {"base", "child"}

    # thinmgr diff == thin_delta on the same (idle) metadata.
    text = env.cli("diff", a, "base", "child").stdout
    assert "right_only" in text and "different" in text and "left_only" in text
    diff_json = env.json("diff", a, "base", "child")
    assert diff_json["changed_blocks"] == 7
    env.cli("pool", "deactivate", a)
    ours = env.cli("diff", a, "base", "child", "--format", "xml").stdout
    with open_manager(env.home) as mgr:
        metadata = mgr.find(a).spec.metadata
    ids = {v["name"]: v["dev_id"] for v in env.json("volume", "list", a)}
    theirs = run(
        "thin_delta", "--snap1", str(ids["base"]), "--snap2", str(ids["child"]), metadata
    ).stdout
    # --changed-only semantics: thin_delta 0.9.0 prints `same` ranges too; nothing else differs.
    changed = "".join(line for line in theirs.splitlines(True) if "<same " not in line)
    assert ours == changed and "<same " in theirs
