"""The uplink's forwarder: the outbox's rows sent in order over one connection, through an in-flight window.

Rows flow: outbox (by seq, after the cursor) → window queue → publish (at most the window's limit without a
PUBACK; refilled as each PUBACK is read) → PUBACK → :class:`~gateway.uplink.acks.AckStore`, which marks them
delivered in batches. A row is never taken twice on one connection. A refused PUBACK (reason code ≥ 0x80)
keeps the row, which goes again after :data:`REJECTED_RETRY_S` without holding back the rows behind it. When
the connection ends, every row without a PUBACK is "outcome unknown" and goes again — with the same event id,
marked ``historical`` — on the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from gateway.events import Priority
from gateway.uplink.acks import ACK_DELAY_S, STORAGE_ERRORS, AckStore
from gateway.uplink.contract import iso_time
from gateway.uplink.outbox import Outbox, PendingEvent

__all__ = ["ACK_TIMEOUT_S", "PREFETCH_ROWS", "URGENT_PRIORITY", "Forwarder"]

log = structlog.get_logger()
#: Events of at least this class make a reconnect urgent, and their delivery is told (transmission supervision).
URGENT_PRIORITY = Priority.TROUBLE
REJECTED_RETRY_S = 5.0
ACK_TIMEOUT_S = 30.0
PREFETCH_ROWS = 500
STORAGE_RETRY_S = 0.2
OUTCOME_BATCH = 64  # PUBACKs gathered in the window before the loop is woken to take them


@dataclass(slots=True)
class _InFlight:
    row: PendingEvent
    sent_at: float
    sends: int


class _Window:
    """The rows queued on one connection and those in flight on it (the loop thread only).

    On each PUBACK (paho's ``on_publish``, called while the loop reads the socket) the row leaves the window
    and the next queued row is published at once; the loop adds rows, handles the outcomes in batches
    (marking delivered, retrying refusals) and watches the ack timeout.
    """

    def __init__(self, client: mqtt.Client, limit: int, topic: Callable[[str], str],
                 wire: Callable[[PendingEvent, bool], str], sends: dict[int, int]) -> None:
        self.client = client
        self.limit = limit
        self._topic = functools.lru_cache(maxsize=16)(topic)  # one topic per event kind
        self._wire = wire
        # seq → publishes of rows that went out without a successful PUBACK: those in flight when the
        # connection ended, and refused ones. Rows acknowledged at once never get here.
        self.sends = sends
        self.queue: deque[PendingEvent] = deque()
        self.inflight: dict[int, _InFlight] = {}  # mid → row, in publish order
        self.outcomes: list[tuple[_InFlight, ReasonCode, float]] = []
        self.refused = False  # paho refused a publish: the connection is gone
        self.closed = False
        self.resent = 0

    def fill(self) -> None:
        """Publish queued rows, in order, while there is room."""
        queue, inflight = self.queue, self.inflight
        while queue and len(inflight) < self.limit and not (self.closed or self.refused):
            row = queue.popleft()
            sends = self.sends.get(row.seq, 0)
            info = self.client.publish(self._topic(row.kind), self._wire(row, sends > 0), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                queue.appendleft(row)
                self.refused = True
                return
            if sends:
                self.resent += 1
            inflight[info.mid] = _InFlight(row, time.monotonic(), sends + 1)

    def acknowledged(self, mid: int, rc: ReasonCode) -> bool:
        """A PUBACK arrived. True when the loop should come for the outcomes now: a refusal, a batch gathered,
        or the queue ran dry (the loop refills it); otherwise it takes them on its next turn."""
        entry = self.inflight.pop(mid, None)
        if entry is None:  # not an event (availability, status, a command result)
            return False
        self.outcomes.append((entry, rc, time.monotonic()))
        return rc.is_failure or len(self.outcomes) >= OUTCOME_BATCH or not self.queue

    def take_outcomes(self) -> list[tuple[_InFlight, ReasonCode, float]]:
        out, self.outcomes = self.outcomes, []
        return out

    def add(self, rows: Iterable[PendingEvent], *, front: bool = False) -> None:
        if front:
            self.queue.extendleft(reversed(list(rows)))
        else:
            self.queue.extend(rows)

    def sizes(self) -> tuple[int, int]:
        """(queued, in flight)."""
        return len(self.queue), len(self.inflight)

    def oldest_sent(self) -> float | None:
        oldest = next(iter(self.inflight.values()), None)
        return None if oldest is None else oldest.sent_at

    def close(self) -> int:
        """No more publishing; returns how many were in flight (their outcome is unknown)."""
        self.closed = True
        for entry in self.inflight.values():
            self.sends[entry.row.seq] = entry.sends
        unknown = len(self.inflight)
        self.inflight.clear()
        self.queue.clear()
        return unknown

    def forget(self) -> None:
        """The outbox file was replaced: every seq here means nothing now."""
        self.queue.clear()
        self.inflight.clear()
        self.outcomes.clear()
        self.sends.clear()


class Forwarder:
    """Sends the outbox's rows over the current connection and counts what became of them (the loop only)."""

    def __init__(
        self,
        outbox: Outbox,
        acks: AckStore,
        topic: Callable[[str], str],
        *,
        heartbeat: Callable[[], None],
        on_delivered: Callable[[list[PendingEvent]], None] | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        prefetch: int = PREFETCH_ROWS,
        was_copied: Callable[[str], bool] | None = None,
    ) -> None:
        """``topic``: an event kind's topic. ``on_delivered``: told of each alarm, supervisory and fault row
        the broker acknowledged (transmission supervision). ``was_copied``: whether the standby connection
        sent a copy of an event id (gateway/uplink/standby.py)."""
        self.outbox = outbox
        self.acks = acks
        self._topic = topic
        self._beat = heartbeat
        self._on_delivered = on_delivered
        self._was_copied = was_copied
        self.ack_timeout_s = ack_timeout_s
        self.rejected_retry_s = REJECTED_RETRY_S
        self.prefetch = max(1, prefetch)
        self._window: _Window | None = None
        self._rejected: dict[int, tuple[PendingEvent, float]] = {}  # seq → (row, retry due)
        self._sends: dict[int, int] = {}  # publishes of rows still without a successful PUBACK
        self._cursor = 0  # highest seq taken from the outbox on this connection
        self._stale = True  # the outbox may hold rows after the cursor
        self._fetching = False
        self._arrived: list[PendingEvent] = []  # rows committed while a fetch was under way
        self._window_generation = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ack_wake_scheduled = False
        self.progress = asyncio.Event()
        """Set on a PUBACK's outcome, new rows, a lost connection or stop."""
        self.stopping = False
        """A planned stop has begun: acknowledgements are written at once."""
        self.resent_total = 0
        self.outcome_unknown_total = 0
        self.delivered_total = 0
        self.rejected_total = 0
        self.rtt_ms: float | None = None

    @property
    def inflight(self) -> int:
        """Events published and waiting for their PUBACK."""
        window = self._window
        return 0 if window is None else window.sizes()[1]

    async def run(self, client: mqtt.Client, limit: int, lost: asyncio.Event) -> str | None:
        """Forward over ``client``, ``limit`` in flight, until ``lost`` is set (None) or the connection is of no
        more use: then the reason, for ``last_error``."""
        self._loop = asyncio.get_running_loop()
        generation = self.outbox.generation
        window = _Window(client, limit, self._topic, self.wire_payload, self._sends)
        self._window, self._window_generation = window, generation
        self._stale = True
        while not lost.is_set():
            self._beat()
            if self.outbox.generation != generation:  # the file was replaced: its seqs mean nothing now
                generation = self._window_generation = self.outbox.generation
                window.forget()
                self._forget_rows()
            if window.refused:
                return "publish refused: not connected"
            sent_at = window.oldest_sent()
            if sent_at is not None and time.monotonic() - sent_at > self.ack_timeout_s:
                log.warning("broker stopped acknowledging; reconnecting", inflight=self.inflight,
                            ack_timeout_s=self.ack_timeout_s)
                return f"no PUBACK within {self.ack_timeout_s:g} s"
            self._requeue_rejected(window)
            queued, _ = window.sizes()
            try:
                if self._stale and queued < self.prefetch // 2 + 1:
                    self._stale = False
                    self._fetching = True
                    try:
                        rows = await self.outbox.pending(after=self._cursor, limit=self.prefetch)
                    finally:
                        self._fetching = False
                        arrived, self._arrived = self._arrived, []
                    if len(rows) >= self.prefetch:
                        self._stale = True
                    if rows and self.outbox.generation == generation:
                        window.add(r for r in rows if r.seq > self._cursor)
                        self._cursor = max(self._cursor, rows[-1].seq)
                    if arrived:
                        self._take_appended([r for r in arrived if r.seq > self._cursor])
                window.fill()
                queued, _ = window.sizes()
                if self.acks.due(time.monotonic(), idle=not queued and not self._stale, stopping=self.stopping):
                    self.acks.mark_in_background(generation, self._storage_trouble)
            except STORAGE_ERRORS as exc:
                self._stale = True
                await self._storage_trouble(exc, generation)
                continue
            self.progress.clear()
            queued, inflight = window.sizes()
            if (self._stale and queued < self.prefetch // 2 + 1) or (queued and inflight < window.limit):
                continue
            await self.wait_progress(self._wait_timeout())
        return None

    def published(self, client: mqtt.Client, mid: int, rc: ReasonCode) -> None:
        """A PUBACK was read on ``client``: the row leaves the window and the next one goes out at once."""
        window = self._window
        if window is not None and window.client is client:
            wake = window.acknowledged(mid, rc)
            window.fill()
            if wake:
                self._wake_for_outcomes()

    async def end(self, client: mqtt.Client) -> None:
        """``client``'s connection is over: what was in flight has an unknown outcome and goes again later."""
        window, self._window = self._window, None
        unknown = 0
        if window is not None and window.client is client:
            unknown = window.close()
            self._outcomes(window, window.take_outcomes())
        self.outcome_unknown_total += unknown
        self._rejected.clear()
        self._cursor = 0
        self._stale = True
        await self.acks.flush_quietly()  # before the next connection reads the outbox again
        if unknown:
            log.warning("uplink lost with events in flight: outcome unknown, they will be sent again",
                        inflight=unknown)

    async def drain(self, timeout_s: float, connected: Callable[[], bool]) -> None:
        """Planned stop: wait up to ``timeout_s`` while connected for the backlog to go out and be marked."""
        deadline = time.monotonic() + timeout_s
        while connected() and time.monotonic() < deadline:
            try:
                self.take_acks()
                await self.acks.marked()
                await self.acks.flush()
                waiting, _ = await self.outbox.backlog()
            except STORAGE_ERRORS:
                break
            if waiting == 0 and not self.inflight:
                break
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), timeout=max(0.01, min(0.1, deadline - time.monotonic())))

    def wire_payload(self, row: PendingEvent, resend: bool = False) -> str:
        """The stored JSON plus ``historical``, ``sent`` and ``age_s``.

        ``historical`` is true only for a copy sent again (a standby copy went first, too) or an event of an
        earlier session: an alarm raised in this session before the link came up is sent for the first time, and
        is live — ``age_s`` says how long it waited. The age comes from the monotonic clock for events of this
        boot (a wall clock set by NTP meanwhile does not change it), from the wall clock for events from before a
        reboot.
        """
        now = time.time()
        historical = (resend or row.session != self.outbox.session
                      or (self._was_copied is not None and self._was_copied(row.event_id)))
        age = time.monotonic() - row.mono if row.session in self.outbox.sessions_this_boot else now - row.wall
        return (f'{row.payload[:-1]},"historical":{"true" if historical else "false"},"sent":"{iso_time(now)}",'
                f'"age_s":{max(0.0, round(age, 3))}}}')

    def _wake_for_outcomes(self) -> None:
        """Have the loop take the window's outcomes after this read of the socket (one call for a run of PUBACKs)."""
        if self._ack_wake_scheduled:
            return
        self._ack_wake_scheduled = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon(self.take_acks)

    def take_acks(self) -> None:
        """On the loop: handle the outcomes of every PUBACK since the last call."""
        self._ack_wake_scheduled = False
        window = self._window
        if window is not None:
            self._outcomes(window, window.take_outcomes())

    def _outcomes(self, window: _Window, outcomes: list[tuple[_InFlight, ReasonCode, float]]) -> None:
        refused = False
        urgent: list[PendingEvent] = []
        for entry, rc, acked_at in outcomes:
            row = entry.row
            if rc.is_failure:  # MQTT 5 reason code ≥ 0x80: the broker did not take it
                refused = True
                self.rejected_total += 1
                self._rejected[row.seq] = (row, time.monotonic() + self.rejected_retry_s)
                log.error("broker rejected event; will retry", event_id=row.event_id, kind=row.kind,
                          reason=str(rc), reason_code=f"0x{rc.value:02x}", retry_in_s=self.rejected_retry_s)
                continue
            # Success, including 0x10 "no matching subscribers": the broker has it.
            rtt = (acked_at - entry.sent_at) * 1000
            self.rtt_ms = rtt if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * rtt
            self.acks.add(row.seq, entry.sends, acked_at)
            self.delivered_total += 1
            if row.priority > 0:
                log.info("event forwarded", event_id=row.event_id, kind=row.kind)
            if row.priority >= URGENT_PRIORITY:
                urgent.append(row)
        if urgent and self._on_delivered is not None:
            try:
                self._on_delivered(urgent)
            except Exception:  # a listener must not leave the window half-handled
                log.exception("delivery listener failed")
        if outcomes:
            if window.sends or refused:
                for entry, rc, _ in outcomes:
                    if rc.is_failure:
                        window.sends[entry.row.seq] = entry.sends
                    else:
                        window.sends.pop(entry.row.seq, None)
            self.resent_total += window.resent
            window.resent = 0
            if len(self._sends) > 100_000:  # rows evicted while unacknowledged leave entries behind
                self._sends.clear()
            self.progress.set()

    def _requeue_rejected(self, window: _Window) -> None:
        """Rejected rows whose wait is over go to the front of the queue (later rows were not held back)."""
        if not self._rejected:
            return
        now = time.monotonic()
        due = sorted(seq for seq, (_, at) in self._rejected.items() if now >= at)
        if due:
            window.add((self._rejected.pop(seq)[0] for seq in due), front=True)

    def _forget_rows(self) -> None:
        """Drop every seq-based state of the loop (the outbox file was replaced)."""
        self._rejected.clear()
        self.acks.forget()
        self._cursor = 0
        self._stale = True

    def appended(self, rows: list[PendingEvent]) -> None:
        """New rows committed: when caught up, take them straight into the window (no re-read); else re-read.

        Rows committed while a fetch is under way may or may not be in its result: they wait beside it and
        those after what it returned are taken when it is done.
        """
        if self._fetching:
            self._arrived.extend(rows)
        else:
            self._take_appended(rows)
        self.progress.set()

    def _take_appended(self, rows: list[PendingEvent]) -> None:
        window = self._window
        if not rows:
            return
        if (window is not None and not self._stale and self._window_generation == self.outbox.generation
                and rows[0].seq == self._cursor + 1 and window.sizes()[0] < self.prefetch):
            window.add(rows)
            self._cursor = rows[-1].seq
        else:
            self._stale = True

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        timeout = 1.0  # heartbeat and ack-timeout checks
        window = self._window
        if window is not None and window.outcomes:
            timeout = ACK_DELAY_S
        due = self.acks.deadline(now)
        if due is not None:
            timeout = min(timeout, due - now)
        if self._rejected:
            timeout = min(timeout, min(at for _, at in self._rejected.values()) - now)
        return max(0.001, timeout)

    async def wait_progress(self, timeout: float) -> None:
        """Wait for a PUBACK, new rows, a disconnect or stop — or ``timeout`` (no task per wait)."""
        handle = asyncio.get_running_loop().call_later(timeout, self.progress.set)
        try:
            await self.progress.wait()
        finally:
            handle.cancel()

    async def _storage_trouble(self, exc: BaseException, generation: int) -> None:
        """A read or ack write failed: the outbox recovers (busy → wait, corrupt → a new file); pause, retry."""
        await self.acks.recover(exc, generation)
        await self.wait_progress(STORAGE_RETRY_S)
