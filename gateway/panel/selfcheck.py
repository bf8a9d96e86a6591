"""The alarm path watches itself: a bus thread or the annunciator that stops beating is a fault.

:class:`SelfCheck` runs in a thread of its own — not on the asyncio loop, which may be the very part that
is stuck. Every ``interval_s`` it reads the :class:`~gateway.health.Heartbeats`; a watched part whose last
beat is older than its deadline becomes a ``fault`` event with code ``stale_thread`` naming the part (the
trouble signal sounds, the fault LED lights), and the fault clears when the part beats again. The check
beats as ``selfcheck`` itself, so the systemd watchdog notices when the watcher stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from gateway.health import Heartbeats

__all__ = ["SelfCheck", "on_alarm_path"]

log = structlog.get_logger()
NAME = "selfcheck"


def on_alarm_path(name: str) -> bool:
    """The parts watched by default: bus threads, the annunciator, the alarm ticker and the panel's asyncio
    loop.

    Not the uplink: a broker out of reach is an uplink state (reported in status messages), not a stuck
    thread, and the outbox keeps every event meanwhile.
    """
    return name in ("annunciator", "alarm-ticker", "loop") or name.startswith("bus:")


class StaleSink(Protocol):
    """Where stale parts are reported: the alarm panel."""

    def stale_thread(self, name: str, stale: bool) -> None: ...


class SelfCheck:
    """Turns stale heartbeats into ``stale_thread`` faults on the alarm panel, and clears them."""

    def __init__(
        self,
        heartbeats: Heartbeats,
        panel: StaleSink,
        *,
        watch: Callable[[str], bool] = on_alarm_path,
        interval_s: float = 1.0,
    ) -> None:
        self._heartbeats = heartbeats
        self._panel = panel
        self._watch = watch
        self.interval_s = interval_s
        self._faulted: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def faulted(self) -> list[str]:
        """Parts currently reported stale, sorted."""
        return sorted(self._faulted)

    def check(self, now: float | None = None) -> list[str]:
        """One pass: raise a fault for each newly stale part, clear it for each that beats again."""
        stale = {name for name in self._heartbeats.stale(now) if self._watch(name)}
        for name in sorted(stale - self._faulted):
            self._panel.stale_thread(name, True)
            age = self._heartbeats.snapshot(now).get(name)
            log.error("part of the alarm path stopped beating", part=name,
                      silent_s=round(age, 1) if age is not None else None)
        for name in sorted(self._faulted - stale):
            self._panel.stale_thread(name, False)
            log.info("part of the alarm path beats again", part=name)
        self._faulted = stale
        return sorted(stale)

    def start(self) -> None:
        """Check every ``interval_s`` in a daemon thread, beating as ``selfcheck``."""
        if self._thread is not None:
            return
        self._heartbeats.register(NAME, max(10.0, 5 * self.interval_s))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking (before the watched parts are stopped on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._heartbeats.unregister(NAME)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check(time.monotonic())
            except Exception:  # logged; no beat, so the watchdog sees a watcher that cannot watch
                log.exception("self-check failed")
            else:
                self._heartbeats.beat(NAME)
