"""The notifier: from a ``notifications`` row to a person told, acknowledged, escalated and given the all-clear.

Any number of instances share one PostgreSQL. The inbox (fleet/inbox.py) writes a ``notifications`` row for
each person its routing names; an instance opens an *episode* for that event (one ``INSERT … ON CONFLICT DO
NOTHING`` decides which), with a ``deliveries`` row for each person of step 1. Every instance then loops:

* **deliver** — ``in_flight`` sending lanes (threads, each with two connections; 4 by default). A lane claims a
  batch of due ``pending`` deliveries with ``FOR NO KEY UPDATE SKIP LOCKED`` (a later step, an acknowledgement
  notice and an all-clear first: :data:`HEAD_START_S`) and sends them through Apprise one by one while holding
  them; each attempt's outcome (an ``attempts`` row) is committed on its second connection before the next
  message leaves, and the deliveries' statuses in one statement once the batch is out (:data:`CLAIM_BATCH`,
  :data:`BATCH_S`). An instance killed mid-batch loses nothing: its batches roll back, the rows are free again,
  and another instance takes the outcomes logged and sends the rest. The messages in flight may have left
  before the kill: **at most ``in_flight`` duplicates per instance killed, each of a different message**: each
  lane is a worker, and a person gets at most one duplicate of a message. A failed attempt is tried again after
  a backoff (fleet/ladder.py). Each Apprise URL is parsed once per instance, and each lane keeps its HTTP
  connections (:func:`keep_connections`).
* **escalate** — on a loop and a connection of its own, every ``poll_s``: takes the episodes whose next step is
  due (``FOR UPDATE SKIP LOCKED``) and creates that step's deliveries in the same transaction as the step count,
  so a step is never skipped nor created twice, nor held back by a burst being opened or cleared.
* **clear** — an alarm cleared (or reset at the panel), a supervisory signal or a fault cleared closes the
  gateway's open episode of that device (or code): pending alarm messages are cancelled, everyone told gets the
  all-clear.

An acknowledgement (:func:`acknowledge_link` from the link in each alarm message, :func:`acknowledge_episode`
from the duty desk) stops the ladder and tells everyone told who acknowledged. Delivery and acknowledgement
meet on the episode's row lock, so a message sent while the acknowledgement commits is followed by its own
notice. Who and when is decided by fleet/ladder.py; this module does the I/O.

    python -m fleet.notifier --dsn "host=/run/postgresql dbname=safety" --config notifier.toml \\
        --contacts contacts.toml --name notifier-1

One JSON line per notable step on stdout (``notifier``, ``opened``, ``escalated``, ``acknowledged``,
``cleared``, ``delivered`` counts every 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import re
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import apprise
import psycopg
import requests
from apprise.plugins import url_to_dict
from psycopg.rows import dict_row

from fleet.contacts import Contacts, Person
from fleet.ladder import Ladder, LadderError, RetryPolicy, gateway_sms_roles

__all__ = ["AckResult", "Notifier", "NotifierSettings", "acknowledge_episode", "acknowledge_link", "ensure_schema",
           "load_settings", "main", "make_token"]

#: Advisory lock key under which the first instance creates the tables.
SCHEMA_LOCK = 0x5AFE_1D0C
#: How far back an instance looks for routed events without an episode and for clears not handled: a day, far
#: longer than any outage of every instance at once should last.
LOOKBACK_S = 24 * 3600.0
#: Between two sweeps of the whole LOOKBACK_S, an instance looks only at the rows noted (and the clears
#: committed) in the last RECENT_S: a look then costs what that window holds, not what the day holds (with 5000
#: alarms and their clears in the day, a look over the day took 17 ms for the routed events and 45 ms for the
#: clears, ten times a second per instance). A row whose transaction took longer than RECENT_S to commit is found
#: by the next sweep, at most SWEEP_S later.
RECENT_S = 5.0
SWEEP_S = 10.0
#: A sending lane claims up to CLAIM_BATCH deliveries at once and sends them for BATCH_S at most before it records
#: their statuses and claims again (a step or a notice that comes due waits that long at most for a lane).
CLAIM_BATCH = 16
BATCH_S = 0.25
LOG_LOCK_TIMEOUT_S = 10
#: A lane's HTTP connections are reused while it sends; after this long idle they are closed, not reused.
KEEP_ALIVE_S = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    event_id     text PRIMARY KEY REFERENCES events (event_id),
    community    text NOT NULL,
    gateway      text NOT NULL,
    building     text NOT NULL,
    unit         text,
    household    text,
    kind         text NOT NULL,
    subject      text NOT NULL,
    what         text NOT NULL,
    alone        boolean NOT NULL DEFAULT false,
    detected_at  timestamptz,
    opened_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    step         integer NOT NULL DEFAULT 1,
    next_step_at timestamptz,
    acked_at     timestamptz,
    acked_by     text,
    cleared_at   timestamptz,
    cleared_by   text
);
CREATE INDEX IF NOT EXISTS episodes_due ON episodes (next_step_at) WHERE next_step_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS episodes_open ON episodes (gateway, kind, subject) WHERE cleared_at IS NULL;
CREATE INDEX IF NOT EXISTS episodes_by_place ON episodes (community, building, household, opened_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id               bigserial PRIMARY KEY,
    event_id         text NOT NULL REFERENCES episodes (event_id),
    community        text NOT NULL,
    purpose          text NOT NULL,
    step             integer NOT NULL,
    role             text NOT NULL,
    name             text NOT NULL,
    phone            text NOT NULL DEFAULT '',
    urls             text[] NOT NULL DEFAULT '{}',
    status           text NOT NULL DEFAULT 'pending',
    due_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts         integer NOT NULL DEFAULT 0,
    token_expires_at timestamptz,
    sent_at          timestamptz,
    detail           text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    claim_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (event_id, purpose, role, name)
);
DO $$ BEGIN  -- tables of an older version; checked first: ALTER TABLE locks the table even when it does nothing
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'deliveries'::regclass AND attname = 'claim_at') THEN
        ALTER TABLE deliveries ADD COLUMN claim_at timestamptz NOT NULL DEFAULT clock_timestamp();
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS deliveries_claim ON deliveries (community, claim_at, next_attempt_at)
 WHERE status = 'pending';
DROP INDEX IF EXISTS deliveries_pending;
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id bigint NOT NULL REFERENCES deliveries (id),
    attempt     integer NOT NULL,
    worker      text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text NOT NULL,
    detail      text,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE TABLE IF NOT EXISTS clears (
    event_id   text PRIMARY KEY REFERENCES events (event_id),
    closed     integer NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS events_ending ON events (committed_at) WHERE action = 'cleared' OR kind = 'reset';
CREATE INDEX IF NOT EXISTS notifications_noted ON notifications (noted_at);
"""

