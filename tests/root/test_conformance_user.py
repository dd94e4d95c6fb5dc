"""The engine conformance suite (``tests/support/conformance.py``) on the user engine.

The same checks run on the kernel engine in the lab (``tests/lab/test_conformance_kernel.py``).
Needs root: the user engine's volumes are loop devices over FUSE.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import conformance
from thinmgr.engine.base import Engine
from thinmgr.engine.user.engine import UserEngine

pytestmark = pytest.mark.root


@pytest.fixture
def user_engine(tmp_path: Path) -> Iterator[UserEngine]:
    engine = UserEngine(dev_root=tmp_path / "dev")
    yield engine
    # whatever a failed check left: no loop device or FUSE mount under tmp_path
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    with open("/proc/mounts", encoding="utf-8") as mounts:
        left = [line for line in mounts if str(tmp_path) in line]
    left += [line for line in loops.stdout.splitlines() if str(tmp_path) in line]
    assert left == [], f"left behind: {left}"


@pytest.mark.parametrize("check", list(conformance.CHECKS), ids=str)
def test_user_engine_conformance(check: str, user_engine: Engine, tmp_path: Path) -> None:
    run: Callable[[Engine, conformance.SpecFactory], None] = conformance.CHECKS[check]
    run(user_engine, conformance.make_spec_factory(tmp_path / "pools", "uc"))
