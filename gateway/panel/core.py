"""The alarm core: readings, failed polls, contacts and operator actions in; events and what to show out.

Pure: no I/O, no threads, no clock reads — every method takes ``now`` (monotonic seconds). The
:class:`~gateway.panel.AlarmPanel` serialises calls from bus threads and GPIO callbacks and applies the
returned :class:`Annunciation` to the outputs.

Rules (docs/alarms.md gives each with its default and source):

- two gas levels per detector, with hysteresis on clearing; the detector's own status is folded in
  (its low/high alarm flags and over-range raise alarms whatever the concentration register says;
  sensor faults, data errors and a due calibration are faults);
- warm-up readings neither alarm nor fault;
- an alarm latches until a person resets it; a reset while the condition is still present is refused
  and recorded; a condition that cleared and came back is raised again;
- silence mutes only the signals active now: any alarm raised (or escalated) later sounds again;
- faults (offline after N failed polls or a time ceiling, reported faults, port lost, implausible
  contact) clear by themselves when the cause goes away; offline only after ``offline_clear_polls`` good
  polls in a row, so a flaky link does not raise and clear it at every other poll;
- a device failing many polls but not all is ``comms_degraded`` (more than ``degraded_percent`` of its last
  ``degraded_window_polls`` polls failed, or N failed in a row again within that many polls of its offline
  fault clearing), which clears only after a whole window with at most ``degraded_clear_percent`` failed;
  while it is degraded, offline is raised only by the time ceiling (no valid answer for 100 s), so a device
  failing half its polls raises offline at most once and clears it at most once;
- every failed poll is counted by its kind (timeout, CRC error, exception name, ...) per device;
- supervisory signals (extinguisher removed, pressure, cabinet door open too long, access obstructed);
- sounder priority FIRE > GAS > SUPERVISORY > TEST > TROUBLE;
- relays follow latched alarms (and supervisory/fault signals) within each linkage rule's scope;
- walk test: a device in test mode reports its detections as ``test``/``detected``, never as alarms; a
  device in alarm, supervisory or fault is never put in test mode (it would hide the signal);
- polling paused (an address scan) is a trouble signal while it lasts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

from drivers.profiles import GasReading, StationReading
from gateway.annunciation import Annunciation, Sound
from gateway.config import AlarmSettings, DeviceConfig, LinkageRule
from gateway.events import Event

__all__ = [
    "CONTACT_SUPERVISORY",
    "DEVICE_FAULTS",
    "TEST_SOUND_S",
    "AlarmCore",
    "Level",
    "ResetResult",
    "WalkTestResult",
]

#: Statuses a detector reports that are faults (trouble), not alarms.
DEVICE_FAULTS = ("sensor_fault", "data_error", "needs_calibration", "comms_fault")
#: Statuses that make a reading ``bad`` or ``uncertain`` (over range: the true value is higher; calibration
#: due), most telling first. docs/mqtt.md, "Reading quality". One rule for every output: the concentration of
#: a ``bad`` reading is not trusted — it decides no alarm level, and neither its alarm events nor its
#: telemetry carry it (the detector's own alarm flags still raise alarms, without a value).
BAD_READING = ("unit_mismatch", "sensor_fault", "data_error", "comms_fault")
UNCERTAIN_READING = ("over_range", "needs_calibration")
#: Detector statuses that are a level-2 (high) alarm whatever the concentration reads.
HIGH_FLAGS = frozenset({"high_alarm", "over_range"})
#: Detector statuses that are a level-1 (low) alarm; STEL/TWA are the exposure alarms of toxic-gas detectors.
LOW_FLAGS = frozenset({"low_alarm", "stel", "twa"})
#: How long the sounder plays the test pattern when a walk test starts or detects something.
TEST_SOUND_S = 3.0

#: Supervisory code raised by each supervisory contact kind.
CONTACT_SUPERVISORY = {
    "extinguisher_presence": "removed",
    "pressure_switch": "pressure",
    "cabinet_door": "door_open",
    "obstruction": "obstructed",
}


class Level(IntEnum):
    """Gas alarm level."""

    NONE = 0
    LOW = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class ResetResult:
    """What a reset did: latches cleared (``reset``), alarms still present (``still_active``: the condition
    is there, the latch stays) and walk tests ended (``tests_ended``)."""

    reset: tuple[str, ...]
    still_active: tuple[str, ...]
    tests_ended: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WalkTestResult:
    """Devices whose walk test started, and those skipped, each with why (a signal a test would hide)."""

    started: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _Condition:
    """One active signal: a latched alarm, a supervisory signal or a fault."""

    category: str  # alarm | supervisory | trouble
    sound: Sound
    unit: str | None
    household: str | None
    since: float
    level: Level = Level.NONE
    silenced: bool = False


@dataclass(slots=True)
class _LinkWindow:
    """A device's last polls (True = failed) outside offline spells, for the ``comms_degraded`` rule."""

    polls: deque[bool]
    failed: int = 0  # failed polls among them
    since_offline_cleared: int | None = None  # polls since the offline fault last cleared (None: not recently)
    since_degraded: int = 0  # polls since comms_degraded was raised

    def add(self, failed: bool) -> None:
        if len(self.polls) == self.polls.maxlen and self.polls[0]:
            self.failed -= 1
        self.polls.append(failed)
        self.failed += failed
        if self.since_offline_cleared is not None:
            self.since_offline_cleared += 1
        self.since_degraded += 1


