"""The pure alarm core: one example test per rule, then hypothesis property tests over random sequences."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from drivers.profiles import PROFILE_A, STATION_IO_4DI, GasReading, StationReading
from gateway.annunciation import Sound
from gateway.config import DEFAULT_THRESHOLDS, AlarmSettings, DeviceConfig, LinkageRule
from gateway.events import Event
from gateway.panel.core import TEST_SOUND_S, AlarmCore

T0 = 1000.0

# ------------------------------------------------------------------------------------------- site


def gas(did: str, household: str, unit: str, *, measure: str = "%LEL", bus: str = "b1", address: int = 1,
        **kw: Any) -> DeviceConfig:
    low, high, hyst = DEFAULT_THRESHOLDS[measure]
    return DeviceConfig(id=did, kind="gas_detector", name=did, unit=unit, household=household, bus=bus,
                        address=address, detector_profile=PROFILE_A, gas="CO" if measure == "ppm" else "CH4",
                        measure=measure, low=low, high=high, hysteresis=hyst, **kw)


def contact(did: str, kind: str, unit: str, household: str | None = None, **kw: Any) -> DeviceConfig:
    return DeviceConfig(id=did, kind=kind, name=did, unit=unit, household=household, pin=f"GPIO{len(did)}", **kw)


def station(did: str, unit: str, *, bus: str = "b1", address: int = 20, **kw: Any) -> DeviceConfig:
    return DeviceConfig(id=did, kind="extinguisher_station", name=did, unit=unit, household=None, bus=bus,
                        address=address, station_profile=STATION_IO_4DI, **kw)


DEVICES = (
    gas("g1", "h1", "u1", address=1),
    gas("g2", "h2", "u1", measure="ppm", address=2),
    gas("g3", "h3", "u2", bus="b2", address=1),
    contact("f1", "fire_contact", "u2", "h3"),
    contact("r1", "gas_relay", "u2", "h4"),
    contact("door", "cabinet_door", "u1", door_open_s=30.0),
    contact("pres", "extinguisher_presence", "u2"),
    contact("press", "pressure_switch", "u2"),
    contact("obst", "obstruction", "u2"),
    station("st1", "u1"),
)
GAS = ("g1", "g2", "g3")
MODBUS = ("g1", "g2", "g3", "st1")
CONTACTS = ("f1", "r1", "door", "pres", "press", "obst")
BUS_OF = {"g1": "b1", "g2": "b1", "st1": "b1", "g3": "b2"}
LINKAGE = (
    LinkageRule("gas_high", "unit:u1", "valve1"),
    LinkageRule("gas_high", "unit:u2", "valve2"),
    LinkageRule("gas_low", "household:h2", "fan2"),
    LinkageRule("fire", "building", "evac"),
    LinkageRule("any_alarm", "unit:u2", "light2"),
    LinkageRule("supervisory", "unit:u1", "sup1"),
    LinkageRule("fault", "building", "flt"),
)
SETTINGS = AlarmSettings()


def make_core(**settings: Any) -> AlarmCore:
    return AlarmCore(DEVICES, dataclasses.replace(SETTINGS, **settings), LINKAGE)


def reading(value: float, *status: str, measure: str | None = "%LEL") -> GasReading:
    return GasReading(value=value, measure=measure, status=frozenset(status or ("normal",)))


def ppm(value: float, *status: str) -> GasReading:
    return reading(value, *status, measure="ppm")


def only(events: list[Event], kind: str, action: str | None = None) -> list[Event]:
    return [e for e in events if e.kind == kind and (action is None or e.action == action)]


def one(events: list[Event], kind: str, action: str) -> Event:
    found = only(events, kind, action)
    assert len(found) == 1, f"expected one {kind}/{action} in {events}"
    return found[0]


def sound(core: AlarmCore, now: float = T0) -> Sound:
    return core.annunciation(now).sound


def latched(core: AlarmCore, device: str) -> object:
    return core.device_state(device)["latched"]


@pytest.fixture
def core() -> AlarmCore:
    return make_core()


# ------------------------------------------------------------------------------------------- gas levels


def test_low_level_raises_a_low_alarm_with_location(core: AlarmCore) -> None:
    assert not only(core.reading("g1", reading(9.9), T0), "alarm")
    event = one(core.reading("g1", reading(10.0), T0 + 1), "alarm", "raised")
    assert (event.level, event.device, event.unit, event.household, event.value, event.measure) == (
        "low", "g1", "u1", "h1", 10.0, "%LEL")
    assert sound(core) is Sound.GAS
    assert "alarm" in core.annunciation(T0).leds


def test_low_then_high_escalates(core: AlarmCore) -> None:
    one(core.reading("g1", reading(12.0), T0), "alarm", "raised")
    assert one(core.reading("g1", reading(25.0), T0 + 1), "alarm", "escalated").level == "high"
    assert latched(core, "g1") == "high"


def test_straight_to_high(core: AlarmCore) -> None:
    assert one(core.reading("g1", reading(30.0), T0), "alarm", "raised").level == "high"


def test_hysteresis_on_clearing(core: AlarmCore) -> None:
    core.reading("g1", reading(10.0), T0)
    assert not only(core.reading("g1", reading(8.5), T0 + 1), "alarm")  # inside the 2 %LEL band
    assert core.device_state("g1")["condition_present"]
    assert one(core.reading("g1", reading(8.0), T0 + 2), "alarm", "cleared").level == "low"
    assert not core.device_state("g1")["condition_present"]


def test_high_level_falls_back_only_below_the_band(core: AlarmCore) -> None:
    core.reading("g1", reading(25.0), T0)
    assert not only(core.reading("g1", reading(23.5), T0 + 1), "alarm")
    assert not only(core.reading("g1", reading(23.0), T0 + 2), "alarm")  # now a low condition, still latched high
    assert core.device_state("g1")["condition_present"]
    cleared = one(core.reading("g1", reading(7.9), T0 + 3), "alarm", "cleared")
    assert cleared.level == "high"
    assert "latched until reset" in (cleared.detail or "")


def test_co_detectors_use_ppm_defaults(core: AlarmCore) -> None:
    assert not only(core.reading("g2", ppm(49.0), T0), "alarm")
    assert one(core.reading("g2", ppm(50.0), T0 + 1), "alarm", "raised").measure == "ppm"
    assert one(core.reading("g2", ppm(150.0), T0 + 2), "alarm", "escalated").level == "high"


@pytest.mark.parametrize("flag", ["high_alarm", "over_range"])
def test_detector_high_flag_is_a_high_alarm_even_if_the_concentration_reads_low(core: AlarmCore, flag: str) -> None:
    assert one(core.reading("g1", reading(0.0, flag), T0), "alarm", "raised").level == "high"


@pytest.mark.parametrize("flag", ["low_alarm", "stel", "twa"])
def test_detector_low_flags_are_a_low_alarm(core: AlarmCore, flag: str) -> None:
    assert one(core.reading("g1", reading(0.0, flag), T0), "alarm", "raised").level == "low"


def test_pre_alarm_alone_is_not_an_alarm(core: AlarmCore) -> None:
    assert not only(core.reading("g1", reading(5.0, "pre_alarm"), T0), "alarm")


@pytest.mark.parametrize("status", ["sensor_fault", "data_error", "needs_calibration", "comms_fault"])
def test_faults_the_detector_reports_are_trouble_and_clear_by_themselves(core: AlarmCore, status: str) -> None:
    raised = one(core.reading("g1", reading(0.0, status), T0), "fault", "raised")
    assert (raised.code, raised.device) == (status, "g1")
    assert sound(core) is Sound.TROUBLE
    assert core.annunciation(T0).leds == {"fault"}
    assert one(core.reading("g1", reading(0.0), T0 + 1), "fault", "cleared").code == status
    assert sound(core) is Sound.QUIET


@pytest.mark.parametrize("status", ["sensor_fault", "data_error"])
def test_concentration_from_a_failed_sensor_is_ignored(core: AlarmCore, status: str) -> None:
    events = core.reading("g1", reading(80.0, status), T0)
    assert not only(events, "alarm")
    assert one(events, "fault", "raised").code == status


def test_a_failed_sensor_still_raising_its_alarm_flag_alarms(core: AlarmCore) -> None:
    events = core.reading("g1", reading(0.0, "sensor_fault", "high_alarm"), T0)
    assert one(events, "alarm", "raised").level == "high"
    assert one(events, "fault", "raised").code == "sensor_fault"
    assert sound(core) is Sound.GAS  # the alarm outranks the trouble


def test_a_sensor_failing_during_an_alarm_does_not_report_the_gas_as_cleared(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    events = core.reading("g1", reading(0.0, "sensor_fault"), T0 + 1)
    assert not only(events, "alarm")
    assert latched(core, "g1") == "high"


def test_a_detector_reporting_another_unit_is_a_fault_and_its_value_ignored(core: AlarmCore) -> None:
    events = core.reading("g1", reading(500.0, measure="ppm"), T0)
    assert one(events, "fault", "raised").code == "unit_mismatch"
    assert not only(events, "alarm")


# ------------------------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize("status", [(), ("high_alarm",), ("sensor_fault",), ("over_range", "data_error")])
def test_warmup_readings_neither_alarm_nor_fault(core: AlarmCore, status: tuple[str, ...]) -> None:
    assert core.reading("g1", reading(90.0, "warmup", *status), T0) == []
    assert core.device_state("g1")["state"] == "warmup"
    assert core.annunciation(T0).sound is Sound.QUIET
    assert one(core.reading("g1", reading(30.0), T0 + 1), "alarm", "raised").level == "high"


def test_a_warming_up_detector_has_answered_so_offline_clears(core: AlarmCore) -> None:
    for i in range(3):
        core.poll_failed("g1", "timeout", T0 + i)
    for i in range(2):
        assert not only(core.reading("g1", reading(0.0, "warmup"), T0 + 3 + i), "fault")
    assert one(core.reading("g1", reading(0.0, "warmup"), T0 + 5), "fault", "cleared").code == "offline"


def test_a_detector_restarting_into_warmup_keeps_its_latch_and_allows_a_reset(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    assert not only(core.reading("g1", reading(0.0, "warmup"), T0 + 1), "alarm")  # no "cleared": unknown
    assert latched(core, "g1") == "high"
    _, result = core.reset("g1", T0 + 2, "cli")
    assert result.reset == ("g1",)


# ------------------------------------------------------------------------------------------- latching and reset


def test_alarm_stays_latched_after_the_gas_clears(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    one(core.reading("g1", reading(0.0), T0 + 10), "alarm", "cleared")
    for t in range(20, 2000, 100):
        core.tick(T0 + t)
    assert latched(core, "g1") == "high"
    assert core.device_state("g1")["state"] == "high_alarm"
    assert sound(core, T0 + 2000) is Sound.GAS
    assert "valve1" in core.annunciation(T0).relays


def test_reset_clears_the_latch_and_records_its_source(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.reading("g1", reading(0.0), T0 + 10)
    events, result = core.reset("g1", T0 + 20, "mqtt")
    reset = one(events, "reset", "reset")
    assert (reset.device, reset.level, reset.source, reset.household) == ("g1", "high", "mqtt", "h1")
    assert result.reset == ("g1",) and result.still_active == ()
    assert latched(core, "g1") is None
    assert core.annunciation(T0 + 20) == core.annunciation(T0 + 20).__class__()
    assert one(events, "relay", "off").code == "valve1"


def test_reset_while_the_gas_is_still_present_is_refused_and_recorded(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.silence(T0 + 1, "cli")
    events, result = core.reset("g1", T0 + 2, "cli")
    refused = one(events, "reset", "refused")
    assert (refused.source, refused.level, refused.value) == ("cli", "high", 30.0)
    assert "still present" in (refused.detail or "")
    assert result.reset == () and result.still_active == ("g1",)
    assert latched(core, "g1") == "high"
    assert sound(core) is Sound.QUIET  # still silenced: the refusal does not re-sound
    core.reading("g1", reading(0.0), T0 + 3)
    assert core.reset("g1", T0 + 4, "cli")[1].reset == ("g1",)


def test_reset_all(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.reading("g3", reading(12.0), T0)
    core.contact("f1", True, T0)
    core.reading("g1", reading(0.0), T0 + 1)
    core.contact("f1", False, T0 + 1)
    events, result = core.reset(None, T0 + 2, "cli")
    assert set(result.reset) == {"g1", "f1"} and result.still_active == ("g3",)
    assert {e.device for e in only(events, "reset", "reset")} == {"g1", "f1"}
    assert one(events, "reset", "refused").device == "g3"
    assert [e.level for e in only(events, "reset", "reset") if e.device == "f1"] == ["fire"]


def test_reset_of_an_unknown_device_is_a_key_error(core: AlarmCore) -> None:
    with pytest.raises(KeyError):
        core.reset("nope", T0, "cli")
    with pytest.raises(KeyError):
        core.test("nope", T0, "cli")


def test_gas_returning_before_the_reset_sounds_again(core: AlarmCore) -> None:
    core.reading("g1", reading(12.0), T0)
    core.silence(T0 + 1, "cli")
    core.reading("g1", reading(0.0), T0 + 2)
    again = one(core.reading("g1", reading(12.0), T0 + 3), "alarm", "raised")
    assert "returned" in (again.detail or "")
    assert sound(core) is Sound.GAS


def test_gas_returning_lower_then_rising_again_sounds_at_each_step(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.reading("g1", reading(0.0), T0 + 1)
    again = one(core.reading("g1", reading(12.0), T0 + 2), "alarm", "raised")
    assert again.level == "low" and latched(core, "g1") == "high"
    core.silence(T0 + 3, "cli")
    assert one(core.reading("g1", reading(30.0), T0 + 4), "alarm", "escalated").level == "high"
    assert sound(core) is Sound.GAS
    assert core.annunciation(T0).relays == {"valve1"}


def test_a_clean_reading_after_an_unknown_spell_records_the_clearing(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    for i in range(3):
        core.poll_failed("g1", "timeout", T0 + 1 + i)
    core.silence(T0 + 5, "cli")
    assert one(core.reading("g1", reading(0.0), T0 + 6), "alarm", "cleared").level == "high"
    assert one(core.reading("g1", reading(30.0), T0 + 7), "alarm", "raised").detail == (
        "condition returned before reset")
    assert sound(core) is Sound.GAS


def test_an_offline_device_in_alarm_can_be_reset_and_alarms_again_if_still_in_gas(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    for i in range(3):
        core.poll_failed("g1", "timeout", T0 + 1 + i)
    assert core.reset("g1", T0 + 5, "cli")[1].reset == ("g1",)
    events = core.reading("g1", reading(30.0), T0 + 6)
    assert one(events, "alarm", "raised").level == "high"
    core.reading("g1", reading(30.0), T0 + 7)
    assert one(core.reading("g1", reading(30.0), T0 + 8), "fault", "cleared").code == "offline"


def test_a_flaky_link_does_not_repeat_a_latched_alarm(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    for i in range(3):
        core.poll_failed("g1", "timeout", T0 + 1 + i)
    assert not only(core.reading("g1", reading(30.0), T0 + 5), "alarm")


# ------------------------------------------------------------------------------------------- silence


def test_silence_mutes_the_sounder_but_the_leds_stay(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    events = core.silence(T0 + 1, "cli")
    assert one(events, "silence", "silenced").source == "cli"
    ann = core.annunciation(T0 + 1)
    assert ann.sound is Sound.QUIET and ann.leds == {"alarm"} and ann.relays == {"valve1"}
    assert core.device_state("g1")["silenced"] is True


def test_an_alarm_in_another_household_after_silence_sounds(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.silence(T0 + 1, "cli")
    core.reading("g3", reading(12.0), T0 + 2)
    assert sound(core) is Sound.GAS


def test_low_to_high_after_silence_sounds(core: AlarmCore) -> None:
    core.reading("g1", reading(12.0), T0)
    core.silence(T0 + 1, "cli")
    core.reading("g1", reading(30.0), T0 + 2)
    assert sound(core) is Sound.GAS


def test_a_fault_after_silence_sounds_the_trouble_chirp(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.silence(T0 + 1, "cli")
    core.port_state("b2", True, T0 + 2)
    assert sound(core) is Sound.TROUBLE


def test_a_fire_after_silence_sounds(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)
    core.silence(T0 + 1, "cli")
    core.contact("f1", True, T0 + 2)
    assert sound(core) is Sound.FIRE


# ------------------------------------------------------------------------------------------- faults


def test_offline_after_three_failed_polls(core: AlarmCore) -> None:
    assert core.poll_failed("g1", "timeout", T0) == []
    assert core.poll_failed("g1", "timeout", T0 + 1) == []
    fault = one(core.poll_failed("g1", "crc", T0 + 2), "fault", "raised")
    assert (fault.code, fault.device) == ("offline", "g1")
    assert "3 failed polls" in (fault.detail or "") and "crc" in (fault.detail or "")
    assert sound(core) is Sound.TROUBLE
    assert core.annunciation(T0).leds == {"fault"}
    assert core.device_state("g1")["state"] == "fault"


def test_offline_after_the_configured_number_of_failures() -> None:
    core = make_core(offline_after_failures=5)
    for i in range(4):
        assert core.poll_failed("g1", "timeout", T0 + i) == []
    one(core.poll_failed("g1", "timeout", T0 + 4), "fault", "raised")


def test_offline_never_later_than_the_ceiling_whatever_the_poll_interval(core: AlarmCore) -> None:
    core.poll_failed("g1", "timeout", T0)
    core.poll_failed("g1", "timeout", T0 + 60)
    assert not core.tick(T0 + 99.9)
    assert one(core.tick(T0 + 100), "fault", "raised").code == "offline"


def test_the_ceiling_also_counts_on_a_failed_poll(core: AlarmCore) -> None:
    core.poll_failed("g1", "timeout", T0)
    assert one(core.poll_failed("g1", "timeout", T0 + 100), "fault", "raised").code == "offline"


def test_offline_clears_after_three_good_polls_in_a_row(core: AlarmCore) -> None:
    for i in range(3):
        core.poll_failed("st1", "timeout", T0 + i)
    for i in range(2):
        assert core.station("st1", StationReading(presence=True), T0 + 3 + i) == []
        assert core.device_state("st1")["state"] == "fault"
    assert one(core.station("st1", StationReading(presence=True), T0 + 5), "fault", "cleared").code == "offline"
    assert sound(core) is Sound.QUIET


def test_a_flaky_device_keeps_its_offline_fault_instead_of_flapping(core: AlarmCore) -> None:
    """A device that answers every other poll raises offline once and never clears it."""
    events: list[Event] = []
    for i in range(3):
        events += core.poll_failed("g1", "timeout", T0 + i)
    for i in range(3, 60, 2):
        events += core.reading("g1", reading(0.0), T0 + i)
        events += core.poll_failed("g1", "crc_error", T0 + i + 1)
        events += core.reading("g1", reading(0.0), T0 + i + 1.5)
        events += core.poll_failed("g1", "timeout", T0 + i + 1.8)
    assert [(e.action, e.code) for e in only(events, "fault")] == [("raised", "offline")]
    assert "offline" in core.device_state("g1")["faults"]  # type: ignore[operator]


def test_the_offline_hold_off_is_configurable() -> None:
    core = make_core(offline_clear_polls=1)
    for i in range(3):
        core.poll_failed("g1", "timeout", T0 + i)
    assert one(core.reading("g1", reading(0.0), T0 + 3), "fault", "cleared").code == "offline"


def test_failed_polls_are_counted_by_kind(core: AlarmCore) -> None:
    for i, kind in enumerate(["timeout", "crc_error", "timeout", "exception:illegal_data_address"]):
        core.poll_failed("g1", kind, T0 + i)
    state = core.device_state("g1")
    assert state["comm_errors"] == 4
    assert state["errors_by_kind"] == {"crc_error": 1, "exception:illegal_data_address": 1, "timeout": 2}


def test_an_answer_restarts_the_failure_count(core: AlarmCore) -> None:
    core.poll_failed("g1", "timeout", T0)
    core.poll_failed("g1", "timeout", T0 + 1)
    core.reading("g1", reading(0.0), T0 + 2)
    core.poll_failed("g1", "timeout", T0 + 3)
    core.poll_failed("g1", "timeout", T0 + 4)
    assert "offline" not in core.device_state("g1")["faults"]  # type: ignore[operator]
    assert not core.tick(T0 + 90)


def test_port_lost_and_back(core: AlarmCore) -> None:
    fault = one(core.port_state("b1", True, T0, "b1: cannot open"), "fault", "raised")
    assert (fault.code, fault.detail) == ("port_lost", "b1: cannot open")
    assert core.port_state("b1", True, T0 + 1) == []
    assert sound(core) is Sound.TROUBLE
    assert one(core.port_state("b1", False, T0 + 2), "fault", "cleared").code == "port_lost"
    assert sound(core) is Sound.QUIET


def test_gateway_fault_is_trouble_until_cleared(core: AlarmCore) -> None:
    fault = one(core.gateway_fault("storage_full", True, T0, "disk full"), "fault", "raised")
    assert (fault.code, fault.detail, fault.device) == ("storage_full", "disk full", None)
    assert core.gateway_fault("storage_full", True, T0 + 1) == []
    assert sound(core) is Sound.TROUBLE
    assert "fault" in core.annunciation(T0).leds
    assert one(core.gateway_fault("storage_full", False, T0 + 2), "fault", "cleared").code == "storage_full"
    assert sound(core) is Sound.QUIET


def test_an_alarm_from_a_healthy_device_during_a_port_fault_is_handled_like_any_alarm(core: AlarmCore) -> None:
    core.port_state("b1", True, T0)
    for i in range(3):
        for device in ("g1", "g2", "st1"):
            core.poll_failed(device, "port", T0 + i)
    assert sound(core) is Sound.TROUBLE
    events = core.reading("g3", reading(30.0), T0 + 4)
    assert one(events, "alarm", "raised").device == "g3"
    assert sound(core) is Sound.GAS
    assert core.annunciation(T0).relays >= {"valve2", "light2", "flt"}


def test_an_implausible_contact_is_a_fault_until_plausible(core: AlarmCore) -> None:
    fault = one(core.contact_fault("pres", True, T0, "both lines high"), "fault", "raised")
    assert (fault.code, fault.detail) == ("contact_unplausible", "both lines high")
    assert one(core.contact_fault("pres", False, T0 + 1), "fault", "cleared").code == "contact_unplausible"


# ------------------------------------------------------------------------------------------- supervisory


@pytest.mark.parametrize(("field", "value", "code"), [
    ("presence", False, "removed"), ("pressure_ok", False, "pressure"), ("obstructed", True, "obstructed"),
])
def test_station_supervisory_signals(core: AlarmCore, field: str, value: bool, code: str) -> None:
    raised = one(core.station("st1", StationReading(**{field: value}), T0), "supervisory", "raised")
    assert (raised.code, raised.unit, raised.household) == (code, "u1", None)
    ann = core.annunciation(T0)
    assert ann.sound is Sound.SUPERVISORY and ann.leds == {"supervisory"} and ann.relays == {"sup1"}
    assert core.device_state("st1")["state"] == "supervisory"
    assert one(core.station("st1", StationReading(**{field: not value}), T0 + 1), "supervisory", "cleared").code == code
    assert sound(core) is Sound.QUIET


def test_station_door_open_only_after_the_default_time(core: AlarmCore) -> None:
    assert SETTINGS.door_open_s == 120.0
    assert not core.station("st1", StationReading(door_open=True), T0)
    assert not core.station("st1", StationReading(door_open=True), T0 + 60)
    assert not core.tick(T0 + 119)
    assert one(core.tick(T0 + 120), "supervisory", "raised").code == "door_open"
    assert one(core.station("st1", StationReading(door_open=False), T0 + 130), "supervisory", "cleared").code == (
        "door_open")


def test_door_closed_in_time_raises_nothing(core: AlarmCore) -> None:
    core.station("st1", StationReading(door_open=True), T0)
    core.station("st1", StationReading(door_open=False), T0 + 100)
    assert not core.tick(T0 + 500)


def test_cabinet_door_contact_uses_its_own_door_open_time(core: AlarmCore) -> None:
    core.contact("door", True, T0)
    assert not core.tick(T0 + 29)
    assert one(core.tick(T0 + 30), "supervisory", "raised").code == "door_open"
    assert one(core.contact("door", False, T0 + 31), "supervisory", "cleared").code == "door_open"


def test_door_open_time_zero_raises_at_once() -> None:
    core = make_core(door_open_s=0.0)
    assert not core.station("st1", StationReading(door_open=False), T0)
    assert one(core.station("st1", StationReading(door_open=True), T0), "supervisory", "raised").code == "door_open"


@pytest.mark.parametrize(("device", "code"), [("pres", "removed"), ("press", "pressure"), ("obst", "obstructed")])
def test_supervisory_contacts(core: AlarmCore, device: str, code: str) -> None:
    assert one(core.contact(device, True, T0), "supervisory", "raised").code == code
    assert sound(core) is Sound.SUPERVISORY
    assert "alarm" not in core.annunciation(T0).leds
    assert one(core.contact(device, False, T0 + 1), "supervisory", "cleared").code == code


def test_supervisory_signals_do_not_latch(core: AlarmCore) -> None:
    core.contact("pres", True, T0)
    core.contact("pres", False, T0 + 1)
    assert core.active() == []


def test_priority_fire_gas_supervisory_test_trouble(core: AlarmCore) -> None:
    core.port_state("b1", True, T0)
    assert sound(core, T0) is Sound.TROUBLE
    core.test("g2", T0, "cli")
    assert sound(core, T0) is Sound.TEST
    core.contact("pres", True, T0)
    assert sound(core, T0) is Sound.SUPERVISORY
    core.reading("g3", reading(30.0), T0)
    assert sound(core, T0) is Sound.GAS
    core.contact("f1", True, T0)
    assert sound(core, T0) is Sound.FIRE
    assert core.annunciation(T0).leds == {"alarm", "supervisory", "fault"}


# ------------------------------------------------------------------------------------------- relay linkage


def test_high_alarm_closes_its_units_valve_only_until_reset(core: AlarmCore) -> None:
    events = core.reading("g1", reading(30.0), T0)
    relay = one(events, "relay", "on")
    assert relay.code == "valve1" and "gas_high in unit:u1" in (relay.detail or "")
    assert core.annunciation(T0).relays == {"valve1"}
    assert not only(core.reading("g1", reading(0.0), T0 + 1), "relay")  # follows the latch, not the gas
    core.silence(T0 + 2, "cli")
    assert core.annunciation(T0).relays == {"valve1"}  # silence does not open the valve
    events, _ = core.reset("g1", T0 + 3, "cli")
    assert one(events, "relay", "off").code == "valve1"


def test_low_alarm_does_not_trigger_a_high_rule_until_it_escalates(core: AlarmCore) -> None:
    core.reading("g3", reading(12.0), T0)
    assert core.annunciation(T0).relays == {"light2"}
    assert one(core.reading("g3", reading(30.0), T0 + 1), "relay", "on").code == "valve2"


def test_household_scoped_rule(core: AlarmCore) -> None:
    core.reading("g1", reading(12.0), T0)
    assert "fan2" not in core.annunciation(T0).relays
    core.reading("g2", ppm(60.0), T0)
    assert "fan2" in core.annunciation(T0).relays


def test_fire_any_alarm_and_fault_rules(core: AlarmCore) -> None:
    events = core.contact("f1", True, T0)
    assert {e.code for e in only(events, "relay", "on")} == {"evac", "light2"}
    assert "valve2" not in core.annunciation(T0).relays  # a fire is not a gas alarm
    core.port_state("b2", True, T0)
    assert "flt" in core.annunciation(T0).relays
    core.port_state("b2", False, T0)
    assert "flt" not in core.annunciation(T0).relays


def test_gas_relay_contact_is_a_high_alarm(core: AlarmCore) -> None:
    events = core.contact("r1", True, T0)
    assert one(events, "alarm", "raised").level == "high"
    assert {e.code for e in only(events, "relay", "on")} == {"valve2", "light2"}


# ------------------------------------------------------------------------------------------- walk test


def test_walk_test_records_detection_as_a_test_never_an_alarm(core: AlarmCore) -> None:
    started = one(core.test("g1", T0, "cli")[0], "test", "started")
    assert (started.device, started.source) == ("g1", "cli")
    assert sound(core, T0) is Sound.TEST
    assert sound(core, T0 + TEST_SOUND_S) is Sound.QUIET
    events = core.reading("g1", reading(30.0), T0 + 10)
    detected = one(events, "test", "detected")
    assert (detected.level, detected.value, detected.household) == ("high", 30.0, "h1")
    assert not only(events, "alarm") and not only(events, "relay")
    assert latched(core, "g1") is None
    assert core.device_state("g1")["state"] == "test"
    ann = core.annunciation(T0 + 10)
    assert ann.sound is Sound.TEST and ann.relays == frozenset() and "alarm" not in ann.leds
    core.reading("g1", reading(0.0), T0 + 20)
    assert one(core.tick(T0 + SETTINGS.walk_test_s), "test", "ended").device == "g1"
    assert core.device_state("g1")["state"] == "normal"


def test_walk_test_ends_by_reset(core: AlarmCore) -> None:
    core.test("g1", T0, "cli")
    ended = one(core.reset("g1", T0 + 1, "mqtt")[0], "test", "ended")
    assert ended.source == "mqtt"
    assert one(core.reading("g1", reading(30.0), T0 + 2), "alarm", "raised")


def test_walk_test_time_is_configurable() -> None:
    core = make_core(walk_test_s=60.0)
    core.test("g1", T0, "cli")
    assert not only(core.tick(T0 + 59), "test")
    one(core.tick(T0 + 60), "test", "ended")


def test_a_real_alarm_elsewhere_during_a_walk_test_is_an_alarm(core: AlarmCore) -> None:
    core.test("g1", T0, "cli")
    assert one(core.reading("g3", reading(30.0), T0 + 1), "alarm", "raised").device == "g3"
    assert sound(core, T0 + 1) is Sound.GAS


def test_gas_still_present_when_the_test_ends_is_a_real_alarm(core: AlarmCore) -> None:
    core.test("g1", T0, "cli")
    core.reading("g1", reading(30.0), T0 + 1)
    events = core.tick(T0 + SETTINGS.walk_test_s)
    one(events, "test", "ended")
    assert one(events, "alarm", "raised").level == "high"


def test_silence_ends_the_test_sound(core: AlarmCore) -> None:
    core.test(None, T0, "cli")
    core.silence(T0 + 0.5, "cli")
    assert sound(core, T0 + 0.5) is Sound.QUIET


def test_walk_test_of_a_supervisory_contact(core: AlarmCore) -> None:
    core.test("pres", T0, "cli")
    events = core.contact("pres", True, T0 + 1)
    assert one(events, "test", "detected").code == "removed"
    assert not only(events, "supervisory") and not only(events, "relay")
    core.contact("pres", False, T0 + 2)
    assert not only(core.tick(T0 + SETTINGS.walk_test_s), "supervisory")


def test_walk_test_skips_devices_in_alarm_supervisory_or_fault_and_says_why(core: AlarmCore) -> None:
    core.reading("g1", reading(30.0), T0)  # a latched, present gas alarm
    core.contact("pres", True, T0)  # an extinguisher taken away
    for i in range(SETTINGS.offline_after_failures):
        core.poll_failed("g2", "timeout", T0 + i)
    core.reading("g3", reading(30.0), T0)
    core.reading("g3", reading(0.0), T0 + 1)  # cleared, still latched
    events, result = core.test(None, T0 + 5, "cli")
    skipped = dict(result.skipped)
    assert set(skipped) == {"g1", "g2", "g3", "pres"}
    assert skipped["g1"] == "high alarm latched (condition present)"
    assert skipped["g3"] == "high alarm latched (condition cleared, reset it first)"
    assert skipped["g2"] == "fault: offline"
    assert skipped["pres"] == "supervisory signal: removed"
    assert set(result.started) == {d.id for d in DEVICES} - set(skipped)
    assert {e.device for e in only(events, "test", "started")} == set(result.started)
    for device, state in (("g1", "high_alarm"), ("g2", "fault"), ("g3", "high_alarm"), ("pres", "supervisory")):
        assert core.device_state(device)["state"] == state, "the signal stays visible"
    # the alarm still counts for real: a reset is refused while the gas is there
    assert core.reset("g1", T0 + 6, "cli")[1].still_active == ("g1",)


def test_walk_test_of_one_signalling_device_starts_nothing(core: AlarmCore) -> None:
    core.contact("f1", True, T0)
    events, result = core.test("f1", T0 + 1, "cli")
    assert events == [] and result.started == ()
    assert result.skipped == (("f1", "fire alarm latched (condition present)"),)
    assert sound(core, T0 + 1) is Sound.FIRE


def test_reset_reports_the_walk_tests_it_ended(core: AlarmCore) -> None:
    core.test("g1", T0, "cli")
    core.test("g2", T0, "cli")
    events, result = core.reset(None, T0 + 1, "cli")
    assert set(result.tests_ended) == {"g1", "g2"}
    assert result.reset == () and result.still_active == ()
    assert {e.device for e in only(events, "test", "ended")} == {"g1", "g2"}
    assert core.reset(None, T0 + 2, "cli")[1].tests_ended == ()


def test_polling_paused_is_a_trouble_signal_until_resumed(core: AlarmCore) -> None:
    paused = one(core.polling_paused("b1", True, T0, "cli:uid=0", "scan"), "system", "paused")
    assert (paused.code, paused.source, paused.detail) == ("polling_paused", "cli:uid=0", "scan")
    assert sound(core) is Sound.TROUBLE and core.annunciation(T0).leds == {"fault"}
    assert core.paused_buses() == ["b1"]
    assert "flt" in core.annunciation(T0).relays  # a fault-linked output follows it like any trouble
    assert core.polling_paused("b1", True, T0 + 1) == []  # once
    core.reading("g1", reading(30.0), T0 + 2)
    assert sound(core, T0 + 2) is Sound.GAS  # an alarm still wins
    resumed = one(core.polling_paused("b1", False, T0 + 3, "cli:uid=0"), "system", "resumed")
    assert resumed.code == "polling_resumed"
    assert core.paused_buses() == [] and "fault" not in core.annunciation(T0 + 3).leds
    assert core.polling_paused("b1", False, T0 + 4) == []


# ------------------------------------------------------------------------------------------- properties

LEVEL_RANK = {"low": 1, "high": 2, "fire": 2}
STATUSES = ("warmup", "normal", "sensor_fault", "data_error", "needs_calibration", "comms_fault", "pre_alarm",
            "low_alarm", "high_alarm", "over_range", "stel")
VALUES = st.one_of(
    st.sampled_from([0.0, 5.0, 7.9, 8.0, 8.5, 10.0, 12.0, 22.9, 23.5, 25.0, 40.0, 49.0, 50.0, 140.0, 150.0, 400.0]),
    st.floats(0.0, 300.0, allow_nan=False),
)


class AlarmModel(RuleBasedStateMachine):
    """Random sequences of inputs against the core, checked against a model built from the event stream."""

    def __init__(self) -> None:
        super().__init__()
        self.core = make_core()
        self.now = T0
        self.cfg = {d.id: d for d in DEVICES}
        # Model of the active signals, built only from the events the core emitted.
        self.alarms: dict[str, tuple[str, bool]] = {}  # device → (level, silenced)
        self.faults: dict[tuple[str, str], bool] = {}  # (subject, code) → silenced
        self.supervisory: dict[tuple[str, str], bool] = {}
        self.in_test: set[str] = set()
        self.test_sound_until = float("-inf")
        self.relays: set[str] = set()
        # Inputs, to check the rules against.
        self.failures = dict.fromkeys(MODBUS, 0)
        self.first_failure: dict[str, float | None] = dict.fromkeys(MODBUS, None)
        self.held = dict.fromkeys(MODBUS, False)  # offline was due and has not had its good polls since
        self.kinds: dict[tuple[str, str], int] = {}  # failed polls by device and kind
        self.good = dict.fromkeys(MODBUS, 0)

    # ------------------------------------------------------------------ bookkeeping

    def step(self, events: list[Event], *, reset: bool = False) -> list[Event]:
        before = {d: latched(self.core, d) for d in self.cfg}
        for e in events:
            assert e.mono == self.now
            self.observe(e)
        for device, level in before.items():
            after = latched(self.core, device)
            if level is not None and not reset:
                assert after is not None, f"{device} unlatched without a reset"
                assert LEVEL_RANK[str(after)] >= LEVEL_RANK[str(level)]
        if not reset:
            assert not only(events, "reset")
        for e in only(events, "alarm", "raised") + only(events, "alarm", "escalated"):
            assert self.core.annunciation(self.now).sound >= (Sound.FIRE if e.level == "fire" else Sound.GAS), (
                "an alarm raised after a silence must sound")
        return events

    def observe(self, e: Event) -> None:
        subject = e.device or str(e.detail).split(":")[0]
        if e.kind == "alarm" and e.action in ("raised", "escalated"):
            assert e.device not in self.in_test, "a device under test never raises a real alarm"
            assert e.level is not None and e.device is not None
            before = self.alarms.get(e.device, (e.level, False))[0]
            level = e.level if LEVEL_RANK[e.level] >= LEVEL_RANK[before] else before  # the latch only rises
            self.alarms[e.device] = (level, False)
        elif e.kind == "reset" and e.action == "reset":
            assert e.device is not None and e.source
            self.alarms.pop(e.device)
        elif e.kind == "fault":
            assert e.code is not None
            key = (e.device or f"bus:{subject}", e.code)
            if e.action == "raised":
                assert key not in self.faults
                self.faults[key] = False
            else:
                self.faults.pop(key)
        elif e.kind == "supervisory":
            assert e.device is not None and e.code is not None
            if e.action == "raised":
                self.supervisory[e.device, e.code] = False
            else:
                self.supervisory.pop((e.device, e.code))
        elif e.kind == "silence":
            self.alarms = {d: (lvl, True) for d, (lvl, _) in self.alarms.items()}
            self.faults = dict.fromkeys(self.faults, True)
            self.supervisory = dict.fromkeys(self.supervisory, True)
            self.test_sound_until = float("-inf")
        elif e.kind == "test":
            assert e.device is not None
            if e.action == "started":
                self.in_test.add(e.device)
            elif e.action == "ended":
                self.in_test.discard(e.device)
            if e.action in ("started", "detected"):
                self.test_sound_until = self.now + TEST_SOUND_S
        elif e.kind == "relay":
            assert e.code is not None
            if e.action == "on":
                assert e.code not in self.relays
                self.relays.add(e.code)
            else:
                self.relays.remove(e.code)

    def answered(self, device: str) -> None:
        self.failures[device] = 0
        self.first_failure[device] = None
        if self.held[device]:
            self.good[device] += 1
            if self.good[device] >= SETTINGS.offline_clear_polls:
                self.held[device] = False
                self.good[device] = 0

    def offline_due(self, device: str) -> bool:
        first = self.first_failure[device]
        return self.failures[device] >= SETTINGS.offline_after_failures or (
            first is not None and self.now - first >= SETTINGS.offline_ceiling_s)

    def hold(self) -> None:
        """Offline once due: by the ceiling always; by the count unless the device is comms_degraded (then a
        run of failures is that fault's, not offline)."""
        for device in MODBUS:
            first = self.first_failure[device]
            ceiling = first is not None and self.now - first >= SETTINGS.offline_ceiling_s
            if ceiling or (self.offline_due(device) and (device, "comms_degraded") not in self.faults):
                self.held[device] = True
                self.good[device] = 0

    # ------------------------------------------------------------------ rules

    @rule(device=st.sampled_from(GAS), value=VALUES,
          status=st.sets(st.sampled_from(STATUSES), max_size=3), wrong_unit=st.booleans())
    def read(self, device: str, value: float, status: set[str], wrong_unit: bool) -> None:
        measure = self.cfg[device].measure
        if wrong_unit:
            measure = "%VOL"
        was_testing = device in self.in_test
        events = self.step(self.core.reading(device, reading(value, *status, measure=measure), self.now))
        self.answered(device)
        if "warmup" in status:
            assert not [e for e in events if e.kind in ("alarm", "test", "supervisory")], "warm-up never alarms"
            assert not only(events, "fault", "raised"), "warm-up is not a fault"
            return
        if was_testing:
            assert not only(events, "alarm")
            return
        cfg = self.cfg[device]
        assert cfg.low is not None and cfg.high is not None
        trusted = not wrong_unit and not status & {"sensor_fault", "data_error", "comms_fault"}
        if status & {"high_alarm", "over_range"} or (trusted and value >= cfg.high):
            assert self.alarms[device][0] == "high"
        elif status & {"low_alarm", "stel"} or (trusted and value >= cfg.low):
            assert device in self.alarms
        for fault in status & {"sensor_fault", "data_error", "needs_calibration", "comms_fault"}:
            assert (device, fault) in self.faults

    @rule(device=st.sampled_from(MODBUS),
          kind=st.sampled_from(["timeout", "crc_error", "wrong_address", "exception:illegal_data_address"]))
    def fail(self, device: str, kind: str) -> None:
        self.step(self.core.poll_failed(device, kind, self.now))
        self.kinds[device, kind] = self.kinds.get((device, kind), 0) + 1
        self.failures[device] += 1
        self.good[device] = 0
        if self.first_failure[device] is None:
            self.first_failure[device] = self.now
        self.hold()

    @rule(presence=st.booleans(), pressure_ok=st.booleans(), door_open=st.booleans(), obstructed=st.booleans())
    def station_answers(self, presence: bool, pressure_ok: bool, door_open: bool, obstructed: bool) -> None:
        self.step(self.core.station("st1", StationReading(presence=presence, pressure_ok=pressure_ok,
                                                          door_open=door_open, obstructed=obstructed), self.now))
        self.answered("st1")
        if "st1" not in self.in_test:
            for code, present in (("removed", not presence), ("pressure", not pressure_ok),
                                  ("obstructed", obstructed)):
                assert (("st1", code) in self.supervisory) == present

    @rule(device=st.sampled_from(CONTACTS), active=st.booleans())
    def contact_changes(self, device: str, active: bool) -> None:
        self.step(self.core.contact(device, active, self.now))
        kind = self.cfg[device].kind
        if device not in self.in_test and kind in ("gas_relay", "fire_contact") and active:
            assert self.alarms[device][0] == ("fire" if kind == "fire_contact" else "high")

    @rule(device=st.sampled_from(CONTACTS), present=st.booleans())
    def contact_plausibility(self, device: str, present: bool) -> None:
        self.step(self.core.contact_fault(device, present, self.now))
        assert ((device, "contact_unplausible") in self.faults) == present

    @rule(bus=st.sampled_from(("b1", "b2")), lost=st.booleans())
    def port(self, bus: str, lost: bool) -> None:
        self.step(self.core.port_state(bus, lost, self.now, bus))
        assert ((f"bus:{bus}", "port_lost") in self.faults) == lost

    @rule()
    def silence(self) -> None:
        self.step(self.core.silence(self.now, "cli"))
        assert self.core.annunciation(self.now).sound is Sound.QUIET

    @rule(device=st.one_of(st.none(), st.sampled_from(tuple(d.id for d in DEVICES))))
    def reset(self, device: str | None) -> None:
        was_latched = {d for d in self.cfg if latched(self.core, d) is not None}
        events, result = self.core.reset(device, self.now, "mqtt")
        self.step(events, reset=True)
        targets = {device} if device else set(self.cfg)
        assert set(result.reset) <= was_latched & targets
        assert was_latched & targets <= set(result.reset) | set(result.still_active)
        for d in result.reset:
            assert latched(self.core, d) is None
        for d in result.still_active:
            assert latched(self.core, d) is not None and self.core.device_state(d)["condition_present"]
            assert any(e.device == d for e in only(events, "reset", "refused"))
        assert not (targets & self.in_test), "a reset ends the walk test"

    @rule(device=st.one_of(st.none(), st.sampled_from(GAS + CONTACTS)))
    def walk_test(self, device: str | None) -> None:
        events, result = self.core.test(device, self.now, "cli")
        self.step(events)
        targets = {device} if device else set(self.cfg)
        assert set(result.started) | {d for d, _ in result.skipped} == targets
        for d in targets:
            signalling = d in self.alarms or any(s == d for s, _ in self.supervisory) or any(
                s == d for s, _ in self.faults)
            assert (d in dict(result.skipped)) == signalling, "a walk test skips exactly the signalling devices"
        assert {e.device for e in only(events, "test", "started")} == set(result.started)

    @rule(dt=st.one_of(st.sampled_from([0.5, 1.0, 29.0, 30.0, 99.0, 100.0]), st.floats(0.0, 400.0)))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.step(self.core.tick(self.now))
        self.hold()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def annunciation_shows_the_highest_priority_unsilenced_signal(self) -> None:
        sounds = [Sound.QUIET]
        sounds += [Sound.FIRE if lvl == "fire" else Sound.GAS for lvl, muted in self.alarms.values() if not muted]
        sounds += [Sound.SUPERVISORY for muted in self.supervisory.values() if not muted]
        sounds += [Sound.TROUBLE for muted in self.faults.values() if not muted]
        if self.now < self.test_sound_until:
            sounds.append(Sound.TEST)
        ann = self.core.annunciation(self.now)
        assert ann.sound is max(sounds)
        leds = {"alarm"} if self.alarms else set()
        leds |= {"supervisory"} if self.supervisory else set()
        leds |= {"fault"} if self.faults else set()
        assert ann.leds == leds

    def in_scope(self, scope: str, subject: str) -> bool:
        kind, _, ref = scope.partition(":")
        if kind == "building":
            return True
        if subject.startswith("bus:"):
            return False
        cfg = self.cfg[subject]
        return (cfg.unit if kind == "unit" else cfg.household) == ref

    @invariant()
    def relays_follow_latched_alarms_in_scope(self) -> None:
        levels = {"gas_high": {"high"}, "gas_low": {"low", "high"}, "fire": {"fire"},
                  "any_alarm": {"low", "high", "fire"}}
        expected = set()
        for link in LINKAGE:
            if link.signal == "fault":
                hit = any(self.in_scope(link.scope, subject) for subject, _ in self.faults)
            elif link.signal == "supervisory":
                hit = any(self.in_scope(link.scope, device) for device, _ in self.supervisory)
            else:
                hit = any(self.in_scope(link.scope, device) and level in levels[link.signal]
                          for device, (level, _) in self.alarms.items())
            if hit:
                expected.add(link.output)
        assert self.core.annunciation(self.now).relays == expected
        assert self.relays == expected, "every relay change is an event"

    @invariant()
    def a_device_failing_is_offline_within_the_bound_until_enough_good_polls(self) -> None:
        for device in MODBUS:
            offline = (device, "offline") in self.faults
            degraded = (device, "comms_degraded") in self.faults
            expected = (self.offline_due(device) and not degraded) or self.held[device]
            assert offline == expected, (f"{device}: {self.failures[device]} failures since "
                                         f"{self.first_failure[device]}, {self.good[device]} good polls, "
                                         f"now {self.now}")

    @invariant()
    def failed_polls_are_counted_by_kind(self) -> None:
        for device in MODBUS:
            state = self.core.device_state(device)
            mine = {k: n for (d, k), n in self.kinds.items() if d == device}
            assert state["errors_by_kind"] == mine
            assert state["comm_errors"] == sum(mine.values())

    @invariant()
    def latched_alarms_match_the_event_log(self) -> None:
        for device in self.cfg:
            level = latched(self.core, device)
            if device in self.alarms:
                assert level is not None
            else:
                assert level is None

    @invariant()
    def walk_tests_end_in_time(self) -> None:
        assert {d for d in self.cfg if self.core.device_state(d)["test"]} == self.in_test


AlarmModel.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_alarm_properties = AlarmModel.TestCase


@settings(max_examples=300, deadline=None)
@given(device=st.sampled_from(MODBUS), gaps=st.lists(st.floats(0.1, 60.0), min_size=1, max_size=8),
       tick=st.floats(0.1, 1.0))
def test_a_device_failing_polls_at_any_interval_is_in_fault_within_the_bound(
    device: str, gaps: list[float], tick: float
) -> None:
    core = make_core()
    now = first = T0
    failures = 0
    offline = False

    def check(events: list[Event]) -> None:
        nonlocal offline
        offline = offline or bool(only(events, "fault", "raised"))
        due = failures >= SETTINGS.offline_after_failures or now - first >= SETTINGS.offline_ceiling_s
        assert offline == due, f"{failures} failures, {now - first:.1f} s after the first"

    for gap in [0.0, *gaps]:
        target = now + gap
        while now + tick < target:  # the ticker runs in between polls
            now += tick
            check(core.tick(now))
        now = target
        failures += 1
        check(core.poll_failed(device, "timeout", now))


@settings(max_examples=300, deadline=None)
@given(device=st.sampled_from(GAS),
       steps=st.lists(st.tuples(VALUES, st.sets(st.sampled_from(STATUSES), max_size=4)), max_size=20))
def test_warmup_never_alarms(device: str, steps: list[tuple[float, set[str]]]) -> None:
    core = make_core()
    measure = DEVICES[GAS.index(device)].measure
    for i, (value, status) in enumerate(steps):
        assert core.reading(device, reading(value, "warmup", *status, measure=measure), T0 + i) == []
    assert core.annunciation(T0 + len(steps)).sound is Sound.QUIET
    assert latched(core, device) is None
