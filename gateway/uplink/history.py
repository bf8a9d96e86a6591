"""The outbox's history as read back: the daemon's query, and gatewayctl's read-only reads of the file.

One place says what ``device``, ``household``, ``kind``, ``since`` and ``until`` mean (:func:`history_filters`),
for the daemon's query (:func:`query_history`, behind ``Outbox.recent``), ``gatewayctl events --format``
(:func:`export_rows`) and ``gatewayctl status``/``events`` with the daemon down (:func:`read_offline`). Every
SQL statement that reads the outbox's history lives here, none in the CLI. No imports beyond the standard
library at import time, so the CLI stays light.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiosqlite

__all__ = ["EXPORT_PAGE_ROWS", "OfflineView", "export_rows", "history_filters", "query_history", "read_offline"]

#: Rows an export reads at a time (:func:`export_rows`).
EXPORT_PAGE_ROWS = 5000


def history_filters(*, device: str | None = None, household: str | None = None, kind: str | None = None,
                    since: float | None = None, until: float | None = None) -> tuple[list[str], list[Any]]:
    """``WHERE`` terms (to join with AND) and their arguments: equal ``device``, ``household`` and ``kind``;
    ``since`` ≤ wall < ``until``. A filter left at None matches everything."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("device", device), ("household", household), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("wall >= ?")
        args.append(since)
    if until is not None:
        where.append("wall < ?")
        args.append(until)
    return where, args


def _item(seq: int, payload: str, delivered: int, delivered_at: float | None) -> dict[str, Any]:
    """A stored event as history shows it: its JSON, with where it sits and whether the broker has it."""
    item: dict[str, Any] = json.loads(payload)
    item["stored_seq"] = seq
    item["delivered"] = bool(delivered)
    item["delivered_at"] = delivered_at
    return item


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
    return [_item(*row) for row in (rows if ranged else reversed(rows))]


def export_rows(database: str, *, limit: int | None = None, since: float | None = None, until: float | None = None,
                device: str | None = None, household: str | None = None, kind: str | None = None
                ) -> Iterator[dict[str, Any]]:
    """Stored events matching the filters, oldest first (``since`` ≤ time < ``until``), read from the database
    file opened read-only and streamed row by row: no cap, little memory. Raises :class:`sqlite3.Error`.

    Rows are read :data:`EXPORT_PAGE_ROWS` at a time, each page a short read of its own, so an export held
    mid-way (``| less`` left open) keeps no read transaction open and never stops the daemon's WAL
    checkpoints. Events stored after the export began are left out, as a single read would have.
    """
    filters, args = history_filters(device=device, household=household, kind=kind, since=since, until=until)
    where = ["1", *filters]
    db = sqlite3.connect(f"file:{Path(database).resolve()}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        last_seq = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        query = (f"SELECT seq, payload, delivered, delivered_at FROM events WHERE {' AND '.join(where)}"
                 " AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
        after, left = 0, limit or None
        while last_seq is not None and left != 0:
            size = EXPORT_PAGE_ROWS if left is None else min(EXPORT_PAGE_ROWS, left)
            page = db.execute(query, (*args, after, last_seq, size)).fetchall()
            for row in page:
                yield _item(*row)
            if len(page) < size:
                return
            after = page[-1][0]
            left = None if left is None else left - len(page)
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class OfflineView:
    """What the database file alone tells while the daemon is down."""

    meta: dict[str, str]
    backlog: int
    oldest_undelivered: float | None
    latest: list[tuple[Any, ...]]
    """The last event of each device: ``(device, unit, household, kind, action, wall, payload)``, by device."""
    events: list[dict[str, Any]]
    """The matches of the history query, if one was asked."""


async def read_offline(database: str, query: Mapping[str, Any]) -> OfflineView:
    """Read the database file read-only: ``meta``, the backlog, each device's last event, and the history
    matching ``query`` (the keywords of :func:`query_history`; none asked if empty). Raises what SQLite raises."""
    import aiosqlite

    async with aiosqlite.connect(f"file:{Path(database).resolve()}?mode=ro", uri=True) as db:
        await db.execute("PRAGMA busy_timeout = 2000")
        meta = {str(k): str(v) for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
        backlog, oldest = next(iter(await db.execute_fetchall(
            "SELECT COUNT(*), MIN(wall) FROM events WHERE delivered = 0")), (0, None))
        events = await query_history(db, **query) if query else []
        latest = [tuple(row) for row in await db.execute_fetchall(
            "SELECT e.device, e.unit, e.household, e.kind, e.action, e.wall, e.payload FROM events e"
            " JOIN (SELECT device, MAX(seq) AS seq FROM events WHERE device IS NOT NULL GROUP BY device) m"
            " ON e.seq = m.seq ORDER BY e.device")]
    return OfflineView(meta, int(backlog), oldest, latest, events)
