"""The lab tier: tests marked ``lab`` run inside one qemu guest per test session.

On the host, the first ``lab`` test to run boots the guest once, and runs every collected
``lab`` test of this directory there with ``python3 -m pytest -m lab NODEIDS
--junitxml=RESULTS/junit.xml``; each test's outcome is then reported on the host from that
XML. Inside the guest (THINMGR_IN_LAB=1, set by the guest's init) the tests simply run.

If the lab cannot boot here (no qemu, no kernel prepared, no static busybox), the tests fail
where the tier is required (CI=true or THINMGR_REQUIRE_TIERS containing "lab") and are
skipped otherwise. THINMGR_LAB_TIMEOUT (seconds, default 600) bounds the guest run; a guest
that fails before any test finished is booted once more (ATTEMPTS), and the summary says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _pytest.reports import TestReport

from tests.conftest import required_tiers

IN_LAB = os.environ.get("THINMGR_IN_LAB") == "1"
HERE = Path(__file__).parent
CONSOLE_TAIL = 60
PROGRESS = "progress.jsonl"  # per-test outcomes, written by the guest as tests finish
ATTEMPTS = 2  # guest runs when the first fails before any test finished


@dataclass
class GuestOutcomes:
    """The guest run's results: per node id, or one reason for all (could not run)."""

    by_nodeid: dict[str, tuple[str, str]] = field(default_factory=dict)  # outcome, text
    common: tuple[str, str] | None = None  # (outcome, reason) for every test
    console: str = ""
    summary: str = ""


_KEY = pytest.StashKey[GuestOutcomes]()


def _lab_items(session: pytest.Session) -> list[pytest.Item]:
    return [
        item
        for item in session.items
        if item.get_closest_marker("lab") and HERE in item.path.parents
    ]


def _unavailable() -> str | None:
    from thinmgr.errors import ThinmgrError
    from thinmgr.lab.cache import require_kernel
    from thinmgr.lab.initramfs import find_busybox
    from thinmgr.lab.qemu import find_qemu

    try:
        find_qemu()
        require_kernel()
        find_busybox()
    except ThinmgrError as error:
        return f"{error.message} ({error.hint})"
    return None


def _run_guest(session: pytest.Session) -> GuestOutcomes:
    from thinmgr.errors import ThinmgrError
    from thinmgr.lab.junit import junit_key, parse_junit
    from thinmgr.lab.session import make_results_dir, run_in_lab

    problem = _unavailable()
    if problem:
        outcome = "failed" if "lab" in required_tiers() else "skipped"
        return GuestOutcomes(common=(outcome, f"the kernel lab cannot run: {problem}"))
    items = _lab_items(session)
    started = time.monotonic()
    retried = ""
    for attempt in range(1, ATTEMPTS + 1):
        results = make_results_dir()
        junit = results / "junit.xml"
        argv = [
            sys.executable, "-m", "pytest", "-q", "--color=no", "-p", "no:cacheprovider",
            "-m", "lab", f"--junitxml={junit}", "-o", "junit_family=xunit2",
            f"--rootdir={session.config.rootpath}",
            *(item.nodeid for item in items),
        ]  # fmt: skip
        try:
            lab_run = run_in_lab(
                argv,
                cwd=session.config.rootpath,
                timeout=float(os.environ.get("THINMGR_LAB_TIMEOUT", "600")),
                # Plugin autoloading costs seconds under TCG (kernel-lab.md §4).
                env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                results=results,
            )
            break
        except ThinmgrError as error:
            finished = _progress(results / PROGRESS)
            shutil.rmtree(results, ignore_errors=True)
            if not finished and attempt < ATTEMPTS:
                # Not one test finished: the guest never got going (once in CI, 2026-11-28,
                # with not a line on its console, while the same run passes in 250 s). A
                # test that hangs hangs again, so a second try only hides a one-off stall.
                retried = f"; the first guest failed before any test ({error.message}), retried"
                continue
            # A hung or crashed guest: keep the outcomes of the tests that finished before.
            outcomes = GuestOutcomes(
                common=("failed", f"the lab guest failed: {error.message}{retried}")
            )
            outcomes.by_nodeid = finished
            return outcomes
    console = "\n".join(line.text for line in lab_run.vm.lines[-CONSOLE_TAIL:])
    stalls = lab_run.stalled_boots
    summary = (
        f"lab guest: ready after {lab_run.boot_seconds or 0:.1f} s, "
        f"whole run {time.monotonic() - started:.1f} s, guest pytest exit {lab_run.exit_code}"
        f"{f'; {stalls} stalled boot(s) tried again' if stalls else ''}{retried}"
    )
    try:
        cases = parse_junit(junit.read_bytes())
    except (OSError, ValueError) as exc:
        shutil.rmtree(results, ignore_errors=True)
        return GuestOutcomes(
            common=("failed", f"no junit results from the guest ({exc})"),
            console=console,
            summary=summary,
        )
    shutil.rmtree(results, ignore_errors=True)
    outcomes = GuestOutcomes(console=console, summary=summary)
    for item in items:
        case = cases.get(junit_key(item.nodeid))
        if case is None:
            outcomes.by_nodeid[item.nodeid] = ("failed", "the guest reported no result")
        else:
            text = case.details or case.message
            outcomes.by_nodeid[item.nodeid] = (case.outcome, text)
    return outcomes


