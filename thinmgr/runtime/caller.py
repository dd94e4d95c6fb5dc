"""The process a command acts for: this one, or the client of the command service.

Container cgroups nest under the caller's own cgroup (issue 7, runtime/cgroups.py). When the
command service runs a command, its worker is a child of the service, in the service's
cgroup; the caller is the client that sent the command, and its cgroup is the one to nest
under, as if the command had run in that process.
"""

from __future__ import annotations

# The caller's pid; empty: this process. A list, so that it is set without `global`.
_caller: list[int] = []


def set_caller(pid: int) -> None:
    _caller[:] = [pid]


def proc_file(name: str) -> str:
    """``/proc/<caller>/NAME`` (``/proc/self/NAME`` when the command runs in its own process)."""
    return f"/proc/{_caller[0] if _caller else 'self'}/{name}"
