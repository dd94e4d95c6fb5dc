"""The launcher: ``run`` a new container, ``exec_in`` a running one, ``stop``, ``alive``.

Process structure (runtime-and-images.md §2, measured in §3)::

    launcher (the CLI, or the detached supervisor)
      └─ intermediate  fresh fork, single-threaded: PDEATHSIG, setsid, joins the cgroups (not
         │             devices), [--userns: ext4 mounted + idmapped, devices joined, setns
         │             into a new user namespace (userns.py)], then
         │             unshare(NEWNS|NEWPID|NEWUTS|NEWIPC|NEWCGROUP[|NEWNET]),
         │             reports PID 1's host pid, then waits and relays its status
         └─ PID 1      rootfs (rootfs.py) -> devices cgroup -> pivot_root, lo up, hostname;
            │          with init: confinement, dumpable 0, then init.run_init
            └─ PID 2   (with init) the command: user, pty, fds, workdir, execve (process.py)

Without init the command is PID 1 itself. Every fork happens in a process that never started
a thread, and every module a child needs is imported here, before the first fork: after
pivot_root nothing of the host can be imported any more. A forked child never returns into
the caller's code: each one ends in ``os._exit``.

Exit codes are docker's: 125 setup failed (``LaunchError``), 126 cannot execute, 127 not found
(both raised too, as ``CommandNotExecutable``/``CommandNotFound``, before anything is reported
as started), 128+n killed by signal n, else the command's status.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

import setproctitle  # imported here: after pivot_root the host's modules are gone

from thinmgr.errors import ExitCode, ThinmgrError
from thinmgr.kernel import caps, namespaces, netdev, seccomp
from thinmgr.kernel.terminal import get_window_size, set_window_size
from thinmgr.runtime import console, rootfs, status, userns
from thinmgr.runtime.cgroups import ContainerCgroups, check_limits
from thinmgr.runtime.init import exit_code, run_init
from thinmgr.runtime.process import (
    EXIT_SETUP_FAILED,
    Channels,
    ProcessSpec,
    close_fds_except,
    exec_command,
    exit_code_for_exec_errno,
)
from thinmgr.runtime.spec import NET_MODES, LaunchSpec, Started

# Codecs are imported on first use; after pivot_root the host's encodings package is out of
# reach ("LookupError: unknown encoding: ascii"), so look up now what the children use.
for _codec in ("ascii", "utf-8", "latin-1"):
    codecs.lookup(_codec)

INIT_NAME = "thinmgr-init"
PID_FILE = "pid"
EXIT_FILE = "exit"
STAGING_DIR = "rootfs"  # empty mount point in state_dir; the mount exists only in the container
HOST_NAME_MAX = 64  # limits.h / sethostname(2)
FORWARDED_BY_LAUNCHER = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_STOP_POLL = 0.02
_ACK = b"1"  # detached: the caller's on_started has returned


class LaunchError(ThinmgrError):
    """The container could not be set up (docker's 125)."""

    exit_code = ExitCode.LAUNCH_FAILED
    default_hint = "Nothing was started; fix the cause above and run the command again."


class CommandNotExecutable(LaunchError):
    """The command exists in the container but execve refused it (EACCES, ENOEXEC): 126."""

    exit_code = ExitCode.CANNOT_EXECUTE
    default_hint = "Check the file's mode (chmod +x) and its #! interpreter."


class CommandNotFound(LaunchError):
    """The command is not in the container (ENOENT along its PATH): 127."""

    exit_code = ExitCode.COMMAND_NOT_FOUND
    default_hint = "Check the command's name and the image's PATH."


_ERRORS_BY_CODE: dict[int, type[LaunchError]] = {
    ExitCode.LAUNCH_FAILED: LaunchError,
    ExitCode.CANNOT_EXECUTE: CommandNotExecutable,
    ExitCode.COMMAND_NOT_FOUND: CommandNotFound,
}


# -- confinement --------------------------------------------------------------------------


def devices_filtered(cgroups: ContainerCgroups | None) -> bool:
    """Whether a devices cgroup (v1's allow-list) stands between the container and device
    nodes. cgroup v2 needs a BPF device program, which thinmgr does not load yet."""
    return cgroups is not None and "devices" in cgroups.paths()


def bounding_set(cgroups: ContainerCgroups | None) -> frozenset[int]:
    """Docker's default capabilities, without CAP_MKNOD where no devices cgroup filters
    device access: a node made in the container's /dev tmpfs could otherwise open a host disk."""
    if devices_filtered(cgroups):
        return caps.DOCKER_DEFAULT_CAPS
    return caps.DOCKER_DEFAULT_CAPS - {caps.CAP_MKNOD}


def _confine(keep: frozenset[int] = caps.DOCKER_DEFAULT_CAPS) -> None:
    """Docker's default bounding set (``keep``), no inheritable/ambient capabilities,
    no_new_privs, the seccomp deny-list (in that order: seccomp needs no_new_privs or
    CAP_SYS_ADMIN)."""
    caps.drop_bounding_set(keep)
    caps.clear_inheritable_and_ambient()
    caps.set_no_new_privs()
    seccomp.install_deny_filter()


def _child_prologue() -> None:
    """First steps of every forked child: the caller's Python signal handlers (SIGINT ->
    KeyboardInterrupt) would run the caller's code; no collector runs finalizers of objects
    whose descriptors we close."""
    gc.disable()
    for sig in (*FORWARDED_BY_LAUNCHER, signal.SIGPIPE, signal.SIGCHLD, signal.SIGWINCH):
        signal.signal(sig, signal.SIG_DFL)


def _die_with_parent(parent: int) -> None:
    caps.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
        os._exit(EXIT_SETUP_FAILED)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ThinmgrError):
        return exc.message
    if isinstance(exc, OSError):
        return rootfs.describe_os_error(exc)
    return f"{type(exc).__name__}: {exc}"


