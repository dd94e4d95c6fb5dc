"""The kernel engine in the lab: ``thinmgr snapshot`` against ``dmsetup message ... create_snap``.

Inside the lab guest (``thinmgr lab run -- python3 benchmarks/lab_snapshot.py``) it makes a
file-backed kernel pool with ``thinmgr pool create --engine kernel``, an active origin volume
with some data, and then times, in the same guest:

1. ``thinmgr snapshot POOL origin sN`` as a user runs it (a ``thinmgr`` process each time:
   interpreter start-up, catalog, journal, suspend, message, resume, commit);
2. the same use case in-process (``thinmgr.cli.app.run``: thinmgr's own work, no start-up);
3. by hand, what an administrator types for a snapshot of an active origin: ``dmsetup
   suspend ORIGIN; dmsetup message POOL 0 "create_snap N M"; dmsetup resume ORIGIN``;
4. the bare ``dmsetup message POOL 0 "create_snap N M"`` (origin left running).

and prints medians and the ratios to (3). All of it runs under TCG, so absolute times are
10-40x a real machine's; the ratios are the point (ARCHITECTURE.md, "Benchmarks").

On the host (no THINMGR_IN_LAB) it boots the lab itself, runs the part above there, and adds
the guest's boot-to-ready time; ``--tier`` also times the whole lab test tier
(``python3 -m pytest -q tests/lab``, one more guest boot).

Usage: python3 benchmarks/lab_snapshot.py [--runs R] [--tier]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULT_MARK = "LAB-SNAPSHOT-RESULT "
POOL = "bench"
ORIGIN_BLOCKS = 64  # written 64 KiB blocks on the origin before snapshotting


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def _timed(action: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def _cli_in_process(*args: str) -> None:
    from thinmgr.cli.app import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run(list(args))
    if code != 0:
        raise SystemExit(f"thinmgr {' '.join(args)} failed ({code}): {err.getvalue()}")


def _dm_names() -> tuple[str, str]:
    """The pool's and the origin's device-mapper names (found by their uuids)."""
    from thinmgr.kernel.dm import DMControl

    pool = origin = ""
    with DMControl() as dm:
        for listed in dm.list_devices():
            info = dm.find(listed.name)
            if info is None:
                continue
            if info.uuid.startswith("THINMGR-POOL-"):
                pool = listed.name
            elif info.uuid.startswith("THINMGR-THIN-"):
                origin = listed.name
    if not pool or not origin:
        raise SystemExit("the benchmark pool or its origin is not active")
    return pool, origin


def in_guest(runs: int) -> dict[str, Any]:
    from tests.support.conformance import BLOCK, pattern, write_at

    home = Path(tempfile.mkdtemp(prefix="thinmgr-bench-"))
    os.environ["THINMGR_HOME"] = str(home)
    os.environ.pop("THINMGR_ENGINE_FACTORY", None)
    thinmgr = [sys.executable, "-m", "thinmgr"]
    _sh(*thinmgr, "pool", "create", POOL, "--size", "256M", "--engine", "kernel")
    _sh(*thinmgr, "volume", "create", POOL, "origin", "--size", "64M")
    device = subprocess.run(
        [*thinmgr, "volume", "activate", POOL, "origin"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    for block in range(ORIGIN_BLOCKS):
        write_at(Path(device), block * BLOCK, pattern(block))
    pool_dm, origin_dm = _dm_names()
    origin_id = int(subprocess.run(
        ["dmsetup", "table", origin_dm], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()[-1])  # fmt: skip

    counter = iter(range(1_000_000))
    hand_ids = iter(range(100_000, 200_000))  # far above what the manager allocates

    def thinmgr_process() -> None:
        _sh(*thinmgr, "snapshot", POOL, "origin", f"p{next(counter)}")

    def thinmgr_in_process() -> None:
        _cli_in_process("snapshot", POOL, "origin", f"i{next(counter)}")

    def by_hand() -> None:
        _sh("dmsetup", "suspend", origin_dm)
        _sh("dmsetup", "message", pool_dm, "0", f"create_snap {next(hand_ids)} {origin_id}")
        _sh("dmsetup", "resume", origin_dm)

    def bare_message() -> None:
        _sh("dmsetup", "message", pool_dm, "0", f"create_snap {next(hand_ids)} {origin_id}")

    cases = {
        "thinmgr snapshot (process)": thinmgr_process,
        "thinmgr snapshot (in-process)": thinmgr_in_process,
        "dmsetup suspend+message+resume": by_hand,
        "dmsetup message create_snap": bare_message,
    }
    for action in cases.values():  # warm-up: imports, page cache of the tools
        action()
    medians = {label: statistics.median(_timed(action, runs)) for label, action in cases.items()}
    baseline = medians["dmsetup suspend+message+resume"]

    # leave nothing behind: the hand-made snapshots first (the catalog does not know them)
    for dev_id in range(100_000, next(hand_ids)):
        _sh("dmsetup", "message", pool_dm, "0", f"delete {dev_id}")
    _sh(*thinmgr, "volume", "deactivate", POOL, "origin")
    _sh(*thinmgr, "pool", "destroy", POOL, "--force")
    return {
        "runs": runs,
        "origin_mapped_blocks": ORIGIN_BLOCKS,
        "median_s": medians,
        "ratio_to_dmsetup_by_hand": {k: v / baseline for k, v in medians.items()},
    }


def on_host(runs: int, tier: bool) -> dict[str, Any]:
    from thinmgr.lab.session import run_in_lab

    started = time.monotonic()
    lines: list[str] = []
    lab_run = run_in_lab(
        [sys.executable, str(Path(__file__).resolve()), "--runs", str(runs)],
        cwd=ROOT,
        timeout=900,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        on_output=lambda line: lines.append(line.text),
    )
    wall = time.monotonic() - started
    found = [line for line in lines if line.startswith(RESULT_MARK)]
    if lab_run.exit_code != 0 or not found:
        sys.stderr.write("\n".join(lines[-40:]) + "\n")
        raise SystemExit(f"the guest run failed (exit {lab_run.exit_code})")
    result: dict[str, Any] = json.loads(found[-1][len(RESULT_MARK) :])
    result["boot_to_ready_s"] = lab_run.boot_seconds
    result["guest_run_wall_s"] = wall
    if tier:
        started = time.monotonic()
        tier_run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/lab"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        result["lab_tier_wall_s"] = time.monotonic() - started
        result["lab_tier_summary"] = (tier_run.stdout.strip().splitlines() or [""])[-1]
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"{'case':36} {'median':>10} {'x by hand':>10}")
    for label, median in result["median_s"].items():
        ratio = result["ratio_to_dmsetup_by_hand"][label]
        print(f"{label:36} {median * 1000:8.1f}ms {ratio:9.2f}x")
    for key in ("boot_to_ready_s", "guest_run_wall_s", "lab_tier_wall_s"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.1f} s")
    if result.get("lab_tier_summary"):
        print(f"lab tier: {result['lab_tier_summary']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tier", action="store_true", help="also time the lab test tier")
    args = parser.parse_args()
    if os.environ.get("THINMGR_IN_LAB") == "1":
        result = in_guest(args.runs)
        print_table(result)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    result = on_host(args.runs, args.tier)
    print_table(result)
    from benchmarks.common import save_result

    print(f"saved {save_result('lab_snapshot', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
