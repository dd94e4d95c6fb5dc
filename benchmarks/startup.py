"""Start-up time of the thinmgr command against a bare Python interpreter.

    python3 benchmarks/startup.py [--runs 30]

Times ``thinmgr --version`` and ``thinmgr --help`` through the installed console script and
through ``python -m thinmgr``, interleaved with ``python -c pass`` (the floor that any Python
command pays), and prints median, min and the ratio to that floor. The goal for
``thinmgr --version`` is a median of at most 80 ms. The JSON result goes to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Comparison, console_script, report, time_commands

VERSION_GOAL_MS = 80.0
BASELINE = "python -c pass"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    options = parser.parse_args()

    script = console_script()
    python = sys.executable
    commands = {
        BASELINE: [python, "-c", "pass"],
        "thinmgr --version": [script, "--version"],
        "thinmgr --help": [script, "--help"],
        "python -m thinmgr --version": [python, "-m", "thinmgr", "--version"],
        "python -m thinmgr --help": [python, "-m", "thinmgr", "--help"],
    }
    print(f"{options.runs} runs of each (after {options.warmup} warm-up), interleaved")
    print(f"console script: {script}\npython: {python}\n")
    timings = time_commands(commands, options.runs, options.warmup)
    baseline = timings.pop(BASELINE)
    results = [
        Comparison(
            label,
            timing,
            baseline,
            baseline_name=BASELINE,
            goal_ms=VERSION_GOAL_MS if label == "thinmgr --version" else None,
        )
        for label, timing in timings.items()
    ]
    return report("startup", results)


if __name__ == "__main__":
    sys.exit(main())
