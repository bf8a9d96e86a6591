"""Heartbeats: named parts of the daemon report progress; the watchdog reads who is late.

Each long-running part (a bus thread, the annunciator, the uplink loop) registers with a deadline and
calls :meth:`Heartbeats.beat` each time it completes a cycle. :meth:`Heartbeats.stale` names the parts
whose last beat is older than their deadline. ``beat`` is one dict store of a float, safe to call from the
real-time alarm thread: it takes no lock and does no I/O.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Heartbeats"]


class Heartbeats:
    """A thread-safe registry of named parts, each with a deadline in seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def register(self, name: str, deadline_s: float, now: float | None = None) -> None:
        """Watch ``name``; it counts as fresh from now until ``deadline_s`` passes without a beat."""
        if deadline_s <= 0:
            raise ValueError(f"deadline for {name!r} must be positive, got {deadline_s}")
        t = time.monotonic() if now is None else now
        with self._lock:
            self._deadlines[name] = float(deadline_s)
            self._last[name] = t

    def unregister(self, name: str) -> None:
        """Stop watching ``name`` (a part that shut down on purpose). Unknown names are ignored."""
        with self._lock:
            self._deadlines.pop(name, None)
            self._last.pop(name, None)

    def beat(self, name: str, now: float | None = None) -> None:
        """Record that ``name`` completed a cycle. Lock-free; beats of unregistered names are dropped."""
        if name in self._deadlines:
            self._last[name] = time.monotonic() if now is None else now

    def stale(self, now: float | None = None) -> list[str]:
        """Names whose last beat (or registration) is older than their deadline, sorted."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return sorted(name for name, deadline in self._deadlines.items() if t - self._last[name] > deadline)

    def snapshot(self, now: float | None = None) -> dict[str, float]:
        """Seconds since each part's last beat (or registration)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return {name: t - self._last[name] for name in sorted(self._deadlines)}

    def deadlines(self) -> dict[str, float]:
        """Each part's deadline in seconds."""
        with self._lock:
            return dict(self._deadlines)

    def names(self) -> list[str]:
        """Registered part names, sorted."""
        with self._lock:
            return sorted(self._deadlines)
