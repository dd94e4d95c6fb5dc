"""A file system mounted only in another mount namespace (a container's root) is still found
and frozen for a live snapshot (root tier)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinmgr.kernel.freeze import freeze, hold_mount, thaw

pytestmark = pytest.mark.root


@pytest.fixture
def ext4_loop(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_a_mount_in_another_namespace_is_reachable_and_freezable(
    ext4_loop: str, tmp_path: Path
) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    ready = tmp_path / "ready"
    # A process in its own mount namespace that mounts the device there and waits.
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount {ext4_loop} {target} && touch {ready} && exec sleep 30",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert not os.path.ismount(target)  # invisible in our namespace
        held = hold_mount(ext4_loop)
        assert held is not None
        with held:
            assert held.origin == f"/proc/{holder.pid}/root{target}"
            freeze(held.path)
            try:
                # Frozen: a write from inside the namespace blocks until the thaw.
                writer = subprocess.Popen(
                    ["nsenter", "-t", str(holder.pid), "-m", "sh", "-c", f"echo x > {target}/f"]
                )
                time.sleep(0.5)
                assert writer.poll() is None
            finally:
                assert thaw(held.path)
            assert writer.wait(timeout=10) == 0
            # The process it was found through exits (a container's short-lived process
            # often is the one found): the held path still reaches the file system.
            holder.kill()
            holder.wait()
            assert not Path(f"/proc/{holder.pid}/root{target}").exists()
            freeze(held.path)
            assert thaw(held.path)
            assert os.path.exists(f"{held.path}/f")
    finally:
        holder.kill()
        holder.wait()


def test_an_unmounted_device_is_not_reachable(ext4_loop: str) -> None:
    assert hold_mount(ext4_loop) is None
