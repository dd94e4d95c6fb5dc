"""`thinmgr diff --files` against a full tree comparison, on the user engine (needs root).

A 1 GiB ext4 volume gets ~20,000 files (mostly small, some up to 2 MiB, in ~400
directories); a snapshot of it then gets 100 changes (50 in-place overwrites, 20 appends,
15 chmods, 10 new files, 5 removals). Timed, with the page cache dropped before each run
(cold: what a first comparison costs), and again warm:

    thinmgr diff POOL base snap --files   end to end: a fresh interpreter, both volumes
                                           inactive (activated, mounted ro, compared,
                                           unmounted, deactivated)
    diff -rq --no-dereference A B         the two trees already mounted read-only: a full
                                           walk that reads every file's contents

and the ratios reported. The outputs are checked to name the same
changed paths (diff -rq sees contents and types only, so attribute-only changes are left
out of that check).

Usage: python3 benchmarks/diff_files.py [--files N] [--changes C] [--runs R]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timing, save_result

CLI = [sys.executable, "-m", "thinmgr"]


def sh(*args: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode not in (0, 1) or (result.returncode == 1 and args[0] != "diff"):
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{result.stderr}")
    return result.stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def populate(root: Path, count: int, rng: random.Random) -> int:
    dirs = [root]
    for i in range(count // 50):
        d = rng.choice(dirs) / f"d{i}"
        d.mkdir()
        dirs.append(d)
    total = 0
    for i in range(count):
        r = rng.random()
        size = rng.randrange(0, 16 << 10) if r < 0.98 else rng.randrange(16 << 10, 1 << 20)
        (rng.choice(dirs) / f"f{i}").write_bytes(rng.randbytes(size))
        total += size
    return total


def change(root: Path, changes: int, rng: random.Random) -> None:
    files = sorted(p for p in root.rglob("f*") if p.is_file())
    picked = rng.sample(files, changes)
    plan = [(0.5, "overwrite"), (0.2, "append"), (0.15, "chmod"), (0.1, "add"), (0.05, "rm")]
    start = 0
    for share, op in plan:
        n = round(share * changes)
        for path in picked[start : start + n]:
            if op == "overwrite":
                with open(path, "r+b") as f:
                    f.write(rng.randbytes(100))
            elif op == "append":
                with open(path, "ab") as f:
                    f.write(rng.randbytes(5000))
            elif op == "chmod":
                path.chmod(0o600)
            elif op == "add":
                (path.parent / f"new-{path.name}").write_bytes(rng.randbytes(3000))
            else:
                path.unlink()
        start += n
    os.sync()


def timed(action: list[str], env: dict[str, str], cold: bool) -> tuple[float, str]:
    if cold:
        drop_caches()
    started = time.perf_counter()
    out = sh(*action, env=env)
    return time.perf_counter() - started, out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, FUSE, mount)")
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, THINMGR_HOME=str(work / "home"))
        pool = f"bfd{os.getpid()}"
        cli = [*CLI]
        mounts: list[Path] = []
        try:
            sh(*cli, "pool", "create", pool, "--size", "4G", "--engine", "user", env=env)
            sh(*cli, "volume", "create", pool, "base", "--size", "2G", env=env)
            link = sh(*cli, "volume", "activate", pool, "base", env=env).strip()
            sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", link)
            point = work / "m"
            point.mkdir()
            sh("mount", link, point)
            started = time.perf_counter()
            data = populate(point, args.files, rng)
            print(
                f"populated {args.files} files, {data >> 20} MiB, in "
                f"{time.perf_counter() - started:.1f}s"
            )
            sh("umount", point)
            sh(*cli, "volume", "deactivate", pool, "base", env=env)
            sh(*cli, "snapshot", pool, "base", "snap", env=env)
            link = sh(*cli, "volume", "activate", pool, "snap", env=env).strip()
            sh("mount", link, point)
            change(point, args.changes, rng)
            sh("umount", point)
            sh(*cli, "volume", "deactivate", pool, "snap", env=env)

            ours_cmd = [*cli, "--json", "diff", pool, "base", "snap", "--files"]
            results: dict[str, Timing] = {}
            ours_out = ""
            for cold in (True, False):
                label = "cold" if cold else "warm"
                t = results[f"ours_{label}"] = Timing(f"thinmgr diff --files ({label})")
                for _ in range(args.runs + (0 if cold else 1)):
                    elapsed, ours_out = timed(ours_cmd, env, cold)
                    t.samples.append(elapsed)
                if not cold:
                    t.samples.pop(0)  # the first warm run fills the cache
            stats_out = subprocess.run(
                [*ours_cmd, "--stats"], env=env, capture_output=True, text=True, check=True
            ).stderr
            stats = json.loads(stats_out.strip().splitlines()[-1])

            trees = []
            for name in ("base", "snap"):
                link = sh(*cli, "volume", "activate", pool, name, env=env).strip()
                tree = work / f"ro-{name}"
                tree.mkdir()
                sh("mount", "-o", "ro,noload", link, tree)
                mounts.append(tree)
                trees.append(tree)
            full_cmd = ["diff", "-rq", "--no-dereference", str(trees[0]), str(trees[1])]
            full_out = ""
            for cold in (True, False):
                label = "cold" if cold else "warm"
                t = results[f"full_{label}"] = Timing(f"diff -rq ({label})")
                for _ in range(args.runs + (0 if cold else 1)):
                    elapsed, full_out = timed(full_cmd, env, cold)
                    t.samples.append(elapsed)
                if not cold:
                    t.samples.pop(0)
        finally:
            for tree in [*mounts, work / "m"]:
                subprocess.run(["umount", str(tree)], check=False, capture_output=True)
            for name in ("base", "snap"):
                subprocess.run(
                    [*cli, "volume", "deactivate", pool, name],
                    env=env,
                    check=False,
                    capture_output=True,
                )
            subprocess.run([*cli, "pool", "destroy", pool, "--force"], env=env, check=False)

    changes = json.loads(ours_out)
    content = {c["path"] for c in changes if c["kind"] != "metadata"}
    content -= {c["path"] for c in changes if c["kind"] == "metadata"}
    seen_by_diff = set()
    for line in full_out.splitlines():
        if line.startswith("Files "):
            seen_by_diff.add(line.split(" and ")[0][len("Files ") :][len(str(trees[0])) :])
        elif line.startswith("Only in "):
            where, _, name = line[len("Only in ") :].partition(": ")
            side = trees[0] if where.startswith(str(trees[0])) else trees[1]
            seen_by_diff.add(f"{where[len(str(side)) :]}/{name}")
    agree = content == seen_by_diff
    print(f"{'':32}{'median':>10}{'min':>10}")
    for t in results.values():
        print(f"{t.label:32}{t.median:>9.2f}s{t.minimum:>9.2f}s")
    cold_ratio = results["full_cold"].median / results["ours_cold"].median
    warm_ratio = results["full_warm"].median / results["ours_warm"].median
    print(f"speed-up, cold cache: {cold_ratio:.1f}x; warm: {warm_ratio:.1f}x")
    print(f"changed paths reported: {len(changes)}; same content changes as diff -rq: {agree}")
    print(f"walk: {json.dumps(stats, sort_keys=True)}")
    saved = save_result(
        "diff_files",
        {
            "files": args.files,
            "changes": args.changes,
            "data_bytes": data,
            "timings": {k: t.as_dict() for k, t in results.items()},
            "speedup_cold": cold_ratio,
            "speedup_warm": warm_ratio,
            "stats": stats,
            "agree_with_diff_rq": agree,
        },
    )
    print(f"saved {saved}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