#: Routed events without an episode, among the rows noted in the last ``%s`` s (the scan stays small however long
#: the table grows; a row the healer brings back is noted when it is stored, so it is recent).
UNOPENED = """
SELECT DISTINCT n.event_id FROM notifications n JOIN events e USING (event_id)
 WHERE n.noted_at > statement_timestamp() - make_interval(secs => %s) AND e.community = %s
   AND NOT EXISTS (SELECT 1 FROM episodes p WHERE p.event_id = n.event_id)
 LIMIT 500
"""

OPEN_EPISODES = """
INSERT INTO episodes (event_id, community, gateway, building, unit, household, kind, subject, what, alone,
                      detected_at)
SELECT x.e, x.c, x.g, x.b, x.u, x.h, x.k, x.s, x.w, x.a, x.t
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
              %s::text[], %s::bool[], %s::timestamptz[]) AS x(e, c, g, b, u, h, k, s, w, a, t)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, extract(epoch FROM opened_at)
"""

#: For each episode being opened, a clear (or reset) already handled that ends it (the healer brought the alarm
#: back late): the same gateway and subject, not before it (as :meth:`Notifier.close_episodes` matches them). One
#: statement for a whole batch of episodes (one each was a round trip per alarm: 8 % of an instance's CPU).
HANDLED_END = """
SELECT x.e AS event_id, h.end_id
  FROM unnest(%(events)s::text[], %(gateways)s::text[], %(kinds)s::text[], %(subjects)s::text[],
              %(detected)s::timestamptz[]) AS x(e, g, k, s, t)
       CROSS JOIN LATERAL (
           SELECT c.event_id AS end_id FROM clears h JOIN events c ON c.event_id = h.event_id
            WHERE c.gateway = x.g AND c.community = %(community)s
              AND h.handled_at > statement_timestamp() - make_interval(secs => %(lookback)s)
              AND ((c.action = 'cleared' AND c.kind = x.k
                    AND coalesce(nullif(c.device, ''), nullif(c.body->>'code', ''), '') = x.s)
                   OR (c.kind = 'reset' AND x.k = 'alarm' AND (nullif(c.device, '') IS NULL OR c.device = x.s)))
              AND (c.detected_at IS NULL OR x.t IS NULL OR x.t <= c.detected_at)
            ORDER BY c.committed_at
            LIMIT 1) h
"""

#: The order deliveries are claimed in (``claim_at``, earliest first) is when they are due, but HEAD_START_S
#: earlier for a later step of the ladder, an acknowledgement notice and an all-clear: they go before a backlog of
#: first-step messages that became due less than HEAD_START_S before them, and after the older ones, so a first
#: step waits behind them for HEAD_START_S at most. The ladder's steps are due on their time (a step is overdue at
#: once: the people before did not answer), the notices are few (one a person told), and a burst of alarms can
#: queue thousands of first-step messages: without the head start a step waited for the whole backlog.
HEAD_START_S = 60.0
#: The head start of a row (SQL), ``{purpose}`` and ``{step}`` its columns.
HEAD_START = f"CASE WHEN {{purpose}} = 'alarm' AND {{step}} = 1 THEN 0 ELSE {HEAD_START_S} END"

INSERT_DELIVERIES = """
INSERT INTO deliveries (event_id, community, purpose, step, role, name, phone, urls, status, due_at, next_attempt_at,
                        claim_at, token_expires_at, detail, sent_at)
SELECT x.e, (SELECT community FROM episodes WHERE event_id = x.e), x.p, x.s, x.r, x.n, x.ph,
       string_to_array(x.u, E'\\n'), x.st, to_timestamp(x.d), to_timestamp(x.d),
       to_timestamp(x.d) - make_interval(secs => """ + HEAD_START.format(purpose="x.p", step="x.s") + """),
       to_timestamp(x.d) + make_interval(secs => %(ttl)s), x.dt,
       CASE WHEN x.st = 'skipped' THEN clock_timestamp() END
  FROM unnest(%(e)s::text[], %(p)s::text[], %(s)s::int[], %(r)s::text[], %(n)s::text[], %(ph)s::text[],
              %(u)s::text[], %(st)s::text[], %(d)s::float8[], %(dt)s::text[]) AS x(e, p, s, r, n, ph, u, st, d, dt)
ON CONFLICT (event_id, purpose, role, name) DO NOTHING
"""
DELIVERY_COLUMNS = ("e", "p", "s", "r", "n", "ph", "u", "st", "d", "dt")

#: Everyone told of an episode (delivered, or reached by the gateway's own SMS) who has no ``purpose`` message yet.
FOLLOW_UP = f"""
INSERT INTO deliveries (event_id, community, purpose, step, role, name, phone, urls, claim_at)
SELECT d.event_id, d.community, %(purpose)s, d.step, d.role, d.name, d.phone, d.urls,
       clock_timestamp() - make_interval(secs => {HEAD_START_S})
  FROM deliveries d
 WHERE d.event_id = %(event)s AND d.purpose = 'alarm' AND d.status IN ('sent', 'skipped')
ON CONFLICT (event_id, purpose, role, name) DO NOTHING
"""

#: The delivered alarm messages of episodes acknowledged or cleared meanwhile: their own notices (the
#: acknowledgement or the all-clear), queued under the episodes' row locks (``FOR SHARE``, in key order) that the
#: acknowledgement and the clear take ``FOR UPDATE``. Run after the messages' ``sent`` status, in the same
#: transaction.
FOLLOW_UP_IF_OVER = f"""
WITH p AS (SELECT event_id, acked_at IS NOT NULL AS acked, cleared_at IS NOT NULL AS cleared
             FROM episodes WHERE event_id = ANY(%(events)s) ORDER BY event_id FOR SHARE)
INSERT INTO deliveries (event_id, community, purpose, step, role, name, phone, urls, claim_at)
SELECT d.event_id, d.community, x.purpose, d.step, d.role, d.name, d.phone, d.urls,
       clock_timestamp() - make_interval(secs => {HEAD_START_S})
  FROM p JOIN deliveries d ON d.event_id = p.event_id
       JOIN (VALUES ('ack'), ('clear')) AS x(purpose) ON (x.purpose = 'ack' AND p.acked) OR (x.purpose = 'clear'
                                                          AND p.cleared)
 WHERE d.purpose = 'alarm' AND d.status IN ('sent', 'skipped')
ON CONFLICT (event_id, purpose, role, name) DO NOTHING
"""

