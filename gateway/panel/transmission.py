"""Supervision of the transmission path: has the central server got what the panel raised?

EN 54-21 asks routing equipment for a fault warning when the receiving end has not acknowledged an alarm in
time, and EN 50136 for each path's loss to be reported. The panel learns from the storage/uplink process when
the broker acknowledged (PUBACK) each alarm, supervisory and fault event (link message ``delivered``), and
whether the broker is reachable (its ``beat``; a dead or restarting uplink process is a path that is down).

:class:`TransmissionWatch` is the rule, pure like :class:`~gateway.panel.core.AlarmCore` (time passed in):

- the ``transmission`` fault is present while an urgent event has waited longer than ``ack_deadline_s`` for
  its PUBACK, or the path has been down longer than ``path_down_s`` even with nothing waiting;
- it clears by itself once the path is up and nothing has waited past the deadline.

:class:`TransmissionMonitor` runs it on a thread of its own and raises or clears the fault on the panel
(trouble chirp, fault LED, event, status) — it never runs on the alarm path: the alarm path only notes an
event (a dictionary insert under a lock that guards nothing else).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from gateway.config import TransmissionConfig
from gateway.events import Event, Priority, event_delivery_key

__all__ = ["FAULT_CODE", "TransmissionMonitor", "TransmissionWatch"]

log = structlog.get_logger()

#: The fault's code in events, status and the LED/chirp it shares with every fault.
FAULT_CODE = "transmission"
#: Urgent events tracked at most while the path is down (a flapping detector with no broker for a day). Over it
#: the newest is not tracked: the oldest decides whether the fault is present.
WAITING_LIMIT = 10_000
#: How often the monitor looks (the fault appears at most this long after its deadline).
CHECK_INTERVAL_S = 0.25


class TransmissionWatch:
    """Urgent events waiting for their PUBACK and the path's state; whether the fault is present (pure)."""

    def __init__(self, cfg: TransmissionConfig, now: float, *, limit: int = WAITING_LIMIT) -> None:
        """The path counts as down from ``now`` until it is first seen up."""
        self.cfg = cfg
        self.limit = limit
        self._waiting: collections.OrderedDict[str, float] = collections.OrderedDict()  # key → made (mono)
        self._kinds: dict[str, str] = {}
        self.up = False
        self.down_since: float | None = now
        self.down_reason = "not connected yet"
        self.untracked = 0

    def made(self, key: str, kind: str, now: float) -> None:
        """An urgent event was made at ``now``; it waits until :meth:`delivered` names it."""
        if key in self._waiting:
            return
        if len(self._waiting) >= self.limit:
            self.untracked += 1
            return
        self._waiting[key] = now
        self._kinds[key] = kind

    def delivered(self, keys: Iterable[str]) -> int:
        """The broker acknowledged these events; returns how many were waiting."""
        done = 0
        for key in keys:
            if self._waiting.pop(key, None) is not None:
                self._kinds.pop(key, None)
                done += 1
        return done

    def path(self, up: bool, now: float, reason: str = "") -> None:
        """The broker is reachable (``up``) or not, and why not."""
        if up:
            self.up, self.down_since = True, None
        elif self.up or self.down_since is None:
            self.up, self.down_since, self.down_reason = False, now, reason or "broker unreachable"
        else:
            self.down_reason = reason or self.down_reason

    def oldest(self) -> tuple[str, float] | None:
        """The kind and the time made of the event that has waited longest, if any."""
        for key, made in self._waiting.items():
            return self._kinds.get(key, "event"), made
        return None

    def fault(self, now: float) -> str | None:
        """Why the ``transmission`` fault is present now (its detail), or None when it is not."""
        oldest = self.oldest()
        if oldest is not None and now - oldest[1] > self.cfg.ack_deadline_s:
            why = f"{oldest[0]} event without PUBACK for {now - oldest[1]:.0f} s"
            if not self.up:
                why += f" ({self.down_reason})"
            return why
        if self.down_since is not None and now - self.down_since > self.cfg.path_down_s:
            return f"{self.down_reason} for {now - self.down_since:.0f} s"
        return None

    def figures(self, now: float) -> dict[str, Any]:
        """For ``gatewayctl status``: the path, what waits, since when."""
        oldest = self.oldest()
        return {
            "path": "up" if self.up else "down",
            "down_for_s": None if self.down_since is None else round(now - self.down_since, 1),
            "down_reason": None if self.up else self.down_reason,
            "waiting": len(self._waiting),
            "oldest_waiting_s": None if oldest is None else round(now - oldest[1], 1),
            "ack_deadline_s": self.cfg.ack_deadline_s,
            "path_down_s": self.cfg.path_down_s,
        }


class TransmissionMonitor:
    """Runs :class:`TransmissionWatch` on its own thread; tells ``on_change`` when the fault comes or goes."""

    def __init__(
        self,
        cfg: TransmissionConfig,
        *,
        path_up: Callable[[], tuple[bool, str]],
        on_change: Callable[[bool, str | None], None],
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        """``path_up()`` says whether the broker is reachable now and, if not, why."""
        self._clock = clock
        self.watch = TransmissionWatch(cfg, clock())
        self._path_up = path_up
        self._on_change = on_change
        self._interval_s = interval_s
        self._lock = threading.Lock()  # the watch only: in-memory work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transmission", daemon=True)
        self.present: str | None = None
        """The fault's detail while it is present."""

    def note(self, event: Event) -> None:
        """An event the panel made (from the alarm path: a dictionary insert, never a wait)."""
        if event.priority >= Priority.TROUBLE:
            key = event_delivery_key(event)
            with self._lock:
                self.watch.made(key, event.kind, event.mono)

    def delivered(self, keys: Iterable[str]) -> None:
        """The broker acknowledged these events."""
        with self._lock:
            self.watch.delivered(keys)

    def figures(self) -> dict[str, Any]:
        """The path and what waits (``gatewayctl status``)."""
        with self._lock:
            return {**self.watch.figures(self._clock()), "fault": self.present}

    def start(self) -> None:
        """Start looking."""
        self._thread.start()

    def stop(self) -> None:
        """Stop looking (a planned stop)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> None:
        """One look: the path now, then the fault."""
        try:
            up, why = self._path_up()
        except Exception:
            log.exception("transmission: path state unknown")
            up, why = False, "path state unknown"
        with self._lock:
            now = self._clock()
            self.watch.path(up, now, why)
            detail = self.watch.fault(now)
        if (detail is None) != (self.present is None):
            self.present = detail
            if detail is not None:
                log.error("transmission fault: the central server has not acknowledged", detail=detail)
            else:
                log.info("transmission fault cleared: the path acknowledges again")
            self._on_change(detail is not None, detail)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # the supervision must outlive a bug in one look
                log.exception("transmission check failed")