def _wait_exit_code(pid: int) -> int:
    while True:
        try:
            _, wait_status = os.waitpid(pid, 0)
        except ChildProcessError:
            return EXIT_SETUP_FAILED
        return exit_code(wait_status)


# -- the start-up chain (children) ----------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    spec: LaunchSpec
    process: ProcessSpec
    cgroups: ContainerCgroups | None
    staging: Path
    hostname: str
    prepared_at: float  # time.monotonic() once the checks passed and the cgroups exist


def _name_init() -> None:
    """`ps` in the container shows "thinmgr-init" for the forked interpreter, name and command
    line: the inherited argv (the host's python path, thinmgr's options, --home) must not
    leak into the container. setproctitle overwrites the argv area in place (no
    CAP_SYS_RESOURCE needed, unlike PR_SET_MM); /proc/self/comm is set as well."""
    with contextlib.suppress(Exception):  # cosmetic: never fails the container
        setproctitle.setproctitle(INIT_NAME)
    with contextlib.suppress(OSError):
        fd = os.open("/proc/self/comm", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, INIT_NAME.encode())
        finally:
            os.close(fd)


def _layout(plan: _Plan) -> rootfs.RootfsPlan:
    spec = plan.spec
    return rootfs.RootfsPlan(
        device=str(spec.rootfs_device),
        fstype=spec.fstype,
        staging=str(plan.staging),
        read_only=spec.read_only,
        # Device nodes shipped in an image are only safe to open behind a devices cgroup.
        nodev=not devices_filtered(plan.cgroups),
        userns=spec.userns,
    )


def _enter_user_namespace(plan: _Plan, launcher: int) -> None:
    """--userns, steps 1-3 of userns.py's order, in the intermediate: the ext4 root mounted
    and idmapped from the initial user namespace in a private mount namespace, the devices
    cgroup joined, then the user namespace entered (the namespaces unshared afterwards are
    owned by it). The staging directory becomes the working directory: PID 1 finds the root
    there (rootfs.bind_root)."""
    userns_fd = userns.create()
    try:
        namespaces.unshare(namespaces.CLONE_NEWNS)
        rootfs.make_root_private()
        os.close(rootfs.mount_root(_layout(plan)))
        userns.idmap_mount(str(plan.staging), userns_fd)
        os.chdir(plan.staging)
        if plan.cgroups is not None:
            plan.cgroups.join_devices(0)
        userns.enter(userns_fd)
    finally:
        os.close(userns_fd)
    _die_with_parent(launcher)  # the switch of credentials cleared PDEATHSIG


