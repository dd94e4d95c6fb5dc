"""Container use cases: run, exec, list (with reconciliation), stop, remove, logs.

A container is a writable thin snapshot (a device of kind ``container`` named ``ctr-NAME``)
of an image's top layer or of a volume, and the process the launcher runs on it
(``thinmgr.runtime.launch``). What ``run`` does, in order:

1. everything is checked before anything is made: the target (image or POOL/VOLUME), the
   name (free, valid as a device name too), the command (argv, else the image's
   Entrypoint+Cmd), the limits (parsed and ``check_limits``), the throttles' device;
2. the snapshot is created and activated (each step under the pool's lock, released
   after it: the lock is never held while the container runs, so other commands on the pool
   work meanwhile), and the Container row is inserted (state ``created``);
3. the launcher starts the command; ``on_started`` records ``running``, the pid and what was
   set up (cgroup paths, state dir, log), ``on_exit`` records ``exited`` and the exit code,
   deactivates the device and, with ``--rm``, removes the container and its device.

Any failure before the command starts removes what was made (row, device, state dir), so a
failed ``run`` leaves nothing behind.

Ownership: the process that runs a container (the foreground ``thinmgr run``, or the detached
supervisor it forks) holds an ``flock`` on ``STATE_DIR/owner.lock`` until it has recorded the
exit. A ``running`` row whose pid is dead and whose owner lock is free belongs to a thinmgr
that was killed: ``list_containers`` (``thinmgr ps``), ``stop`` and ``rm`` reconcile it (exit
code from ``STATE_DIR/exit`` when the launcher wrote one, cgroups killed and removed, device
deactivated), so a SIGKILLed ``thinmgr run`` leaves nothing stale after the next ``ps``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.models import (
    Container,
    ContainerState,
    Device,
    DeviceKind,
    DeviceState,
    Image,
    Layer,
    Pool,
    utc_now,
)
from thinmgr.errors import (
    BusyError,
    ConflictError,
    NoSpaceError,
    NotFoundError,
    ThinmgrError,
    UsageError,
)
from thinmgr.ops import journal
from thinmgr.ops.manager import Manager, get_device, get_pool
from thinmgr.ops.naming import MAX_NAME_LENGTH, check_name
from thinmgr.ops.timings import Timings
from thinmgr.ops.units import parse_size

if TYPE_CHECKING:
    from thinmgr.runtime.cgroups import Limits
    from thinmgr.runtime.spec import LaunchSpec, Started

DEVICE_PREFIX = "ctr-"  # the container's device in its pool: ctr-NAME
MAX_CONTAINER_NAME = MAX_NAME_LENGTH - len(DEVICE_PREFIX)
STATE_ROOT = "containers"  # HOME/containers/NAME: pid, exit status, log, owner lock
OWNER_LOCK = "owner.lock"
EXIT_FILE = "exit"  # written by the launcher: the container's exit code, as text
LOG_FILE = "container.log"
# Docker's default PATH when the image sets none (moby oci/defaults.go, DefaultPathEnv).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORKS = ("none", "host")
# How long stop/rm wait for the owner of a container to record its exit.
OWNER_WAIT = 15.0
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*")
_ENV_KEY = re.compile(r"[^=\0]+")

Notify = Callable[[str], None]


# --- what the caller gives and gets ------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """What ``thinmgr run`` was asked for; stored as the container's ``config``.

    Sizes and throttles stay as typed (``"32m"``, ``"DEV:1m"``): they are parsed and checked
    by ``run_container`` before anything is created, with the container's name known.
    """

    name: str | None = None
    remove: bool = False
    tty: bool = False
    interactive: bool = False
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    read_only: bool = False
    init: bool = True
    net: str = "none"
    userns: bool = False  # a user namespace: container root is host uid 100000
    memory: str | None = None
    cpus: float | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    pids_limit: int | None = None
    device_read_bps: str | None = None
    device_write_bps: str | None = None
    device_read_iops: str | None = None
    device_write_iops: str | None = None


@dataclass(frozen=True)
class RunOutcome:
    name: str
    pid: int | None
    exit_code: int | None  # None for a detached container (it is still running)
    warnings: list[str]


@dataclass
class ContainerInfo:
    name: str
    image: str | None  # IMAGE:TAG, or POOL/VOLUME for a container made from a volume
    pool: str
    device: str
    state: str
    pid: int | None
    exit_code: int | None
    command: list[str]
    created_at: str
    started_at: str | None
    finished_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_env(items: Sequence[str], host: Mapping[str, str]) -> dict[str, str]:
    """``-e KEY=VAL`` items; a bare ``KEY`` takes the host's value, or is dropped when the host
    has none (docker's ``opts.ValidateEnv``/``ParseEnvFile`` behaviour)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or _ENV_KEY.fullmatch(key) is None:
            raise UsageError(
                f"environment variable {item!r} has no name",
                hint="Write -e KEY=VALUE, or -e KEY to pass the host's value.",
            )
        if sep:
            env[key] = value
        elif key in host:
            env[key] = host[key]
    return env


def state_dir(mgr: Manager, name: str) -> Path:
    return mgr.home / STATE_ROOT / name


# --- run -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    pool: str
    origin: str  # the device the container's snapshot is taken of
    image_id: int | None
    label: str  # IMAGE:TAG or POOL/VOLUME, for listings
    config: dict[str, Any]  # the image's OCI config section ({} for a volume)


@dataclass(frozen=True)
class _Plan:
    name: str
    device: str
    target: _Target
    argv: list[str]
    env: dict[str, str]
    workdir: str
    user: str | None
    hostname: str
    limits: Limits


def run_container(
    mgr: Manager,
    target: str,
    argv: Sequence[str],
    options: RunOptions,
    *,
    detach: bool,
    notify: Notify | None = None,
    timings: Timings | None = None,
) -> RunOutcome:
    """Create a container on ``target`` and run ``argv`` in it (see the module docstring).

    Foreground: returns once the command ended, with its exit code (docker's: 126, 127,
    128+n, else the command's). Detached: returns once it runs (``exit_code`` None).
    Setup failures raise a ThinmgrError and leave nothing behind.
    """
    t = timings or Timings()
    say = notify or (lambda _text: None)
    with t.phase("validate"):
        plan = _plan(mgr, target, list(argv), options)
    directory = state_dir(mgr, plan.name)
    owner_fd: int | None = None
    row: int | None = None
    made_device = False
    try:
        with t.phase("state-dir"):
            owner_fd = _make_state_dir(directory)
        with t.phase("snapshot"):
            _create_device(mgr, plan)
            made_device = True
        with t.phase("activate"):
            from thinmgr.ops.volumes import activate_volume

            rootfs = Path(activate_volume(mgr, plan.target.pool, plan.device).path or "")
        with t.phase("catalog"):
            row = _insert_row(mgr, plan, options, detach)
            spec = _launch_spec(plan, options, rootfs, directory, detach)
    except BaseException as exc:
        _undo(mgr, plan, row, made_device, directory, owner_fd)
        _blame_full_pool(mgr, plan.target.pool, exc)
        raise

    from thinmgr.runtime import launch

    started: list[Started] = []
    owner_pid = os.getpid()
    launch_start = time.perf_counter()
    launch_start_clock = time.monotonic()  # the clock of the launcher's marks
    exited_at: list[float] = []

    def on_started(info: Started) -> None:
        t.add("launch", time.perf_counter() - launch_start)
        _add_launch_parts(t, launch_start_clock, info.marks)
        started.append(info)
        for warning in info.warnings:
            say(warning)
        _record_started(mgr, row, info, directory, spec.log_path)

    def on_exit(code: int) -> None:
        exited_at.append(time.perf_counter())
        if os.getpid() != owner_pid:
            # The detached supervisor: a forked copy of this process. The pool was emptied
            # before the fork (below); whatever it holds now is not this process's to use or
            # close (SQLAlchemy's docs, "Using Connection Pools with Multiprocessing or
            # os.fork()", and Catalog.after_fork_in_child).
            mgr.catalog.after_fork_in_child()
        # The launcher calls this only after a start (in the detached supervisor, a fork
        # taken before on_started ran in the caller: `started` is empty there).
        with t.phase("teardown"):
            _finish(mgr, row, code, remove=options.remove, notify=say)
        if owner_fd is not None:
            os.close(owner_fd)  # the exit is recorded: `ps`/`stop`/`rm` may go on

    if detach:
        # The supervisor is a fork that writes to the catalog when the container exits: it
        # must not inherit open SQLite connections (Catalog.before_fork): their descriptors
        # and SQLite's lock bookkeeping would be shared with this process. When it did, its
        # writes were lost after another thinmgr process closed the catalog: the pool carried
        # out a deferred removal that the catalog never recorded (drift, found in testing;
        # tests/root/test_containers.py, test_writes_of_the_detached_supervisor_are_kept).
        mgr.catalog.before_fork()
    try:
        code = launch.run(spec, detach=detach, on_started=on_started, on_exit=on_exit)
    except BaseException as exc:
        if not started:
            _undo(mgr, plan, row, made_device, directory, owner_fd)
            _blame_full_pool(mgr, plan.target.pool, exc)
        raise
    if not started:
        # The launcher reported a setup failure as a status instead of raising.
        _undo(mgr, plan, row, made_device, directory, owner_fd)
        from thinmgr.runtime.launch import LaunchError

        raise LaunchError(f"container {plan.name!r} could not be started (status {code})")
    if detach:
        if owner_fd is not None:
            os.close(owner_fd)  # the supervisor holds its own copy
        return RunOutcome(plan.name, started[0].pid, None, list(started[0].warnings))
    if exited_at:
        t.add("run", exited_at[0] - launch_start)
    return RunOutcome(plan.name, started[0].pid, code, list(started[0].warnings))


def _blame_full_pool(mgr: Manager, pool: str, exc: BaseException) -> None:
    """Raise a clearer error when ``exc`` is a set-up failure of a pool out of data space.

    A snapshot's first write needs a new data block; when the pool has none, dm-thin fails
    the write (ENOSPC, or EIO once no_space_timeout ends) and ext4 reports only "Input/output
    error" from mount. The pool's mode says what really happened.
    """
    if not isinstance(exc, ThinmgrError) or isinstance(exc, NoSpaceError):
        return
    from thinmgr.engine.base import PoolMode
    from thinmgr.ops.pools import pool_status
    from thinmgr.runtime.launch import LaunchError

    try:
        status = pool_status(mgr, pool).status
    except ThinmgrError:
        return  # the original error stands
    if status is None:
        return
    full = status.used_data_blocks >= status.total_data_blocks
    if status.mode is not PoolMode.OUT_OF_DATA_SPACE and not full:
        return
    raise LaunchError(
        f"{exc.message}: pool {pool!r} is out of data space "
        f"({status.used_data_blocks} of {status.total_data_blocks} blocks used)",
        hint=f"Extend it (`thinmgr pool extend {pool} --size SIZE`) or remove volumes and "
        "containers it holds, then run the command again.",
    ) from exc


def _add_launch_parts(t: Timings, start: float, marks: dict[str, float]) -> None:
    """The launch phase's parts, from the steps the launcher and PID 1 marked:
    ``launch.cgroups`` (checks, cgroup directories and limits), ``launch.namespaces`` (the
    forks, unshare, joining the cgroups), ``launch.mount`` (the root's mounts, /proc, /sys,
    /dev, pivot_root) and ``launch.exec`` (host name, lo, init, confinement, execve)."""
    if not t.enabled or not {"cgroups", "mount", "mounted"} <= marks.keys():
        return
    now = time.monotonic()
    steps = [start, marks["cgroups"], marks["mount"], marks["mounted"], now]
    for name, begin, end in zip(
        ("cgroups", "namespaces", "mount", "exec"), steps, steps[1:], strict=False
    ):
        t.add(f"launch.{name}", end - begin)


def _plan(mgr: Manager, target: str, argv: list[str], options: RunOptions) -> _Plan:
    """Every check of ``run``, done before anything is created."""
    name = options.name if options.name is not None else f"c-{secrets.token_hex(4)}"
    _check_container_name(name)
    device = DEVICE_PREFIX + name
    with mgr.catalog.read() as session:
        resolved = _resolve_target(session, target)
        if session.scalars(select(Container.id).where(Container.name == name)).first():
            raise ConflictError(
                f"a container named {name!r} already exists",
                hint=f"Choose another --name, or remove it with `thinmgr rm {name}`.",
            )
        pool = get_pool(session, resolved.pool)
        taken = session.scalars(
            select(Device.id).where(Device.pool_id == pool.id, Device.name == device)
        ).first()
        if taken is not None:
            raise ConflictError(
                f"pool {resolved.pool!r} already has a volume named {device!r}",
                hint=f"Remove that volume or choose another --name than {name!r}.",
            )
    config = resolved.config
    command = _command(argv, config, resolved.label)
    env = _image_env(config)
    env.update(options.env)
    env.setdefault("PATH", DEFAULT_PATH)
    workdir = options.workdir or str(config.get("WorkingDir") or "") or "/"
    if not workdir.startswith("/"):
        raise UsageError(
            f"working directory {workdir!r} is not absolute",
            hint="Give -w/--workdir as an absolute path inside the container.",
        )
    user = options.user or str(config.get("User") or "") or None
    hostname = options.hostname or name
    if len(hostname) > 64 or _HOSTNAME.fullmatch(hostname) is None:
        raise UsageError(
            f"{hostname!r} is not a valid host name",
            hint="Letters, digits and '-', dot-separated labels, at most 64 characters.",
        )
    if options.net not in NETWORKS:
        raise UsageError(
            f"network mode {options.net!r} is not supported",
            hint=f"Use --net {' or --net '.join(NETWORKS)}.",
        )
    if options.userns and options.net == "host":
        raise UsageError(
            "--userns cannot be combined with --net host",
            hint="A user namespace cannot mount /sys of the host's network; use --net none.",
        )
    limits = build_limits(options, resolved.pool, device)
    return _Plan(name, device, resolved, command, env, workdir, user, hostname, limits)


def _check_container_name(name: str) -> None:
    check_name("container", name)
    if "+" in name:  # a cgroup directory name too (runtime.cgroups.check_name)
        raise UsageError(
            f"container name {name!r} contains '+'",
            hint="Container names are letters, digits, '.', '_' and '-'.",
        )
    if len(name) > MAX_CONTAINER_NAME:
        raise UsageError(
            f"container name {name[:20]!r}... is {len(name)} characters long "
            f"(at most {MAX_CONTAINER_NAME}: its device is named {DEVICE_PREFIX}NAME)",
            hint="Choose a shorter --name.",
        )


def _resolve_target(session: Session, target: str) -> _Target:
    """``POOL/VOLUME`` when such a pool and volume exist, else ``IMAGE[:TAG]``."""
    pool_name, slash, volume = target.partition("/")
    if slash and volume and "/" not in volume and ":" not in target:
        pool = session.scalars(select(Pool).where(Pool.name == pool_name)).one_or_none()
        if pool is not None:
            device = get_device(session, pool, volume)
            if device.state in (DeviceState.CREATING, DeviceState.DELETING, DeviceState.FAILED):
                raise ConflictError(f"volume {target!r} is {device.state.value}")
            return _Target(pool.name, device.name, None, target, {})
    from thinmgr.ops.image_refs import parse_ref

    ref = parse_ref(target)
    name, tag = ref.name, ref.tag
    image = session.scalars(select(Image).where(Image.name == name, Image.tag == tag)).one_or_none()
    if image is None:
        raise NotFoundError(
            f"no image {name}:{tag} and no volume {target!r}",
            hint="See `thinmgr image list` (import one with `thinmgr image import`), or "
            "give POOL/VOLUME.",
        )
    if image.top_layer_id is None or image.pool_id is None:
        raise UsageError(
            f"image {name}:{tag} has no layers: there is no file system to run on",
            hint="Run an image that has at least one layer.",
        )
    layer = session.get_one(Layer, image.top_layer_id)
    device = session.get_one(Device, layer.device_id)
    pool = session.get_one(Pool, image.pool_id)
    return _Target(pool.name, device.name, image.id, f"{name}:{tag}", dict(image.config or {}))


def _command(argv: list[str], config: Mapping[str, Any], label: str) -> list[str]:
    """Docker's rule: the image's Entrypoint, then the given arguments or else its Cmd."""
    entrypoint = [str(a) for a in config.get("Entrypoint") or []]
    cmd = [str(a) for a in config.get("Cmd") or []]
    command = entrypoint + (argv or cmd)
    if not command:
        raise UsageError(
            f"no command to run: {label} sets no Entrypoint or Cmd and none was given",
            hint=f"Give one after `--`: thinmgr run {label} -- /bin/sh -c '...'",
        )
    return command


def _image_env(config: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if key and sep:
            env[key] = value
    return env


def build_limits(options: RunOptions, pool: str, device: str) -> Limits:
    """The cgroup limits of ``options``, parsed and checked against the host."""
    from thinmgr.runtime.cgroups import Limits, check_limits

    values: dict[str, Any] = {}
    if options.memory is not None:
        values["memory_bytes"] = _positive(parse_size(options.memory), "--memory")
    # --cpus and --cpu-shares are range-checked against the host by check_limits.
    if options.cpus is not None:
        values["cpus"] = options.cpus
    if options.cpu_shares is not None:
        values["cpu_shares"] = options.cpu_shares
    if options.cpuset_cpus is not None:
        values["cpuset_cpus"] = options.cpuset_cpus
    if options.pids_limit is not None:
        values["pids_limit"] = options.pids_limit  # 0 or negative: unlimited (docker's -1)
    own = (f"/dev/thinmgr/{pool}/{device}", f"{pool}/{device}", device)
    throttles = (
        ("device_read_bps", options.device_read_bps, True),
        ("device_write_bps", options.device_write_bps, True),
        ("device_read_iops", options.device_read_iops, False),
        ("device_write_iops", options.device_write_iops, False),
    )
    for key, text, is_size in throttles:
        if text is not None:
            values[key] = parse_throttle(text, "--" + key.replace("_", "-"), own, is_size=is_size)
    limits = Limits(**values)
    check_limits(limits)
    return limits


def _positive(value: int, option: str) -> int:
    if value <= 0:
        raise UsageError(f"{option} must be greater than 0 (got {value})")
    return value


def parse_throttle(text: str, option: str, own: Sequence[str], *, is_size: bool) -> int:
    """``RATE`` or docker's ``DEV:RATE``; DEV may only name the container's own volume."""
    dev, sep, rate = text.rpartition(":")
    if sep and dev and dev not in own:
        raise UsageError(
            f"{option} {text!r}: {dev!r} is not this container's volume",
            hint=f"A container has one block device, its own volume ({own[0]}); give just "
            "the rate, or that path before the ':'.",
        )
    if is_size:
        return _positive(parse_size(rate), option)
    try:
        return _positive(int(rate), option)
    except ValueError:
        raise UsageError(f"{option} {text!r}: {rate!r} is not a whole number of I/Os") from None


def _make_state_dir(directory: Path) -> int:
    """The state dir with its owner lock held, emptied of a removed container's leftovers.

    A lock already held means another ``run`` of the same name is between its checks and
    its row: that is a conflict, and its directory is not touched.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(
            f"another command is creating a container named {directory.name!r}",
            hint="Choose another --name.",
        ) from None
    for entry in directory.iterdir():
        if entry.name != OWNER_LOCK:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return fd


def _create_device(mgr: Manager, plan: _Plan) -> None:
    """A writable snapshot of the target, of kind ``container``, in one journal step.

    As ``snapshots.create_snapshot`` does it (freeze + suspend a mounted origin), but with the
    container kind in the write-ahead row, so that no crash can leave it as a plain snapshot.
    """
    from thinmgr.ops.snapshots import frozen_device
    from thinmgr.ops.volumes import allocate

    pool_name, origin = plan.target.pool, plan.target.origin
    with mgr.writing(pool_name) as h:
        with mgr.catalog.read() as session:
            source = get_device(session, h.id, origin)
            origin_row, origin_dev, size = source.id, source.thin_id, source.virtual_size_bytes
        active_device = h.engine.volume_device(h.spec, origin_dev)

        def prepare(session: Session, pool: Pool) -> dict[str, Any]:
            dev_id = allocate(session, pool, plan.device)
            device = Device(
                pool_id=pool.id,
                thin_id=dev_id,
                name=plan.device,
                kind=DeviceKind.CONTAINER,
                origin_id=origin_row,
                virtual_size_bytes=size,
                read_only=False,
                state=DeviceState.CREATING,
            )
            session.add(device)
            session.flush()
            return {"dev_id": dev_id, "device": device.id, "origin_dev_id": origin_dev}

        def apply(payload: dict[str, Any]) -> None:
            dev_id = int(payload["dev_id"])
            if active_device is None:
                h.engine.create_snapshot(h.spec, dev_id, origin_dev)
                return
            with frozen_device(active_device), h.engine.suspended(h.spec, origin_dev):
                h.engine.create_snapshot(h.spec, dev_id, origin_dev)

        journal.execute(mgr, h, journal.CREATE_SNAPSHOT, prepare, apply)


def _insert_row(mgr: Manager, plan: _Plan, options: RunOptions, detach: bool) -> int:
    with mgr.catalog.write() as session:
        device = get_device(session, get_pool(session, plan.target.pool), plan.device)
        container = Container(
            name=plan.name,
            image_id=plan.target.image_id,
            device_id=device.id,
            state=ContainerState.CREATED,
            command=plan.argv,
            config={**asdict(options), "target": plan.target.label, "detach": detach},
            runtime={
                "pool": plan.target.pool,
                "device": plan.device,
                "env": plan.env,
                "workdir": plan.workdir,
                "user": plan.user,
                "hostname": plan.hostname,
            },
        )
        session.add(container)
        session.flush()
        return container.id


def _launch_spec(
    plan: _Plan, options: RunOptions, rootfs: Path, directory: Path, detach: bool
) -> LaunchSpec:
    from thinmgr.runtime.spec import LaunchSpec

    return LaunchSpec(
        name=plan.name,
        rootfs_device=rootfs,
        argv=plan.argv,
        state_dir=directory,
        env=plan.env,
        workdir=plan.workdir,
        user=plan.user,
        hostname=plan.hostname,
        tty=options.tty,
        interactive=options.interactive,
        read_only=options.read_only,
        init=options.init,
        net=options.net,
        userns=options.userns,
        limits=plan.limits,
        log_path=directory / LOG_FILE if detach else None,
    )


def _record_started(
    mgr: Manager, row: int | None, info: Started, directory: Path, log: Path | None
) -> None:
    assert row is not None
    with mgr.catalog.write() as session:
        container = session.get_one(Container, row)
        container.state = ContainerState.RUNNING
        container.pid = info.pid
        container.started_at = utc_now()
        container.runtime = {
            **container.runtime,
            "cgroups": dict(info.cgroups),
            "state_dir": str(directory),
            "log": None if log is None else str(log),
        }


def _undo(
    mgr: Manager,
    plan: _Plan,
    row: int | None,
    made_device: bool,
    directory: Path,
    owner_fd: int | None,
) -> None:
    """Remove what a failed ``run`` made, newest first; keeps the original error visible."""
    with contextlib.suppress(ThinmgrError):
        if row is not None:
            with mgr.catalog.write() as session:
                container = session.get(Container, row)
                if container is not None:
                    session.delete(container)
    if made_device:
        with contextlib.suppress(ThinmgrError):
            _remove_device(mgr, plan.target.pool, plan.device)
    if owner_fd is not None:  # only a directory we own (not another run's of this name)
        shutil.rmtree(directory, ignore_errors=True)
        os.close(owner_fd)


def _remove_device(mgr: Manager, pool: str, device: str) -> None:
    from thinmgr.ops.volumes import remove_volume

    with contextlib.suppress(NotFoundError):
        remove_volume(mgr, pool, device, force=True)


def _deactivate_device(mgr: Manager, pool: str, device: str) -> None:
    from thinmgr.ops.volumes import deactivate_volume

    with contextlib.suppress(NotFoundError):
        deactivate_volume(mgr, pool, device)


def _finish(mgr: Manager, row: int | None, code: int, *, remove: bool, notify: Notify) -> None:
    """Record the exit and deactivate the device, or with ``--rm`` remove it all.

    The launcher has already killed and removed the cgroups (that is before ``on_exit``).
    """
    assert row is not None
    with mgr.catalog.write() as session:
        container = session.get(Container, row)
        if container is None:
            return
        pool, device, name = container.runtime["pool"], container.runtime["device"], container.name
        if remove:
            session.delete(container)  # the row goes first: it refers to the device
        else:
            container.state = ContainerState.EXITED
            container.exit_code = code
            container.finished_at = utc_now()
    try:
        if remove:
            _remove_device(mgr, pool, device)
            shutil.rmtree(state_dir(mgr, name), ignore_errors=True)
        else:
            _deactivate_device(mgr, pool, device)
    except ThinmgrError as exc:
        notify(f"container {name!r} exited ({code}) but its cleanup failed: {exc.message}")


# --- reconciliation: rows whose owner is gone ------------------------------------------------


@contextlib.contextmanager
def _owner_gone(directory: Path) -> Iterator[bool]:
    """True (and the owner lock held by us meanwhile) when no process owns the container."""
    try:
        fd = os.open(directory / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            gone = True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            gone = False
        yield gone
    finally:
        os.close(fd)


def _read_exit(directory: Path) -> int | None:
    try:
        return int((directory / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _get(session: Session, name: str) -> Container:
    container = session.scalars(select(Container).where(Container.name == name)).one_or_none()
    if container is None:
        raise NotFoundError(f"no container named {name!r}", hint="See `thinmgr ps -a`.")
    return container


def settle_container(mgr: Manager, name: str) -> bool:
    """Bring a container whose owner died up to date; True when something was done.

    ``running`` with a dead pid -> ``exited`` (code from the launcher's exit file, if it wrote
    one), cgroups killed and removed, device deactivated (or, with ``--rm``, everything
    removed). ``created`` -> a ``run`` that was killed during setup: removed entirely, as a
    failed ``run`` would have done.
    """
    from thinmgr.runtime import launch

    with mgr.catalog.read() as session:
        container = _get(session, name)
        state, pid = container.state, container.pid
        started = _timestamp(container.started_at)
        runtime, remove = dict(container.runtime), bool(container.config.get("remove"))
    if state not in (ContainerState.CREATED, ContainerState.RUNNING):
        return False
    directory = state_dir(mgr, name)
    with _owner_gone(directory) as gone:
        if not gone:
            return False
        if state is ContainerState.RUNNING and pid is not None and launch.alive(pid, started):
            return False
        _clear_cgroups(runtime)
        if state is ContainerState.CREATED or remove:
            _remove_container_records(mgr, name)
            return True
        with mgr.catalog.write() as session:
            container = _get(session, name)
            container.state = ContainerState.EXITED
            container.exit_code = _read_exit(directory)
            container.finished_at = utc_now()
        _deactivate_device(mgr, runtime["pool"], runtime["device"])
    return True


def _clear_cgroups(runtime: Mapping[str, Any]) -> None:
    paths = runtime.get("cgroups")
    if not paths:
        return
    from thinmgr.runtime.cgroups import ContainerCgroups

    cgroups = ContainerCgroups.from_paths(dict(paths))
    cgroups.kill_all()
    cgroups.remove()


def _remove_container_records(mgr: Manager, name: str) -> None:
    """The row, then its device (the row refers to it), then the state dir."""
    with mgr.catalog.write() as session:
        container = _get(session, name)
        runtime = dict(container.runtime)
        session.delete(container)
    _clear_cgroups(runtime)
    _remove_device(mgr, runtime["pool"], runtime["device"])
    shutil.rmtree(state_dir(mgr, name), ignore_errors=True)


def _unsettled(mgr: Manager) -> list[str]:
    with mgr.catalog.read() as session:
        return list(
            session.scalars(
                select(Container.name).where(
                    Container.state.in_([ContainerState.CREATED, ContainerState.RUNNING])
                )
            )
        )


# --- ps, exec, stop, rm, logs --------------------------------------------------------------------


def list_containers(mgr: Manager, *, all: bool = False) -> list[ContainerInfo]:
    """Containers, running ones only unless ``all``; rows whose owner died are settled first."""
    for name in _unsettled(mgr):
        with contextlib.suppress(NotFoundError):
            settle_container(mgr, name)
    with mgr.catalog.read() as session:
        query = select(Container).order_by(Container.created_at, Container.id)
        if not all:
            query = query.where(Container.state == ContainerState.RUNNING)
        return [_info(c) for c in session.scalars(query)]


def show_container(mgr: Manager, name: str) -> ContainerInfo:
    with contextlib.suppress(NotFoundError):
        settle_container(mgr, name)
    with mgr.catalog.read() as session:
        return _info(_get(session, name))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _info(container: Container) -> ContainerInfo:
    runtime = container.runtime
    return ContainerInfo(
        name=container.name,
        image=container.config.get("target"),
        pool=str(runtime.get("pool", "")),
        device=str(runtime.get("device", "")),
        state=container.state.value,
        pid=container.pid if container.state is ContainerState.RUNNING else None,
        exit_code=container.exit_code,
        command=list(container.command),
        created_at=_iso(container.created_at) or "",
        started_at=_iso(container.started_at),
        finished_at=_iso(container.finished_at),
    )


def _running(mgr: Manager, name: str) -> tuple[int, dict[str, str], dict[str, Any]] | None:
    """(pid, cgroup paths, runtime) of a running container, None when it is not running."""
    settle_container(mgr, name)
    with mgr.catalog.read() as session:
        container = _get(session, name)
        if container.state is not ContainerState.RUNNING or container.pid is None:
            return None
        runtime = dict(container.runtime)
        return container.pid, dict(runtime.get("cgroups") or {}), runtime


def exec_container(
    mgr: Manager,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    workdir: str | None = None,
    user: str | None = None,
    tty: bool = False,
    interactive: bool = False,
) -> int:
    """Run ``argv`` in a running container (its namespaces, cgroups and confinement)."""
    if not argv:
        raise UsageError("no command to run", hint="Give one after `--`: thinmgr exec NAME -- sh")
    if workdir is not None and not workdir.startswith("/"):
        raise UsageError(f"working directory {workdir!r} is not absolute")
    running = _running(mgr, name)
    if running is None:
        raise ConflictError(
            f"container {name!r} is not running",
            hint="See `thinmgr ps -a`; only a running container can run more commands.",
        )
    pid, cgroups, runtime = running
    from thinmgr.runtime import launch

    return launch.exec_in(
        pid,
        cgroups,
        list(argv),
        env={**runtime.get("env", {}), **env},
        workdir=workdir or str(runtime.get("workdir") or "/"),
        user=user if user is not None else runtime.get("user"),
        tty=tty,
        interactive=interactive,
    )


def stop_container(mgr: Manager, name: str, *, timeout: float = 10.0) -> ContainerInfo:
    """SIGTERM to PID 1, SIGKILL after ``timeout`` seconds (docker stop); waits for the exit
    to be recorded. A container that is not running is left as it is."""
    if timeout < 0:
        raise UsageError(f"--time {timeout:g} must not be negative")
    running = _running(mgr, name)
    if running is not None:
        pid, cgroups, _ = running
        from thinmgr.runtime import launch

        launch.stop(pid, cgroups, timeout=timeout)
        _wait_recorded(mgr, name)
    with mgr.catalog.read() as session:
        container = session.scalars(select(Container).where(Container.name == name)).first()
        if container is None:  # it was started with --rm: its owner removed it
            return ContainerInfo(name, None, "", "", "removed", None, None, [], "", None, None)
        return _info(container)


def _wait_recorded(mgr: Manager, name: str) -> None:
    """Until the container's owner (or we, if it is gone) recorded its exit."""
    deadline = time.monotonic() + OWNER_WAIT
    while True:
        try:
            settle_container(mgr, name)
            with mgr.catalog.read() as session:
                if _get(session, name).state is not ContainerState.RUNNING:
                    return
        except NotFoundError:
            return
        if time.monotonic() >= deadline:
            raise BusyError(
                f"container {name!r} was stopped but its exit was not recorded within "
                f"{OWNER_WAIT:g} s",
                hint="Its thinmgr process may be hung; `thinmgr ps -a` settles it once gone.",
            )
        time.sleep(0.05)


def remove_container(mgr: Manager, name: str, *, force: bool = False) -> None:
    """Remove a container: its row, its device, its state dir and its cgroups.

    A running container is refused (BusyError) unless ``force``, which kills it first
    (docker rm -f: SIGKILL, no grace period).
    """
    running = _running(mgr, name)
    if running is not None:
        if not force:
            raise BusyError(
                f"container {name!r} is running",
                hint=f"Stop it first (`thinmgr stop {name}`), or use `thinmgr rm -f {name}`.",
            )
        pid, cgroups, _ = running
        from thinmgr.runtime import launch

        launch.stop(pid, cgroups, timeout=0)
        _wait_recorded(mgr, name)
    with contextlib.suppress(NotFoundError):  # --rm: its owner may have removed it already
        _remove_container_records(mgr, name)


def container_logs(mgr: Manager, name: str, *, follow: bool = False) -> Iterator[bytes]:
    """The output of a detached container (its log file); ``follow`` waits for more until
    the container exits."""
    with mgr.catalog.read() as session:
        container = _get(session, name)
        log, pid = container.runtime.get("log"), container.pid
        running = container.state is ContainerState.RUNNING
        started = _timestamp(container.started_at)
    if not log:
        raise UsageError(
            f"container {name!r} has no log: it ran in the foreground, its output went to "
            "the terminal",
            hint="Run it with -d/--detach to keep its output in a log.",
        )
    return _read_log(Path(log), follow and running, pid, started)


def _read_log(path: Path, follow: bool, pid: int | None, started: float | None) -> Iterator[bytes]:
    from thinmgr.runtime import launch

    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        while True:
            chunk = handle.read(65536)
            if chunk:
                yield chunk
                continue
            if not follow or pid is None or not launch.alive(pid, started):
                tail = handle.read()
                if tail:
                    yield tail
                return
            time.sleep(0.1)
