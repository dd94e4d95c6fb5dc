"""Helpers shared by the benchmark scripts: timing loops, a ratio table, and JSON results.

Benchmarks time thinmgr against a baseline measured in the same run, on the same machine, and
report the ratio (ARCHITECTURE.md, "Benchmarks"); absolute times vary too much between machines
to mean anything alone. Results go to ``benchmarks/results/`` (git-ignored) as JSON, with
enough about the host to tell two runs apart.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Wall-clock samples of one thing, in seconds."""

    label: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "runs": len(self.samples),
            "median_s": self.median,
            "min_s": self.minimum,
            "samples_s": self.samples,
        }


def run_once(argv: Sequence[str], env: Mapping[str, str] | None = None) -> float:
    """Wall time of one run of a command, output discarded; a failing command is an error."""
    started = time.perf_counter()
    result = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"benchmark command failed (exit {result.returncode}): {' '.join(argv)}\n"
            f"{result.stderr.decode(errors='replace')}"
        )
    return elapsed


def time_commands(
    commands: Mapping[str, Sequence[str]], runs: int, warmup: int = 3
) -> dict[str, Timing]:
    """Time each command ``runs`` times, interleaved round-robin.

    Interleaving spreads slow phases of the machine (another process, CPU frequency) over all
    commands instead of over whichever ran then; the warm-up rounds fill the page cache.
    """
    timings = {label: Timing(label) for label in commands}
    for round_number in range(warmup + runs):
        for label, argv in commands.items():
            elapsed = run_once(argv)
            if round_number >= warmup:
                timings[label].samples.append(elapsed)
    return timings


def time_call(label: str, action: Callable[[], object], runs: int, warmup: int = 1) -> Timing:
    """Time an in-process call ``runs`` times."""
    timing = Timing(label)
    for round_number in range(warmup + runs):
        started = time.perf_counter()
        action()
        elapsed = time.perf_counter() - started
        if round_number >= warmup:
            timing.samples.append(elapsed)
    return timing


def time_command(argv: Sequence[str], runs: int, warmup: int = 1) -> Timing:
    """Time one command ``runs`` times (after ``warmup`` untimed runs)."""
    label = " ".join(Path(argv[0]).name if i == 0 else arg for i, arg in enumerate(argv))
    return time_commands({label: argv}, runs, warmup)[label]


@dataclass
class Comparison:
    """thinmgr against a baseline, timed in the same run.

    ``goal`` is the largest acceptable ratio of medians (thinmgr / baseline); ``goal_ms`` an
    absolute ceiling for thinmgr's median. Either may be None.
    """

    name: str
    mine: Timing
    base: Timing
    baseline_name: str = "baseline"
    goal: float | None = None
    goal_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.mine.median / self.base.median

    @property
    def goal_met(self) -> bool | None:
        if self.goal is None and self.goal_ms is None:
            return None
        ratio_ok = self.goal is None or self.ratio <= self.goal
        time_ok = self.goal_ms is None or self.mine.median * 1000 <= self.goal_ms
        return ratio_ok and time_ok

    def goal_text(self) -> str:
        parts = []
        if self.goal is not None:
            parts.append(f"<= {self.goal:g}x")
        if self.goal_ms is not None:
            parts.append(f"<= {self.goal_ms:g} ms")
        if not parts:
            return ""
        return f"{' and '.join(parts)} ({'met' if self.goal_met else 'MISSED'})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "thinmgr": self.mine.as_dict(),
            "baseline_name": self.baseline_name,
            "baseline": self.base.as_dict(),
            "ratio": self.ratio,
            "goal_ratio": self.goal,
            "goal_ms": self.goal_ms,
            "goal_met": self.goal_met,
        }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(name: str, results: Sequence[Comparison]) -> int:
    """Print a table of the comparisons, save them as JSON, and return the exit status (0).

    A missed goal is a figure to look at, not a failure of the script.
    """
    header = ("benchmark", "thinmgr median (min) ms", "baseline median (min) ms", "ratio", "goal")
    rows = [
        (
            result.name,
            f"{ms(result.mine.median)} ({ms(result.mine.minimum)})",
            f"{result.baseline_name}: {ms(result.base.median)} ({ms(result.base.minimum)})",
            f"{result.ratio:.2f}",
            result.goal_text(),
        )
        for result in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    path = save_result(name, {"comparisons": [result.as_dict() for result in results]})
    print(f"\nresult: {path}")
    return 0


def host_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def save_result(name: str, data: Mapping[str, Any]) -> Path:
    """Write ``data`` with host info and a timestamp to ``results/NAME-TIMESTAMP.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    path = RESULTS_DIR / f"{name}-{now:%Y%m%dT%H%M%SZ}.json"
    payload = {"benchmark": name, "at": now.isoformat(), "host": host_info(), **data}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)  # never a half-written result
    return path


def console_script() -> str:
    """The ``thinmgr`` script installed beside this interpreter.

    Preferred over PATH, where a version manager's shim (pyenv's is a shell script) would add
    its own start-up to thinmgr's.
    """
    compile_bytecode()
    beside = Path(sysconfig.get_path("scripts")) / "thinmgr"
    if beside.is_file():
        return str(beside)
    found = shutil.which("thinmgr")
    if found is None:
        raise SystemExit("thinmgr is not installed: pip install -e .")
    return found


def compile_bytecode() -> None:
    """Byte-compile thinmgr's modules, as ``pip install`` does for an installed package.

    An editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (set on these machines) has no
    ``__pycache__``, and every command would then compile ~75 modules from source (~60 ms,
    measured): a cost users of an installed thinmgr never pay. The files are git-ignored.
    """
    import compileall

    compileall.compile_dir(
        str(Path(__file__).resolve().parent.parent / "thinmgr"), quiet=1, workers=1
    )
