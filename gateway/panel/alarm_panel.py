"""The alarm panel: the one door into the pure alarm core from threads.

Bus threads, GPIO callbacks, the ticker and operator commands all call the panel. It serialises them with
a lock that guards only in-memory state (never held across disk or network I/O), reads the clock under
that lock (so the core sees time in order), shows the resulting :class:`~gateway.annunciation.Annunciation` on
the annunciator *before* anything else, then hands copies of the events to the sink (the hand-over's queue,
:mod:`gateway.panel.handover`) in the order the core produced them. The sink must not block.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from drivers.profiles import GasReading, StationReading
from gateway.annunciation import Annunciation
from gateway.events import Event
from gateway.panel.annunciator import Annunciator
from gateway.panel.core import AlarmCore, ResetResult, WalkTestResult

__all__ = ["AlarmPanel"]

log = structlog.get_logger()

#: Event kinds that change what :class:`gateway.panel.state.StateSaver` keeps.
SAVED_KINDS = frozenset({"alarm", "reset", "silence", "test", "relay"})


class AlarmPanel:
    """Thread-safe front of :class:`AlarmCore` that drives the :class:`Annunciator`."""

    def __init__(
        self,
        core: AlarmCore,
        annunciator: Annunciator,
        sink: Callable[[Event], None],
        *,
        on_annunciation: Callable[[Annunciation], None] | None = None,
        on_saved_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_saved_change`` is called (after the pins moved) when latches, silence, walk tests or relays
        may have changed; it must only set a flag (:class:`gateway.panel.state.StateSaver`)."""
        self.core = core
        self._on_saved_change = on_saved_change
        self.annunciator = annunciator
        self._sink = sink
        self._on_annunciation = on_annunciation
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()  # the core and the annunciation shown
        # What the core produced, in its order, until handed on; whoever holds _handoff drains it (see _run).
        self._pending: collections.deque[tuple[Annunciation | None, list[Event], float]] = collections.deque()
        self._handoff = threading.Lock()
        self._shown = Annunciation()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ inputs (any thread)

    def reading(self, device_id: str, reading: GasReading) -> None:
        """A detector answered."""
        self._apply(self.core.reading, device_id, reading)

    def station(self, device_id: str, reading: StationReading) -> None:
        """An extinguisher station on a bus answered."""
        self._apply(self.core.station, device_id, reading)

    def contact(self, device_id: str, active: bool) -> None:
        """A GPIO contact changed."""
        self._apply(self.core.contact, device_id, active)

    def contact_fault(self, device_id: str, plausible: bool) -> None:
        """A supervised contact pair became (im)plausible."""
        self._apply(self.core.contact_fault, device_id, not plausible)

    def poll_failed(self, device_id: str, reason: str) -> None:
        """A poll failed."""
        self._apply(self.core.poll_failed, device_id, reason)

    def port_state(self, bus_id: str, lost: bool, detail: str | None = None) -> None:
        """A serial port was lost or came back."""
        self._run(lambda now: self.core.port_state(bus_id, lost, now, detail))

    def stale_thread(self, name: str, stale: bool) -> None:
        """A watched part of the gateway stopped beating, or beats again (:mod:`gateway.panel.selfcheck`)."""
        self._run(lambda now: self.core.stale_thread(name, stale, now))

    def gateway_fault(self, code: str, present: bool, detail: str | None = None) -> None:
        """A fault of the gateway itself (storage full, storage error) was raised or cleared."""
        self._run(lambda now: self.core.gateway_fault(code, present, now, detail))

    def tick(self) -> None:
        """Let time-based rules run."""
        self._run(self.core.tick)

    # ------------------------------------------------------------------------------ operator actions

    def silence(self, source: str) -> None:
        """Mute the sounder for what is active now (``source``: who asked, e.g. ``cli``, ``mqtt``)."""
        self._run(lambda now: self.core.silence(now, source))

    def reset(self, device_id: str | None, source: str) -> ResetResult:
        """Reset latched alarms (and end walk tests); raises KeyError for an unknown device."""
        result: list[ResetResult] = []

        def run(now: float) -> list[Event]:
            events, outcome = self.core.reset(device_id, now, source)
            result.append(outcome)
            return events

        self._run(run)
        return result[0]

    def test(self, device_id: str | None, source: str) -> WalkTestResult:
        """Start a walk test (devices in alarm, supervisory or fault are skipped); raises KeyError for an
        unknown device."""
        result: list[WalkTestResult] = []

        def run(now: float) -> list[Event]:
            events, outcome = self.core.test(device_id, now, source)
            result.append(outcome)
            return events

        self._run(run)
        return result[0]

    def polling_paused(self, bus_id: str, paused: bool, source: str | None = None, detail: str | None = None) -> None:
        """Polling of a bus paused or resumed: a trouble signal while paused (:meth:`AlarmCore.polling_paused`)."""
        self._run(lambda now: self.core.polling_paused(bus_id, paused, now, source, detail))

    def restore(self, events: list[Event]) -> None:
        """Show and hand on what :meth:`AlarmCore.restore` gave back (at start, before the first poll)."""
        self._run(lambda _now: events)

    def record(self, event: Event) -> None:
        """Hand on an event made outside the core (an operator action), in order with the core's."""
        with self._lock:
            self._pending.append((None, [event], self._wall()))
        self._hand_on()

    def saved_state(self) -> dict[str, Any]:
        """What must survive a restart (:meth:`AlarmCore.saved_state`), taken under the panel's lock."""
        with self._lock:
            return self.core.saved_state(self._clock())

    def snapshot(self) -> dict[str, Any]:
        """Devices, active conditions and the annunciation, consistent with each other."""
        with self._lock:
            return {
                "devices": [self.core.device_state(d) for d in self.core.device_ids()],
                "active": self.core.active(),
                "annunciation": self._shown,
                "now": self._clock(),
            }

    # ------------------------------------------------------------------------------ ticker

    def start_ticker(self, interval_s: float = 0.5, heartbeat: Callable[[], None] | None = None) -> None:
        """Run :meth:`tick` in its own thread, so timed rules never wait on the loop."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.tick()
                if heartbeat is not None:
                    heartbeat()

        self._ticker = threading.Thread(target=run, name="alarm-ticker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Stop the ticker."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    # ------------------------------------------------------------------------------ internals

    def _apply(self, method: Callable[..., list[Event]], device_id: str, value: Any) -> None:
        self._run(lambda now: method(device_id, value, now))

    def _run(self, step: Callable[[float], list[Event]]) -> None:
        """Run one core step, show its annunciation, then hand its events on — in that order."""
        with self._lock:
            now = self._clock()
            events = step(now)
            annunciation = self.core.annunciation(now)
            changed = annunciation != self._shown
            if changed:
                self.annunciator.show(annunciation)
                self._shown = annunciation
            if changed or events:
                self._pending.append((annunciation if changed else None, events, self._wall()))
        if self._on_saved_change is not None and any(e.kind in SAVED_KINDS for e in events):
            self._on_saved_change()
        self._hand_on()

    def _hand_on(self) -> None:
        """Deliver pending results in order. Never waits: a thread that finds another one delivering leaves
        its results to it and returns — no lock may stand between an alarm and the buzzer for longer than
        in-memory work. Whoever releases the lock looks again, so nothing is left behind."""
        while self._pending:
            if not self._handoff.acquire(blocking=False):
                return
            try:
                while self._pending:
                    annunciation, events, wall = self._pending.popleft()
                    if annunciation is not None and self._on_annunciation is not None:
                        self._deliver(self._on_annunciation, annunciation)
                    for event in events:
                        self._deliver(self._sink, event.at_wall(wall))
            finally:
                self._handoff.release()

    @staticmethod
    def _deliver(target: Callable[[Any], None], item: Any) -> None:
        """A failing consumer must not stop the caller (a bus thread, a GPIO callback)."""
        try:
            target(item)
        except Exception:
            log.exception("alarm panel consumer failed", item=repr(item))
