"""The user engine's block-device export against a plain loop device, same workload, same run.

Both devices sit on a file in --dir (default /var/tmp): "plain" is a loop device over the file,
"thinmgr" is a loop device over the FUSE-served file (FuseExport over a FileBackend of the
file). On each: mkfs.ext4, mount, then with fio:

    seq-write   1 MiB writes, O_DIRECT, --mib MiB            (dd oflag=direct)
    seq-fsync   1 MiB buffered writes + fsync at the end       (dd conv=fsync)
    seq-read    1 MiB buffered reads (every phase starts after sync + drop_caches)
    rand-write  4 KiB random O_DIRECT writes, queue depth 1, --seconds s

and prints MiB/s (IOPS for rand-write) and the thinmgr/plain ratio (goal: >= 0.5 for the
sequential rows). Needs root, fio, mkfs.ext4.

Usage: python3 benchmarks/blockdev.py [--mib 400] [--seconds 10] [--threads 2] [--runs 1]
       [--no-fuse-direct-io] [--no-loop-direct-io] [--block-size 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thinmgr.engine.user.backend import FileBackend
from thinmgr.engine.user.blockdev import ExportOptions, attach
from thinmgr.kernel import loop

# A device maker: given the backing file, yields the block device path while it is attached.
DeviceMaker = Callable[[Path, Path], contextlib.AbstractContextManager[str]]


@contextlib.contextmanager
def plain_device(backing: Path, _work: Path, *, direct_io: bool, block_size: int) -> Iterator[str]:
    attached = loop.attach(backing, direct_io=direct_io, block_size=block_size)
    try:
        yield attached.device
    finally:
        loop.detach(attached.fd, attached.device)
        os.close(attached.fd)
        loop.wait_unbound(attached.device)


@contextlib.contextmanager
def thinmgr_device(backing: Path, work: Path, *, options: ExportOptions) -> Iterator[str]:
    backend = FileBackend(backing)
    block = attach(backend, run_dir=work / "run", link=work / "dev" / "volume", options=options)
    try:
        yield str(block.link)
    finally:
        block.detach()
        backend.close()
        if block.export.errors:
            print(f"  export errors: {block.export.errors[:3]}", file=sys.stderr)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fio(name: str, directory: Path, *args: str) -> dict[str, float]:
    drop_caches()  # each phase starts with no dirty pages of the previous one being written back
    command = [
        "fio",
        f"--name={name}",
        f"--directory={directory}",
        "--output-format=json",
        "--ioengine=psync",
        "--filename=bench.dat",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    job = json.loads(result.stdout)["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return {"mib_s": side["bw_bytes"] / (1 << 20), "iops": side["iops"]}


def workload(device: str, mnt: Path, mib: int, seconds: int) -> dict[str, float]:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device], check=True)
    subprocess.run(["mount", device, str(mnt)], check=True)
    try:
        size = f"--size={mib}M"
        out = {
            "seq-write": fio("sw", mnt, "--rw=write", "--bs=1M", "--direct=1", size)["mib_s"],
        }
        os.unlink(mnt / "bench.dat")
        out["seq-fsync"] = fio("sf", mnt, "--rw=write", "--bs=1M", "--end_fsync=1", size)["mib_s"]
        out["seq-read"] = fio("sr", mnt, "--rw=read", "--bs=1M", size)["mib_s"]
        out["rand-write"] = fio(
            "rw",
            mnt,
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            size,
            f"--runtime={seconds}",
            "--time_based",
        )["iops"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return out


def measure(
    make: DeviceMaker, directory: Path, mib: int, seconds: int, runs: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="thinmgr-bench-", dir=directory) as tmp:
            work = Path(tmp)
            backing = work / "backing.img"
            with open(backing, "wb") as f:
                f.truncate((mib + 512) << 20)
            mnt = work / "mnt"
            mnt.mkdir()
            with make(backing, work) as device:
                for key, value in workload(device, mnt, mib, seconds).items():
                    samples.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=400)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=ExportOptions.threads)
    parser.add_argument("--block-size", type=int, default=ExportOptions.block_size)
    parser.add_argument("--no-fuse-direct-io", action="store_true")
    parser.add_argument("--no-loop-direct-io", action="store_true")
    parser.add_argument(
        "--plain-direct-io",
        choices=("on", "off"),
        default="off",
        help="the baseline loop device's direct I/O (losetup's default: off)",
    )
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, FUSE, mount)", file=sys.stderr)
        return 2

    options = ExportOptions(
        threads=args.threads,
        fuse_direct_io=not args.no_fuse_direct_io,
        loop_direct_io=not args.no_loop_direct_io,
        block_size=args.block_size,
    )

    def plain(backing: Path, work: Path) -> contextlib.AbstractContextManager[str]:
        return plain_device(
            backing, work, direct_io=args.plain_direct_io == "on", block_size=args.block_size
        )

    def ours(backing: Path, work: Path) -> contextlib.AbstractContextManager[str]:
        return thinmgr_device(backing, work, options=options)

    base = measure(plain, args.dir, args.mib, args.seconds, args.runs)
    mine = measure(ours, args.dir, args.mib, args.seconds, args.runs)
    print(f"{'workload':<12} {'plain':>10} {'thinmgr':>10} {'ratio':>7}   ({options})")
    for key, value in base.items():
        unit = "IOPS" if key == "rand-write" else "MiB/s"
        print(f"{key:<12} {value:>10.0f} {mine[key]:>10.0f} {mine[key] / value:>7.2f}   {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
