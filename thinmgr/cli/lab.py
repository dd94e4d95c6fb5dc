"""`thinmgr lab ...`: the qemu kernel lab (a Debian kernel with dm-thin under TCG).

`lab run -- CMD` boots a guest, runs CMD there with the host's root read-only under a
writable overlay, streams its output and exits with its exit code. Heavy imports stay inside
the commands so that `thinmgr --help` stays fast.
"""

from __future__ import annotations

import shutil
import sys
from typing import Annotated

import typer

from thinmgr.cli.output import emit_json, settings

app = typer.Typer(
    help="The kernel lab: run commands and tests against a real dm-thin kernel under qemu.",
    no_args_is_help=True,
)


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Is the lab usable: qemu present, kernel prepared, busybox static?"""
    from thinmgr.lab.cache import cache_dir, find_kernel
    from thinmgr.lab.errors import InitramfsError
    from thinmgr.lab.initramfs import find_busybox
    from thinmgr.lab.qemu import QEMU

    kernel = find_kernel()
    try:
        busybox: str | None = str(find_busybox())
    except InitramfsError:
        busybox = None
    report = {
        "cache": str(cache_dir()),
        "kernel": kernel.release if kernel else None,
        "package": kernel.package if kernel else None,
        "qemu": shutil.which(QEMU),
        "busybox": busybox,
        "ready": bool(kernel and shutil.which(QEMU) and busybox),
    }
    if settings(ctx).json:
        emit_json(report)
    else:
        hints = {
            "kernel": "run `thinmgr lab fetch`",
            "qemu": "apt-get install qemu-system-x86",
            "busybox": "apt-get install busybox-static",
        }
        for key, value in report.items():
            shown = value if value is not None else f"missing ({hints.get(key, '')})"
            typer.echo(f"{key + ':':9} {shown}")
    if not report["ready"]:
        raise typer.Exit(1)


@app.command("fetch")
def fetch(
    package: Annotated[
        str | None,
        typer.Option(help="Kernel image package [default: what linux-image-amd64 depends on]."),
    ] = None,
) -> None:
    """Download the Debian kernel with apt-get and prepare it in the lab cache."""
    from thinmgr.lab.kernel import fetch as fetch_kernel

    kernel = fetch_kernel(package)
    typer.echo(f"lab kernel {kernel.release} ({kernel.package}) ready in {kernel.root}")


@app.command(
    "run",
    context_settings={"allow_interspersed_args": False},
)
def run(
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    timeout: Annotated[
        float, typer.Option(help="Seconds before the guest is killed (boot included).")
    ] = 600.0,
    memory: Annotated[int, typer.Option(help="Guest memory in MiB.")] = 512,
    keep: Annotated[
        bool, typer.Option(help="Keep the results directory and print its path.")
    ] = False,
    boot_time: Annotated[
        bool, typer.Option("--boot-time", help="Print the guest's boot-to-ready time.")
    ] = False,
) -> None:
    """Boot the lab guest, run COMMAND in the current directory, exit with its exit code."""
    from thinmgr.lab.console import ConsoleLine
    from thinmgr.lab.session import run_in_lab

    def show(line: ConsoleLine) -> None:
        sys.stdout.write(line.text + "\n")
        sys.stdout.flush()

    lab_run = run_in_lab(command, timeout=timeout, memory_mb=memory, on_output=show)
    if lab_run.stalled_boots:
        sys.stderr.write(
            f"lab: {lab_run.stalled_boots} boot(s) stalled before the guest was ready and were "
            "tried again (TSC calibration under TCG; docs/kernel-lab.md)\n"
        )
    if boot_time and lab_run.boot_seconds is not None:
        sys.stderr.write(f"lab: guest ready after {lab_run.boot_seconds:.2f} s\n")
    if keep:
        sys.stderr.write(f"lab: results in {lab_run.results}\n")
    else:
        shutil.rmtree(lab_run.results, ignore_errors=True)
    raise typer.Exit(lab_run.exit_code)
