"""Map the guest's pytest results (junit XML) back to host test ids.

pytest names a junit ``testcase`` from the node id: the file path becomes a dotted module
path without ``.py``, the classes join it, and the last part (with its parameters) is the
name (pytest's own ``mangle_test_address``, _pytest/junitxml.py, 8.x/9.x).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class CaseResult:
    outcome: str  # "passed", "failed" or "skipped"
    message: str = ""
    details: str = ""
    seconds: float = 0.0


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) of the junit testcase pytest writes for ``nodeid``."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_junit(xml: bytes) -> dict[tuple[str, str], CaseResult]:
    """Every testcase's outcome. A test with both an error (e.g. in teardown) and a passed
    call counts as failed, as pytest reports it."""
    root = ET.fromstring(xml)
    results: dict[tuple[str, str], CaseResult] = {}
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        seconds = float(case.get("time", "0") or 0)
        result = CaseResult("passed", seconds=seconds)
        for child in case:
            if child.tag in ("failure", "error"):
                result = CaseResult("failed", child.get("message", ""), child.text or "", seconds)
                break
            if child.tag == "skipped":
                result = CaseResult("skipped", child.get("message", ""), "", seconds)
        results[key] = result
    return results
