"""Through ext4 on an active user-engine volume vs a loop device over a plain file.

"plain" is a loop device over a sparse file; "thinmgr" is a thin volume of a user-engine
pool (metadata and data on sparse files in the same --dir), activated by ``UserEngine`` (its
server process, FUSE export and loop device). Same workload on both (benchmarks/blockdev.py's
``workload``: mkfs.ext4, mount, fio seq-write / seq-fsync / seq-read / rand-write) and the
thinmgr/plain ratio (goal: >= 0.5 for the sequential rows). Needs root, fio, mkfs.ext4.

Usage: python3 benchmarks/volume_io.py [--mib 400] [--seconds 10] [--runs 1] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.blockdev import measure, plain_device
from benchmarks.common import save_result
from thinmgr.engine.base import PoolSpec
from thinmgr.engine.user.engine import UserEngine

BLOCK_SECTORS = 128  # 64 KiB data blocks, dm-thin's common choice


@contextlib.contextmanager
def user_volume(backing: Path, work: Path) -> Iterator[str]:
    """A thin volume as large as ``backing``; the pool's data file replaces ``backing``."""
    size = backing.stat().st_size
    data, metadata = work / "pool.data", work / "pool.meta"
    for path, length in ((data, size), (metadata, 64 << 20)):
        with open(path, "wb") as f:
            f.truncate(length)  # sparse, like the plain side's backing file
    spec = PoolSpec("bench", metadata, data, work / "run", data_block_sectors=BLOCK_SECTORS)
    engine = UserEngine(dev_root=work / "dev")
    engine.format_pool(spec, nr_data_blocks=size // (BLOCK_SECTORS * 512))
    engine.create_thin(spec, 1)
    link = engine.activate_volume(spec, 1, name="vol", size_bytes=size, read_only=False)
    try:
        yield str(link)
    finally:
        engine.deactivate_volume(spec, 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=400)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, FUSE, mount)", file=sys.stderr)
        return 2

    def plain(backing: Path, work: Path) -> contextlib.AbstractContextManager[str]:
        return plain_device(backing, work, direct_io=False, block_size=4096)

    base = measure(plain, args.dir, args.mib, args.seconds, args.runs)
    mine = measure(user_volume, args.dir, args.mib, args.seconds, args.runs)
    print(f"{'workload':<12} {'plain':>10} {'thinmgr':>10} {'ratio':>7}")
    rows = {}
    for key, value in base.items():
        unit = "IOPS" if key == "rand-write" else "MiB/s"
        ratio = mine[key] / value
        rows[key] = {"plain": value, "thinmgr": mine[key], "ratio": ratio, "unit": unit}
        print(f"{key:<12} {value:>10.0f} {mine[key]:>10.0f} {ratio:>7.2f}   {unit}")
    saved = save_result("volume_io", {"mib": args.mib, "seconds": args.seconds, "rows": rows})
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
