"""The test-only clock override (``GATEWAY_TEST_ASSUME_CLOCK_SYNCHRONISED``) is obeyed only in a process the
test suite started: ``GATEWAY_TEST_SUITE_PID`` must name a running pytest process that is the process itself or
an ancestor. Set anywhere else it is ignored with a warning, and ``gatewayctl doctor`` flags it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.clock import ASSUME_ENV, SUITE_ENV, started_by_test_suite
from gateway.ops.doctor import check_test_override

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import structlog
from gateway import clock
seen = []
structlog.configure(processors=[lambda _l, _m, event: seen.append(event) or ""],
                    logger_factory=structlog.ReturnLoggerFactory())
print(json.dumps({"by_suite": clock.started_by_test_suite(), "judged": clock.command_clock_synchronised(),
                  "real": clock.clock_synchronised(), "again": clock.command_clock_synchronised(),
                  "warnings": [e.get("event") for e in seen]}))
"""


def probe(**env: str | None) -> dict[str, object]:
    """Run :data:`PROBE` in a child of this test process with ``env`` changed (None removes a variable)."""
    child = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key, value in env.items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = value
    out = subprocess.run([sys.executable, "-c", PROBE], env=child, capture_output=True, text=True, timeout=60,
                         check=True)
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.fixture
def stranger() -> Iterator[int]:
    """A running process that says "pytest" on its command line but is no ancestor of this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "pytest"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_the_suite_marks_its_processes_and_its_children_obey_the_override() -> None:
    assert os.environ.get(SUITE_ENV) and started_by_test_suite()
    for value, judged in (("1", True), ("0", False)):
        seen = probe(**{ASSUME_ENV: value})
        assert seen["by_suite"] is True and seen["judged"] is judged and seen["warnings"] == [], seen


@pytest.mark.parametrize("marker", [None, "1", "not-a-pid", "stranger"])
def test_without_the_suite_the_override_is_ignored_with_one_warning(marker: str | None, stranger: int) -> None:
    """No marker, init's pid, garbage, or a pytest-looking process that is not an ancestor: the real clock
    decides, whatever the variable says, and one warning names the variable."""
    suite = str(stranger) if marker == "stranger" else marker
    for value in ("1", "0"):
        seen = probe(**{ASSUME_ENV: value, SUITE_ENV: suite})
        assert seen["by_suite"] is False, seen
        assert seen["judged"] is seen["real"] and seen["again"] is seen["real"], seen
        assert seen["warnings"] == ["test-only clock override ignored: this process was not started by the "
                                    "test suite"], seen


def test_doctor_flags_the_override_in_its_environment_and_in_the_service() -> None:
    clean = check_test_override({}, service_environment="")
    assert clean.status == "ok", clean
    here = check_test_override({ASSUME_ENV: "1"}, service_environment="")
    assert here.status == "warn" and ASSUME_ENV in here.detail and "this shell" in here.detail, here
    unit = check_test_override({}, service_environment=f"LANG=C {ASSUME_ENV}=1")
    assert unit.status == "FAIL" and ASSUME_ENV in unit.detail and "gatewayd.service" in unit.detail, unit
    assert unit.fix and "Environment" in unit.fix, unit
