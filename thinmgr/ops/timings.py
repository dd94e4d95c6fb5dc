"""Phase timings of a command, for finding where start-up time goes (``THINMGR_TRACE_TIMINGS``).

A ``Timings`` collects (phase, seconds) pairs; the CLI prints them to stderr when the
environment variable is set to ``1``. Disabled, ``phase`` costs one attribute test. Stdlib
only, so that the CLI can create one before the heavy imports it measures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

TRACE_ENV = "THINMGR_TRACE_TIMINGS"


def tracing_enabled() -> bool:
    return os.environ.get(TRACE_ENV) == "1"


@dataclass
class Timings:
    enabled: bool = False
    phases: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.phases.append((name, seconds))

    def report(self) -> str:
        """One line per phase, ``timing: NAME MS``, in the order they ran."""
        return "".join(f"timing: {name} {seconds * 1000:.2f} ms\n" for name, seconds in self.phases)