def _pid1(plan: _Plan, channels: Channels) -> NoReturn:
    spec = plan.spec
    try:
        caps.set_pdeathsig(signal.SIGKILL)  # the intermediate is outside our pid namespace
        cgroups = plan.cgroups
        confine = functools.partial(_confine, bounding_set(cgroups))
        layout = _layout(plan)

        def join_devices() -> None:
            # With --userns the intermediate joined it (container root cannot write there).
            if cgroups is not None and not spec.userns:
                cgroups.join_devices(0)

        status.mark(channels.status_fd, "mount")
        rootfs.prepare(layout, before_pivot=join_devices)
        status.mark(channels.status_fd, "mounted")
        if spec.net == "none":
            netdev.set_link_up("lo")
        namespaces.sethostname(plan.hostname)
        if spec.init:
            _name_init()
            if spec.confine:
                confine()
            caps.set_dumpable(False)  # /proc/1/{exe,mem,fd} closed to the container
    except BaseException as exc:
        status.send(channels.status_fd, error=_reason(exc))
        os._exit(EXIT_SETUP_FAILED)
    if not spec.init:
        exec_command(plan.process, channels, confine=confine if spec.confine else None)

    def close_channels(_child: int) -> None:
        os.close(channels.status_fd)
        if channels.tty_socket is not None:
            channels.tty_socket.close()

    run_init(lambda: exec_command(plan.process, channels, confine=None), close_channels)


def _intermediate(plan: _Plan, channels: Channels, launcher: int) -> NoReturn:
    spec = plan.spec
    try:
        _child_prologue()
        _die_with_parent(launcher)
        os.setsid()  # no controlling terminal of the caller's in the container (CVE-2017-5226)
        close_fds_except(channels.keep())
        if plan.cgroups is not None:
            plan.cgroups.join(0)
        if spec.userns:
            _enter_user_namespace(plan, launcher)
        flags = (
            namespaces.CLONE_NEWNS
            | namespaces.CLONE_NEWPID
            | namespaces.CLONE_NEWUTS
            | namespaces.CLONE_NEWIPC
            | namespaces.CLONE_NEWCGROUP
        )
        if spec.net == "none":
            flags |= namespaces.CLONE_NEWNET
        namespaces.unshare(flags)
        pid1 = os.fork()
    except BaseException as exc:
        status.send(channels.status_fd, error=_reason(exc))
        os._exit(EXIT_SETUP_FAILED)
    if pid1 == 0:
        try:
            _pid1(plan, channels)
        finally:
            os._exit(EXIT_SETUP_FAILED)
    status.send(channels.status_fd, pid=pid1)
    os.close(channels.status_fd)
    if channels.tty_socket is not None:
        channels.tty_socket.close()
    os._exit(_wait_exit_code(pid1))


# -- the launcher's side ------------------------------------------------------------------


@dataclass
class _Running:
    """A started container as its launcher holds it."""

    plan: _Plan
    intermediate: int
    pid: int
    master: int | None
    warnings: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def started(self) -> Started:
        cgroups = self.plan.cgroups
        return Started(
            pid=self.pid,
            cgroups=cgroups.paths() if cgroups is not None else {},
            warnings=list(self.warnings),
            marks=dict(self.marks),
        )


def _device_numbers(device: Path) -> tuple[int, int]:
    try:
        info = os.stat(device)
    except OSError as exc:
        raise LaunchError(
            f"cannot use {device} as the container's root: {exc.strerror}",
            hint="Activate the container's volume first.",
        ) from None
    if not stat.S_ISBLK(info.st_mode):
        raise LaunchError(
            f"cannot use {device} as the container's root: not a block device",
            hint="The launcher mounts a block device (a thin volume or a loop device).",
        )
    return os.major(info.st_rdev), os.minor(info.st_rdev)


def _validate(spec: LaunchSpec) -> tuple[int, int]:
    if not spec.argv:
        raise LaunchError("no command to run", hint="Give one after `--`.")
    if spec.net not in NET_MODES:
        raise LaunchError(f"unknown network mode {spec.net!r} (expected none or host)")
    if spec.userns and spec.net == "host":
        # sysfs can only be mounted from the user namespace owning the network namespace.
        raise LaunchError(
            "--userns cannot be combined with --net host",
            hint="Use --net none with --userns, or drop --userns.",
        )
    if not spec.workdir.startswith("/"):
        raise LaunchError(f"working directory {spec.workdir!r} is not absolute")
    if spec.use_cgroups:
        check_limits(spec.limits)
    return _device_numbers(spec.rootfs_device)


