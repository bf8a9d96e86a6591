"""The writer on real SQLite files: batching, a busy database, a full disk, the memory bound, corruption."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.events import Event
from gateway.uplink.outbox import Outbox
from gateway.uplink.writer import EventWriter
from tests.support.building import eventually
from tests.support.storage import fill_to_the_brim


def ev(kind: str = "telemetry", *, device: str = "gas-1", detail: str | None = None, value: float | None = None
       ) -> Event:
    action = "reading" if kind == "telemetry" else "raised"
    return Event(kind, action, time.monotonic(), device=device, detail=detail, value=value, wall=time.time())


@contextlib.asynccontextmanager
async def running(outbox: Outbox, **kwargs: object) -> AsyncIterator[EventWriter]:
    writer = EventWriter(outbox, **kwargs)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rows(outbox: Outbox, where: str = "1") -> list[dict[str, object]]:
    cur = await outbox.connection.execute(f"SELECT payload FROM events WHERE {where} ORDER BY seq")
    return [json.loads(p) for (p,) in await cur.fetchall()]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test", busy_timeout_ms=20)
    try:
        yield ob
    finally:
        await ob.close()


async def test_telemetry_is_batched_and_an_alarm_commits_at_once(outbox: Outbox) -> None:
    async with running(outbox, batch_s=60.0) as writer:
        for i in range(50):
            writer.put(ev(value=float(i)))
        await asyncio.sleep(0)
        assert outbox.commits == 0, "telemetry waits for its batch"
        writer.put(ev("alarm"))
        # A 60 s batch delay: the alarm does not wait for it, and takes the telemetry along in one transaction.
        await eventually(lambda: outbox.stored_total == 51, timeout=20)
        assert outbox.commits == 1
    async with running(outbox, batch_s=0.05) as writer:
        for i in range(30):
            writer.put(ev(value=float(i)))
        await eventually(lambda: outbox.stored_total == 81, timeout=20)
        assert outbox.commits == 2, "a telemetry batch is one transaction"


async def test_a_busy_database_is_retried_with_backoff(outbox: Outbox) -> None:
    other = sqlite3.connect(outbox.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        async with running(outbox) as writer:
            writer.put(ev("alarm"))
            await eventually(lambda: writer.retries >= 3, timeout=20)
            assert writer.held == 1 and writer.fault is None, "busy is waited out, not a fault"
            other.execute("COMMIT")
            await eventually(lambda: writer.held == 0, timeout=20)
            assert [r["kind"] for r in await rows(outbox)] == ["alarm"]
    finally:
        other.close()


async def test_disk_full_holds_events_in_memory_raises_a_fault_and_recovers(outbox: Outbox) -> None:
    await fill_to_the_brim(outbox)
    before = outbox.stored_total
    shed: list[Event] = []
    async with running(outbox, memory_limit=200, batch_s=0.01, on_shed=shed.extend) as writer:
        writer.put(ev("alarm", detail="gas high"))
        await eventually(lambda: writer.fault == "storage_full", timeout=20)
        for i in range(500):  # more than memory holds: telemetry goes, the alarm stays
            writer.put(ev(value=float(i)))
        assert writer.held <= 200
        assert writer.dropped["telemetry"] >= 300
        # the owner of the events hears of each one dropped (the storage process forgets its hand-over mark)
        assert len(shed) == writer.dropped["telemetry"] and {e.kind for e in shed} == {"telemetry"}
        kept = [e.kind for e in writer._held]
        assert kept[:2] == ["alarm", "fault"]
        await outbox.connection.execute("PRAGMA max_page_count = 1073741823")  # space returns
        await eventually(lambda: writer.held == 0 and writer.fault is None, timeout=30)
    stored = (await rows(outbox))[before:]
    assert [(r["kind"], r.get("code")) for r in stored[:2]] == [("alarm", None), ("fault", "storage_full")]
    assert stored[-1]["kind"] == "fault" and stored[-1]["action"] == "cleared"
    telemetry = [r["value"] for r in stored if r["kind"] == "telemetry"]
    assert telemetry == sorted(telemetry) and telemetry[-1] == 499.0, "the newest telemetry is kept"
    assert not {e.value for e in shed} & set(telemetry), "an event reported dropped was stored"
    assert (await outbox.stats())["dropped_in_memory"]["telemetry"] == writer.dropped["telemetry"]


async def test_disk_full_evicts_history_before_holding_anything(outbox: Outbox) -> None:
    ids = await outbox.append([ev(detail="t" * 500) for _ in range(400)])
    cur = await outbox.connection.execute("SELECT MIN(seq), MAX(seq) FROM events")
    lo, hi = await cur.fetchone()  # type: ignore[misc]
    await outbox.mark_delivered([(s, 1) for s in range(lo, hi + 1)])
    assert len(ids) == 400
    await fill_to_the_brim(outbox)
    async with running(outbox) as writer:
        writer.put(ev("alarm", detail="a" * 20_000))  # needs fresh pages
        await eventually(lambda: writer.held == 0, timeout=20)
        assert writer.fault is None
    counters = await outbox.counters()
    assert counters["evicted.delivered.telemetry"] > 0
    assert (await rows(outbox, "kind = 'alarm'"))[0]["detail"] == "a" * 20_000


async def test_corruption_found_while_running_replaces_the_file(outbox: Outbox, tmp_path: Path) -> None:
    ids = await outbox.append([ev(device=f"gas-{i}") for i in range(200)])
    db = tmp_path / "events.db"
    probe = sqlite3.connect(db, isolation_level=None)
    (root,) = probe.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events_device'").fetchone()
    (page_size,) = probe.execute("PRAGMA page_size").fetchone()
    probe.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(os.urandom(page_size))
    probe.execute("INSERT INTO meta (key, value) VALUES ('probe', '1')")  # makes the daemon's cache stale
    probe.close()
    generation = outbox.generation
    async with running(outbox) as writer:
        writer.put(ev("alarm", device="gas-7"))
        await eventually(lambda: writer.held == 0, timeout=20)
    assert outbox.generation == generation + 1 and outbox.recovered_from is not None
    stored = await rows(outbox)
    assert [r["event_id"] for r in stored[:200]] == ids
    assert [(r["kind"], r.get("code")) for r in stored[200:]] == [("fault", "storage_corrupt"), ("alarm", None)]
