"""The salvage of a corrupt outbox file: move it aside, read what still reads, carry it into the new file.

What is carried over: the session counter and the installation identity (so no event id comes back), the
eviction and drop counters, and every readable undelivered row (delivered history stays in the moved file).
The outbox then stores a ``storage_corrupt`` fault. See ``docs/storage.md``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from gateway.uplink.outbox.schema import COLUMNS, add_counters, transaction

__all__ = ["Salvage", "carry_over", "move_aside", "read_salvage"]


@dataclass
class Salvage:
    """What still reads from a corrupt file."""

    session: int = 0
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    """Undelivered rows, oldest first, as the values of :data:`~gateway.uplink.outbox.schema.COLUMNS`."""
    counters: dict[str, int] = field(default_factory=dict)
    install: str | None = None


def read_salvage(path: str) -> Salvage:
    """Read what still reads from the corrupt file at ``path`` (blocking: run it in a thread)."""
    out = Salvage()
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
            for row in db.execute(f"SELECT seq, {COLUMNS} FROM events NOT INDEXED WHERE delivered = 0"):
                out.rows.append(tuple(row))
    finally:
        db.close()
    out.rows.sort(key=lambda r: r[0])
    out.rows = [r[1:] for r in out.rows]
    return out


def move_aside(path: str) -> str:
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


async def carry_over(db: aiosqlite.Connection, salvage: Salvage) -> None:
    """Store the salvaged rows (new seqs, the same ids) and counters in the fresh file, in one transaction."""
    async with transaction(db):
        if salvage.rows:
            marks = ",".join("?" * len(COLUMNS.split(",")))
            await db.executemany(f"INSERT OR IGNORE INTO events ({COLUMNS}) VALUES ({marks})", salvage.rows)
        if salvage.counters:
            await add_counters(db, salvage.counters)
