"""The container's user namespace (``--userns``) and the idmapped root that goes with it.

Container uids/gids 0..65535 are host 100000..165535 (the conventional first range of
/etc/subuid), so root in the container is an unprivileged user on the host. The order of
operations is forced by the kernel (runtime-and-images.md §2):

1. a helper child unshares CLONE_NEWUSER and waits; the (root) intermediate writes its
   uid_map/gid_map and keeps /proc/HELPER/ns/user open, then lets the helper exit: the
   namespace lives on through the descriptor (runc's "userns helper" for idmapped mounts);
2. still in the initial user namespace, in a private mount namespace of its own, the
   intermediate mounts ext4 (EPERM from inside a user namespace), clones that mount with
   open_tree, idmaps the clone with the namespace's maps and moves it onto the staging dir
   in place of the plain mount, and enters it (chdir); the devices cgroup is joined after
   this mount (§2's trap);
3. it setns()es into the user namespace (full capabilities there, none on the host), takes
   uid/gid 0 of it, and only then unshares the mnt/pid/uts/ipc/cgroup/net namespaces, so the
   user namespace owns them: PID 1 may then mount proc, sysfs, tmpfs, devpts and pivot_root;
4. PID 1 mounts an open_tree copy of the staging mount (its working directory) on top of it:
   the mount copied into the new mount namespace is locked and pivot_root refuses a locked new
   root (runc's prepareRoot binds the root onto itself likewise); it bind-mounts the host's
   device nodes (mknod needs the initial user namespace, as in runc), and goes on as without
   --userns. --net host is refused: sysfs needs the user namespace owning the network's.
"""

from __future__ import annotations

import contextlib
import os
import signal

from thinmgr.kernel import idmap, namespaces
from thinmgr.kernel.mount import MNT_DETACH, umount

HOST_ID_BASE = 100000  # container id 0 on the host (docker's userns-remap, /etc/subuid)
ID_COUNT = 65536


def id_map_line(base: int = HOST_ID_BASE, count: int = ID_COUNT) -> str:
    """The /proc/PID/uid_map (and gid_map) line: inside-id, outside-id, length."""
    return f"0 {base} {count}\n"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def create(base: int = HOST_ID_BASE, count: int = ID_COUNT) -> int:
    """A new user namespace with ids 0..count-1 mapped to base..; returns an O_RDONLY descriptor
    of it. The caller must be single-threaded and root in the initial user namespace."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            namespaces.unshare(namespaces.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)  # EOF when the parent has the namespace
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(0, "the user namespace helper died before unsharing")
        # A root writer may map any ids and need not deny setgroups (user_namespaces(7)).
        _write(f"/proc/{helper}/uid_map", id_map_line(base, count))
        _write(f"/proc/{helper}/gid_map", id_map_line(base, count))
        return os.open(f"/proc/{helper}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(helper, 0)


def idmap_mount(path: str, userns_fd: int) -> None:
    """Replaces the mount at ``path`` by an idmapped copy of it (the maps of ``userns_fd``)."""
    clone = idmap.clone_tree(path)
    try:
        idmap.set_idmap(clone, userns_fd)
        umount(path, MNT_DETACH)
        idmap.attach(clone, path)
    finally:
        os.close(clone)


def enter(userns_fd: int) -> None:
    """Joins the user namespace and becomes its root: after setns the host's uid 0 is
    unmapped in it (shown as 65534), and files made under an unmapped id fail with EOVERFLOW.
    From root to root keeps every capability."""
    namespaces.setns(userns_fd, namespaces.CLONE_NEWUSER)
    become_root()


def become_root() -> None:
    """uid/gid 0 of the user namespace just joined, no supplementary groups (runc does the
    same after joining one). Changing credentials clears PDEATHSIG: the caller re-arms it."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def has_own(pid: int) -> bool:
    """Whether process ``pid`` lives in a user namespace other than the caller's."""
    theirs = os.stat(f"/proc/{pid}/ns/user")
    ours = os.stat("/proc/self/ns/user")
    return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
