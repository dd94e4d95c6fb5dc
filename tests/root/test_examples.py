"""The runnable examples in ``examples/`` (root tier): each script exits 0 and leaves nothing.

Each script runs with ``TMPDIR`` in the test's temporary directory (the scripts make their
temporary home there), so leftovers are easy to recognise: a loop device over a file there,
a mount there, a server process whose command line names it. A script that leaves any fails
its test, and the test removes them so the next one starts clean.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = [
    "pool-from-files.sh",
    "volume-snapshot-diff.sh",
    "pool-from-devices.sh",
    "live-snapshot.sh",
    "layer-export-import.sh",
    "doctor-after-crash.sh",
    "image-run.sh",
    "commit-export-import.sh",
    "live-container-snapshot.sh",
]
SCRIPT_TIMEOUT = 120  # seconds; each takes 5-20 s on a 2-core machine


def _loops(root: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(root) in line]


def _mounts(root: Path) -> list[str]:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return [line.split()[1] for line in mounts if str(root) in line.split()[1]]


def _processes(root: Path) -> list[int]:
    """Processes (pool servers, a forgotten writer) whose command line names ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(root).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _leftovers(root: Path) -> list[str]:
    return (
        [f"loop {line}" for line in _loops(root)]
        + [f"mount {point}" for point in _mounts(root)]
        + [f"process {pid}" for pid in _processes(root)]
    )


def _force_clean(root: Path) -> None:
    for pid in _processes(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for point in reversed(_mounts(root)):
        subprocess.run(["umount", "-l", point], check=False)
    for line in _loops(root):
        subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: the user engine's server socket lives under
    the home, and AF_UNIX paths are limited to 107 bytes (pytest's tmp_path is too long)."""
    root = Path(tempfile.mkdtemp(prefix="thx", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_leaves_nothing(script: str, short_tmp: Path) -> None:
    tmp_path = short_tmp
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("THINMGR_HOME", None)  # the scripts make their own temporary home
    try:
        result = subprocess.run(
            ["bash", str(EXAMPLES / script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=SCRIPT_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr}"
        left = _leftovers(tmp_path)
        assert left == [], f"{script} left behind: {left}"
        assert list(tmp_path.iterdir()) == [], f"{script} left files: {list(tmp_path.iterdir())}"
    finally:
        _force_clean(tmp_path)
