"""Quality gates as tests: ruff lint, ruff format and mypy --strict over the repository.

Each runs the tool exactly as a developer would from the top of the tree (its configuration
comes from pyproject.toml) and fails with the tool's own output, so that a CI log shows the
file and line to fix.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_gate(module: str, *args: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        command = " ".join([module, *args])
        pytest.fail(
            f"`{command}` failed (exit {result.returncode}):\n{result.stdout}{result.stderr}",
            pytrace=False,
        )


def test_ruff_check() -> None:
    run_gate("ruff", "check", "--no-fix", "--output-format=concise", ".")


def test_ruff_format() -> None:
    run_gate("ruff", "format", "--check", "--output-format=concise", ".")


def test_mypy_strict() -> None:
    # No paths: the packages to check and --strict come from [tool.mypy] in pyproject.toml.
    run_gate("mypy")
