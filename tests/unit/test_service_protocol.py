"""The command service's client side and protocol without a service (unit tier): which home
a command line names, the quiet fallback when no service answers, and the code fingerprint."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from thinmgr.cli.client import run_via_service
from thinmgr.service import protocol
from thinmgr.service.server import fingerprint


@pytest.mark.parametrize(
    ("args", "environ", "home"),
    [
        (["pool", "list"], {}, protocol.DEFAULT_HOME),
        (["pool", "list"], {"THINMGR_HOME": "/h"}, "/h"),
        (["--home", "/x", "pool", "list"], {"THINMGR_HOME": "/h"}, "/x"),
        (["--json", "--home=/y", "ps"], {}, "/y"),
        (["pool", "create", "--home", "/z"], {}, protocol.DEFAULT_HOME),  # not a root option
    ],
)
def test_home_of_follows_the_root_options(
    args: list[str], environ: dict[str, str], home: str
) -> None:
    assert protocol.home_of(args, environ) == home


def test_request_is_length_prefixed_json() -> None:
    raw = protocol.encode_request(["pool", "list"], {"A": "1"}, 0o022)
    (length,) = protocol.HEADER.unpack_from(raw)
    assert length == len(raw) - protocol.HEADER.size
    assert raw.endswith(b'"umask": 18}')


def test_no_service_or_a_dead_one_means_run_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "h"
    home.mkdir()
    monkeypatch.setenv("THINMGR_HOME", str(home))
    assert run_via_service(["pool", "list"]) is None  # no socket at all
    # A socket file nobody listens on (a killed service): connection refused.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / protocol.SOCKET_NAME))
    dead.close()
    assert run_via_service(["pool", "list"]) is None


def test_a_refusal_means_run_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    home.mkdir()
    monkeypatch.setenv("THINMGR_HOME", str(home))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / protocol.SOCKET_NAME))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:  # a service that refuses whatever it is asked
        conn, _ = listener.accept()
        _data, fds, _, _ = socket.recv_fds(conn, 65536, protocol.PASSED_FDS)
        conn.sendall(protocol.encode_reply(refused="testing"))
        os._exit(0 if len(fds) == protocol.PASSED_FDS else 1)
    try:
        assert run_via_service(["pool", "list"]) is None
    finally:
        _, status = os.waitpid(pid, 0)
        listener.close()
    assert os.waitstatus_to_exitcode(status) == 0  # stdin, stdout, stderr and cwd came along


def test_fingerprint_changes_with_any_source_file(tmp_path: Path) -> None:
    first = fingerprint()
    assert first == fingerprint()
    source = Path(protocol.__file__)
    before = source.stat()
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert fingerprint() != first
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fingerprint() == first
