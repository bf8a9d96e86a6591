"""The panel process: ``gatewayd`` itself, the building's alarm panel, standing alone.

It owns the pins, the buses, the alarm core, the annunciator and relays, the saved panel state, the control
socket and the command handler, and it feeds systemd's watchdog. Storage and MQTT run in a child process
(:mod:`gateway.uplink.process`) that this one starts and restarts (:class:`~gateway.panel.handover.UplinkSupervisor`);
while it is away the panel holds its events (:class:`~gateway.panel.handover.Hold`) and keeps polling,
sounding, latching and driving relays. docs/architecture.md draws the whole.

Start-up either works or ends within seconds with one line naming the cause and a sysexits code
(:class:`PanelStartError`); a planned stop stops the inputs first, waits until every event read is stored,
then stops the storage process and releases the pins.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import signal
import time
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import Future
from typing import Any

import msgspec
import structlog

from drivers.gpio import use_pin_factory
from gateway import __version__, link
from gateway.annunciation import Annunciation
from gateway.config import SiteConfig
from gateway.control.commands import CommandHandler, StorageAway
from gateway.control.server import ControlServer, ControlServerError
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.heap import release_startup_heap
from gateway.notify import Notifier, Watchdog
from gateway.panel.children import FirstChild, panel_children
from gateway.panel.handover import Handover, UplinkSupervisor
from gateway.panel.selfcheck import SelfCheck, on_alarm_path
from gateway.panel.side import AlarmSide
from gateway.panel.state import StateSaver, load_state, state_path
from gateway.panel.transmission import FAULT_CODE as TRANSMISSION_FAULT
from gateway.panel.transmission import TransmissionMonitor
from gateway.realtime import raise_priority

__all__ = [
    "EX_OSERR", "EX_SOFTWARE", "EX_UNAVAILABLE", "SUPPORT_PRIORITY", "PanelProcess", "PanelStartError", "start_error",
]

log = structlog.get_logger()

# sysexits(3): documented in docs/deploy.md.
EX_UNAVAILABLE = 69  # GPIO backend missing, a pin in use, a serial port that exists but cannot be opened
EX_SOFTWARE = 70  # any other reason the panel cannot start
EX_OSERR = 71
EX_NOPERM = 77
#: How long a planned stop waits for the storage process to commit what the panel read.
STOP_STORE_TIMEOUT_S = 8.0
#: How long the storage process may take to flush to the broker and exit before it is killed.
STOP_STORAGE_TIMEOUT_S = 12.0
STORAGE_REQUEST_TIMEOUT_S = 10.0
#: The SMS process's answer for a status or birth (the storage process asks for the panel's view every second).
SMS_VIEW_TIMEOUT_S = 3.0
#: How long a planned stop waits for the SMS process to commit what it is owed.
STOP_SMS_STORE_TIMEOUT_S = 3.0
#: Event kinds the SMS process is handed: those that may be owed a message, and resets (an episode ends).
SMS_KINDS = frozenset({"alarm", "supervisory", "fault", "reset"})
#: Delivery keys the panel keeps to tell an SMS process that (re)connects which events need no message.
RECENT_DELIVERED = 1024
#: The uplink process beats twice a second: silent for this long, its last word on the broker is stale and the
#: path counts as down (it is killed and restarted after 15 s of silence).
BEAT_STALE_S = 3.0
#: SCHED_FIFO priority of the panel's other threads (loop, hand-over, supervisor, saver, self-check) when the
#: alarm threads are realtime: the lowest realtime one, below every alarm thread yet above every normal
#: process, so none of them can be preempted while it holds the interpreter lock a bus thread needs.
SUPPORT_PRIORITY = 1


class PanelStartError(Exception):
    """The panel cannot start: ``line`` names the cause, ``code`` is the exit status."""

    def __init__(self, line: str, code: int = EX_SOFTWARE) -> None:
        super().__init__(line)
        self.line = line
        self.code = code


def restored_summary(saved: Mapping[str, Any]) -> str:
    """What the start took back from the saved state, for its log line: "nothing", or "latch gas-u1-201 (high);
    relays on: u1-gas-valve"."""
    parts = []
    latches = [f"{item['device']} ({item['level']})" for item in saved.get("latches", [])]
    if latches:
        parts.append(f"latch{'es' if len(latches) > 1 else ''} {', '.join(latches)}")
    tests = [item["device"] for item in saved.get("walk_tests", [])]
    if tests:
        parts.append(f"walk test{'s' if len(tests) > 1 else ''} {', '.join(tests)}")
    if saved.get("relays"):
        parts.append(f"relays on: {', '.join(saved['relays'])}")
    return "; ".join(parts) or "nothing"


