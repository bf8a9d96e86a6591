"""The outbox's store: append, read pending, acknowledge — every event committed before it is forwarded.

One aiosqlite connection owned by the asyncio loop; every method holds one lock for its statements, so no
reader ever sees another coroutine's uncommitted rows. A row leaves the undelivered set only when the uplink
reports its own PUBACK (:meth:`Outbox.mark_delivered`). The schema and ids are in :mod:`.schema`, what leaves
the file when a bound is hit in :mod:`.eviction`, the replacement of a corrupt file in :mod:`.salvage`, the
history's filters in :mod:`gateway.uplink.history`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite
import msgspec
import structlog

import gateway.uplink.outbox.eviction as eviction
import gateway.uplink.outbox.salvage as salvage
import gateway.uplink.outbox.schema as schema
from gateway.clock import clock_synchronised
from gateway.events import Event, Priority
from gateway.failpoints import failpoint
from gateway.uplink.history import query_history
from gateway.uplink.outbox.eviction import StorageLimits, disk_free_bytes

__all__ = ["FailureKind", "Outbox", "PendingEvent", "failure_kind"]

log = structlog.get_logger()

_MARK_DELIVERED = ("UPDATE events SET delivered = 1, delivered_at = ?, attempts = attempts + ?"
                   " WHERE seq BETWEEN ? AND ?")

FailureKind = Literal["busy", "full", "corrupt", "io", "other"]


def failure_kind(exc: BaseException) -> FailureKind:
    """Classify a storage error by its SQLite result code (Python ≥ 3.11 sets ``sqlite_errorcode``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF
        if primary in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
            return "busy"
        if primary == 13:  # SQLITE_FULL
            return "full"
        if primary in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
            return "corrupt"
        if primary in (10, 14):  # SQLITE_IOERR, SQLITE_CANTOPEN
            return "io"
        return "other"
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "busy"
    if "full" in text:
        return "full"
    if "malformed" in text or "not a database" in text:
        return "corrupt"
    return "other"


class PendingEvent(NamedTuple):
    """A stored event not yet acknowledged by the broker."""

    seq: int
    event_id: str
    session: int
    kind: str
    priority: int
    payload: str
    attempts: int
    mono: float
    wall: float


class Outbox:
    """Append, read pending, acknowledge, bound, retain. All methods run on the asyncio loop."""

    def __init__(
        self,
        *,
        path: str,
        gateway_id: str,
        identity: dict[str, str],
        limits: StorageLimits,
        busy_timeout_ms: int,
        disk_free: Callable[[str], int],
    ) -> None:
        self._db: aiosqlite.Connection | None = None
        self.path = path
        self.gateway_id = gateway_id
        self.limits = limits
        self.session = 0
        self.install = ""
        """This installation's random identity (see :func:`.schema.new_install_id`); part of every event id."""
        self.sessions_this_boot: frozenset[int] = frozenset()
        """Sessions started since the machine booted: their events' monotonic times compare with today's."""
        self.generation = 0
        """Bumped when the file is replaced (corruption); readers holding seq cursors must start over."""
        self._identity = identity
        self._busy_timeout_ms = busy_timeout_ms
        self._disk_free = disk_free
        self._session_seq = 0
        self.earlier_sessions: tuple[tuple[int, int], ...] = ()
        """Earlier sessions of this installation with events still held, newest first, each with its last
        ``seq`` (at most :data:`EARLIER_SESSIONS_LISTED`; read when this session starts)."""
        self._last_seq: int | None = None
        """Highest seq the events table ever gave (AUTOINCREMENT never reuses one); None: read it again."""
        self._since_bounds_check = 0
        self._bounds_check_every = max(32 * 1024, limits.max_bytes // 200)
        # One connection, one transaction at a time: every method holds this lock for its statements, so no
        # reader ever sees another coroutine's uncommitted rows.
        self._lock = asyncio.Lock()
        self.appended = asyncio.Event()
        self._append_listeners: list[Callable[[list[PendingEvent]], None]] = []
        self._payload_prefix = ""
        self.stored_total = 0
        self.commits = 0
        """Write transactions that stored events (one per :meth:`append`)."""
        self.recovered_from: str | None = None
        """Where a corrupt file was moved to, if that happened in this process."""

    # ------------------------------------------------------------------------------ open / close

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        gateway_id: str,
        identity: dict[str, str] | None = None,
        limits: StorageLimits | None = None,
        busy_timeout_ms: int = 5000,
        disk_free: Callable[[str], int] = disk_free_bytes,
    ) -> Outbox:
        """Open (or create) the database and start a new session. A corrupt file is replaced (and reported)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        outbox = cls(path=path, gateway_id=gateway_id, identity=identity or {}, limits=limits or StorageLimits(),
                     busy_timeout_ms=busy_timeout_ms, disk_free=disk_free)
        try:
            await outbox._start_session(check=True)
        except sqlite3.DatabaseError as exc:
            if failure_kind(exc) != "corrupt":
                await outbox._close()
                raise
            await outbox._replace_corrupt(str(exc))
        return outbox

    async def close(self) -> None:
        """Close the connection."""
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()

    def on_append(self, callback: Callable[[list[PendingEvent]], None]) -> None:
        """Call ``callback(rows)`` on the loop after every commit of new events, with the rows as stored."""
        self._append_listeners.append(callback)

    @property
    def connection(self) -> aiosqlite.Connection:
        """The underlying connection (for maintenance in this package and for tests)."""
        if self._db is None:
            raise sqlite3.OperationalError("outbox is closed")
        return self._db

    async def _start_session(self, *, check: bool, floor: int = 0, install: str | None = None) -> None:
        self._db = await schema.connect(self.path, busy_timeout_ms=self._busy_timeout_ms)
        started = await schema.start_session(self._db, path=self.path, gateway_id=self.gateway_id, check=check,
                                             floor=floor, install=install)
        self.session = started.number
        self.install = started.install
        self.sessions_this_boot = started.this_boot
        self.earlier_sessions = started.earlier
        self._session_seq = 0
        self._last_seq = None
        head = {"version": schema.EVENT_VERSION, "gateway": self.gateway_id, **self._identity,
                "install": self.install, "session": self.session}
        self._payload_prefix = msgspec.json.encode(head)[:-1].decode() + ","

    # ------------------------------------------------------------------------------ corruption

    async def recover(self, exc: BaseException, *, generation: int | None = None) -> bool:
        """If ``exc`` says the file is corrupt, replace it (once, however many callers saw it). True if handled.

        ``generation`` is :attr:`generation` as the caller saw it before its failing call.
        """
        if failure_kind(exc) != "corrupt":
            return False
        async with self._lock:
            if generation is not None and generation != self.generation:
                return True  # someone else already replaced the file
            await self._close()
            await self._replace_corrupt(str(exc))
        return True

    async def _replace_corrupt(self, reason: str) -> None:
        """Move the corrupt file aside, carry readable undelivered rows over, store a fault event."""
        old_session = self.session
        await self._close()
        found = await asyncio.to_thread(salvage.read_salvage, self.path)
        moved = salvage.move_aside(self.path)
        self.recovered_from = moved
        self.generation += 1
        # The same installation goes on (its session counter too): the salvaged rows keep their ids.
        await self._start_session(check=False, floor=max(old_session, found.session),
                                  install=found.install or self.install or None)
        await salvage.carry_over(self.connection, found)
        log.error("storage corrupt: file moved aside and replaced", reason=reason, moved_to=moved,
                  recovered=len(found.rows), session=self.session)
        detail = f"{reason}; moved aside to {os.path.basename(moved)}; {len(found.rows)} undelivered events recovered"
        await self._append([Event("fault", "detected", time.monotonic(), code="storage_corrupt", detail=detail,
                                 wall=time.time())])

    # ------------------------------------------------------------------------------ events

    def _payload(self, event: Event, event_id: str, session_seq: int, synced: bool) -> str:
        """The event's JSON (schemas/event.json without ``historical``, ``sent`` and ``age_s``, which the uplink
        adds when it sends it)."""
        body: dict[str, Any] = {"event_id": event_id, "seq": session_seq, "time": _iso(event.wall),
                                "clock_synced": synced}
        body.update(event.as_dict())
        return self._payload_prefix + msgspec.json.encode(body)[1:].decode()

    async def append(self, events: Sequence[Event], *, handover: str | None = None) -> list[str]:
        """Commit events in one transaction (fully synced); returns their ids.

        ``handover``: the panel's mark of the last of these events, kept in the same transaction, so that a
        storage process started again knows what it already committed (:meth:`handover_mark`).
        Raises :class:`sqlite3.Error` when the database refuses (busy, full, corrupt): nothing was stored then
        and the same ids are used by the next call.
        """
        if not events:
            return []
        async with self._lock:
            return await self._append(events, handover)

    async def handover_mark(self) -> str | None:
        """The panel's hand-over mark of the last committed event it sent, or None."""
        async with self._lock:
            rows = await self.connection.execute_fetchall("SELECT value FROM meta WHERE key = 'handover'")
        return next((str(row[0]) for row in rows), None)

    async def _append(self, events: Sequence[Event], handover: str | None = None) -> list[str]:
        db = self.connection
        synced = clock_synchronised()
        rows = []
        ids = []
        session_seq = self._session_seq
        seq = self._last_seq if self._last_seq is not None else await self._read_last_seq()
        size = 0
        session = self.session
        prefix = schema.id_prefix(self.gateway_id, self.install, session)
        for event in events:
            seq += 1
            session_seq += 1
            event_id = prefix + str(session_seq)
            ids.append(event_id)
            payload = self._payload(event, event_id, session_seq, synced)
            size += len(payload)
            rows.append((seq, event_id, session, session_seq, event.kind, event.action, int(event.priority),
                         event.device, event.unit, event.household, event.wall or time.time(), event.mono,
                         int(synced), payload))
        try:
            if failpoint("storage_full", "outbox"):
                raise sqlite3.OperationalError("database or disk is full (fail point storage_full)")
            statements = list(schema.insert_events(rows))
            if len(statements) == 1 and handover is None:  # one statement, so one transaction
                await db.execute(*statements[0])
            else:
                await db.execute("BEGIN IMMEDIATE")
                for statement in statements:
                    await db.execute(*statement)
                if handover is not None:
                    await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('handover', ?)", (handover,))
                await db.execute("COMMIT")
        except BaseException:
            self._last_seq = None  # read it again: another writer may have taken these seqs
            await schema.rollback(db)
            raise
        self._last_seq = seq
        self._session_seq = session_seq
        self.stored_total += len(events)
        self.commits += 1
        self.appended.set()
        if self._append_listeners:
            stored = [PendingEvent(r[0], r[1], session, r[4], r[6], r[13], 0, r[11], r[10]) for r in rows]
            for listener in self._append_listeners:
                listener(stored)
        # Rows cost about twice their payload once the indexes are counted.
        self._since_bounds_check += 2 * size
        if self._since_bounds_check >= self._bounds_check_every:
            self._since_bounds_check = 0
            try:
                await self._enforce_bounds()
            except sqlite3.Error as exc:  # the events are stored; bounds are checked again soon
                log.warning("storage bounds check failed", error=str(exc))
        return ids

    @property
    def session_seq(self) -> int:
        """The last ``seq`` stored in this session (0 before its first event)."""
        return self._session_seq

    async def _read_last_seq(self) -> int:
        rows = await self.connection.execute_fetchall(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
            " coalesce((SELECT max(seq) FROM events), 0))")
        self._last_seq = int(next(iter(rows))[0])
        return self._last_seq

    async def pending(self, *, after: int = 0, limit: int = 100) -> list[PendingEvent]:
        """Undelivered events after ``seq``, oldest first."""
        async with self._lock:
            rows = await self.connection.execute_fetchall(
                "SELECT seq, event_id, session, kind, priority, payload, attempts, mono, wall FROM events"
                " WHERE delivered = 0 AND seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            )
            return [PendingEvent._make(row) for row in rows]

    async def mark_delivered(self, acks: Iterable[tuple[int, int]], *, now: float | None = None) -> None:
        """The broker acknowledged these rows — ``(seq, publishes)`` pairs: they leave the outbox as history."""
        when = time.time() if now is None else now
        ranges = _runs(acks)
        if not ranges:
            return
        marks = [(when, sends, lo, hi) for lo, hi, sends in ranges]
        async with self._lock:
            db = self.connection
            if len(marks) == 1:  # one statement is its own transaction
                await db.execute(_MARK_DELIVERED, marks[0])
                return
            async with schema.transaction(db):
                await db.executemany(_MARK_DELIVERED, marks)

    async def urgent_waiting(self) -> bool:
        """Whether an alarm, supervisory signal or fault waits undelivered (the uplink then retries fast)."""
        async with self._lock:
            rows = await self.connection.execute_fetchall(
                "SELECT EXISTS (SELECT 1 FROM events WHERE delivered = 0 AND priority >= ?)", (int(Priority.TROUBLE),))
        return bool(next(iter(rows))[0])

    async def urgent_pending(self, *, limit: int = 100) -> list[PendingEvent]:
        """Undelivered alarms, supervisory signals and faults, oldest first (the standby connection copies them)."""
        async with self._lock:
            rows = await self.connection.execute_fetchall(
                "SELECT seq, event_id, session, kind, priority, payload, attempts, mono, wall FROM events"
                " WHERE delivered = 0 AND priority >= ? ORDER BY seq LIMIT ?", (int(Priority.TROUBLE), limit))
            return [PendingEvent._make(row) for row in rows]

    async def backlog(self) -> tuple[int, float | None]:
        """(undelivered count, wall time of the oldest undelivered event)."""
        async with self._lock:
            cur = await self.connection.execute("SELECT COUNT(*), MIN(wall) FROM events WHERE delivered = 0")
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), row[1]

    async def recent(self, **query: Any) -> list[dict[str, Any]]:
        """History with delivery state, by the keywords of :func:`gateway.uplink.history.query_history`: the
        newest ``limit`` matches, or with ``session`` the first ``limit`` of that session's
        ``from_seq``..``to_seq``; oldest first either way."""
        async with self._lock:
            return await query_history(self.connection, **query)

    # ------------------------------------------------------------------------------ bounds

    async def used_bytes(self) -> int:
        """Bytes of the database file holding data (free pages are reused before the file grows)."""
        async with self._lock:
            return await eviction.used_bytes(self.connection)

    def _free_disk(self) -> int | None:
        try:
            return self._disk_free(str(Path(self.path).parent))
        except OSError:
            return None

    async def enforce_bounds(self) -> dict[str, int]:
        """Evict by the ladder if the size cap or the free-disk watermark is hit; returns what went, by rung."""
        async with self._lock:
            return await self._enforce_bounds()

    async def _enforce_bounds(self) -> dict[str, int]:
        return await eviction.enforce_bounds(self.connection, self.limits, self._free_disk())

    async def make_room(self) -> int:
        """The disk (or ``max_page_count``) is full: evict what the free-disk rule allows. Returns rows evicted."""
        async with self._lock:
            evicted = await eviction.make_room(self.connection)
            with contextlib.suppress(sqlite3.Error):
                await eviction.give_back_space(self.connection)
            return sum(evicted.values())

    # ------------------------------------------------------------------------------ history

    async def retain(self, *, now: float | None = None) -> int:
        """Delete delivered history older than ``history_s`` beyond the newest ``history_min_events``
        (:func:`.eviction.retain`). Returns rows deleted."""
        async with self._lock:
            return await eviction.retain(self.connection, self.limits, now)

    async def maintain(self, *, now: float | None = None) -> dict[str, int]:
        """Periodic upkeep: retention, bounds, WAL checkpoint. Returns rows removed by cause."""
        async with self._lock:
            out = {"retired": await eviction.retain(self.connection, self.limits, now)}
            out.update(await self._enforce_bounds())
            cur = await self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await cur.fetchall()
            return out

    # ------------------------------------------------------------------------------ counters and status

    async def record_dropped(self, counts: Mapping[str, int]) -> None:
        """Persist counts of events dropped before they could be stored (memory bound), by class name."""
        items = {f"dropped.memory.{name}": n for name, n in counts.items() if n}
        if not items:
            return
        async with self._lock, schema.transaction(self.connection) as db:
            await schema.add_counters(db, items)

    async def counters(self) -> dict[str, int]:
        """Every persisted counter (``evicted.<delivered|undelivered>.<class>``, ``dropped.memory.<class>``,
        ``retired.history``)."""
        async with self._lock:
            return await self._counters()

    async def _counters(self) -> dict[str, int]:
        cur = await self.connection.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'evicted.%' OR key LIKE 'dropped.%' OR key LIKE 'retired.%'")
        return {str(k): int(v) for k, v in await cur.fetchall()}

    async def stats(self, *, now: float | None = None) -> dict[str, Any]:
        """What a status display needs: backlog, oldest undelivered age, evictions by class, sizes."""
        async with self._lock:
            return await self._stats(time.time() if now is None else now)

    async def _stats(self, when: float) -> dict[str, Any]:
        db = self.connection
        cur = await db.execute(
            "SELECT priority, COUNT(*), MIN(wall) FROM events WHERE delivered = 0 GROUP BY priority")
        by_class: dict[str, int] = {}
        oldest: float | None = None
        for priority, count, first in await cur.fetchall():
            by_class[_class_name(priority)] = int(count)
            oldest = first if oldest is None else min(oldest, first)
        cur = await db.execute("SELECT COUNT(*) FROM events WHERE delivered = 1")
        row = await cur.fetchone()
        history = int(row[0]) if row else 0
        counters = await self._counters()
        names = [p.name.lower() for p in Priority]

        def group(prefix: str) -> dict[str, int]:
            return {n: counters.get(f"{prefix}.{n}", 0) for n in names}

        return {
            "session": self.session,
            "backlog": sum(by_class.values()),
            "backlog_by_class": by_class,
            "oldest_undelivered_age_s": None if oldest is None else max(0.0, when - oldest),
            "history": history,
            "evicted_undelivered": group("evicted.undelivered"),
            "evicted_delivered": group("evicted.delivered"),
            "dropped_in_memory": group("dropped.memory"),
            "retired_history": counters.get("retired.history", 0),
            "used_bytes": await eviction.used_bytes(db),
            "db_bytes": _file_bytes(self.path),
            "max_bytes": self.limits.max_bytes,
            "free_disk_bytes": self._free_disk(),
            "recovered_from": self.recovered_from,
        }


def _runs(acks: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(seq, publishes)`` pairs → ``(first, last, publishes)`` runs of consecutive seqs (one UPDATE each)."""
    runs: list[tuple[int, int, int]] = []
    for seq, sends in sorted(acks):
        if runs and seq == runs[-1][1] + 1 and sends == runs[-1][2]:
            runs[-1] = (runs[-1][0], seq, sends)
        elif not runs or seq > runs[-1][1]:
            runs.append((seq, seq, sends))
    return runs


def _class_name(priority: int) -> str:
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return str(priority)


_iso_second: tuple[int, str] = (-1, "")


def _iso(wall: float) -> str:
    global _iso_second
    second = int(wall // 1)
    if _iso_second[0] != second:  # one strftime per second of events, not per event
        _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_iso_second[1]}.{int(wall % 1 * 1000):03d}Z"


def _file_bytes(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(path + suffix).st_size
    return total
