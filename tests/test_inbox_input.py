"""The central inbox (fleet/inbox.py) against what a gateway may send wrong: a private PostgreSQL and a private
single-node nats-server with JetStream, the ``$MQTT_msgs`` stream made as nats-server's MQTT makes it; the inbox
runs in the test's event loop. A malformed message is rejected and counted; the inbox goes on storing. The duty
desk's presence watcher (fleet/desk/presence.py) likewise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.js.api import StreamConfig

from fleet.desk.presence import watch_presence
from fleet.inbox import MQTT_STREAM, MQTT_SUBJECT_PREFIX, Inbox, InboxSettings
from gateway.uplink.contract import availability_message
from tests.support.broker import free_port
from tests.support.postgres import PostgresServer, find_pg_bin

pytestmark = pytest.mark.timeout(120)

COMMUNITY = "c1"


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    if find_pg_bin() is None or (shutil.which("runuser") is None and os.geteuid() == 0):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are required: apt-get install postgresql")
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.access(binary, os.X_OK):
        pytest.skip("nats-server is required: apt-get install nats-server")
    port = free_port()
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "nats-server did not start"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
async def inbox(pg: PostgresServer, nats_url: str) -> AsyncIterator[Inbox]:
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as c:
        await c.execute("DROP TABLE IF EXISTS notifications, events, session_ends")
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(StreamConfig(name=MQTT_STREAM, subjects=[f"{MQTT_SUBJECT_PREFIX}>"]))
    await nc.close()
    box = Inbox(InboxSettings(nats_servers=(nats_url,), dsn=pg.dsn, community=COMMUNITY, name="inbox-t",
                              gap_grace_s=0.5, heal_every_s=0.2))
    task = asyncio.create_task(box.run())
    try:
        await until(lambda: _true(box.nc is not None and box._fast_db is not None), 30, "the inbox did not start")
        yield box
    finally:
        box.stop()
        await asyncio.wait_for(task, 30)


async def _true(value: bool) -> bool:
    return value


async def until(predicate: Callable[[], Awaitable[Any]], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


def event(building: str = "b1", **fields: Any) -> dict[str, Any]:
    body = {"event_id": uuid.uuid4().hex, "gateway": f"{COMMUNITY}-{building}", "install": "i1", "session": 1,
            "seq": 1, "community": COMMUNITY, "building": building, "kind": "alarm", "action": "raised",
            "unit": "u1", "household": "u1-101", "device": "gas-1", "time": "2026-12-07T10:00:00+00:00"}
    return {**body, **fields}


async def publish_durable(url: str, topic: str, body: Any) -> None:
    """As nats-server's MQTT stores a gateway's QoS 1 PUBLISH of ``topic`` (``/`` as ``.``)."""
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(MQTT_SUBJECT_PREFIX + topic, json.dumps(body).encode())
    finally:
        await nc.close()


async def publish_core(url: str, subject: str, body: Any) -> None:
    nc = await nats.connect(url)
    try:
        await nc.publish(subject, json.dumps(body).encode())
        await nc.flush()
    finally:
        await nc.close()


async def stored(pg: PostgresServer, event_id: str) -> tuple[Any, ...] | None:
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as c:
        cur = await c.execute("SELECT event_id, fast FROM events WHERE event_id = %s", (event_id,))
        return await cur.fetchone()


async def test_a_malformed_birth_or_event_is_rejected_and_the_durable_consumer_goes_on(
    pg: PostgresServer, nats_url: str, inbox: Inbox,
) -> None:
    base = f"safety.{COMMUNITY}.b1"
    await publish_durable(nats_url, f"{base}.birth", {"type": "birth", "gateway": "c1-b1", "community": COMMUNITY,
                                                      "building": "b1", "install": "i1", "session": 2,
                                                      "last_seq": 3, "sessions": 5})
    await publish_durable(nats_url, f"{base}.status", {"type": "status", "gateway": "c1-b1", "community": COMMUNITY,
                                                       "building": "b1", "install": "i1", "session": "2",
                                                       "last_seq": 3})
    await publish_durable(nats_url, f"{base}.event.alarm", event(seq="x"))
    await publish_durable(nats_url, f"{base}.event.alarm", event(session=[1]))
    good = event(seq=2)
    await publish_durable(nats_url, f"{base}.event.alarm", good)
    await until(lambda: stored(pg, good["event_id"]), 10, "the inbox stopped consuming after a malformed message")
    assert inbox.rejected == 4


async def test_a_malformed_alarm_on_the_fast_path_is_rejected_and_the_next_one_is_stored(
    pg: PostgresServer, nats_url: str, inbox: Inbox,
) -> None:
    subject = f"safety.{COMMUNITY}.b1.event.alarm"  # core NATS only: not in the stream, so the fast path or nothing
    await publish_core(nats_url, subject, event(seq="x"))
    await publish_core(nats_url, subject, event(session=2**40))
    good = event(seq=3)
    await publish_core(nats_url, subject, good)
    row = await until(lambda: stored(pg, good["event_id"]), 10, "the fast path stopped after a malformed alarm")
    assert row[1] is True
    assert inbox.rejected == 2


async def rows(pg: PostgresServer, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as c:
        cur = await c.execute(query, args)
        return await cur.fetchall()


def birth(building: str, session: int, last_seq: int, **fields: Any) -> dict[str, Any]:
    return {"type": "birth", "gateway": f"{COMMUNITY}-{building}", "community": COMMUNITY, "building": building,
            "install": "i1", "session": session, "last_seq": last_seq, **fields}


async def test_an_end_announced_far_ahead_is_ignored_and_healing_goes_on_for_the_others(
    pg: PostgresServer, nats_url: str, inbox: Inbox,
) -> None:
    asked: list[dict[str, Any]] = []
    nc = await nats.connect(nats_url)

    async def on_command(msg: Any) -> None:
        asked.append(json.loads(msg.data))

    await nc.subscribe(f"safety.{COMMUNITY}.b2.command.events", cb=on_command)
    try:
        await publish_durable(nats_url, f"safety.{COMMUNITY}.b1.birth", birth("b1", 5, 2**31 - 1))
        await publish_durable(nats_url, f"safety.{COMMUNITY}.b1.status", birth("b1", 6, 2**40, type="status"))
        for seq in (1, 3):  # b2 misses seq 2
            await publish_durable(nats_url, f"safety.{COMMUNITY}.b2.event.alarm",
                                  event("b2", seq=seq, kind="telemetry", action="reading"))
        await until(lambda: _true(bool(asked)), 10, "healing stalled: the gap of another gateway was not asked for")
    finally:
        await nc.close()
    assert asked[0]["args"]["from_seq"] == 2 and asked[0]["args"]["to_seq"] == 2, asked[0]
    assert await rows(pg, "SELECT * FROM session_ends WHERE gateway = 'c1-b1'") == []
    assert inbox.rejected == 1  # the status above the column's range


async def test_a_session_end_whose_body_names_another_building_or_community_than_its_subject_is_dropped(
    pg: PostgresServer, nats_url: str, inbox: Inbox,
) -> None:
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b2.birth", birth("b1", 1, 5))
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b2.birth", birth("b2", 1, 5, community="c2"))
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b2.birth", birth("b2", 1, 4, gateway="c1-b2"))
    await until(lambda: rows(pg, "SELECT * FROM session_ends"), 10, "the honest birth was not recorded")
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b3.status",  # b3 announcing for b2's gateway
                          birth("b3", 1, 9, gateway="c1-b2", type="status"))
    good = event("b3")
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b3.event.alarm", good)
    await until(lambda: stored(pg, good["event_id"]), 10, "the inbox stopped consuming")
    assert await rows(pg, "SELECT gateway, community, building, last_seq FROM session_ends") == [
        ("c1-b2", COMMUNITY, "b2", 4)]
    assert inbox.rejected == 2


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_after_postgresql_closed_its_connections_both_paths_store_again(
    pg: PostgresServer, nats_url: str, inbox: Inbox,
) -> None:
    await rows(pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    fast, durable = event(seq=1), event(seq=2, kind="telemetry", action="reading")
    await publish_core(nats_url, f"safety.{COMMUNITY}.b1.event.alarm", fast)  # core NATS only: the fast path
    await publish_durable(nats_url, f"safety.{COMMUNITY}.b1.event.telemetry", durable)
    assert (await until(lambda: stored(pg, fast["event_id"]), 10, "the fast path did not reconnect"))[1] is True
    await until(lambda: stored(pg, durable["event_id"]), 10, "the durable consumer did not reconnect")


@pytest.fixture
async def presence(pg: PostgresServer, nats_url: str) -> AsyncIterator[None]:
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as c:
        await c.execute("DROP TABLE IF EXISTS gateway_presence")
    stop = asyncio.Event()
    task = asyncio.create_task(watch_presence(pg.dsn, [nats_url], prefix="safety", user=None, password=None,
                                              stop=stop))
    try:
        await until(lambda: rows(pg, "SELECT 1 WHERE to_regclass('gateway_presence') IS NOT NULL"), 10,
                    "the watcher did not make its table")
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def availability(building: str, state: str, wall: float, **fields: Any) -> dict[str, Any]:
    return {**availability_message(gateway=f"{COMMUNITY}-{building}", community=COMMUNITY, building=building,
                                   state=state, session=1, wall=wall), **fields}


async def presence_rows(pg: PostgresServer) -> list[tuple[Any, ...]]:
    return await rows(pg, "SELECT gateway, community, building, state FROM gateway_presence ORDER BY gateway")


async def test_the_presence_watcher_stores_again_after_postgresql_closed_its_connection(
    pg: PostgresServer, nats_url: str, presence: None,
) -> None:
    await watched(pg, nats_url, "b1", availability("b1", "online", 1000.0))
    await rows(pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    await publish_core(nats_url, f"safety.{COMMUNITY}.b1.availability",
                       availability("b1", "offline", 1001.0, reason="connection lost"))
    await until(lambda: _true_async_rows(pg, [("c1-b1", COMMUNITY, "b1", "offline")]), 10,
                "the watcher did not reconnect")


async def _true_async_rows(pg: PostgresServer, expected: list[tuple[Any, ...]]) -> bool:
    return await presence_rows(pg) == expected


async def watched(pg: PostgresServer, nats_url: str, building: str, body: dict[str, Any]) -> None:
    """Publish ``body`` until the watcher has stored it (no hook says when its subscription is in place; the
    upsert of the same message is idempotent)."""

    async def there() -> bool:
        await publish_core(nats_url, f"safety.{COMMUNITY}.{building}.availability", body)
        return any(r[0] == body["gateway"] and r[3] == body["state"] for r in await presence_rows(pg))

    await until(there, 15, "the watcher did not store an availability message")


async def test_an_availability_naming_another_building_or_gateway_of_another_building_changes_nothing(
    pg: PostgresServer, nats_url: str, presence: None,
) -> None:
    await watched(pg, nats_url, "b1", availability("b1", "online", 1000.0))
    # b2's gateway: a body naming b1 on its own subject, then b1's gateway id on its own subject
    await publish_core(nats_url, f"safety.{COMMUNITY}.b2.availability",
                       availability("b1", "offline", 1001.0, reason="connection lost"))
    await publish_core(nats_url, f"safety.{COMMUNITY}.b2.availability",
                       availability("b2", "offline", 1002.0, gateway="c1-b1", reason="connection lost"))
    await publish_core(nats_url, f"safety.{COMMUNITY}.b2.availability",
                       availability("b2", "online", 1003.0, community="c9"))
    await watched(pg, nats_url, "b3", availability("b3", "online", 1004.0))  # after them: they were handled
    assert await presence_rows(pg) == [("c1-b1", COMMUNITY, "b1", "online"), ("c1-b3", COMMUNITY, "b3", "online")]
