"""The container's seccomp deny-list: a hand-written classic BPF program (no libseccomp).

The filter follows runtime-and-images.md §2 and Docker's default profile in spirit, but as a
deny-list: everything is allowed except the system calls that reach kernel-global state
(mounts, namespaces, keyrings, modules, clocks, BPF, io_uring...), which fail with EPERM.
``clone3`` fails with ENOSYS because its flags live in memory that a filter cannot read; libc
then falls back to ``clone``, whose flags (argument 0) are checked for CLONE_NEW* bits.

Program shape (one pass, first match wins)::

    arch != native            -> KILL_PROCESS   (no syscall-number confusion via int 0x80 etc.)
    nr >= 0x40000000 (x86_64) -> EPERM           (the x32 ABI)
    nr <  smallest listed nr  -> ALLOW           (fast path for read/write/mmap/...)
    nr in deny-list           -> EPERM
    nr == clone3              -> ENOSYS
    nr == clone               -> EPERM if flags & CLONE_NEW*, else ALLOW
    nr == personality         -> ALLOW for Docker's personas, else EPERM
    otherwise                 -> ALLOW
"""

from __future__ import annotations

import ctypes
import errno
import platform
from dataclasses import dataclass

from thinmgr.errors import UnsupportedError
from thinmgr.kernel.caps import PR_SET_SECCOMP, prctl

# linux/bpf_common.h (classic BPF opcodes, used by linux/filter.h)
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00
# linux/seccomp.h
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
# struct seccomp_data (linux/seccomp.h): int nr; __u32 arch; __u64 ip; __u64 args[6]
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_ARGS = 16  # args[i] at 16 + 8 * i; the low 32 bits first on little-endian
# linux/audit.h: AUDIT_ARCH_* = EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h __X32_SYSCALL_BIT
# linux/sched.h: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET, the mask Docker's
# profile (moby profiles/seccomp/default.json) filters clone's flags with. CLONE_NEWTIME
# (0x80) overlaps the exit-signal byte of clone(2) and only exists for clone3/unshare.
CLONE_NEW_FLAGS = 0x7E020000
# Docker's profile allows personality(2) only with these arguments: PER_LINUX, PER_LINUX32,
# UNAME26, UNAME26|PER_LINUX32, and 0xffffffff (query the current persona).
ALLOWED_PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

DENIED = (
    "keyctl", "add_key", "request_key", "mount", "umount2", "pivot_root", "unshare", "setns",
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "name_to_handle_at", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "process_vm_readv", "process_vm_writev", "swapon",
    "swapoff", "reboot", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "quotactl", "quotactl_fd", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "open_tree_attr", "mount_setattr", "syslog", "ptrace",
    "lookup_dcookie",
)  # fmt: skip

# arch/x86/entry/syscalls/syscall_64.tbl (common/64 entries)
X86_64_SYSCALLS: dict[str, int] = {
    "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "adjtimex": 159,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "mount_setattr": 442, "quotactl_fd": 443, "open_tree_attr": 467,
    "clone": 56,
}  # fmt: skip

# include/uapi/asm-generic/unistd.h (arm64 uses the generic table; it has no iopl/ioperm)
AARCH64_SYSCALLS: dict[str, int] = {
    "lookup_dcookie": 18, "umount2": 39, "mount": 40, "pivot_root": 41, "quotactl": 60,
    "acct": 89, "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
    "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142,
    "settimeofday": 170, "adjtimex": 171, "add_key": 217, "request_key": 218, "keyctl": 219,
    "clone": 220, "swapon": 224, "swapoff": 225, "perf_event_open": 241,
    "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
    "process_vm_readv": 270, "process_vm_writev": 271, "finit_module": 273, "bpf": 280,
    "userfaultfd": 282, "kexec_file_load": 294, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442,
    "quotactl_fd": 443, "open_tree_attr": 467,
}  # fmt: skip


@dataclass(frozen=True)
class Arch:
    name: str
    audit_arch: int
    syscalls: dict[str, int]
    has_x32: bool


