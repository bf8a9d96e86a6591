"""The outbox: every event committed to SQLite before it is forwarded, kept until its PUBACK.

One aiosqlite connection owned by the asyncio loop. WAL journal with ``synchronous=FULL``: a commit that
returned is on the disk. Each event gets an id unique across restarts — ``<gateway>:<session>:<seq>`` —
where the session counter is kept in the database and bumped at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from gateway.clock import clock_synchronised
from gateway.events import Event, Priority

__all__ = ["SCHEMA_VERSION", "Outbox", "PendingEvent"]

log = structlog.get_logger()
SCHEMA_VERSION = 1

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
CREATE INDEX IF NOT EXISTS events_wall ON events (wall);
CREATE INDEX IF NOT EXISTS events_device ON events (device, seq);
"""


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A stored event not yet acknowledged by the broker."""

    seq: int
    event_id: str
    session: int
    kind: str
    priority: int
    payload: str
    attempts: int
    mono: float


class Outbox:
    """Append, read pending, acknowledge. All methods run on the asyncio loop."""

    def __init__(
        self, db: aiosqlite.Connection, *, path: str, gateway_id: str, session: int, identity: dict[str, str]
    ) -> None:
        self._db = db
        self.path = path
        self.gateway_id = gateway_id
        self.session = session
        self._identity = identity
        self._session_seq = 0
        self.appended = asyncio.Event()
        self.stored_total = 0

    @classmethod
    async def open(cls, path: str, *, gateway_id: str, identity: dict[str, str] | None = None) -> Outbox:
        """Open (or create) the database and start a new session."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.executescript(_SCHEMA)
        await db.execute("BEGIN IMMEDIATE")
        cur = await db.execute("SELECT value FROM meta WHERE key = 'session'")
        row = await cur.fetchone()
        session = int(row[0]) + 1 if row else 1
        await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('session', ?)", (str(session),))
        await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('gateway_id', ?)", (gateway_id,))
        await db.execute("COMMIT")
        return cls(db, path=path, gateway_id=gateway_id, session=session, identity=identity or {})

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    def _payload(self, event: Event, event_id: str, session_seq: int, synced: bool) -> str:
        body: dict[str, Any] = {
            "version": 1,
            "event_id": event_id,
            "gateway": self.gateway_id,
            **self._identity,
            "session": self.session,
            "seq": session_seq,
            "time": _iso(event.wall),
            "clock_synced": synced,
        }
        body.update(event.as_dict())
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    async def append(self, events: Sequence[Event]) -> list[str]:
        """Commit events in one transaction; returns their ids. Raises sqlite3.Error when the disk refuses."""
        if not events:
            return []
        synced = clock_synchronised()
        rows = []
        ids = []
        seq = self._session_seq
        for event in events:
            seq += 1
            event_id = f"{self.gateway_id}:{self.session}:{seq}"
            ids.append(event_id)
            rows.append((event_id, self.session, seq, event.kind, event.action, int(event.priority), event.device,
                         event.unit, event.household, event.wall or time.time(), event.mono, int(synced),
                         self._payload(event, event_id, seq, synced)))
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.executemany(
                "INSERT INTO events (event_id, session, session_seq, kind, action, priority, device, unit,"
                " household, wall, mono, clock_synced, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            await self._db.execute("COMMIT")
        except BaseException:
            await _rollback(self._db)
            raise
        self._session_seq = seq
        self.stored_total += len(events)
        self.appended.set()
        return ids

    async def pending(self, *, after: int = 0, limit: int = 100) -> list[PendingEvent]:
        """Undelivered events after ``seq``, oldest first."""
        cur = await self._db.execute(
            "SELECT seq, event_id, session, kind, priority, payload, attempts, mono FROM events"
            " WHERE delivered = 0 AND seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [PendingEvent(*row) for row in await cur.fetchall()]

    async def mark_sent(self, seqs: Iterable[int]) -> None:
        """Count a publish attempt for these rows."""
        seq_list = list(seqs)
        if seq_list:
            await self._db.executemany("UPDATE events SET attempts = attempts + 1 WHERE seq = ?",
                                       [(s,) for s in seq_list])

    async def mark_delivered(self, seqs: Iterable[int]) -> None:
        """The broker acknowledged these rows: they leave the outbox (and stay as history)."""
        now = time.time()
        rows = [(now, s) for s in seqs]
        if rows:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany("UPDATE events SET delivered = 1, delivered_at = ? WHERE seq = ?", rows)
                await self._db.execute("COMMIT")
            except BaseException:
                await _rollback(self._db)
                raise

    async def backlog(self) -> tuple[int, float | None]:
        """(undelivered count, wall time of the oldest undelivered event)."""
        cur = await self._db.execute("SELECT COUNT(*), MIN(wall) FROM events WHERE delivered = 0")
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
    ) -> list[dict[str, Any]]:
        """History, newest last, with delivery state."""
        return await query_history(self._db, limit=limit, since=since, device=device, household=household,
                                   kind=kind, after_seq=after_seq)

    @property
    def connection(self) -> aiosqlite.Connection:
        """The underlying connection (for maintenance tasks in this package)."""
        return self._db


async def query_history(
    db: aiosqlite.Connection,
    *,
    limit: int = 50,
    since: float | None = None,
    device: str | None = None,
    household: str | None = None,
    kind: str | None = None,
    after_seq: int = 0,
) -> list[dict[str, Any]]:
    """Filtered history rows (shared by the daemon and the read-only CLI)."""
    where = ["seq > ?"]
    args: list[Any] = [after_seq]
    for column, value in (("device", device), ("household", household), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("wall >= ?")
        args.append(since)
    cur = await db.execute(
        f"SELECT seq, payload, delivered, delivered_at FROM events WHERE {' AND '.join(where)}"
        " ORDER BY seq DESC LIMIT ?",
        (*args, limit),
    )
    rows = await cur.fetchall()
    out = []
    for seq, payload, delivered, delivered_at in reversed(list(rows)):
        item = json.loads(payload)
        item["stored_seq"] = seq
        item["delivered"] = bool(delivered)
        item["delivered_at"] = delivered_at
        out.append(item)
    return out


async def _rollback(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        await db.execute("ROLLBACK")


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


_ = Priority  # re-exported priority classes live in gateway.events
