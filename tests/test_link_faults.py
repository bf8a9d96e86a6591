"""Faults of a device's link in the pure alarm core: ``offline`` that does not flap and ``comms_degraded``
(docs/alarms.md, "Communication faults"), and the one rule on when a reading's value is trusted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.config import DEFAULT_THRESHOLDS, ConfigError, load_config
from gateway.events import Event
from gateway.panel.core import AlarmCore, Sound
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