ARCHES = {
    "x86_64": Arch("x86_64", AUDIT_ARCH_X86_64, X86_64_SYSCALLS, has_x32=True),
    "aarch64": Arch("aarch64", AUDIT_ARCH_AARCH64, AARCH64_SYSCALLS, has_x32=False),
}


class _SockFilter(ctypes.Structure):
    # struct sock_filter (linux/filter.h)
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    # struct sock_fprog (linux/filter.h)
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


Insn = tuple[int, int, int, int]  # code, jt, jf, k (a sock_filter)


class _Assembler:
    """Classic BPF with symbolic jump targets, resolved to relative offsets at the end."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, str | int, str | int, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self._insns.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | int = 0, false: str | int = 0) -> None:
        """``true``/``false``: a label, or 0 for the next instruction."""
        self._insns.append((BPF_JMP | op | BPF_K, true, false, k))

    def ret(self, value: int) -> None:
        self._insns.append((BPF_RET | BPF_K, 0, 0, value))

    def program(self) -> list[Insn]:
        out: list[Insn] = []
        for index, (code, jt, jf, k) in enumerate(self._insns):
            out.append((code, self._offset(index, jt), self._offset(index, jf), k))
        return out

    def _offset(self, index: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump to {target} out of range ({offset})")
        return offset


def native_arch() -> Arch:
    machine = platform.machine()
    arch = ARCHES.get(machine)
    if arch is None:
        raise UnsupportedError(
            f"no seccomp syscall table for the {machine} architecture",
            hint="thinmgr's seccomp filter supports x86_64 and aarch64.",
        )
    return arch


def build_program(arch: Arch) -> list[Insn]:
    """The filter as (code, jt, jf, k) instructions (see the module docstring)."""
    table = arch.syscalls
    denied = sorted({table[name] for name in DENIED if name in table})
    special = [table["clone3"], table["clone"], table["personality"]]
    asm = _Assembler()
    asm.load(SECCOMP_DATA_ARCH)
    asm.jump(BPF_JEQ, arch.audit_arch, false="kill")
    asm.load(SECCOMP_DATA_NR)
    if arch.has_x32:
        asm.jump(BPF_JGE, X32_SYSCALL_BIT, true="eperm")
    asm.jump(BPF_JGE, min(denied + special), false="allow")
    for number in denied:
        asm.jump(BPF_JEQ, number, true="eperm")
    asm.jump(BPF_JEQ, table["clone3"], true="enosys")
    asm.jump(BPF_JEQ, table["clone"], true="clone")
    asm.jump(BPF_JEQ, table["personality"], true="personality", false="allow")
    asm.label("clone")
    asm.load(SECCOMP_DATA_ARGS)  # low 32 bits of the flags: every CLONE_NEW* bit is there
    asm.jump(BPF_JSET, CLONE_NEW_FLAGS, true="eperm", false="allow")
    asm.label("personality")
    asm.load(SECCOMP_DATA_ARGS)  # personality(2) takes an unsigned int
    for persona in ALLOWED_PERSONAS:
        asm.jump(BPF_JEQ, persona, true="allow")
    asm.label("eperm")
    asm.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    asm.label("kill")
    asm.ret(SECCOMP_RET_KILL_PROCESS)
    asm.label("allow")
    asm.ret(SECCOMP_RET_ALLOW)
    return asm.program()


def install_deny_filter() -> None:
    """Install the filter in the calling thread (inherited across fork and execve).

    Call after ``caps.set_no_new_privs()``: without it the kernel requires CAP_SYS_ADMIN.
    """
    program = build_program(native_arch())
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), insns)
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def seccomp_mode(pid: int | str = "self") -> int:
    """The ``Seccomp:`` field of /proc/PID/status: 0 off, 1 strict, 2 filter."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


__all__ = ["DENIED", "build_program", "install_deny_filter", "native_arch", "seccomp_mode"]
