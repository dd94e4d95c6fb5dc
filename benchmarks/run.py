"""`thinmgr run --rm IMAGE -- /bin/true` against `runc run` of the same busybox root.

    python3 benchmarks/run.py [--runs 15]

Both start /bin/true in a new container and clean up after it, on the same machine in the same
run, interleaved round-robin. runc gets an OCI bundle from ``runc spec`` (terminal false, args
["/bin/true"]) whose rootfs is the SAME busybox tree (``tests/support/busybox.py``) in an ext4
image mounted through a loop device, as thinmgr's container sees it. thinmgr runs the image
``bb`` imported from that tree into a user-engine pool, in two states of the pool:

- cold: nothing else of the pool is active, so every run starts the pool's FUSE server for
  the container's device and stops it at the end (the user engine's server lives only while
  one of its volumes is active);
- warm: another volume of the pool is kept active meanwhile (the server stays up);
- service: warm, with `thinmgr service` running for the home, so that each
  command is a thin client handing its command line to a worker forked from a process
  that has thinmgr imported (cli/client.py, service/server.py).

The goal is thinmgr <= 2x runc. The breakdown comes from ``THINMGR_TRACE_TIMINGS=1`` (phase
times printed by `thinmgr run` itself); "interpreter + CLI + exit" is the wall time minus
the phases, i.e. Python start-up, typer/click, and interpreter shutdown. Needs root and runc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    Comparison,
    Timing,
    console_script,
    ms,
    report,
    run_once,
    save_result,
)
from tests.support.busybox import populate_rootfs, rootfs_tar

RUNC = shutil.which("runc") or "/usr/sbin/runc"
GOAL = 2.0


def sh(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed: {result.stderr}")
    return result.stdout


@contextmanager
def runc_bundle(work: Path, tree: Path) -> Iterator[Path]:
    """An OCI bundle: config.json from `runc spec`, rootfs = the tree in a loop-mounted ext4."""
    bundle = work / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    image = work / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sh("mkfs.ext4", "-q", "-d", tree, image)
    sh("mount", "-o", "loop", image, bundle / "rootfs")
    try:
        sh(RUNC, "spec", "--bundle", bundle)
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = ["/bin/true"]
        config["root"] = {"path": "rootfs", "readonly": False}
        config_path.write_text(json.dumps(config, indent=2))
        yield bundle
    finally:
        subprocess.run(["umount", str(bundle / "rootfs")], check=False)


def trace(argv: Sequence[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Wall time and the phases `thinmgr run` reported (ms) for one traced run."""
    started = time.perf_counter()
    result = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    phases: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if line.startswith("timing: "):
            _, name, value, _unit = line.split()
            phases[name] = phases.get(name, 0.0) + float(value)
    # "run" is from the launch call to on_exit: split off what is not "launch".
    if "run" in phases:
        phases["container life + cgroup teardown"] = phases.pop("run") - phases.get("launch", 0)
    # "launch.*" are parts of "launch", not more time.
    counted = sum(value for name, value in phases.items() if not name.startswith("launch."))
    phases["interpreter + CLI + exit"] = wall * 1000 - counted
    return wall, phases


def series(
    label: str, thinmgr: Sequence[str], runc: Sequence[str], env: dict[str, str], runs: int
) -> tuple[Comparison, dict[str, float]]:
    """Interleaved runs of thinmgr (traced) and runc; the comparison and the median phases."""
    mine, base = Timing(f"thinmgr run --rm ({label})"), Timing("runc run")
    phases: dict[str, list[float]] = {}
    counter = 0
    for round_number in range(runs + 2):  # two warm-up rounds
        wall, traced = trace(thinmgr, env)
        counter += 1
        runc_wall = run_once([*runc, f"bench-{os.getpid()}-{label}-{counter}"])
        if round_number < 2:
            continue
        mine.samples.append(wall)
        base.samples.append(runc_wall)
        for name, value in traced.items():
            phases.setdefault(name, []).append(value)
    medians = {name: statistics.median(values) for name, values in phases.items()}
    comparison = Comparison(
        f"run /bin/true, pool {label}", mine, base, baseline_name="runc run", goal=GOAL
    )
    return comparison, medians


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command")
    options = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mounts, namespaces, cgroups)")

    script = console_script()
    work = Path(tempfile.mkdtemp(prefix="thinmgr-bench-run-"))
    home = work / "home"
    env = dict(os.environ, THINMGR_HOME=str(home), THINMGR_TRACE_TIMINGS="1")
    pool = f"brun{os.getpid()}"
    tree = populate_rootfs(work / "tree")
    try:
        sh(script, "pool", "create", pool, "--size", "1G", "--engine", "user", env=env)
        sh(script, "image", "import", pool, "bb", rootfs_tar(work / "bb.tar"), env=env)
        sh(script, "volume", "create", pool, "keep", "--size", "64M", env=env)
        thinmgr = [script, "run", "--rm", "bb", "--", "/bin/true"]
        with runc_bundle(work, tree) as bundle:
            runc = [RUNC, "run", "--bundle", str(bundle)]
            cold, cold_phases = series("cold", thinmgr, runc, env, options.runs)
            sh(script, "volume", "activate", pool, "keep", env=env)
            try:
                warm, warm_phases = series("warm", thinmgr, runc, env, options.runs)
                sh(script, "service", "start", env=env)
                try:
                    served, served_phases = series("service", thinmgr, runc, env, options.runs)
                finally:
                    sh(script, "service", "stop", env=env)
            finally:
                sh(script, "volume", "deactivate", pool, "keep", env=env)
        python = Timing("python -c pass")
        for _ in range(options.runs):
            python.samples.append(run_once([sys.executable, "-c", "pass"]))
    finally:
        subprocess.run([script, "pool", "destroy", pool, "--force"], env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)

    report("run", [cold, warm, served])
    print(f"\npython -c pass: {ms(python.median)} ms (the floor of any Python command)")
    names = list(dict.fromkeys([*cold_phases, *warm_phases, *served_phases]))
    print(f"\n{'phase (median ms)':<34}{'cold':>8}{'warm':>8}{'service':>9}")
    for name in names:
        values = (cold_phases.get(name, 0.0), warm_phases.get(name, 0.0),
                  served_phases.get(name, 0.0))  # fmt: skip
        print(f"{name:<34}{values[0]:>8.1f}{values[1]:>8.1f}{values[2]:>9.1f}")
    path = save_result(
        "run_breakdown",
        {
            "cold_ms": cold_phases,
            "warm_ms": warm_phases,
            "service_ms": served_phases,
            "python_pass": python.as_dict(),
        },
    )
    print(f"breakdown: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
