"""The outbox: every event committed to SQLite before it is forwarded, kept until its PUBACK.

One aiosqlite connection owned by the asyncio loop. WAL journal with ``synchronous=FULL``: a commit that
returned is on the disk, for every priority class. Each event gets an id that never repeats —
``<gateway>:<install>:<session>:<seq>``. ``install`` is a random identity made when the database is created
(kept in its ``meta`` table, copied to ``<db>.install-id`` beside it); a new database — a reinstall, a new
SD card, a demo run — is a new installation, so its session counter may start at 1 again without an id
ever coming back. The session counter is kept in the database (and in ``<db>.session``) and bumped at every
start. docs/storage.md gives the rules.

Bounds: a size cap and a free-disk watermark. When either is hit, rows are evicted in a fixed ladder —
delivered history first, then undelivered rows from the lowest priority class up, oldest first — and every
eviction is counted in the ``meta`` table. Delivered history is kept for ``history_s`` and at least
``history_min_events`` rows (within the cap). A corrupt file is moved aside with a timestamp, its readable
undelivered rows are carried over to a fresh file and a ``storage_corrupt`` fault is stored. See
``docs/storage.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite
import orjson
import structlog

from gateway.clock import clock_synchronised
from gateway.events import Event, Priority
from gateway.failpoints import failpoint
from gateway.uplink.history import history_filters

__all__ = [
    "SCHEMA_VERSION",
    "FailureKind",
    "Outbox",
    "PendingEvent",
    "StorageLimits",
    "failure_kind",
    "new_install_id",
    "query_history",
]

log = structlog.get_logger()
SCHEMA_VERSION = 3
#: ``version`` of the event messages this outbox stores (schemas/event.json); 1 had no ``install``.
EVENT_VERSION = 2
MB = 1024 * 1024
DAY_S = 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    session INTEGER NOT NULL,
    session_seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    action TEXT NOT NULL,
    priority INTEGER NOT NULL,
    device TEXT,
    unit TEXT,
    household TEXT,
    wall REAL NOT NULL,
    mono REAL NOT NULL,
    clock_synced INTEGER NOT NULL,
    payload TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    delivered_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_pending ON events (delivered, seq);
CREATE INDEX IF NOT EXISTS events_device ON events (device, seq);
CREATE INDEX IF NOT EXISTS events_session ON events (session, session_seq);
DROP INDEX IF EXISTS events_class;
DROP INDEX IF EXISTS events_wall;
"""

_COLUMNS = ("event_id, session, session_seq, kind, action, priority, device, unit, household, wall, mono,"
            " clock_synced, payload")

_MARK_DELIVERED = ("UPDATE events SET delivered = 1, delivered_at = ?, attempts = attempts + ?"
                   " WHERE seq BETWEEN ? AND ?")


#: One event, its seq given (the outbox is the file's only writer). One statement text for every batch: each
#: distinct text is compiled and kept in the connection's statement cache (128 entries), and a multi-row INSERT
#: per batch size held 3.8 MB more after 60 sizes had been seen (the storage process grew for an hour in
#: benchmarks/soak.py). A batch now costs two more trips to the SQLite thread (BEGIN, COMMIT): forwarding.py
#: side by side, about 10 % fewer events/s (12 000 against 13 500), still far above what a building makes.
_INSERT = f"INSERT INTO events (seq, {_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"


# Eviction ladder: (delivered, priority), first rung first. Delivered history goes before anything
# undelivered; undelivered rows go from the lowest class up, so no alarm, fault or supervisory event is
# evicted while anything lower remains.
_LADDER: tuple[tuple[int, Priority], ...] = (
    *((1, p) for p in Priority),
    *((0, p) for p in Priority),
)
# The free-disk watermark (and a full disk) may evict no undelivered row of these classes: another
# program filling the card is no reason to forget an alarm. Only the configured cap may, as a last resort.
_DISK_PROTECTED = Priority.TROUBLE
_BOOT_SESSIONS_KEPT = 500
#: Earlier sessions the birth message lists with their last ``seq`` (docs/mqtt.md, "Filling a gap").
EARLIER_SESSIONS_LISTED = 100
_EVICT_CHUNK_MIN = 64
_EVICT_CHUNK_MAX = 5_000
_EVICT_TARGET = 0.9  # after hitting a bound, evict down to 90 % of it
_JOURNAL_SIZE_LIMIT = 4 * MB
#: SQLite's page cache for the outbox connection, in KiB. Its default (2 MiB) fills as the file grows and
#: is then held for good (a bare connection appending 20 000 rows held 2016 kB more with it, 188 kB with
#: 256 KiB); the outbox appends at the end of its tables and reads their oldest rows.
CACHE_KIB = 512

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