class PanelProcess:
    """One building's alarm panel and the supervisor of its storage process."""

    def __init__(self, cfg: SiteConfig, config_path: str, *, uplink_env: dict[str, str] | None = None,
                 uplink_log: str | None = None, heartbeats: Heartbeats | None = None,
                 sms_log: str | None = None, first_children: Mapping[str, FirstChild] | None = None) -> None:
        """``uplink_env``/``uplink_log``: environment and log file of the storage process (default: ours);
        ``sms_log``: the SMS process's log file (default: ``sms.log`` beside ``uplink_log``, or ours);
        ``first_children``: by name (:func:`panel_children`), the children ``gatewayd`` forked at start-up (each
        later start, and every start without one, is a new interpreter)."""
        first = dict(first_children or {})
        children = {c.name: c for c in panel_children(cfg, uplink_env=uplink_env, uplink_log=uplink_log,
                                                      sms_log=sms_log)}
        self.cfg = cfg
        self.config_path = config_path
        self.started_at = time.time()
        self.heartbeats = heartbeats or Heartbeats()
        self.handover = Handover()
        identity = {"community": cfg.community, "building": cfg.building, "gateway": cfg.gateway_id}
        self.state_file = state_path(cfg.storage.path)
        loaded = load_state(self.state_file, identity)
        self._state_problem = loaded.problem
        saved = loaded.state or {}
        unstored = saved.get("unstored_at_stop")
        if isinstance(unstored, dict):
            self.handover.hold.return_drops({str(k): int(v) for k, v in unstored.items() if isinstance(v, int)})
        self.saver = StateSaver(self.state_file, identity, self._saved_state)
        self.transmission = TransmissionMonitor(cfg.transmission, path_up=self._path_up,
                                                on_change=self._transmission_changed)
        self.side = AlarmSide(cfg, on_event=self._event_made, on_annunciation=self._annunciation_changed,
                              heartbeats=self.heartbeats, saved=loaded.state,
                              on_saved_change=self.saver.changed)
        uplink = children["uplink"]
        self.supervisor = UplinkSupervisor(config_path, self.handover, on_request=self._uplink_request,
                                           on_fault=self._storage_fault, on_state=self._uplink_state,
                                           command=uplink.command, env=uplink.env, log_path=uplink.log_path,
                                           on_delivered=self._delivered, first=first.get("uplink"))
        self._recent_delivered: collections.deque[str] = collections.deque(maxlen=RECENT_DELIVERED)
        self.sms_handover: Handover | None = None
        self.sms_supervisor: UplinkSupervisor | None = None
        if "sms" in children:
            # The second path: a child of its own, never routed through the storage/uplink process.
            sms = children["sms"]
            self.sms_handover = Handover()
            self.sms_supervisor = UplinkSupervisor(
                config_path, self.sms_handover, on_request=_no_requests, on_fault=self._storage_fault,
                on_state=self._sms_state, command=sms.command, env=sms.env, log_path=sms.log_path, name="sms",
                first=first.get("sms"))
        self.commands = CommandHandler(self)
        self.control: ControlServer | None = None
        self.selfcheck: SelfCheck | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unstored_at_stop: dict[str, int] = {}

    # ------------------------------------------------------------------------------ what commands use

    @property
    def panel(self) -> Any:
        """The alarm panel (:class:`gateway.panel.alarm_panel.AlarmPanel`)."""
        return self.side.panel

    @property
    def annunciator(self) -> Any:
        """Buzzer, LEDs and relays."""
        return self.side.annunciator

    @property
    def buses(self) -> Mapping[str, Any]:
        """The bus threads by bus id."""
        return self.side.buses

    @property
    def contacts(self) -> Mapping[str, Any]:
        """The GPIO contacts by device id."""
        return self.side.contacts

    @property
    def uplink_pid(self) -> int | None:
        """The storage process's pid while it runs."""
        return self.supervisor.pid if self.supervisor.up else None

    @property
    def uplink_connected(self) -> bool:
        """Whether the storage process is up and connected to the broker (as of its last beat)."""
        return self.supervisor.up and bool(self.supervisor.beat.get("connected"))

    def record(self, event: Event) -> None:
        """Store an event made by an operator action, in order with the panel's own."""
        self.side.panel.record(event)

    async def storage(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ask the storage process; :class:`StorageAway` when it is down or does not answer in time."""
        future = self.supervisor.request(name, args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), STORAGE_REQUEST_TIMEOUT_S)
        except ConnectionError as exc:
            raise StorageAway(str(exc) or "the storage/uplink process is down") from None
        except TimeoutError:
            raise StorageAway("the storage/uplink process did not answer") from None

    async def recent_events(self, **query: Any) -> list[dict[str, Any]]:
        """Stored history from the storage process (``events`` command)."""
        rows: list[dict[str, Any]] = (await self.storage("events", query))["rows"]
        return rows

    async def follow_stored(self, **query: Any) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Newly stored rows after ``after_seq``, as they come (polls the storage process)."""
        after = int(query.pop("after_seq", 0))
        while True:
            try:
                rows = await self.recent_events(after_seq=after, **query)
            except StorageAway:
                rows = []
            if rows:
                after = int(rows[-1]["stored_seq"])
                yield rows
            else:
                await asyncio.sleep(0.2)

    def hold_figures(self) -> dict[str, Any]:
        """The panel's hold of events for the storage process."""
        return {"held_by_panel": len(self.handover.hold), "hold_limit": self.handover.hold.limit,
                "dropped_by_panel": dict(self.handover.hold.dropped)}

    def uplink_process(self) -> dict[str, Any]:
        """Whether the storage/uplink process runs, and since how many starts."""
        sup = self.supervisor
        return {"state": "up" if sup.up else "down", "pid": self.uplink_pid, "starts": sup.starts,
                "last_exit": sup.last_exit}

    # ------------------------------------------------------------------------------ start

    def open(self) -> None:
        """Pins, outputs, saved state and buses; :class:`PanelStartError` when the panel cannot run."""
        if self.cfg.runtime.realtime_priority > SUPPORT_PRIORITY:
            raise_priority(SUPPORT_PRIORITY, "panel")  # every thread started from here on inherits it
        self._check_ports()
        try:
            choice = use_pin_factory(self.cfg.runtime.pin_factory)
            log.info("gpio backend", pin_factory=choice.name, chosen_by=choice.source)
            self.side.start()
        except PanelStartError:
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.side.stop_inputs()
            with contextlib.suppress(Exception):
                self.side.close()
            raise start_error(exc) from exc
        self.handover.start()
        self.saver.start()
        if self._state_problem is not None:
            self.record(Event("fault", "detected", time.monotonic(), code="panel_state",
                              detail=f"saved panel state set aside ({self._state_problem}); started fresh"))
        if self.side.restore_problem is not None:
            self.record(Event("fault", "detected", time.monotonic(), code="panel_state",
                              detail=f"{self.side.restore_problem}; started fresh"))
        if self._state_problem is not None or self.side.restore_problem is not None:
            self.saver.changed()
        log.info("panel started", gateway=self.cfg.gateway_id, version=__version__, devices=len(self.cfg.devices),
                 buses=len(self.cfg.buses), restored=restored_summary(self.side.panel.saved_state()))

    def _check_ports(self) -> None:
        """A serial port that exists but cannot be opened stops the start; an absent one is ``port_lost``."""
        import serial

        for bus in self.cfg.buses:
            if not os.path.exists(bus.port):
                continue
            try:
                serial.Serial(bus.port, baudrate=bus.baudrate, timeout=0).close()
            except (serial.SerialException, OSError) as exc:
                code = EX_NOPERM if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM) else EX_UNAVAILABLE
                raise PanelStartError(f"serial: cannot open {bus.port} (bus {bus.id}): {_reason(exc)}",
                                      code) from exc

    async def serve(self, *, duration: float | None = None) -> int:
        """Run until SIGTERM/SIGINT (or ``duration``); a planned stop; the exit status."""
        notifier = Notifier()
        self._loop = asyncio.get_running_loop()
        await self.start_services()
        watchdog = Watchdog(self.heartbeats, notifier, status_text=self.summary)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, stop.set)
        log.info("panel serving", heap_trimmed=release_startup_heap())
        notifier.ready()
        notifier.status(self.summary())
        watchdog.start()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        finally:
            notifier.stopping()
            watchdog.stop()
            await self.stop()
        return 0

    async def start_services(self) -> None:
        """The storage process, the control socket, the self-check, the loop's heartbeat."""
        self._loop = asyncio.get_running_loop()
        self.supervisor.start()
        if self.sms_handover is not None and self.sms_supervisor is not None:
            self.sms_handover.start()
            self.sms_supervisor.start()
        self.transmission.start()
        control = ControlServer(self.cfg.control, self.commands)
        try:
            await control.start()
        except ControlServerError as exc:
            log.error("control socket unavailable; gatewayctl cannot reach this panel", error=str(exc))
        else:
            self.control = control
        self.heartbeats.register("loop", 10.0)
        self._beating = asyncio.create_task(self._loop_heartbeat(), name="loop-heartbeat")
        self.selfcheck = SelfCheck(self.heartbeats, self.side.panel, watch=on_alarm_path)
        self.selfcheck.start()

    async def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Planned stop: inputs first, every event read stored, then storage and outputs."""
        if self.selfcheck is not None:
            self.selfcheck.stop()
        self.transmission.stop()
        if self.control is not None:
            await self.control.stop()
        await asyncio.to_thread(self.side.stop_inputs)
        # Also when the storage process is away: it may be back within the bound (it is restarted meanwhile).
        stored = await asyncio.to_thread(self.handover.wait_stored, STOP_STORE_TIMEOUT_S)
        if not stored and len(self.handover.hold):
            self._unstored_at_stop = self.handover.hold.by_class()
            log.error("events not stored at stop; counted as dropped", **self._unstored_at_stop)
        await asyncio.to_thread(self.supervisor.stop, flush_timeout_s, STOP_STORAGE_TIMEOUT_S)
        if self.sms_handover is not None and self.sms_supervisor is not None:
            await asyncio.to_thread(self.sms_handover.wait_stored, STOP_SMS_STORE_TIMEOUT_S)
            await asyncio.to_thread(self.sms_supervisor.stop, flush_timeout_s, STOP_STORAGE_TIMEOUT_S)
            self.sms_handover.stop()
        self._beating.cancel()
        self.saver.stop()
        self.saver.save_now()
        self.handover.stop()
        self.side.close()
        log.info("panel stopped", gateway=self.cfg.gateway_id, events_read=self.handover.handed_over,
                 stored_upto=self.handover.committed_upto, boot=self.handover.boot,
                 unstored=self._unstored_at_stop)

    async def _loop_heartbeat(self) -> None:
        while True:
            self.heartbeats.beat("loop")
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------------------ callbacks

    def _saved_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.side.panel.saved_state()
        held = dict(self._unstored_at_stop)
        for name, count in self.handover.hold.unreported_drops.items():
            held[name] = held.get(name, 0) + count
        if held:
            state["unstored_at_stop"] = held
        return state

    def _annunciation_changed(self, annunciation: Annunciation) -> None:
        """From the alarm path: log on the loop, never here."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._log_annunciation, annunciation)

    def _log_annunciation(self, annunciation: Annunciation) -> None:
        log.info("annunciator", sound=annunciation.sound.name.lower(), pattern=self.annunciator.sound_pattern,
                 buzzer="on" if annunciation.sound else "off", leds=sorted(annunciation.leds),
                 relays=sorted(annunciation.relays))

    def _storage_fault(self, code: str, present: bool, detail: str | None) -> None:
        self.side.panel.gateway_fault(code, present, detail)

    # ------------------------------------------------------------------------------ transmission

    def _event_made(self, event: Event) -> None:
        """Every event the panel makes (from the alarm path: queue puts and dictionary inserts only)."""
        self.handover.put(event)
        self.transmission.note(event)
        if self.sms_handover is not None and event.kind in SMS_KINDS:
            self.sms_handover.put(event)

    def _delivered(self, keys: list[str]) -> None:
        """The broker acknowledged these urgent events (from the uplink reader thread)."""
        self.transmission.delivered(keys)
        if self.sms_handover is not None:
            self._recent_delivered.extend(keys)
            self.sms_handover.send(link.encode("delivered", keys=keys))

    def _path_up(self) -> tuple[bool, str]:
        """Whether the path to the broker is up now and, if not, why (a dead uplink process is a path down)."""
        sup = self.supervisor
        if not sup.up:
            return False, f"uplink process down ({sup.last_exit or 'starting'})"
        if sup.silent_s > BEAT_STALE_S:
            return False, f"uplink process silent for {sup.silent_s:.0f} s"
        if sup.beat.get("connected"):
            return True, ""
        return False, f"broker unreachable ({sup.beat.get('last_error') or 'not connected'})"

    def _transmission_changed(self, present: bool, detail: str | None) -> None:
        """The transmission fault came or went (on the monitor's thread)."""
        self.side.panel.gateway_fault(TRANSMISSION_FAULT, present, detail)
        if self.sms_handover is not None:
            self.sms_handover.send(link.encode("transmission", present=present, detail=detail))

    # ------------------------------------------------------------------------------ the SMS path

    def _sms_state(self, up: bool, reason: str) -> None:
        """The SMS process connected (after its held events): tell it the path's state and recent PUBACKs."""
        handover = self.sms_handover
        if handover is None:
            return
        if up:
            log.info("sms process connected", pid=self.sms_supervisor.pid if self.sms_supervisor else None)
            recent = list(self._recent_delivered)
            if recent:
                handover.send(link.encode("delivered", keys=recent))
            present = self.transmission.present
            handover.send(link.encode("transmission", present=present is not None, detail=present))
        elif self.sms_supervisor is not None and not self.sms_supervisor.stopping:
            log.warning("sms process away; the panel holds what it owes", reason=reason)

    async def _sms_request(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        sup = self.sms_supervisor
        if sup is None:
            raise StorageAway("no [sms] modem configured")
        future = sup.request(name, args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), STORAGE_REQUEST_TIMEOUT_S)
        except ConnectionError as exc:
            raise StorageAway(str(exc).replace("storage/uplink", "sms") or "the sms process is down") from None
        except TimeoutError:
            raise StorageAway("the sms process did not answer") from None

    async def sms_status(self) -> dict[str, Any]:
        """The SMS path for ``gatewayctl status``: modem, queue, contacts by role (never a number)."""
        if self.sms_supervisor is None:
            return {"configured": False}
        try:
            data = await self._sms_request("sms_status", {})
        except (StorageAway, RuntimeError) as exc:
            return {"configured": True, "process": "down", "reason": str(exc)}
        return {"configured": True, "process": "up", **data}

    async def sms_test(self, number: str) -> dict[str, Any]:
        """Queue a test message to ``number`` and wait briefly for the modem's answer."""
        return await self._sms_request("sms_test", {"number": number})

    async def _sms_view(self) -> dict[str, Any]:
        """The SMS path for the storage process's status and birth: answered well inside its request's wait."""
        try:
            return await asyncio.wait_for(self.sms_status(), SMS_VIEW_TIMEOUT_S)
        except TimeoutError:
            return {"configured": True, "process": "down", "reason": "the sms process did not answer"}

    def transmission_figures(self) -> dict[str, Any]:
        """The transmission path for ``gatewayctl status``."""
        return self.transmission.figures()

    def _uplink_state(self, up: bool, reason: str) -> None:
        if up:
            log.info("storage/uplink process connected", pid=self.supervisor.pid, held=len(self.handover.hold))
        elif not self.supervisor.stopping:
            log.warning("storage/uplink process away; the panel holds its events", reason=reason)

    def _uplink_request(self, name: str, args: dict[str, Any], answer: Any) -> None:
        """A request from the storage process (on its reader thread): run it on the loop, answer after."""
        loop = self._loop
        if loop is None:
            answer({"error": "the panel is starting"}, False)
            return

        async def run() -> dict[str, Any]:
            if name == "panel":
                return {**self.panel_view(), "sms": await self._sms_view()}
            if name == "command":
                result = await self.commands.handle(str(args.get("command")), args.get("args") or {},
                                                    source=str(args.get("source", "mqtt")))
                return {"ok": result.ok, "reason": result.reason, "data": _plain(result.data)}
            raise ValueError(f"unknown request {name!r}")

        def done(future: Future[dict[str, Any]]) -> None:
            exc = future.exception()
            if exc is None:
                answer(future.result(), True)
            else:
                answer({"error": f"{type(exc).__name__}: {exc}"}, False)

        asyncio.run_coroutine_threadsafe(run(), loop).add_done_callback(done)

    def panel_view(self) -> dict[str, Any]:
        """The panel's state for the storage process's birth and status messages."""
        return {
            "snapshot": link.snapshot_to_wire(self.panel.snapshot()),
            "buses": [{"id": bus_id, "polls": p.polls, "errors": p.errors, "port_lost": p.port_lost,
                       "paused": p.paused, "floor_s": p.floor_s, "cycle_s": p.cycle_s,
                       "errors_by_kind": dict(p.errors_by_kind)}
                      for bus_id, p in self.buses.items()],
            "hold": self.hold_figures(),
            "transmission": self.transmission_figures(),
        }

    def summary(self) -> str:
        """A one-line state for systemd's STATUS=."""
        snap = self.panel.snapshot()
        faults = sum(1 for d in snap["devices"] if d["faults"])
        return (f"{len(snap['devices']) - faults} devices ok, {faults} fault, "
                f"storage {'up' if self.supervisor.up else 'down'}, "
                f"uplink {'up' if self.uplink_connected else 'down'}, held {len(self.handover.hold)}")


