"""The lab's qemu command line, console markers, run script and junit mapping (no VM)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from thinmgr.lab.console import ConsoleLine, ConsoleState, LineSplitter
from thinmgr.lab.errors import GuestError
from thinmgr.lab.junit import junit_key, parse_junit
from thinmgr.lab.qemu import GuestSpec, kernel_cmdline, qemu_argv
from thinmgr.lab.session import check_outcome, run_script
from thinmgr.lab.vm import VmResult

SPEC = GuestSpec(Path("/c/vmlinux"), Path("/r/initrd.gz"), "/r/run.sh", Path("/r"))


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_command_line() -> None:
    argv = qemu_argv(SPEC, "qemu")
    assert option(argv, "-M") == ["microvm,acpi=on,rtc=on"]
    assert option(argv, "-accel") == ["tcg"] and option(argv, "-smp") == ["1"]
    assert option(argv, "-kernel") == ["/c/vmlinux"] and option(argv, "-m") == ["512"]
    assert "-no-reboot" in argv and option(argv, "-serial") == ["stdio"]
    devices = option(argv, "-device")
    assert "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot" in devices
    assert "virtio-rng-device" in devices
    fsdevs = option(argv, "-fsdev")
    assert "local,id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on" in fsdevs
    assert "local,id=results,path=/r,security_model=none,multidevs=remap" in fsdevs


def test_pc_uses_pci_devices() -> None:
    spec = GuestSpec(SPEC.vmlinux, SPEC.initrd, SPEC.script, None, machine="pc", memory_mb=256)
    argv = qemu_argv(spec, "qemu")
    assert option(argv, "-M") == ["pc"] and option(argv, "-m") == ["256"]
    assert option(argv, "-device") == [
        "virtio-rng-pci",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]


def test_kernel_cmdline() -> None:
    params = kernel_cmdline(SPEC).split()
    assert {"console=ttyS0", "panic=-1", "lab.mode=hostroot", "lab.script=/r/run.sh"} <= set(params)
    assert "lab.results=/r" in params


def test_blanks_in_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="blanks"):
        kernel_cmdline(GuestSpec(SPEC.vmlinux, SPEC.initrd, "/a b/run.sh", None))


def test_markers_are_anchored_and_not_output() -> None:
    state = ConsoleState()
    assert state.feed(ConsoleLine(2.1, "LAB_T ready 1.56"))
    assert not state.feed(ConsoleLine(2.2, "echo LAB_EXIT=0"))
    assert not state.feed(ConsoleLine(2.2, "[ 3.1] LAB_T x 1"))
    assert state.feed(ConsoleLine(3.0, "LAB_EXIT=3"))
    assert state.phases == {"ready": 2.1} and state.guest_uptime == {"ready": 1.56}
    assert state.exit_code == 3


def test_line_splitter_strips_carriage_returns() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\r\ntw") == ["one"]
    assert splitter.feed(b"o\r\n\r\nthree") == ["two", ""]
    assert splitter.flush() == ["three"]


def test_outcome_of_a_hung_or_crashed_guest(tmp_path: Path) -> None:
    hung = VmResult(ConsoleState(), [ConsoleLine(1.0, "LAB_T ready 1")], timed_out=True)
    with pytest.raises(GuestError, match=r"(?s)did not finish within 5 s.*LAB_T ready"):
        check_outcome(hung, tmp_path, 5)
    with pytest.raises(GuestError, match="kernel panic or crash"):
        check_outcome(VmResult(ConsoleState(), qemu_status=0), tmp_path, 5)
    done = VmResult(ConsoleState(exit_code=4))
    assert check_outcome(done, tmp_path, 5) == 4
    (tmp_path / "exitcode").write_text("4\n")
    assert check_outcome(done, tmp_path, 5) == 4


def test_run_script_quotes_everything() -> None:
    script = run_script(["echo", "a b", "$HOME"], Path("/w d"), {"X": "it's"}, Path("/r"))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert "export X='it'\"'\"'s'" in lines
    assert f"cd {shlex.quote('/w d')} || exit 125" in lines
    assert lines[-1] == "exec echo 'a b' '$HOME'"


def test_junit_keys_match_pytest() -> None:
    assert junit_key("tests/lab/test_dm.py::test_a") == ("tests.lab.test_dm", "test_a")
    assert junit_key("tests/lab/test_dm.py::TestX::test_b[1-a/b]") == (
        "tests.lab.test_dm.TestX",
        "test_b[1-a/b]",
    )


def test_parse_junit() -> None:
    xml = b"""<?xml version="1.0"?><testsuites><testsuite name="pytest">
    <testcase classname="tests.lab.t" name="test_ok" time="1.5"/>
    <testcase classname="tests.lab.t" name="test_bad" time="0.1">
      <failure message="assert 1 == 2">trace here</failure></testcase>
    <testcase classname="tests.lab.t" name="test_skip" time="0">
      <skipped type="pytest.skip" message="no dmsetup"/></testcase>
    </testsuite></testsuites>"""
    cases = parse_junit(xml)
    assert cases[("tests.lab.t", "test_ok")].outcome == "passed"
    assert cases[("tests.lab.t", "test_ok")].seconds == 1.5
    assert cases[("tests.lab.t", "test_bad")].outcome == "failed"
    assert cases[("tests.lab.t", "test_bad")].details == "trace here"
    assert cases[("tests.lab.t", "test_skip")].message == "no dmsetup"


def test_a_guest_that_never_gets_ready_is_killed_early(tmp_path: Path) -> None:
    import time

    from thinmgr.lab.vm import run_vm

    started = time.monotonic()
    stalled = run_vm(["sh", "-c", "echo booting; exec sleep 30"], 20, ready_timeout=0.5)
    assert time.monotonic() - started < 5  # not the whole run's 20 s
    assert stalled.never_ready and stalled.timed_out and stalled.tail() == ["booting"]
    with pytest.raises(GuestError, match=r"(?s)did not get ready within.*booting"):
        check_outcome(stalled, tmp_path, 20)
    # Once ready, only the run's own timeout applies.
    ready = run_vm(["sh", "-c", "echo 'LAB_T ready 1'; exec sleep 30"], 1.5, ready_timeout=0.5)
    assert ready.timed_out and not ready.never_ready and ready.seconds >= 1.5


def test_stalled_boots_are_tried_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A boot killed before "ready" ran nothing: run_in_lab boots again, up to BOOT_ATTEMPTS."""
    from types import SimpleNamespace

    from thinmgr.lab import session

    monkeypatch.setattr(session, "find_qemu", lambda: "qemu")
    monkeypatch.setattr(
        session, "require_kernel", lambda: SimpleNamespace(vmlinux=Path("/k/vmlinux"))
    )
    monkeypatch.setattr(session, "build_initramfs", lambda kernel, machine: b"initrd")
    boots: list[VmResult] = []

    def stalled() -> VmResult:
        return VmResult(ConsoleState(), [], timed_out=True, never_ready=True, seconds=30)

    def done() -> VmResult:
        state = ConsoleState(exit_code=0)
        state.phases["ready"] = 2.0
        return VmResult(state, [ConsoleLine(2.0, "LAB_T ready 1")], qemu_status=0)

    outcomes = [stalled(), stalled(), done()]
    monkeypatch.setattr(
        session, "run_vm", lambda *a, **k: boots.append(outcomes[len(boots)]) or boots[-1]
    )
    run = session.run_in_lab(["true"], cwd=tmp_path, results=tmp_path)
    assert (run.exit_code, run.stalled_boots, len(boots)) == (0, 2, 3)

    boots.clear()
    outcomes[:] = [stalled()] * session.BOOT_ATTEMPTS + [done()]
    with pytest.raises(GuestError, match="did not get ready"):
        session.run_in_lab(["true"], cwd=tmp_path, results=tmp_path)
    assert len(boots) == session.BOOT_ATTEMPTS  # then it gives up


def test_lab_run_says_when_boots_were_tried_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thinmgr.cli.app import run
    from thinmgr.lab import session

    state = ConsoleState(exit_code=0)
    state.phases["ready"] = 2.0
    done = session.LabRun(0, VmResult(state), tmp_path / "results", stalled_boots=1)
    monkeypatch.setattr(session, "run_in_lab", lambda *a, **k: done)
    assert run(["lab", "run", "--", "true"]) == 0
    assert "1 boot(s) stalled before the guest was ready and were tried again" in (
        capsys.readouterr().err
    )
