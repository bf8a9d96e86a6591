"""Shared fixtures: a private MQTT broker, MQTT recorders and mock GPIO pins."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ASSUME_ENV
from tests.support.broker import MosquittoBroker
from tests.support.mqtt import MqttRecorder
from tests.support.notify import NotifyListener

RecorderFactory = Callable[..., MqttRecorder]

# Test machines' clocks are seldom NTP-synchronised (adjtimex: TIME_ERROR), and a gateway refuses MQTT commands
# on such a clock. The gateways these tests start (here and as child processes, which inherit it) judge
# commands as if it were synchronised; tests of the unsynchronised case set it to "0".
os.environ.setdefault(ASSUME_ENV, "1")


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
