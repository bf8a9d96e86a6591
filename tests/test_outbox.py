"""The outbox on real SQLite files: ids, durability settings, eviction order, retention, stats, corruption."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.events import Event
from gateway.uplink.outbox import DAY_S, MB, Outbox, StorageLimits, failure_kind

NOW = 1_800_000_000.0  # seconds since the epoch (January 2027)


def ev(kind: str = "telemetry", *, wall: float = NOW, device: str = "gas-1", detail: str | None = None,
       action: str | None = None) -> Event:
    actions = {"telemetry": "reading", "alarm": "raised", "fault": "raised", "supervisory": "raised"}
    return Event(kind, action or actions.get(kind, "started"), 1.0, device=device, detail=detail, wall=wall)


async def open_outbox(tmp_path: Path, **kwargs: Any) -> Outbox:
    return await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test", **kwargs)


async def append_seqs(ob: Outbox, events: list[Event]) -> list[int]:
    """Append and return the stored seqs (read back by event id)."""
    ids = await ob.append(events)
    marks = ",".join("?" * len(ids))
    cur = await ob.connection.execute(f"SELECT seq FROM events WHERE event_id IN ({marks}) ORDER BY seq", ids)
    return [int(r[0]) for r in await cur.fetchall()]


async def seqs_where(ob: Outbox, where: str, args: tuple[Any, ...] = ()) -> list[int]:
    cur = await ob.connection.execute(f"SELECT seq FROM events WHERE {where} ORDER BY seq", args)
    return [int(r[0]) for r in await cur.fetchall()]


async def test_ids_unique_across_restarts_and_a_replaced_file(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    first = await ob.append([ev(), ev()])
    install = ob.install
    await ob.close()
    ob = await open_outbox(tmp_path)
    second = await ob.append([ev()])
    assert ob.session == 2 and ob.install == install, "a restart keeps the installation"
    await ob.close()
    assert re.fullmatch(r"[0-9a-f]{16}", install)
    assert first == [f"gw-test:{install}:1:1", f"gw-test:{install}:1:2"] and second == [f"gw-test:{install}:2:1"]
    # The database is lost but the files beside it are not: a new installation, and the session goes on.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'events.db'}{suffix}").unlink(missing_ok=True)
    ob = await open_outbox(tmp_path)
    assert ob.session == 3 and ob.install != install
    await ob.close()


async def test_two_fresh_databases_of_one_site_never_share_an_event_id(tmp_path: Path) -> None:
    """A reinstall (--purge), a new SD card, a demo run: each starts at session 1, seq 1 again."""
    ids: list[set[str]] = []
    for name in ("first", "second"):
        ob = await Outbox.open(str(tmp_path / name / "events.db"), gateway_id="sunshine-garden-b07")
        try:
            assert ob.session == 1
            ids.append(set(await ob.append([ev() for _ in range(20)])))
        finally:
            await ob.close()
    assert len(ids[0]) == len(ids[1]) == 20
    assert not ids[0] & ids[1]


async def test_the_identity_is_kept_in_the_database_and_beside_it_and_the_database_wins(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    side = Path(f"{db}.install-id")
    ob = await open_outbox(tmp_path)
    install = ob.install
    await ob.close()
    assert side.read_text(encoding="ascii").strip() == install
    assert sqlite3.connect(db).execute("SELECT value FROM meta WHERE key = 'install'").fetchone() == (install,)
    side.write_text("0123456789abcdef\n", encoding="ascii")  # e.g. restored from another card's backup
    ob = await open_outbox(tmp_path)
    try:
        assert ob.install == install
        assert (await ob.append([ev()]))[0].startswith(f"gw-test:{install}:")
    finally:
        await ob.close()
    assert side.read_text(encoding="ascii").strip() == install, "the file follows the database"
    # A fresh database beside an old identity file (a cloned card image): a new identity, never the old one.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    ob = await open_outbox(tmp_path)
    try:
        assert ob.install != install
    finally:
        await ob.close()
    assert side.read_text(encoding="ascii").strip() == ob.install


async def test_a_database_from_before_identities_gets_one_and_keeps_its_old_rows(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    ob = await open_outbox(tmp_path)
    await ob.append([ev()])
    await ob.close()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM meta WHERE key = 'install'")
    con.commit()
    con.close()
    Path(f"{db}.install-id").unlink()
    ob = await open_outbox(tmp_path)
    try:
        assert re.fullmatch(r"[0-9a-f]{16}", ob.install) and ob.session == 2
        rows = await ob.recent(limit=10)
        assert len(rows) == 1
    finally:
        await ob.close()


async def test_a_replaced_corrupt_file_stays_the_same_installation(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        install = ob.install
        await ob.append([ev("alarm")])
        assert await ob.recover(sqlite3.DatabaseError("database disk image is malformed"))
        assert ob.install == install and ob.session == 2
    finally:
        await ob.close()


async def test_a_range_of_one_session_by_seq_oldest_first_page_by_page(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        await ob.append([ev(device=f"d{i}") for i in range(30)])
        page = await ob.recent(session=1, from_seq=5, to_seq=25, limit=8)
        assert [r["seq"] for r in page] == list(range(5, 13))
        page = await ob.recent(session=1, from_seq=13, to_seq=25, limit=100)
        assert [r["seq"] for r in page] == list(range(13, 26))
        assert await ob.recent(session=1, install=ob.install, from_seq=1, to_seq=1) != []
        assert await ob.recent(session=1, install="0123456789abcdef", from_seq=1, to_seq=30) == [], \
            "another installation's session 1 is not this one's"
        assert await ob.recent(session=2, from_seq=1, to_seq=30) == []
    finally:
        await ob.close()


async def test_every_commit_is_fully_synced_in_wal_mode(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        values = {}
        for pragma in ("journal_mode", "synchronous", "auto_vacuum"):
            cur = await ob.connection.execute(f"PRAGMA {pragma}")
            row = await cur.fetchone()
            assert row is not None
            values[pragma] = row[0]
        assert values == {"journal_mode": "wal", "synchronous": 2, "auto_vacuum": 2}  # FULL, INCREMENTAL
    finally:
        await ob.close()


async def test_pending_after_a_cursor_and_delivery_by_seq(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        seqs = await append_seqs(ob, [ev(device=f"d{i}") for i in range(10)])
        rows = await ob.pending(after=seqs[2], limit=4)
        assert [r.seq for r in rows] == seqs[3:7]
        body = json.loads(rows[0].payload)
        assert body["event_id"] == rows[0].event_id and body["device"] == "d3" and "historical" not in body
        await ob.mark_delivered([(s, 1) for s in seqs[:5]] + [(seqs[7], 2)])
        assert [r.seq for r in await ob.pending(limit=100)] == [seqs[5], seqs[6], seqs[8], seqs[9]]
        assert await ob.backlog() == (4, NOW)
        cur = await ob.connection.execute("SELECT attempts FROM events WHERE seq = ?", (seqs[7],))
        assert await cur.fetchone() == (2,)
    finally:
        await ob.close()


async def test_seqs_never_reused_and_listeners_get_the_stored_rows(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    heard: list[list[Any]] = []
    ob.on_append(heard.append)
    try:
        first = await append_seqs(ob, [ev(device=f"d{i}") for i in range(3)])
        assert first == [1, 2, 3]
        assert [(r.seq, r.event_id) for r in heard[-1]] == [(n, f"gw-test:{ob.install}:1:{n}") for n in (1, 2, 3)]
        big = await append_seqs(ob, [ev(device=f"b{i}") for i in range(5000)])  # more than one INSERT holds
        assert big == list(range(4, 5004)) and [r.seq for r in heard[-1]] == big
        stored = {r[0]: r[1] for r in await ob.connection.execute_fetchall("SELECT seq, payload FROM events")}
        assert all(json.loads(row.payload) == json.loads(stored[row.seq]) for row in heard[-1])
        await ob.connection.execute("DELETE FROM events WHERE seq >= 5000")  # the newest rows go
    finally:
        await ob.close()
    ob = await open_outbox(tmp_path)
    try:
        assert await append_seqs(ob, [ev()]) == [5004]  # as AUTOINCREMENT: a deleted seq is never given again
        # Another writer took the next seq: the append fails once, then goes on after it.
        await ob.connection.execute(
            "INSERT INTO events (seq, event_id, session, session_seq, kind, action, priority, wall, mono,"
            " clock_synced, payload) VALUES (5005, 'intruder', 0, 0, 'telemetry', 'reading', 0, 0, 0, 0, '{}')")
        with pytest.raises(sqlite3.IntegrityError):
            await ob.append([ev()])
        assert await append_seqs(ob, [ev()]) == [5006]
    finally:
        await ob.close()


async def _fill_for_eviction(ob: Outbox) -> dict[str, list[int]]:
    pad = "x" * 900  # rows of about a kilobyte, so pages follow rows
    groups = {
        "delivered_telemetry": [ev("telemetry", detail=pad) for _ in range(200)],
        "delivered_alarm": [ev("alarm", detail=pad) for _ in range(50)],
        "alarm": [ev("alarm", detail=pad) for _ in range(300)],  # older than the telemetry below
        "telemetry": [ev("telemetry", detail=pad) for _ in range(400)],
        "info": [ev("system", detail=pad) for _ in range(100)],
    }
    seqs = {name: await append_seqs(ob, events) for name, events in groups.items()}
    await ob.mark_delivered([(s, 1) for s in seqs["delivered_telemetry"] + seqs["delivered_alarm"]])
    return seqs


async def test_eviction_order_under_the_size_cap(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        seqs = await _fill_for_eviction(ob)
        used = await ob.used_bytes()
        # A cap at 55 % of what is stored: all delivered history goes, then the oldest undelivered telemetry.
        ob.limits = StorageLimits(max_bytes=int(used * 0.55), min_free_bytes=0)
        await ob.enforce_bounds()
        assert await ob.used_bytes() <= ob.limits.max_bytes
        counters = await ob.counters()
        assert counters["evicted.delivered.telemetry"] == 200
        assert counters["evicted.delivered.alarm"] == 50
        assert 0 < counters["evicted.undelivered.telemetry"] < 400
        assert "evicted.undelivered.alarm" not in counters and "evicted.undelivered.info" not in counters
        left = await seqs_where(ob, "kind = 'telemetry'")
        assert left == seqs["telemetry"][-len(left):], "telemetry must go oldest first"
        assert await seqs_where(ob, "kind = 'alarm'") == seqs["alarm"]

        # A cap far below the undelivered alarms: every lower class goes first, then alarms oldest first.
        ob.limits = StorageLimits(max_bytes=64 * 1024, min_free_bytes=0)
        await ob.enforce_bounds()
        counters = await ob.counters()
        assert counters["evicted.undelivered.telemetry"] == 400
        assert counters["evicted.undelivered.info"] == 100
        assert counters["evicted.undelivered.alarm"] > 0
        alarms = await seqs_where(ob, "kind = 'alarm'")
        assert alarms == seqs["alarm"][len(seqs["alarm"]) - len(alarms):], "alarms must go oldest first"
        stats = await ob.stats(now=NOW)
        assert stats["evicted_undelivered"]["telemetry"] == 400
        assert stats["evicted_delivered"] == {"telemetry": 200, "info": 0, "trouble": 0, "supervisory": 0,
                                              "alarm": 50}
    finally:
        await ob.close()
    reopened = await open_outbox(tmp_path)  # the counts are in the file
    try:
        assert (await reopened.counters())["evicted.undelivered.info"] == 100
    finally:
        await reopened.close()


async def test_low_disk_evicts_history_and_telemetry_but_no_alarm(tmp_path: Path) -> None:
    free = {"bytes": 10 * 1024 * MB}

    def disk_free(path: str) -> int:
        return free["bytes"]

    ob = await open_outbox(tmp_path, disk_free=disk_free, limits=StorageLimits(min_free_bytes=50 * MB))
    try:
        seqs = await _fill_for_eviction(ob)
        faults = await append_seqs(ob, [ev("fault", detail="y" * 900) for _ in range(20)])
        assert await ob.enforce_bounds() == {}
        free["bytes"] = 10 * MB  # another program filled the card: far below the watermark
        await ob.enforce_bounds()
        counters = await ob.counters()
        assert counters["evicted.delivered.telemetry"] == 200
        assert counters["evicted.undelivered.telemetry"] == 400
        assert counters["evicted.undelivered.info"] == 100
        assert await seqs_where(ob, "kind = 'alarm' AND delivered = 0") == seqs["alarm"]
        assert await seqs_where(ob, "kind = 'fault'") == faults
        cur = await ob.connection.execute("PRAGMA freelist_count")
        assert await cur.fetchone() == (0,), "freed pages go back to the filesystem"
    finally:
        await ob.close()


async def test_size_cap_holds_while_appending(tmp_path: Path) -> None:
    cap = 256 * 1024
    ob = await open_outbox(tmp_path, limits=StorageLimits(max_bytes=cap, min_free_bytes=0))
    try:
        await append_seqs(ob, [ev("alarm", detail="a" * 200) for _ in range(20)])
        for _ in range(60):
            await ob.append([ev("telemetry", detail="t" * 200) for _ in range(50)])
        assert await ob.used_bytes() <= cap * 1.25  # checked every ~32 KiB appended
        counters = await ob.counters()
        assert counters["evicted.undelivered.telemetry"] > 0
        assert len(await seqs_where(ob, "kind = 'alarm'")) == 20
    finally:
        await ob.close()


async def test_retention_deletes_old_history_counting_in_seconds(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path, limits=StorageLimits(history_s=30 * DAY_S, history_min_events=10))
    try:
        old = await append_seqs(ob, [ev(wall=NOW - 31 * DAY_S) for _ in range(100)])
        young = await append_seqs(ob, [ev(wall=NOW - 29 * DAY_S) for _ in range(100)])
        waiting = await append_seqs(ob, [ev(wall=NOW - 90 * DAY_S) for _ in range(5)])
        await ob.mark_delivered([(s, 1) for s in old], now=NOW - 31 * DAY_S + 60)
        await ob.mark_delivered([(s, 1) for s in young], now=NOW - 29 * DAY_S + 60)
        assert await ob.retain(now=NOW - 2 * DAY_S) == 0  # then nothing was 30 days old yet
        assert await ob.retain(now=NOW) == 100
        assert await seqs_where(ob, "1") == young + waiting, "undelivered events are never retired"
        assert (await ob.stats(now=NOW))["retired_history"] == 100
    finally:
        await ob.close()


async def test_retention_keeps_the_newest_999_whatever_their_age(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path, limits=StorageLimits(history_s=30 * DAY_S, history_min_events=999))
    try:
        seqs: list[int] = []
        for _ in range(6):
            seqs += await append_seqs(ob, [ev(wall=NOW - 60 * DAY_S) for _ in range(200)])
        await ob.mark_delivered([(s, 1) for s in seqs], now=NOW - 60 * DAY_S)
        assert await ob.retain(now=NOW) == 1200 - 999
        assert await seqs_where(ob, "1") == seqs[-999:]
    finally:
        await ob.close()


async def test_maintenance_retires_bounds_and_checkpoints(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path, limits=StorageLimits(history_s=30 * DAY_S, history_min_events=1,
                                                          min_free_bytes=0))
    try:
        old = await append_seqs(ob, [ev(wall=NOW - 40 * DAY_S) for _ in range(20)])
        await ob.mark_delivered([(s, 1) for s in old], now=NOW - 40 * DAY_S)
        await append_seqs(ob, [ev("alarm", wall=NOW)])
        assert await ob.maintain(now=NOW) == {"retired": 19}
        assert len(await seqs_where(ob, "1")) == 2
    finally:
        await ob.close()


async def test_stats_for_the_status_display(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    try:
        delivered = await append_seqs(ob, [ev(wall=NOW - 100)])
        await append_seqs(ob, [ev("alarm", wall=NOW - 50), ev(wall=NOW - 40), ev(wall=NOW - 30)])
        await ob.mark_delivered([(delivered[0], 1)])
        await ob.record_dropped({"telemetry": 7})
        stats = await ob.stats(now=NOW)
        assert stats["backlog"] == 3
        assert stats["backlog_by_class"] == {"telemetry": 2, "alarm": 1}
        assert stats["oldest_undelivered_age_s"] == pytest.approx(50.0)
        assert stats["history"] == 1
        assert stats["dropped_in_memory"]["telemetry"] == 7
        assert stats["db_bytes"] > 0 and 0 < stats["used_bytes"] <= stats["db_bytes"]
        assert stats["recovered_from"] is None and stats["session"] == 1
    finally:
        await ob.close()


def _fault_rows(path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(path)
    try:
        return [json.loads(p) for (p,) in con.execute("SELECT payload FROM events WHERE kind = 'fault' ORDER BY seq")]
    finally:
        con.close()


async def test_a_garbage_file_is_moved_aside_and_a_fault_stored(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    garbage = b"this is not an SQLite database\n" * 200
    db.write_bytes(garbage)
    (tmp_path / "events.db.session").write_text("7\n")
    ob = await open_outbox(tmp_path)
    try:
        assert ob.session == 8, "a replaced file continues the session counter"
        assert ob.recovered_from is not None
        moved = Path(ob.recovered_from)
        assert re.fullmatch(r"events\.db\.corrupt-\d{8}T\d{6}Z", moved.name)
        assert moved.read_bytes() == garbage
        await ob.append([ev()])
    finally:
        await ob.close()
    faults = _fault_rows(db)
    assert len(faults) == 1
    assert faults[0]["code"] == "storage_corrupt" and faults[0]["action"] == "detected"
    assert faults[0]["event_id"] == f"gw-test:{ob.install}:8:1"


def _corrupt_index(db: Path, index: str) -> None:
    con = sqlite3.connect(db)
    try:
        (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
        (page_size,) = con.execute("PRAGMA page_size").fetchone()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(os.urandom(page_size))


async def test_a_corrupt_index_is_detected_and_undelivered_rows_carried_over(tmp_path: Path) -> None:
    ob = await open_outbox(tmp_path)
    ids = await ob.append([ev(device=f"gas-{i}") for i in range(300)])
    delivered = (await seqs_where(ob, "1"))[:100]
    await ob.mark_delivered([(s, 1) for s in delivered])
    await ob.close()
    _corrupt_index(tmp_path / "events.db", "events_device")
    ob = await open_outbox(tmp_path)
    try:
        assert ob.recovered_from is not None and os.path.exists(ob.recovered_from)
        rows = await ob.pending(limit=1000)
        assert [r.event_id for r in rows[:-1]] == ids[100:], "undelivered rows keep their ids and order"
        assert rows[-1].kind == "fault" and "200 undelivered events recovered" in rows[-1].payload
        cur = await ob.connection.execute("PRAGMA integrity_check")
        assert await cur.fetchall() == [("ok",)]
    finally:
        await ob.close()


async def test_failure_kinds_from_real_errors(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, timeout=0.01)
    errors: dict[str, Callable[[], Any]] = {
        "busy": lambda: other.execute("INSERT INTO t VALUES (1)"),
        "corrupt": lambda: sqlite3.connect(tmp_path / "garbage").execute("SELECT * FROM sqlite_master"),
    }
    (tmp_path / "garbage").write_bytes(b"not a database" * 100)
    try:
        for expected, fail in errors.items():
            with pytest.raises(sqlite3.Error) as info:
                fail()
            assert failure_kind(info.value) == expected
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        other.close()
    full = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    full.execute("CREATE TABLE t (x)")
    (pages,) = full.execute("PRAGMA page_count").fetchone()
    full.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.Error) as info:
        full.execute("INSERT INTO t VALUES (?)", ("z" * 100_000,))
    assert failure_kind(info.value) == "full"
    full.close()


async def test_the_outbox_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    """SQLite's default page cache (2 MiB) fills as the file grows and is never given back: the outbox sets
    its own, and keeps it when it reconnects after a replaced file."""
    from gateway.uplink.outbox import CACHE_KIB

    ob = await open_outbox(tmp_path)
    try:
        cur = await ob.connection.execute("PRAGMA cache_size")
        assert (await cur.fetchone()) == (-CACHE_KIB,)
        assert CACHE_KIB < 2000
    finally:
        await ob.close()


async def test_batches_of_every_size_compile_no_new_statements(tmp_path: Path) -> None:
    """SQLite keeps each distinct statement text compiled in the connection's cache (128 of them). Batches of
    60 sizes, once the page cache is full, must not grow what SQLite holds: one INSERT text per size held
    3.8 MB more (the storage process grew for an hour in the soak)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("sqlite3")
    lib = ctypes.CDLL(name) if name else None
    if lib is None:
        pytest.skip("libsqlite3 not found")
    lib.sqlite3_libversion.restype = ctypes.c_char_p
    if lib.sqlite3_libversion().decode() != sqlite3.sqlite_version:
        pytest.skip("the sqlite3 module does not use the shared libsqlite3")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    ob = await open_outbox(tmp_path)
    try:
        for _ in range(300):  # fill the page cache to its bound first
            await ob.append([ev() for _ in range(30)])
        before = lib.sqlite3_memory_used()
        for size in range(2, 62):
            await ob.append([ev() for _ in range(size)])
        grown = lib.sqlite3_memory_used() - before
    finally:
        await ob.close()
    assert grown < 512 * 1024, f"SQLite holds {grown / 1024:.0f} KiB more after 60 batch sizes"



async def test_a_batch_of_any_size_stores_exactly_its_rows_in_order(tmp_path: Path) -> None:
    """Batches are written with a few fixed INSERT sizes, padded with NULL rows: none of the padding is stored,
    every row is, and a batch larger than the largest size is cut into pieces of one transaction."""
    ob = await open_outbox(tmp_path)
    try:
        ids: list[str] = []
        for size in (1, 2, 7, 8, 9, 33, 128, 129, 300):
            ids += await ob.append([ev() for _ in range(size)])
        rows = await ob.pending(limit=10_000)
    finally:
        await ob.close()
    assert [r.event_id for r in rows] == ids and len(ids) == 617
    assert [r.seq for r in rows] == list(range(rows[0].seq, rows[0].seq + 617))
    assert all(json.loads(r.payload)["event_id"] == r.event_id for r in rows)