#: One attempt's outcome, committed at once on the lane's second connection before its next message leaves (the
#: delivery's row stays locked by the claim meanwhile: the claim's ``FOR NO KEY UPDATE`` lets this row's foreign
#: key check through). ``%s`` after ``worker``: the seconds the attempt took, so it started that long ago.
LOG_ATTEMPT = """
INSERT INTO attempts (delivery_id, attempt, worker, started_at, outcome, detail)
VALUES (%s, %s, %s, clock_timestamp() - make_interval(secs => %s), %s, %s)
"""

#: The outcomes of a claimed batch, one statement: each delivery's status (``sent``; ``pending`` again after
#: ``delay`` s from its attempt's end; ``failed`` when the retries are spent) from its logged attempt.
RECORD = """
UPDATE deliveries d
   SET status = x.status, attempts = x.attempt, detail = x.detail,
       sent_at = CASE WHEN x.status = 'sent' THEN a.finished_at END,
       next_attempt_at = CASE WHEN x.delay IS NULL THEN d.next_attempt_at
                              ELSE a.finished_at + make_interval(secs => x.delay) END,
       claim_at = CASE WHEN x.delay IS NULL THEN d.claim_at
                       ELSE a.finished_at + make_interval(secs => x.delay - {head}) END
  FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::text[], %s::float8[]) AS x(id, attempt, status, detail, delay)
       JOIN attempts a ON a.delivery_id = x.id AND a.attempt = x.attempt
 WHERE d.id = x.id
""".replace("{head}", HEAD_START.format(purpose="d.purpose", step="d.step"))

#: Alarm messages claimed and not sent (the batch's time was up, or they were over when claimed) whose episode was
#: acknowledged or cleared meanwhile: the acknowledgement and the clear skipped them while they were locked.
CANCEL_IF_OVER = """
UPDATE deliveries d SET status = 'cancelled', detail = 'acknowledged or cleared before it was sent'
  FROM episodes p
 WHERE d.id = ANY(%s) AND d.purpose = 'alarm' AND d.status = 'pending' AND p.event_id = d.event_id
   AND (p.acked_at IS NOT NULL OR p.cleared_at IS NOT NULL)
"""

CANCEL_PENDING_ALARMS = """
UPDATE deliveries SET status = 'cancelled', detail = %s
 WHERE id IN (SELECT id FROM deliveries WHERE event_id = %s AND purpose = 'alarm' AND status = 'pending'
                FOR UPDATE SKIP LOCKED)
"""

#: Up to ``%s`` due deliveries of the community, the first in claim order (:data:`HEAD_START`), locked (the others'
#: locked ones skipped), then their episodes by key and each one's last logged attempt. The lock is taken on
#: ``deliveries`` alone, through its own index, so the plan stays one index step whatever the tables' statistics (a
#: join here, planned on a fresh table's, walked every episode for every row: 180 ms a claim).
CLAIM = """
WITH claimed AS (
    SELECT id FROM deliveries
     WHERE status = 'pending' AND community = %s AND next_attempt_at <= statement_timestamp()
     ORDER BY community, claim_at
     LIMIT %s
       FOR NO KEY UPDATE SKIP LOCKED)
SELECT d.id, d.event_id, d.purpose, d.step, d.role, d.name, d.phone, d.urls, d.attempts,
       l.attempt AS logged, l.outcome AS logged_outcome, l.detail AS logged_detail,
       p.community, p.building, p.unit, p.household, p.what, p.kind, extract(epoch FROM p.detected_at) AS detected,
       extract(epoch FROM p.opened_at) AS opened, p.acked_by, extract(epoch FROM p.acked_at) AS acked,
       extract(epoch FROM p.cleared_at) AS cleared
  FROM claimed c JOIN deliveries d ON d.id = c.id JOIN episodes p ON p.event_id = d.event_id
       LEFT JOIN LATERAL (SELECT attempt, outcome, detail FROM attempts a WHERE a.delivery_id = d.id
                           ORDER BY attempt DESC LIMIT 1) l ON true
 ORDER BY d.claim_at
"""

#: Episodes whose next step is due, locked (others' skipped), then their events by key (as :data:`CLAIM`).
DUE_EPISODES = """
WITH due AS (
    SELECT event_id FROM episodes
     WHERE next_step_at <= statement_timestamp() AND community = %s
     ORDER BY next_step_at
     LIMIT 100
       FOR UPDATE SKIP LOCKED)
SELECT p.*, extract(epoch FROM p.opened_at) AS opened, extract(epoch FROM clock_timestamp()) AS now, e.body
  FROM due JOIN episodes p ON p.event_id = due.event_id JOIN events e ON e.event_id = due.event_id
"""

ENDINGS = """
SELECT e.event_id, e.gateway, e.kind, e.device, e.body->>'code' AS code, e.detected_at
  FROM events e
 WHERE (e.action = 'cleared' OR e.kind = 'reset') AND e.committed_at > statement_timestamp() - make_interval(secs => %s)
   AND e.community = %s AND NOT EXISTS (SELECT 1 FROM clears c WHERE c.event_id = e.event_id)
 ORDER BY e.committed_at
 LIMIT 200
"""


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class NotifierSettings:
    """One community's notifier (the file ``fleet/notifier.example.toml`` documents each key)."""

    community: str
    dsn: str
    secret: bytes
    public_url: str = "http://127.0.0.1:8080"
    sms_url: str = ""
    """Apprise URL of the community's SMS provider, ``{phone}`` standing for the number (digits and ``+``)."""
    ack_link_ttl_s: float = 24 * 3600.0
    ladder: Ladder = field(default_factory=Ladder)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    contacts: Contacts = field(default_factory=Contacts)
    poll_s: float = 0.1
    in_flight: int = 4
    """Messages one instance sends at once, each on a sending lane of its own (a thread and a connection)."""
    name: str = "notifier"


class SettingsError(ValueError):
    """A setting that cannot work; the message names the key."""


