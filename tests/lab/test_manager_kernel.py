"""The manager's commands on the kernel engine (tier ``lab``): pool, volume, snapshot, doctor.

A small set through the CLI (``thinmgr.cli.app.run``, the function ``thinmgr`` itself calls),
with ``THINMGR_HOME`` in a temporary directory and file-backed pools. It runs in-process: a
``python3 -m thinmgr`` subprocess costs several seconds of imports under TCG, which made this
test alone ~100 s. One test walks the whole life of a pool rather than one test per command.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import BLOCK, pattern, read_at, write_at
from thinmgr.cli.app import run
from thinmgr.kernel.dm import DMControl

pytestmark = pytest.mark.lab


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Env:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.home = root / "home"
        self.capsys = capsys

    def cli(self, *args: str, check: bool = True) -> Result:
        self.capsys.readouterr()
        code = run(args=list(args))
        out, err = self.capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"thinmgr {' '.join(args)} ({code}): {err}")
        return Result(code, out, err)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args).stdout)


def _dm_names(tag: str) -> list[str]:
    with DMControl() as dm:
        return [d.name for d in dm.list_devices() if tag in d.name]


@pytest.fixture
def env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    e = Env(tmp_path, capsys)
    monkeypatch.setenv("THINMGR_HOME", str(e.home))
    monkeypatch.delenv("THINMGR_ENGINE_FACTORY", raising=False)
    yield e
    left = _dm_names(f"k{os.getpid()}")
    with DMControl() as dm:  # a failed test's leftovers: volumes first, then the pool
        for name in sorted(left, key=lambda n: n.endswith("-tpool")):
            with contextlib.suppress(Exception):
                dm.remove(name)
    assert left == [], f"dm devices left behind: {left}"


def test_pool_volume_snapshot_doctor_on_the_kernel(env: Env) -> None:
    p = f"k{os.getpid()}"
    env.cli("pool", "create", p, "--size", "64M", "--engine", "kernel")
    status = env.json("pool", "status", p)
    assert status["engine"] == "kernel", status

    env.cli("volume", "create", p, "v1", "--size", "8M")
    origin = Path(env.cli("volume", "activate", p, "v1").stdout.strip())
    assert origin.is_block_device()
    write_at(origin, 0, pattern(1))
    write_at(origin, 3 * BLOCK, pattern(3))
    env.cli("snapshot", p, "v1", "s1")  # active origin: suspended around the message
    write_at(origin, 0, pattern(10))
    snap = Path(env.cli("volume", "activate", p, "s1").stdout.strip())
    assert read_at(snap, 0, BLOCK) == pattern(1)
    assert read_at(snap, 3 * BLOCK, BLOCK) == pattern(3)
    assert read_at(origin, 0, BLOCK) == pattern(10)

    busy = env.cli("pool", "deactivate", p, check=False)
    assert busy.returncode != 0
    env.cli("volume", "deactivate", p, "s1")
    assert not snap.exists()
    env.cli("volume", "remove", p, "s1")
    assert {v["name"] for v in env.json("volume", "list", p)} == {"v1"}
    doctor = env.json("doctor")
    assert doctor["findings"] == [], doctor
    env.cli("volume", "deactivate", p, "v1")
    assert env.cli("pool", "check", p).returncode == 0
    env.cli("pool", "destroy", p, "--force")
    assert env.json("pool", "list") == []
