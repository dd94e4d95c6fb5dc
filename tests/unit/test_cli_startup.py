"""`thinmgr --help` and `--version` must not pay for the heavy layers.

Users feel start-up on every command, so the entry point imports the catalog (SQLAlchemy,
Alembic), the metadata format code (numpy) and the engines only inside the commands that
need them (see thinmgr/cli/main.py). This test reads ``python -X importtime`` to see what was
actually imported; it measures no time (benchmarks/startup.py does).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_PACKAGES = ("sqlalchemy", "alembic", "numpy")
FORBIDDEN_MODULES = ("thinmgr.format", "thinmgr.catalog")


def imported_modules(*args: str) -> list[str]:
    """Modules imported by ``python -m thinmgr ARGS``, from ``-X importtime`` on stderr."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "thinmgr", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "thinmgr" in result.stdout
    # Lines look like "import time:   self [us] | cumulative | <indent>name".
    modules = [
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    ]
    assert "thinmgr.cli.main" in modules, "no importtime output: did -X importtime work?"
    return modules


def is_forbidden(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] in FORBIDDEN_PACKAGES or any(
        module == prefix or module.startswith(prefix + ".") for prefix in FORBIDDEN_MODULES
    )


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("-V",), ("metadata", "--help")])
def test_help_and_version_import_no_heavy_layer(args: tuple[str, ...]) -> None:
    heavy = [module for module in imported_modules(*args) if is_forbidden(module)]
    assert heavy == [], f"`thinmgr {' '.join(args)}` imported {heavy}"


def test_version_is_answered_before_typer_is_loaded() -> None:
    modules = imported_modules("--version")
    assert "typer" not in modules and "click" not in modules
