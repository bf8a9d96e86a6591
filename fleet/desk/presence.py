"""Which gateways are offline, and since when: each gateway's availability message (online at connect, its Will
"connection lost" when the broker loses it, "planned stop" before a stop), kept in ``gateway_presence``.

The central server's user may subscribe to ``<prefix>.>`` on the cluster (docs/fleet.md); an older message (by
its own ``time``) never overwrites a newer one, whatever order the two arrive in. The community and building
are the subject's (``<prefix>.<community>.<building>.availability``, which the cluster lets only that building's
gateway publish): a message whose body names others is dropped, and a gateway's row is never taken over from
another building.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

import nats
import psycopg

from fleet.desk.board import PRESENCE_SCHEMA

__all__ = ["watch_presence"]

UPSERT = """
INSERT INTO gateway_presence (gateway, community, building, state, reason, since)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (gateway) DO UPDATE SET state = excluded.state, reason = excluded.reason, since = excluded.since,
       building = excluded.building, heard_at = clock_timestamp()
 WHERE gateway_presence.since <= excluded.since
   AND (gateway_presence.community, gateway_presence.building) = (excluded.community, excluded.building)
"""


async def watch_presence(dsn: str, servers: list[str], *, prefix: str, user: str | None, password: str | None,
                         stop: asyncio.Event) -> None:
    """Keep ``gateway_presence`` up to date from the availability messages until ``stop`` is set."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(PRESENCE_SCHEMA)
    nc = await nats.connect(servers=servers, user=user, password=password, name="duty-desk-presence",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.5)

    async def upsert(row: tuple[Any, ...]) -> None:
        nonlocal conn
        try:
            await conn.execute(UPSERT, row)
        except psycopg.OperationalError:  # PostgreSQL restarted: a new connection, and the row again
            with contextlib.suppress(psycopg.Error):
                await conn.close()
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            await conn.execute(UPSERT, row)

    async def on_message(msg: Any) -> None:
        with contextlib.suppress(ValueError, UnicodeDecodeError, KeyError, TypeError):
            body = json.loads(msg.data)
            since = dt.datetime.fromisoformat(str(body["time"]))
            community, building = msg.subject.removeprefix(f"{prefix}.").split(".")[:2]
            if (body.get("community", community), body.get("building", building)) != (community, building):
                return  # the sender's subject is the truth
            with contextlib.suppress(psycopg.Error):
                await upsert((str(body["gateway"]), community, building, str(body["state"]), body.get("reason"),
                              since))

    await nc.subscribe(f"{prefix}.*.*.availability", cb=on_message)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
        await conn.close()