@dataclass(slots=True)
class _DeviceState:
    cfg: DeviceConfig
    level: Level = Level.NONE  # the alarm condition now (with hysteresis); NONE while unknown
    latched: Level = Level.NONE  # highest level since the last reset
    announced: Level = Level.NONE  # highest level raised since the condition last cleared
    last_known: Level = Level.NONE  # the condition when last known (unknown spells do not change it)
    cleared: bool = False  # the latched alarm's condition has cleared (a return is raised again)
    failures: int = 0
    first_failure: float | None = None
    last_seen: float | None = None
    last_value: float | None = None
    warming_up: bool = False
    contact_active: bool = False
    door_open_since: float | None = None
    test_until: float | None = None
    telemetry_at: float | None = None
    telemetry_value: float | None = None
    quality: tuple[str, str | None] | None = None  # the last published reading's quality and why
    comm_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # comm_errors by what the line showed
    good_polls: int = 0  # answers in a row while offline (the fault clears after offline_clear_polls)
    link: _LinkWindow | None = None  # outcomes of the last polls, for comms_degraded (Modbus devices)
    faults: set[str] = field(default_factory=set)
    supervisory: set[str] = field(default_factory=set)  # supervisory conditions present now

    @property
    def fire(self) -> bool:
        return self.cfg.kind == "fire_contact"


