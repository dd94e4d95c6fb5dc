"""The Vagrant labs' scripts run unattended against a real dm-thin (tier ``lab``).

Each lab in ``vagrant/labs/`` is a README and a script that also runs without a person at the
keyboard; running the scripts here keeps the labs from rotting. Each script must exit 0 and
leave no dm device and no loop device behind.

Under TCG a fresh Python process that imports thinmgr's command code costs ~8 s, which would
make the two scripts' ~20 ``thinmgr`` calls take minutes. So the scripts find a ``thinmgr`` on
``PATH`` that hands its arguments, environment, working directory and stdin/stdout/stderr
to a fork server: a process that imported thinmgr once and forks a child per call, which
runs the same ``thinmgr.cli.app.run`` the real ``thinmgr`` calls and returns its exit code.
The scripts and the command code are unchanged; only process start-up is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinmgr.kernel.dm import DMControl

pytestmark = pytest.mark.lab

LABS = Path(__file__).resolve().parents[2] / "vagrant" / "labs"
SCRIPT_TIMEOUT = 240  # seconds under TCG
SERVER_START_TIMEOUT = 120

# The fork server: imports thinmgr's modules once, then serves one forked child per call.
SERVER = r"""
import importlib, json, os, pkgutil, socket, sys
import thinmgr, thinmgr.cli.app
for mod in pkgutil.walk_packages(thinmgr.__path__, "thinmgr."):
    if ".lab" in mod.name or mod.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(mod.name)
    except Exception:
        pass
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1] + ".tmp")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])  # ready once the path exists
listener.listen(8)
while True:
    conn, _ = listener.accept()
    while True:  # reap finished children
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    if os.fork():
        conn.close()
        continue
    listener.close()
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(data[:4], "little")
    while len(data) < size + 4:
        data += conn.recv(1 << 20)
    request = json.loads(data[4:])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["thinmgr", *request["argv"]]
    try:
        code = thinmgr.cli.app.run(args=request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback; traceback.print_exc(); code = 70
    sys.stdout.flush(); sys.stderr.flush()
    conn.sendall(int(code or 0).to_bytes(4, "little"))
    os._exit(0)
"""

# The ``thinmgr`` the scripts run: Python without site (fast), talking to the server.
SHIM = r"""#!{python} -S
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect({socket!r})
msg = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(s, [len(msg).to_bytes(4, "little") + msg], [0, 1, 2])
code = b""
while len(code) < 4:
    part = s.recv(4 - len(code))
    if not part:
        sys.exit(70)  # the child died without an answer
    code += part
sys.exit(int.from_bytes(code, "little"))
"""


@pytest.fixture(scope="module")
def fast_thinmgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory holding the ``thinmgr`` shim, with its fork server running."""
    root = tmp_path_factory.mktemp("fork")
    sock = root / "s"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(sock)])
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not sock.exists():
        assert server.poll() is None, "the thinmgr fork server died while starting"
        assert time.monotonic() < deadline, "the thinmgr fork server did not start"
        time.sleep(0.2)
    shim = root / "thinmgr"
    shim.write_text(SHIM.format(python=sys.executable, socket=str(sock)))
    shim.chmod(0o755)
    yield root
    server.kill()
    server.wait()


def _dm_names() -> list[str]:
    with DMControl() as dm:
        return sorted(d.name for d in dm.list_devices())


def _loops() -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()


def _run_lab(lab: str, tmp_path: Path, bin_dir: Path) -> None:
    loops_before, dm_before = _loops(), _dm_names()
    env = dict(os.environ, TMPDIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(LABS / lab / "lab.sh")],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
        env=env,
    )
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"{lab}/lab.sh exited {result.returncode}:\n{output}"
    assert "done" in result.stdout, output
    assert _dm_names() == dm_before, f"{lab} left dm devices: {_dm_names()}"
    assert _loops() == loops_before, f"{lab} left loop devices: {_loops()}"


def test_lab_03_dm_thin_by_hand(tmp_path: Path, fast_thinmgr: Path) -> None:
    _run_lab("03-dm-thin-by-hand", tmp_path, fast_thinmgr)


def test_lab_04_snapshots_and_diffs(tmp_path: Path, fast_thinmgr: Path) -> None:
    _run_lab("04-snapshots-and-diffs", tmp_path, fast_thinmgr)


def test_lab_01_namespaces(tmp_path: Path, fast_thinmgr: Path) -> None:
    _run_lab("01-namespaces", tmp_path, fast_thinmgr)


def test_lab_02_cgroups(tmp_path: Path, fast_thinmgr: Path) -> None:
    _run_lab("02-cgroups", tmp_path, fast_thinmgr)


def test_lab_05_images(tmp_path: Path, fast_thinmgr: Path) -> None:
    _run_lab("05-images", tmp_path, fast_thinmgr)
