"""The manager's commands end to end (CLI included), on the user engine (needs root).

1. ``thinmgr snapshot`` of a volume with 1,000,000 mapped blocks (64 KiB blocks: 61 GiB of a
   64 GiB volume), inactive and active (suspend round trip): median wall time, against
   ``thinmgr --version`` and ``python -c pass`` timed in the same run. The mappings are
   written with ``restore_to_image`` from one range mapping (the data file stays sparse), after
   ``volume create`` made the device and advanced the transaction id, so catalog and pool agree.
2. 1,000 volumes in one pool: ``volume list`` and ``pool status`` (goal: under 300 ms).

Usage: sudo python3 benchmarks/manager.py [--runs R] [--volumes N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Comparison, Timing, console_script, report, run_once, time_commands

MAPPED = 1_000_000
BLOCK_SECTORS = 128


def pool_xml(nr_data_blocks: int, mapped: int, transaction: int) -> str:
    return (
        f'<superblock uuid="" time="0" transaction="{transaction}" flags="0" version="2" '
        f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{nr_data_blocks}">\n'
        f'  <device dev_id="0" mapped_blocks="{mapped}" transaction="0" '
        f'creation_time="0" snap_time="0">\n'
        f'    <range_mapping origin_begin="0" data_begin="0" length="{mapped}" time="0"/>\n'
        "  </device>\n</superblock>\n"
    )


def cli(script: str, home: Path, *args: str) -> str:
    result = subprocess.run(
        [script, *args],
        env=dict(os.environ, THINMGR_HOME=str(home)),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"thinmgr {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def big_volume(script: str, home: Path) -> None:
    """Pool ``big`` with volume ``v`` (thin id 0) mapping 1,000,000 blocks."""
    from thinmgr.format.constants import BLOCK_SIZE
    from thinmgr.format.restore import restore_to_image

    cli(script, home, "pool", "create", "big", "--size", "70G", "--engine", "user")
    cli(script, home, "volume", "create", "big", "v", "--size", "64G")
    metadata = home / "pools" / "big" / "metadata"
    nr_meta = metadata.stat().st_size // BLOCK_SIZE
    nr_data = (home / "pools" / "big" / "data").stat().st_size // (BLOCK_SECTORS * 512)
    image = restore_to_image(pool_xml(nr_data, MAPPED, transaction=1), nr_meta)
    with open(metadata, "r+b") as f:
        f.write(image)
    shown = cli(script, home, "--json", "volume", "show", "big", "v")
    assert f'"mapped_blocks": {MAPPED}' in shown, shown


def time_snapshots(
    script: str, home: Path, label: str, prefix: str, runs: int, warmup: int = 2
) -> Timing:
    env = dict(os.environ, THINMGR_HOME=str(home))
    timing = Timing(label)
    for index in range(warmup + runs):
        elapsed = run_once([script, "snapshot", "big", "v", f"{prefix}{index}"], env)
        if index >= warmup:
            timing.samples.append(elapsed)
    return timing


def many_volumes(script: str, home: Path, count: int) -> None:
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import create_volume

    cli(script, home, "pool", "create", "many", "--size", "10G", "--engine", "user")
    os.environ["THINMGR_HOME"] = str(home)
    with open_manager(home) as mgr:
        for index in range(count):
            create_volume(mgr, "many", f"vol{index:05d}", 1 << 30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--volumes", type=int, default=1000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/manager.py needs root (loop devices, FUSE)")
    script = console_script()
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-", dir="/var/tmp") as tmp:
        home = Path(tmp) / "home"
        big_volume(script, home)
        bases = time_commands(
            {
                "thinmgr --version": [script, "--version"],
                "python -c pass": [sys.executable, "-c", "pass"],
            },
            args.runs,
        )
        version, bare = bases["thinmgr --version"], bases["python -c pass"]
        inactive = time_snapshots(
            script, home, "snapshot (inactive origin, 1M mapped)", "i", args.runs
        )
        cli(script, home, "volume", "activate", "big", "v")
        try:
            active = time_snapshots(
                script, home, "snapshot (active origin, 1M mapped)", "a", args.runs
            )
        finally:
            cli(script, home, "volume", "deactivate", "big", "v")
        for timing in (inactive, active):
            results.append(Comparison(timing.label, timing, version, "thinmgr --version"))
            results.append(Comparison(timing.label, timing, bare, "python -c pass"))

        many_volumes(script, home, args.volumes)
        listing = time_commands(
            {
                f"volume list ({args.volumes} volumes)": [script, "volume", "list", "many"],
                f"pool status ({args.volumes} volumes)": [script, "pool", "status", "many"],
            },
            args.runs,
        )
        for timing in listing.values():
            results.append(
                Comparison(timing.label, timing, version, "thinmgr --version", goal_ms=300.0)
            )
    return report("manager", results)


if __name__ == "__main__":
    sys.exit(main())