def _hostname(spec: LaunchSpec) -> str:
    name = spec.hostname or spec.name
    if not name or len(name.encode()) >= HOST_NAME_MAX:
        raise LaunchError(f"host name {name!r} is empty or longer than 63 bytes")
    return name


def _prepare(spec: LaunchSpec) -> _Plan:
    """Every check and the cgroups, in the launcher, before the first fork."""
    block_device = _validate(spec)
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    staging = spec.state_dir / STAGING_DIR
    staging.mkdir(exist_ok=True)
    window = get_window_size(0) if spec.tty else None
    process = ProcessSpec(
        argv=list(spec.argv),
        env=dict(spec.env),
        workdir=spec.workdir,
        user=spec.user,
        tty=spec.tty,
        interactive=spec.interactive,
        window_size=window,
        hostname=_hostname(spec),
    )
    cgroups = None
    if spec.use_cgroups:
        cgroups = ContainerCgroups.create(spec.name, spec.limits, block_device=block_device)
    return _Plan(spec, process, cgroups, staging, process.hostname or spec.name, time.monotonic())


def _raise_for(report: status.StartReport, what: str) -> NoReturn:
    if report.exec_errno is not None:
        code = exit_code_for_exec_errno(report.exec_errno)
        error = _ERRORS_BY_CODE[code]
        reason = os.strerror(report.exec_errno)
        raise error(f"cannot run {report.command!r} in {what}: {reason}")
    raise LaunchError(f"cannot start {what}: {report.error or 'its setup process died'}")


