"""One lab run, start to finish: initramfs, run script, boot, exit code (§3.6).

Every run gets its own results directory, shared read-write with the guest at the same path,
so runs can go in parallel (one per host core at most, §7). The command sees the host's root
read-only under a tmpfs overlay: the host's python, the repository, the current directory.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinmgr.lab.cache import require_kernel
from thinmgr.lab.console import ConsoleLine
from thinmgr.lab.errors import GuestError
from thinmgr.lab.initramfs import build_initramfs
from thinmgr.lab.qemu import GuestSpec, find_qemu, qemu_argv
from thinmgr.lab.vm import VmResult, run_vm

SETUP_FAILED = 125  # the guest init's exit code when it could not reach the command
# Seconds a guest may take to print its "ready" marker before it is taken for stalled and
# killed: boots take 2-3 s under TCG here. About one boot in 25 stalls silently: the guest
# kernel's TSC calibration against the PIT fails under TCG's timing jitter ("tsc: Unable to
# calibrate against PIT"), microvm has no HPET or ACPI PM timer to fall back on, the TSC is
# marked unstable and the boot hangs with no clocksource (seen with initcall_debug). Nothing
# of the command has run then, so the boot is simply tried again, up to BOOT_ATTEMPTS times.
READY_TIMEOUT = 30.0
BOOT_ATTEMPTS = 3
PASSED_ENV_PREFIXES = ("THINMGR_",)
PASSED_ENV = ("CI", "LANG", "LC_ALL", "TZ")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class LabRun:
    exit_code: int
    vm: VmResult
    results: Path  # the results directory (kept: the caller reads and removes it)
    stalled_boots: int = 0  # boots killed before "ready" and tried again

    @property
    def boot_seconds(self) -> float | None:
        """Host seconds from starting qemu to the guest being ready to run the command."""
        return self.vm.state.phases.get("ready")


def make_results_dir() -> Path:
    results = Path(tempfile.mkdtemp(prefix="thinmgr-lab-"))
    os.chmod(results, 0o755)
    return results


def guest_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The command's environment: the real interpreter first on PATH (the pyenv shim costs
    3 s per call under TCG, pitfall 8), a few host settings, then ``extra``."""
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:{SYSTEM_PATH}",
        "HOME": "/root",
        "TERM": "dumb",
        # Guest writes outside the results share are thrown away (pitfall 6): .pyc too.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "DM_DISABLE_UDEV": "1",
        "THINMGR_IN_LAB": "1",
    }
    for name, value in os.environ.items():
        if name in PASSED_ENV or name.startswith(PASSED_ENV_PREFIXES):
            env.setdefault(name, value)
    env.update(extra)
    return env


def run_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str], results: Path) -> str:
    """The sh script the guest runs (with the host's /bin/sh, in the new root)."""
    lines = ["#!/bin/sh", "# written by thinmgr lab for one guest run"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines.append(f"export THINMGR_LAB_RESULTS={shlex.quote(str(results))}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit {SETUP_FAILED}")
    lines.append(" ".join(["exec", *(shlex.quote(a) for a in argv)]))
    return "\n".join(lines) + "\n"


def run_in_lab(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = 600.0,
    memory_mb: int = 512,
    env: Mapping[str, str] = {},
    on_output: Callable[[ConsoleLine], None] | None = None,
    machine: str = "microvm",
    results: Path | None = None,
    ready_timeout: float | None = READY_TIMEOUT,
) -> LabRun:
    """Boot a guest, run ``argv`` in it, power off; raise ``GuestError`` unless the
    command ran to its end (whatever its exit code).

    ``results``: an empty directory to share with the guest (default: a new one in /tmp).
    """
    if not argv:
        raise ValueError("no command to run")
    qemu = find_qemu()
    kernel = require_kernel()
    if results is None:
        results = make_results_dir()
    initrd = results / "initrd.gz"
    initrd.write_bytes(build_initramfs(kernel, machine=machine))
    script = results / "run.sh"
    script.write_text(run_script(argv, cwd or Path.cwd(), guest_environment(env), results))
    spec = GuestSpec(
        vmlinux=kernel.vmlinux,
        initrd=initrd,
        script=str(script),
        results=results,
        memory_mb=memory_mb,
        machine=machine,
    )
    command = qemu_argv(spec, qemu)
    stalled = 0
    while True:
        vm = run_vm(command, timeout, on_output, ready_timeout=ready_timeout)
        if not vm.never_ready or stalled + 1 >= BOOT_ATTEMPTS:
            break
        stalled += 1  # nothing ran yet (no "ready"): boot again
    return LabRun(check_outcome(vm, results, timeout), vm, results, stalled)


def check_outcome(vm: VmResult, results: Path, timeout: float) -> int:
    """The command's exit code, or ``GuestError`` saying why there is none."""
    if vm.never_ready:
        raise GuestError(
            f"the lab guest did not get ready within {vm.seconds:.0f} s (qemu killed; a boot "
            "takes a few seconds)",
            console_tail=vm.tail(),
            hint=f"Emulated boots stall now and then (TSC calibration, READY_TIMEOUT in "
            f"thinmgr/lab/session.py) and are tried {BOOT_ATTEMPTS} times; if every one "
            "stalls, `thinmgr lab run -- true` shows the boot log.",
        )
    if vm.timed_out:
        raise GuestError(
            f"the lab guest did not finish within {timeout:g} s (qemu killed)",
            console_tail=vm.tail(),
            hint="Raise --timeout if the command is slow under TCG (10-40x slower than the host).",
        )
    code = vm.state.exit_code
    if code is None:
        raise GuestError(
            f"the lab guest stopped without reporting an exit code (qemu exit {vm.qemu_status}): "
            "kernel panic or crash",
            console_tail=vm.tail(),
        )
    if code == SETUP_FAILED and "ready" not in vm.state.phases:
        raise GuestError("the lab guest's set-up failed", console_tail=vm.tail())
    try:
        # The file is written after the share's last use; prefer it, the marker agrees.
        return int((results / "exitcode").read_text().strip())
    except (OSError, ValueError):
        return code
