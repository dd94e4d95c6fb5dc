"""The engine conformance suite (``tests/support/conformance.py``) on the kernel engine.

The same checks the user engine passes in the root tier (``tests/root/test_conformance_user.py``),
here against the real dm-thin of the lab guest. Each check ends by proving that no dm device
and no loop device of its pools is left.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import conformance
from thinmgr.engine.kernel.engine import KernelEngine

pytestmark = pytest.mark.lab


@pytest.fixture
def kernel_engine(tmp_path: Path) -> Iterator[KernelEngine]:
    engine = KernelEngine()
    try:
        yield engine
        ours = [d.name for d in engine.dm.list_devices() if f"kc{os.getpid()}" in d.name]
        assert ours == [], f"dm devices left behind: {ours}"
        loops = subprocess.run(
            ["losetup", "-a"], capture_output=True, text=True, check=False, timeout=60
        ).stdout
        assert [line for line in loops.splitlines() if str(tmp_path) in line] == []
    finally:
        engine.close()


@pytest.mark.parametrize("check", list(conformance.CHECKS), ids=str)
def test_kernel_engine_conformance(check: str, kernel_engine: KernelEngine, tmp_path: Path) -> None:
    make_spec = conformance.make_spec_factory(tmp_path / "pools", f"kc{os.getpid()}-{check}-")
    conformance.CHECKS[check](kernel_engine, make_spec)
