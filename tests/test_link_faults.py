"""Faults of a device's link in the pure alarm core: ``offline`` that does not flap and ``comms_degraded``
(docs/alarms.md, "Communication faults"), and the one rule on when a reading's value is trusted."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.annunciation import Sound
from gateway.config import DEFAULT_THRESHOLDS, ConfigError, load_config
from gateway.events import Event
from gateway.panel.core import AlarmCore
from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import CountingHeartbeats, eventually, read_events, running_gateway
from tests.support.site import build_site
from tests.test_alarm import SETTINGS, T0, make_core, only, reading

WINDOW = SETTINGS.degraded_window_polls
HIGH_PPM = DEFAULT_THRESHOLDS["ppm"][1] + 10


def faults(events: list[Event], code: str) -> list[str]:
    """The actions of the fault events with ``code``, in order."""
    return [e.action for e in only(events, "fault") if e.code == code]


def poll(core: AlarmCore, device: str, ok: bool, now: float, value: float = 0.0) -> list[Event]:
    return core.reading(device, reading(value), now) if ok else core.poll_failed(device, "timeout", now)


@pytest.mark.parametrize("seed", range(40))
def test_a_device_failing_half_its_polls_for_ten_minutes_raises_each_fault_once(seed: int) -> None:
    """One poll a second for 10 minutes: the flaky g1 raises offline at most once and clears it at most once,
    and comms_degraded once; the healthy g2 on the same bus raises each alarm at the poll that sees the gas.
    Back to health, comms_degraded clears after one stable window."""
    core = make_core()
    rng = random.Random(seed)
    flaky: list[Event] = []
    now = T0
    for second in range(600):
        now = T0 + second
        flaky += poll(core, "g1", rng.random() >= 0.5, now)
        gas = HIGH_PPM if second % 60 >= 50 else 0.0  # g2 (a CO detector) sees gas for 10 s a minute
        events = core.reading("g2", reading(gas, measure="ppm"), now + 0.5)
        if gas and second % 60 == 50:
            assert [e.level for e in only(events, "alarm", "raised")] == ["high"], f"g2's alarm at {second} s"
            assert core.annunciation(now + 0.5).sound is Sound.GAS
            core.silence(now + 0.6, "test")
        if second % 60 == 59:
            core.reset("g2", now + 0.9, "test")
    assert faults(flaky, "offline") in ([], ["raised", "cleared"], ["raised"]), faults(flaky, "offline")
    assert faults(flaky, "comms_degraded") == ["raised"]
    assert len(only(flaky, "fault", "raised")) <= 2
    assert "comms_degraded" in core.device_state("g1")["faults"]  # type: ignore[operator]
    healthy: list[Event] = []
    for i in range(1, 2 * WINDOW + 10):
        healthy += poll(core, "g1", True, now + i)
    assert faults(healthy, "comms_degraded") == ["cleared"]
    assert core.device_state("g1")["faults"] == []


def test_a_device_back_from_an_outage_is_not_degraded() -> None:
    """Failed polls while offline are the outage's, not the link's quality: after it, no comms_degraded."""
    core = make_core()
    events: list[Event] = []
    for i in range(40):
        events += poll(core, "g1", False, T0 + i)
    for i in range(40, 100):
        events += poll(core, "g1", True, T0 + i)
    assert [(e.action, e.code) for e in only(events, "fault")] == [("raised", "offline"), ("cleared", "offline")]


def test_more_than_a_fifth_of_the_window_failing_is_degraded() -> None:
    core = make_core()
    events: list[Event] = []
    pattern = [False, True, True, True, True]  # one poll in five fails: 20 %, not more
    for i in range(3 * WINDOW):
        events += poll(core, "g1", pattern[i % 5], T0 + i)
    assert not only(events, "fault")
    pattern = [False, True, True, False, True]  # 40 %
    for i in range(3 * WINDOW, 4 * WINDOW):
        events += poll(core, "g1", pattern[i % 5], T0 + i)
    raised = only(events, "fault", "raised")
    assert [e.code for e in raised] == ["comms_degraded"]
    assert "11 of the last 50 polls failed" in str(raised[0].detail)
    assert core.annunciation(T0 + 4 * WINDOW).sound is Sound.TROUBLE


def test_failing_again_soon_after_offline_cleared_is_degraded_then_offline_after_the_ceiling() -> None:
    core = make_core()
    events: list[Event] = []
    for i in range(3):
        events += poll(core, "g1", False, T0 + i)
    for i in range(3, 8):
        events += poll(core, "g1", True, T0 + i)
    for i in range(8, 11):
        events += poll(core, "g1", False, T0 + i)
    assert [(e.action, e.code) for e in only(events, "fault")] == [
        ("raised", "offline"), ("cleared", "offline"), ("raised", "comms_degraded")]
    assert "again" in str(only(events, "fault", "raised")[-1].detail)
    # No valid answer for the standard's 100 s: offline, degraded or not (the ticker sees it without a poll).
    later = core.tick(T0 + 8 + SETTINGS.offline_ceiling_s)
    assert [(e.action, e.code) for e in only(later, "fault")] == [("raised", "offline")]


def test_degraded_stays_until_a_whole_window_is_stable() -> None:
    core = make_core()
    i = 0
    while not faults(poll(core, "g1", i % 2 == 0, T0 + i), "comms_degraded"):  # every other poll fails
        i += 1
    raised_at = i
    events: list[Event] = []
    for i in range(raised_at + 1, raised_at + WINDOW):  # all good, but not yet a whole window since
        events += poll(core, "g1", True, T0 + i)
    assert not faults(events, "comms_degraded")
    # Three failures (over 5 % of 50) keep it until the window holds no more than two of them.
    first = raised_at + WINDOW
    for i in range(first, first + 3):
        events += poll(core, "g1", False, T0 + i)
    for i in range(first + 3, first + WINDOW):
        events += poll(core, "g1", True, T0 + i)
    assert not faults(events, "comms_degraded")
    cleared = poll(core, "g1", True, T0 + first + WINDOW)
    assert faults(cleared, "comms_degraded") == ["cleared"]


def test_a_bad_readings_value_is_trusted_nowhere() -> None:
    """comms_fault with 30 %LEL in the register: no alarm from the value, no value in any event or display."""
    core = make_core()
    events = core.reading("g1", reading(30.0, "comms_fault"), T0)
    assert not only(events, "alarm")
    (telemetry,) = only(events, "telemetry")
    assert (telemetry.quality, telemetry.value, telemetry.code) == ("bad", None, "comms_fault")
    assert core.device_state("g1")["value"] is None
    # The detector's own alarm flag still raises the alarm, carrying no value.
    events = core.reading("g1", reading(30.0, "comms_fault", "high_alarm"), T0 + 1)
    (alarm,) = only(events, "alarm", "raised")
    assert (alarm.level, alarm.value, alarm.code) == ("high", None, "high_alarm")
    # A good reading's value goes everywhere.
    core = make_core()
    (alarm,) = only(core.reading("g1", reading(30.0), T0), "alarm", "raised")
    assert alarm.value == 30.0 and core.device_state("g1")["value"] == 30.0


def test_the_degraded_clear_share_must_be_below_the_raise_share(tmp_path: Path) -> None:
    spec = build_site(bus_port="/dev/ttyUSB0", db_path=tmp_path / "e.db", broker_port=1883,
                      socket_path=tmp_path / "c.sock", households=1)
    path = tmp_path / "site.toml"
    assert "[alarm]\n" in spec.toml
    path.write_text(spec.toml.replace("[alarm]\n", "[alarm]\ndegraded_percent = 10.0\ndegraded_clear_percent = 10.0\n"),
                    encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "alarm.degraded_clear_percent"
    assert "below degraded_percent" in info.value.reason


# ------------------------------------------------------------------------------------------- on the bus

#: Polls of the flaky detector: 10 minutes at one poll a second, at the test's 0.1 s cycle about a minute.
FLAKY_POLLS = 600


@pytest.mark.slow
@pytest.mark.timeout(480)
async def test_a_detector_failing_half_its_polls_beside_a_healthy_one(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    """pymodbus's server leaves half the flaky detector's answers unsent, at random, for 600 of its polls: its
    offline fault is raised and cleared at most once, comms_degraded raised once; the healthy detector on the
    same bus raises each of its alarms within one poll cycle. Healthy again, comms_degraded clears."""
    heartbeats = CountingHeartbeats()
    db = tmp_path / "events.db"
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port)
        healthy_sim = sim.add_gas_detector(1, "A", unit="%LEL", decimals=1)
        flaky_sim = sim.add_gas_detector(2, "A", unit="%LEL", decimals=1)
        for s in (healthy_sim, flaky_sim):
            s.set_status("normal")
        sim.flaky(2, 0.5, seed=32)
        with sim:
            spec = build_site(bus_port=line.gateway_port, db_path=db, broker_port=broker.port,
                              socket_path=tmp_path / "control.sock", households=2, timeout_s=0.05,
                              poll_interval_s=0.1)
            cfg = load_config(spec.write(tmp_path / "site.toml"))
            healthy, flaky = (d.id for d in spec.detectors)
            async with running_gateway(cfg, heartbeats=heartbeats) as gateway:
                poller = gateway.buses["bus1"]

                def state(device: str) -> dict[str, Any]:
                    return next(d for d in gateway.panel.snapshot()["devices"] if d["device"] == device)

                cycles: list[int] = []
                while poller.polls < 2 * FLAKY_POLLS:  # two detectors a cycle
                    changed = time.monotonic()
                    healthy_sim.set_concentration(30.0)
                    raised = await eventually(lambda c=changed: [m for m in _alarm_monos(db, healthy) if m >= c],
                                              timeout=30, message="the healthy detector's alarm")
                    cycles.append(heartbeats.count("bus:bus1", after=changed, before=raised[0]))
                    healthy_sim.set_concentration(0.0)
                    await eventually(lambda: not state(healthy)["condition_present"], timeout=30)
                    gateway.panel.reset(healthy, "test")
                    await asyncio.sleep(3.0)
                await eventually(lambda: len(_faults(db, flaky)) >= 1, timeout=30)
                flaky_phase = _faults(db, flaky)
                dropped = sim.dropped(2)
                sim.flaky(2, 0.0)
                await eventually(lambda: "comms_degraded" not in state(flaky)["faults"], timeout=120,
                                 message=lambda: str(state(flaky)))
                await eventually(lambda: ("comms_degraded", "cleared") in _faults(db, flaky), timeout=30)
                recovered = _faults(db, flaky)[len(flaky_phase):]
    assert dropped >= FLAKY_POLLS // 3, dropped
    offline = [a for c, a in flaky_phase if c == "offline"]
    assert offline in ([], ["raised"], ["raised", "cleared"]), flaky_phase
    assert [a for c, a in flaky_phase if c == "comms_degraded"] == ["raised"], flaky_phase
    assert ("offline", "raised") not in recovered, recovered
    assert len(cycles) >= 5 and max(cycles) <= 1, cycles


def _alarm_monos(db: Path, device: str) -> list[float]:
    rows = read_events(db, "kind = 'alarm' AND action = 'raised' AND device = ?", (device,))
    return [float(r["mono"]) for r in rows]


def _faults(db: Path, device: str) -> list[tuple[str, str]]:
    return [(r["body"]["code"], r["action"]) for r in read_events(db, "kind = 'fault' AND device = ?", (device,))]
