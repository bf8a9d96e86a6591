"""The alarm panel: annunciation before events, order and completeness across threads, the ticker, snapshots."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from drivers.profiles import GasReading
from gateway.annunciation import Annunciation, Sound
from gateway.config import DEFAULT_THRESHOLDS, AlarmSettings, DeviceConfig, LinkageRule
from gateway.events import Event
from gateway.panel.alarm_panel import AlarmPanel
from gateway.panel.annunciator import Annunciator
from gateway.panel.core import AlarmCore
from tests.support.wait import wait_until


def detector(did: str, household: str) -> DeviceConfig:
    low, high, hyst = DEFAULT_THRESHOLDS["%LEL"]
    return DeviceConfig(id=did, kind="gas_detector", name=did, unit="u1", household=household, bus="b1",
                        address=1, measure="%LEL", low=low, high=high, hysteresis=hyst)


def gas(value: float) -> GasReading:
    return GasReading(value=value, measure="%LEL", status=frozenset({"normal"}))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def annunciator(mock_pins: MockFactory) -> Iterator[Annunciator]:
    unit = Annunciator(DigitalOutputDevice("GPIO5", initial_value=False),
                       relays={"valve": DigitalOutputDevice("GPIO6", initial_value=False)})
    unit.start()
    try:
        yield unit
    finally:
        unit.stop()


def test_the_buzzer_is_on_before_the_sink_sees_the_alarm(mock_pins: MockFactory, annunciator: Annunciator) -> None:
    seen: list[tuple[str, str, bool, bool]] = []
    buzzer, valve = mock_pins.pin("GPIO5"), mock_pins.pin("GPIO6")

    def sink(event: Event) -> None:
        seen.append((event.kind, event.action, buzzer.state, valve.state))

    core = AlarmCore([detector("g1", "h1")], linkage=[LinkageRule("gas_high", "unit:u1", "valve")])
    panel = AlarmPanel(core, annunciator, sink)
    panel.reading("g1", gas(30.0))
    assert ("alarm", "raised", True, True) in seen
    assert ("relay", "on", True, True) in seen


def test_annunciation_callback_then_events_with_wall_time(annunciator: Annunciator) -> None:
    order: list[Any] = []
    panel = AlarmPanel(AlarmCore([detector("g1", "h1")]), annunciator, order.append,
                       on_annunciation=order.append, clock=FakeClock(), wall_clock=lambda: 1.7e9)
    panel.reading("g1", gas(12.0))
    assert isinstance(order[0], Annunciation) and order[0].sound is Sound.GAS
    alarm = next(e for e in order[1:] if e.kind == "alarm")
    assert (alarm.action, alarm.mono, alarm.wall) == ("raised", 1000.0, 1.7e9)
    assert panel.snapshot()["annunciation"] == order[0]


def test_many_threads_lose_no_event_and_keep_the_order(annunciator: Annunciator) -> None:
    """Eight 'bus threads' raise, clear and reset their own alarm while another silences and ticks."""
    devices = [detector(f"g{i}", f"h{i}") for i in range(8)]
    events: list[Event] = []
    panel = AlarmPanel(AlarmCore(devices, AlarmSettings(telemetry_deadband=1.0)), annunciator, events.append)
    cycles, silences = 60, 100
    start = threading.Barrier(len(devices) + 1)

    refused: list[str] = []

    def bus_thread(did: str) -> None:
        start.wait()
        for _ in range(cycles):
            panel.reading(did, gas(30.0))
            panel.reading(did, gas(0.0))
            if panel.reset(did, "cli").reset != (did,):
                refused.append(did)

    def operator() -> None:
        start.wait()
        for _ in range(silences):
            panel.silence("cli")
            panel.tick()

    threads = [threading.Thread(target=bus_thread, args=(d.id,)) for d in devices]
    threads.append(threading.Thread(target=operator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert refused == []
    # per cycle and device: two readings (telemetry), raised, cleared, reset
    assert len(events) == len(devices) * cycles * 5 + silences
    assert len(only(events, "silence")) == silences
    for d in devices:
        mine = [(e.kind, e.action) for e in events if e.device == d.id and e.kind != "telemetry"]
        assert mine == [("alarm", "raised"), ("alarm", "cleared"), ("reset", "reset")] * cycles
    monos = [e.mono for e in events]
    assert monos == sorted(monos), "events reach the sink in the order the core produced them"
    assert panel.snapshot()["annunciation"].sound is Sound.QUIET


def only(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def test_a_failing_sink_does_not_stop_the_caller(mock_pins: MockFactory, annunciator: Annunciator) -> None:
    delivered: list[Event] = []

    def sink(event: Event) -> None:
        if event.kind == "alarm":
            raise RuntimeError("loop closed")
        delivered.append(event)

    panel = AlarmPanel(AlarmCore([detector("g1", "h1")]), annunciator, sink)
    panel.reading("g1", gas(30.0))  # must not raise into the bus thread
    assert mock_pins.pin("GPIO5").state is True
    assert [e.kind for e in delivered] == ["telemetry"]
    panel.silence("cli")
    assert only(delivered, "silence")


def test_operator_actions(annunciator: Annunciator) -> None:
    events: list[Event] = []
    panel = AlarmPanel(AlarmCore([detector("g1", "h1")]), annunciator, events.append)
    panel.reading("g1", gas(30.0))
    result = panel.reset("g1", "mqtt")
    assert result.still_active == ("g1",) and only(events, "reset")[0].action == "refused"
    panel.reading("g1", gas(0.0))
    assert panel.reset(None, "cli").reset == ("g1",)
    with pytest.raises(KeyError):
        panel.reset("nope", "cli")
    with pytest.raises(KeyError):
        panel.test("nope", "cli")
    panel.test("g1", "cli")
    assert annunciator.sound_pattern == "test"
    snap = panel.snapshot()
    assert snap["devices"][0]["state"] == "test" and snap["annunciation"].sound is Sound.TEST


def test_the_ticker_runs_the_timed_rules(annunciator: Annunciator) -> None:
    clock = FakeClock()
    events: list[Event] = []
    beats: list[int] = []
    panel = AlarmPanel(AlarmCore([detector("g1", "h1")]), annunciator, events.append, clock=clock)
    panel.poll_failed("g1", "timeout")
    panel.start_ticker(interval_s=0.02, heartbeat=lambda: beats.append(1))
    try:
        clock.now += 100.0
        wait_until(lambda: only(events, "fault"), timeout=10, message="the ticker raised no offline fault")
        assert only(events, "fault")[0].code == "offline"
        wait_until(lambda: annunciator.sound_pattern == "trouble", timeout=10)
        # the ticker beats after each tick, so the tick that raised the fault may not have beaten yet
        wait_until(lambda: beats, timeout=10, message="the ticker never beat")
    finally:
        panel.stop()


def test_time_never_runs_backwards_for_the_core(annunciator: Annunciator) -> None:
    """The clock is read under the panel's lock, so a slow thread cannot hand the core an older time."""
    ticks = iter(range(1000, 100000))

    def clock() -> float:
        now = float(next(ticks))
        time.sleep(0.0001)  # let another thread run between reading the clock and using it
        return now

    events: list[Event] = []
    panel = AlarmPanel(AlarmCore([detector(f"g{i}", f"h{i}") for i in range(4)]), annunciator, events.append,
                       clock=clock)

    def feed(did: str) -> None:
        for v in range(100):
            panel.reading(did, gas(float(v % 40)))

    threads = [threading.Thread(target=feed, args=(f"g{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monos = [e.mono for e in events]
    assert monos == sorted(monos)


def test_an_event_keeps_every_field_when_stamped_and_when_made_plain() -> None:
    """``Event.at_wall`` and ``Event.as_dict`` (fast versions of ``dataclasses.replace`` and ``asdict``) see
    every field, whichever is set."""
    for name in (f.name for f in dataclasses.fields(Event)):
        values: dict[str, Any] = {"kind": "alarm", "action": "raised", "mono": 1.0}
        values[name] = 7.5 if name in ("mono", "value", "wall") else f"{name}-set"
        event = Event(**values)
        assert event.at_wall(9.0) == dataclasses.replace(event, wall=9.0)
        assert event.as_dict() == {k: v for k, v in dataclasses.asdict(event).items() if v is not None}
