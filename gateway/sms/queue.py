"""The SMS queue: what is owed a message, and each message until the modem took it (SQLite).

An event owed a message is committed here, with the panel's hand-over mark in the same transaction, before the
panel is told it is stored (the same protocol as the outbox, docs/architecture.md): a kill -9 of any process
loses none. A message leaves ``pending`` only when the modem answered OK for it; a crash between that OK and
the commit sends it once more after the restart — at least once, at most one duplicate per crash.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Outgoing", "SmsQueue"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owed (
    key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    made REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'owed'  -- owed | cancelled | due
);
CREATE TABLE IF NOT EXISTS outgoing (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    recipient TEXT NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    first INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,  -- pending | sent | held | failed
    created REAL NOT NULL,
    next_try REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    parts INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS outgoing_state ON outgoing (state, id);
CREATE INDEX IF NOT EXISTS owed_state ON owed (state);
"""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message waiting for the modem."""

    id: int
    key: str
    recipient: str
    role: str
    text: str
    attempts: int


class SmsQueue:
    """One connection to the queue file (one per thread that uses it)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------------------ what is owed

    def store(self, owed: Sequence[tuple[str, str, float]], mark: str | None) -> None:
        """Commit events owed a message (``key``, event JSON, made) and the hand-over mark, in one transaction."""
        with self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO owed (key, body, made) VALUES (?, ?, ?)", owed)
            if mark is not None:
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('handover', ?)", (mark,))

    def handover_mark(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'handover'").fetchone()
        return None if row is None else str(row[0])

    def cancel(self, keys: Iterable[str]) -> None:
        """The broker acknowledged these events: no message is owed for them any more."""
        with self._transaction():
            self.db.executemany("UPDATE owed SET state = 'cancelled' WHERE key = ? AND state = 'owed'",
                                [(k,) for k in keys])

    def owed(self) -> list[tuple[str, str, float]]:
        """Events still owed a message: (key, event JSON, made)."""
        return [(str(k), str(b), float(m)) for k, b, m in
                self.db.execute("SELECT key, body, made FROM owed WHERE state = 'owed' ORDER BY made")]

    # ------------------------------------------------------------------------------ messages

    def enqueue(self, due: Iterable[str], messages: Iterable[tuple[str, str, str, str, bool, str]]) -> None:
        """The events ``due`` are no longer owed; their messages (key, recipient, role, text, first, state:
        ``pending`` or ``held``) are queued — in one transaction."""
        now = time.time()
        with self._transaction():
            self.db.executemany("UPDATE owed SET state = 'due' WHERE key = ?", [(k,) for k in due])
            self.db.executemany(
                "INSERT INTO outgoing (key, recipient, role, text, first, state, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(k, r, role, text, int(first), state, now) for k, r, role, text, first, state in messages])

    def add_message(self, key: str, recipient: str, role: str, text: str) -> int:
        """One message outside the rules (a test message); its id."""
        cur = self.db.execute(
            "INSERT INTO outgoing (key, recipient, role, text, state, created) VALUES (?, ?, ?, ?, 'pending', ?)",
            (key, recipient, role, text, time.time()))
        return int(cur.lastrowid or 0)

    def next_pending(self, now: float) -> Outgoing | None:
        row = self.db.execute(
            "SELECT id, key, recipient, role, text, attempts FROM outgoing WHERE state = 'pending' AND next_try <= ?"
            " ORDER BY first DESC, id LIMIT 1", (now,)).fetchone()
        return None if row is None else Outgoing(*row)

    def next_try_at(self) -> float | None:
        row = self.db.execute("SELECT MIN(next_try) FROM outgoing WHERE state = 'pending'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def mark_sent(self, message_id: int, parts: int) -> None:
        self.db.execute("UPDATE outgoing SET state = 'sent', sent_at = ?, parts = ?, attempts = attempts + 1,"
                        " error = NULL WHERE id = ?", (time.time(), parts, message_id))

    def mark_retry(self, message_id: int, error: str, delay_s: float) -> None:
        self.db.execute("UPDATE outgoing SET attempts = attempts + 1, error = ?, next_try = ? WHERE id = ?",
                        (error, time.time() + delay_s, message_id))

    def state_of(self, message_id: int) -> tuple[str, str | None]:
        row = self.db.execute("SELECT state, error FROM outgoing WHERE id = ?", (message_id,)).fetchone()
        return ("unknown", None) if row is None else (str(row[0]), row[1])

    def sent_since(self, since: float) -> list[tuple[str, float]]:
        """(recipient, when) of messages sent or queued since ``since`` (the hourly cap after a restart)."""
        return [(str(r), float(t)) for r, t in self.db.execute(
            "SELECT recipient, created FROM outgoing WHERE state IN ('pending', 'sent') AND created >= ?"
            " AND role != 'test' ORDER BY created", (since,))]

    def figures(self) -> dict[str, Any]:
        counts = dict(self.db.execute("SELECT state, COUNT(*) FROM outgoing GROUP BY state").fetchall())
        owed = self.db.execute("SELECT COUNT(*) FROM owed WHERE state = 'owed'").fetchone()[0]
        last = self.db.execute("SELECT MAX(sent_at) FROM outgoing WHERE state = 'sent'").fetchone()[0]
        return {"owed": int(owed), "pending": int(counts.get("pending", 0)), "sent": int(counts.get("sent", 0)),
                "held_back": int(counts.get("held", 0)), "last_sent": last}

    def _transaction(self) -> Any:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
