"""The writer: commits events from the loop into the outbox, and holds them in memory while it cannot.

Alarms, faults and supervisory events (anything above telemetry) are committed at once; telemetry is
gathered for at most ``batch_s`` so a burst costs one transaction. When the database refuses:

* busy (another process holds the write lock) → retry with backoff, 50 ms doubling to 2 s;
* full (disk or SQLite page limit) → evict what the free-disk rule allows and retry; if nothing can go,
  raise a ``storage_full`` fault and retry every few seconds, cleared when a commit succeeds again;
* corrupt → the outbox replaces the file (and stores ``storage_corrupt``), then the commit is retried;
* anything else → a ``storage_error`` fault, retried like a full disk.

Meanwhile events wait in memory, bounded by ``memory_limit``: past it the oldest events of the lowest class
present are dropped (telemetry first) and counted; the counts are persisted once the database takes writes.
The buzzer never waits for any of this: the alarm path does not touch the loop or SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gateway.events import Event, Priority
from gateway.uplink.outbox import Outbox, failure_kind

__all__ = ["EventWriter"]

log = structlog.get_logger()
BUSY_RETRY_MIN_S = 0.05
BUSY_RETRY_MAX_S = 2.0
FAULT_RETRY_MIN_S = 0.5
FAULT_RETRY_MAX_S = 5.0
COMMIT_CHUNK = 2_000


class EventWriter:
    """Owns the path from the loop into the outbox: batching, retries, the memory bound, storage faults."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        batch_s: float = 0.5,
        memory_limit: int = 10_000,
        on_stored: Callable[[Sequence[Event], Sequence[str]], None] | None = None,
        on_fault: Callable[[str, bool, str | None], None] | None = None,
        mark: Callable[[Sequence[Event]], str | None] | None = None,
        on_shed: Callable[[Sequence[Event]], None] | None = None,
    ) -> None:
        """``mark(batch)``: the hand-over mark committed with ``batch`` (see :meth:`Outbox.append`);
        ``on_shed(events)``: events the memory bound dropped (counted in :attr:`dropped`), never to be stored."""
        self.outbox = outbox
        self.batch_s = batch_s
        self.memory_limit = max(1, memory_limit)
        self._on_stored = on_stored
        self._on_fault = on_fault
        self._mark = mark
        self._on_shed = on_shed
        self._held: deque[Event] = deque()
        self._committing = 0  # events at the front of _held inside the current transaction: never shed
        self._first_held_at: float | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush_requested = False
        self._unsaved_drops: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        """Events dropped from memory before they could be stored, by class name."""
        self.retries = 0
        self.fault: str | None = None
        """The storage fault code currently raised (``storage_full``/``storage_error``), if any."""

    @property
    def held(self) -> int:
        """Events waiting in memory for a commit."""
        return len(self._held)

    def put(self, event: Event) -> None:
        """Queue an event for storage (never blocks; the memory bound drops telemetry first)."""
        if not self._held:
            self._first_held_at = time.monotonic()
        self._held.append(event)
        self._idle.clear()
        if len(self._held) > self.memory_limit:
            self._shed()
        if event.priority > Priority.TELEMETRY or len(self._held) >= COMMIT_CHUNK:
            self._wake.set()
        elif len(self._held) == 1:
            self._wake.set()  # start the batch timer

    def _shed(self) -> None:
        """Drop the oldest events of the lowest class present, a tenth of the bound at a time."""
        excess = len(self._held) - self.memory_limit
        candidates = list(itertools.islice(self._held, self._committing, None))
        if not candidates:
            return
        lowest = min(e.priority for e in candidates)
        quota = max(excess, self.memory_limit // 10)
        kept: deque[Event] = deque(itertools.islice(self._held, self._committing))
        shed: list[Event] = []
        for event in candidates:
            if len(shed) < quota and event.priority == lowest:
                shed.append(event)
                continue
            kept.append(event)
        self._held = kept
        dropped = len(shed)
        if self._on_shed is not None:
            self._on_shed(shed)
        name = lowest.name.lower()
        self.dropped[name] += dropped
        self._unsaved_drops[name] += dropped
        log.error("storage unavailable and memory bound hit: events dropped", dropped=dropped, event_class=name,
                  held=len(self._held), limit=self.memory_limit)

    def stats(self) -> dict[str, Any]:
        """In-memory side of storage status (the database side is :meth:`Outbox.stats`)."""
        return {"held_in_memory": len(self._held), "memory_limit": self.memory_limit,
                "dropped_in_memory_now": dict(self.dropped), "storage_fault": self.fault, "retries": self.retries}

    # ------------------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Commit forever: urgent events at once, telemetry after at most ``batch_s``. Never ends on an error."""
        while True:
            try:
                await self._run()
            except Exception as exc:  # a bug must not stop storage: log it and go on with what is held
                log.error("writer failed; continuing", error=repr(exc), held=len(self._held))
                await asyncio.sleep(FAULT_RETRY_MIN_S)

    async def _run(self) -> None:
        while True:
            if not self._held:
                self._flush_requested = False
                self._wake.clear()
                self._idle.set()
                await self._wake.wait()
                continue
            urgent = self._flush_requested or any(e.priority > Priority.TELEMETRY for e in self._held)
            first = self._first_held_at or time.monotonic()
            remaining = first + self.batch_s - time.monotonic()
            if not urgent and remaining > 0 and len(self._held) < COMMIT_CHUNK:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
                continue
            await self._commit_held()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Commit everything held now (for a planned stop). False if the database did not take it in time."""
        if not self._held:
            return True
        self._flush_requested = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.error("events not stored at stop", held=len(self._held))
            return False
        return True

    async def _commit_held(self) -> None:
        """Commit held events chunk by chunk until none are left, retrying as the failure demands."""
        busy_delay = BUSY_RETRY_MIN_S
        fault_delay = FAULT_RETRY_MIN_S
        while self._held:
            # At most half the memory bound per transaction, so shedding can always reach the other half.
            size = min(COMMIT_CHUNK, max(1, self.memory_limit // 2), len(self._held))
            chunk = list(itertools.islice(self._held, size))
            generation = self.outbox.generation
            self._committing = size
            try:
                ids = await self.outbox.append(chunk, handover=None if self._mark is None else self._mark(chunk))
            except Exception as exc:  # sqlite3.Error mostly; ValueError from a closed connection
                self._committing = 0
                if len(self._held) > self.memory_limit:
                    self._shed()
                self.retries += 1
                kind = failure_kind(exc) if isinstance(exc, sqlite3.Error) else "other"
                if kind == "busy":
                    log.warning("database busy; retrying", error=str(exc), events=len(self._held),
                                retry_in_s=busy_delay)
                    await asyncio.sleep(busy_delay)
                    busy_delay = min(BUSY_RETRY_MAX_S, busy_delay * 2)
                    continue
                if kind == "corrupt" and await self._recover(exc, generation):
                    continue
                if kind == "full" and await self._make_room():
                    continue
                self._raise_fault("storage_full" if kind == "full" else "storage_error", str(exc))
                await asyncio.sleep(fault_delay)
                fault_delay = min(FAULT_RETRY_MAX_S, fault_delay * 2)
                continue
            for _ in range(size):
                self._held.popleft()
            self._committing = 0
            busy_delay = BUSY_RETRY_MIN_S
            fault_delay = FAULT_RETRY_MIN_S
            if self._on_stored is not None:
                self._on_stored(chunk, ids)
            if self.fault is not None:
                self._clear_fault()  # queued behind what is held; stored in the next chunk
            if self._unsaved_drops:
                drops, self._unsaved_drops = self._unsaved_drops, Counter()
                try:
                    await self.outbox.record_dropped(drops)
                except sqlite3.Error:
                    self._unsaved_drops.update(drops)
        self._first_held_at = None

    async def _recover(self, exc: BaseException, generation: int) -> bool:
        try:
            return await self.outbox.recover(exc, generation=generation)
        except (sqlite3.Error, OSError) as again:
            log.error("storage recovery failed", error=str(again))
            return False

    async def _make_room(self) -> bool:
        try:
            return await self.outbox.make_room() > 0
        except (sqlite3.Error, ValueError) as exc:
            log.warning("could not evict to make room", error=str(exc))
            return False

    def _raise_fault(self, code: str, detail: str) -> None:
        if self.fault == code:
            return
        if self.fault is not None:
            self._clear_fault()
        self.fault = code
        log.error("storage fault: events held in memory", code=code, detail=detail, held=len(self._held),
                  limit=self.memory_limit)
        if self._on_fault is not None:  # through the alarm panel: trouble chirp and fault LED, event back here
            self._on_fault(code, True, detail)
        else:
            self._held.append(Event("fault", "raised", time.monotonic(), code=code, detail=detail,
                                    wall=time.time()))

    def _clear_fault(self) -> None:
        code, self.fault = self.fault, None
        log.warning("storage fault cleared", code=code)
        if self._on_fault is not None and code is not None:
            self._on_fault(code, False, None)
        else:
            self._held.append(Event("fault", "cleared", time.monotonic(), code=code, wall=time.time()))
        self._wake.set()