def _receive_master(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    sock.setblocking(False)
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    except BlockingIOError:
        raise LaunchError("the container's terminal was not handed over") from None
    finally:
        sock.close()
    if not fds:
        raise LaunchError("the container's terminal was not handed over")
    return fds[0]


def _start(plan: _Plan) -> _Running:
    """Forks the chain and reads the status pipe to its end. On failure everything the
    chain made is gone (processes reaped; the cgroups are the caller's to remove)."""
    read_end, write_end = os.pipe()  # both O_CLOEXEC (PEP 446)
    parent_sock = child_sock = None
    if plan.spec.tty:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    launcher = os.getpid()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            if parent_sock is not None:
                parent_sock.close()
            os.close(read_end)
            _intermediate(plan, Channels(write_end, child_sock), launcher)
        finally:
            os._exit(EXIT_SETUP_FAILED)
    os.close(write_end)
    if child_sock is not None:
        child_sock.close()
    try:
        report = status.read_all(read_end)
    except BaseException:
        _kill_and_reap(intermediate)
        raise
    finally:
        os.close(read_end)
    if report.error is not None or report.exec_errno is not None or report.pid is None:
        _kill_and_reap(intermediate)
        if parent_sock is not None:
            parent_sock.close()
        _raise_for(report, f"container {plan.spec.name!r}")
    try:
        master = _receive_master(parent_sock)
    except BaseException:
        _kill_and_reap(intermediate)
        raise
    warnings = plan.cgroups.warnings() if plan.cgroups is not None else []
    marks = {"cgroups": plan.prepared_at, **report.marks}
    return _Running(plan, intermediate, report.pid, master, warnings, marks)


def _kill_and_reap(pid: int) -> None:
    """SIGKILL to the intermediate: PDEATHSIG takes PID 1, and with it the pid namespace."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@contextlib.contextmanager
def _forwarding(pid: int, master: int | None) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT to the launcher go to the container's PID 1 (runc's
    signal proxy); SIGWINCH resizes the container's pty. Only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(sig: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def resize(_sig: int, _frame: FrameType | None) -> None:
        size = get_window_size(0)
        if master is not None and size is not None:
            set_window_size(master, size)

    saved = {sig: signal.signal(sig, forward) for sig in FORWARDED_BY_LAUNCHER}
    if master is not None:
        saved[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _wait(child: int, *, signal_target: int, master: int | None, stdin: int | None) -> int:
    """Relays the pty (if any), forwards signals to ``signal_target`` and waits for ``child``
    (the intermediate, or exec's joiner), whose status is the container's; returns it."""
    with _forwarding(signal_target, master):
        if master is not None:
            done = os.pidfd_open(child)
            try:
                raw = console.raw_mode(stdin) if stdin is not None else contextlib.nullcontext()
                with raw:
                    console.relay(master, stdin=stdin, stdout=1, done_fd=done)
            finally:
                os.close(done)
                os.close(master)
        return _wait_exit_code(child)


def _write_state(state_dir: Path, name: str, value: int) -> None:
    """pid/exit files, written atomically so a reader never sees half a number."""
    with contextlib.suppress(OSError):
        temporary = state_dir / f".{name}.tmp"
        temporary.write_text(f"{value}\n")
        os.replace(temporary, state_dir / name)


def _teardown(plan: _Plan) -> None:
    if plan.cgroups is not None:
        try:
            plan.cgroups.kill_all()
        finally:
            plan.cgroups.remove()
    with contextlib.suppress(OSError):
        plan.staging.rmdir()


def _run_here(
    spec: LaunchSpec,
    on_started: Callable[[Started], None],
    on_exit: Callable[[int], None],
    *,
    after_started: Callable[[], None] = lambda: None,
) -> int:
    """Starts the container from this process, waits for it, tears down, reports the code."""
    plan = _prepare(spec)
    try:
        running = _start(plan)
    except BaseException:
        _teardown(plan)
        raise
    try:
        _write_state(spec.state_dir, PID_FILE, running.pid)
        on_started(running.started())
        after_started()
        code = _wait(
            running.intermediate,
            signal_target=running.pid,
            master=running.master,
            stdin=0 if spec.interactive else None,
        )
    except BaseException:
        _kill_and_reap(running.intermediate)
        _teardown(plan)
        raise
    _write_state(spec.state_dir, EXIT_FILE, code)
    try:
        _teardown(plan)
    finally:
        on_exit(code)
    return code


# -- detached -----------------------------------------------------------------------------


def _redirect_stdio(log_path: Path | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if log_path is not None:
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    else:
        os.dup2(null, 1)
        os.dup2(null, 2)
    os.close(null)


def _supervise(
    spec: LaunchSpec, report_fd: int, ack_fd: int, on_exit: Callable[[int], None]
) -> NoReturn:
    """The detached container's launcher: reports the start (or its failure) to the caller,
    waits for the caller's on_started to finish (so the exit is always recorded after the
    start), then waits for the container, tears down and calls on_exit."""

    reported = False

    def report_started(started: Started) -> None:
        nonlocal reported
        message = {"pid": started.pid, "cgroups": started.cgroups, "warnings": started.warnings}
        reported = True
        os.write(report_fd, json.dumps(message).encode())
        os.close(report_fd)

    def report_failure(exit_status: int, message: str, hint: str) -> None:
        if not reported:  # after a start the caller has gone on; the fd is closed
            failure = {"failed": exit_status, "message": message, "hint": hint}
            with contextlib.suppress(OSError):
                os.write(report_fd, json.dumps(failure).encode())

    def wait_for_ack() -> None:
        answer = b""
        with contextlib.suppress(OSError):
            answer = os.read(ack_fd, 1)  # EOF: the caller died before it recorded the start
        os.close(ack_fd)
        if answer != _ACK:  # nobody knows the container runs: take it down again
            raise LaunchError("the caller could not record the container's start")

    code = EXIT_SETUP_FAILED
    try:
        _redirect_stdio(spec.log_path)
        _run_here(spec, report_started, on_exit, after_started=wait_for_ack)
        code = 0
    except ThinmgrError as exc:
        report_failure(int(exc.exit_code), exc.message, exc.hint)
    except BaseException as exc:
        report_failure(EXIT_SETUP_FAILED, _reason(exc), "")
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_detached(
    spec: LaunchSpec, on_started: Callable[[Started], None], on_exit: Callable[[int], None]
) -> None:
    _validate(spec)  # the caller's errors are raised here, in the caller
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    if spec.log_path is not None:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    report_read, report_write = os.pipe()
    ack_read, ack_write = os.pipe()
    first = os.fork()
    if first == 0:
        try:
            _child_prologue()
            os.close(report_read)
            os.close(ack_write)
            os.setsid()  # the supervisor belongs to no terminal session of the caller
            if os.fork() == 0:
                gc.enable()
                _supervise(spec, report_write, ack_read, on_exit)
        finally:
            os._exit(0)
    os.close(report_write)
    os.close(ack_read)
    try:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(first, 0)
        chunks = []
        while chunk := os.read(report_read, 65536):
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            message = json.loads(raw) if raw else {}
        except ValueError:
            message = {}
        if "pid" not in message:
            code = int(message.get("failed", EXIT_SETUP_FAILED))
            error = _ERRORS_BY_CODE.get(code, LaunchError)
            reason = str(message.get("message") or "the supervisor process died")
            raise error(reason, hint=message.get("hint") or None)
        on_started(
            Started(
                pid=int(message["pid"]),
                cgroups=dict(message.get("cgroups") or {}),
                warnings=list(message.get("warnings") or []),
            )
        )
    except BaseException:
        os.close(ack_write)  # EOF without the ack: the supervisor kills the container
        raise
    finally:
        os.close(report_read)
    with contextlib.suppress(OSError):
        os.write(ack_write, _ACK)
    os.close(ack_write)


# -- public API ---------------------------------------------------------------------------


def run(
    spec: LaunchSpec,
    *,
    detach: bool,
    on_started: Callable[[Started], None],
    on_exit: Callable[[int], None],
) -> int | None:
    """Starts ``spec``'s command in a new container.

    Foreground: ``on_started`` is called once the command runs (execve succeeded), signals are
    forwarded to the container while it runs, a pty is relayed with ``tty``; after the exit
    the cgroups are killed and removed, ``state_dir/exit`` written, ``on_exit(code)`` called,
    and the code returned.

    Detached: a supervisor (double fork, setsid, stdio to ``log_path``) starts the container;
    ``on_started`` is called in the caller, then None is returned. The supervisor calls
    ``on_exit(code)`` itself after teardown (never before the caller's ``on_started`` has
    returned).

    A container that never started raises instead: ``LaunchError`` (125),
    ``CommandNotExecutable`` (126), ``CommandNotFound`` (127); neither callback is called and
    nothing is left behind.
    """
    if detach:
        _run_detached(spec, on_started, on_exit)
        return None
    return _run_here(spec, on_started, on_exit)


def _join_namespaces(pid: int) -> bool:
    """setns into the mnt, uts, ipc, net, cgroup and pid namespaces of ``pid``, and its user
    namespace if it has one (--userns): atomically through a pidfd (Linux 5.8+), else one
    /proc/PID/ns file at a time, user first. Returns whether a user namespace was joined."""
    wanted = (
        namespaces.CLONE_NEWNS
        | namespaces.CLONE_NEWUTS
        | namespaces.CLONE_NEWIPC
        | namespaces.CLONE_NEWNET
        | namespaces.CLONE_NEWCGROUP
        | namespaces.CLONE_NEWPID
    )
    if userns.has_own(pid):
        wanted |= namespaces.CLONE_NEWUSER
    joins_user = bool(wanted & namespaces.CLONE_NEWUSER)
    pidfd = os.pidfd_open(pid)
    try:
        namespaces.setns(pidfd, wanted)
        return joins_user
    except ThinmgrError:
        pass  # EINVAL from a kernel before 5.8: fall back to the ns files
    finally:
        os.close(pidfd)
    files = []
    try:
        for name, flag in namespaces.NS_FILES:
            if flag & wanted:
                files.append((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
        for fd, flag in files:
            namespaces.setns(fd, flag)
    finally:
        for fd, _ in files:
            os.close(fd)
    return joins_user


def _exec_joiner(
    pid: int,
    cgroups: ContainerCgroups | None,
    process: ProcessSpec,
    channels: Channels,
    launcher: int,
) -> NoReturn:
    """The process that joins the container (dumpable 0: runc CVE-2016-9962) and forks the
    command inside its pid namespace."""
    try:
        _child_prologue()
        _die_with_parent(launcher)
        caps.set_dumpable(False)
        os.setsid()
        close_fds_except(channels.keep())
        if cgroups is not None:
            cgroups.join(0)
            cgroups.join_devices(0)
        if _join_namespaces(pid):
            userns.become_root()
            _die_with_parent(launcher)  # the switch of credentials cleared PDEATHSIG
        command = os.fork()  # the pid namespace applies to children only
    except BaseException as exc:
        status.send(channels.status_fd, error=_reason(exc))
        os._exit(EXIT_SETUP_FAILED)
    if command == 0:
        try:
            caps.set_pdeathsig(signal.SIGKILL)
            os.chdir("/")  # the container's root: setns(CLONE_NEWNS) set root and cwd there
            exec_command(
                process, channels, confine=functools.partial(_confine, bounding_set(cgroups))
            )
        finally:
            os._exit(EXIT_SETUP_FAILED)
    status.send(channels.status_fd, pid=command)  # signals from the launcher go there
    os.close(channels.status_fd)
    if channels.tty_socket is not None:
        channels.tty_socket.close()
    os._exit(_wait_exit_code(command))


def exec_in(
    pid: int,
    cgroups: dict[str, str],
    argv: list[str],
    *,
    env: dict[str, str],
    workdir: str,
    user: str | None,
    tty: bool,
    interactive: bool,
) -> int:
    """Runs ``argv`` in the running container whose PID 1 is ``pid`` (docker exec): same
    namespaces and cgroups, same capabilities/no_new_privs/seccomp. Returns the exit code;
    raises like ``run`` when the command cannot be started."""
    if not argv:
        raise LaunchError("no command to run", hint="Give one after `--`.")
    if not alive(pid):
        raise LaunchError(f"the container's process {pid} is not running")
    process = ProcessSpec(
        argv=list(argv),
        env=dict(env),
        workdir=workdir,
        user=user,
        tty=tty,
        interactive=interactive,
        window_size=get_window_size(0) if tty else None,
    )
    joined = ContainerCgroups.from_paths(cgroups) if cgroups else None
    read_end, write_end = os.pipe()
    parent_sock = child_sock = None
    if tty:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    launcher = os.getpid()
    joiner = os.fork()
    if joiner == 0:
        try:
            if parent_sock is not None:
                parent_sock.close()
            os.close(read_end)
            _exec_joiner(pid, joined, process, Channels(write_end, child_sock), launcher)
        finally:
            os._exit(EXIT_SETUP_FAILED)
    os.close(write_end)
    if child_sock is not None:
        child_sock.close()
    try:
        report = status.read_all(read_end)
    except BaseException:
        _kill_and_reap(joiner)
        raise
    finally:
        os.close(read_end)
    if report.error is not None or report.exec_errno is not None:
        _kill_and_reap(joiner)
        if parent_sock is not None:
            parent_sock.close()
        _raise_for(report, f"the container of process {pid}")
    try:
        master = _receive_master(parent_sock)
    except BaseException:
        _kill_and_reap(joiner)
        raise
    try:
        return _wait(
            joiner,
            signal_target=report.pid or joiner,
            master=master,
            stdin=0 if interactive else None,
        )
    except BaseException:
        _kill_and_reap(joiner)
        raise


def _proc_start_time(pid: int) -> float | None:
    """Start time of ``pid`` in seconds since the epoch, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    ticks = int(fields[19])  # field 22 (starttime), counted after the "(comm)" field
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _is_namespace_init(pid: int) -> bool:
    """The process is PID 1 of a pid namespace below ours (NSpid ends in 1)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) >= 2 and ids[-1] == "1"
    except OSError:
        return False
    return False


def alive(pid: int, started_at: float | None = None) -> bool:
    """True while ``pid`` is still a container's PID 1 (not a zombie, not a reused pid: it is a
    pid-namespace init and, given ``started_at`` (epoch seconds of the start), started no
    later than that, with 2 s for the coarse boot time of /proc/stat)."""
    if pid <= 0:
        return False
    started = _proc_start_time(pid)
    if started is None or not _is_namespace_init(pid):
        return False
    return started_at is None or started <= started_at + 2.0


def _wait_gone(pid: int, started_at: float | None, deadline: float) -> bool:
    while alive(pid, started_at):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_STOP_POLL)
    return True


def stop(pid: int, cgroups: dict[str, str], *, timeout: float) -> None:
    """docker stop: SIGTERM to PID 1, SIGKILL after ``timeout`` seconds, then every process
    left in the cgroups killed. Signals go through a pidfd, so a reused pid is never hit."""
    if alive(pid):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                if not _wait_gone(pid, None, time.monotonic() + timeout):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    _wait_gone(pid, None, time.monotonic() + 5.0)
            finally:
                os.close(pidfd)
    _kill_leftovers(cgroups)


def _kill_leftovers(cgroups: dict[str, str]) -> None:
    """Kills what is left in the cgroups, unless the container's launcher already removed
    them (it does on the exit that our signal caused: a race that is no failure)."""

    if not cgroups or not any(os.path.isdir(path) for path in cgroups.values()):
        return
    try:
        ContainerCgroups.from_paths(cgroups).kill_all()
    except (ThinmgrError, OSError):
        if all(os.path.isdir(path) for path in cgroups.values()):
            raise  # nobody is removing them: a real failure
