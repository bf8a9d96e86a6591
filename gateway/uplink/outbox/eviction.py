"""The outbox's eviction policy: what leaves the file when a bound is hit, in which order, and when history retires.

Bounds: a size cap and a free-disk watermark. When either is hit, rows are evicted in a fixed ladder —
delivered history first, then undelivered rows from the lowest priority class up, oldest first — and every
eviction is counted in the ``meta`` table. Delivered history is kept for ``history_s`` and at least
``history_min_events`` rows (within the cap). See ``docs/storage.md``. Each function runs its statements on
the caller's connection; the caller holds the outbox's lock.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import aiosqlite
import structlog

from gateway.events import Priority
from gateway.uplink.outbox.schema import MB, add_counters, transaction

__all__ = ["DAY_S", "StorageLimits", "disk_free_bytes", "enforce_bounds", "give_back_space", "make_room", "retain",
           "used_bytes"]

log = structlog.get_logger()
DAY_S = 86_400.0

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
_EVICT_CHUNK_MIN = 64
_EVICT_CHUNK_MAX = 5_000
_EVICT_TARGET = 0.9  # after hitting a bound, evict down to 90 % of it


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


def disk_free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return int(st.f_bavail * st.f_frsize)


async def used_bytes(db: aiosqlite.Connection) -> int:
    """Bytes of the database file holding data (free pages are reused before the file grows)."""
    values = []
    for pragma in ("page_count", "freelist_count", "page_size"):
        cur = await db.execute(f"PRAGMA {pragma}")
        row = await cur.fetchone()
        values.append(int(row[0]) if row else 0)
    pages, free, size = values
    return (pages - free) * size


async def enforce_bounds(db: aiosqlite.Connection, limits: StorageLimits, free: int | None) -> dict[str, int]:
    """Evict by the ladder if the size cap or the free-disk watermark (``free``: bytes left on the disk, None
    if unknown) is hit; returns what went, by rung."""
    used = await used_bytes(db)
    evicted: dict[str, int] = {}
    if used > limits.max_bytes:
        target = int(limits.max_bytes * _EVICT_TARGET)
        evicted = await _evict_to(db, target, top=Priority.ALARM, reason="size cap")
        used = await used_bytes(db)
    if free is not None and free < limits.min_free_bytes:
        shortfall = limits.min_free_bytes - free
        target = max(0, used - shortfall - int(limits.min_free_bytes * (1 - _EVICT_TARGET)))
        more = await _evict_to(db, target, top=Priority(_DISK_PROTECTED - 1), reason="low disk")
        for key, n in more.items():
            evicted[key] = evicted.get(key, 0) + n
        await give_back_space(db)
    return evicted


async def make_room(db: aiosqlite.Connection) -> dict[str, int]:
    """The disk (or ``max_page_count``) is full: evict what the free-disk rule allows; returns what went."""
    used = await used_bytes(db)
    target = used - max(256 * 1024, used // 20)
    return await _evict_to(db, max(0, target), top=Priority(_DISK_PROTECTED - 1), reason="disk full")


async def give_back_space(db: aiosqlite.Connection) -> None:
    """Return free pages to the filesystem and truncate the WAL."""
    # executescript steps each statement to the end: incremental_vacuum frees one page per step.
    await db.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")


async def _evict_to(db: aiosqlite.Connection, target: int, *, top: Priority, reason: str) -> dict[str, int]:
    used = await used_bytes(db)
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
            async with transaction(db):
                cur = await db.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE delivered = ? AND priority = ?"
                    " ORDER BY seq LIMIT ?)", (delivered, int(priority), n))
                gone = cur.rowcount
                if gone > 0:
                    await add_counters(db, {key: gone})
            if gone <= 0:
                break
            evicted[key] = evicted.get(key, 0) + gone
            used = await used_bytes(db)
        if used <= target:
            break
    if evicted:
        lost = {k: v for k, v in evicted.items() if ".undelivered." in k}
        (log.error if lost else log.warning)("storage bound hit: events evicted", reason=reason,
                                             evicted=evicted, used_bytes=used, target_bytes=target)
    return evicted


async def retain(db: aiosqlite.Connection, limits: StorageLimits, now: float | None) -> int:
    """Delete delivered history older than ``history_s`` beyond the newest ``history_min_events``.

    Age counts from the later of the event time and the delivery time (both seconds since the epoch), so
    an event stamped by an unsynchronised clock is not thrown away early. Returns rows deleted.
    """
    cutoff = (time.time() if now is None else now) - limits.history_s
    cur = await db.execute(
        "SELECT seq FROM events WHERE delivered = 1 ORDER BY seq DESC LIMIT 1 OFFSET ?",
        (max(0, limits.history_min_events - 1),))
    row = await cur.fetchone()
    if row is None:
        return 0
    boundary = int(row[0])
    async with transaction(db):
        cur = await db.execute(
            "DELETE FROM events WHERE delivered = 1 AND seq < ? AND MAX(wall, COALESCE(delivered_at, wall)) < ?",
            (boundary, cutoff))
        gone = max(0, cur.rowcount)
        if gone:
            await add_counters(db, {"retired.history": gone})
    if gone:
        log.info("history retention", deleted=gone, older_than_days=round(limits.history_s / DAY_S, 1))
    return gone
