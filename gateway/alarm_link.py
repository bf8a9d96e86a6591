"""The alarm path in a process of its own, joined to the daemon by one socket.

With ``runtime.alarm_process`` on, ``gatewayd`` forks before its asyncio loop starts. The child runs an
:class:`AlarmHost`: the :class:`~gateway.panel.side.AlarmSide` (bus threads, GPIO contacts, alarm panel,
annunciator), its own self-check, and nothing else — so it shares no interpreter lock with the loop, the
outbox or the uplink, and a busy loop cannot delay a buzzer. The parent's :class:`AlarmLink` receives
copies of events and annunciations and hands them to the loop through the bridge, exactly as the panel
does when both halves share a process; operator commands, status snapshots, bus requests (``read``,
``scan``) and storage faults travel the other way as requests.

Wire: :class:`multiprocessing.connection.Connection` (length-prefixed pickles) over a Unix socket pair. The
host sends lists of ``(kind, …)`` items from one writer thread, so the alarm path only appends to a queue.
Every :data:`BEAT_S` the host reports when each of its parts last beat and the daemon's heartbeats mirror
them (and beat ``alarm-process``), so a stuck bus thread in the child still stops the systemd watchdog
feed, by name. When the link breaks, the host stops (its parent is gone) and the daemon stops with an
error, for systemd to restart.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from typing import Any

import structlog

from drivers.modbus import ModbusClient, ModbusDevice
from gateway.config import BusConfig, SiteConfig
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.panel.core import Annunciation, ResetResult
from gateway.panel.selfcheck import SelfCheck, on_alarm_path
from gateway.panel.side import AlarmSide, bus_drivers
from gateway.realtime import SWITCH_INTERVAL_S, raise_priority, release_startup_heap

__all__ = ["AlarmHost", "AlarmLink", "AlarmLinkError", "fork_alarm_process", "prepare_alarm_process"]

log = structlog.get_logger()

#: How often the host reports its health (seconds); the parent's ``alarm-process`` deadline is a few of these.
BEAT_S = 0.5
LINK_DEADLINE_S = 5.0
#: How long a request from the daemon may wait for the alarm process before it fails.
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
MAX_BATCH = 512
PART = "alarm-process"
#: SCHED_FIFO priority of the alarm process's other threads (link writer, requests, self-check): the lowest
#: realtime one, below every alarm thread, yet above every normal process.
SUPPORT_PRIORITY = 1
#: Parts of the alarm process whose name the daemon uses for one of its own.
MIRRORED_NAMES = {"selfcheck": "alarm-selfcheck"}


class AlarmLinkError(RuntimeError):
    """The alarm process did not answer, or is gone."""


# ------------------------------------------------------------------------------------------- host (child)


class AlarmHost:
    """The alarm process's side: runs the :class:`AlarmSide` and serves the daemon's requests."""

    def __init__(self, cfg: SiteConfig, sock: socket.socket, *,
                 on_pins_ready: Callable[[AlarmSide], None] | None = None) -> None:
        self.cfg = cfg
        self._conn = Connection(sock.detach())
        self._out: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.heartbeats = Heartbeats()
        self.side = AlarmSide(
            cfg, heartbeats=self.heartbeats,
            on_event=lambda event: self._out.put(("event", event)),
            on_annunciation=lambda annunciation: self._out.put(("annunciation", annunciation)),
            on_pins_ready=None if on_pins_ready is None else lambda: on_pins_ready(self.side),
        )
        self.selfcheck: SelfCheck | None = None
        self._writer = threading.Thread(target=self._write, name="alarm-link-writer", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start the alarm path and the writer; tell the daemon it is ready (or why it failed)."""
        self._writer.start()
        try:
            self.side.start()
        except Exception as exc:
            log.exception("alarm process failed to start")
            self._out.put(("failed", f"{type(exc).__name__}: {exc}"))
            raise
        self.selfcheck = SelfCheck(self.heartbeats, self.side.panel, watch=on_alarm_path)
        self.selfcheck.start()
        self._out.put(("ready", os.getpid()))

    def serve(self) -> None:
        """Answer requests until the daemon says stop or the link breaks; then stop the alarm path."""
        try:
            while True:
                try:
                    data = self._conn.recv_bytes()
                except (EOFError, OSError):
                    log.error("alarm link closed by the daemon; the alarm process stops")
                    return
                try:
                    message = pickle.loads(data)
                    if message[0] == "stop":
                        return
                    self._handle(message)
                except Exception:  # a request this side cannot take must not stop the alarm path
                    log.exception("alarm link: a request could not be handled")
        finally:
            self._shutdown()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, request_id = message[0], message[1]
        try:
            if kind == "submit":
                future = self.side.buses[message[2]].submit(message[3])
                future.add_done_callback(lambda f: self._reply(request_id, f))
                return
            value = self._local(message)
        except Exception as exc:  # handed back to the caller, which raises it
            if request_id is None:
                log.exception("alarm link: request failed", target=message[2], name=message[3])
            else:
                self._out.put(("reply", request_id, False, _portable(exc)))
        else:
            if request_id is not None:
                self._out.put(("reply", request_id, True, value))

    def _local(self, message: tuple[Any, ...]) -> Any:
        kind, _, target, name = message[:4]
        if name.startswith("_"):
            raise AttributeError(f"{name} is not offered over the alarm link")
        obj = self._target(target)
        if kind == "get":
            return getattr(obj, name)
        args, kwargs = message[4], message[5]
        return getattr(obj, name)(*args, **kwargs)

    def _target(self, target: str) -> Any:
        side = self.side
        if target == "side":
            return side
        if target == "panel":
            return side.panel
        if target == "annunciator":
            return side.annunciator
        kind, _, key = target.partition(":")
        if kind == "bus":
            return side.buses[key]
        if kind == "contact":
            return side.contacts[key]
        raise KeyError(f"no {target!r} in the alarm process")

    def _reply(self, request_id: int, future: Future[Any]) -> None:
        if future.cancelled():
            self._out.put(("reply", request_id, False, AlarmLinkError("the bus request was cancelled")))
        elif (exc := future.exception()) is not None:
            self._out.put(("reply", request_id, False, _portable(exc)))
        else:
            self._out.put(("reply", request_id, True, future.result()))

    def _write(self) -> None:
        """The one thread that writes to the link: batches of queued items, and a health report every BEAT_S."""
        next_beat = 0.0
        while True:
            now = time.monotonic()
            try:
                item = self._out.get(timeout=max(0.0, next_beat - now))
            except queue.Empty:
                item = ("idle",)
            batch: list[tuple[Any, ...]] = []
            done = item is None
            if item is not None and item[0] != "idle":
                batch.append(item)
            while not done and len(batch) < MAX_BATCH:
                try:
                    more = self._out.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    batch.append(more)
            if time.monotonic() >= next_beat:
                deadlines, ages = self.heartbeats.deadlines(), self.heartbeats.snapshot()
                batch.append(("beat", {name: (deadlines[name], age) for name, age in ages.items()
                                       if name in deadlines}))
                next_beat = time.monotonic() + BEAT_S
            if batch:
                try:
                    self._conn.send([_encoded(item) for item in batch])
                except OSError:
                    return  # the daemon is gone; serve() sees the link close
                except Exception:  # must not end this thread: it carries every event and answer
                    log.exception("alarm link: a batch could not be sent", items=len(batch))
            if done:
                return

    def close(self) -> None:
        """Stop the alarm path, send what is queued (a start-up failure, the last events) and close the link."""
        self._shutdown()

    def _shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.selfcheck is not None:
            self.selfcheck.stop()
        with contextlib.suppress(AttributeError):  # start failed before the panel existed
            self.side.stop_inputs()
        with contextlib.suppress(AttributeError):
            self.side.close()
        self._out.put(None)
        self._writer.join(timeout=5)
        self._conn.close()


