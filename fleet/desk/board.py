"""What the duty desk shows, read from the notifier's tables: open episodes, who was told, a household's history,
offline gateways. Every query takes the officer's community and filters on it; nothing here writes."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["PRESENCE_SCHEMA", "board", "episode", "household_history", "offline_gateways"]

PRESENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_presence (
    gateway   text PRIMARY KEY,
    community text NOT NULL,
    building  text NOT NULL,
    state     text NOT NULL,
    reason    text,
    since     timestamptz NOT NULL,
    heard_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

EPISODE_COLUMNS = """
p.event_id, p.gateway, p.building, p.unit, p.household, p.kind, p.what, p.alone, p.step,
coalesce(p.detected_at, p.opened_at) AS since, p.opened_at, p.next_step_at, p.acked_at, p.acked_by, p.cleared_at
"""

DELIVERIES = """
SELECT d.event_id, d.purpose, d.step, d.role, d.name, d.status, d.attempts, d.sent_at, d.created_at, d.detail,
       CASE WHEN cardinality(d.urls) > 0 THEN array_to_string(
            ARRAY(SELECT split_part(u, '://', 1) FROM unnest(d.urls) u), ', ')
            WHEN d.phone <> '' THEN 'sms' WHEN d.role = 'duty desk' THEN 'desk page' ELSE 'none' END AS channel
  FROM deliveries d
 WHERE d.event_id = ANY(%s)
 ORDER BY d.event_id, d.created_at, d.id
"""


async def _with_deliveries(conn: psycopg.AsyncConnection[Any], episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [e["event_id"] for e in episodes]
    by_event: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(DELIVERIES, (ids,))
            for d in await cur.fetchall():
                by_event[d["event_id"]].append(d)
    for e in episodes:
        e["deliveries"] = by_event[e["event_id"]]
    return episodes


async def board(conn: psycopg.AsyncConnection[Any], community: str, limit: int = 200) -> list[dict[str, Any]]:
    """The community's open episodes (alarms, supervisory signals, faults not cleared), newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {EPISODE_COLUMNS} FROM episodes p WHERE p.community = %s AND p.cleared_at IS NULL "
                          "ORDER BY coalesce(p.detected_at, p.opened_at) DESC, p.event_id LIMIT %s", (community, limit))
        rows = await cur.fetchall()
    return await _with_deliveries(conn, rows)


async def episode(conn: psycopg.AsyncConnection[Any], community: str, event_id: str) -> dict[str, Any] | None:
    """One of the community's episodes with its deliveries; None when it is not the community's."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {EPISODE_COLUMNS} FROM episodes p WHERE p.community = %s AND p.event_id = %s",
                          (community, event_id))
        row = await cur.fetchone()
    return (await _with_deliveries(conn, [row]))[0] if row else None


async def household_history(conn: psycopg.AsyncConnection[Any], community: str, building: str, household: str,
                            limit: int = 200) -> list[dict[str, Any]]:
    """Every event of one household (alarms, clears, tests, telemetry left out), newest first, with its episode."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT e.event_id, e.kind, e.action, e.device, e.detected_at, e.committed_at, p.acked_by, p.acked_at, "
            "p.cleared_at, p.step FROM events e LEFT JOIN episodes p USING (event_id) "
            "WHERE e.community = %s AND e.building = %s AND e.household = %s AND e.kind <> 'telemetry' "
            "ORDER BY coalesce(e.detected_at, e.committed_at) DESC LIMIT %s", (community, building, household, limit))
        return await cur.fetchall()


async def offline_gateways(conn: psycopg.AsyncConnection[Any], community: str) -> list[dict[str, Any]]:
    """The community's gateways last heard offline, longest offline first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT gateway, building, reason, since FROM gateway_presence WHERE community = %s AND "
                          "state <> 'online' ORDER BY since", (community,))
        return await cur.fetchall()
