"""Central inbox: every event of a community, exactly once, into PostgreSQL; alarms routed to the people to tell.

A reference for server developers, for the NATS JetStream cluster in ``fleet/``. NATS has no MQTT shared
subscriptions, but it keeps every QoS 1 message an MQTT client publishes in the ``$MQTT_msgs`` stream
(subject ``$MQTT.msgs.<topic with / as .>``), replicated across the cluster, before it sends the PUBACK. The
inbox reads that stream through one durable pull consumer that all its instances share: each fetch hands a
batch to one instance, and what an instance took and did not acknowledge (it was killed) is handed to another
after ``ack_wait``. An instance acknowledges a batch only after the transaction that stored it has committed;
the table is keyed by ``event_id`` (``INSERT … ON CONFLICT DO NOTHING``), so a batch delivered twice is stored
once, and so are the alarm routings written in the same transaction.

Alarms, supervisory signals and faults also come a faster way: nats-server hands an MQTT QoS 1 PUBLISH to core
NATS subscribers before it stores it in JetStream, so each instance subscribes to those subjects too and stores
(``ON CONFLICT DO NOTHING``) and routes what comes that way at once — from any node still up while a lost node's
streams elect new leaders. The durable consumer still stores everything and remains the record (``fast`` and
``durable_at`` say which path came first and when the record did).

A ``seq`` gap (an event acknowledged and then lost, or one published before the consumer existed; a session's
tail or a whole session, which only the gateways' ``birth`` and ``status`` show, recorded in ``session_ends``)
is healed as ``examples/consumer.py`` does it, with the ``events`` command to that gateway, page by page — but
tracked in the table, not in memory, since the instances each see only part of a gateway's events. One instance at a
time heals (a PostgreSQL advisory lock; another takes it when that instance's connection is gone). A missing
seq is asked for only once an event above it has been in the table for ``gap_grace_s``: events of one gateway
may be in flight on another instance meanwhile.

Who is told about an alarm, supervisory signal or fault follows the consumer-contacts mapping
(``examples/consumer-contacts.toml``; ``fleet/contacts.example.toml``): a household's relatives and its unit's
head, a unit's head for a unit without a household, the building head for a fault or anything without a unit.
Each routing is a row of ``notifications``; the gateways never hold people's names.

    python -m fleet.inbox --nats nats://127.0.0.1:4222,nats://127.0.0.1:4223 --user central \\
        --password-file central.pw --community sunshine-garden --dsn "host=/run/postgresql dbname=safety" \\
        --contacts contacts.toml --name inbox-1

It prints one JSON line per notable step (``consuming``, ``healer``, ``gap_requested``, ``recovered``,
``stored`` every few seconds) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psycopg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from fleet.contacts import Contacts, Person
from gateway.uplink.contract import command_message

__all__ = ["Inbox", "InboxSettings", "main"]

MQTT_STREAM = "$MQTT_msgs"
MQTT_SUBJECT_PREFIX = "$MQTT.msgs."
DURABLE = "fleet-inbox"
#: How long one fetch may wait. nats-py's fetch returns at once what is already waiting, but once it has to
#: wait it holds the messages that come until the batch is full or this expires: with 1 s, a community sending
#: 100 events/s to two instances waited the full second on almost every fetch (p50 0.52 s, benchmarks/fleet.py).
FETCH_WAIT_S = 0.1
#: Events asked for in one ``events`` command (the gateway's limit over MQTT).
RANGE_PAGE = 200
NOTIFY = {("alarm", "raised"), ("alarm", "escalated"), ("supervisory", "raised"), ("fault", "raised")}
#: Advisory lock key of the healer role (any constant the deployment does not use otherwise).
HEALER_LOCK = 0x5AFE_1D0B
#: How far above a session's highest stored ``seq`` an announced end may be (a higher one is ignored), and how
#: many seqs above its stored count one healing round looks at: a gateway announcing ``last_seq`` 2^31 − 1 (or
#: an event with that ``seq``) must not have the healer walk two billion seqs for the whole community.
END_AHEAD_MAX = 10_000
SCHEMA_LOCK = 0x5AFE_1D0A

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id     text PRIMARY KEY,
    gateway      text NOT NULL,
    install      text NOT NULL DEFAULT '',
    session      integer NOT NULL,
    seq          integer NOT NULL,
    community    text NOT NULL,
    building     text NOT NULL,
    kind         text NOT NULL,
    action       text,
    unit         text,
    household    text,
    device       text,
    detected_at  timestamptz,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    inbox        text NOT NULL,
    recovered    boolean NOT NULL DEFAULT false,
    body         jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (gateway, install, session, seq);
CREATE TABLE IF NOT EXISTS notifications (
    event_id  text NOT NULL REFERENCES events (event_id),
    role      text NOT NULL,
    name      text NOT NULL,
    phone     text NOT NULL,
    noted_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (event_id, role, name)
);
"""

