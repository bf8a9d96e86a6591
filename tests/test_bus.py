"""BusPoller: one thread per bus, polling simulated detectors (pymodbus server on a pty) in turn."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import CommError, GasDetector, ModbusClient, ModbusDevice
from drivers.profiles import BUILTIN_DETECTOR_PROFILES, GasReading
from gateway.config import BusConfig
from gateway.panel.buses import BusPoller, open_client
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

PROFILE_A = BUILTIN_DETECTOR_PROFILES["A"]


@dataclass
class RecordingPanel:
    """Stands in for the AlarmPanel: records what the bus thread reports, from which thread."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    fail_reading_for: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, what: str, subject: str, value: Any) -> None:
        with self.lock:
            self.calls.append((what, subject, value))
            self.threads.add(threading.current_thread().name)

    def reading(self, device_id: str, reading: GasReading) -> None:
        self._record("reading", device_id, reading)
        if device_id in self.fail_reading_for:
            raise KeyError(f"alarm core bug for {device_id}")

    def station(self, device_id: str, reading: Any) -> None:
        self._record("station", device_id, reading)

    def poll_failed(self, device_id: str, reason: str) -> None:
        self._record("poll_failed", device_id, reason)

    def port_state(self, bus_id: str, lost: bool, detail: str | None = None) -> None:
        self._record("port_state", bus_id, lost)

    def of(self, what: str, subject: str | None = None) -> list[tuple[str, str, Any]]:
        with self.lock:
            return [c for c in self.calls if c[0] == what and (subject is None or c[1] == subject)]

    def count(self, what: str, subject: str | None = None) -> int:
        return len(self.of(what, subject))


def bus_config(port: str, *, timeout_s: float = 0.1, poll_interval_s: float = 0.1) -> BusConfig:
    return BusConfig(id="bus1", port=port, baudrate=9600, parity="N", stopbits=1, bytesize=8,
                     timeout_s=timeout_s, poll_interval_s=poll_interval_s)


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.fixture
def sim(modem: VirtualNullModem) -> Iterator[tuple[SimulatedBus, dict[int, SimulatedGasDetector]]]:
    bus = SimulatedBus(modem.device_port)
    detectors = {addr: bus.add_gas_detector(addr, "A", unit="%LEL", decimals=1) for addr in (1, 2, 3)}
    for addr, det in detectors.items():
        det.set_concentration(float(addr))
    bus.start()
    try:
        yield bus, detectors
    finally:
        bus.stop()


@pytest.fixture
def panel() -> RecordingPanel:
    return RecordingPanel()


def make_poller(modem: VirtualNullModem, panel: RecordingPanel, devices: list[ModbusDevice],
                **kwargs: Any) -> BusPoller:
    return BusPoller(bus_config(modem.gateway_port), devices, panel, **kwargs)  # type: ignore[arg-type]


def detectors(*addresses: int) -> list[ModbusDevice]:
    return [GasDetector(f"gas-{a}", a, PROFILE_A) for a in addresses]


@pytest.fixture
def running(modem: VirtualNullModem, sim: Any, panel: RecordingPanel) -> Iterator[BusPoller]:
    poller = make_poller(modem, panel, detectors(1, 2, 3))
    poller.start()
    try:
        yield poller
    finally:
        poller.stop()


def test_polls_each_device_in_turn_on_its_own_thread(running: BusPoller, panel: RecordingPanel) -> None:
    wait_until(lambda: panel.count("reading") >= 9, timeout=30, message="fewer than 9 readings")
    order = [c[1] for c in panel.of("reading")][:9]
    assert order == ["gas-1", "gas-2", "gas-3"] * 3
    values = {c[1]: c[2].value for c in panel.of("reading")}
    assert values == {"gas-1": 1.0, "gas-2": 2.0, "gas-3": 3.0}
    assert panel.threads == {"bus-bus1"}
    assert running.errors == 0
    assert running.polls >= 9


def test_submit_runs_work_on_the_bus_thread(running: BusPoller) -> None:
    def work(client: ModbusClient) -> tuple[str, list[int]]:
        response = client.read_holding_registers(0, count=10, device_id=2)
        return threading.current_thread().name, list(response.registers)

    thread_name, registers = running.submit(work).result(timeout=30)
    assert thread_name == running.thread.name
    assert registers[1] == 20  # 2.0 %LEL with one decimal


def test_submitted_work_that_raises_reaches_the_caller_and_the_thread_goes_on(
    running: BusPoller, panel: RecordingPanel
) -> None:
    def broken(client: ModbusClient) -> None:
        raise ZeroDivisionError("work failed")

    with pytest.raises(ZeroDivisionError):
        running.submit(broken).result(timeout=30)
    before = panel.count("reading")
    wait_until(lambda: panel.count("reading") >= before + 3, timeout=30, message="polling stopped")
    assert running.thread.is_alive()


def test_pause_stops_polling_but_serves_requests(running: BusPoller, panel: RecordingPanel) -> None:
    cycles = [0]

    def beat() -> None:
        cycles[0] += 1

    running._heartbeat = beat  # count the thread's cycles from here on
    wait_until(lambda: panel.count("reading") >= 3, timeout=30)
    running.pause(True)
    assert running.paused
    # A request goes through the queue after the cycle in progress: polls stop from the next cycle on.
    assert running.submit(lambda client: "served").result(timeout=30) == "served"
    paused_polls = running.polls
    start = cycles[0]
    wait_until(lambda: cycles[0] >= start + 3, timeout=30, message="the paused thread stopped cycling")
    assert running.polls == paused_polls
    assert running.submit(lambda client: client.read_holding_registers(0, count=1, device_id=1).registers[0]
                          ).result(timeout=30) == 0x2400
    running.pause(False)
    wait_until(lambda: running.polls >= paused_polls + 3, timeout=30, message="polling did not resume")


