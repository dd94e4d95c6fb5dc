"""Which engine serves a pool: ``auto``, ``user`` or ``kernel``, and how to get one.

``auto`` picks the kernel engine when the kernel has dm-thin -- ``/dev/mapper/control``
exists and the ``thin-pool`` target is loaded, built in or loadable as a module, and
device-mapper answers for it (``KernelEngine.available()``) -- else the user engine
(ARCHITECTURE.md, "Two engines, one interface").

Tests inject an engine with ``THINMGR_ENGINE_FACTORY=module:callable``: the callable gets the
engine name ("user" or "kernel") and returns an ``Engine``. It is meant for the test suites
only (the unit tier runs every command against an in-memory fake; the root tier can point it
at the real user engine); it is not a user setting.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from thinmgr.errors import UnsupportedError, UsageError

if TYPE_CHECKING:
    from thinmgr.engine.base import Engine

FACTORY_ENV = "THINMGR_ENGINE_FACTORY"
ENGINE_CHOICES = ("auto", "user", "kernel")


def kernel_has_dm_thin(root: Path = Path("/")) -> bool:
    """Whether the running kernel can serve dm-thin pools (loaded, built in or loadable)."""
    if not (root / "dev/mapper/control").exists():
        return False
    if (root / "sys/module/dm_thin_pool").exists():
        return True
    release = os.uname().release
    modules = root / "lib/modules" / release
    for listing in ("modules.builtin", "modules.dep"):
        try:
            text = (modules / listing).read_text(errors="replace")
        except OSError:
            continue
        if "dm-thin-pool.ko" in text:
            return True
    return False


def resolve_engine_name(requested: str) -> str:
    """``auto`` resolved to the engine this host runs; ``user``/``kernel`` checked."""
    if requested not in ENGINE_CHOICES:
        raise UsageError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if requested == "auto":
        # The file check is cheap and rules out most hosts; the ioctl check confirms.
        return "kernel" if kernel_has_dm_thin() and kernel_availability()[0] else "user"
    return requested


def kernel_availability() -> tuple[bool, str]:
    """Whether the kernel engine can run here, and why (not): ``KernelEngine.available()``."""
    from thinmgr.engine.kernel.engine import KernelEngine

    verdict = KernelEngine.available()
    return verdict.ok, verdict.reason


def load_engine(name: str, environ: Mapping[str, str] = os.environ) -> Engine:
    """An engine instance for ``name`` ("user" or "kernel")."""
    factory_spec = environ.get(FACTORY_ENV)
    if factory_spec:
        return _factory(factory_spec)(name)
    if name == "kernel":
        return _kernel_engine()
    if name != "user":
        raise UsageError(f"unknown engine {name!r}")
    try:
        module = importlib.import_module("thinmgr.engine.user.engine")
    except ModuleNotFoundError as exc:
        if exc.name != "thinmgr.engine.user.engine":
            raise
        raise UnsupportedError(
            "the user engine is not installed in this build of thinmgr",
            hint="Install a complete thinmgr.",
        ) from exc
    return cast("Engine", module.UserEngine())


def _kernel_engine() -> Engine:
    from thinmgr.engine.kernel.engine import KernelEngine

    verdict = KernelEngine.available()
    if not verdict:
        raise UnsupportedError(
            f"the kernel engine is not available here: {verdict.reason}",
            hint="Use `--engine user` (or `auto`, which picks the user engine on this host).",
        )
    return cast("Engine", KernelEngine())


def _factory(spec: str) -> Callable[[str], Engine]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{FACTORY_ENV}={spec!r} is not of the form module:callable")
    module = importlib.import_module(module_name)
    return cast("Callable[[str], Engine]", getattr(module, attribute))
