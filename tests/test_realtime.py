"""The alarm path does not wait: the buzzer sounds whatever the loop, the disk and the network are doing.

Functional checks (no timing assertions; the figures are in benchmarks/buzzer_latency.py): with the asyncio
loop blocked, with the SQLite database locked by another connection, with the broker black-holed, and with
1000 telemetry events per second flowing, a gas reading from the simulated detector and a closed gas-relay
contact each still switch the buzzer on. And the path watches itself: a part that stops beating becomes a
``stale_thread`` fault, which clears when it beats again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.gpio import make_buzzer
from drivers.profiles import GasReading
from gateway.annunciation import Sound
from gateway.config import load_config
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.panel.alarm_panel import AlarmPanel
from gateway.panel.annunciator import Annunciator
from gateway.panel.core import AlarmCore
from gateway.panel.process import PanelProcess
from gateway.panel.selfcheck import SelfCheck, on_alarm_path
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import TimedMockPin, eventually, read_events, running_gateway, simulated_detectors
from tests.support.site import ContactSpec, SiteSpec, build_site
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

HIGH = 30.0  # %LEL: above the default high threshold
RELAY = ContactSpec("relay-1", "gas_relay", pin=5, contact="NO")


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose listener never accepts nor answers: connections hang instead of being refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        yield int(sock.getsockname()[1])


def site(tmp_path: Path, modem: VirtualNullModem, broker_port: int, households: int = 1) -> tuple[SiteSpec, Any]:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", households=households, contacts=[RELAY])
    return spec, load_config(spec.write(tmp_path / "site.toml"))


def state_of(gateway: PanelProcess, device_id: str) -> dict[str, Any]:
    return next(d for d in gateway.panel.snapshot()["devices"] if d["device"] == device_id)


def reset_when_clear(gateway: PanelProcess, device_id: str, buzzer: TimedMockPin) -> None:
    """Reset the latched alarm once its condition has gone; the buzzer goes quiet."""
    wait_until(lambda: device_id in gateway.panel.reset(device_id, "test").reset, timeout=30,
               message=f"{device_id} could not be reset")
    wait_until(lambda: not buzzer.state, timeout=10, message="the buzzer stayed on after the reset")


def sound_both_paths(gateway: PanelProcess, detector: SimulatedGasDetector, detector_id: str, buzzer: TimedMockPin,
                     relay_pin: Any) -> None:
    """A high gas reading on the bus, then a closed gas-relay contact: each switches the buzzer on.

    Uses only threads and the panel, so it may run with the loop blocked.
    """
    assert not buzzer.state
    start = time.monotonic()
    detector.set_concentration(HIGH)
    wait_until(lambda: buzzer.first_high(after=start), timeout=30, message="a gas reading did not sound the buzzer")
    assert gateway.annunciator.current.sound is Sound.GAS
    detector.set_concentration(0.0)
    reset_when_clear(gateway, detector_id, buzzer)

    start = time.monotonic()
    relay_pin.drive_low()  # the relay closes (pull-up input)
    assert buzzer.first_high(after=start), "a closed gas-relay contact did not sound the buzzer at once"
    assert gateway.annunciator.current.sound is Sound.GAS
    relay_pin.drive_high()
    reset_when_clear(gateway, RELAY.id, buzzer)


async def ready(gateway: PanelProcess, device_id: str) -> None:
    await eventually(lambda: state_of(gateway, device_id)["state"] == "normal", timeout=30,
                     message=lambda: f"{device_id} never read normal: {state_of(gateway, device_id)}")


def alarm_rows(db: Path) -> list[dict[str, Any]]:
    return read_events(db, "kind = 'alarm' AND action = 'raised'")


# ------------------------------------------------------------------------------------------- conditions


async def test_buzzer_sounds_while_the_loop_is_blocked(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = site(tmp_path, modem, broker.port)
    (leak,) = spec.detectors
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await ready(gateway, leak.id)
            def last_loop_beat() -> float:
                now = time.monotonic()
                return now - gateway.heartbeats.snapshot(now)["loop"]

            before = last_loop_beat()
            # Called without awaiting anything: the loop stays blocked until both paths have sounded.
            sound_both_paths(gateway, sims[leak.id], leak.id, buzzer, mock_pins.pin(f"GPIO{RELAY.pin}"))
            # Storage is the other process: the alarms are stored while this loop is still blocked.
            wait_until(lambda: len(alarm_rows(tmp_path / "events.db")) == 2, timeout=30,
                       message="the alarms were not stored while the panel's loop was blocked")
            assert last_loop_beat() == before, "the loop ran meanwhile"


async def test_buzzer_sounds_while_sqlite_is_locked_by_another_connection(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = site(tmp_path, modem, broker.port)
    (leak,) = spec.detectors
    db = tmp_path / "events.db"
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await ready(gateway, leak.id)
            await eventually(lambda: "stored" in gateway.supervisor.beat, timeout=30)  # the storage process beat
            stored_before = gateway.supervisor.beat["stored"]
            locker = sqlite3.connect(db, timeout=30, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")
                await asyncio.to_thread(sound_both_paths, gateway, sims[leak.id], leak.id, buzzer,
                                        mock_pins.pin(f"GPIO{RELAY.pin}"))
                assert gateway.supervisor.beat["stored"] == stored_before, "the database was not locked after all"
                locker.execute("COMMIT")
            finally:
                with contextlib.suppress(sqlite3.Error):
                    locker.execute("ROLLBACK")
                locker.close()
            await eventually(lambda: len(alarm_rows(db)) == 2, message="the alarms were not stored after the lock")


async def test_buzzer_sounds_while_the_broker_is_black_holed(
    tmp_path: Path, modem: VirtualNullModem, blackhole: int, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = site(tmp_path, modem, blackhole)
    (leak,) = spec.detectors
    db = tmp_path / "events.db"
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await ready(gateway, leak.id)
            await asyncio.to_thread(sound_both_paths, gateway, sims[leak.id], leak.id, buzzer,
                                    mock_pins.pin(f"GPIO{RELAY.pin}"))
            assert not gateway.uplink_connected
            rows = await eventually(lambda: alarm_rows(db) if len(alarm_rows(db)) == 2 else None,
                                    message="the alarms were not stored")
            assert [r["delivered"] for r in rows] == [0, 0]


class TelemetryStream:
    """Readings that each make a telemetry event (values flip by 2 %LEL), ``rate`` per second, in a thread."""

    def __init__(self, gateway: PanelProcess, device_ids: list[str], rate: int = 1000) -> None:
        self._panel = gateway.panel
        self._devices = device_ids
        self._rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-stream", daemon=True)
        self.sent = 0

    def _run(self) -> None:
        readings = [GasReading(value=v, measure="%LEL", status=frozenset({"normal"})) for v in (1.0, 3.0)]
        period = 0.01
        per_tick = self._rate // 100
        next_tick = time.monotonic()
        while not self._stop.is_set():
            for _ in range(per_tick):
                device = self._devices[self.sent % len(self._devices)]
                self._panel.reading(device, readings[(self.sent // len(self._devices)) % 2])
                self.sent += 1
            next_tick += period
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def __enter__(self) -> TelemetryStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def test_buzzer_sounds_with_1000_telemetry_events_a_second_flowing(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = site(tmp_path, modem, broker.port, households=5)
    leak, *others = spec.detectors
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await ready(gateway, leak.id)
            seen_before = gateway.handover.handed_over
            with TelemetryStream(gateway, [d.id for d in others]) as stream:
                await eventually(lambda: gateway.handover.handed_over - seen_before >= 500,
                                 message="the telemetry stream did not reach the loop")
                await asyncio.to_thread(sound_both_paths, gateway, sims[leak.id], leak.id, buzzer,
                                        mock_pins.pin(f"GPIO{RELAY.pin}"))
                sent = stream.sent
            assert sent >= 500
            await eventually(lambda: len(alarm_rows(tmp_path / "events.db")) == 2,
                             message="the alarms were not stored")


# ------------------------------------------------------------------------------------------- self-check


class Recorder:
    """An alarm panel sink that keeps events (called on the panel's caller thread)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def faults(self, action: str) -> list[Event]:
        return [e for e in self.events if e.kind == "fault" and e.code == "stale_thread" and e.action == action]


@pytest.fixture
def panel_parts(mock_pins: Any) -> Iterator[tuple[AlarmPanel, Recorder, Any]]:
    buzzer_pin = mock_pins.pin("GPIO18")
    buzzer = make_buzzer("GPIO18")
    annunciator = Annunciator(buzzer)
    annunciator.start()
    sink = Recorder()
    panel = AlarmPanel(AlarmCore([]), annunciator, sink)
    try:
        yield panel, sink, buzzer_pin
    finally:
        annunciator.stop()
        buzzer.close()


def test_a_stale_part_is_a_fault_until_it_beats_again(panel_parts: tuple[AlarmPanel, Recorder, Any]) -> None:
    panel, sink, buzzer_pin = panel_parts
    beats = Heartbeats()
    for name in ("annunciator", "bus:rs485-1", "loop", "uplink"):
        beats.register(name, 5.0, now=0.0)
    check = SelfCheck(beats, panel)
    assert check.check(now=1.0) == []
    assert sink.events == []

    for name in ("annunciator", "loop", "uplink"):
        beats.beat(name, now=8.0)
    assert check.check(now=10.0) == ["bus:rs485-1"]
    (raised,) = sink.faults("raised")
    assert raised.detail == "bus:rs485-1"
    assert panel.snapshot()["annunciation"].sound is Sound.TROUBLE
    assert buzzer_pin.state, "the trouble chirp starts at once"
    assert check.check(now=11.0) == ["bus:rs485-1"]
    assert len(sink.faults("raised")) == 1, "a fault is raised once, not at every check"

    beats.beat("bus:rs485-1", now=11.5)
    assert check.check(now=12.0) == []
    (cleared,) = sink.faults("cleared")
    assert cleared.detail == "bus:rs485-1"
    assert panel.snapshot()["annunciation"].sound is Sound.QUIET


def test_a_broker_outage_is_not_a_stale_thread(panel_parts: tuple[AlarmPanel, Recorder, Any]) -> None:
    panel, sink, _ = panel_parts
    beats = Heartbeats()
    beats.register("uplink", 30.0, now=0.0)
    beats.register("bus:a", 10.0, now=0.0)
    beats.register("alarm-ticker", 5.0, now=0.0)
    assert not on_alarm_path("uplink")
    assert SelfCheck(beats, panel).check(now=100.0) == ["alarm-ticker", "bus:a"]
    assert sorted(e.detail or "" for e in sink.faults("raised")) == ["alarm-ticker", "bus:a"]


def test_the_check_thread_raises_and_clears_and_beats(panel_parts: tuple[AlarmPanel, Recorder, Any]) -> None:
    panel, sink, _ = panel_parts
    beats = Heartbeats()
    beats.register("annunciator", 0.2)
    check = SelfCheck(beats, panel, interval_s=0.05)
    check.start()
    try:
        assert "selfcheck" in beats.names()
        wait_until(lambda: sink.faults("raised"), timeout=10, message="no fault for a silent annunciator")
        wait_until(lambda: check.faulted == ["annunciator"], timeout=10, message="the fault is not kept")
        beats.beat("annunciator")
        wait_until(lambda: sink.faults("cleared"), timeout=10, message="the fault did not clear")
        assert "selfcheck" not in beats.stale()
    finally:
        check.stop()
    assert "selfcheck" not in beats.names()


async def test_a_wedged_bus_thread_becomes_a_stored_fault(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = site(tmp_path, modem, broker.port)
    (leak,) = spec.detectors
    db = tmp_path / "events.db"
    with simulated_detectors(modem.device_port, spec.detectors):
        async with running_gateway(cfg) as gateway:
            await ready(gateway, leak.id)
            gateway.heartbeats.register("bus:bus1", 0.5)  # a short deadline, so the test need not wait 10 s
            release = threading.Event()
            wedged = gateway.buses["bus1"].submit(lambda _client: release.wait(60))
            start = time.monotonic()
            try:
                rows = await eventually(
                    lambda: read_events(db, "kind = 'fault' AND action = 'raised'"), timeout=30,
                    message="no stale_thread fault stored for the wedged bus thread")
                assert rows[0]["body"]["code"] == "stale_thread"
                assert rows[0]["body"]["detail"] == "bus:bus1"
                assert buzzer.first_high(after=start), "the trouble signal did not sound"
            finally:
                release.set()
            await asyncio.wrap_future(wedged)
            cleared = await eventually(lambda: read_events(db, "kind = 'fault' AND action = 'cleared'"),
                                       timeout=30, message="the fault did not clear when the thread beat again")
            assert cleared[0]["body"]["detail"] == "bus:bus1"


@pytest.mark.parametrize("freeze", [True, False])
def test_settle_startup_freezes_the_start_up_objects_only_when_asked(freeze: bool) -> None:
    """``runtime.gc_freeze``: after start-up the objects alive are moved out of the collector's sweeps (a fresh
    interpreter, so that nothing else has frozen anything)."""
    import subprocess
    import sys

    code = ("import gateway.panel.process, gc\nfrom gateway.realtime import settle_startup\n"
            f"n = settle_startup({freeze})\nprint(n, gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    reported, counted = map(int, done.stdout.split())
    assert reported == counted
    assert (counted > 10_000) if freeze else (counted == 0), counted
