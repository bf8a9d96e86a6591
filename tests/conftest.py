"""Shared fixtures (a private MQTT broker, MQTT recorders, mock GPIO pins) and the CI rule on skips."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ASSUME_ENV, SUITE_ENV
from tests.support.broker import MosquittoBroker
from tests.support.mqtt import MqttRecorder
from tests.support.notify import NotifyListener

RecorderFactory = Callable[..., MqttRecorder]

# Test machines' clocks are seldom NTP-synchronised (adjtimex: TIME_ERROR), and a gateway refuses MQTT commands
# on such a clock. The gateways these tests start (here and as child processes, which inherit it) judge
# commands as if it were synchronised; tests of the unsynchronised case set it to "0". A gateway obeys it only
# beside SUITE_ENV naming this pytest process (under xdist: the controller, the worker's parent) or an ancestor.
os.environ.setdefault(ASSUME_ENV, "1")
os.environ.setdefault(SUITE_ENV, str(os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()))


# ------------------------------------------------------------------------------------------- CI: no silent skips

#: Under ``CI=true`` a skip is a failure unless its reason matches (re.fullmatch) one of these patterns: the
#: machine is of another kind than the test (a real Pi, systemd as init) or the test is one variant of a
#: parametrised case, never a tool, a privilege or a service that is missing. A test that needs a tool makes
#: scripts/test install it. Each entry says why it may skip; keep the list short.
CI_ALLOWED_SKIPS: tuple[tuple[str, str, str | None], ...] = (
    (r"this machine has (a real )?/dev/gpiochip\d+|this machine has a GPIO chip",
     "a real Pi: its GPIO chip would stand in for the mock the test needs", None),
    (r"systemd is init here; tests/test_install_rehearsal\.py checks both outcomes",
     "the other outcome is checked inside the install rehearsal's root", None),
    (r"response topics are an MQTT 5 feature", "the MQTT 3.1.1 variant of a parametrised test", None),
    (r".*\bGATEWAY_REHEARSE_ALL\b.*", "the rehearsals of other architectures under qemu run when asked: allowed "
     "only while GATEWAY_REHEARSE_ALL is unset", "GATEWAY_REHEARSE_ALL"),
)
"""(pattern, why it may skip, a variable that, when set, takes the allowance away)"""


def in_ci() -> bool:
    """Whether this run is CI's (``.ci/run`` sets ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def ci_allows_skip(reason: str) -> bool:
    """Whether a skip with this reason may pass under CI (:data:`CI_ALLOWED_SKIPS`)."""
    return any(re.fullmatch(pattern, reason) and not (unless and os.environ.get(unless))
               for pattern, _why, unless in CI_ALLOWED_SKIPS)


def _refusal(reason: str) -> str:
    return (f"CI=true: skipped for a reason not on tests/conftest.py's CI_ALLOWED_SKIPS, so it fails: {reason} "
            "(install what it needs in scripts/test)")


def _skip_reason(longrepr: object) -> str:
    """The reason of a skip report (its longrepr is ``(path, line, "Skipped: reason")``)."""
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(text).removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI a test's skip whose reason is not allowed becomes a failure that names the reason."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        reason = _skip_reason(report.longrepr)
        if not ci_allows_skip(reason):
            report.outcome = "failed"
            report.longrepr = _refusal(reason)


class RefusedSkip(pytest.Item):
    """Stands for a module that skipped itself at import under CI for a reason not allowed: it fails, naming it."""

    def __init__(self, *, reason: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(_refusal(self.reason), pytrace=False)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Under CI a module skipped at import (``allow_module_level``) for a reason not allowed is collected as one
    failing :class:`RefusedSkip`: the rest of the run goes on, and the run fails naming the reason."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and in_ci():
        reason = _skip_reason(report.longrepr)
        if not ci_allows_skip(reason):
            refused = RefusedSkip.from_parent(collector, name="refused-skip", reason=reason)
            outcome.force_result(pytest.CollectReport(report.nodeid, "passed", None, [refused]))  # type: ignore[attr-defined]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running mosquitto on a free loopback port, stopped at teardown."""
    instance = MosquittoBroker(tmp_path / "broker")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def mqtt_recorder_factory(request: pytest.FixtureRequest) -> Iterator[RecorderFactory]:
    """Create connected MqttRecorders; ``factory(broker=None, topics="#", **kwargs)``.

    Without ``broker`` the ``broker`` fixture is used. All recorders are closed at teardown.
    """
    created: list[MqttRecorder] = []

    def factory(
        broker: MosquittoBroker | None = None, topics: str | list[str] = "#", **kwargs: Any
    ) -> MqttRecorder:
        target = broker if broker is not None else request.getfixturevalue("broker")
        recorder = MqttRecorder(target.host, target.port, topics, **kwargs)
        created.append(recorder)
        return recorder

    try:
        yield factory
    finally:
        for recorder in reversed(created):
            recorder.close()


@pytest.fixture
def mock_pins() -> Iterator[Any]:
    """A fresh gpiozero MockFactory installed as the default pin factory."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    previous = Device.pin_factory
    factory = MockFactory()
    Device.pin_factory = factory
    try:
        yield factory
    finally:
        try:
            factory.reset()
        finally:
            Device.pin_factory = previous


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET like systemd's, for a daemon started with ``NOTIFY_SOCKET=<listener.path>``."""
    path = Path("/tmp") / f"gw-notify-{os.getpid()}-{id(tmp_path)}.sock"  # AF_UNIX paths are short
    lst = NotifyListener(path)
    try:
        yield lst
    finally:
        lst.close()
        path.unlink(missing_ok=True)
