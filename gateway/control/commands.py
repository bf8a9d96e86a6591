"""The one door for operator commands, whether they come from ``gatewayctl`` (control socket) or MQTT.

:meth:`CommandHandler.handle` validates its arguments strictly and never raises: every outcome is a
:class:`CommandResult`. ``ok=False`` with an empty ``data`` means the command was *rejected* (unknown
command, bad argument, unknown device, refused in the current state); ``ok=False`` with
``data["failed"] = True`` means it was accepted but could not be carried out (a device did not answer,
the uplink is down). ``source`` ("cli:uid=1000", "mqtt:<command id>") is recorded in every event a command
causes.

Commands (arguments in parentheses; all optional unless marked *):

* ``silence`` () — mute the sounder for what is active now.
* ``reset`` (``device`` | ``all``: true) and ``test`` (``device`` | ``all``: true) — exactly one of the two.
  ``reset`` answers the latches cleared, the alarms still present and the walk tests ended; ``test`` the
  devices whose walk test started and those skipped (in alarm, supervisory or fault), each with why.
* ``status`` () and ``rebirth`` () — current state; publish the retained birth message again.
* ``events`` (``limit``, ``since``, ``until``, ``device``, ``household``, ``kind``) — stored history, newest last.
* ``read`` (``device``\\*, ``raw``) — a fresh reading now, through the bus thread that owns the port.
* ``scan`` (``bus``\\*, ``from``, ``to``, ``pause_polling``) — find responding Modbus addresses and what they look
  like (a known profile, or a multi-channel controller with a profile sketch: :mod:`gateway.control.discover`);
  polling pauses at most :data:`SCAN_PAUSE_MAX_S` at a time (a trouble signal meanwhile), every device polled
  in between.
* ``buzzer_test`` (``seconds_per_pattern``) and ``relay_test`` (``output``\\*, ``seconds``).
* ``config_show`` () — the effective configuration, secrets masked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from drivers.modbus import (
    EXCEPTION_NAMES,
    GATEWAY_EXCEPTIONS,
    CommError,
    ExtinguisherStation,
    GasDetector,
    ModbusClient,
    ModbusDevice,
    exception_kind,
    read_block,
)
from drivers.profiles import GasReading, StationReading
from gateway import __version__
from gateway.annunciation import Sound
from gateway.command_args import (
    EVENTS_MAX,
    LOCAL,
    Args,
    BuzzerTestArgs,
    EventsArgs,
    ReadArgs,
    RelayTestArgs,
    ScanArgs,
    SmsTestArgs,
    TargetArgs,
    reason,
    typename,
)
from gateway.control.discover import ControllerLayout, find_controller, profile_sketch
from gateway.events import KIND_PRIORITY, Event
from gateway.panel.annunciator import PATTERNS
from gateway.validation import Problem, convert

if TYPE_CHECKING:
    from gateway.config import SiteConfig
    from gateway.panel.buses import BusPoller

__all__ = [
    "COMMANDS", "COMMAND_ARGS", "CommandHandler", "CommandRejected", "CommandResult", "CommandTarget", "Progress",
    "StorageAway",
]

log = structlog.get_logger()

#: Every command and the arguments it accepts (their types and bounds: :data:`gateway.command_args.LOCAL`).
COMMAND_ARGS: dict[str, frozenset[str]] = {
    name: frozenset(kind.__struct_encode_fields__) for name, kind in LOCAL.items()
}
COMMANDS = frozenset(COMMAND_ARGS)
#: Sounder patterns played by ``buzzer_test``, in this order.
BUZZER_TEST_ORDER = (Sound.GAS, Sound.FIRE, Sound.SUPERVISORY, Sound.TROUBLE, Sound.TEST)
#: How often a buzzer test looks for a real signal that must take the sounder back.
BUZZER_TEST_CHECK_S = 0.05
#: Longest stretch a scan pauses a bus's polling; between two, every device on the bus is polled.
SCAN_PAUSE_MAX_S = 30.0
#: Per-address reply timeout during a scan (never longer than the bus's own timeout).
SCAN_PROBE_TIMEOUT_S = 0.25
SECRET_MASK = "********"

#: ``progress(update)`` receives scan progress: {"done", "total", "address", "found"}.
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CommandResult:
    """Outcome of a command. ``reason`` says why when ``ok`` is False; ``data`` is JSON-ready."""

    ok: bool
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str, **data: Any) -> CommandResult:
        """Accepted, but it could not be carried out."""
        return cls(False, reason, {"failed": True, **data})


class CommandRejected(Exception):
    """A command or its arguments are not acceptable; the message is the reason."""


@dataclass(frozen=True, slots=True)
class _EventQuery:
    limit: int
    since: float | None
    device: str | None
    household: str | None
    kind: str | None
    install: str | None = None
    session: int | None = None
    from_seq: int | None = None
    to_seq: int | None = None
    until: float | None = None

    def filters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"since": self.since, "device": self.device, "household": self.household,
                               "kind": self.kind}
        if self.until is not None:
            out["until"] = self.until
        if self.session is not None:  # a range of one session by seq (a consumer filling a gap)
            out.update(install=self.install, session=self.session, from_seq=self.from_seq, to_seq=self.to_seq)
        return out


class StorageAway(Exception):
    """The storage/uplink process is not there to answer (the panel's commands still work)."""


class CommandTarget(Protocol):
    """What the command handler works on: the panel process (:class:`gateway.panel.process.PanelProcess`)."""

    cfg: SiteConfig
    started_at: float

    @property
    def panel(self) -> Any: ...
    @property
    def annunciator(self) -> Any: ...
    @property
    def buses(self) -> Mapping[str, Any]: ...
    @property
    def contacts(self) -> Mapping[str, Any]: ...
    def record(self, event: Event) -> None: ...
    async def storage(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]: ...
    async def recent_events(self, **query: Any) -> list[dict[str, Any]]: ...
    def follow_stored(self, **query: Any) -> AsyncGenerator[list[dict[str, Any]], None]: ...
    def hold_figures(self) -> dict[str, Any]: ...
    def uplink_process(self) -> dict[str, Any]: ...


async def _second_path_status(gw: CommandTarget) -> dict[str, Any]:
    """The transmission path's supervision and the SMS path, where the panel has them (docs/alarms.md)."""
    out: dict[str, Any] = {}
    figures = getattr(gw, "transmission_figures", None)
    if figures is not None:
        out["transmission"] = figures()
    sms = getattr(gw, "sms_status", None)
    if sms is not None:
        out["sms"] = await sms()
    return out


class CommandHandler:
    """Validates and carries out operator commands against the running panel (:class:`CommandTarget`)."""

    COMMANDS: frozenset[str] = COMMANDS

    def __init__(self, gateway: CommandTarget, *, pause_window_s: float = SCAN_PAUSE_MAX_S) -> None:
        """``pause_window_s``: the longest stretch a scan pauses polling (:data:`SCAN_PAUSE_MAX_S`)."""
        self.gateway = gateway
        self.pause_window_s = min(pause_window_s, SCAN_PAUSE_MAX_S)
        self._scanning: set[str] = set()

    async def handle(
        self, command: str, args: Mapping[str, Any], *, source: str, progress: Progress | None = None
    ) -> CommandResult:
        """Carry out ``command``; never raises. ``progress`` receives scan progress updates."""
        if not isinstance(command, str) or command not in self.COMMANDS:
            shown = command if isinstance(command, str) else typename(command)
            return CommandResult(False, f"unknown command {shown!r} (one of {', '.join(sorted(self.COMMANDS))})")
        try:
            result: CommandResult = await getattr(self, f"_cmd_{command}")(_args(command, args), source, progress)
        except CommandRejected as exc:
            log.info("command rejected", command=command, source=source, reason=str(exc))
            return CommandResult(False, str(exc))
        except Exception as exc:  # a bug must not take the caller (socket, MQTT) down
            log.exception("command failed", command=command, source=source)
            return CommandResult.failed(f"{command}: internal error: {exc!r}")
        if command not in ("status", "events", "config_show", "read"):
            log.info("command", command=command, source=source, ok=result.ok, reason=result.reason)
        return result

    # ------------------------------------------------------------------------------ alarm actions

    async def _cmd_silence(self, a: Args, source: str, _p: Progress | None) -> CommandResult:
        self.gateway.panel.silence(source)
        return CommandResult(True, data={"sound": self.gateway.panel.snapshot()["annunciation"].sound.name.lower()})

    def _target(self, command: str, a: TargetArgs) -> str | None:
        """The device of ``reset``/``test`` (None: all); the struct has checked that exactly one was given."""
        if a.device is not None:
            self._device(command, a.device)
        return a.device

    async def _cmd_reset(self, a: TargetArgs, source: str, _p: Progress | None) -> CommandResult:
        device = self._target("reset", a)
        outcome = self.gateway.panel.reset(device, source)
        data = {"reset": list(outcome.reset), "still_active": list(outcome.still_active),
                "tests_ended": list(outcome.tests_ended)}
        if device is not None and device in outcome.still_active:
            return CommandResult(False, f"reset: {device}: the alarm condition is still present; "
                                 "it can be reset once it has cleared", data)
        return CommandResult(True, data=data)

    async def _cmd_test(self, a: TargetArgs, source: str, _p: Progress | None) -> CommandResult:
        device = self._target("test", a)
        outcome = self.gateway.panel.test(device, source)
        data = {"started": list(outcome.started),
                "skipped": [{"device": d, "reason": why} for d, why in outcome.skipped]}
        if device is not None and outcome.skipped:
            return CommandResult(False, f"test: {device}: not started: {outcome.skipped[0][1]}; a walk test "
                                 "would hide it", data)
        return CommandResult(True, data=data)

    # ------------------------------------------------------------------------------ state

    async def _cmd_status(self, a: Args, _source: str, _p: Progress | None) -> CommandResult:
        return CommandResult(True, data=await self.status())

    async def status(self) -> dict[str, Any]:
        """Gateway, uplink, annunciator, buses and a device table."""
        gw = self.gateway
        cfg = gw.cfg
        snap = gw.panel.snapshot()
        now_mono, now_wall = snap["now"], time.time()

        def wall(mono: float | None) -> float | None:
            return None if mono is None else now_wall - (now_mono - mono)

        devices = []
        for d in snap["devices"]:
            seen = d["last_seen"]
            devices.append({
                "device": d["device"], "unit": d["unit"], "household": d["household"], "kind": d["kind"],
                "state": d["state"], "value": d["value"], "measure": d["measure"], "last_seen": wall(seen),
                "last_seen_age_s": None if seen is None else round(now_mono - seen, 1),
                "faults": d["faults"], "supervisory": d["supervisory"], "latched": d["latched"],
                "condition_present": d["condition_present"], "comm_errors": d["comm_errors"],
                "errors_by_kind": d.get("errors_by_kind", {}),
            })
        try:
            stored: dict[str, Any] | None = await gw.storage("storage")
        except StorageAway as exc:
            stored, away = None, str(exc)
        ann = snap["annunciation"]
        if stored is not None:
            oldest = stored["oldest_undelivered"]
            uplink: dict[str, Any] = {
                "process": "up", **stored["uplink"], "backlog": stored["backlog"], "oldest_undelivered": oldest,
                "oldest_undelivered_age_s": None if oldest is None else round(now_wall - oldest, 1),
            }
        else:
            uplink = {"process": "down", "connected": False, "reason": away}
        return {
            "gateway": {
                "id": cfg.gateway_id, "community": cfg.community, "building": cfg.building,
                "version": __version__, "session": None if stored is None else stored["session"],
                "pid": os.getpid(), "uplink_process": gw.uplink_process(),
                "started_at": gw.started_at, "uptime_s": round(now_wall - gw.started_at, 1), "config": cfg.source,
                "database": cfg.storage.path,
            },
            "uplink": uplink,
            "annunciator": {
                "sound": ann.sound.name.lower(), "pattern": gw.annunciator.sound_pattern,
                "buzzer_on": gw.annunciator.buzzer_on, "leds": sorted(ann.leds),
                "relays": {r.id: gw.annunciator.relay_states.get(r.id, False) for r in cfg.outputs.relays},
            },
            "storage": {**(stored["storage"] if stored is not None else {}), **gw.hold_figures()},
            "buses": [
                {"id": p.bus.id, "port": p.bus.port, "port_lost": p.port_lost, "paused": p.paused,
                 "scanning": p.bus.id in self._scanning,
                 "polls": p.polls, "errors": p.errors,
                 "errors_by_kind": dict(sorted(getattr(p, "errors_by_kind", {}).items())), **_cycle_figures(p)}
                for p in gw.buses.values()
            ],
            "active": [{**c, "since": wall(c["since"])} for c in snap["active"]],  # type: ignore[arg-type]
            "devices": devices,
            **await _second_path_status(gw),
        }

    async def _cmd_rebirth(self, a: Args, _source: str, _p: Progress | None) -> CommandResult:
        try:
            answer = await self.gateway.storage("rebirth")
        except StorageAway as exc:
            return CommandResult.failed(f"rebirth: {exc}")
        except RuntimeError as exc:
            return CommandResult.failed(f"rebirth: {exc}")
        return CommandResult(True, data={"topic": answer["topic"]})

    async def _cmd_sms_test(self, a: SmsTestArgs, _source: str, _p: Progress | None) -> CommandResult:
        number = a.number
        sms_test = getattr(self.gateway, "sms_test", None)
        if sms_test is None or getattr(self.gateway, "sms_supervisor", None) is None:
            return CommandResult.failed("sms test: no [sms] modem configured")
        try:
            data = await sms_test(number)
        except (StorageAway, RuntimeError) as exc:
            return CommandResult.failed(f"sms test: {exc}")
        return CommandResult(data.get("state") != "failed", reason=data.get("error"), data=data)

    async def _cmd_config_show(self, a: Args, _source: str, _p: Progress | None) -> CommandResult:
        return CommandResult(True, data={"config": masked_config(self.gateway.cfg)})

    # ------------------------------------------------------------------------------ history

    def _event_query(self, a: EventsArgs) -> _EventQuery:
        """The query of ``events`` checked against the site (the struct has checked each argument)."""
        since, until = _time_arg(a.since, "since"), _time_arg(a.until, "until")
        if since is not None and until is not None and until <= since:
            raise CommandRejected("events: until must be after since")
        if a.device is not None:
            self._device("events", a.device)
        if a.household is not None and a.household not in {h.id for h in self.gateway.cfg.households}:
            raise CommandRejected(f"events: household: unknown household {a.household!r}")
        if a.kind is not None and a.kind not in KIND_PRIORITY:
            raise CommandRejected(f"events: kind: unknown kind {a.kind!r} (one of {', '.join(KIND_PRIORITY)})")
        if a.from_seq is not None and a.to_seq is not None and a.to_seq < a.from_seq:
            raise CommandRejected(f"events: to_seq ({a.to_seq}) is before from_seq ({a.from_seq})")
        return _EventQuery(50 if a.limit is None else a.limit, since, a.device, a.household, a.kind, a.install,
                           a.session, a.from_seq, a.to_seq, until)

    async def _cmd_events(self, a: EventsArgs, _source: str, _p: Progress | None) -> CommandResult:
        query = self._event_query(a)
        try:
            rows = await self.gateway.recent_events(limit=query.limit, **query.filters())
        except StorageAway as exc:
            return CommandResult.failed(str(exc))
        return CommandResult(True, data={"events": rows})

    async def follow(self, args: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Stored history (as ``events``), then every newly stored matching event, until the caller stops.

        Raises :class:`CommandRejected` before yielding anything when the arguments are bad.
        """
        query = self._event_query(_args("events", args))
        gw = self.gateway
        try:
            # The newest sequence number first: an event stored between the two reads is then either in ``rows``
            # or after ``after``, never skipped (the other order lost one stored in between).
            last = await self._last_seq()
            rows = await gw.recent_events(limit=query.limit, **query.filters())
            after = max(last, int(rows[-1]["stored_seq"])) if rows else last
        except StorageAway as exc:
            raise CommandRejected(str(exc)) from None
        for row in rows:
            yield row
        # recent() keeps the newest rows of a query: ask for more than one poll can store
        async for batch in gw.follow_stored(limit=EVENTS_MAX, after_seq=after, **query.filters()):
            for row in batch:
                yield row

    async def _last_seq(self) -> int:
        rows = await self.gateway.recent_events(limit=1)
        return int(rows[-1]["stored_seq"]) if rows else 0

    # ------------------------------------------------------------------------------ bus work

    def _device(self, command: str, device_id: str) -> None:
        try:
            self.gateway.cfg.device(device_id)
        except KeyError:
            raise CommandRejected(f"{command}: device: unknown device {device_id!r}") from None

    def _driver(self, device_id: str) -> tuple[BusPoller, ModbusDevice] | None:
        for poller in self.gateway.buses.values():
            for driver in poller.devices:
                if driver.device_id == device_id:
                    return poller, driver
        return None

    async def _on_bus(
        self, poller: BusPoller, work: Callable[[ModbusClient], Any], timeout_s: float
    ) -> Any:
        future = poller.submit(work)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    async def _cmd_read(self, a: ReadArgs, _source: str, _p: Progress | None) -> CommandResult:
        device_id, raw = a.device, bool(a.raw)
        self._device("read", device_id)
        contact = self.gateway.contacts.get(device_id)
        dev = self.gateway.cfg.device(device_id)
        if contact is not None:
            data: dict[str, Any] = {"device": device_id, "kind": dev.kind, "pin": dev.pin, "contact": contact.contact,
                                    "closed": contact.is_closed, "active": contact.is_active,
                                    "plausible": contact.is_plausible}
            return CommandResult(True, data=data)
        found = self._driver(device_id)
        if found is None:
            raise CommandRejected(f"read: {device_id} is not on a bus")
        poller, driver = found
        started = time.monotonic()
        try:
            reading = await self._on_bus(poller, driver.poll, poller.deadline_s)
        except TimeoutError:
            return CommandResult.failed(f"read: bus {poller.bus.id} did not serve the request within "
                                        f"{poller.deadline_s:.0f} s")
        except CommError as exc:
            return CommandResult.failed(f"read: {device_id} at address {driver.address} on {poller.bus.id}: "
                                        f"no valid answer ({exc})")
        data = {"device": device_id, "kind": dev.kind, "bus": poller.bus.id, "address": driver.address,
                "took_ms": round((time.monotonic() - started) * 1000, 1), **_reading(reading),
                # the device's own status word says what it thinks; the panel decides by the set-points
                "panel_state": next((d["state"] for d in self.gateway.panel.snapshot()["devices"]
                                     if d["device"] == device_id), None),
                "low": dev.low, "high": dev.high}
        if raw:
            data["raw"] = _raw_registers(driver, reading)
        return CommandResult(True, data=data)

    async def _cmd_scan(self, a: ScanArgs, source: str, progress: Progress | None) -> CommandResult:
        bus_id = a.bus
        first = 1 if a.first is None else a.first
        last = 247 if a.last is None else a.last
        pause = bool(a.pause_polling)
        poller = self.gateway.buses.get(bus_id)
        if poller is None:
            known = ", ".join(self.gateway.buses) or "none"
            raise CommandRejected(f"scan: bus: unknown bus {bus_id!r} (configured: {known})")
        if first > last:
            raise CommandRejected(f"scan: from ({first}) must not be above to ({last})")
        if bus_id in self._scanning:
            raise CommandRejected(f"scan: a scan of {bus_id} is already running")
        pausing = not poller.paused  # else someone else holds polling paused: scan without touching it
        if pausing and not pause:
            raise CommandRejected(f"scan: bus {bus_id} is polling its detectors; pause it with pause_polling "
                                  "(gatewayctl scan --pause-polling) for the scan; polling pauses at most "
                                  f"{self.pause_window_s:g} s at a time and every device is polled in between")
        self._scanning.add(bus_id)
        probe_s = min(poller.bus.timeout_s, SCAN_PROBE_TIMEOUT_S)
        found: list[dict[str, Any]] = []
        gateway_answers: list[dict[str, Any]] = []  # a Modbus gateway said nothing answers behind it
        total = last - first + 1
        windows = 0
        window_end = float("-inf")
        try:
            for n, address in enumerate(range(first, last + 1), start=1):
                if pausing and time.monotonic() >= window_end:
                    if windows:  # a window is over: every device is polled before the next one
                        self._set_paused(poller, False, source, f"polling of {bus_id} resumed between scan "
                                         f"windows (address {address - 1} of {first}–{last} done)")
                        await self._polled_once(poller)
                    windows += 1
                    self._set_paused(poller, True, source, f"polling of {bus_id} paused for an address scan "
                                     f"(window {windows}, at most {self.pause_window_s:g} s)")
                    window_end = time.monotonic() + self.pause_window_s
                try:
                    hit = await self._on_bus(poller, functools.partial(_probe, address=address, timeout_s=probe_s),
                                             poller.deadline_s)
                except TimeoutError:
                    return CommandResult.failed(f"scan: bus {bus_id} did not serve the scan", found=found)
                except CommError as exc:
                    return CommandResult.failed(f"scan: {bus_id}: {exc}", found=found)
                if hit is not None and hit["responding"]:
                    found.append(hit)
                elif hit is not None:
                    gateway_answers.append(hit)
                if progress is not None:
                    progress({"done": n, "total": total, "address": address, "found": len(found),
                              "hit": hit})
        finally:
            self._scanning.discard(bus_id)
            if pausing and windows:
                self._set_paused(poller, False, source, f"polling of {bus_id} resumed after the scan")
        configured = {d.address: d.controller or d.id for d in self.gateway.cfg.bus_devices(bus_id)}
        for hit in found:
            hit["configured_as"] = configured.get(hit["address"])
        return CommandResult(True, data={"bus": bus_id, "from": first, "to": last, "responders": found,
                                         "gateway_answers": gateway_answers,
                                         "paused_polling": pausing, "pause_windows": windows})

    def _set_paused(self, poller: BusPoller, paused: bool, source: str, detail: str) -> None:
        """Pause or resume a bus's polling; the panel shows a trouble signal while it is paused."""
        poller.pause(paused)
        self.gateway.panel.polling_paused(poller.bus.id, paused, source, detail)

    async def _polled_once(self, poller: BusPoller) -> None:
        """Wait until the bus thread has polled each of its devices once more (at most its deadline)."""
        target = poller.polls + len(poller.polled)
        deadline = time.monotonic() + poller.deadline_s
        while poller.polls < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------------------ outputs

    async def _cmd_buzzer_test(self, a: BuzzerTestArgs, source: str, _p: Progress | None) -> CommandResult:
        seconds = 1.0 if a.seconds_per_pattern is None else a.seconds_per_pattern
        gw = self.gateway
        sounding = gw.panel.snapshot()["annunciation"].sound
        if sounding >= Sound.TEST:
            raise CommandRejected(f"buzzer_test: the sounder is signalling {sounding.name.lower()}; "
                                  "silence or clear it first")
        played: list[str] = []
        gw.record(Event("test", "started", time.monotonic(), code="buzzer", source=source,
                        detail=f"buzzer test, {seconds:g} s per pattern"))
        for sound in BUZZER_TEST_ORDER:
            pattern = PATTERNS[sound]
            gw.annunciator.play(pattern, seconds)
            played.append(pattern.name)
            interrupted = await self._signal_within(seconds)
            if interrupted is not None:
                # a real signal came in: end the test pattern now so the pattern thread plays the signal
                gw.annunciator.play(PATTERNS[Sound.TEST], 0.0)
                reason = f"buzzer_test: stopped, the sounder must signal {interrupted.name.lower()}"
                gw.record(Event("test", "ended", time.monotonic(), code="buzzer", source=source, detail=reason))
                return CommandResult.failed(reason, played=played)
        gw.record(Event("test", "ended", time.monotonic(), code="buzzer", source=source))
        return CommandResult(True, data={"patterns": played, "seconds_per_pattern": seconds})

    async def _signal_within(self, seconds: float) -> Sound | None:
        """Wait ``seconds``; return early with the sound if the panel asks for a real signal meanwhile."""
        annunciator = self.gateway.annunciator
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            sound: Sound = annunciator.current.sound
            if sound >= Sound.TEST:
                return sound
            await asyncio.sleep(min(BUZZER_TEST_CHECK_S, remaining))
        last: Sound = annunciator.current.sound
        return last if last >= Sound.TEST else None

    async def _cmd_relay_test(self, a: RelayTestArgs, source: str, _p: Progress | None) -> CommandResult:
        output = a.output
        seconds = 2.0 if a.seconds is None else a.seconds
        gw = self.gateway
        relays = {r.id for r in gw.cfg.outputs.relays}
        if output not in relays:
            raise CommandRejected(f"relay_test: output: unknown relay {output!r} (configured: "
                                  f"{', '.join(sorted(relays)) or 'none'})")
        gw.record(Event("relay", "on", time.monotonic(), code=output, source=source,
                        detail=f"relay test for {seconds:g} s"))
        gw.annunciator.set_relay(output, True)
        try:
            await asyncio.sleep(seconds)
        finally:
            linked = output in gw.annunciator.current.relays
            gw.annunciator.set_relay(output, linked)
        if not linked:
            gw.record(Event("relay", "off", time.monotonic(), code=output, source=source, detail="relay test ended"))
        return CommandResult(True, data={"output": output, "seconds": seconds, "left_on_by_linkage": linked})


# ------------------------------------------------------------------------------------------- helpers


def _args(command: str, args: Any) -> Any:
    """``args`` as ``command``'s struct (:data:`gateway.command_args.LOCAL`); :class:`CommandRejected` if not."""
    try:
        return convert(args, LOCAL[command])
    except Problem as problem:
        raise CommandRejected(reason(command, problem)) from None


def _time_arg(raw: float | str | None, key: str) -> float | None:
    """Epoch seconds or an ISO 8601 time (local time unless it has an offset) → epoch seconds."""
    if raw is None or isinstance(raw, float):
        return raw
    try:
        return dt.datetime.fromisoformat(raw).timestamp()
    except (ValueError, OverflowError):
        raise CommandRejected(f"events: {key}: not an ISO 8601 time: {raw[:40]!r}") from None


def _cycle_figures(poller: Any) -> dict[str, Any]:
    """A bus thread's wire floor and last full cycle, in seconds, and how its controllers are read (the floor
    follows that plan), where the bus object offers them."""
    floor, cycle = getattr(poller, "floor_s", None), getattr(poller, "cycle_s", None)
    plans = getattr(poller, "read_plans", None)
    return {"floor_s": None if floor is None else round(floor, 4),
            "cycle_s": None if cycle is None else round(cycle, 4),
            "read_plans": plans() if callable(plans) else {}}


def _reading(reading: GasReading | StationReading) -> dict[str, Any]:
    if isinstance(reading, GasReading):
        return {"value": reading.value, "measure": reading.measure, "status": sorted(reading.status),
                "gas": reading.gas, "warmup_remaining_s": reading.warmup_remaining_s}
    return {"presence": reading.presence, "pressure_ok": reading.pressure_ok, "pressure": reading.pressure,
            "door_open": reading.door_open, "obstructed": reading.obstructed}


def _raw_registers(driver: ModbusDevice, reading: GasReading | StationReading) -> dict[str, Any]:
    if isinstance(driver, GasDetector):
        p = driver.profile
        read = {start + i for start, count in p.block_reads for i in range(count)}
        # Registers a profile with registers far apart does not read are null, not a made-up 0.
        return {"function": p.function, "start": p.start,
                "registers": [v if p.start + i in read else None for i, v in enumerate(reading.raw)]}
    if isinstance(driver, ExtinguisherStation):
        return {"points": dict(zip(driver.profile.points, reading.raw, strict=False))}
    return {"values": list(reading.raw)}


def _probe(client: ModbusClient, address: int, timeout_s: float) -> dict[str, Any] | None:
    """Runs on the bus thread: does ``address`` answer, and which profile does it look like?"""
    params = getattr(client, "comm_params", None)
    saved = getattr(params, "timeout_connect", None)
    if params is not None and saved is not None:
        params.timeout_connect = timeout_s
    try:
        return _classify(client, address)
    finally:
        if params is not None and saved is not None:
            params.timeout_connect = saved


#: Answers that came from the address probed but could not be taken (garbled, cut short, another function):
#: something is there.
_GARBLED = frozenset({"crc_error", "truncated_frame", "overlong_frame", "bad_response", "wrong_function"})


def _answers(client: ModbusClient, function: int, start: int, count: int, address: int) -> list[int] | str:
    """Registers/bits read, else what came instead: ``exception`` (the device refused the read: it is there),
    ``garbled`` (a frame came that could not be taken: something is there), ``silent`` (nothing, or a frame
    from another address), or ``gateway:<name>`` (a Modbus gateway's 0x0A/0x0B: nothing is there)."""
    try:
        return read_block(client, function, start, count, address)
    except CommError as exc:
        if exc.reason == "port":
            raise
        if exc.reason == "exception_response":
            code = next((c for c in GATEWAY_EXCEPTIONS if exc.kind == exception_kind(c)), None)
            return f"gateway:{EXCEPTION_NAMES[code]}" if code is not None else "exception"
        return "garbled" if exc.kind in _GARBLED else "silent"


class _WentSilent(Exception):
    """A device stopped answering the controller probes: it is not one that refuses reads quickly."""


def _controller_probe(client: ModbusClient, address: int) -> ControllerLayout | None:
    """:func:`gateway.control.discover.find_controller` through the bus client; gives up at the second silence
    (each would cost the probe timeout)."""
    silences = 0

    def read(start: int, count: int) -> list[int] | None:
        nonlocal silences
        answer = _answers(client, 3, start, count, address)
        if answer == "silent":
            silences += 1
            if silences >= 2:
                raise _WentSilent
        return answer if isinstance(answer, list) else None

    try:
        return find_controller(read)
    except _WentSilent:
        return None


def _classify(client: ModbusClient, address: int) -> dict[str, Any] | None:
    """What answers at ``address``: None for silence; ``responding: False`` for a gateway's exception (0x0A
    "gateway path unavailable", 0x0B "gateway target device failed to respond": the device behind it did
    not answer); else the profile guess, with how sure it is (``confidence``) and why."""
    first = _answers(client, 3, 0, 10, address)
    if first == "silent":
        first = _answers(client, 3, 0, 1, address)  # a device with fewer registers
    if first == "silent":
        return None
    if isinstance(first, str) and first.startswith("gateway:"):
        return {"address": address, "responding": False, "exception": first.removeprefix("gateway:")}
    guesses: list[str] = []
    detail: dict[str, Any] = {}
    if isinstance(first, list) and len(first) == 10 and _plausible_profile_a(first):
        guesses.append("A")
        detail["registers_0_9"] = first
    word = _answers(client, 3, 0x6000, 2, address)
    if isinstance(word, list):
        guesses.append("B")
        detail["registers_6000"] = word
    bits = _answers(client, 2, 0, 4, address)
    if isinstance(bits, list) and not guesses:
        guesses.append("io-station")
        detail["discrete_inputs_0_3"] = bits
    confidence, why = _confidence(guesses)
    profile = guesses[0] if guesses else "unknown"
    if not guesses:
        layout = _controller_probe(client, address)
        if layout is not None and layout.channels > 1:
            profile, confidence = "controller", "medium"
            why = (f"{layout.channels} channels of {layout.count} registers from {layout.start}, "
                   f"{layout.stride} apart; check the register meanings in the manual")
            detail.update(controller=layout.as_dict(), profile_sketch=profile_sketch(layout, address))
        elif layout is not None:
            detail["registers"] = layout.as_dict()
            why = f"registers {layout.start}–{layout.start + layout.count - 1} read; no known register map fits"
    return {"address": address, "responding": True, "answer": "registers" if isinstance(first, list) else first,
            "profile": profile, "candidates": guesses, "confidence": confidence, "why": why, **detail}


def _confidence(guesses: list[str]) -> tuple[str, str]:
    """How sure a profile guess is: ``high`` when one register map fits and no other, ``medium`` when
    several fit (the first is shown), ``low`` when only generic reads worked."""
    maps = [g for g in guesses if g in ("A", "B")]
    if len(maps) == 1:
        return "high", f"only profile {maps[0]}'s registers read as that profile lays them out"
    if maps:
        return "medium", f"the registers of {' and '.join(maps)} all read; check the device's manual"
    if guesses:
        return "low", "discrete inputs 0–3 read; no detector register map fits"
    return "low", "it answers, but no known register map fits"


def _plausible_profile_a(regs: list[int]) -> bool:
    unit_code, decimals_code = regs[0] >> 12 & 0xF, regs[0] >> 8 & 0xF
    status = regs[5] & 0xFF
    return (unit_code in (0, 2, 4) and decimals_code in (0x0, 0x4, 0x8, 0xC)
            and status in (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0F)
            and regs[4] > 0 and regs[1] <= regs[4] * 2)


_SECRET_KEYS = frozenset({"password", "pin"})  # pin: the SIM's ([sms] pin)


def masked_config(cfg: Any) -> dict[str, Any]:
    """The site config as JSON-ready data; secrets (the MQTT password) masked, file paths kept."""
    data = _plain(cfg)
    assert isinstance(data, dict)
    for dev in data.get("devices", []):
        for key in ("detector_profile", "station_profile"):
            if dev.get(key) is not None:
                dev[key] = dev[key]["name"]
    return data


def _plain(value: Any, key: str = "") -> Any:
    if key in _SECRET_KEYS:
        return None if value is None else SECRET_MASK
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items) if isinstance(value, set | frozenset) else items
    if isinstance(value, float) and value != value:
        return None
    return value

