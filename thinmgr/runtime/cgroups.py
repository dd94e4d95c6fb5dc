"""A container's cgroups: cgroup v1 (per-controller hierarchies) and v2 behind one interface.

The cgroups live at ``<caller's own cgroup>/thinmgr/<name>`` in every hierarchy, so that the
container stays inside the caller's accounting (runtime-and-images.md §0.6; runc does the same
with relative cgroup paths). Only ``thinmgr/<name>`` directories are ever created, written,
killed or removed; ``from_paths`` refuses anything else.

v1 (the development and CI machines, hybrid mode): memory (+memsw: no swap), cpu (CFS quota,
shares), cpuset, pids, blkio throttles, devices (allow-list, joined separately after the root
file system is mounted) and freezer (for kill_all). v2 (the qemu lab guest): memory.max +
memory.swap.max=0, cpu.max, cpu.weight, cpuset.cpus, pids.max, io.max and cgroup.kill. Device
access is not filtered on v2 (that needs a BPF_CGROUP_DEVICE program); ``warnings()`` says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import BusyError, ConflictError, UnsupportedError, UsageError
from thinmgr.kernel.errno_map import kernel_error
from thinmgr.runtime import caller

DEFAULT_PIDS_LIMIT = 4096
PARENT_DIR = "thinmgr"
UNIFIED = "unified"  # the key of the one v2 directory in paths()
CPU_PERIOD_US = 100_000  # the CFS period Docker and runc use for --cpus
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses quotas below 1 ms
MIN_MEMORY_BYTES = 6 << 20  # Docker's minimum --memory
MIN_SHARES, MAX_SHARES = 2, 262_144  # kernel/sched: MIN_SHARES, MAX_SHARES (v1 cpu.shares)
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "cpuset", "pids", "blkio", "freezer", "devices")
V2_CONTROLLERS = ("memory", "pids", "cpu", "cpuset", "io")
# runc's default allow-list (libcontainer/specconv AllowedDevices) as Docker applies it:
# mknod of any node, and use of null, zero, full, random, urandom, tty, console, ptmx, pts/*.
DEVICE_ALLOW = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
)
BUFFERED_WRITE_WARNING = (
    "cgroup v1 throttles only direct and fsync'd writes, not buffered writeback: "
    "--device-write-bps/--device-write-iops do not limit ordinary buffered writes"
)
V2_DEVICES_WARNING = (
    "cgroup v2: device access is not filtered (a BPF_CGROUP_DEVICE program is not "
    "implemented); the container relies on its minimal /dev and its capability set"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_KILL_TIMEOUT = 5.0
_RMDIR_TIMEOUT = 2.0


# ---------------------------------------------------------------------------------------
# Limits and their validation


@dataclass(frozen=True)
class Limits:
    """What the user asked for; None = no limit. pids_limit <= 0 means unlimited ("max")."""

    memory_bytes: int | None = None
    cpus: float | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    pids_limit: int = DEFAULT_PIDS_LIMIT
    device_read_bps: int | None = None
    device_write_bps: int | None = None
    device_read_iops: int | None = None
    device_write_iops: int | None = None

    def has_device_limits(self) -> bool:
        return any(
            value is not None
            for value in (
                self.device_read_bps,
                self.device_write_bps,
                self.device_read_iops,
                self.device_write_iops,
            )
        )


@dataclass(frozen=True)
class HostFacts:
    online_cpus: frozenset[int]
    mem_total: int

    @classmethod
    def probe(cls) -> HostFacts:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            cpus = parse_cpu_list(f.read())
        mem_total = 0
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
        return cls(cpus, mem_total)


def parse_cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list ("0-3,6,8-9") as a set; ValueError when malformed."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"bad CPU list item {part!r}")
        low, high = int(first), int(last) if sep else int(first)
        if high < low:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def check_limits(limits: Limits, host: HostFacts | None = None) -> None:
    """UsageError when a limit is malformed or beyond what this host has."""
    host = host or HostFacts.probe()
    if limits.memory_bytes is not None:
        if limits.memory_bytes < MIN_MEMORY_BYTES:
            raise UsageError(
                f"memory limit {limits.memory_bytes} bytes is too small",
                hint="The minimum is 6 MiB (as with Docker), e.g. --memory 64m.",
            )
        if host.mem_total and limits.memory_bytes > host.mem_total:
            raise UsageError(
                f"memory limit {limits.memory_bytes} bytes exceeds this host's memory "
                f"({host.mem_total} bytes)",
                hint="Give a limit below the host's MemTotal (see /proc/meminfo).",
            )
    if limits.cpus is not None:
        if not limits.cpus > 0 or limits.cpus * CPU_PERIOD_US < MIN_CPU_QUOTA_US:
            raise UsageError(f"--cpus {limits.cpus} is too small", hint="Give at least 0.01 CPUs.")
        if limits.cpus > len(host.online_cpus):
            raise UsageError(
                f"--cpus {limits.cpus} exceeds the {len(host.online_cpus)} online CPUs",
                hint=f"Give at most {len(host.online_cpus)}.",
            )
    if limits.cpu_shares is not None and not MIN_SHARES <= limits.cpu_shares <= MAX_SHARES:
        raise UsageError(
            f"--cpu-shares {limits.cpu_shares} is out of range",
            hint=f"Give a value from {MIN_SHARES} to {MAX_SHARES} (the default weight is 1024).",
        )
    if limits.cpuset_cpus is not None:
        try:
            wanted = parse_cpu_list(limits.cpuset_cpus)
        except ValueError as exc:
            raise UsageError(
                f"bad --cpuset-cpus {limits.cpuset_cpus!r}: {exc}",
                hint='Use a CPU list such as "0", "0-1" or "0,2".',
            ) from None
        missing = sorted(wanted - host.online_cpus)
        if not wanted or missing:
            online = format_cpu_list(host.online_cpus)
            raise UsageError(
                f"--cpuset-cpus {limits.cpuset_cpus!r} names CPUs that are not online: "
                f"{format_cpu_list(missing) or 'none given'}",
                hint=f"The online CPUs are {online}.",
            )
    for option, value in (
        ("--device-read-bps", limits.device_read_bps),
        ("--device-write-bps", limits.device_write_bps),
        ("--device-read-iops", limits.device_read_iops),
        ("--device-write-iops", limits.device_write_iops),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"{option} must be positive, not {value}")


def format_cpu_list(cpus: Iterable[int]) -> str:
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares [2, 262144] to v2 cpu.weight [1, 10000], the way runc converts it
    (libcontainer/cgroups/utils.go ConvertCPUSharesToCgroupV2Value)."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def cpu_quota_us(cpus: float) -> int:
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


def io_max_line(device: tuple[int, int], limits: Limits) -> str | None:
    """The v2 io.max line for the device's limits, or None when there are none."""
    fields = [
        f"{key}={value}"
        for key, value in (
            ("rbps", limits.device_read_bps),
            ("wbps", limits.device_write_bps),
            ("riops", limits.device_read_iops),
            ("wiops", limits.device_write_iops),
        )
        if value is not None
    ]
    if not fields:
        return None
    return f"{device[0]}:{device[1]} " + " ".join(fields)


