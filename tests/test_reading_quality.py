"""Readings carry their quality, and alarms raised by a detector's own flag say so (docs/mqtt.md, Reading quality).

The alarm core decides (pure, time passed in); the outbox stores what it made and the schema must accept it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivers.profiles import PROFILE_A, GasReading
from gateway.config import DEFAULT_THRESHOLDS, AlarmSettings, DeviceConfig
from gateway.events import Event
from gateway.panel.core import AlarmCore
from gateway.uplink.contract import device_state, validator
from gateway.uplink.outbox import Outbox

T0 = 1000.0


def detector() -> DeviceConfig:
    low, high, hyst = DEFAULT_THRESHOLDS["%LEL"]
    return DeviceConfig(id="g1", kind="gas_detector", name="g1", unit="u1", household="h1", bus="b1", address=1,
                        detector_profile=PROFILE_A, gas="CH4", measure="%LEL", low=low, high=high, hysteresis=hyst)


def core() -> AlarmCore:
    return AlarmCore((detector(),), AlarmSettings(), ())


def reading(value: float, *status: str, measure: str = "%LEL") -> GasReading:
    return GasReading(value=value, measure=measure, status=frozenset(status or ("normal",)))


def telemetry(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind == "telemetry"]


@pytest.mark.parametrize(("status", "measure", "quality", "code", "value"), [
    (("normal",), "%LEL", "good", None, 4.0),
    (("sensor_fault",), "%LEL", "bad", "sensor_fault", None),
    (("data_error",), "%LEL", "bad", "data_error", None),
    (("normal",), "ppm", "bad", "unit_mismatch", None),
    (("needs_calibration",), "%LEL", "uncertain", "needs_calibration", 4.0),
])
def test_every_reading_says_how_far_it_can_be_trusted(
    status: tuple[str, ...], measure: str, quality: str, code: str | None, value: float | None
) -> None:
    c = core()
    [event] = telemetry(c.reading("g1", reading(4.0, *status, measure=measure), T0))
    assert (event.quality, event.code, event.value) == (quality, code, value)


def test_an_over_range_reading_is_uncertain_and_still_raises_the_high_alarm() -> None:
    c = core()
    events = c.reading("g1", reading(100.0, "over_range"), T0)
    [reading_event] = telemetry(events)
    assert (reading_event.quality, reading_event.code, reading_event.value) == ("uncertain", "over_range", 100.0)
    [alarm] = [e for e in events if e.kind == "alarm"]
    assert alarm.level == "high" and alarm.value == 100.0, "the concentration itself is past the high level"


def test_a_change_of_quality_is_published_at_once_and_a_bad_value_never() -> None:
    c = core()
    assert telemetry(c.reading("g1", reading(4.0), T0))[0].quality == "good"
    assert telemetry(c.reading("g1", reading(4.1), T0 + 1)) == [], "within the deadband"
    [bad] = telemetry(c.reading("g1", reading(40.0, "sensor_fault"), T0 + 2))
    assert bad.quality == "bad" and bad.value is None
    assert telemetry(c.reading("g1", reading(47.0, "sensor_fault"), T0 + 3)) == [], "a bad value is no change"
    [good] = telemetry(c.reading("g1", reading(4.0), T0 + 4))
    assert (good.quality, good.value) == ("good", 4.0)
    snapshot = c.device_state("g1")
    assert snapshot["quality"] == "good"


def test_the_birth_withholds_a_bad_value() -> None:
    c = core()
    c.reading("g1", reading(40.0, "sensor_fault"), T0)
    published = device_state(c.device_state("g1"))
    assert published["quality"] == "bad" and published["value"] is None


@pytest.mark.parametrize(("status", "level"), [("high_alarm", "high"), ("low_alarm", "low")])
def test_an_alarm_from_the_detectors_own_flag_carries_no_concentration(status: str, level: str) -> None:
    c = core()
    events = c.reading("g1", reading(0.0, status), T0)
    [alarm] = [e for e in events if e.kind == "alarm"]
    assert (alarm.action, alarm.level, alarm.value, alarm.code) == ("raised", level, None, status)


def test_an_alarm_from_a_concentration_carries_it() -> None:
    c = core()
    [alarm] = [e for e in c.reading("g1", reading(35.0, "high_alarm"), T0) if e.kind == "alarm"]
    assert (alarm.level, alarm.value, alarm.code) == ("high", 35.0, None)


async def test_what_the_core_makes_is_stored_in_a_form_the_event_schema_accepts(tmp_path: Path) -> None:
    c = core()
    events = [*c.reading("g1", reading(4.0), T0), *c.reading("g1", reading(40.0, "sensor_fault", "high_alarm"),
                                                              T0 + 1)]
    events = [Event(**{**e.as_dict(), "wall": 1_800_000_000.0}) for e in events]
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="c1-b1",
                           identity={"community": "c1", "building": "b1"})
    try:
        await ob.append(events)
        rows = await ob.pending(limit=100)
    finally:
        await ob.close()
    kinds = set()
    for row in rows:
        body = {**json.loads(row.payload), "historical": False, "sent": "2027-01-15T08:00:00.000Z", "age_s": 0.1}
        errors = [e.message for e in validator("event").iter_errors(body)]
        assert not errors, (body, errors)
        kinds.add((body["kind"], body.get("quality"), "value" in body))
    assert {("telemetry", "good", True), ("telemetry", "bad", False), ("alarm", None, False)} <= kinds
