"""Run one qemu guest: stream its console, enforce a timeout, collect the markers (§3.6)."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from thinmgr.lab.console import ConsoleLine, ConsoleState, LineSplitter

TAIL_LINES = 30


@dataclass
class VmResult:
    state: ConsoleState
    lines: list[ConsoleLine] = field(default_factory=list)
    timed_out: bool = False
    never_ready: bool = False  # killed because the guest did not reach "ready" in time
    qemu_status: int | None = None
    seconds: float = 0.0

    def tail(self, count: int = TAIL_LINES) -> list[str]:
        return [line.text for line in self.lines[-count:]]


def run_vm(
    argv: list[str],
    timeout: float,
    on_output: Callable[[ConsoleLine], None] | None = None,
    *,
    ready_timeout: float | None = None,
) -> VmResult:
    """Run qemu until it exits or ``timeout`` seconds pass (then kill it).

    ``on_output`` gets every console line that is not a marker, as it arrives. A guest
    that has not printed its ``ready`` marker after ``ready_timeout`` seconds is killed at
    once (``never_ready``): a boot takes seconds even under TCG, a stalled one never ends.
    """
    started = time.monotonic()
    result = VmResult(ConsoleState())
    splitter = LineSplitter()

    def take(texts: list[str]) -> None:
        for text in texts:
            line = ConsoleLine(round(time.monotonic() - started, 3), text)
            result.lines.append(line)
            marker = result.state.feed(line)
            # After LAB_EXIT only the kernel's power-off messages follow: not output.
            if not marker and result.state.exit_code is None and on_output is not None:
                on_output(line)

    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                elapsed = time.monotonic() - started
                left = timeout - elapsed
                if left <= 0:
                    result.timed_out = True
                    break
                if (
                    ready_timeout is not None
                    and elapsed > ready_timeout
                    and "ready" not in result.state.phases
                    and result.state.exit_code is None
                ):
                    result.timed_out = result.never_ready = True
                    break
                if not selector.select(min(left, 1.0)):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                take(splitter.feed(data))
        take(splitter.flush())
    finally:
        if proc.poll() is None:
            proc.kill()
        result.qemu_status = proc.wait()
        proc.stdout.close()
        result.seconds = time.monotonic() - started
    return result
