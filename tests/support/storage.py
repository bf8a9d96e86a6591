"""Storage helpers for tests: a real outbox file with no room left."""

from __future__ import annotations

import contextlib
import sqlite3
import time

from gateway.events import Event
from gateway.uplink.outbox import Outbox


async def fill_to_the_brim(outbox: Outbox, *, leave_nothing_evictable: bool = False) -> None:
    """Cap the file at its current pages (SQLite ``max_page_count``) and fill what is left with undelivered
    faults, which are never evicted. With ``leave_nothing_evictable``, delivered history and undelivered
    telemetry are deleted first, so nothing can make room."""
    db = outbox.connection
    if leave_nothing_evictable:
        await db.execute("DELETE FROM events WHERE priority < 2 OR delivered = 1")
    rows = await db.execute_fetchall("PRAGMA page_count")
    await db.execute(f"PRAGMA max_page_count = {next(iter(rows))[0]}")
    for size in (8000, 1000, 100, 10):
        with contextlib.suppress(sqlite3.OperationalError):
            while True:
                await outbox.append([Event("fault", "raised", time.monotonic(), code="filler", detail="f" * size,
                                           wall=time.time())])
