"""`thinmgr run`/`exec` argument handling and exit codes, without root (the use case is faked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from thinmgr.cli.app import run as cli
from thinmgr.errors import UsageError
from thinmgr.ops import containers
from thinmgr.ops.containers import RunOptions, RunOutcome, parse_env, parse_throttle


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """Records what the CLI passes to run_container/exec_container (which are faked)."""
    monkeypatch.setenv("THINMGR_HOME", str(tmp_path / "home"))
    seen: list[dict[str, Any]] = []

    def fake_run(_mgr: object, target: str, argv: list[str], options: RunOptions, **kw: Any) -> Any:
        seen.append({"target": target, "argv": argv, "options": options, **kw})
        if options.memory == "explode":
            raise UsageError("bad memory")
        return RunOutcome("c1", 42, 3, [])

    def fake_exec(_mgr: object, name: str, argv: list[str], **kw: Any) -> int:
        seen.append({"name": name, "argv": argv, **kw})
        return 7

    monkeypatch.setattr(containers, "run_container", fake_run)
    monkeypatch.setattr(containers, "exec_container", fake_exec)
    return seen


def test_everything_after_the_target_is_the_command(calls: list[dict[str, Any]]) -> None:
    assert cli(["run", "--name", "a", "-e", "K=V", "img", "--", "sh", "-c", "echo --x"]) == 3
    assert calls[-1]["argv"] == ["sh", "-c", "echo --x"]
    assert calls[-1]["options"].env == {"K": "V"} and calls[-1]["options"].name == "a"
    assert cli(["run", "img", "sh", "-d", "--rm"]) == 3  # options after IMAGE are the command's
    assert calls[-1]["argv"] == ["sh", "-d", "--rm"] and calls[-1]["detach"] is False
    assert cli(["run", "img", "--", "--", "x"]) == 3  # only the first `--` is ours
    assert calls[-1]["argv"] == ["--", "x"]
    assert cli(["exec", "-e", "A=b", "c1", "--", "ls", "-l"]) == 7
    assert calls[-1]["argv"] == ["ls", "-l"] and calls[-1]["env"] == {"A": "b"}


def test_setup_errors_and_bad_options_exit_125(calls: list[dict[str, Any]]) -> None:
    assert cli(["run", "--memory", "explode", "img", "--", "true"]) == 125
    assert cli(["run", "--cpus", "abc", "img", "--", "true"]) == 125
    assert cli(["run", "--no-such-option", "img"]) == 125
    assert cli(["run", "-e", "=x", "img", "--", "true"]) == 125


def test_parse_env_takes_bare_keys_from_the_host() -> None:
    host = {"HOME": "/root"}
    assert parse_env(["A=1", "B=", "HOME", "MISSING", "C=x=y"], host) == {
        "A": "1",
        "B": "",
        "HOME": "/root",
        "C": "x=y",
    }
    with pytest.raises(UsageError):
        parse_env(["=1"], host)


def test_throttles_accept_only_the_containers_own_device() -> None:
    own = ("/dev/thinmgr/p/ctr-a", "p/ctr-a", "ctr-a")
    assert parse_throttle("1m", "--x", own, is_size=True) == 1 << 20
    assert parse_throttle("/dev/thinmgr/p/ctr-a:2m", "--x", own, is_size=True) == 2 << 20
    assert parse_throttle("ctr-a:100", "--x", own, is_size=False) == 100
    for bad in ("/dev/sda:1m", "0", "banana"):
        with pytest.raises(UsageError):
            parse_throttle(bad, "--x", own, is_size=True)
    with pytest.raises(UsageError):
        parse_throttle("1.5", "--x", own, is_size=False)