class AlarmCore:
    """State of every device and every active condition of one building."""

    def __init__(
        self,
        devices: Iterable[DeviceConfig],
        settings: AlarmSettings | None = None,
        linkage: Iterable[LinkageRule] = (),
    ) -> None:
        self.settings = settings or AlarmSettings()
        self.linkage = tuple(linkage)
        self._devices = {d.id: _DeviceState(cfg=d) for d in devices}
        for st in self._devices.values():
            if st.cfg.is_modbus:
                st.link = _LinkWindow(deque(maxlen=self.settings.degraded_window_polls))
        self._conditions: dict[tuple[str, str], _Condition] = {}
        self._test_sound_until = float("-inf")
        self._relays: frozenset[str] = frozenset()

    # ------------------------------------------------------------------------------------ queries

    def device_ids(self) -> list[str]:
        """Every device, in config order."""
        return list(self._devices)

    def device_state(self, device_id: str) -> dict[str, object]:
        """A snapshot of one device for status displays."""
        st = self._devices[device_id]
        alarm = self._conditions.get((device_id, "alarm"))
        if st.test_until is not None:
            state = "test"
        elif alarm is not None:
            state = "fire" if alarm.sound is Sound.FIRE else f"{alarm.level.name.lower()}_alarm"
        elif st.supervisory:
            state = "supervisory"
        elif st.faults:
            state = "fault"
        elif st.warming_up:
            state = "warmup"
        elif st.last_seen is None and st.cfg.is_modbus:
            state = "unknown"
        else:
            state = "normal"
        return {
            "device": device_id,
            "kind": st.cfg.kind,
            "bus": st.cfg.bus,
            "unit": st.cfg.unit,
            "household": st.cfg.household,
            "state": state,
            "latched": st.latched.name.lower() if st.latched else None,
            "condition_present": st.level > Level.NONE,
            "silenced": alarm.silenced if alarm is not None else None,
            "value": st.last_value,
            "quality": st.quality[0] if st.quality else None,
            "measure": st.cfg.measure,
            "last_seen": st.last_seen,
            "faults": sorted(st.faults),
            "supervisory": sorted(st.supervisory),
            "test": st.test_until is not None,
            "comm_errors": st.comm_errors,
            "errors_by_kind": dict(sorted(st.errors_by_kind.items())),
            "failures": st.failures,
        }

    def active(self) -> list[dict[str, object]]:
        """Every active condition (alarms latched, supervisory, trouble)."""
        return [
            {"subject": subject, "what": what, "category": c.category, "since": c.since,
             "silenced": c.silenced, "level": c.level.name.lower() if c.level else None}
            for (subject, what), c in self._conditions.items()
        ]

    def annunciation(self, now: float) -> Annunciation:
        """What the outputs must show now: the highest-priority unsilenced signal wins the sounder.

        LEDs show every active condition, silenced or not; relays follow the linkage rules.
        """
        sound = Sound.QUIET
        leds: set[str] = set()
        for c in self._conditions.values():
            leds.add(_LED[c.category])
            if not c.silenced and c.sound > sound:
                sound = c.sound
        if now < self._test_sound_until and sound < Sound.TEST:
            sound = Sound.TEST
        return Annunciation(sound=sound, leds=frozenset(leds), relays=self._relays)

    # ------------------------------------------------------------------------------------ inputs

    def reading(self, device_id: str, reading: GasReading, now: float) -> list[Event]:
        """A detector answered a poll."""
        st = self._devices[device_id]
        events = self._answered(st, now)
        st.last_value = reading.value
        cfg = st.cfg
        if "warmup" in reading.status:
            # The detector is not ready: its reading says nothing about gas, and is neither alarm nor fault.
            st.warming_up = True
            self._alarm_level(st, Level.NONE, reading.value, now, events, known=False)
            return self._finish(events, now)
        st.warming_up = False
        reported = {s for s in reading.status if s in DEVICE_FAULTS}
        mismatch = reading.measure is not None and cfg.measure is not None and reading.measure != cfg.measure
        if mismatch:
            reported.add("unit_mismatch")
        self._set_faults(st, reported, (*DEVICE_FAULTS, "unit_mismatch"), now, events,
                         detail=f"detector reports {reading.measure}, configured {cfg.measure}" if mismatch else None)
        flagged = Level.NONE
        if reading.status & HIGH_FLAGS:
            flagged = Level.HIGH
        elif reading.status & LOW_FLAGS:
            flagged = Level.LOW
        status = reading.status | ({"unit_mismatch"} if mismatch else set())
        quality = _quality(status)
        trusted = quality[0] != "bad"
        if not trusted:
            st.last_value = None  # the status display follows the same rule
        measured = self._concentration_level(st, reading.value) if trusted else Level.NONE
        first = len(events)
        self._alarm_level(st, max(flagged, measured), reading.value if trusted else None, now, events,
                          known=trusted)
        if flagged > measured:  # the detector's own status flag set the level, not a concentration: say so
            flag = min(reading.status & (HIGH_FLAGS if flagged == Level.HIGH else LOW_FLAGS))
            events[first:] = [replace(e, value=None, code=flag) if e.kind in ("alarm", "test") else e
                              for e in events[first:]]
        self._telemetry(st, reading.value, reading.measure or cfg.measure, now, events, quality)
        return self._finish(events, now)

    def station(self, device_id: str, reading: StationReading, now: float) -> list[Event]:
        """An extinguisher station on a bus answered a poll."""
        st = self._devices[device_id]
        events = self._answered(st, now)
        st.last_value = reading.pressure
        present = set()
        if reading.presence is False:
            present.add("removed")
        if reading.pressure_ok is False:
            present.add("pressure")
        if reading.obstructed:
            present.add("obstructed")
        if reading.door_open:
            if st.door_open_since is None:
                st.door_open_since = now
            if now - st.door_open_since >= self._door_open_s(st):
                present.add("door_open")
        else:
            st.door_open_since = None
        self._set_supervisory(st, present, now, events, value=reading.pressure)
        return self._finish(events, now)

    def contact(self, device_id: str, active: bool, now: float) -> list[Event]:
        """A GPIO dry contact changed: ``active`` means away from its normal state."""
        st = self._devices[device_id]
        events: list[Event] = []
        st.contact_active = active
        st.last_seen = now
        kind = st.cfg.kind
        if kind in ("gas_relay", "fire_contact"):
            self._alarm_level(st, Level.HIGH if active else Level.NONE, None, now, events)
        elif kind == "cabinet_door":
            st.door_open_since = now if active else None
            limit = self._door_open_s(st)
            self._set_supervisory(st, {"door_open"} if active and limit <= 0 else set(), now, events)
        else:
            code = CONTACT_SUPERVISORY[kind]
            self._set_supervisory(st, {code} if active else set(), now, events)
        return self._finish(events, now)

    def contact_fault(self, device_id: str, present: bool, now: float, detail: str | None = None) -> list[Event]:
        """A supervised contact is implausible (both lines equal, stuck) — or plausible again."""
        st = self._devices[device_id]
        events: list[Event] = []
        self._set_faults(st, {"contact_unplausible"} if present else set(), ("contact_unplausible",), now, events,
                         detail=detail)
        return self._finish(events, now)

    def poll_failed(self, device_id: str, reason: str, now: float) -> list[Event]:
        """A poll got no valid answer; ``reason`` is its kind (``timeout``, ``crc_error``,
        ``exception:illegal_data_address``, ``port``, ...: :data:`drivers.modbus.FRAME_ERROR_KINDS`)."""
        st = self._devices[device_id]
        events: list[Event] = []
        st.failures += 1
        st.comm_errors += 1
        st.errors_by_kind[reason] = st.errors_by_kind.get(reason, 0) + 1
        st.good_polls = 0
        if st.first_failure is None:
            st.first_failure = now
        link = st.link
        if link is not None and "offline" not in st.faults:
            link.add(True)
        if "offline" not in st.faults:
            s = self.settings
            ceiling = now - st.first_failure >= s.offline_ceiling_s
            due = st.failures >= s.offline_after_failures
            degraded = "comms_degraded" in st.faults
            relapse = (link is not None and link.since_offline_cleared is not None
                       and link.since_offline_cleared <= s.degraded_window_polls)
            if ceiling or (due and not degraded and not relapse):
                self._go_offline(st, now, events, f"{st.failures} failed polls, last: {reason}")
            elif due and relapse and not degraded and link is not None:
                self._degrade(st, now, events, f"{st.failures} failed polls in a row again, "
                                               f"{link.since_offline_cleared} polls after the offline fault cleared")
            elif link is not None and not degraded and link.failed > s.degraded_window_polls * s.degraded_percent / 100:
                self._degrade(st, now, events, f"{link.failed} of the last {len(link.polls)} polls failed "
                                               f"(more than {s.degraded_percent:g} %), last: {reason}")
        return self._finish(events, now)

    def _degrade(self, st: _DeviceState, now: float, events: list[Event], detail: str) -> None:
        assert st.link is not None
        st.link.since_degraded = 0
        self._set_faults(st, st.faults | {"comms_degraded"}, ("comms_degraded",), now, events, detail=detail)

    def port_state(self, bus_id: str, lost: bool, now: float, detail: str | None = None) -> list[Event]:
        """A serial port disappeared (``lost``) or opened again."""
        events: list[Event] = []
        key = (f"bus:{bus_id}", "fault:port_lost")
        if lost and key not in self._conditions:
            self._conditions[key] = _Condition("trouble", Sound.TROUBLE, None, None, now)
            events.append(Event("fault", "raised", now, code="port_lost", detail=detail or bus_id))
        elif not lost and key in self._conditions:
            del self._conditions[key]
            events.append(Event("fault", "cleared", now, code="port_lost", detail=detail or bus_id))
        return self._finish(events, now)

    def stale_thread(self, name: str, stale: bool, now: float) -> list[Event]:
        """A watched part of the gateway (a bus thread, the annunciator) stopped beating, or beats again."""
        events: list[Event] = []
        key = (f"thread:{name}", "fault:stale_thread")
        if stale and key not in self._conditions:
            self._conditions[key] = _Condition("trouble", Sound.TROUBLE, None, None, now)
            events.append(Event("fault", "raised", now, code="stale_thread", detail=name))
        elif not stale and key in self._conditions:
            del self._conditions[key]
            events.append(Event("fault", "cleared", now, code="stale_thread", detail=name))
        return self._finish(events, now)

    def gateway_fault(self, code: str, present: bool, now: float, detail: str | None = None) -> list[Event]:
        """A fault of the gateway itself (e.g. ``storage_full``): trouble signal and fault LED while present."""
        events: list[Event] = []
        key = ("gateway", f"fault:{code}")
        if present and key not in self._conditions:
            self._conditions[key] = _Condition("trouble", Sound.TROUBLE, None, None, now)
            events.append(Event("fault", "raised", now, code=code, detail=detail))
        elif not present and key in self._conditions:
            del self._conditions[key]
            events.append(Event("fault", "cleared", now, code=code, detail=detail))
        return self._finish(events, now)

    def polling_paused(self, bus_id: str, paused: bool, now: float, source: str | None = None,
                       detail: str | None = None) -> list[Event]:
        """Polling of a bus paused (an address scan) or resumed. While paused nothing is read from its
        detectors: a trouble signal (trouble sound, fault LED) and a ``system``/``paused`` event; resuming
        clears it with ``system``/``resumed``."""
        events: list[Event] = []
        key = (f"bus:{bus_id}", "trouble:polling_paused")
        if paused and key not in self._conditions:
            self._conditions[key] = _Condition("trouble", Sound.TROUBLE, None, None, now)
            events.append(Event("system", "paused", now, code="polling_paused", source=source,
                                detail=detail or f"polling of {bus_id} paused"))
        elif not paused and key in self._conditions:
            del self._conditions[key]
            events.append(Event("system", "resumed", now, code="polling_resumed", source=source,
                                detail=detail or f"polling of {bus_id} resumed"))
        return self._finish(events, now)

    def paused_buses(self) -> list[str]:
        """Buses whose polling is paused now."""
        return sorted(subject.removeprefix("bus:") for subject, what in self._conditions
                      if what == "trouble:polling_paused")

    def tick(self, now: float) -> list[Event]:
        """Time passing: fault ceilings, cabinet doors left open, walk tests ending, the test sound ending."""
        events: list[Event] = []
        for st in self._devices.values():
            if (st.first_failure is not None and "offline" not in st.faults
                    and now - st.first_failure >= self.settings.offline_ceiling_s):
                self._go_offline(st, now, events, f"no answer for {now - st.first_failure:.0f} s")
            if (st.door_open_since is not None and "door_open" not in st.supervisory
                    and now - st.door_open_since >= self._door_open_s(st)):
                self._set_supervisory(st, st.supervisory | {"door_open"}, now, events)
            if st.test_until is not None and now >= st.test_until:
                self._end_test(st, now, events, source=None)
        return self._finish(events, now)

    def silence(self, now: float, source: str) -> list[Event]:
        """Mute the sounder for what is active now; anything raised later sounds again. LEDs stay."""
        muted = [c for c in self._conditions.values() if not c.silenced]
        for c in muted:
            c.silenced = True
        self._test_sound_until = float("-inf")
        return self._finish([Event("silence", "silenced", now, source=source, detail=f"{len(muted)} signals")], now)

    def reset(self, device_id: str | None, now: float, source: str) -> tuple[list[Event], ResetResult]:
        """Clear latched alarms (one device or all) whose condition has gone, and end walk tests.

        A latched alarm whose condition is still present stays latched; the refusal is recorded as a
        ``reset``/``refused`` event. Raises KeyError for an unknown device.
        """
        targets = self._targets(device_id)
        events: list[Event] = []
        done: list[str] = []
        still: list[str] = []
        ended: list[str] = []
        for st in targets:
            if st.test_until is not None:
                self._end_test(st, now, events, source=source)
                ended.append(st.cfg.id)
            key = (st.cfg.id, "alarm")
            if key not in self._conditions:
                continue
            latched = "fire" if st.fire else st.latched.name.lower()
            if st.level > Level.NONE:
                still.append(st.cfg.id)
                present = "fire" if st.fire else st.level.name.lower()
                events.append(self._event(st, "reset", "refused", now, level=latched, value=st.last_value,
                                          source=source, detail=f"condition still present ({present}); "
                                          "alarm stays latched"))
                continue
            del self._conditions[key]
            st.latched = st.announced = Level.NONE
            st.cleared = False
            events.append(self._event(st, "reset", "reset", now, level=latched, source=source))
            done.append(st.cfg.id)
        return self._finish(events, now), ResetResult(tuple(done), tuple(still), tuple(ended))

    def test(self, device_id: str | None, now: float, source: str) -> tuple[list[Event], WalkTestResult]:
        """Walk test: a short test sound; detections by the device(s) for ``walk_test_s`` are recorded as tests.

        A device in alarm (latched), with a supervisory signal or in fault is skipped, and the result says
        why: in test mode its state would read ``test`` and hide the signal. Raises KeyError for an unknown
        device.
        """
        events = []
        started: list[str] = []
        skipped: list[tuple[str, str]] = []
        for st in self._targets(device_id):
            why = self._busy(st)
            if why is not None:
                skipped.append((st.cfg.id, why))
                continue
            st.test_until = now + self.settings.walk_test_s
            started.append(st.cfg.id)
            events.append(self._event(st, "test", "started", now, source=source,
                                      detail=f"until reset or {self.settings.walk_test_s:g} s"))
        if started:
            self._test_sound_until = now + TEST_SOUND_S
        return self._finish(events, now), WalkTestResult(tuple(started), tuple(skipped))

    def _busy(self, st: _DeviceState) -> str | None:
        """Why a walk test must leave this device alone (an alarm, supervisory signal or fault), or None."""
        alarm = self._conditions.get((st.cfg.id, "alarm"))
        if alarm is not None:
            what = "fire alarm" if st.fire else f"{st.latched.name.lower()} alarm"
            present = "condition present" if st.level > Level.NONE else "condition cleared, reset it first"
            return f"{what} latched ({present})"
        signals = sorted(c for c in st.supervisory if (st.cfg.id, f"supervisory:{c}") in self._conditions)
        if signals:
            return f"supervisory signal: {', '.join(signals)}"
        if st.faults:
            return f"fault: {', '.join(sorted(st.faults))}"
        return None

    # ------------------------------------------------------------------------------------ saved state

    def saved_state(self, now: float) -> dict[str, Any]:
        """What must survive a restart: latched alarms (with silence), walk tests, the relays they drive."""
        latches = []
        for (subject, what), c in self._conditions.items():
            st = self._devices.get(subject)
            if what != "alarm" or st is None:
                continue
            latches.append({"device": subject, "level": st.latched.name.lower(), "silenced": c.silenced,
                            "cleared": st.cleared, "age_s": round(max(0.0, now - c.since), 3)})
        tests = [{"device": d, "remaining_s": round(st.test_until - now, 3)}
                 for d, st in self._devices.items() if st.test_until is not None and st.test_until > now]
        return {"latches": latches, "walk_tests": tests, "relays": sorted(self._relays)}

    def restore(self, saved: Mapping[str, Any], now: float) -> list[Event]:
        """Take back latches and walk tests from :meth:`saved_state` (before the first poll).

        Each restored latch is an event (``alarm``/``restored``); its relays follow at once. A device the
        site no longer has, or a level it does not know, raises KeyError/ValueError: the caller sets the
        saved state aside.
        """
        events: list[Event] = []
        for item in saved.get("latches", ()):
            st = self._devices[str(item["device"])]
            level = Level[str(item["level"]).upper()]
            if level == Level.NONE:
                raise ValueError(f"latch of {st.cfg.id} has no level")
            cleared = bool(item.get("cleared", False))
            st.latched = level
            st.cleared = cleared
            st.announced = Level.NONE if cleared else level
            st.last_known = Level.NONE if cleared else level
            since = now - float(item.get("age_s", 0.0))
            self._conditions[(st.cfg.id, "alarm")] = _Condition(
                "alarm", Sound.FIRE if st.fire else Sound.GAS, st.cfg.unit, st.cfg.household, since,
                level=level, silenced=bool(item.get("silenced", False)))
            events.append(self._event(st, "alarm", "restored", now, level=self._level_name(st, level),
                                      detail="latched before the restart; stays latched until reset"
                                      + ("; silenced" if item.get("silenced") else "")))
        for item in saved.get("walk_tests", ()):
            st = self._devices[str(item["device"])]
            st.test_until = now + max(0.0, min(float(item["remaining_s"]), self.settings.walk_test_s))
            events.append(self._event(st, "test", "restored", now, detail="walk test resumed after a restart"))
        return self._finish(events, now)

    # ------------------------------------------------------------------------------------ rules

    def _targets(self, device_id: str | None) -> list[_DeviceState]:
        if device_id is None:
            return list(self._devices.values())
        return [self._devices[device_id]]

    def _door_open_s(self, st: _DeviceState) -> float:
        own = st.cfg.door_open_s
        return self.settings.door_open_s if own is None else own

    def _answered(self, st: _DeviceState, now: float) -> list[Event]:
        events: list[Event] = []
        st.failures = 0
        st.first_failure = None
        st.last_seen = now
        link = st.link
        if "offline" in st.faults:
            # Hold-off: one answer from a flaky device does not clear its fault; a run of them does.
            st.good_polls += 1
            if st.good_polls >= self.settings.offline_clear_polls:
                st.good_polls = 0
                self._set_faults(st, st.faults - {"offline"}, ("offline",), now, events)
                if link is not None:
                    link.since_offline_cleared = 0
        elif link is not None:
            link.add(False)
            s = self.settings
            if ("comms_degraded" in st.faults and link.since_degraded >= s.degraded_window_polls
                    and link.failed <= s.degraded_window_polls * s.degraded_clear_percent / 100):
                link.since_offline_cleared = None
                self._set_faults(st, st.faults - {"comms_degraded"}, ("comms_degraded",), now, events,
                                 detail=f"{link.failed} of the last {len(link.polls)} polls failed")
        return events

    def _go_offline(self, st: _DeviceState, now: float, events: list[Event], detail: str) -> None:
        st.good_polls = 0
        self._set_faults(st, st.faults | {"offline"}, ("offline",), now, events, detail=detail)
        if st.cfg.is_modbus:
            # Nothing is known about the gas any more: the latch stays, but a reset is no longer refused.
            self._alarm_level(st, Level.NONE, None, now, events, known=False)

    def _concentration_level(self, st: _DeviceState, value: float) -> Level:
        cfg = st.cfg
        low, high, hyst = cfg.low, cfg.high, cfg.hysteresis
        if low is None or high is None or hyst is None:
            return Level.NONE
        if value >= high or (st.level == Level.HIGH and value > high - hyst):
            return Level.HIGH
        if value >= low or (st.level >= Level.LOW and value > low - hyst):
            return Level.LOW
        return Level.NONE

    def _alarm_level(
        self, st: _DeviceState, level: Level, value: float | None, now: float, events: list[Event],
        *, known: bool = True,
    ) -> None:
        """The device's alarm condition is now ``level``; ``known=False`` when it is unknown (no event)."""
        previous = st.level
        st.level = level
        if st.test_until is not None:
            if level > previous:
                events.append(self._event(st, "test", "detected", now, level=self._level_name(st, level),
                                          value=value))
                self._test_sound_until = now + TEST_SOUND_S
            return
        self._latch(st, value, now, events, known=known)

    def _latch(self, st: _DeviceState, value: float | None, now: float, events: list[Event], *,
               known: bool = True) -> None:
        """Raise, escalate or clear the device's alarm from its condition ``st.level``.

        ``known=False``: a NONE level means "unknown", not "gas gone" — no clearing is recorded from it.
        """
        key = (st.cfg.id, "alarm")
        level = st.level
        was_known = st.last_known
        if level > Level.NONE or known:
            st.last_known = level
        if level > st.announced:
            # New (raised), higher (escalated), or back after clearing while still latched (raised again):
            # each sounds, even after a silence.
            detail = None
            if st.latched == Level.NONE:
                action = "raised"
            elif st.cleared:
                action, detail = "raised", "condition returned before reset"
            else:
                action = "escalated"
            st.announced = level
            st.latched = max(st.latched, level)
            st.cleared = False
            self._conditions[key] = _Condition("alarm", Sound.FIRE if st.fire else Sound.GAS, st.cfg.unit,
                                               st.cfg.household, now, level=st.latched)
            events.append(self._event(st, "alarm", action, now, level=self._level_name(st, level), value=value,
                                      detail=detail))
        elif known and level == Level.NONE and was_known > Level.NONE and key in self._conditions:
            st.cleared = True
            st.announced = Level.NONE
            events.append(self._event(st, "alarm", "cleared", now, level=self._level_name(st, st.latched),
                                      value=value, detail="condition cleared; latched until reset"))

    def _end_test(self, st: _DeviceState, now: float, events: list[Event], source: str | None) -> None:
        """Leave test mode; a condition still present now counts for real."""
        st.test_until = None
        events.append(self._event(st, "test", "ended", now, source=source))
        self._latch(st, st.last_value, now, events, known=False)
        self._set_supervisory(st, set(st.supervisory), now, events, resync=True)

    def _set_faults(
        self, st: _DeviceState, wanted: set[str], managed: tuple[str, ...], now: float, events: list[Event],
        detail: str | None = None,
    ) -> None:
        for code in managed:
            key = (st.cfg.id, f"fault:{code}")
            if code in wanted and code not in st.faults:
                st.faults.add(code)
                self._conditions[key] = _Condition("trouble", Sound.TROUBLE, st.cfg.unit, st.cfg.household, now)
                events.append(self._event(st, "fault", "raised", now, code=code, detail=detail))
            elif code not in wanted and code in st.faults:
                st.faults.discard(code)
                self._conditions.pop(key, None)
                events.append(self._event(st, "fault", "cleared", now, code=code))

    def _set_supervisory(
        self, st: _DeviceState, present: set[str], now: float, events: list[Event], value: float | None = None,
        *, resync: bool = False,
    ) -> None:
        """The supervisory conditions present now. In test mode new ones are test detections."""
        for code in sorted(present | st.supervisory):
            key = (st.cfg.id, f"supervisory:{code}")
            if code in present and (code not in st.supervisory or (resync and key not in self._conditions)):
                st.supervisory.add(code)
                if st.test_until is not None:
                    events.append(self._event(st, "test", "detected", now, code=code, value=value))
                    self._test_sound_until = now + TEST_SOUND_S
                    continue
                self._conditions[key] = _Condition("supervisory", Sound.SUPERVISORY, st.cfg.unit,
                                                   st.cfg.household, now)
                events.append(self._event(st, "supervisory", "raised", now, code=code, value=value))
            elif code not in present and code in st.supervisory:
                st.supervisory.discard(code)
                if self._conditions.pop(key, None) is not None:
                    events.append(self._event(st, "supervisory", "cleared", now, code=code, value=value))

    def _telemetry(self, st: _DeviceState, value: float, measure: str | None, now: float,
                   events: list[Event], quality: tuple[str, str | None] = ("good", None)) -> None:
        """A reading, published on change (deadband), on a change of quality, or every telemetry interval.

        A ``bad`` reading goes out without its value (``code`` says why): it is not a concentration."""
        s = self.settings
        bad = quality[0] == "bad"
        if (st.telemetry_at is None or now - st.telemetry_at >= s.telemetry_interval_s or quality != st.quality
                or (not bad and (st.telemetry_value is None
                                 or abs(value - st.telemetry_value) >= s.telemetry_deadband))):
            st.telemetry_at = now
            st.telemetry_value = None if bad else value
            st.quality = quality
            events.append(self._event(st, "telemetry", "reading", now, value=None if bad else value,
                                      measure=measure, quality=quality[0], code=quality[1]))

    def _finish(self, events: list[Event], now: float) -> list[Event]:
        relays = self._linked_relays()
        if relays != self._relays:
            for relay in sorted(relays - self._relays):
                events.append(Event("relay", "on", now, code=relay, detail=self._relay_cause(relay)))
            for relay in sorted(self._relays - relays):
                events.append(Event("relay", "off", now, code=relay))
            self._relays = relays
        return events

    def _linked_relays(self) -> frozenset[str]:
        return frozenset(rule.output for rule in self.linkage if self._rule_active(rule))

    def _relay_cause(self, relay: str) -> str:
        return ", ".join(f"{r.signal} in {r.scope}" for r in self.linkage if r.output == relay and self._rule_active(r))

    def _rule_active(self, rule: LinkageRule) -> bool:
        kind, _, ref = rule.scope.partition(":")
        for c in self._conditions.values():
            if (kind == "unit" and c.unit != ref) or (kind == "household" and c.household != ref):
                continue
            if _matches(rule.signal, c):
                return True
        return False

    @staticmethod
    def _level_name(st: _DeviceState, level: Level) -> str:
        return "fire" if st.fire else level.name.lower()

    @staticmethod
    def _event(st: _DeviceState, kind: str, action: str, now: float, *, measure: str | None = None,
               **fields: Any) -> Event:
        cfg = st.cfg
        if kind in ("alarm", "telemetry", "test", "reset"):
            measure = measure or cfg.measure
        return Event(kind, action, now, device=cfg.id, unit=cfg.unit, household=cfg.household, measure=measure,
                     **fields)


_LED = {"alarm": "alarm", "supervisory": "supervisory", "trouble": "fault"}


def _quality(status: frozenset[str] | set[str]) -> tuple[str, str | None]:
    """A reading's quality and the status that makes it so: good, uncertain or bad."""
    for code in BAD_READING:
        if code in status:
            return "bad", code
    for code in UNCERTAIN_READING:
        if code in status:
            return "uncertain", code
    return "good", None


def _matches(signal: str, c: _Condition) -> bool:
    """Whether a linkage signal (config LINKAGE_SIGNALS) covers this condition."""
    if signal == "supervisory":
        return c.category == "supervisory"
    if signal == "fault":
        return c.category == "trouble"
    if c.category != "alarm":
        return False
    if signal == "any_alarm":
        return True
    if signal == "fire":
        return c.sound is Sound.FIRE
    if c.sound is Sound.FIRE:
        return False
    return c.level >= (Level.HIGH if signal == "gas_high" else Level.LOW)
