"""The outbox's schema and event ids: its tables and statements, the connection's settings, and the sessions.

An event id never repeats: ``<gateway>:<install>:<session>:<seq>``. ``install`` is a random identity made when
the database is created (kept in its ``meta`` table, copied to ``<db>.install-id`` beside it); a new database —
a reinstall, a new SD card, a demo run — is a new installation, so its session counter may start at 1 again
without an id ever coming back. The session counter is kept in the database (and in ``<db>.session``) and
bumped at every start. docs/storage.md gives the rules.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import structlog

__all__ = [
    "CACHE_KIB",
    "COLUMNS",
    "EARLIER_SESSIONS_LISTED",
    "EVENT_VERSION",
    "INSERT_EVENT",
    "INSERT_SIZES",
    "MB",
    "SCHEMA_VERSION",
    "Session",
    "add_counters",
    "connect",
    "id_prefix",
    "insert_events",
    "new_install_id",
    "rollback",
    "start_session",
    "transaction",
]

log = structlog.get_logger()
SCHEMA_VERSION = 3
#: ``version`` of the event messages this outbox stores (schemas/event.json); 1 had no ``install``.
EVENT_VERSION = 2
MB = 1024 * 1024

SCHEMA = """
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

#: The columns an appended event fills, after its ``seq``.
COLUMNS = ("event_id, session, session_seq, kind, action, priority, device, unit, household, wall, mono,"
           " clock_synced, payload")

_ROW_WIDTH = len(COLUMNS.split(",")) + 1
#: One event, its seq given (the outbox is the file's only writer).
INSERT_EVENT = f"INSERT INTO events (seq, {COLUMNS}) VALUES ({', '.join('?' * _ROW_WIDTH)})"
#: The row counts a batch INSERT is written for: a batch is padded with rows of NULLs up to the next one (and
#: cut into pieces of the largest), so SQLite's statement cache holds three texts whatever the batch sizes
#: (compiled, about 1.3 KB a row: 180 KiB). A multi-row INSERT per batch size held 3.8 MB more after 60 sizes
#: had been seen (the storage process grew for an hour in benchmarks/soak.py). One statement is one trip to
#: SQLite's thread and one step for the whole batch, where an ``executemany`` between BEGIN and COMMIT took
#: three trips and released and took back the GIL once a row, against the loop's thread (docs/storage.md,
#: "Forwarding figures"). Pieces of 64 (a 100-event batch in two, inside BEGIN … COMMIT) gained nothing.
INSERT_SIZES = (1, 8, 128)


@functools.cache
def _insert_rows_sql(size: int) -> str:
    if size == 1:
        return INSERT_EVENT
    row = f"({', '.join('?' * _ROW_WIDTH)})"
    return (f"INSERT INTO events (seq, {COLUMNS}) SELECT * FROM (VALUES {', '.join([row] * size)})"
            " WHERE column1 IS NOT NULL")


def insert_events(rows: Sequence[Sequence[object]]) -> Iterator[tuple[str, list[object]]]:
    """The statements (text, parameters) that insert ``rows`` (each ``seq`` then :data:`COLUMNS`): one per
    :data:`INSERT_SIZES` [-1] rows, each of one of the fixed sizes, padded with NULL rows that are not inserted."""
    largest = INSERT_SIZES[-1]
    for start in range(0, len(rows), largest):
        piece = rows[start:start + largest]
        size = next(n for n in INSERT_SIZES if n >= len(piece))
        params: list[object] = [value for row in piece for value in row]
        params.extend([None] * (_ROW_WIDTH * (size - len(piece))))
        yield _insert_rows_sql(size), params

_BOOT_SESSIONS_KEPT = 500
#: Earlier sessions the birth message lists with their last ``seq`` (docs/mqtt.md, "Filling a gap").
EARLIER_SESSIONS_LISTED = 100
_JOURNAL_SIZE_LIMIT = 4 * MB
#: SQLite's page cache for the outbox connection, in KiB. Its default (2 MiB) fills as the file grows and
#: is then held for good (a bare connection appending 20 000 rows held 2016 kB more with it, 188 kB with
#: 256 KiB); the outbox appends at the end of its tables and reads their oldest rows.
CACHE_KIB = 512


async def connect(path: str, *, busy_timeout_ms: int) -> aiosqlite.Connection:
    """The outbox's connection: autocommit (transactions are explicit), WAL, ``synchronous=FULL``.

    With ``synchronous=FULL`` a commit that returned is on the disk, for every priority class.
    """
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
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


