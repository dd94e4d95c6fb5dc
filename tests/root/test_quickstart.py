"""The README's first command, `bash scripts/demo`, runs the quickstart end to end (root tier).

It must exit 0, show each stage's result (the container's output, the committed change, the
image tree and both diffs), and leave nothing behind: no loop device, mount or process that
names its temporary home, and no files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.root.test_examples import _force_clean, _leftovers, short_tmp  # noqa: F401

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds; it takes well under a minute on a 2-core machine


def test_scripts_demo_runs_the_quickstart_and_cleans_up(short_tmp: Path) -> None:  # noqa: F811
    env = dict(os.environ, TMPDIR=str(short_tmp))
    env.pop("THINMGR_HOME", None)
    try:
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "demo")],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        for expected in (
            "hello from demo, pid 2",  # the container's hostname; the command is pid 2 under init
            "built by the quickstart",  # busybox:v2 sees the committed change
            "no motd in busybox:latest",  # and the first image does not
            "etc/motd",  # the file diff names the changed file
            "quickstart finished",
            "cleaned up",
        ):
            assert expected in output, f"missing {expected!r} in:\n{output[-6000:]}"
        assert _leftovers(short_tmp) == []
        assert list(short_tmp.iterdir()) == []
    finally:
        _force_clean(short_tmp)