def load_settings(path: str | Path, *, dsn: str, contacts: Contacts, name: str) -> NotifierSettings:
    """The notifier's TOML file → settings; errors name the key (exit 78 from :func:`main`)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: {exc}") from None
    n = data.get("notifier", {})
    if not isinstance(n.get("community"), str) or not n["community"]:
        raise SettingsError("notifier.community: the community id is required")
    secret_file = n.get("secret_file")
    if not isinstance(secret_file, str):
        raise SettingsError("notifier.secret_file: a file holding the secret the acknowledgement links are signed "
                            "with (shared by every instance and the duty desk) is required")
    try:
        secret = Path(path).parent.joinpath(secret_file).read_bytes().strip()
    except OSError as exc:
        raise SettingsError(f"notifier.secret_file: {exc}") from None
    if len(secret) < 16:
        raise SettingsError("notifier.secret_file: the secret must be at least 16 bytes")
    sms_url = str(n.get("sms_url", ""))
    if sms_url and "{phone}" not in sms_url:
        raise SettingsError("notifier.sms_url: must contain {phone}, where the number goes")
    retry = data.get("retry", {})
    try:
        ladder = Ladder.from_mapping(data.get("ladder", {}))
        policy = RetryPolicy(base_s=float(retry.get("base_s", 5.0)), cap_s=float(retry.get("cap_s", 300.0)),
                             max_attempts=int(retry.get("max_attempts", 8)))
        ttl = float(n.get("ack_link_ttl_s", 24 * 3600.0))
        poll = float(n.get("poll_s", 0.1))
        in_flight = int(n.get("in_flight", 4))
    except LadderError as exc:
        raise SettingsError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"retry / notifier: {exc}") from None
    if not 1 <= in_flight <= 64:
        raise SettingsError(f"notifier.in_flight: messages sent at once, 1 to 64, not {in_flight}")
    return NotifierSettings(community=n["community"], dsn=dsn, secret=secret,
                            public_url=str(n.get("public_url", "http://127.0.0.1:8080")).rstrip("/"),
                            sms_url=sms_url, ack_link_ttl_s=ttl, ladder=ladder, retry=policy, contacts=contacts,
                            poll_s=poll, in_flight=in_flight, name=name)


# ------------------------------------------------------------------------------------------- tokens


def make_token(secret: bytes, delivery_id: int) -> str:
    """The acknowledgement token of one alarm message: its delivery id and an HMAC of it (unguessable without
    the secret, the same on every instance, so a message sent twice carries a link that works both times)."""
    mac = hmac.new(secret, f"ack:{delivery_id}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{delivery_id}.{mac}"


def _token_delivery(secret: bytes, token: str) -> int | None:
    head = token.partition(".")[0]
    if not head.isdigit() or len(head) > 18:
        return None
    return int(head) if hmac.compare_digest(make_token(secret, int(head)), token) else None


# ------------------------------------------------------------------------------------------- acknowledgement


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an acknowledgement did: ``status`` is acknowledged, already (someone did before: ``by``), closed
    (cleared before), expired, or unknown (no such token or episode, or another community's)."""

    status: str
    event_id: str | None = None
    by: str | None = None


async def acknowledge_link(conn: psycopg.AsyncConnection[Any], secret: bytes, token: str) -> AckResult:
    """The acknowledgement behind an alarm message's link (committed here)."""
    delivery_id = _token_delivery(secret, token)
    if delivery_id is None:
        return AckResult("unknown")
    cur = await conn.execute("SELECT event_id, role, name, token_expires_at > clock_timestamp() AS fresh "
                             "FROM deliveries WHERE id = %s AND purpose = 'alarm'", (delivery_id,))
    row = await cur.fetchone()
    if row is None:
        return AckResult("unknown")
    event_id, role, name, fresh = _values(row, "event_id", "role", "name", "fresh")
    if not fresh:
        return AckResult("expired", event_id)
    return await _acknowledge(conn, event_id, f"{name} ({role})", community=None)


async def acknowledge_episode(conn: psycopg.AsyncConnection[Any], event_id: str, by: str, *,
                              community: str) -> AckResult:
    """The duty desk's acknowledgement of one of ``community``'s episodes (committed here)."""
    return await _acknowledge(conn, event_id, by, community=community)


def _values(row: Any, *names: str) -> tuple[Any, ...]:
    """A row's values, whether the connection gives tuples or dicts."""
    return tuple(row[n] for n in names) if isinstance(row, Mapping) else tuple(row)


async def _acknowledge(conn: psycopg.AsyncConnection[Any], event_id: str, by: str, *,
                       community: str | None) -> AckResult:
    async with conn.transaction():
        cur = await conn.execute("SELECT community, acked_by, cleared_at IS NOT NULL AS cleared FROM episodes "
                                 "WHERE event_id = %s FOR UPDATE", (event_id,))
        row = await cur.fetchone()
        if row is None:
            return AckResult("unknown")
        owner, acked_by, cleared = _values(row, "community", "acked_by", "cleared")
        if community is not None and owner != community:
            return AckResult("unknown")
        if acked_by is not None:
            return AckResult("already", event_id, acked_by)
        if cleared:
            return AckResult("closed", event_id)
        await conn.execute("UPDATE episodes SET acked_at = clock_timestamp(), acked_by = %s, next_step_at = NULL "
                           "WHERE event_id = %s", (by, event_id))
        await conn.execute(CANCEL_PENDING_ALARMS, (f"acknowledged by {by}", event_id))
        await conn.execute(FOLLOW_UP, {"purpose": "ack", "event": event_id})
    _emit("acknowledged", event_id=event_id, by=by)
    return AckResult("acknowledged", event_id, by)


# ------------------------------------------------------------------------------------------- messages


def _place(r: Mapping[str, Any]) -> str:
    parts = [f"{r['community']}/{r['building']}"]
    if r.get("unit"):
        parts.append(f"unit {r['unit']}")
    if r.get("household"):
        parts.append(f"household {r['household']}")
    return ", ".join(parts)


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "?"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%H:%M:%S UTC")


def compose(r: Mapping[str, Any], link: str | None) -> tuple[str, str]:
    """(title, body) of a delivery row joined with its episode."""
    place, what = _place(r), r["what"]
    since = _clock(r["detected"] if r["detected"] is not None else r["opened"])
    ref = f"ref {r['event_id']}"
    if r["purpose"] == "ack":
        title = f"Acknowledged: {what}"
        body = f"{what} at {place} (since {since}) was acknowledged by {r['acked_by']} at {_clock(r['acked'])}."
    elif r["purpose"] == "clear":
        title = f"All clear: {what}"
        by = f"acknowledged by {r['acked_by']}" if r["acked_by"] else "not acknowledged"
        body = f"All clear: {what} at {place} (since {since}) ended at {_clock(r['cleared'])}; {by}."
    else:
        title = f"{what.upper()}: {place}"
        body = f"{what} at {place}, since {since}. You are told as {r['role']} (step {r['step']})."
        if link:
            body += f"\nAcknowledge: {link}"
    return title, f"{body}\n{ref}"


def _what(e: Mapping[str, Any]) -> str:
    body = e.get("body") or {}
    kind = str(e["kind"])
    if kind == "alarm":
        level = body.get("level")
        return f"gas alarm ({level})" if level else "alarm"
    code = body.get("code")
    return f"{kind} {code}" if code else kind