def blkio_throttles(device: tuple[int, int], limits: Limits) -> dict[str, str]:
    """The v1 blkio.throttle.* files to write, and their "MAJ:MIN N" lines."""
    out: dict[str, str] = {}
    for name, value in (
        ("read_bps_device", limits.device_read_bps),
        ("write_bps_device", limits.device_write_bps),
        ("read_iops_device", limits.device_read_iops),
        ("write_iops_device", limits.device_write_iops),
    ):
        if value is not None:
            out[f"blkio.throttle.{name}"] = f"{device[0]}:{device[1]} {value}"
    return out


# ---------------------------------------------------------------------------------------
# Where the hierarchies are, and where the caller sits in them


@dataclass(frozen=True)
class Layout:
    version: int  # 1 (v1 or hybrid) or 2 (unified)
    v1: dict[str, tuple[str, str]]  # controller -> (mount point, mount root)
    v2: tuple[str, str] | None  # the cgroup2 mount (mount point, mount root)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_layout(mountinfo: str) -> Layout:
    """Find the cgroup mounts in /proc/self/mountinfo text. The first mount of a hierarchy
    wins; v1 is chosen when any v1 controller hierarchy is mounted (hybrid mode)."""
    v1: dict[str, tuple[str, str]] = {}
    v2: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point, fstype = _unescape(fields[3]), _unescape(fields[4]), rfields[0]
        if fstype == "cgroup2" and v2 is None:
            v2 = (point, root)
        elif fstype == "cgroup":
            for option in rfields[2].split(","):
                if option in V1_CONTROLLERS and option not in v1:
                    v1[option] = (point, root)
    if v1:
        return Layout(1, v1, v2)
    if v2 is not None:
        return Layout(2, {}, v2)
    raise UnsupportedError(
        "no cgroup file system is mounted",
        hint="Mount cgroup2 on /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup), or the "
        "v1 controller hierarchies, to run containers with resource limits.",
    )


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup text to {controller: path}; the v2 entry ("0::/path") has key ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for controller in controllers.split(","):
            if controller:
                out[controller] = path
    return out