@dataclass(frozen=True, slots=True)
class Session:
    """This start of the outbox: its number, the installation, and what came before it."""

    number: int
    install: str
    this_boot: frozenset[int]
    """Sessions started since the machine booted: their events' monotonic times compare with today's."""
    earlier: tuple[tuple[int, int], ...]
    """Earlier sessions of this installation with events still held, newest first, each with its last ``seq``
    (at most :data:`EARLIER_SESSIONS_LISTED`)."""


def id_prefix(gateway_id: str, install: str, session: int) -> str:
    """What every event id of this session starts with; the session's ``seq`` follows."""
    return f"{gateway_id}:{install}:{session}:"


async def start_session(db: aiosqlite.Connection, *, path: str, gateway_id: str, check: bool, floor: int = 0,
                        install: str | None = None) -> Session:
    """Create the tables if needed and start a new session, above ``floor`` and any session seen before.

    ``check``: run ``quick_check`` first and raise :class:`sqlite3.DatabaseError` if the file is damaged.
    ``install``: the identity to keep if the database has none (a replaced file); the database's own wins.
    """
    await db.executescript(SCHEMA)
    if check:
        cur = await db.execute("PRAGMA quick_check")
        problems = [str(r[0]) for r in await cur.fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(problems[:3])}")
    session_file, install_file = Path(f"{path}.session"), Path(f"{path}.install-id")
    async with transaction(db):
        cur = await db.execute("SELECT key, value FROM meta WHERE key IN ('session', 'install')")
        meta = {str(k): str(v) for k, v in await cur.fetchall()}
        session = max(int(meta.get("session", 0)), _read_session_file(session_file), floor) + 1
        # The database's identity wins; one without (new, or from before identities) starts a new one.
        install = meta.get("install") or install or new_install_id()
        boot = _boot_id()
        await db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [("session", str(session)), ("schema", str(SCHEMA_VERSION)),
                              ("gateway_id", gateway_id), ("install", install), (f"boot.{session}", boot)])
        # Which sessions ran in this boot (the storage process may have been restarted): the last few hundred.
        await db.execute("DELETE FROM meta WHERE key LIKE 'boot.%' AND CAST(substr(key, 6) AS INTEGER) < ?",
                         (session - _BOOT_SESSIONS_KEPT,))
        cur = await db.execute("SELECT key FROM meta WHERE key LIKE 'boot.%' AND value = ?", (boot,))
        this_boot = frozenset(int(str(k)[5:]) for (k,) in await cur.fetchall()) if boot else frozenset({session})
    # Remember the session beside the database, so a replaced file never repeats an id.
    _write_small_file(session_file, f"{session}\n")
    _reconcile_install_file(install_file, install)
    earlier = await _earlier_sessions(db, f"{gateway_id}:{install}:", session)
    return Session(session, install, this_boot, earlier)


async def _earlier_sessions(db: aiosqlite.Connection, prefix: str, session: int) -> tuple[tuple[int, int], ...]:
    """(session, last seq) of the sessions before ``session`` whose events (ids starting ``prefix``: this
    installation's) are still held, newest first, at most :data:`EARLIER_SESSIONS_LISTED`."""
    rows = await db.execute_fetchall(
        "SELECT session, max(session_seq) FROM events WHERE session < ? AND substr(event_id, 1, ?) = ?"
        " GROUP BY session ORDER BY session DESC LIMIT ?",
        (session, len(prefix), prefix, EARLIER_SESSIONS_LISTED))
    return tuple((int(s), int(last)) for s, last in rows)


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if any (a failure to do so is not news)."""
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")


@contextlib.asynccontextmanager
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock at once) … ``COMMIT``; rolled back if the body or the commit fails."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        await db.execute("COMMIT")
    except BaseException:
        await rollback(db)
        raise


async def add_counters(db: aiosqlite.Connection, counts: Mapping[str, int]) -> None:
    """Add to the persisted counters in ``meta`` (inside the caller's transaction)."""
    await db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER)",
        [(k, str(v)) for k, v in counts.items()])


def new_install_id() -> str:
    """A random installation identity: 16 hex digits (64 bits), so two installations never share one."""
    return secrets.token_hex(8)


def _read_session_file(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0


def _boot_id() -> str:
    """The kernel's id of this boot ("" where there is none): monotonic times compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


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