def _encoded(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """A reply's value pickled on its own, so that one the daemon cannot take (or this side cannot give)
    fails that request alone, never the batch with its events."""
    if item[0] != "reply":
        return item
    _, request_id, ok, value = item
    try:
        return ("reply", request_id, ok, pickle.dumps(value))
    except Exception as exc:
        error = AlarmLinkError(f"the answer could not be sent: {type(exc).__name__}: {exc}")
        return ("reply", request_id, False, pickle.dumps(error))


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else an :class:`AlarmLinkError` carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return AlarmLinkError(f"{type(exc).__name__}: {exc}")
    return exc


def fork_alarm_process(cfg: SiteConfig) -> tuple[int, socket.socket]:
    """Fork the alarm process (call before any thread or event loop exists); returns its pid and the link.

    The child ignores SIGINT and SIGTERM (the daemon stops it over the link, after its last events are in)
    and exits when the link closes.
    """
    import gc

    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    gc.collect()
    gc.freeze()  # start-up objects stay shared, not copied, between the two processes
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, parent_end
    code = 1
    try:
        parent_end.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _name_process(b"gatewayd-alarm")
        code = run_alarm_process(cfg, child_end)
    finally:
        os._exit(code)


def _name_process(name: bytes) -> None:
    """Show the alarm process as ``name`` in ps and top (``/proc/PID/comm``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def prepare_alarm_process(cfg: SiteConfig) -> None:
    """Tune the calling thread, before it starts the alarm path, for the process that hosts it.

    Its threads share one interpreter lock, which a bus thread must get back within the switch interval.
    A thread of normal priority that holds it can be preempted by any other process and keep it for a
    whole time slice, so, when the alarm threads are realtime, this thread and every thread it starts
    (they inherit its policy) run ``SCHED_FIFO`` at :data:`SUPPORT_PRIORITY`; the alarm threads then raise
    themselves above it.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if cfg.runtime.realtime_priority > SUPPORT_PRIORITY:
        raise_priority(SUPPORT_PRIORITY, "alarm-process")


def run_alarm_process(cfg: SiteConfig, sock: socket.socket) -> int:
    """The alarm process's main: start the alarm path, serve the link until it closes; the exit status."""
    prepare_alarm_process(cfg)
    host = AlarmHost(cfg, sock)
    try:
        host.start()
    except Exception:
        host.close()
        return 1
    if cfg.runtime.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
        release_startup_heap()
    log.info("alarm process started", pid=os.getpid(), buses=len(host.side.buses), contacts=len(host.side.contacts))
    host.serve()
    return 0


# ------------------------------------------------------------------------------------------- link (daemon)


class AlarmLink:
    """The daemon's end: a reader thread delivering events, annunciations, replies and health reports."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        heartbeats: Heartbeats,
        on_event: Callable[[Event], None],
        on_annunciation: Callable[[Annunciation], None],
        on_lost: Callable[[str], None],
        pid: int | None = None,
    ) -> None:
        self._conn = Connection(sock.detach())
        self._heartbeats = heartbeats
        self._on_event = on_event
        self._on_annunciation = on_annunciation
        self._on_lost = on_lost
        self.pid = pid
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._ready: Future[int] = Future()
        self._reader = threading.Thread(target=self._read, name="alarm-link-reader", daemon=True)
        self.lost: str | None = None
        self._mirrored: set[str] = set()
        self._closing = False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Start reading; wait until the alarm process has its pins and buses (its pid)."""
        self._heartbeats.register(PART, LINK_DEADLINE_S)
        self._reader.start()
        try:
            return self._ready.result(timeout=timeout_s)
        except FutureTimeout:
            raise AlarmLinkError(f"the alarm process did not start within {timeout_s:.0f} s") from None

    # ------------------------------------------------------------------------------ requests

    def request(self, message: tuple[Any, ...]) -> Future[Any]:
        """Send ``(kind, None, …)`` with a fresh request id in place of None; the future gets the reply."""
        future: Future[Any] = Future()
        if self.lost is not None:
            future.set_exception(AlarmLinkError(f"alarm process lost: {self.lost}"))
            return future
        request_id = next(self._ids)
        with self._pending_lock:
            self._pending[request_id] = future
        try:
            self._send((message[0], request_id, *message[2:]))
        except Exception as exc:  # lost link, or a request that does not pickle
            with self._pending_lock:
                self._pending.pop(request_id, None)
            if future.set_running_or_notify_cancel():
                future.set_exception(exc if isinstance(exc, AlarmLinkError)
                                     else AlarmLinkError(f"the request could not be sent: {exc}"))
        return future

    def call(self, target: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """``target.name(*args, **kwargs)`` in the alarm process; its result, or its exception raised here."""
        return self._wait(self.request(("call", None, target, name, args, kwargs)))

    def get(self, target: str, name: str) -> Any:
        """``target.name`` in the alarm process."""
        return self._wait(self.request(("get", None, target, name)))

    def cast(self, target: str, name: str, *args: Any) -> None:
        """``target.name(*args)`` in the alarm process, without waiting; a lost link is logged, not raised."""
        if self.lost is None:
            try:
                self._send(("call", None, target, name, args, {}))
            except Exception:
                log.exception("alarm link: request not sent", target=target, name=name)

    def submit(self, bus_id: str, work: Callable[[ModbusClient], Any]) -> Future[Any]:
        """Run ``work(client)`` (picklable) on bus ``bus_id``'s thread in the alarm process."""
        return self.request(("submit", None, bus_id, work))

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the alarm process to stop its inputs and outputs and exit; wait for it (best effort)."""
        self._closing = True
        if self.lost is None:
            with contextlib.suppress(AlarmLinkError):
                self._send(("stop",))
        self._reader.join(timeout=timeout_s)
        for name in (PART, *self._mirrored):
            self._heartbeats.unregister(name)
        if self.pid is not None:
            _reap(self.pid, timeout_s)
        with contextlib.suppress(OSError):
            self._conn.close()

    def _wait(self, future: Future[Any]) -> Any:
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            raise AlarmLinkError(f"the alarm process did not answer within {CALL_TIMEOUT_S:.0f} s") from None

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as exc:
            self._fail(f"send: {exc}")
            raise AlarmLinkError(f"alarm process lost: {exc}") from exc

    # ------------------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        while True:
            try:
                batch = self._conn.recv()
            except EOFError:
                self._fail("the alarm process closed the link")
                return
            except Exception as exc:  # OSError, or a batch that does not unpickle: the protocol is broken
                log.exception("alarm link: reading failed")
                self._fail(f"reading the link failed: {type(exc).__name__}: {exc}")
                return
            for item in batch:
                try:
                    self._dispatch(item)
                except Exception:
                    log.exception("alarm link: item not handled", kind=item[0])

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "event":
            self._on_event(item[1])
        elif kind == "annunciation":
            self._on_annunciation(item[1])
        elif kind == "reply":
            _, request_id, ok, data = item
            with self._pending_lock:
                future = self._pending.pop(request_id, None)
            try:
                value = pickle.loads(data)
            except Exception as exc:
                ok, value = False, AlarmLinkError(f"the answer could not be read: {type(exc).__name__}: {exc}")
            if future is not None and future.set_running_or_notify_cancel():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        elif kind == "beat":
            self._mirror(item[1])
        elif kind == "ready":
            self._ready.set_result(item[1])
        elif kind == "failed":
            self._ready.set_exception(AlarmLinkError(f"the alarm process failed to start: {item[1]}"))

    def _mirror(self, parts: dict[str, tuple[float, float]]) -> None:
        """The alarm process's parts beat here too, at the moment they last beat there and under their own
        names (its ``selfcheck`` as ``alarm-selfcheck``): a part goes stale here when it does there, and
        the systemd watchdog names it."""
        now = time.monotonic()
        self._heartbeats.beat(PART, now)
        for name, (deadline, age) in parts.items():
            local = MIRRORED_NAMES.get(name, name)
            if local not in self._mirrored:
                self._mirrored.add(local)
                self._heartbeats.register(local, deadline, now=now - age)
            else:
                self._heartbeats.beat(local, now - age)

    def _fail(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(AlarmLinkError(f"alarm process lost: {reason}"))
        if not self._ready.done():
            self._ready.set_exception(AlarmLinkError(f"the alarm process ended during start-up: {reason}"))
        if not self._closing:
            self._on_lost(reason)


def _reap(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    log.error("alarm process did not exit; killing it", pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# ------------------------------------------------------------------------------------------- proxies


class RemotePanel:
    """The daemon's view of the alarm panel in the alarm process (the calls the loop side makes)."""

    def __init__(self, link: AlarmLink) -> None:
        self._link = link

    def silence(self, source: str) -> None:
        """Mute the sounder for what is active now."""
        self._link.call("panel", "silence", source)

    def reset(self, device_id: str | None, source: str) -> ResetResult:
        """Reset latched alarms; raises KeyError for an unknown device."""
        result: ResetResult = self._link.call("panel", "reset", device_id, source)
        return result

    def test(self, device_id: str | None, source: str) -> None:
        """Start a walk test."""
        self._link.call("panel", "test", device_id, source)

    def snapshot(self) -> dict[str, Any]:
        """Devices, active conditions and the annunciation, as the alarm process has them now."""
        snap: dict[str, Any] = self._link.call("panel", "snapshot")
        return snap

    def gateway_fault(self, code: str, present: bool, detail: str | None = None) -> None:
        """A fault of the daemon's half (storage) raised or cleared; not waited for."""
        self._link.cast("panel", "gateway_fault", code, present, detail)

    def stale_thread(self, name: str, stale: bool) -> None:
        """A part of the daemon's half stopped beating (the loop); not waited for."""
        self._link.cast("panel", "stale_thread", name, stale)


class RemoteAnnunciator:
    """The daemon's view of the annunciator in the alarm process."""

    def __init__(self, link: AlarmLink) -> None:
        self._link = link

    @property
    def current(self) -> Annunciation:
        """The annunciation shown."""
        value: Annunciation = self._link.get("annunciator", "current")
        return value

    @property
    def sound_pattern(self) -> str:
        """Name of the pattern the buzzer plays."""
        return str(self._link.get("annunciator", "sound_pattern"))

    @property
    def buzzer_on(self) -> bool:
        """Whether the buzzer pin is on now."""
        return bool(self._link.get("annunciator", "buzzer_on"))

    @property
    def relay_states(self) -> dict[str, bool]:
        """Relay outputs by id."""
        value: dict[str, bool] = self._link.get("annunciator", "relay_states")
        return value

    def play(self, pattern: Any, seconds: float) -> None:
        """Play ``pattern`` for ``seconds`` (buzzer test)."""
        self._link.call("annunciator", "play", pattern, seconds)

    def set_relay(self, relay_id: str, on: bool) -> None:
        """Switch a relay (relay test)."""
        self._link.call("annunciator", "set_relay", relay_id, on)


class RemoteBus:
    """The daemon's view of one bus thread in the alarm process."""

    def __init__(self, link: AlarmLink, bus: BusConfig, devices: list[ModbusDevice]) -> None:
        self._link = link
        self._target = f"bus:{bus.id}"
        self.bus = bus
        self.devices = devices
        self.deadline_s = max(10.0, 3 * (len(devices) * (bus.timeout_s + 0.1) + bus.poll_interval_s))

    @property
    def polls(self) -> int:
        """Polls made."""
        return int(self._link.get(self._target, "polls"))

    @property
    def errors(self) -> int:
        """Polls that got no valid answer."""
        return int(self._link.get(self._target, "errors"))

    @property
    def port_lost(self) -> bool:
        """Whether the serial port is gone."""
        return bool(self._link.get(self._target, "port_lost"))

    @property
    def paused(self) -> bool:
        """Whether polling is paused."""
        return bool(self._link.get(self._target, "paused"))

    def pause(self, paused: bool) -> None:
        """Pause or resume polling."""
        self._link.call(self._target, "pause", paused)

    def submit(self, work: Callable[[ModbusClient], Any]) -> Future[Any]:
        """Run ``work(client)`` on the bus thread (``work`` must pickle: a driver's method, a partial)."""
        return self._link.submit(self.bus.id, work)


class RemoteContact:
    """The daemon's view of one GPIO contact in the alarm process."""

    def __init__(self, link: AlarmLink, device_id: str, contact: str) -> None:
        self._link = link
        self._target = f"contact:{device_id}"
        self.contact = contact

    @property
    def is_closed(self) -> bool:
        """Whether the contact is closed."""
        return bool(self._link.get(self._target, "is_closed"))

    @property
    def is_active(self) -> bool:
        """Whether the contact signals its condition."""
        return bool(self._link.get(self._target, "is_active"))

    @property
    def is_plausible(self) -> bool:
        """Whether a supervised pair agrees."""
        return bool(self._link.get(self._target, "is_plausible"))


class RemoteAlarmSide:
    """The :class:`AlarmSide` interface for a daemon whose alarm path runs in the alarm process."""

    def __init__(self, cfg: SiteConfig, link: AlarmLink) -> None:
        self.cfg = cfg
        self.link = link
        self.panel = RemotePanel(link)
        self.annunciator = RemoteAnnunciator(link)
        self.buses = {bus.id: RemoteBus(link, bus, bus_drivers(cfg, bus.id)) for bus in cfg.buses}
        self.contacts = {d.id: RemoteContact(link, d.id, d.contact) for d in cfg.devices if d.pin is not None}

    def start(self) -> None:
        """Wait for the alarm process to be up."""
        pid = self.link.start()
        log.info("alarm path runs in its own process", pid=pid)

    def stop_inputs(self) -> None:
        """Stop the bus threads and the ticker in the alarm process; their last events arrive before this returns."""
        with contextlib.suppress(AlarmLinkError):
            self.link.call("side", "stop_inputs")

    def close(self) -> None:
        """Stop the alarm process (its bus threads, then its outputs) and wait for it to exit."""
        self.link.stop()