def _under_mount(mount: tuple[str, str], path: str) -> str:
    point, root = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return os.path.normpath(point + "/" + path.lstrip("/"))


def caller_dirs(layout: Layout, own: dict[str, str]) -> dict[str, str]:
    """Controller (or UNIFIED) -> the directory of the caller's own cgroup."""
    if layout.version == 2:
        assert layout.v2 is not None
        return {UNIFIED: _under_mount(layout.v2, own.get("", "/"))}
    return {
        controller: _under_mount(mount, own.get(controller, "/"))
        for controller, mount in layout.v1.items()
    }


def v2_parent(own: str, mount_point: str) -> str:
    """Where to nest on v2: the caller's own cgroup, or, when it holds processes itself (a
    systemd session scope, say) and is not the root, its nearest ancestor that holds none.

    v2's no-internal-processes rule forbids enabling controllers below a non-root cgroup that
    has processes, so nesting right under such a caller cannot limit anything; the nearest
    process-free ancestor keeps the container inside the caller's slice (and its accounting)
    as closely as v2 allows. The root cgroup is exempt from the rule.
    """
    directory = os.path.normpath(own)
    root = os.path.normpath(mount_point)
    while directory != root and directory.startswith(root + "/"):
        try:
            if not _read(f"{directory}/cgroup.procs").strip():
                return directory
        except OSError:
            return directory
        directory = os.path.dirname(directory)
    return root


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: str, value: str, *, hint: str | None = None) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise kernel_error(f"write {value!r} to {path}", exc, hint=hint) from None