@dataclass(frozen=True, slots=True)
class StorageLimits:
    """Bounds of the outbox file. Times are seconds; sizes bytes."""

    max_bytes: int = 64 * MB
    min_free_bytes: int = 50 * MB
    history_s: float = 30 * DAY_S
    history_min_events: int = 999

    @classmethod
    def from_config(cls, cfg: Any) -> StorageLimits:
        """From a :class:`gateway.config.StorageConfig` (megabytes and days)."""
        return cls(max_bytes=int(cfg.max_mb * MB), min_free_bytes=int(cfg.min_free_mb * MB),
                   history_s=float(cfg.history_days) * DAY_S, history_min_events=int(cfg.history_min_events))


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


def disk_free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return int(st.f_bavail * st.f_frsize)


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
        """This installation's random identity (see :func:`new_install_id`); part of every event id."""
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

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            # auto_vacuum only takes effect on a new, empty file: lets a low disk get pages back.
            await db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
            raise
        return db

    async def _start_session(self, *, check: bool, floor: int = 0, install: str | None = None) -> None:
        self._db = await self._connect()
        db = self._db
        await db.executescript(_SCHEMA)
        if check:
            cur = await db.execute("PRAGMA quick_check")
            problems = [str(r[0]) for r in await cur.fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(problems[:3])}")
        await db.execute("BEGIN IMMEDIATE")
        try:
            cur = await db.execute("SELECT key, value FROM meta WHERE key IN ('session', 'install')")
            meta = {str(k): str(v) for k, v in await cur.fetchall()}
            session = max(int(meta.get("session", 0)), _read_session_file(self._session_file), floor) + 1
            # The database's identity wins; one without (new, or from before identities) starts a new one.
            install = meta.get("install") or install or new_install_id()
            boot = _boot_id()
            await db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [("session", str(session)), ("schema", str(SCHEMA_VERSION)),
                                  ("gateway_id", self.gateway_id), ("install", install),
                                  (f"boot.{session}", boot)])
            # Which sessions ran in this boot (the storage process may have been restarted): the last few hundred.
            await db.execute("DELETE FROM meta WHERE key LIKE 'boot.%' AND CAST(substr(key, 6) AS INTEGER) < ?",
                             (session - _BOOT_SESSIONS_KEPT,))
            cur = await db.execute("SELECT key FROM meta WHERE key LIKE 'boot.%' AND value = ?", (boot,))
            this_boot = frozenset(int(str(k)[5:]) for (k,) in await cur.fetchall()) if boot else frozenset({session})
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        _write_session_file(self._session_file, session)
        _reconcile_install_file(self._install_file, install)
        self.session = session
        self.install = install
        self.sessions_this_boot = this_boot
        self._session_seq = 0
        self._last_seq = None
        self.earlier_sessions = await _earlier_sessions(db, f"{self.gateway_id}:{install}:", session)
        head = {"version": EVENT_VERSION, "gateway": self.gateway_id, **self._identity, "install": install,
                "session": session}
        self._payload_prefix = orjson.dumps(head)[:-1].decode() + ","

    @property
    def _session_file(self) -> Path:
        return Path(f"{self.path}.session")

    @property
    def _install_file(self) -> Path:
        return Path(f"{self.path}.install-id")

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
        salvage = await asyncio.to_thread(_salvage, self.path)
        moved = _move_aside(self.path)
        self.recovered_from = moved
        self.generation += 1
        # The same installation goes on (its session counter too): the salvaged rows keep their ids.
        await self._start_session(check=False, floor=max(old_session, salvage.session),
                                  install=salvage.install or self.install or None)
        db = self.connection
        await db.execute("BEGIN IMMEDIATE")
        try:
            if salvage.rows:
                await db.executemany(
                    f"INSERT OR IGNORE INTO events ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", salvage.rows)
            if salvage.counters:
                await _add_counters(db, salvage.counters)
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        log.error("storage corrupt: file moved aside and replaced", reason=reason, moved_to=moved,
                  recovered=len(salvage.rows), session=self.session)
        detail = f"{reason}; moved aside to {os.path.basename(moved)}; {len(salvage.rows)} undelivered events recovered"
        await self._append([Event("fault", "detected", time.monotonic(), code="storage_corrupt", detail=detail,
                                 wall=time.time())])

    # ------------------------------------------------------------------------------ events

    def _payload(self, event: Event, event_id: str, session_seq: int, synced: bool) -> str:
        """The event's JSON (schemas/event.json without ``historical``, ``sent`` and ``age_s``, which the uplink
        adds when it sends it)."""
        body: dict[str, Any] = {"event_id": event_id, "seq": session_seq, "time": _iso(event.wall),
                                "clock_synced": synced}
        body.update(event.as_dict())
        return self._payload_prefix + orjson.dumps(body)[1:].decode()

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
        prefix = f"{self.gateway_id}:{self.install}:{session}:"
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
            if len(rows) == 1 and handover is None:  # one statement, so one transaction
                await db.execute(_INSERT, rows[0])
            else:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany(_INSERT, rows)
                if handover is not None:
                    await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('handover', ?)", (handover,))
                await db.execute("COMMIT")
        except BaseException:
            self._last_seq = None  # read it again: another writer may have taken these seqs
            await _rollback(db)
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
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(_MARK_DELIVERED, marks)
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise

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

    async def recent(
        self,
        *,
        limit: int = 50,
        since: float | None = None,
        device: str | None = None,
        household: str | None = None,
        kind: str | None = None,
        after_seq: int = 0,
        install: str | None = None,
        session: int | None = None,
        from_seq: int | None = None,
        to_seq: int | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """History with delivery state: the newest ``limit`` matches, or with ``session`` the first ``limit`` of
        that session's ``from_seq``..``to_seq``; oldest first either way."""
        async with self._lock:
            return await query_history(self.connection, limit=limit, since=since, device=device, household=household,
                                       kind=kind, after_seq=after_seq, install=install, session=session,
                                       from_seq=from_seq, to_seq=to_seq, until=until)

    # ------------------------------------------------------------------------------ bounds

    async def used_bytes(self) -> int:
        """Bytes of the database file holding data (free pages are reused before the file grows)."""
        async with self._lock:
            return await self._used_bytes()

    async def _used_bytes(self) -> int:
        db = self.connection
        values = []
        for pragma in ("page_count", "freelist_count", "page_size"):
            cur = await db.execute(f"PRAGMA {pragma}")
            row = await cur.fetchone()
            values.append(int(row[0]) if row else 0)
        pages, free, size = values
        return (pages - free) * size

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
        used = await self._used_bytes()
        free = self._free_disk()
        evicted: dict[str, int] = {}
        if used > self.limits.max_bytes:
            target = int(self.limits.max_bytes * _EVICT_TARGET)
            evicted = await self._evict_to(target, top=Priority.ALARM, reason="size cap")
            used = await self._used_bytes()
        if free is not None and free < self.limits.min_free_bytes:
            shortfall = self.limits.min_free_bytes - free
            target = max(0, used - shortfall - int(self.limits.min_free_bytes * (1 - _EVICT_TARGET)))
            more = await self._evict_to(target, top=Priority(_DISK_PROTECTED - 1), reason="low disk")
            for key, n in more.items():
                evicted[key] = evicted.get(key, 0) + n
            await self._give_back_space()
        return evicted

    async def make_room(self) -> int:
        """The disk (or ``max_page_count``) is full: evict what the free-disk rule allows. Returns rows evicted."""
        async with self._lock:
            used = await self._used_bytes()
            target = used - max(256 * 1024, used // 20)
            evicted = await self._evict_to(max(0, target), top=Priority(_DISK_PROTECTED - 1), reason="disk full")
            with contextlib.suppress(sqlite3.Error):
                await self._give_back_space()
            return sum(evicted.values())

    async def _give_back_space(self) -> None:
        # executescript steps each statement to the end: incremental_vacuum frees one page per step.
        await self.connection.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")

    async def _evict_to(self, target: int, *, top: Priority, reason: str) -> dict[str, int]:
        db = self.connection
        used = await self._used_bytes()
        if used <= target:
            return {}
        cur = await db.execute("SELECT COUNT(*) FROM events")
        row = await cur.fetchone()
        total = int(row[0]) if row else 0
        if total == 0:
            return {}
        per_row = max(1.0, used / total)
        evicted: dict[str, int] = {}
        for delivered, priority in _LADDER:
            if not delivered and priority > top:
                break
            while used > target:
                n = min(_EVICT_CHUNK_MAX, max(_EVICT_CHUNK_MIN, math.ceil((used - target) / per_row)))
                key = f"evicted.{'delivered' if delivered else 'undelivered'}.{priority.name.lower()}"
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cur = await db.execute(
                        "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE delivered = ? AND priority = ?"
                        " ORDER BY seq LIMIT ?)", (delivered, int(priority), n))
                    gone = cur.rowcount
                    if gone > 0:
                        await _add_counters(db, {key: gone})
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
                if gone <= 0:
                    break
                evicted[key] = evicted.get(key, 0) + gone
                used = await self._used_bytes()
            if used <= target:
                break
        if evicted:
            lost = {k: v for k, v in evicted.items() if ".undelivered." in k}
            (log.error if lost else log.warning)("storage bound hit: events evicted", reason=reason,
                                                 evicted=evicted, used_bytes=used, target_bytes=target)
        return evicted

    # ------------------------------------------------------------------------------ history

    async def retain(self, *, now: float | None = None) -> int:
        """Delete delivered history older than ``history_s`` beyond the newest ``history_min_events``.

        Age counts from the later of the event time and the delivery time (both seconds since the epoch), so
        an event stamped by an unsynchronised clock is not thrown away early. Returns rows deleted.
        """
        async with self._lock:
            return await self._retain(now)

    async def _retain(self, now: float | None) -> int:
        when = time.time() if now is None else now
        cutoff = when - self.limits.history_s
        db = self.connection
        cur = await db.execute(
            "SELECT seq FROM events WHERE delivered = 1 ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (max(0, self.limits.history_min_events - 1),))
        row = await cur.fetchone()
        if row is None:
            return 0
        boundary = int(row[0])
        await db.execute("BEGIN IMMEDIATE")
        try:
            cur = await db.execute(
                "DELETE FROM events WHERE delivered = 1 AND seq < ? AND MAX(wall, COALESCE(delivered_at, wall)) < ?",
                (boundary, cutoff))
            gone = max(0, cur.rowcount)
            if gone:
                await _add_counters(db, {"retired.history": gone})
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        if gone:
            log.info("history retention", deleted=gone, older_than_days=round(self.limits.history_s / DAY_S, 1))
        return gone

    async def maintain(self, *, now: float | None = None) -> dict[str, int]:
        """Periodic upkeep: retention, bounds, WAL checkpoint. Returns rows removed by cause."""
        async with self._lock:
            out = {"retired": await self._retain(now)}
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
        async with self._lock:
            db = self.connection
            await db.execute("BEGIN IMMEDIATE")
            try:
                await _add_counters(db, items)
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise

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
            "used_bytes": await self._used_bytes(),
            "db_bytes": _file_bytes(self.path),
            "max_bytes": self.limits.max_bytes,
            "free_disk_bytes": self._free_disk(),
            "recovered_from": self.recovered_from,
        }


async def query_history(
    db: aiosqlite.Connection,
    *,
    limit: int = 50,
    since: float | None = None,
    device: str | None = None,
    household: str | None = None,
    kind: str | None = None,
    after_seq: int = 0,
    install: str | None = None,
    session: int | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Filtered history rows (shared by the daemon and the read-only CLI); ``since`` ≤ wall < ``until``.

    Without ``session``: the newest ``limit`` matches. With it: a range of that session by ``seq`` (a consumer
    filling a gap), the first ``limit`` from ``from_seq`` on, so a long gap is fetched page by page. ``install``
    names the installation the range belongs to: another one's history is not in this file, so nothing matches.
    """
    if install is not None:
        rows = await db.execute_fetchall("SELECT value FROM meta WHERE key = 'install'")
        if install not in {str(r[0]) for r in rows}:
            return []
    where = ["seq > ?"]
    args: list[Any] = [after_seq]
    ranged = session is not None
    if ranged:
        where.append("session = ? AND session_seq BETWEEN ? AND ?")
        args += [session, max(1, from_seq or 1), to_seq if to_seq is not None else 2**62]
    filters, filter_args = history_filters(device=device, household=household, kind=kind, since=since, until=until)
    where += filters
    args += filter_args
    cur = await db.execute(
        f"SELECT seq, payload, delivered, delivered_at FROM events WHERE {' AND '.join(where)}"
        f" ORDER BY {'session_seq' if ranged else 'seq DESC'} LIMIT ?",
        (*args, limit),
    )
    rows = list(await cur.fetchall())
    out = []
    for seq, payload, delivered, delivered_at in (rows if ranged else reversed(rows)):
        item = json.loads(payload)
        item["stored_seq"] = seq
        item["delivered"] = bool(delivered)
        item["delivered_at"] = delivered_at
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------- helpers


async def _earlier_sessions(db: aiosqlite.Connection, id_prefix: str, session: int) -> tuple[tuple[int, int], ...]:
    """(session, last seq) of the sessions before ``session`` whose events (ids starting ``id_prefix``: this
    installation's) are still held, newest first, at most :data:`EARLIER_SESSIONS_LISTED`."""
    rows = await db.execute_fetchall(
        "SELECT session, max(session_seq) FROM events WHERE session < ? AND substr(event_id, 1, ?) = ?"
        " GROUP BY session ORDER BY session DESC LIMIT ?",
        (session, len(id_prefix), id_prefix, EARLIER_SESSIONS_LISTED))
    return tuple((int(s), int(last)) for s, last in rows)


async def _rollback(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")


async def _add_counters(db: aiosqlite.Connection, counts: Mapping[str, int]) -> None:
    await db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER)",
        [(k, str(v)) for k, v in counts.items()])


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


def _read_session_file(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_session_file(path: Path, session: int) -> None:
    """Remember the session beside the database (atomically), so a replaced file never repeats an id."""
    _write_small_file(path, f"{session}\n")


def _boot_id() -> str:
    """The kernel's id of this boot ("" where there is none): monotonic times compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def new_install_id() -> str:
    """A random installation identity: 16 hex digits (64 bits), so two installations never share one."""
    return secrets.token_hex(8)


def _reconcile_install_file(path: Path, install: str) -> None:
    """The file beside the database follows the database's identity (which wins when the two disagree)."""
    try:
        found = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        found = ""
    if found == install:
        return
    if found:
        log.warning("installation identity file disagrees with the database; the database's identity is kept",
                    path=str(path), file=found, database=install)
    _write_small_file(path, f"{install}\n")


def _write_small_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably; a failure is logged (the database copy counts)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write a file beside the database", path=str(path), error=str(exc))


def _move_aside(path: str) -> str:
    """Rename ``path`` (and its -wal/-shm) to ``<path>.corrupt-<UTC timestamp>``; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            shutil.move(path + suffix, target + suffix)
    return target


@dataclass
class _Salvage:
    session: int
    rows: list[tuple[Any, ...]]
    counters: dict[str, int]
    install: str | None = None


def _salvage(path: str) -> _Salvage:
    """Read what still reads from a corrupt file: the session counter, counters and undelivered rows."""
    out = _Salvage(0, [], {})
    if not os.path.exists(path):
        return out
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return out
    try:
        with contextlib.suppress(sqlite3.Error, ValueError):
            for key, value in db.execute("SELECT key, value FROM meta"):
                if key == "session":
                    out.session = int(value)
                elif key == "install":
                    out.install = str(value)
                elif str(key).startswith(("evicted.", "dropped.", "retired.")):
                    out.counters[str(key)] = int(value)
        with contextlib.suppress(sqlite3.Error):
            for row in db.execute(f"SELECT seq, {_COLUMNS} FROM events NOT INDEXED WHERE delivered = 0"):
                out.rows.append(tuple(row))
    finally:
        db.close()
    out.rows.sort(key=lambda r: r[0])
    out.rows = [r[1:] for r in out.rows]
    return out
