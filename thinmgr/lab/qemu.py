"""The qemu command line of a lab guest (kernel-lab.md §3.4).

Fastest measured configuration: ``-M microvm`` booting the uncompressed ``vmlinux`` through
its PVH entry (2.1 s to ready); TCG only (KVM is unusable on these hosts, §8); one vCPU
(``-smp 2`` was 2-3x slower); 512 MB.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from thinmgr.lab.errors import QemuMissingError

QEMU = "qemu-system-x86_64"
MACHINES = ("microvm", "pc")


@dataclass(frozen=True)
class GuestSpec:
    vmlinux: Path
    initrd: Path
    script: str  # path of the run script, as the guest sees it
    results: Path | None  # shared read-write at the same path; None: no results share
    memory_mb: int = 512
    machine: str = "microvm"
    mode: str = "hostroot"  # or "initramfs": run the script from the initramfs only
    # The default qemu64 model lacks SSE4.2/POPCNT/AVX, which the host's numpy and crc32c
    # wheels use (SIGILL or a hang at import); "max" costs about 10% (kernel-lab.md §3.4).
    cpu: str = "max"


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise QemuMissingError(f"{QEMU} not found on PATH")
    return path


def _no_blanks(what: str, value: str) -> str:
    # The kernel command line is split at blanks and 9p options at commas.
    if any(c.isspace() or c == "," for c in value):
        raise ValueError(f"{what} must not contain blanks or commas: {value!r}")
    return value


def kernel_cmdline(spec: GuestSpec) -> str:
    params = [
        "console=ttyS0",
        "quiet",
        # Only emergencies on the console: it carries the command's output (pitfall 7);
        # `dmesg` in the guest still has everything.
        "loglevel=1",
        "panic=-1",
        "mitigations=off",  # about 5% faster
        f"lab.mode={spec.mode}",
        f"lab.script={_no_blanks('script', spec.script)}",
    ]
    if spec.results is not None:
        params.append(f"lab.results={_no_blanks('results dir', str(spec.results))}")
    return " ".join(params)


def qemu_argv(spec: GuestSpec, qemu: str = QEMU) -> list[str]:
    if spec.machine not in MACHINES:
        raise ValueError(f"unknown machine type {spec.machine!r}")
    bus = "device" if spec.machine == "microvm" else "pci"
    argv = [qemu]
    if spec.machine == "microvm":
        argv += ["-M", "microvm,acpi=on,rtc=on"]
    else:
        argv += ["-M", "pc"]
    argv += [
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-no-reboot",
        "-accel", "tcg",
        "-m", str(spec.memory_mb),
        "-smp", "1",
        "-cpu", spec.cpu,
        "-kernel", str(spec.vmlinux),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        "-device", f"virtio-rng-{bus}",
    ]  # fmt: skip
    shares = []
    if spec.mode == "hostroot":
        # multidevs=remap: the host's / spans several file systems (pitfall 5).
        shares.append(("hostroot", "/", ",readonly=on"))
    if spec.results is not None:
        shares.append(("results", _no_blanks("results dir", str(spec.results)), ""))
    for tag, path, extra in shares:
        argv += [
            "-fsdev",
            f"local,id={tag},path={path},security_model=none,multidevs=remap{extra}",
            "-device",
            f"virtio-9p-{bus},fsdev={tag},mount_tag={tag}",
        ]
    return argv