def _key_values(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _procs(directory: str) -> list[int]:
    try:
        return [int(pid) for pid in _read(f"{directory}/cgroup.procs").split()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------
# The container's cgroups


class ContainerCgroups:
    """The cgroup directories of one container (``thinmgr/<name>`` in each hierarchy)."""

    def __init__(self, version: int, dirs: dict[str, str], notes: Iterable[str] = ()) -> None:
        self.version = version
        self._dirs = dict(dirs)  # controller (v1) or UNIFIED (v2) -> directory
        self._notes = list(notes)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls, name: str, limits: Limits, *, block_device: tuple[int, int] | None
    ) -> ContainerCgroups:
        """Make the cgroups under the caller's own and write the limits (throttles apply to
        ``block_device``). On failure nothing that was made is left behind."""
        check_name(name)
        if limits.has_device_limits() and block_device is None:
            raise UsageError("device I/O limits need the container's block device")
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            layout = parse_layout(f.read())
        with open(caller.proc_file("cgroup"), encoding="utf-8", errors="surrogateescape") as f:
            own = parse_proc_cgroup(f.read())
        parents = caller_dirs(layout, own)
        if layout.version == 2:
            assert layout.v2 is not None
            parent = v2_parent(parents[UNIFIED], layout.v2[0])
            return cls._create_v2(name, limits, block_device, parent)
        return cls._create_v1(name, limits, block_device, parents)

    @classmethod
    def _create_v1(
        cls,
        name: str,
        limits: Limits,
        block_device: tuple[int, int] | None,
        parents: dict[str, str],
    ) -> ContainerCgroups:
        missing = [c for c in ("memory", "pids") if c not in parents]
        needed = {
            "cpu": limits.cpus is not None or limits.cpu_shares is not None,
            "cpuset": limits.cpuset_cpus is not None,
            "blkio": limits.has_device_limits(),
            "memory": limits.memory_bytes is not None,
        }
        for controller, wanted in needed.items():
            if wanted and controller not in parents:
                raise UnsupportedError(
                    f"the cgroup v1 {controller} controller is not mounted",
                    hint="Mount it under /sys/fs/cgroup, or run without that limit.",
                )
        notes = [f"cgroup v1 controller {c} is not mounted: no {c} limit" for c in missing]
        if limits.device_write_bps is not None or limits.device_write_iops is not None:
            notes.append(BUFFERED_WRITE_WARNING)
        dirs = {c: f"{parent}/{PARENT_DIR}/{name}" for c, parent in parents.items()}
        made = cls(1, dirs, notes)
        try:
            done: set[str] = set()
            for controller in sorted(parents, key=V1_CONTROLLERS.index):
                if dirs[controller] not in done:  # co-mounted controllers share one directory
                    made._make_level(controller, parents[controller])
                    done.add(dirs[controller])
            made._apply_v1(limits, block_device)
        except BaseException:
            made.remove()
            raise
        return made

    @classmethod
    def _create_v2(
        cls, name: str, limits: Limits, block_device: tuple[int, int] | None, parent: str
    ) -> ContainerCgroups:
        wanted = {"memory", "pids"}
        if limits.cpus is not None or limits.cpu_shares is not None:
            wanted.add("cpu")
        if limits.cpuset_cpus is not None:
            wanted.add("cpuset")
        if limits.has_device_limits():
            wanted.add("io")
        available = set(_read(f"{parent}/cgroup.controllers").split())
        absent = sorted(wanted - available)
        if absent:
            raise UnsupportedError(
                f"cgroup v2 controllers not available in {parent}: {', '.join(absent)}",
                hint="Enable them in the parent cgroups' cgroup.subtree_control (delegation).",
            )
        made = cls(2, {UNIFIED: f"{parent}/{PARENT_DIR}/{name}"}, [V2_DEVICES_WARNING])
        try:
            _enable_controllers(parent, wanted)
            made._make_level(UNIFIED, parent)
            _enable_controllers(f"{parent}/{PARENT_DIR}", wanted)
            made._apply_v2(limits, block_device)
        except BaseException:
            made.remove()
            raise
        return made

    def _make_level(self, controller: str, parent: str) -> None:
        """mkdir parent/thinmgr (shared, kept while others use it) and parent/thinmgr/name."""
        top = f"{parent}/{PARENT_DIR}"
        leaf = self._dirs[controller]
        for attempt in range(3):
            try:
                os.mkdir(top, 0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                raise kernel_error(f"create the cgroup {top}", exc) from None
            if controller == "cpuset":
                _fill_cpuset(parent, top)
            try:
                os.mkdir(leaf, 0o755)
                break
            except FileExistsError:
                if _procs(leaf):
                    raise ConflictError(
                        f"the cgroup {leaf} already exists and has processes",
                        hint="A container of that name still runs: stop it first.",
                    ) from None
                _rmdir_retry(leaf)  # a leftover of a crashed run: start it afresh
            except FileNotFoundError:
                if attempt == 2:  # another container removed thinmgr/ meanwhile: retry
                    raise
            except OSError as exc:
                raise kernel_error(f"create the cgroup {leaf}", exc) from None
        if controller == "cpuset":
            _fill_cpuset(top, leaf)

    def _apply_v1(self, limits: Limits, block_device: tuple[int, int] | None) -> None:
        d = self._dirs
        if limits.memory_bytes is not None:
            # Set the memory limit before memory+swap: memsw must never be below it.
            _write(f"{d['memory']}/memory.limit_in_bytes", str(limits.memory_bytes))
            memsw = f"{d['memory']}/memory.memsw.limit_in_bytes"
            if os.path.exists(memsw):
                _write(memsw, str(limits.memory_bytes))
        if limits.cpus is not None:
            _write(f"{d['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{d['cpu']}/cpu.cfs_quota_us", str(cpu_quota_us(limits.cpus)))
        if limits.cpu_shares is not None:
            _write(f"{d['cpu']}/cpu.shares", str(limits.cpu_shares))
        if limits.cpuset_cpus is not None:
            _write(f"{d['cpuset']}/cpuset.cpus", limits.cpuset_cpus)
        if "pids" in d:
            _write(f"{d['pids']}/pids.max", _pids_max(limits))
        if block_device is not None:
            for filename, line in blkio_throttles(block_device, limits).items():
                _write(f"{d['blkio']}/{filename}", line)
        if "devices" in d:
            _write(f"{d['devices']}/devices.deny", "a")
            for rule in DEVICE_ALLOW:
                _write(f"{d['devices']}/devices.allow", rule)

    def _apply_v2(self, limits: Limits, block_device: tuple[int, int] | None) -> None:
        d = self._dirs[UNIFIED]
        if limits.memory_bytes is not None:
            _write(f"{d}/memory.max", str(limits.memory_bytes))
            if os.path.exists(f"{d}/memory.swap.max"):
                _write(f"{d}/memory.swap.max", "0")
        if limits.cpus is not None:
            _write(f"{d}/cpu.max", f"{cpu_quota_us(limits.cpus)} {CPU_PERIOD_US}")
        if limits.cpu_shares is not None:
            _write(f"{d}/cpu.weight", str(shares_to_weight(limits.cpu_shares)))
        if limits.cpuset_cpus is not None:
            _write(f"{d}/cpuset.cpus", limits.cpuset_cpus)
        _write(f"{d}/pids.max", _pids_max(limits))
        line = io_max_line(block_device, limits) if block_device else None
        if line:
            _write(f"{d}/io.max", line)

    @classmethod
    def from_paths(cls, paths: dict[str, str]) -> ContainerCgroups:
        """Re-open what ``paths()`` returned (e.g. from the catalog). Refuses paths that are
        not ``.../thinmgr/<name>`` directories of one container."""
        names = {os.path.basename(p) for p in paths.values()}
        if not paths or len(names) != 1:
            raise UsageError(f"not the cgroup paths of one container: {paths}")
        for key, path in paths.items():
            if key not in (*V1_CONTROLLERS, UNIFIED) or (
                not path.startswith("/")
                or os.path.normpath(path) != path
                or os.path.basename(os.path.dirname(path)) != PARENT_DIR
            ):
                raise UsageError(f"not a thinmgr container cgroup: {key}={path}")
        check_name(names.pop())
        version = 2 if UNIFIED in paths else 1
        notes = [V2_DEVICES_WARNING] if version == 2 else []
        return cls(version, paths, notes)

    # -- queries -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return os.path.basename(next(iter(self._dirs.values())))

    def paths(self) -> dict[str, str]:
        return dict(self._dirs)

    def warnings(self) -> list[str]:
        return list(self._notes)

    def _unique_dirs(self, *, devices: bool = True) -> list[str]:
        seen: list[str] = []
        for controller, path in self._dirs.items():
            if (devices or controller != "devices") and path not in seen:
                seen.append(path)
        return seen

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self._unique_dirs():
            found.update(_procs(path))
        return sorted(found)

    def stats(self) -> dict[str, int]:
        """memory_bytes, memory_peak_bytes, oom_kills, pids, cpu_usage_us (0 if unknown)."""
        out = dict.fromkeys(
            ("memory_bytes", "memory_peak_bytes", "oom_kills", "pids", "cpu_usage_us"), 0
        )
        if self.version == 2:
            d = self._dirs[UNIFIED]
            out["memory_bytes"] = _read_int(f"{d}/memory.current")
            out["memory_peak_bytes"] = _read_int(f"{d}/memory.peak")
            out["oom_kills"] = _read_keyed(f"{d}/memory.events").get("oom_kill", 0)
            out["pids"] = _read_int(f"{d}/pids.current")
            out["cpu_usage_us"] = _read_keyed(f"{d}/cpu.stat").get("usage_usec", 0)
            return out
        dirs = self._dirs
        if "memory" in dirs:
            out["memory_bytes"] = _read_int(f"{dirs['memory']}/memory.usage_in_bytes")
            out["memory_peak_bytes"] = _read_int(f"{dirs['memory']}/memory.max_usage_in_bytes")
            # memory.failcnt stays 0 on OOM here; oom_control's oom_kill counts (§2)
            out["oom_kills"] = _read_keyed(f"{dirs['memory']}/memory.oom_control").get(
                "oom_kill", 0
            )
        if "pids" in dirs:
            out["pids"] = _read_int(f"{dirs['pids']}/pids.current")
        if "cpuacct" in dirs:
            out["cpu_usage_us"] = _read_int(f"{dirs['cpuacct']}/cpuacct.usage") // 1000
        return out

    # -- membership --------------------------------------------------------------------

    def join(self, pid: int) -> None:
        """Move ``pid`` (0 = the caller; a pid of the writer's pid namespace) into every
        controller except devices. The first cgroup.procs write of a burst costs 5-20 ms."""
        for path in self._unique_dirs(devices=False):
            _write(f"{path}/cgroup.procs", str(pid))

    def join_devices(self, pid: int) -> None:
        """v1: move ``pid`` into the devices cgroup. Call after the container's root file
        system is mounted: inside the cgroup, mounting the block device fails (EPERM)."""
        if "devices" in self._dirs:
            _write(f"{self._dirs['devices']}/cgroup.procs", str(pid))

    # -- teardown ----------------------------------------------------------------------

    def kill_all(self, timeout: float = _KILL_TIMEOUT) -> None:
        """SIGKILL every process in the cgroups and wait (bounded) until none is left.

        v2 with cgroup.kill (5.14+) kills atomically; otherwise the cgroup is frozen first so
        that nothing can fork between reading the process list and the kill (v1: freezer)."""
        deadline = time.monotonic() + timeout
        if self.version == 2 and os.path.exists(f"{self._dirs[UNIFIED]}/cgroup.kill"):
            _write(f"{self._dirs[UNIFIED]}/cgroup.kill", "1")
        else:
            with self._frozen(deadline):
                self._signal_all()
        while True:
            if not self.pids():
                return
            if time.monotonic() > deadline:
                raise BusyError(
                    f"processes of container {self.name} survived SIGKILL: {self.pids()}",
                    hint="They may be stuck in uninterruptible I/O; try again later.",
                )
            self._signal_all()
            time.sleep(0.01)

    def _signal_all(self) -> None:
        me = os.getpid()
        for pid in self.pids():
            if pid != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _frozen(self, deadline: float) -> _Freeze:
        if self.version == 2:
            return _Freeze(self._dirs[UNIFIED], "cgroup.freeze", ("1", "0"), deadline)
        if "freezer" in self._dirs:
            return _Freeze(self._dirs["freezer"], "freezer.state", ("FROZEN", "THAWED"), deadline)
        return _Freeze(None, "", ("", ""), deadline)

    def remove(self) -> None:
        """rmdir every directory this container has (idempotent), then the shared thinmgr/
        level where it is empty. Retries briefly: right after a kill the cgroup stays busy
        until the killed processes are reaped."""
        errors: list[str] = []
        for path in self._unique_dirs():
            try:
                _rmdir_retry(path)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror}")
        for path in self._unique_dirs():
            with contextlib.suppress(OSError):  # only when no other container is there
                os.rmdir(os.path.dirname(path))
        if errors:
            raise BusyError(
                f"cannot remove the cgroups of container {self.name}: {'; '.join(errors)}",
                hint="Processes of the container may still run (or are not reaped yet); "
                "stop it and try again.",
            )


class _Freeze:
    """Freeze a cgroup for the duration of a with-block (no-op without a freezer)."""

    def __init__(
        self, directory: str | None, filename: str, states: tuple[str, str], deadline: float
    ) -> None:
        self._file = f"{directory}/{filename}" if directory else None
        self._states = states
        self._deadline = min(deadline, time.monotonic() + 1.0)

    def __enter__(self) -> None:
        if self._file is None or not os.path.exists(self._file):
            self._file = None
            return
        _write(self._file, self._states[0])
        if self._states[0] == "FROZEN":  # v1: FREEZING until every task is in the fridge
            while _read(self._file).strip() != "FROZEN" and time.monotonic() < self._deadline:
                time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None and os.path.exists(self._file):
            _write(self._file, self._states[1])


def _enable_controllers(directory: str, wanted: set[str]) -> None:
    enabled = set(_read(f"{directory}/cgroup.subtree_control").split())
    todo = sorted(wanted - enabled)
    if not todo:
        return
    try:
        fd = os.open(f"{directory}/cgroup.subtree_control", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, " ".join(f"+{c}" for c in todo).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise UnsupportedError(
                f"cannot enable the cgroup v2 controllers {', '.join(todo)} below {directory}: "
                "that cgroup has processes of its own (v2's no-internal-processes rule)",
                hint="Run thinmgr from the root cgroup or from a cgroup whose processes live in "
                "a child cgroup (e.g. move them to <cgroup>/leaf first).",
            ) from None
        raise kernel_error(f"enable {', '.join(todo)} in {directory}", exc) from None


def _fill_cpuset(parent: str, child: str) -> None:
    """v1 cpuset: a new cgroup starts with empty cpus/mems and refuses tasks until filled."""
    for filename in ("cpuset.cpus", "cpuset.mems"):
        if not _read(f"{child}/{filename}").strip():
            _write(f"{child}/{filename}", _read(f"{parent}/{filename}").strip())


def _rmdir_retry(path: str, timeout: float = _RMDIR_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _read_int(path: str) -> int:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _read_keyed(path: str) -> dict[str, int]:
    try:
        return _key_values(_read(path))
    except OSError:
        return {}


def _pids_max(limits: Limits) -> str:
    return str(limits.pids_limit) if limits.pids_limit > 0 else "max"


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"bad container name for a cgroup: {name!r}",
            hint="Use letters, digits, '_', '.' and '-' (up to 128 characters).",
        )


def find_stale() -> dict[str, ContainerCgroups]:
    """``thinmgr/<name>`` cgroups under the caller's own that have no processes left (e.g.
    of containers whose supervisor died); ``doctor`` may remove() them."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        layout = parse_layout(f.read())
    with open(caller.proc_file("cgroup"), encoding="utf-8", errors="surrogateescape") as f:
        own = parse_proc_cgroup(f.read())
    by_name: dict[str, dict[str, str]] = {}
    for controller, parent in caller_dirs(layout, own).items():
        top = Path(parent, PARENT_DIR)
        if top.is_dir():
            for leaf in top.iterdir():
                if leaf.is_dir() and _NAME.fullmatch(leaf.name):
                    by_name.setdefault(leaf.name, {})[controller] = str(leaf)
    stale = {}
    for name, dirs in by_name.items():
        cgroups = ContainerCgroups.from_paths(dirs)
        if not cgroups.pids():
            stale[name] = cgroups
    return stale