def test_port_lost_and_reopened(modem: VirtualNullModem, running: BusPoller, panel: RecordingPanel) -> None:
    wait_until(lambda: panel.count("reading") >= 3, timeout=30)
    modem.unplug()
    wait_until(lambda: panel.of("port_state") and panel.of("port_state")[-1][2] is True, timeout=30,
               message="port loss not reported")
    assert running.port_lost
    wait_until(lambda: all(panel.count("poll_failed", f"gas-{a}") >= 3 for a in (1, 2, 3)), timeout=30,
               message="devices not failing while the port is gone")
    with pytest.raises(CommError) as excinfo:
        running.submit(lambda client: None).result(timeout=30)
    assert excinfo.value.reason == "port"

    modem.replug()
    wait_until(lambda: panel.of("port_state")[-1][2] is False, timeout=30, message="port not reopened")
    assert not running.port_lost
    readings = panel.count("reading")
    wait_until(lambda: panel.count("reading") >= readings + 3, timeout=30, message="no readings after replug")
    assert running.thread.is_alive()


class ExplodingDevice(ModbusDevice):
    """A driver with a bug: every other poll raises something that is not a CommError."""

    def __init__(self) -> None:
        super().__init__("exploding", 9)
        self.calls = 0

    def poll(self, client: ModbusClient) -> GasReading:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("driver bug")
        raise IndexError("another driver bug")


def test_driver_exception_never_kills_the_thread(modem: VirtualNullModem, sim: Any, panel: RecordingPanel) -> None:
    bad = ExplodingDevice()
    poller = make_poller(modem, panel, [bad, *detectors(1)])
    poller.start()
    try:
        wait_until(lambda: bad.calls >= 6 and panel.count("reading", "gas-1") >= 6, timeout=30,
                   message="polling stopped after a driver exception")
        assert poller.thread.is_alive()
        reasons = [c[2] for c in panel.of("poll_failed", "exploding")]
        assert len(reasons) >= 6
        assert set(reasons) == {"driver_error"}
        assert poller.errors >= 6 and poller.errors_by_kind["driver_error"] == poller.errors
    finally:
        poller.stop()
    assert not poller.thread.is_alive()


def test_panel_exception_never_kills_the_thread(
    modem: VirtualNullModem, sim: Any, panel: RecordingPanel
) -> None:
    """A bug behind the panel (alarm core) for one device must not stop the other devices' polling."""
    panel.fail_reading_for = {"gas-1"}
    poller = make_poller(modem, panel, detectors(1, 2))
    poller.start()
    try:
        wait_until(lambda: panel.count("reading", "gas-2") >= 5, timeout=30,
                   message="the bus thread died after the panel raised")
        assert poller.thread.is_alive()
        assert panel.count("reading", "gas-1") >= 5
    finally:
        poller.stop()


def test_heartbeat_exception_never_kills_the_thread(
    modem: VirtualNullModem, sim: Any, panel: RecordingPanel
) -> None:
    def broken_heartbeat() -> None:
        raise RuntimeError("heartbeat registry bug")

    poller = make_poller(modem, panel, detectors(1), heartbeat=broken_heartbeat)
    poller.start()
    try:
        wait_until(lambda: panel.count("reading", "gas-1") >= 4, timeout=30, message="thread died")
        assert poller.thread.is_alive()
    finally:
        poller.stop()


def test_stop_closes_the_port(modem: VirtualNullModem, sim: Any, panel: RecordingPanel) -> None:
    poller = make_poller(modem, panel, detectors(1))
    poller.start()
    wait_until(lambda: panel.count("reading") >= 1, timeout=30)
    poller.stop()
    assert not poller.thread.is_alive()
    # The port is free again: a second poller can open it (pyserial opens it exclusively).
    again = make_poller(modem, panel, detectors(2))
    again.start()
    try:
        wait_until(lambda: panel.count("reading", "gas-2") >= 1, timeout=30, message="port not released")
    finally:
        again.stop()


def test_bytes_left_on_the_line_are_drained_before_the_next_request(modem: VirtualNullModem, sim: Any) -> None:
    """Noise that reaches the port between polls is discarded before the request, not read as the answer."""
    client = open_client(bus_config(modem.gateway_port, timeout_s=0.5))
    assert client.connect()
    try:
        detector = GasDetector("gas-2", 2, PROFILE_A)
        assert detector.poll(client).value == pytest.approx(2.0)
        noise = os.open(modem.device_port, os.O_WRONLY | os.O_NOCTTY)  # a second writer on the device side
        try:
            os.write(noise, b"\x55\xaa\x00")
        finally:
            os.close(noise)
        wait_until(lambda: client.bytes_waiting() == 3, timeout=10, message="the noise did not reach the port")
        assert detector.poll(client).value == pytest.approx(2.0)
        assert client.bytes_waiting() == 0
    finally:
        client.close()


def test_a_bus_thread_woken_after_its_deadline_takes_what_came_in_time(modem: VirtualNullModem) -> None:
    """When the machine wakes the bus thread only after the answer's deadline, the bytes that arrived before
    it are still read: the device answered, it is not silent (nor its frame cut short)."""
    client = open_client(bus_config(modem.gateway_port, timeout_s=0.5))
    assert client.connect()
    try:
        came = b"\x02\x03\x02\x00\x07"
        writer = os.open(modem.device_port, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(writer, came)
        finally:
            os.close(writer)
        wait_until(lambda: client.bytes_waiting() == len(came), timeout=10, message="the bytes did not come")
        client.comm_params.timeout_connect = 0.0  # the deadline is already past when the thread looks
        assert client.recv(None) == came
    finally:
        client.close()
