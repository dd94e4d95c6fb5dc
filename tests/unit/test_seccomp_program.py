"""The seccomp BPF program, run through a small classic-BPF interpreter (no root needed).

This checks the decisions for both supported architectures, including aarch64, which the
development machines cannot execute; the real kernel behaviour is in
tests/root/test_seccomp_caps.py.
"""

from __future__ import annotations

import errno
import struct

import pytest

from thinmgr.errors import UsageError
from thinmgr.kernel import caps
from thinmgr.kernel.seccomp import (
    AARCH64_SYSCALLS,
    ARCHES,
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_X86_64,
    DENIED,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    X86_64_SYSCALLS,
    Arch,
    build_program,
)

EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS


def run(program: list[tuple[int, int, int, int]], nr: int, arch: int, *args: int) -> int:
    """Evaluate the filter on a struct seccomp_data (little-endian)."""
    padded = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *padded)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD | BPF_W | BPF_ABS
            assert code == 0x20
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif cls == 0x05:  # BPF_JMP | op | BPF_K
            op = code & 0xF0
            taken = {0x10: acc == k, 0x30: acc >= k, 0x40: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)
        elif cls == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize("arch", ARCHES.values(), ids=lambda a: a.name)
def test_deny_list_allow_rest(arch: Arch) -> None:
    program = build_program(arch)
    table = arch.syscalls
    for name in DENIED:
        if name in table:
            assert run(program, table[name], arch.audit_arch) == EPERM, name
    assert run(program, table["clone3"], arch.audit_arch) == ENOSYS
    for nr in (0, 1, 2, 57, 59, 60, 231, 500):  # read, write, open/..., fork, execve, exit...
        if nr not in table.values():
            assert run(program, nr, arch.audit_arch) == SECCOMP_RET_ALLOW, nr


@pytest.mark.parametrize("arch", ARCHES.values(), ids=lambda a: a.name)
def test_clone_flags_are_filtered(arch: Arch) -> None:
    program = build_program(arch)
    clone = arch.syscalls["clone"]
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD, glibc fork
    thread_flags = 0x003D0F00  # glibc pthread_create
    assert run(program, clone, arch.audit_arch, fork_flags) == SECCOMP_RET_ALLOW
    assert run(program, clone, arch.audit_arch, thread_flags) == SECCOMP_RET_ALLOW
    for new_ns in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000):
        assert run(program, clone, arch.audit_arch, fork_flags | new_ns) == EPERM
    assert run(program, clone, arch.audit_arch, 0x40000000 | 17) == EPERM  # NEWNET


@pytest.mark.parametrize("arch", ARCHES.values(), ids=lambda a: a.name)
def test_personality_arguments(arch: Arch) -> None:
    program = build_program(arch)
    nr = arch.syscalls["personality"]
    for allowed in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert run(program, nr, arch.audit_arch, allowed) == SECCOMP_RET_ALLOW
    assert run(program, nr, arch.audit_arch, 0x0040000) == EPERM  # ADDR_NO_RANDOMIZE


def test_foreign_arch_is_killed_and_x32_refused() -> None:
    x86 = build_program(ARCHES["x86_64"])
    assert run(x86, 0, 0x40000003) == SECCOMP_RET_KILL_PROCESS  # AUDIT_ARCH_I386
    assert run(x86, 0, AUDIT_ARCH_AARCH64) == SECCOMP_RET_KILL_PROCESS
    assert run(x86, 0x40000000 | 1, AUDIT_ARCH_X86_64) == EPERM  # x32 write
    arm = build_program(ARCHES["aarch64"])
    assert run(arm, 0, AUDIT_ARCH_X86_64) == SECCOMP_RET_KILL_PROCESS
    assert run(arm, 0x40000000 | 1, AUDIT_ARCH_AARCH64) == SECCOMP_RET_ALLOW  # no x32 there


def test_tables_agree_on_shared_syscalls() -> None:
    # the numbers from 425 on are common to every architecture (the unified table)
    for name, nr in X86_64_SYSCALLS.items():
        if nr >= 425:
            assert AARCH64_SYSCALLS[name] == nr, name
    assert "iopl" not in AARCH64_SYSCALLS


def test_docker_default_caps_mask() -> None:
    assert caps.capability_mask(caps.DOCKER_DEFAULT_CAPS) == 0xA80425FB
    assert caps.parse_cap_names(["cap_chown", "NET_ADMIN"]) == {caps.CAP_CHOWN, caps.CAP_NET_ADMIN}
    assert caps.CAP_NAMES["SYS_ADMIN"] == 21
    with pytest.raises(UsageError):
        caps.parse_cap_names(["CAP_FLY"])
