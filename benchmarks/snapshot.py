"""The user engine in-process: snapshot cost against volume size, and data-path throughput.

1. ``create_snap`` (with the commit that makes it durable) of a thin device with 1,000,000
   mapped blocks against one with 1,000: a dm-thin snapshot is O(1) (format section 5.4),
   so the ratio should stay near 1 (goal <= 1.5x, each under 10 ms). Metadata is built with
   ``restore_to_image`` from one range mapping; the data file is sparse.
2. Throughput of a 1 GiB thin volume (64 KiB blocks) against plain ``os.pwrite``/``os.pread``
   on a file: sequential 1 MiB writes (provisioning) and reads, and 4 KiB random writes into
   provisioned blocks.

Usage: python3 benchmarks/snapshot.py [--runs R] [--io-only | --snap-only]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thinmgr.engine.user.pool import UserPool
from thinmgr.format.restore import restore_to_image

BB = 64 * 1024
META_BLOCKS = 16384  # 64 MiB


def pool_xml(mapped: int, nr_data_blocks: int) -> str:
    return (
        f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
        f'data_block_size="128" nr_data_blocks="{nr_data_blocks}">\n'
        f'  <device dev_id="1" mapped_blocks="{mapped}" transaction="0" '
        f'creation_time="0" snap_time="0">\n'
        f'    <range_mapping origin_begin="0" data_begin="0" length="{mapped}" time="0"/>\n'
        "  </device>\n</superblock>\n"
    )


def snapshot_times(work: Path, mapped: int, runs: int) -> list[float]:
    nr_data = mapped + 16384
    meta, data = work / f"meta-{mapped}", work / f"data-{mapped}"
    meta.write_bytes(restore_to_image(pool_xml(mapped, nr_data), META_BLOCKS))
    with open(data, "wb") as f:
        f.truncate(nr_data * BB)
    samples = []
    with UserPool.open(meta, data) as pool:
        assert pool.thin_status(1)[0] == mapped
        for run in range(runs):
            started = time.perf_counter()
            pool.create_snap(100 + run, 1)
            samples.append(time.perf_counter() - started)
    return samples


def bench_snapshots(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-") as tmp:
        small = statistics.median(snapshot_times(Path(tmp), 1000, runs))
        large = statistics.median(snapshot_times(Path(tmp), 1_000_000, runs))
    print(f"create_snap+commit, 1,000 mapped blocks:     {small * 1e3:7.3f} ms (median of {runs})")
    print(f"create_snap+commit, 1,000,000 mapped blocks: {large * 1e3:7.3f} ms (median of {runs})")
    print(f"ratio 1M / 1k: {large / small:.2f}x (goal <= 1.5x, each < 10 ms)")


def rate(label: str, nbytes: int, action: Callable[[], None], baseline: float | None) -> float:
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    mib_s = nbytes / elapsed / (1 << 20)
    ratio = f"  ({mib_s / baseline:.2f}x of plain file)" if baseline else ""
    print(f"  {label:<34} {mib_s:9.1f} MiB/s{ratio}")
    return mib_s


def bench_io() -> None:
    size = 1 << 30
    chunk = b"\xa5" * (1 << 20)
    small = b"\x5a" * 4096
    rng = random.Random(1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(50_000)]
    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        plain = os.open(work / "plain", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(plain, size)
        meta, data = work / "meta", work / "data"
        with open(meta, "wb") as f:
            f.truncate(64 << 20)
        with open(data, "wb") as f:
            f.truncate(size)
        pool = UserPool.create(meta, data)
        pool.create_thin(1)
        volume = pool.volume(1, size)

        def seq_write_plain() -> None:
            for off in range(0, size, len(chunk)):
                os.pwrite(plain, chunk, off)

        def seq_read_plain() -> None:
            for off in range(0, size, len(chunk)):
                os.pread(plain, len(chunk), off)

        def rand_plain() -> None:
            for off in offsets:
                os.pwrite(plain, small, off)

        def seq_write_thin() -> None:
            for off in range(0, size, len(chunk)):
                volume.write(off, chunk)

        def seq_read_thin() -> None:
            for off in range(0, size, len(chunk)):
                volume.read(off, len(chunk))

        def rand_thin() -> None:
            for off in offsets:
                volume.write(off, small)

        print("1 GiB, page cache warm, no fsync (in-process):")
        base = rate("plain file: sequential 1 MiB write", size, seq_write_plain, None)
        rate("thin volume: sequential 1 MiB write", size, seq_write_thin, base)
        base = rate("plain file: sequential 1 MiB read", size, seq_read_plain, None)
        rate("thin volume: sequential 1 MiB read", size, seq_read_thin, base)
        n = len(offsets) * 4096
        base = rate("plain file: random 4 KiB write", n, rand_plain, None)
        rate("thin volume: random 4 KiB write", n, rand_thin, base)
        started = time.perf_counter()
        volume.flush()
        print(f"  flush (commit of 16384 new mappings): {time.perf_counter() - started:.3f} s")
        volume.close()
        pool.close()
        os.close(plain)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--io-only", action="store_true")
    parser.add_argument("--snap-only", action="store_true")
    args = parser.parse_args()
    if not args.io_only:
        bench_snapshots(args.runs)
    if not args.snap_only:
        bench_io()
    return 0


if __name__ == "__main__":
    sys.exit(main())
