"""Metadata tools against thin-provisioning-tools on the same file, in the same run.

Builds a pool's metadata holding 1,000,000 mappings (4 devices of 250,000, data blocks shared
between devices) with thin_restore, then times each pair of commands end to end, as a user
runs them (process start-up included), output to /dev/null:

    thinmgr metadata dump   vs  thin_dump     (goal: <= 2x)
    thinmgr metadata check  vs  thin_check    (goal: <= 2x)
    thinmgr metadata delta  vs  thin_delta
    thinmgr metadata ls     vs  thin_ls
    thinmgr metadata restore vs thin_restore

Usage: python3 benchmarks/metadata_tools.py [--mappings N] [--runs R]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Comparison, console_script, report, time_command
from tests.support.xmlgen import random_pool


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mappings", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-") as tmp:
        work = Path(tmp)
        xml = work / "pool.xml"
        meta = work / "meta.bin"
        pool = random_pool(1, 4, args.mappings // 4)
        xml.write_text(pool.xml())
        with open(meta, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["thin_restore", "-i", xml, "-o", meta], check=True)
        a, b = (str(d.dev_id) for d in pool.devices[:2])
        ours_out = work / "ours.bin"
        theirs_out = work / "theirs.bin"
        for path in (ours_out, theirs_out):
            with open(path, "wb") as f:
                f.truncate(256 << 20)

        pairs = [
            ("dump", ["thinmgr", "metadata", "dump", meta], ["thin_dump", meta], 2.0),
            (
                "check",
                ["thinmgr", "metadata", "check", "-q", meta],
                ["thin_check", "-q", meta],
                2.0,
            ),
            (
                "delta",
                ["thinmgr", "metadata", "delta", meta, "--snap1", a, "--snap2", b],
                ["thin_delta", "--snap1", a, "--snap2", b, meta],
                None,
            ),
            ("ls", ["thinmgr", "metadata", "ls", meta], ["thin_ls", meta], None),
            (
                "ls -o DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS",
                ["thinmgr", "metadata", "ls", "-o", "DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", meta],
                ["thin_ls", "-o", "DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", meta],
                None,
            ),
            (
                "restore",
                ["thinmgr", "metadata", "restore", "--force", "-i", xml, "-o", ours_out],
                ["thin_restore", "-i", xml, "-o", theirs_out],
                None,
            ),
        ]
        results = []
        script = console_script()  # not a version manager's shim, which adds its own start-up
        for name, ours, theirs, goal in pairs:
            mine = time_command([script, *(str(x) for x in ours[1:])], runs=args.runs)
            base = time_command([str(x) for x in theirs], runs=args.runs)
            results.append(
                Comparison(
                    f"{name} ({args.mappings:,} mappings)",
                    mine,
                    base,
                    baseline_name=Path(str(theirs[0])).name,
                    goal=goal,
                )
            )
    return report("metadata_tools", results)


if __name__ == "__main__":
    sys.exit(main())