_NUMBER = re.compile(r"\+?\d[\d ()./-]*\d")


def _detail(text: str) -> str:
    """What a delivery row may keep and the desk may show: never a number (a phone number, an account id or a
    key's digits), at most 200 characters."""
    return _NUMBER.sub("#", text)[:200]


def _schemes(urls: Sequence[str]) -> str:
    return ", ".join(sorted({u.split("://", 1)[0] + "://" for u in urls}))


def _subject(e: Mapping[str, Any]) -> str:
    body = e.get("body") or {}
    return str(e.get("device") or body.get("code") or "")


# ------------------------------------------------------------------------------------------- the worker


def _emit(kind: str, **fields: Any) -> None:
    """One JSON line on stdout, written whole (the lanes' threads write too)."""
    line = json.dumps({"event": kind, "time": time.time(), **fields}, default=str) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


_EMIT_LOCK = threading.Lock()


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """The notifier's tables (after the inbox's ``events`` and ``notifications``), created once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await conn.execute(SCHEMA)


class Notifier:
    """One instance: opens episodes, escalates and closes them on its asyncio loop, and delivers on ``in_flight``
    sending lanes (threads, each with its own connection); any number of instances run side by side."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.s = settings
        self._counts = {"sent": 0, "failed": 0}
        self._counts_lock = threading.Lock()
        self._stop = asyncio.Event()
        self._halt = threading.Event()
        self._wakes = [threading.Event() for _ in range(settings.in_flight)]
        self._channels = Channels()
        self._steps_created = 0
        """Bumped each time :meth:`escalate` creates a step's messages: a lane ends its batch early to claim them."""
        self._last_sweep = -SWEEP_S

    def stop(self) -> None:
        self._stop.set()

    def _wake_lanes(self) -> None:
        for wake in self._wakes:
            wake.set()

    async def run(self) -> None:
        """Loop until :meth:`stop`. Every statement uses the database's clock, so instances agree on time."""
        # Apprise loads its plugins on first use (about a second here): before the first alarm, not during it.
        await asyncio.to_thread(apprise.Apprise().add, "json://localhost")
        keep_connections()
        conn = await self._connect()
        await self._wait_for_inbox(conn)
        await ensure_schema(conn)
        lanes = [threading.Thread(target=self._lane, args=(wake,), name=f"lane-{i}", daemon=True)
                 for i, wake in enumerate(self._wakes)]
        for lane in lanes:
            lane.start()
        _emit("notifier", name=self.s.name, community=self.s.community, in_flight=self.s.in_flight)
        # The ladder on a connection and a loop of its own: a tick busy opening a burst's episodes or handling
        # its clears does not hold a step back.
        loops = [asyncio.create_task(self._loop(self.tick, conn, report=True)),
                 asyncio.create_task(self._loop(self.escalate))]
        try:
            await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self._stop.set()  # one loop failing stops the instance, as it should be seen to
            self._halt.set()
            self._wake_lanes()
            for lane in lanes:  # each ends with the message it is sending recorded
                await asyncio.to_thread(lane.join)
            for task in loops:
                await task

    async def _loop(self, job: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int | bool]],
                    conn: psycopg.AsyncConnection[Any] | None = None, *, report: bool = False) -> None:
        """Run ``job`` until :meth:`stop`, again at once while it finds work, else every ``poll_s``; new
        deliveries wake the lanes. A lost database is connected again; a statement refused is reported."""
        last_report = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = await self._connect()
                    busy = await job(conn)
                except psycopg.OperationalError as exc:
                    _emit("database_lost", error=repr(exc))
                    await asyncio.sleep(1.0)
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            await conn.close()
                    conn = await self._reconnect()
                    continue
                except psycopg.Error as exc:
                    _emit("tick_failed", job=getattr(job, "__name__", "?"), error=repr(exc))
                    busy = False
                if busy:
                    self._wake_lanes()
                if report and time.monotonic() - last_report > 5.0:
                    last_report = time.monotonic()
                    _emit("delivered", name=self.s.name, sent=self.sent, failed=self.failed)
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.s.poll_s)
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.s.dsn, autocommit=True, row_factory=dict_row)

    async def _reconnect(self) -> psycopg.AsyncConnection[Any] | None:
        """A new connection, tried every second; None once stopped (a SIGTERM ends an instance whose database is
        gone: it used to try for ever)."""
        while not self._stop.is_set():
            try:
                return await self._connect()
            except psycopg.OperationalError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
        return None

    async def _wait_for_inbox(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The inbox creates ``events`` and ``notifications``; the notifier's tables refer to them."""
        while not self._stop.is_set():
            cur = await conn.execute("SELECT to_regclass('notifications') IS NOT NULL AS ok")
            row = await cur.fetchone()
            if row and row["ok"]:
                return
            await asyncio.sleep(0.5)

    async def tick(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """One round of opening and closing episodes; True when there was work (so the next round comes without a
        pause)."""
        sweep = time.monotonic() - self._last_sweep >= SWEEP_S
        window = LOOKBACK_S if sweep else RECENT_S
        opened = await self.open_episodes(conn, window)
        closed = await self.close_episodes(conn, window)
        if sweep:
            self._last_sweep = time.monotonic()
        return bool(opened or closed)

    # ------------------------------------------------------------------------------ opening

    def _people(self, event: Mapping[str, Any], roles: Sequence[str]) -> list[Person]:
        found: list[Person] = []
        for role in roles:
            found += self.s.contacts.with_role(role, event)
        return found

    def _person(self, event: Mapping[str, Any], role: str, name: str, phone: str) -> Person:
        """A notification row's person with their channels from the contacts (by role and name)."""
        for p in self.s.contacts.with_role(role, event):
            if p.name == name:
                return p
        return Person(name, phone, role)

    def _delivery_args(self, cols: list[list[Any]]) -> dict[str, Any]:
        """:data:`INSERT_DELIVERIES`' arguments: the columns :meth:`_rows_for` filled, and the links' lifetime."""
        return {"ttl": self.s.ack_link_ttl_s, **dict(zip(DELIVERY_COLUMNS, cols, strict=True))}

    def _rows_for(self, event_id: str, step: int, people: Sequence[Person], due: float, skip_roles: frozenset[str],
                  cols: list[list[Any]]) -> None:
        for p in people:
            skipped = p.role in skip_roles
            values = (event_id, "alarm", step, p.role, p.name, p.phone, "\n".join(p.urls),
                      "skipped" if skipped else "pending", due,
                      "the gateway's own SMS reached this role" if skipped else None)
            for col, v in zip(cols, values, strict=True):
                col.append(v)

    async def open_episodes(self, conn: psycopg.AsyncConnection[Any], window_s: float = LOOKBACK_S) -> int:
        """An episode, with its step-1 deliveries, for each event routed in the last ``window_s`` that has none."""
        cur = await conn.execute(UNOPENED, (window_s, self.s.community))
        ids = [r["event_id"] for r in await cur.fetchall()]
        if not ids:
            return 0
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT event_id, gateway, community, building, unit, household, kind, action, device, body, "
                "detected_at FROM events WHERE event_id = ANY(%s)", (ids,))
            events = {r["event_id"]: r for r in await cur.fetchall()}
            cur = await conn.execute("SELECT event_id, role, name, phone FROM notifications WHERE event_id = ANY(%s)",
                                     (ids,))
            routed: dict[str, list[Mapping[str, Any]]] = {}
            for r in await cur.fetchall():
                routed.setdefault(r["event_id"], []).append(r)
            cols: list[list[Any]] = [[] for _ in range(11)]
            for e in events.values():
                for col, v in zip(cols, (e["event_id"], e["community"], e["gateway"], e["building"], e["unit"],
                                         e["household"], e["kind"], _subject(e), _what(e),
                                         self.s.contacts.is_alone(e), e["detected_at"]), strict=True):
                    col.append(v)
            cur = await conn.execute(OPEN_EPISODES, cols)
            new = {r["event_id"]: float(r["extract"]) for r in await cur.fetchall()}
            dcols: list[list[Any]] = [[] for _ in range(10)]
            climbing: tuple[list[str], list[float]] = ([], [])
            ladder = self.s.ladder
            ended: dict[str, str] = {}
            if new:
                cur = await conn.execute(HANDLED_END, {
                    "events": list(new), "gateways": [events[i]["gateway"] for i in new],
                    "kinds": [events[i]["kind"] for i in new], "subjects": [_subject(events[i]) for i in new],
                    "detected": [events[i]["detected_at"] for i in new], "community": self.s.community,
                    "lookback": LOOKBACK_S})
                ended = {r["event_id"]: r["end_id"] for r in await cur.fetchall()}
            for event_id, opened in new.items():
                e = events[event_id]
                if event_id in ended:  # its clear came (and was handled) first: opened closed, nobody told
                    await conn.execute("UPDATE episodes SET cleared_at = clock_timestamp(), cleared_by = %s, "
                                       "next_step_at = NULL WHERE event_id = %s", (ended[event_id], event_id))
                    continue
                alone = self.s.contacts.is_alone(e)
                people: dict[tuple[str, str], Person] = {}
                for n in routed.get(event_id, []):
                    if n["role"] == "unrouted":  # nobody on file: the duty desk at once
                        for p in self._people(e, ("duty desk",)):
                            people.setdefault((p.role, p.name), p)
                        continue
                    p = self._person(e, n["role"], n["name"], n["phone"])
                    people.setdefault((p.role, p.name), p)
                for p in self._people(e, ladder.roles(1, alone)):
                    people.setdefault((p.role, p.name), p)
                self._rows_for(event_id, 1, list(people.values()), opened, gateway_sms_roles(e["body"] or {}), dcols)
                nxt = ladder.next_due(kind=e["kind"], opened_at=opened, started=1, alone=alone, closed=False)
                if nxt is not None:
                    climbing[0].append(event_id)
                    climbing[1].append(nxt)
            if climbing[0]:
                await conn.execute("UPDATE episodes p SET next_step_at = to_timestamp(x.t) FROM unnest(%s::text[], "
                                   "%s::float8[]) AS x(e, t) WHERE p.event_id = x.e", climbing)
            if dcols[0]:
                await conn.execute(INSERT_DELIVERIES, self._delivery_args(dcols))
        for event_id in new:
            _emit("opened", event_id=event_id, name=self.s.name)
        return len(new)

    # ------------------------------------------------------------------------------ escalating

    async def escalate(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """The due steps of every episode whose next step is due, each with its deliveries, atomically: four
        statements however many episodes are due (a burst's alarms come due together a step later)."""
        done = 0
        async with conn.transaction():
            cur = await conn.execute(DUE_EPISODES, (self.s.community,))
            rows = await cur.fetchall()
            if not rows:
                return 0
            cur = await conn.execute("SELECT event_id, role, name FROM deliveries WHERE event_id = ANY(%s) "
                                     "AND purpose = 'alarm'", ([p["event_id"] for p in rows],))
            told_by: dict[str, set[tuple[str, str]]] = {}
            for r in await cur.fetchall():
                told_by.setdefault(r["event_id"], set()).add((r["role"], r["name"]))
            dcols: list[list[Any]] = [[] for _ in range(10)]
            moved: list[list[Any]] = [[], [], []]  # event id, step reached, next step's due time
            ladder = self.s.ladder
            for p in rows:
                closed = p["acked_at"] is not None or p["cleared_at"] is not None
                opened, alone = float(p["opened"]), bool(p["alone"])
                steps = ladder.due_steps(kind=p["kind"], opened_at=opened, started=p["step"], now=float(p["now"]),
                                         alone=alone, closed=closed)
                told = told_by.get(p["event_id"], set())
                for step in steps:
                    people = [q for q in self._people(p, ladder.roles(step, alone)) if (q.role, q.name) not in told]
                    told |= {(q.role, q.name) for q in people}
                    self._rows_for(p["event_id"], step, people, ladder.due_at(step, opened, alone),
                                   gateway_sms_roles(p["body"] or {}), dcols)
                top = steps[-1] if steps else p["step"]
                nxt = ladder.next_due(kind=p["kind"], opened_at=opened, started=top, alone=alone, closed=closed)
                for col, v in zip(moved, (p["event_id"], top, nxt), strict=True):
                    col.append(v)
                if steps:
                    done += 1
                    _emit("escalated", event_id=p["event_id"], steps=steps, name=self.s.name)
            await conn.execute("UPDATE episodes p SET step = x.s, next_step_at = to_timestamp(x.t) FROM unnest("
                               "%s::text[], %s::int[], %s::float8[]) AS x(e, s, t) WHERE p.event_id = x.e", moved)
            if dcols[0]:
                await conn.execute(INSERT_DELIVERIES, self._delivery_args(dcols))
        if dcols[0]:
            self._steps_created += 1  # committed: the lanes end their batches and claim them first
        return done

    # ------------------------------------------------------------------------------ closing

    async def close_episodes(self, conn: psycopg.AsyncConnection[Any], window_s: float = LOOKBACK_S) -> int:
        """Each clear (or reset) of the last ``window_s`` not handled yet closes the open episodes it ends and sends
        the all-clear."""
        cur = await conn.execute(ENDINGS, (window_s, self.s.community))
        endings = await cur.fetchall()
        closed = 0
        for end in endings:
            async with conn.transaction():
                cur = await conn.execute("INSERT INTO clears (event_id, closed) VALUES (%s, 0) ON CONFLICT DO NOTHING "
                                         "RETURNING event_id", (end["event_id"],))
                if await cur.fetchone() is None:
                    continue  # another instance has it
                if end["kind"] == "reset":
                    query, args = ("SELECT event_id FROM episodes WHERE gateway = %s AND kind = 'alarm' AND "
                                   "cleared_at IS NULL", [end["gateway"]])
                    if end["device"]:
                        query += " AND subject = %s"
                        args.append(end["device"])
                else:
                    query = ("SELECT event_id FROM episodes WHERE gateway = %s AND kind = %s AND subject = %s AND "
                             "cleared_at IS NULL")
                    args = [end["gateway"], end["kind"], end["device"] or end["code"] or ""]
                if end["detected_at"] is not None:  # not an episode the gateway raised again after this clear
                    query += " AND (detected_at IS NULL OR detected_at <= %s)"
                    args.append(end["detected_at"])
                cur = await conn.execute(query + " ORDER BY event_id FOR UPDATE", args)
                ids = [r["event_id"] for r in await cur.fetchall()]
                for event_id in ids:
                    await conn.execute("UPDATE episodes SET cleared_at = clock_timestamp(), cleared_by = %s, "
                                       "next_step_at = NULL WHERE event_id = %s", (end["event_id"], event_id))
                    await conn.execute(CANCEL_PENDING_ALARMS, ("cleared before it was sent", event_id))
                    await conn.execute(FOLLOW_UP, {"purpose": "clear", "event": event_id})
                await conn.execute("UPDATE clears SET closed = %s WHERE event_id = %s", (len(ids), end["event_id"]))
            for event_id in ids:
                _emit("cleared", event_id=event_id, by=end["event_id"], name=self.s.name)
            closed += len(ids)
        return closed

    # ------------------------------------------------------------------------------ delivering

    def _urls(self, r: Mapping[str, Any]) -> list[str]:
        urls = [u for u in r["urls"] if u]
        if not urls and r["phone"] and self.s.sms_url:
            number = "".join(ch for ch in r["phone"] if ch.isdigit() or ch == "+")
            urls = [self.s.sms_url.replace("{phone}", quote(number, safe=""))]
        return urls

    def _send(self, r: Mapping[str, Any]) -> tuple[str, str]:
        """(outcome, detail) of one attempt: delivered or failed (blocking: a sending lane's thread)."""
        urls = self._urls(r)
        if not urls:
            if r["role"] == "duty desk":
                return "delivered", "shown on the duty desk page"
            return "failed", "no channel: no Apprise URL and no phone with an SMS provider"
        link = None
        if r["purpose"] == "alarm":
            link = f"{self.s.public_url}/ack/{make_token(self.s.secret, int(r['id']))}"
        title, body = compose(r, link)
        try:
            ok = self._channels.send(urls, title, body)
        except UnknownChannel as exc:
            return "failed", _detail(f"not an Apprise URL this installation supports: {_schemes([exc.url])}")
        except Exception as exc:  # a plugin that raises is a failed attempt, not a dead lane
            return "failed", _detail(f"{type(exc).__name__} raised: {_schemes(urls)}")
        # Only the outcome and the schemes: Apprise's log lines may hold phone numbers and provider credentials.
        if ok:
            return "delivered", _detail(f"{len(urls)} channel(s): {_schemes(urls)}")
        return "failed", _detail(f"Apprise reported a failure: {_schemes(urls)}")

    def _lane(self, wake: threading.Event) -> None:
        """One sending lane: claim a batch of due deliveries, send them one by one, each attempt's outcome committed
        on a second connection before the next leaves; then their statuses and commit; again until none is due,
        then wait for :meth:`_wake_lanes` or ``poll_s``. A kill -9 leaves at most the one message being sent
        without its outcome: the claim's transaction rolls back, and the next claim takes the logged outcomes."""
        conns: tuple[psycopg.Connection[Any], psycopg.Connection[Any]] | None = None
        batch = 1
        while not self._halt.is_set():
            try:
                if conns is None:
                    conns = (psycopg.Connection.connect(self.s.dsn, autocommit=True, row_factory=dict_row),
                             psycopg.Connection.connect(self.s.dsn, autocommit=True))
                    # The claim holds its rows while an outcome is logged beside it: a lock the log waits for
                    # behind the claim (DDL queued on the tables) would wait for ever, unseen by PostgreSQL's
                    # deadlock detection. It fails instead, and the lane starts again (the rows freed).
                    conns[1].execute(f"SET lock_timeout = '{LOG_LOCK_TIMEOUT_S}s'")
                wake.clear()  # a wake-up from here on ends the wait below at once
                tried, batch = self._deliver(*conns, batch)
                if not tried:
                    wake.wait(self.s.poll_s)
            except Exception as exc:  # database lost, a statement refused, a row it cannot read: the rows are freed
                # (the claim's transaction rolls back with its connection), and the lane goes on with new ones
                _emit("lane_failed", name=self.s.name, error=repr(exc))
                for c in conns or ():
                    with contextlib.suppress(psycopg.Error):
                        c.close()
                conns = None
                self._halt.wait(1.0)
        for c in conns or ():
            with contextlib.suppress(psycopg.Error):
                c.close()

    def _deliver(self, conn: psycopg.Connection[Any], log: psycopg.Connection[Any], batch: int) -> tuple[int, int]:
        """Claim and send batches until none is due: (messages tried, the next batch's size). A batch is claimed in
        one statement and recorded in one; each message's outcome is committed (``log``) before the next leaves,
        and the batch stops after BATCH_S so that its rows (and a notice due meanwhile) do not wait long, and at
        once when :meth:`escalate` has created a step's messages (they are claimed first).
        Its size doubles while a whole batch is sent within BATCH_S (to CLAIM_BATCH), and falls to what was sent
        when it is not: with a slow provider each lane claims one at a time and leaves the rest to the others."""
        tried = 0
        with conn.pipeline():
            while not self._halt.is_set():
                conn.execute("BEGIN")
                rows = conn.execute(CLAIM, (self.s.community, batch)).fetchall()
                if not rows:
                    conn.execute("COMMIT")
                    break
                done: list[tuple[Mapping[str, Any], int, str, str]] = []
                unsent: list[int] = []
                deadline, steps = time.monotonic() + BATCH_S, self._steps_created
                for r in rows:
                    if done and (self._halt.is_set() or time.monotonic() > deadline or self._steps_created != steps):
                        unsent.append(r["id"])
                    elif r["logged"] is not None and r["logged"] > r["attempts"]:  # a lane killed before its commit
                        done.append((r, r["logged"], r["logged_outcome"], r["logged_detail"] or ""))
                    elif r["purpose"] == "alarm" and (r["acked"] is not None or r["cleared"] is not None):
                        unsent.append(r["id"])  # acknowledged or cleared while another batch held it
                    else:
                        started = time.monotonic()
                        outcome, detail = self._send(r)
                        log.execute(LOG_ATTEMPT, (r["id"], r["attempts"] + 1, self.s.name,
                                                  time.monotonic() - started, outcome, detail))
                        with self._counts_lock:
                            self._counts["sent" if outcome == "delivered" else "failed"] += 1
                        done.append((r, r["attempts"] + 1, outcome, detail))
                self._record(conn, done, unsent)
                conn.execute("COMMIT")
                tried += len(done)
                batch = min(CLAIM_BATCH, 2 * batch) if len(rows) == batch and not unsent else max(1, len(done))
        return tried, batch

    def _record(self, conn: psycopg.Connection[Any], done: Sequence[tuple[Mapping[str, Any], int, str, str]],
                unsent: Sequence[int]) -> None:
        """The batch's outcomes (logged already) as the deliveries' statuses, the notices they call for, and the
        rows left unsent cancelled if their episode is over; in the claim's transaction (not committed here)."""
        cols: tuple[list[Any], ...] = ([], [], [], [], [])
        over: set[str] = set()
        for r, attempt, outcome, detail in done:
            delay = None
            if outcome == "delivered":
                status = "sent"
                if r["purpose"] == "alarm":
                    over.add(r["event_id"])
            else:
                delay = self.s.retry.delay_s(attempt)
                status = "failed" if delay is None else "pending"
            for col, v in zip(cols, (r["id"], attempt, status, detail, delay), strict=True):
                col.append(v)
        if done:
            conn.execute(RECORD, cols)
        if over:
            # Meet acknowledgements and clears on the episodes' locks: one committed before is seen here, one
            # committing after sees these messages as sent.
            conn.execute(FOLLOW_UP_IF_OVER, {"events": sorted(over)})
        if unsent:
            conn.execute(CANCEL_IF_OVER, (list(unsent),))

    @property
    def sent(self) -> int:
        return self._counts["sent"]

    @property
    def failed(self) -> int:
        return self._counts["failed"]


class _KeptSession(requests.Session):
    """A sending lane's HTTP session: its connections kept open between messages (no new TCP connection and TLS
    handshake for each), and the environment's proxy and certificate settings read once per site rather than for
    every request (the environment of a running process does not change)."""

    def __init__(self) -> None:
        super().__init__()
        self._env: dict[tuple[str, Any, Any, Any], dict[str, Any]] = {}
        self.used = time.monotonic()

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        if proxies:  # a plugin's own proxies: as requests would
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(str(url))
        key = (f"{parts.scheme}://{parts.netloc}", stream, verify, cert)
        try:
            hash(key)
        except TypeError:  # a plugin's certificate as a list: not kept
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        if key not in self._env:
            self._env[key] = super().merge_environment_settings(url, {}, stream, verify, cert)
        found = self._env[key]
        return {**found, "proxies": dict(found["proxies"])}


_kept = threading.local()


def _kept_request(method: str, url: str, **kwargs: Any) -> requests.Response:
    """``requests.request`` on the calling thread's :class:`_KeptSession`. Nothing else is carried from one message
    to the next: the cookies a response set are dropped, and a session idle for KEEP_ALIVE_S is replaced (its
    connections closed) rather than reused, since a server may have closed them meanwhile."""
    session: _KeptSession | None = getattr(_kept, "session", None)
    if session is None or time.monotonic() - session.used > KEEP_ALIVE_S:
        if session is not None:
            session.close()
        session = _kept.session = _KeptSession()
    try:
        return session.request(method=method, url=url, **kwargs)
    finally:
        session.cookies.clear()
        session.used = time.monotonic()


def keep_connections() -> None:
    """Apprise's HTTP plugins call ``requests.request`` (or ``requests.post`` …, which call it): one new session,
    pool and connection per message, a third of an instance's CPU with a plain HTTP receiver, and a TLS handshake
    per message with an HTTPS provider. Apprise offers no session to pass, so the notifier's process routes those
    calls to one kept session per sending lane (:func:`_kept_request`). Only :meth:`Notifier.run` calls this."""
    requests.api.request = _kept_request  # type: ignore[assignment]  # requests.post & co. look it up here
    requests.request = _kept_request  # type: ignore[assignment]


class UnknownChannel(ValueError):
    """A URL no installed Apprise plugin takes."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class Channels:
    """Apprise's plugins for the URLs seen so far: each URL is parsed once (Apprise's parsing is a third of its
    cost per message), and each message gets a new plugin object from that parse, as a new ``Apprise()`` would
    give it (a plugin object keeps its own rate limit and is not shared between threads)."""

    def __init__(self) -> None:
        self._parsed: dict[str, dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    def _parse(self, url: str) -> dict[str, Any]:
        with self._lock:
            if url not in self._parsed:
                self._parsed[url] = url_to_dict(url)  # type: ignore[no-untyped-call]
            parsed = self._parsed[url]
        if parsed is None:
            raise UnknownChannel(url)
        return parsed

    def send(self, urls: Sequence[str], title: str, body: str) -> bool:
        """True when every URL took the message (raises :class:`UnknownChannel` for a URL Apprise does not know)."""
        plugins = []
        for url in urls:
            plugin = apprise.Apprise.instantiate(dict(self._parse(url)))
            if plugin is None:
                raise UnknownChannel(url)
            plugins.append(plugin)
        return all([p.notify(body=body, title=title) for p in plugins])


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fleet.notifier", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dsn", required=True, help="PostgreSQL connection string (the inbox's database)")
    p.add_argument("--config", required=True, help="the notifier's file (fleet/notifier.example.toml)")
    p.add_argument("--contacts", required=True, help="who to tell and how (fleet/contacts.example.toml)")
    p.add_argument("--name", default="notifier", help="this instance's name (kept with each attempt it makes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        contacts = Contacts.load(args.contacts)
        settings = load_settings(args.config, dsn=args.dsn, contacts=contacts, name=args.name)
    except (SettingsError, OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        print(f"notifier: {exc}", file=sys.stderr)
        return 78
    notifier = Notifier(settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, notifier.stop)
        await notifier.run()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