#: Which path stored a row first (``fast``: core NATS, before JetStream had it) and when the durable record
#: (the JetStream stream, or the gateway's own history) was there; where each gateway session ended, as its
#: ``birth`` and ``status`` said (docs/mqtt.md, "Filling a gap").
SCHEMA_PATHS_AND_ENDS = """
ALTER TABLE events ADD COLUMN IF NOT EXISTS fast boolean NOT NULL DEFAULT false;
ALTER TABLE events ADD COLUMN IF NOT EXISTS durable_at timestamptz DEFAULT clock_timestamp();
CREATE TABLE IF NOT EXISTS session_ends (
    gateway      text NOT NULL,
    install      text NOT NULL,
    session      integer NOT NULL,
    community    text NOT NULL,
    building     text NOT NULL,
    last_seq     integer NOT NULL,
    announced_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (gateway, install, session)
);
"""

INSERT_EVENTS = """
INSERT INTO events (event_id, gateway, install, session, seq, community, building, kind, action, unit, household,
                    device, detected_at, inbox, recovered, body)
SELECT e, g, i, s, q, c, b, k, a, u, h, d, t, n, r, j::jsonb
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::int[], %s::text[], %s::text[], %s::text[],
              %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::bool[], %s::text[])
       AS x(e, g, i, s, q, c, b, k, a, u, h, d, t, n, r, j)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

INSERT_NOTIFICATIONS = """
INSERT INTO notifications (event_id, role, name, phone)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
ON CONFLICT DO NOTHING
"""

#: Missing seqs of every session: below its highest stored event, once that has been stored for the grace
#: period (%s seconds), and up to its announced end (``session_ends``), once announced that long ago — which
#: also covers a session none of whose events arrived.
FIND_GAPS = """
WITH stored AS (
    SELECT gateway, install, session, min(community) AS community, min(building) AS building,
           max(seq) FILTER (WHERE committed_at < clock_timestamp() - make_interval(secs => %(grace)s)) AS top,
           count(*) AS n
      FROM events
     GROUP BY gateway, install, session),
announced AS (
    SELECT gateway, install, session, community, building, last_seq AS top
      FROM session_ends
     WHERE announced_at < clock_timestamp() - make_interval(secs => %(grace)s)),
tops AS (
    SELECT gateway, install, session, min(community) AS community, min(building) AS building,
           coalesce(max(top), 0) AS top
      FROM (SELECT gateway, install, session, community, building, top FROM stored
            UNION ALL SELECT gateway, install, session, community, building, top FROM announced) x
     GROUP BY gateway, install, session)
SELECT t.gateway, t.install, t.session, t.community, t.building, g.s
  FROM tops t
  LEFT JOIN stored c USING (gateway, install, session)
 CROSS JOIN LATERAL generate_series(1, least(t.top, coalesce(c.n, 0) + %(ahead)s)) AS g(s)
 WHERE t.top > coalesce(c.n, 0)
   AND NOT EXISTS (SELECT 1 FROM events e
                    WHERE e.gateway = t.gateway AND e.install = t.install AND e.session = t.session AND e.seq = g.s)
 ORDER BY 1, 2, 3, 6
 LIMIT 20000
