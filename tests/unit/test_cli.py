"""The command line as a user meets it: entry points, global options, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from tests.conftest import RestoreFn
from thinmgr import __version__
from thinmgr.cli.app import REGISTRARS, build_app, command_word, run
from thinmgr.errors import ExitCode

TINY = """\
<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" \
nr_data_blocks="1000">
  <device dev_id="0" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>
    <single_mapping origin_block="5" data_block="20" time="0"/>
  </device>
</superblock>
"""


def thinmgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thinmgr", *args], capture_output=True, text=True, check=False
    )


def test_version_from_module_and_console_script() -> None:
    assert thinmgr("--version").stdout == f"thinmgr {__version__}\n"
    script = subprocess.run(["thinmgr", "--version"], capture_output=True, text=True, check=True)
    assert script.stdout == f"thinmgr {__version__}\n"


def test_help_lists_the_metadata_group() -> None:
    result = thinmgr("--help")
    assert result.returncode == 0
    assert "metadata" in result.stdout
    sub = thinmgr("metadata", "--help")
    for command in ("dump", "restore", "check", "delta", "ls"):
        assert command in sub.stdout


def test_usage_error_exits_2_without_traceback() -> None:
    result = thinmgr("metadata", "dump", "--no-such-option", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--no-such-option" in result.stderr


def test_missing_file_exits_3_with_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["metadata", "dump", str(tmp_path / "absent")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("thinmgr: error: ")
    assert "no such file" in err
    assert "hint:" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    plain = thinmgr("metadata", "dump", str(tmp_path / "absent"))
    debug = thinmgr("--debug", "metadata", "dump", str(tmp_path / "absent"))
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr
    assert plain.returncode == debug.returncode == 3


def test_global_json_switches_dump_to_json(
    restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = restore_xml(TINY)
    assert run(["--json", "metadata", "dump", str(meta)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["transaction"] == 5
    assert doc["devices"][0]["mappings"] == [[0, 10, 2, 0], [5, 20, 1, 0]]


def test_dump_to_file_is_written_whole(restore_xml: RestoreFn, tmp_path: Path) -> None:
    meta = restore_xml(TINY)
    out = tmp_path / "dump.xml"
    assert run(["metadata", "dump", str(meta), "-o", str(out)]) == 0
    oracle = subprocess.run(["thin_dump", str(meta)], capture_output=True, text=True, check=True)
    assert out.read_text() == oracle.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dump.xml")] == []


def test_closed_pipe_is_not_an_error(restore_xml: RestoreFn) -> None:
    meta = restore_xml(TINY)
    cmd = f"{sys.executable} -m thinmgr metadata dump {meta} | head -c 10"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=False
    )
    assert result.stdout == "<superbloc"
    assert "Traceback" not in result.stderr


def test_bare_metadata_snap_flag_after_global_options(
    restore_xml: RestoreFn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = restore_xml(TINY)
    # The flag without a value means "the held snapshot"; this image holds none: exit 3.
    assert run(["--home", str(tmp_path), "metadata", "dump", "--metadata-snap", str(meta)]) == 3
    assert "no metadata snapshot" in capsys.readouterr().err
    assert run(["metadata", "dump", "-m", str(meta)]) == 3


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["pool", "list"], "pool"),
        (["--home", "pool", "volume", "list"], "volume"),  # "pool" is --home's value here
        (["--home=/x", "--json", "run", "--rm", "bb"], "run"),
        (["--debug", "--", "ps"], "ps"),
        (["--json"], None),
        ([], None),
    ],
)
def test_command_word_skips_root_options_and_their_values(
    args: list[str], word: str | None
) -> None:
    assert command_word(args) == word


def test_a_command_line_builds_only_its_own_commands() -> None:
    only_pool = typer.main.get_command(build_app("pool"))
    assert isinstance(only_pool, click.Group)
    assert sorted(only_pool.commands) == ["pool"]
    containers = typer.main.get_command(build_app("exec"))
    assert isinstance(containers, click.Group)
    assert sorted(containers.commands) == ["exec", "logs", "ps", "rm", "run", "stop"]
    everything = typer.main.get_command(build_app("no-such-word"))
    assert isinstance(everything, click.Group)
    assert set(everything.commands) == set(REGISTRARS)


@pytest.mark.parametrize("word", sorted(REGISTRARS))
def test_every_top_level_word_has_its_help(word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([word, "--help"]) == 0
    assert "Usage: thinmgr " + word in capsys.readouterr().out.replace("\n", " ")


def test_unknown_command_is_a_usage_error_listing_nothing_twice() -> None:
    result = thinmgr("no-such-command")
    assert result.returncode == 2
    assert "No such command 'no-such-command'" in result.stderr
    assert "Traceback" not in result.stderr


def test_fast_exit_still_flushes_output_and_keeps_the_code(tmp_path: Path) -> None:
    # main() leaves through os._exit: buffered stdout and the exit code must survive it.
    code = (
        "import sys; from thinmgr.cli.main import main; "
        f"main(['--home', {str(tmp_path)!r}, '--json', 'pool', 'list'])"
    )
    listed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    missing = subprocess.run(
        [sys.executable, "-c", code.replace("'list'", "'status', 'nope'")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == ExitCode.NOT_FOUND, missing.stderr
    assert missing.stderr.startswith("thinmgr: error: ")


def test_closed_stdout_is_refused_before_any_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "-m", "thinmgr", "--home", str(home), "pool", "list"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        # The child starts with descriptor 1 closed, as after `>&-` in a shell.
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == ExitCode.IO_ERROR
    assert result.stderr.startswith("thinmgr: error: cannot write to standard output")
    assert not home.exists()  # nothing was done: not even the catalog created


def test_output_to_a_full_device_is_an_io_error(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "thinmgr", "--home", str(tmp_path), "--json", "pool", "list"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert result.returncode == ExitCode.IO_ERROR
    assert "Traceback" not in result.stderr
