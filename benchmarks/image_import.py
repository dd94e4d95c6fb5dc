"""Image import throughput: `thinmgr image import` against `tar -x` of the same layers.

Builds, offline, a 3-layer OCI image layout with uncompressed layers (so that both sides read
the same bytes): the busybox-static root file system, a layer of a few thousand small files
(1-8 KiB), and a layer of some larger files (a few MiB each); random contents, so that
nothing is cheaper than it would be with real data. Then, interleaved, ``--runs`` times:

    thinmgr image import POOL bench:N LAYOUT   (user engine: each layer a thin snapshot,
                                                 applied in a chrooted child, committed)
    tar -x of each layer tar into one plain directory on the same disk, then syncfs

and reports MB/s of both (layer tar bytes / wall time), the ratio (goal: thinmgr >= 50 % of
tar's throughput) and thinmgr's own breakdown per stage (scan, create, mkfs, activate, apply,
commit = unmount + deactivate, record) from the import's --json output. Every image is removed
again before the next run, so no layer is shared between runs.

Usage: python3 benchmarks/image_import.py [--runs R] [--small N] [--large N] [--large-mib M]
       [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import console_script, save_result

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    tar.addfile(info)


def busybox_layer(path: Path) -> None:
    from tests.support.busybox import rootfs_tar

    rootfs_tar(path)


def small_files_layer(path: Path, count: int, rng: random.Random) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "srv")
        for d in range(count // 100 + 1):
            _add_dir(tar, f"srv/d{d:03d}")
        for i in range(count):
            _add_file(tar, f"srv/d{i // 100:03d}/f{i:05d}", rng.randbytes(rng.randint(1, 8) << 10))


def large_files_layer(path: Path, count: int, mib: int, rng: random.Random) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "opt")
        _add_dir(tar, "opt/big")
        for i in range(count):
            _add_file(tar, f"opt/big/blob{i:02d}.bin", rng.randbytes(mib << 20))


def _blob(layout: Path, data: bytes | None = None, source: Path | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    if source is not None:
        with source.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = source.stat().st_size
    else:
        assert data is not None
        digest.update(data)
        size = len(data)
    hexd = digest.hexdigest()
    target = layout / "blobs" / "sha256" / hexd
    if source is not None:
        shutil.copyfile(source, target)
    else:
        assert data is not None
        target.write_bytes(data)
    return f"sha256:{hexd}", size


def write_layout(layout: Path, tars: list[Path]) -> None:
    """An OCI image layout (image-spec 1.0) with the given uncompressed layer tars."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = []
    for tar in tars:
        digest, size = _blob(layout, source=tar)
        layers.append({"mediaType": LAYER_TAR, "digest": digest, "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    cdigest, csize = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": csize,
        },
        "layers": layers,
    }
    mdigest, msize = _blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{result.stderr}")
    return result


def time_tar(tars: list[Path], target: Path) -> float:
    target.mkdir()
    started = time.perf_counter()
    for tar in tars:
        run(["tar", "-x", "--numeric-owner", "-f", str(tar), "-C", str(target)], dict(os.environ))
    run(["sync", "-f", str(target)], dict(os.environ))
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=3000, help="small files in layer 2")
    parser.add_argument("--large", type=int, default=20, help="large files in layer 3")
    parser.add_argument("--large-mib", type=int, default=6, help="MiB per large file")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, FUSE, mount)")
    work = Path(tempfile.mkdtemp(prefix="thinmgr-bench-img-", dir=args.dir))
    pool = f"bimg{os.getpid() % 10000}"
    env = dict(os.environ, THINMGR_HOME=str(work / "home"))
    thinmgr = console_script()
    try:
        rng = random.Random(7)
        tars = [work / "l1.tar", work / "l2.tar", work / "l3.tar"]
        busybox_layer(tars[0])
        small_files_layer(tars[1], args.small, rng)
        large_files_layer(tars[2], args.large, args.large_mib, rng)
        layout = work / "layout"
        write_layout(layout, tars)
        total = sum(t.stat().st_size for t in tars)
        print(f"image: 3 layers, {total / 1e6:.1f} MB of layer tars ({work})")
        run([thinmgr, "pool", "create", pool, "--size", "2G", "--engine", "user"], env)

        tar_times: list[float] = []
        import_times: list[float] = []
        breakdowns: list[dict[str, float]] = []
        for n in range(args.runs + 1):  # the first round warms the page cache, untimed
            tar_time = time_tar(tars, work / "tree")
            started = time.perf_counter()
            out = run([thinmgr, "--json", "image", "import", pool, f"bench:{n}", str(layout)], env)
            import_time = time.perf_counter() - started
            run([thinmgr, "image", "rm", f"bench:{n}"], env)
            if n == 0:
                continue
            tar_times.append(tar_time)
            import_times.append(import_time)
            breakdowns.append(json.loads(out.stdout)["timings"])
        tar_med = sorted(tar_times)[len(tar_times) // 2]
        imp_med = sorted(import_times)[len(import_times) // 2]
        tar_rate, imp_rate = total / tar_med / 1e6, total / imp_med / 1e6
        ratio = imp_rate / tar_rate
        stages = sorted({k for b in breakdowns for k in b})
        breakdown = {
            k: sorted(b.get(k, 0.0) for b in breakdowns)[len(breakdowns) // 2] for k in stages
        }
        print(f"{'':28}{'median s':>10}{'MB/s':>10}")
        print(f"{'tar -x + syncfs':28}{tar_med:10.2f}{tar_rate:10.1f}")
        print(f"{'thinmgr image import':28}{imp_med:10.2f}{imp_rate:10.1f}")
        verdict = "met" if ratio >= 0.5 else "MISSED"
        print(f"throughput ratio thinmgr/tar: {ratio:.2f} (goal >= 0.50: {verdict})")
        print(
            "thinmgr breakdown (median s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items())
        )
        data: dict[str, Any] = {
            "layer_tar_bytes": total,
            "tar_s": tar_times,
            "import_s": import_times,
            "tar_mb_s": tar_rate,
            "import_mb_s": imp_rate,
            "ratio": ratio,
            "goal_ratio": 0.5,
            "goal_met": ratio >= 0.5,
            "breakdown_s": breakdown,
        }
        print(f"\nresult: {save_result('image_import', data)}")
    finally:
        subprocess.run(
            [thinmgr, "pool", "destroy", pool, "--force"], env=env, capture_output=True, check=False
        )
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
