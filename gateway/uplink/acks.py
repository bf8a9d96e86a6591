"""The uplink's acknowledgement store: rows the broker acknowledged, marked delivered in the outbox in batches.

A row leaves the outbox only on its own PUBACK (rule 3): the forwarder hands each successful PUBACK here, and
they are written to SQLite in one transaction once :data:`ACK_BATCH` have gathered, :data:`ACK_DELAY_S` has
passed or nothing else is waiting. A write that fails keeps them queued for the next try; acknowledgements for
an outbox file that was replaced (the outbox's generation moved on) are dropped, their seqs mean nothing now.
Every SQLite error the uplink meets ends here: a busy or corrupt file is handed to :meth:`Outbox.recover`,
and a read made only to choose a wait or to log (:meth:`urgent_waiting`, :meth:`backlog`) answers without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable

import structlog

from gateway.uplink.outbox import Outbox

__all__ = ["ACK_BATCH", "ACK_DELAY_S", "STORAGE_ERRORS", "AckStore"]

log = structlog.get_logger()
#: Acknowledgements written in one transaction at most, and the longest they wait for one.
ACK_BATCH = 256
ACK_DELAY_S = 0.2
#: What a read or write of the outbox raises when its file is busy, corrupt or closed.
STORAGE_ERRORS = (sqlite3.Error, ValueError)
#: What the forwarder does when the outbox fails it: recover, then pause (``(exc, generation)``).
StorageTrouble = Callable[[BaseException, int], Awaitable[None]]


class AckStore:
    """Acknowledged ``(seq, publishes)`` pairs on their way to :meth:`Outbox.mark_delivered` (the loop only)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._acked: list[tuple[int, int]] = []  # (seq, publishes) acknowledged, not yet marked in SQLite
        self._since: float | None = None  # when the oldest of them was acknowledged
        self._generation = outbox.generation
        self._marking: asyncio.Task[None] | None = None  # a write beside publishing

    def __len__(self) -> int:
        return len(self._acked)

    def add(self, seq: int, publishes: int, acked_at: float) -> None:
        if not self._acked:
            self._since = acked_at
        self._acked.append((seq, publishes))

    def due(self, now: float, *, idle: bool, stopping: bool) -> bool:
        """Time to write: a batch gathered, the oldest waited :data:`ACK_DELAY_S`, nothing else to do, or stop."""
        if not self._acked:
            return False
        return idle or stopping or len(self._acked) >= ACK_BATCH or now - (self._since or 0.0) >= ACK_DELAY_S

    def deadline(self, now: float) -> float | None:
        """When the oldest waiting acknowledgement is due, or None when none waits."""
        return None if not self._acked else (self._since or now) + ACK_DELAY_S

    def mark_in_background(self, generation: int, trouble: StorageTrouble) -> None:
        """Write in a task of its own, unless one is under way: publishing goes on while the outbox commits."""
        if self._marking is None or self._marking.done():
            self._marking = asyncio.create_task(self._mark(generation, trouble))

    async def _mark(self, generation: int, trouble: StorageTrouble) -> None:
        try:
            await self.flush()
        except STORAGE_ERRORS as exc:  # the acks stay queued; the next flush tries again
            await trouble(exc, generation)

    async def marked(self) -> None:
        """Wait for the background write, if one runs."""
        if self._marking is not None:
            with contextlib.suppress(Exception):
                await self._marking

    async def flush(self) -> None:
        """Mark acknowledged rows delivered, in one transaction. On failure they stay queued for the next try."""
        if not self._acked:
            return
        if self._generation != self.outbox.generation:  # acks for a file that was replaced
            self._acked.clear()
            self._generation = self.outbox.generation
            return
        acked, self._acked = self._acked, []
        since, self._since = self._since, None
        try:
            await self.outbox.mark_delivered(acked)
        except BaseException:
            self._acked = acked + self._acked
            self._since = since
            raise

    async def flush_quietly(self) -> None:
        """:meth:`flush` when the connection has ended; what cannot be written now waits for the next try."""
        await self.marked()
        with contextlib.suppress(*STORAGE_ERRORS):
            await self.flush()

    def forget(self) -> None:
        """The outbox file was replaced: every seq here means nothing now."""
        self._acked.clear()
        self._generation = self.outbox.generation

    async def recover(self, exc: BaseException, generation: int) -> None:
        """A read or ack write failed: the outbox decides (busy: nothing to do; corrupt: a new file)."""
        log.warning("outbox unavailable to the uplink; retrying", error=str(exc))
        with contextlib.suppress(sqlite3.Error, OSError, ValueError):
            await self.outbox.recover(exc, generation=generation)

    async def urgent_waiting(self) -> bool:
        """Does an alarm, supervisory signal or fault wait? False when nothing can be read (nothing could be sent)."""
        try:
            return await self.outbox.urgent_waiting()
        except STORAGE_ERRORS:
            return False

    async def backlog(self) -> int | str:
        """Rows waiting, for a log line: ``"unknown"`` when the file cannot be read."""
        try:
            waiting, _ = await self.outbox.backlog()
        except STORAGE_ERRORS:
            return "unknown"
        return waiting