def _progress(path: Path) -> dict[str, tuple[str, str]]:
    """Outcomes of the tests the guest finished, from its progress file."""
    done: dict[str, tuple[str, str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return done
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line may be cut short by the kill
        text = "failed in the guest (details lost: the guest did not finish)"
        done[record["nodeid"]] = (record["outcome"], text if record["outcome"] == "failed" else "")
    return done


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the guest: record each finished test at once, through the results share (which
    survives the guest being killed), so a later hang does not lose earlier results."""
    results = os.environ.get("THINMGR_LAB_RESULTS")
    if not IN_LAB or not results:
        return
    if report.when == "call" or report.outcome != "passed" or report.when == "teardown":
        if report.when == "teardown" and report.outcome == "passed":
            return
        record = {"nodeid": report.nodeid, "outcome": report.outcome}
        with open(Path(results) / PROGRESS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _report(item: pytest.Item, when: str, outcome: str, longrepr: object, sections=()):
    report = TestReport(
        item.nodeid,
        item.location,
        {name: 1 for name in item.keywords},
        outcome,  # type: ignore[arg-type]
        longrepr,  # type: ignore[arg-type]
        when,  # type: ignore[arg-type]
        sections=sections,
    )
    item.ihook.pytest_runtest_logreport(report=report)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if IN_LAB or not item.get_closest_marker("lab"):
        return None
    stash = item.config.stash
    if _KEY not in stash:
        stash[_KEY] = _run_guest(item.session)
    guest = stash[_KEY]
    outcome, text = guest.by_nodeid.get(item.nodeid) or guest.common or ("failed", "not run")
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if outcome == "skipped":
        line = item.location[1]
        _report(item, "setup", "skipped", (str(item.path), (line or 0) + 1, f"Skipped: {text}"))
    else:
        _report(item, "setup", "passed", None)
        sections = [("lab guest", guest.summary)] if guest.summary else []
        # The junit details already hold a test's own traceback; the console tail is for
        # failures without them (hung or crashed guest, missing result).
        own_details = guest.common is None and item.nodeid in guest.by_nodeid
        if outcome == "failed" and guest.console and not (own_details and text):
            sections.append(("lab guest console (last lines)", guest.console))
        _report(item, "call", outcome, text if outcome == "failed" else None, sections)
    _report(item, "teardown", "passed", None)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    guest = terminalreporter.config.stash.get(_KEY, None)
    if guest is not None and guest.summary:
        terminalreporter.write_line(guest.summary)
