"""What the launcher is asked to start (``LaunchSpec``) and what it reports back (``Started``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinmgr.runtime.cgroups import Limits

NET_MODES = ("none", "host")


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    rootfs_device: Path  # block device holding the container's file system, mounted by the launcher
    argv: list[str]
    state_dir: Path  # per-container run dir: `pid`, `exit`, the log of a detached container
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None  # "name", "uid", "name:group", "uid:gid" (the container's passwd)
    hostname: str | None = None  # defaults to the container's name
    tty: bool = False
    interactive: bool = False
    read_only: bool = False  # root mounted read-only, with a tmpfs on /tmp
    init: bool = True  # a reaping, signal-forwarding PID 1 with the command as PID 2
    net: str = "none"  # "none" (own namespace with lo only) | "host"
    limits: Limits = field(default_factory=Limits)
    log_path: Path | None = None  # detached: the container's stdout+stderr appended here
    fstype: str = "ext4"
    # A user namespace: container ids 0..65535 are host 100000..165535, root idmapped to match.
    userns: bool = False
    # Beyond the contract, for tests and latency measurements: without cgroups (no limits, no
    # devices allow-list) and without the capability/no_new_privs/seccomp confinement.
    use_cgroups: bool = True
    confine: bool = True


@dataclass(frozen=True)
class Started:
    pid: int  # host pid of the container's PID 1
    cgroups: dict[str, str]  # ContainerCgroups.paths()
    warnings: list[str]
    # Start-up steps and when they were reached (time.monotonic()): "cgroups" (created, in
    # the launcher), "mount" and "mounted" (around the root's mounts and pivot_root, in PID
    # 1). Empty when not known (a detached container's supervisor does not pass them on).
    marks: dict[str, float] = field(default_factory=dict)