"""

#: Where sessions ended, from a birth or status: the message's own session always; the earlier sessions a
#: birth lists only from the first session the inbox knows of that gateway installation on (or all of them
#: with ``backfill``) — older ones are the past before this inbox started.
UPSERT_SESSION_ENDS = """
INSERT INTO session_ends AS se (gateway, install, session, community, building, last_seq)
SELECT x.g, x.i, x.s, x.c, x.b, x.l
  FROM unnest(%(g)s::text[], %(i)s::text[], %(s)s::int[], %(c)s::text[], %(b)s::text[], %(l)s::int[],
              %(own)s::bool[]) AS x(g, i, s, c, b, l, own)
 WHERE (x.own OR %(backfill)s OR x.s >= (
        SELECT min(m) FROM (SELECT min(session) AS m FROM events WHERE gateway = x.g AND install = x.i
                            UNION ALL
                            SELECT min(session) FROM session_ends WHERE gateway = x.g AND install = x.i) k))
   AND x.l <= %(ahead)s + coalesce((SELECT max(seq) FROM events
                                     WHERE gateway = x.g AND install = x.i AND session = x.s), 0)
   AND NOT EXISTS (SELECT 1 FROM session_ends o
                    WHERE o.gateway = x.g AND o.install = x.i AND (o.community, o.building) <> (x.c, x.b))
ON CONFLICT (gateway, install, session) DO UPDATE
   SET last_seq = EXCLUDED.last_seq, announced_at = clock_timestamp()
 WHERE se.last_seq < EXCLUDED.last_seq AND (se.community, se.building) = (EXCLUDED.community, EXCLUDED.building)
"""

#: Kinds of event the fast path (core NATS) takes: those that tell people.
FAST_KINDS = ("alarm", "supervisory", "fault")


# ------------------------------------------------------------------------------------------- inbox


@dataclass(frozen=True, slots=True)
class InboxSettings:
    """One instance's settings (see ``python -m fleet.inbox --help``)."""

    nats_servers: tuple[str, ...]
    dsn: str
    community: str
    name: str
    prefix: str = "safety"
    user: str | None = None
    password: str | None = None
    contacts: Contacts = field(default_factory=Contacts)
    batch: int = 256
    ack_wait_s: float = 5.0
    gap_grace_s: float = 3.0
    heal_every_s: float = 1.0
    ask_again_s: float = 10.0
    backfill: bool = False
    """Also ask for the sessions a gateway held before the first one this inbox knows of."""


def _iso(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text)
    return None


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"event": kind, "time": time.time(), **fields}), flush=True)


INT4_MAX = 2**31 - 1


def _int4(value: Any, name: str) -> int:
    """``value`` as a column ``integer`` holds; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT4_MAX:
        raise ValueError(f"{name} is not an integer from 0 to {INT4_MAX}: {value!r:.40}")
    return value


def _event_values(e: Mapping[str, Any], inbox: str, recovered: bool) -> tuple[Any, ...]:
    """One event's column values for :data:`INSERT_EVENTS`; ValueError (or TypeError) for a malformed event."""
    return (e["event_id"], str(e.get("gateway", "")), str(e.get("install") or ""),
            _int4(e.get("session", 0), "session"), _int4(e.get("seq", 0), "seq"), str(e.get("community", "")),
            str(e.get("building", "")), str(e.get("kind", "")), e.get("action"), e.get("unit"), e.get("household"),
            e.get("device"), _iso(e.get("time")), inbox, recovered,
            json.dumps({k: v for k, v in e.items() if k not in ("stored_seq", "delivered", "delivered_at")}))


def _session_ends(m: Mapping[str, Any]) -> list[tuple[int, int, bool]]:
    """(session, last_seq, own) of a birth or status: its own session's end and a birth's ``sessions`` entries.
    ValueError for a malformed message; nothing for one from a gateway before session ends were announced."""
    if "last_seq" not in m:
        return []
    ends = [(_int4(m.get("session"), "session"), _int4(m["last_seq"], "last_seq"), True)]
    earlier = m.get("sessions") or []
    if not isinstance(earlier, list):
        raise ValueError(f"sessions is not a list: {earlier!r:.40}")
    for e in earlier:
        if not isinstance(e, dict):
            raise ValueError(f"a sessions entry is not an object: {e!r:.40}")
        ends.append((_int4(e.get("session"), "session"), _int4(e.get("last_seq"), "last_seq"), False))
    return [end for end in ends if end[1] >= 1]