def _no_requests(name: str, args: dict[str, Any], answer: Any) -> None:
    """The SMS process asks the panel nothing."""
    answer({"error": f"unknown request {name!r}"}, False)


def _plain(value: Any) -> Any:
    """Command data as JSON values (tuples to lists, enums by value, anything else JSON lacks as its str)."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=str))


def _reason(exc: BaseException) -> str:
    err = getattr(exc, "strerror", None)
    text = err if err else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def start_error(exc: BaseException) -> PanelStartError:
    """The one line and exit status for a panel that could not start because of ``exc``."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if getattr(exc, "line", None):  # drivers.gpio's own clear errors carry their line
        return PanelStartError(str(exc.line), EX_UNAVAILABLE)  # type: ignore[attr-defined]
    if module.startswith("gpiozero"):
        if "InUse" in name:
            return PanelStartError(f"gpio: pin already in use: {_reason(exc)}", EX_UNAVAILABLE)
        return PanelStartError(f"gpio: {name}: {_reason(exc)}", EX_UNAVAILABLE)
    if isinstance(exc, PermissionError):
        return PanelStartError(f"start: permission denied: {_reason(exc)} ({getattr(exc, 'filename', '')})",
                               EX_NOPERM)
    if isinstance(exc, OSError):
        return PanelStartError(f"start: {_reason(exc)} ({getattr(exc, 'filename', '') or name})", EX_OSERR)
    return PanelStartError(f"start: {name}: {_reason(exc)}", EX_SOFTWARE)
