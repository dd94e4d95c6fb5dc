"""The container's privileges on the real kernel: bounding set, no_new_privs, seccomp, prctl.

Everything runs in forked children: the filter and the dropped capabilities cannot be undone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from thinmgr.errors import PermissionDenied
from thinmgr.kernel import caps, seccomp

pytestmark = pytest.mark.root

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
CLONE_NEWNS = 0x20000
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17


def in_child(body: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``body`` in a forked child; return the dict it produced (JSON through a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            result = body()
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    try:
        data = os.read(r, 1 << 16)
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, object] = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def errno_of(rc: int) -> str:
    return "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def secure() -> float:
    """The launcher's sequence; returns the seccomp install time in seconds."""
    caps.clear_inheritable_and_ambient()
    caps.drop_bounding_set(caps.DOCKER_DEFAULT_CAPS)
    caps.set_no_new_privs()
    started = time.perf_counter()
    seccomp.install_deny_filter()
    return time.perf_counter() - started


def test_secure_profile_applies() -> None:
    def body() -> dict[str, object]:
        install = secure()
        status = status_fields(Path("/proc/self/status").read_text())
        # after execve as uid 0: permitted/effective = the bounding set
        exec_status = subprocess.run(
            ["busybox", "cat", "/proc/self/status"], capture_output=True, text=True, check=True
        ).stdout
        return {
            "install_ms": install * 1000,
            "self": status,
            "exec": status_fields(exec_status),
            "nnp": caps.no_new_privs(),
            "mode": seccomp.seccomp_mode(),
        }

    out = in_child(body)
    me, ex = out["self"], out["exec"]
    assert isinstance(me, dict) and isinstance(ex, dict)
    assert me["CapBnd"] == ex["CapBnd"] == "00000000a80425fb"
    assert ex["CapEff"] == ex["CapPrm"] == "00000000a80425fb"
    assert me["CapInh"] == ex["CapInh"] == ex["CapAmb"] == "0000000000000000"
    assert me["NoNewPrivs"] == ex["NoNewPrivs"] == "1"
    assert me["Seccomp"] == ex["Seccomp"] == "2"
    assert out["nnp"] is True and out["mode"] == 2
    install_ms = out["install_ms"]
    assert isinstance(install_ms, float) and install_ms < 20
    print(f"seccomp install: {install_ms:.3f} ms")


def test_seccomp_denies_and_allows() -> None:
    def body() -> dict[str, object]:
        secure()
        results: dict[str, object] = {
            "unshare_ns": errno_of(_libc.unshare(CLONE_NEWNS)),
            "unshare_user": errno_of(_libc.unshare(CLONE_NEWUSER)),
            "mount": errno_of(_libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
            "clone3": errno_of(_libc.syscall(435, None, 0)),
            "keyctl": errno_of(_libc.syscall(250, 0, 0, 0, 0, 0)),
            "ptrace": errno_of(_libc.syscall(101, 16, os.getppid(), 0, 0)),  # PTRACE_ATTACH
            "personality_bad": errno_of(_libc.personality(0x0040000)),
            "personality_query": errno_of(_libc.personality(0xFFFFFFFF)),
            # raw clone with a namespace flag (fork flags | CLONE_NEWNS): refused
            "clone_newns": errno_of(_libc.syscall(56, SIGCHLD | CLONE_NEWNS, 0, 0, 0, 0)),
        }
        pid = os.fork()  # glibc fork: clone without namespace flags
        if pid == 0:
            os._exit(7)
        results["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        thread_ran: list[bool] = []
        thread = threading.Thread(target=lambda: thread_ran.append(True))
        thread.start()  # pthread_create tries clone3 first, falls back to clone on ENOSYS
        thread.join()
        results["thread"] = thread_ran == [True]
        results["true"] = subprocess.run(["/bin/true"], check=False).returncode
        results["sh"] = subprocess.run(
            ["busybox", "sh", "-c", "echo hi | busybox tr a-z A-Z; busybox unshare -m true"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return results

    out = in_child(body)
    assert out["unshare_ns"] == out["unshare_user"] == out["mount"] == "EPERM"
    assert out["clone3"] == "ENOSYS"
    assert out["keyctl"] == out["ptrace"] == out["personality_bad"] == "EPERM"
    assert out["personality_query"] == "ok"
    assert out["clone_newns"] == "EPERM"
    assert out["fork"] == 7
    assert out["thread"] is True
    assert out["true"] == 0
    assert out["sh"] == "HI\n"  # and busybox unshare failed quietly (its stdout is empty)


def test_dumpable_and_subreaper() -> None:
    def body() -> dict[str, object]:
        caps.set_dumpable(False)
        not_dumpable = not caps.is_dumpable()
        caps.set_dumpable(True)
        caps.set_child_subreaper()
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            if os.fork() == 0:  # the grandchild outlives its parent
                time.sleep(0.2)
                os.write(w, str(os.getppid()).encode())
                os._exit(0)
            os._exit(0)
        os.waitpid(middle, 0)
        os.close(w)
        adopted_by = int(os.read(r, 32))
        os.wait()  # reap the adopted grandchild
        return {"not_dumpable": not_dumpable, "adopted_by": adopted_by, "me": os.getpid()}

    out = in_child(body)
    assert out["not_dumpable"] is True
    assert out["adopted_by"] == out["me"]


def test_pdeathsig_kills_the_orphan() -> None:
    r, w = os.pipe()
    parent = os.fork()
    if parent == 0:  # pragma: no cover - child
        child = os.fork()
        if child == 0:
            caps.set_pdeathsig(signal.SIGKILL)
            os.write(w, str(os.getpid()).encode())
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os._exit(0)  # the orphan gets SIGKILL now
    os.close(w)
    orphan = int(os.read(r, 32))
    os.close(r)
    os.waitpid(parent, 0)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{orphan}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.01)
    else:
        pytest.fail("the orphan survived its parent despite PR_SET_PDEATHSIG")


def test_install_requires_no_new_privs_or_cap_sys_admin() -> None:
    # Without no_new_privs, installing needs CAP_SYS_ADMIN: drop it first and expect EACCES.
    def body() -> dict[str, object]:
        caps.drop_bounding_set(caps.DOCKER_DEFAULT_CAPS)
        os.setuid(0)  # keep uid 0; drop the effective set below via capset
        header = caps._CapHeader(caps._LINUX_CAPABILITY_VERSION_3, 0)
        data = caps._CapDataPair()
        _libc.capget(ctypes.byref(header), data)
        data[0].effective &= ~(1 << caps.CAP_SYS_ADMIN)
        _libc.capset(ctypes.byref(header), data)
        try:
            seccomp.install_deny_filter()
        except PermissionDenied:
            return {"refused": True}
        return {"refused": False}

    assert in_child(body) == {"refused": True}