class Inbox:
    """One inbox instance: the shared durable consumer → PostgreSQL; the healer role when it holds the lock."""

    def __init__(self, settings: InboxSettings) -> None:
        self.s = settings
        self.stored = 0
        self.duplicates = 0
        self.recovered = 0
        self.first_notices = 0
        self.rejected = 0
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._db_lock = asyncio.Lock()
        self._fast_db: psycopg.AsyncConnection[Any] | None = None  # the fast path's own: it never waits for a batch
        self._fast_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._asked: dict[str, tuple[str, int, int, int]] = {}  # command id → (gateway, session, first, last)
        self._asked_at: dict[tuple[str, str, int, int], float] = {}  # (gateway, install, session, first) → when
        self._stop = asyncio.Event()
        self.nc: Any = None

    @property
    def subject_filter(self) -> str:
        return f"{MQTT_SUBJECT_PREFIX}{self.s.prefix}.{self.s.community}.*.event.>"

    @property
    def subject_filters(self) -> list[str]:
        """What the durable consumer takes: every event, and the births and statuses that say where sessions
        ended."""
        base = f"{MQTT_SUBJECT_PREFIX}{self.s.prefix}.{self.s.community}.*"
        return [f"{base}.event.>", f"{base}.birth", f"{base}.status"]

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Consume, store and heal until :meth:`stop`."""
        self._db = await psycopg.AsyncConnection.connect(self.s.dsn, autocommit=False)
        await self._schema()
        # The servers in the order given (each instance is given its own first node), reconnecting at once.
        self.nc = await nats.connect(servers=list(self.s.nats_servers), user=self.s.user, password=self.s.password,
                                     name=self.s.name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                     allow_reconnect=True, dont_randomize=True, connect_timeout=2)
        await self.nc.subscribe(f"{self.s.prefix}.{self.s.community}.*.reply", cb=self._reply)
        await self._listen_fast()
        self._fast_db = await psycopg.AsyncConnection.connect(self.s.dsn, autocommit=False)
        tasks = [asyncio.create_task(self._consume(), name="consume"),
                 asyncio.create_task(self._store_first_notices(), name="first-notice"),
                 asyncio.create_task(self._heal(), name="heal"),
                 asyncio.create_task(self._report(), name="report")]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.nc.close()
        await self._db.close()
        await self._fast_db.close()

    async def _schema(self) -> None:
        assert self._db is not None
        async with self._db.transaction():
            await self._db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            await self._db.execute(SCHEMA)
            await self._db.execute(SCHEMA_PATHS_AND_ENDS)

    # ------------------------------------------------------------------------------ consuming

    async def _subscribe(self) -> Any:
        js = self.nc.jetstream()
        config = ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                ack_wait=self.s.ack_wait_s, max_ack_pending=20_000, max_deliver=-1,
                                filter_subjects=self.subject_filters)
        while not self._stop.is_set():
            try:
                return await js.pull_subscribe(self.subject_filter, durable=DURABLE, stream=MQTT_STREAM, config=config)
            except Exception as exc:  # the stream appears with the first MQTT client; a node may be away
                _emit("waiting_for_stream", error=repr(exc))
                await asyncio.sleep(1.0)
        return None

    async def _consume(self) -> None:
        sub = await self._subscribe()
        if sub is None:
            return
        _emit("consuming", name=self.s.name, filter=self.subject_filter)
        while not self._stop.is_set():
            try:
                msgs = await sub.fetch(self.s.batch, timeout=FETCH_WAIT_S)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # a node went away under the fetch: the client reconnects elsewhere
                _emit("fetch_failed", error=repr(exc))
                await asyncio.sleep(0.2)
                continue
            events, ends = [], []
            for m in msgs:
                body = self._accepted(m.data, m.subject)
                if body is not None and isinstance(body.get("event_id"), str):
                    events.append(body)
                elif body is not None and body.get("type") in ("birth", "status"):
                    ends.append(body)
            try:
                await self.store(events, recovered=False)
                await self.note_session_ends(ends)
            except psycopg.Error as exc:  # not acknowledged: delivered again after ack_wait
                _emit("store_failed", error=repr(exc))
                if isinstance(exc, psycopg.OperationalError):  # PostgreSQL restarted: a new connection
                    async with self._db_lock:
                        self._db = await self._reopen(self._db)
                await asyncio.sleep(0.5)
                continue
            except (ValueError, TypeError) as exc:  # a shape the checks missed: acknowledged, never the task
                self._reject("batch", exc)
            for m in msgs:
                with contextlib.suppress(Exception):  # an ack lost is a redelivery, stored once all the same
                    await m.ack()

    def _accepted(self, data: bytes, subject: str) -> dict[str, Any] | None:
        """A message's body when it is a well-formed event, birth or status (anything else: None); a malformed
        one is counted in ``rejected`` and named in one line, and the inbox goes on."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            self._check_sender(body, subject)
            if isinstance(body.get("event_id"), str):
                _event_values(body, self.s.name, False)
            elif body.get("type") in ("birth", "status"):
                _session_ends(body)
            return body
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            self._reject(subject, exc)
            return None

    def _check_sender(self, body: dict[str, Any], subject: str) -> None:
        """The community and building are the subject's (the cluster lets a gateway publish under its own
        building only): a body naming others is refused, a body naming none gets the subject's."""
        parts = subject.removeprefix(MQTT_SUBJECT_PREFIX).removeprefix(f"{self.s.prefix}.").split(".")
        if len(parts) < 3 or parts[0] != self.s.community:
            raise ValueError(f"not a subject of community {self.s.community}: {subject[:120]}")
        for key, value in (("community", parts[0]), ("building", parts[1])):
            if body.setdefault(key, value) != value:
                raise ValueError(f"{key} {str(body[key])[:40]!r} is not the subject's {value!r}")

    def _reject(self, what: str, exc: Exception) -> None:
        self.rejected += 1
        _emit("rejected", what=what, reason=str(exc)[:200], rejected=self.rejected)

    async def store(self, events: Sequence[Mapping[str, Any]], *, recovered: bool, fast: bool = False) -> int:
        """Store events (once each) and their alarm routings in one transaction; returns how many were new."""
        unique = {e["event_id"]: e for e in events if isinstance(e.get("event_id"), str)}
        if not unique:
            return 0
        columns: list[list[Any]] = [[] for _ in range(16)]
        rows = []
        for key in sorted(unique):  # one lock order for every path: no deadlock between them
            try:
                values = _event_values(unique[key], self.s.name, recovered)
            except (ValueError, TypeError) as exc:
                self._reject(f"event {key[:80]}", exc)
                continue
            rows.append(unique[key])
            for col, value in zip(columns, values, strict=True):
                col.append(value)
        if not rows:
            return 0
        assert self._db is not None
        db, lock = (self._fast_db, asyncio.Lock()) if fast and self._fast_db is not None else (self._db, self._db_lock)
        async with lock, db.transaction():
            cur = await db.execute(INSERT_EVENTS, columns)
            new = {r[0] for r in await cur.fetchall()}
            notes: list[list[str]] = [[], [], [], []]
            for e in rows:
                if e["event_id"] in new and (e.get("kind"), e.get("action")) in NOTIFY:
                    people = self.s.contacts.whom(e) or [Person("nobody on file: check the mapping", "", "unrouted")]
                    for p in people:
                        for col, value in zip(notes, (e["event_id"], p.role, p.name, p.phone), strict=True):
                            col.append(value)
            if notes[0]:
                await db.execute(INSERT_NOTIFICATIONS, notes)
            await self._mark_path(db, fast, new, set(unique) - new)
        self.stored += len(new)
        self.duplicates += len(rows) - len(new)
        if recovered:
            self.recovered += len(new)
        return len(new)

    async def _mark_path(self, db: psycopg.AsyncConnection[Any], fast: bool, new: set[str], known: set[str]) -> None:
        """In the storing transaction: rows the fast path stored first wait for their durable record; rows it
        stored earlier get theirs now."""
        if fast and new:
            await db.execute("UPDATE events SET fast = true, durable_at = NULL WHERE event_id = ANY(%s)",
                                   (list(new),))
        elif not fast and known:
            await db.execute("UPDATE events SET durable_at = clock_timestamp()"
                                   " WHERE event_id = ANY(%s) AND durable_at IS NULL", (list(known),))

    # ------------------------------------------------------------------------------ first notice (core NATS)

    async def _listen_fast(self) -> None:
        """Alarms, supervisory signals and faults as nats-server hands an MQTT PUBLISH to core subscribers —
        before JetStream stores it, so from any node still up while a lost node's streams elect new leaders."""
        for kind in FAST_KINDS:
            await self.nc.subscribe(f"{self.s.prefix}.{self.s.community}.*.event.{kind}", cb=self._first_notice)

    async def _first_notice(self, msg: Any) -> None:
        """Queue one such event for :meth:`_store_first_notices` (the callback must not wait for the table)."""
        body = self._accepted(msg.data, msg.subject)
        if body is not None and isinstance(body.get("event_id"), str):
            self._fast_queue.put_nowait(body)

    async def _store_first_notices(self) -> None:
        """Store (once) and route what the fast path heard, everything waiting in one transaction, on a
        connection of its own; the durable consumer still brings the record."""
        while True:
            batch = [await self._fast_queue.get()]
            while not self._fast_queue.empty() and len(batch) < self.s.batch:
                batch.append(self._fast_queue.get_nowait())
            try:
                try:
                    self.first_notices += await self.store(batch, recovered=False, fast=True)
                except psycopg.OperationalError as exc:  # PostgreSQL restarted: a new connection, the batch again
                    _emit("store_failed", error=repr(exc), path="fast")
                    self._fast_db = await self._reopen(self._fast_db)
                    self.first_notices += await self.store(batch, recovered=False, fast=True)
            except psycopg.Error as exc:  # the durable consumer stores them all the same
                _emit("store_failed", error=repr(exc), path="fast")
            except (ValueError, TypeError) as exc:  # a shape the checks missed: this batch only, never the task
                self._reject("fast batch", exc)

    async def _reopen(self, old: psycopg.AsyncConnection[Any] | None, *,
                      autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
        """A new connection in place of one PostgreSQL closed (a restart), tried every second until it comes."""
        if old is not None:
            with contextlib.suppress(psycopg.Error):
                await old.close()
        while True:
            try:
                return await psycopg.AsyncConnection.connect(self.s.dsn, autocommit=autocommit)
            except psycopg.OperationalError as exc:
                _emit("db_reconnecting", error=repr(exc))
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------------------ session ends

    async def note_session_ends(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Where sessions ended, from births and statuses (docs/mqtt.md, "Filling a gap")."""
        highest: dict[tuple[str, str, int], tuple[str, str, int, bool]] = {}  # one row per key and statement
        for m in messages:
            try:
                ends = _session_ends(m)
            except (ValueError, TypeError) as exc:
                self._reject(f"{m.get('type')} of {str(m.get('gateway', ''))[:80]}", exc)
                continue
            for session, last, own in ends:
                key = (str(m.get("gateway", "")), str(m.get("install") or ""), session)
                before = highest.get(key)
                if before is None or (before[2], before[3]) < (last, own):
                    highest[key] = (str(m.get("community", "")), str(m.get("building", "")), last, own)
        if not highest:
            return
        rows: dict[str, list[Any]] = {k: [] for k in ("g", "i", "s", "c", "b", "l", "own")}
        for key, end in highest.items():
            for column, value in zip(("g", "i", "s", "c", "b", "l", "own"), (*key, *end), strict=True):
                rows[column].append(value)
        assert self._db is not None
        async with self._db_lock, self._db.transaction():
            await self._db.execute(UPSERT_SESSION_ENDS, {**rows, "backfill": self.s.backfill, "ahead": END_AHEAD_MAX})

    # ------------------------------------------------------------------------------ healing

    async def _heal(self) -> None:
        """Hold the healer lock when free; while held, ask gateways for the seqs the table misses."""
        conn = await psycopg.AsyncConnection.connect(self.s.dsn, autocommit=True)
        leader = False
        try:
            while not self._stop.is_set():
                try:
                    if not leader:
                        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (HEALER_LOCK,))
                        row = await cur.fetchone()
                        leader = bool(row and row[0])
                        if leader:
                            _emit("healer", name=self.s.name)
                    if leader:
                        await self._ask_for_gaps(conn)
                except psycopg.Error as exc:
                    _emit("heal_failed", error=repr(exc))
                    if isinstance(exc, psycopg.OperationalError):  # the lock went with the old connection
                        conn, leader = await self._reopen(conn, autocommit=True), False
                await asyncio.sleep(self.s.heal_every_s)
        finally:
            await conn.close()

    async def _ask_for_gaps(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(FIND_GAPS, {"grace": self.s.gap_grace_s, "ahead": END_AHEAD_MAX})
        missing = await cur.fetchall()
        now = time.monotonic()
        for (gateway, install, session, community, building), first, last in _ranges(missing):
            key = (gateway, install, session, first)
            if now - self._asked_at.get(key, -1e9) < self.s.ask_again_s:
                continue
            self._asked_at[key] = now
            args: dict[str, Any] = {"session": session, "from_seq": first, "to_seq": last, "limit": RANGE_PAGE}
            if install:
                args["install"] = install
            body = command_message("events", community=community, building=building, args=args)
            self._asked[body["id"]] = (gateway, session, first, last)
            await self.nc.publish(f"{self.s.prefix}.{community}.{building}.command.events", json.dumps(body).encode())
            _emit("gap_requested", gateway=gateway, session=session, range=[first, last], id=body["id"])

    async def _reply(self, msg: Any) -> None:
        """A command result: the events a range request brought back are stored (and routed) like live ones."""
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            body = json.loads(msg.data)
            if not isinstance(body, dict) or body.get("command") != "events":
                return
            asked = self._asked.pop(str(body.get("id")), None)
            if asked is None:
                return
            rows = [r for r in (body.get("data") or {}).get("events", []) if isinstance(r, dict)]
            try:
                new = await self.store(rows, recovered=True)
            except psycopg.Error as exc:
                _emit("store_failed", error=repr(exc))
                return
            _emit("recovered", gateway=asked[0], session=asked[1], range=[asked[2], asked[3]], rows=len(rows),
                  new=new, status=body.get("status"), reason=body.get("reason"))

    async def _report(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(5.0)
            _emit("stored", name=self.s.name, stored=self.stored, duplicates=self.duplicates,
                  recovered=self.recovered, first_notices=self.first_notices, rejected=self.rejected)


def _ranges(missing: Iterable[Sequence[Any]]) -> list[tuple[tuple[str, str, int, str, str], int, int]]:
    """Consecutive missing seqs of one session as (key, first, last), at most :data:`RANGE_PAGE` long."""
    out: list[tuple[tuple[str, str, int, str, str], int, int]] = []
    for gateway, install, session, community, building, seq in missing:
        key = (gateway, install, int(session), community, building)
        if out and out[-1][0] == key and out[-1][2] == seq - 1 and seq - out[-1][1] < RANGE_PAGE:
            out[-1] = (key, out[-1][1], seq)
        else:
            out.append((key, seq, seq))
    return out


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fleet.inbox", description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", required=True, help="NATS URLs of the cluster's nodes, comma-separated")
    p.add_argument("--user")
    p.add_argument("--password-file", help="a file holding the password (first line)")
    p.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    p.add_argument("--community", required=True)
    p.add_argument("--prefix", default="safety")
    p.add_argument("--contacts", help="who to tell (format of examples/consumer-contacts.toml)")
    p.add_argument("--name", default="inbox", help="this instance's name (kept with each row it stores)")
    p.add_argument("--ack-wait", type=float, default=5.0, help="seconds before another instance gets a batch")
    p.add_argument("--gap-grace", type=float, default=3.0)
    p.add_argument("--backfill", action="store_true",
                   help="also ask for the sessions a gateway held before the first one this inbox knows of")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").splitlines()[0]
    settings = InboxSettings(
        nats_servers=tuple(s.strip() for s in args.nats.split(",") if s.strip()), dsn=args.dsn,
        community=args.community, name=args.name, prefix=args.prefix, user=args.user, password=password,
        contacts=Contacts.load(args.contacts) if args.contacts else Contacts(), ack_wait_s=args.ack_wait,
        gap_grace_s=args.gap_grace, backfill=args.backfill)
    inbox = Inbox(settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, inbox.stop)
        await inbox.run()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
