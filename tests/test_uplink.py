"""The uplink against a real mosquitto: order, the in-flight window, PUBACK reason codes, disconnects,
a broker that stops answering, the stop flush and rows left by a crash.

The outbox is a real SQLite file; the broker is stopped (SIGSTOP), killed (SIGKILL) and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import ConfigError, MqttConfig, parse_config
from gateway.events import Event
from gateway.uplink.mqtt import COMMAND_QOS, Uplink
from gateway.uplink.outbox import Outbox
from gateway.uplink.retry import URGENT_RETRY_MAX_S
from gateway.uplink.topics import Topics
from gateway.uplink.transport import event_window
from tests.support.broker import MosquittoBroker, frozen
from tests.support.building import eventually
from tests.support.mqtt import RecordedMessage
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

TOPICS = Topics("safety", "c1", "b1")
EVENTS = f"{TOPICS.base}/event/#"


# ------------------------------------------------------------------------------------------- helpers


class PersistentBroker(MosquittoBroker):
    """mosquitto that keeps client sessions across restarts (saved at exit and on :meth:`save`).

    A subscriber with a persistent session then gets every message published while it was away, so a test
    can restart the broker without racing the publisher's reconnect against the subscriber's.
    """

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text(encoding="utf-8").replace("persistence false\n", "")
        text += (f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 0\n"
                 "max_queued_messages 0\n")
        self.config_path.write_text(text, encoding="utf-8")

    @property
    def store(self) -> Path:
        return self.workdir / "mosquitto.db"

    def save(self) -> None:
        """Write the session store now (SIGUSR1) and wait for it."""
        self.store.unlink(missing_ok=True)
        assert self.pid is not None
        os.kill(self.pid, signal.SIGUSR1)
        wait_until(self.store.exists, timeout=10, message="mosquitto did not save its sessions")


class SessionRecorder:
    """A subscriber with a persistent session (MQTT 3.1.1, clean session off) recording JSON bodies."""

    def __init__(self, broker: MosquittoBroker, topic: str = EVENTS, client_id: str = "session-recorder") -> None:
        self._cond = threading.Condition()
        self.bodies: list[dict[str, Any]] = []
        self._subscribed = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=False)
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, props: Any) -> None:
            with self._cond:
                self._subscribed = True
                self._cond.notify_all()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._cond:
                self.bodies.append(json.loads(msg.payload))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect_async(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._subscribed, timeout=30), "recorder did not subscribe"

    def received(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.bodies)

    def wait_ids(self, ids: set[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: ids <= {b["event_id"] for b in self.bodies}, timeout=timeout)
            missing = ids - {b["event_id"] for b in self.bodies}
        assert ok, f"{len(missing)} of {len(ids)} events never arrived, e.g. {sorted(missing)[:5]}"
        return self.received()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def ev(kind: str = "telemetry", n: int = 0) -> Event:
    return Event(kind, "reading" if kind == "telemetry" else "raised", time.monotonic(), device=f"gas-{n % 3}",
                 value=float(n), wall=time.time())


def bodies(messages: list[RecordedMessage]) -> list[dict[str, Any]]:
    return [m.json for m in messages]


@contextlib.asynccontextmanager
async def forwarding(
    tmp_path: Path, broker: MosquittoBroker, *, protocol: int = 5, max_inflight: int = 8, start: bool = True,
    keepalive_s: int = 10, hosts: tuple[str, ...] = (), **kwargs: Any,
) -> AsyncIterator[tuple[Outbox, Uplink]]:
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    cfg = MqttConfig(host=broker.host, port=broker.port, client_id="gw-test", protocol=protocol,  # type: ignore[arg-type]
                     max_inflight=max_inflight, keepalive_s=keepalive_s, hosts=hosts)
    kwargs.setdefault("connect_timeout_s", 1.0)
    up = Uplink(cfg, ob, TOPICS, **kwargs)
    task = asyncio.create_task(up.run())
    try:
        if start:
            await eventually(lambda: up.connected, timeout=30, message="uplink never connected")
        yield ob, up
    finally:
        await up.stop(flush_timeout_s=0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


async def undelivered(ob: Outbox) -> int:
    return (await ob.backlog())[0]


async def all_delivered(ob: Outbox, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while await undelivered(ob):
        assert time.monotonic() < deadline, f"{await undelivered(ob)} events never marked delivered"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------- tests


async def test_forwards_in_order_and_flags_replayed_events(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    early = await ob.append([ev("alarm", 0), ev("telemetry", 1)])  # stored while no uplink ran
    await ob.close()
    async with forwarding(tmp_path, broker) as (ob, up):
        ids = list(early)
        for batch in range(10):
            ids += await ob.append([ev("alarm" if i % 7 == 0 else "telemetry", i) for i in range(30 * batch,
                                                                                             30 * batch + 30)])
        got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, len(ids), 60))
        await all_delivered(ob)
    assert [b["event_id"] for b in got] == ids, "one copy of each, in stored order"
    assert [b["historical"] for b in got[:2]] == [True, True], "stored before the uplink ran"
    assert not any(b["historical"] for b in got[2:]), "sent live"
    assert got[2]["kind"] == "alarm" and recorder.messages(EVENTS)[2].topic == f"{TOPICS.base}/event/alarm"
    assert up.delivered_total == len(ids)


async def test_rows_committed_during_a_fetch_go_out_once_in_order_without_a_read_back(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    ids = await ob.append([ev("telemetry", i) for i in range(20)])  # stored before the uplink: it fetches them
    await ob.close()
    read_back: list[int] = []
    async with forwarding(tmp_path, broker, start=False) as (ob, up):
        real_pending = ob.pending

        async def pending(**kwargs: Any) -> list[Any]:
            rows = await real_pending(**kwargs)
            read_back.extend(r.seq for r in rows)
            if len(ids) == 20:  # the first fetch: more rows are committed before it is handed over
                ids.extend(await ob.append([ev("alarm", 100)]))
                ids.extend(await ob.append([ev("telemetry", i) for i in range(101, 110)]))
            return rows

        ob.pending = pending  # type: ignore[method-assign]  # before the uplink's task first runs
        got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 30, 60))
        await all_delivered(ob)
        assert up.delivered_total == 30
    assert len(ids) == 30 and [b["event_id"] for b in got] == ids, "each once, in stored order"
    assert sorted(read_back) == list(range(1, 21)), "the rows committed during the fetch were not read back"


async def test_the_in_flight_window_is_bounded_and_each_row_waits_for_its_own_puback(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    async with forwarding(tmp_path, broker, max_inflight=8) as (ob, up):
        with frozen(broker):
            ids = await ob.append([ev("telemetry", i) for i in range(50)])
            await eventually(lambda: up.inflight == 8, timeout=10)
            await asyncio.sleep(0)  # let the forwarding loop look for room once more: there is none
            assert up.inflight == 8
            assert await undelivered(ob) == 50, "nothing is delivered without its PUBACK"
        got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 50, 60))
        await all_delivered(ob)
    assert [b["event_id"] for b in got] == ids


async def test_the_window_stays_within_the_brokers_receive_maximum(
    tmp_path: Path, mqtt_recorder_factory: Any
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", max_inflight_messages=12).start()  # CONNACK: receive max 12
    try:
        recorder = mqtt_recorder_factory(broker, EVENTS)
        async with forwarding(tmp_path, broker, max_inflight=32) as (ob, up):
            assert up.transport.window_limit == event_window(32, 12) == 9  # 3 kept for status and command results
            with frozen(broker):
                ids = await ob.append([ev("telemetry", i) for i in range(40)])
                await eventually(lambda: up.inflight == 9, timeout=10)
                await asyncio.sleep(0)
                assert up.inflight == 9
            got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 40, 60))
            await all_delivered(ob)
        assert [b["event_id"] for b in got] == ids
    finally:
        broker.stop()
    assert event_window(32, None) == 32 and event_window(32, 65_535) == 32 and event_window(32, 1) == 1


async def test_a_refused_puback_keeps_the_row_and_it_is_sent_again(
    tmp_path: Path, mqtt_recorder_factory: Any
) -> None:
    acl = tmp_path / "acl"
    allowed = ["availability", "birth", "status", "command/#", "event/telemetry"]
    acl.write_text("".join(f"topic readwrite {TOPICS.base}/{t}\n" for t in allowed) + "topic read safety/#\n")
    broker = MosquittoBroker(tmp_path / "broker", acl_file=acl).start()
    try:
        recorder = mqtt_recorder_factory(broker, EVENTS)
        async with forwarding(tmp_path, broker) as (ob, up):
            up.forwarder.rejected_retry_s = 0.3
            first, alarm, last = await ob.append([ev("telemetry", 1), ev("alarm", 2), ev("telemetry", 3)])
            await asyncio.to_thread(recorder.wait_for_count, None, 2, 30)
            await eventually(lambda: up.rejected_total >= 2, timeout=30, message="the refusal was not retried")
            await eventually(lambda: up.delivered_total == 2, timeout=30)
            await up.acks.flush()
            cur = await ob.connection.execute("SELECT event_id FROM events WHERE delivered = 0")
            assert await cur.fetchall() == [(alarm,)], "0x87 not authorized is not a delivery"
            acl.write_text(acl.read_text() + f"topic write {TOPICS.base}/event/alarm\n")
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads its ACL
            got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 3, 30))
            await all_delivered(ob)
    finally:
        broker.stop()
    assert [b["event_id"] for b in got] == [first, last, alarm], "rows behind a refused one are not held back"
    assert got[2]["historical"] is True


async def test_no_matching_subscribers_is_a_successful_puback(tmp_path: Path, broker: MosquittoBroker) -> None:
    async with forwarding(tmp_path, broker) as (ob, up):
        await ob.append([ev("telemetry", i) for i in range(5)])
        await all_delivered(ob)  # MQTT 5 answers 0x10 "no matching subscribers": below 0x80, a success
        assert up.rejected_total == 0


async def test_mqtt_311_forwards_too(tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    async with forwarding(tmp_path, broker, protocol=311) as (ob, _):
        ids = await ob.append([ev("alarm", 1), ev("telemetry", 2)])
        got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 2, 30))
        await all_delivered(ob)
    assert [b["event_id"] for b in got] == ids


async def test_a_disconnect_means_outcome_unknown_and_the_same_ids_go_again(tmp_path: Path) -> None:
    broker = PersistentBroker(tmp_path / "broker").start()
    recorder = SessionRecorder(broker)
    try:
        broker.save()  # the recorder's session survives the kill below
        async with forwarding(tmp_path, broker, ack_timeout_s=600.0) as (ob, up):
            with frozen(broker):
                ids = await ob.append([ev("telemetry", i) for i in range(20)])
                await eventually(lambda: up.inflight == 8, timeout=10)
                broker.kill()
                # The PUBACK wait wakes on the disconnect itself, not on the (600 s) ack timeout.
                await eventually(lambda: not up.connected and up.inflight == 0, timeout=20)
            assert up.forwarder.outcome_unknown_total >= 8
            assert await undelivered(ob) == 20
            broker.start()
            got = await asyncio.to_thread(recorder.wait_ids, set(ids), 60)
            await all_delivered(ob)
            assert up.resent_total >= 8
    finally:
        recorder.close()
        broker.stop()
    assert [b["event_id"] for b in got] == ids
    # The 8 in flight when the broker died may have reached it: sent again, historical. The 12 queued behind them
    # were never sent before: this session's events, live, however long they waited (age_s says how long).
    assert [b["historical"] for b in got] == [True] * 8 + [False] * 12


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_a_broker_that_never_answers_connect_is_retried(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    with frozen(broker):
        async with forwarding(tmp_path, broker, start=False) as (ob, up):
            ids = await ob.append([ev("alarm", 1)])
            await eventually(lambda: up.last_error is not None and "connect" in up.last_error, timeout=20)
            assert up.connections == 0 and not up.connected
            os.kill(broker.pid or 0, signal.SIGCONT)
            got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 1, 60))
            await all_delivered(ob)
    assert got[0]["event_id"] == ids[0]


async def test_a_broker_that_stops_acknowledging_is_left_and_the_rows_sent_again(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    async with forwarding(tmp_path, broker, ack_timeout_s=1.0) as (ob, up):
        with frozen(broker):
            ids = await ob.append([ev("telemetry", i) for i in range(5)])
            await eventually(lambda: up.forwarder.outcome_unknown_total >= 5, timeout=20,
                             message="the uplink kept waiting on a broker that does not answer")
            assert up.last_error is not None
        for event_id in ids:  # duplicates (same id) are allowed: the stalled broker may wake up with them
            await asyncio.to_thread(recorder.wait_for, lambda m, i=event_id: m.json.get("event_id") == i, 60)
        await all_delivered(ob)
    assert {m.json["event_id"] for m in recorder.messages(EVENTS)} == set(ids)


async def test_an_idle_link_is_kept_alive_by_pings_from_the_loop(tmp_path: Path, broker: MosquittoBroker) -> None:
    """paho's network I/O runs on the asyncio loop, so must its keepalive: without PINGREQs the broker drops an
    idle link after 1.5 × keepalive."""
    async with forwarding(tmp_path, broker, keepalive_s=1) as (ob, up):
        await eventually(lambda: broker.log_since_ready().count("Received PINGREQ from gw-test") >= 3, timeout=30,
                         message="no keepalive pings reached the broker")
        assert up.connected and up.connections == 1
        ids = await ob.append([ev("alarm", 1)])
        await all_delivered(ob)
    assert "Client gw-test has exceeded timeout" not in broker.log_since_ready()
    assert ids


async def test_a_failure_while_reading_the_socket_drops_the_link_and_loses_nothing(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    """An exception out of paho or a callback it runs (here: building the next payload while a PUBACK is read)
    ends the connection instead of leaving a half-handled window behind; the rows go out on the next one."""
    recorder = mqtt_recorder_factory(broker, EVENTS)
    failed: list[int] = []
    async with forwarding(tmp_path, broker, max_inflight=4, start=False) as (ob, up):
        wire = up.forwarder.wire_payload

        def failing_once_inside_a_read(row: Any, resend: bool = False) -> str:
            if not failed and any(frame.function == "loop_read" for frame in inspect.stack(0)):
                failed.append(row.seq)
                raise RuntimeError("injected")
            return wire(row, resend)

        up.forwarder.wire_payload = failing_once_inside_a_read  # type: ignore[method-assign]
        ids = await ob.append([ev("telemetry", i) for i in range(20)])
        await all_delivered(ob)
        assert failed, "the failure was never injected"
        assert up.connections >= 2 and "connection handling failed" in str(up.last_error), up.last_error
    for event_id in ids:
        await asyncio.to_thread(recorder.wait_for, lambda m, i=event_id: m.json.get("event_id") == i, 60)


async def test_stop_flushes_the_backlog_before_saying_offline(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, f"{TOPICS.base}/#")
    async with forwarding(tmp_path, broker, max_inflight=32) as (ob, up):
        # (fewer than mosquitto queues for one subscriber by default: 1000)
        ids = await ob.append([ev("telemetry", i) for i in range(800)])
        await up.stop(flush_timeout_s=30)
        assert await undelivered(ob) == 0
    offline = await asyncio.to_thread(
        recorder.wait_for, lambda m: m.topic == TOPICS.availability and m.json.get("state") == "offline", 30)
    events = recorder.messages(EVENTS)
    assert [m.json["event_id"] for m in events] == ids
    assert events[-1].index < offline.index


async def test_rows_left_in_flight_by_a_crash_are_sent_again_on_start(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    db = tmp_path / "events.db"
    ob = await Outbox.open(str(db), gateway_id="gw-test")
    ids = await ob.append([ev("alarm", i) for i in range(10)])
    await ob.close()
    con = sqlite3.connect(db)  # as a kill -9 leaves them: sent (attempted) but never acknowledged
    con.execute("UPDATE events SET attempts = 1")
    con.commit()
    con.close()
    async with forwarding(tmp_path, broker) as (ob, _):
        assert ob.session == 2
        got = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 10, 30))
        await all_delivered(ob)
    assert [b["event_id"] for b in got] == ids
    assert all(b["historical"] and b["session"] == 1 for b in got)


async def test_a_replaced_database_restarts_the_forwarding_cursor(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    recorder = mqtt_recorder_factory(broker, EVENTS)
    async with forwarding(tmp_path, broker) as (ob, _):
        await ob.append([ev("telemetry", i) for i in range(10)])
        await asyncio.to_thread(recorder.wait_for_count, None, 10, 30)
        assert await ob.recover(sqlite3.DatabaseError("database disk image is malformed"))
        fault = await asyncio.to_thread(recorder.wait_for, lambda m: m.json.get("code") == "storage_corrupt", 30)
        ids = await ob.append([ev("alarm", 11)])
        after = await asyncio.to_thread(recorder.wait_for, lambda m: m.json.get("event_id") == ids[0], 30)
        await all_delivered(ob)
    assert fault.json["session"] == 2 and fault.index < after.index


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_a_broker_that_drops_every_connection_at_once_gets_no_reconnect_storm(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Another client with our id keeps taking the session over: the uplink backs off instead of hammering."""
    rival = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gw-test", protocol=mqtt.MQTTv5)
    rival.reconnect_delay_set(min_delay=0.05, max_delay=0.05)
    async with forwarding(tmp_path, broker) as (_ob, up):
        rival.connect(broker.host, broker.port)
        rival.loop_start()
        try:
            await eventually(lambda: up.connections >= 2, timeout=30, message="the uplink never came back")
            first = up.connections
            window_end = time.monotonic() + 6.0
            while time.monotonic() < window_end:
                await asyncio.sleep(0.1)
            # 1 s, 2 s, 4 s … between attempts: a handful of connections, not one per rival reconnect (~100)
            assert up.connections - first <= 5, up.connections - first
        finally:
            rival.loop_stop()
            rival.disconnect()


# ------------------------------------------------------------------------------------------- age and return


async def test_an_alarm_raised_before_the_first_connection_is_live_and_says_how_old_it_is(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    """``historical`` is for copies sent again and earlier sessions only: a server that mutes historical events
    must still hear the alarm raised at boot while the link was not up yet. ``age_s`` says how long it waited."""
    recorder = mqtt_recorder_factory(broker, EVENTS)
    with frozen(broker):  # the link does not come up: CONNECT is never answered
        async with forwarding(tmp_path, broker, start=False) as (ob, up):
            [alarm_id] = await ob.append([ev("alarm", 1)])
            appended = time.monotonic()
            await eventually(lambda: up.last_error is not None and "connect" in up.last_error, timeout=30,
                             message="no connection attempt failed")
            waited = time.monotonic() - appended  # the alarm waited at least this long for a link
            os.kill(broker.pid or 0, signal.SIGCONT)
            [alarm] = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 1, 60))
            await all_delivered(ob)
            assert up.connections == 1
    assert alarm["event_id"] == alarm_id and alarm["session"] == ob.session
    assert alarm["historical"] is False, "raised in this session and sent for the first time: live"
    assert alarm["age_s"] >= waited
    assert alarm["sent"] >= alarm["time"]


@pytest.mark.slow  # a broker away long enough for the long backoff (about 12 s)
async def test_an_alarm_reaches_a_returning_broker_without_waiting_out_the_long_backoff(tmp_path: Path) -> None:
    """The broker goes away long enough for the backoff to grow past 5 s; an alarm raised then cuts the wait to
    at most 5 s and every wait while it is undelivered stays within 5 s; it is delivered once the broker is back.
    The delays are the ones the uplink chose (``retry_delays``), not times measured by the test."""
    broker = PersistentBroker(tmp_path / "broker")
    broker.start()
    recorder = SessionRecorder(broker)
    try:
        broker.save()  # the recorder's session survives the restart: it gets what is published after it
        async with forwarding(tmp_path, broker) as (ob, up):
            broker.stop()
            await eventually(lambda: not up.connected, timeout=30)
            # wait until the uplink has chosen a wait longer than 5 s (today's 1, 2, 4, 8 s … backoff)
            await eventually(lambda: any(d.delay_s > URGENT_RETRY_MAX_S for d in up.retry_delays), timeout=60,
                             message="the backoff never grew past 5 s")
            assert not any(d.urgent for d in up.retry_delays), "nothing urgent waited yet"
            long_wait = up.retry_delays[-1]
            assert long_wait.delay_s > URGENT_RETRY_MAX_S
            [alarm_id] = await ob.append([ev("alarm", 1)])
            await eventually(lambda: any(d.urgent for d in up.retry_delays), timeout=30,
                             message="the alarm did not shorten the wait")
            broker.start()
            got = await asyncio.to_thread(recorder.wait_ids, {alarm_id}, 60)
            await all_delivered(ob)
            after = [d for d in up.retry_delays if d.chosen_at >= long_wait.chosen_at][1:]
    finally:
        recorder.close()
        broker.stop()
    assert after and all(d.urgent for d in after), after
    assert all(d.delay_s <= URGENT_RETRY_MAX_S for d in after), after
    assert after[0].chosen_at == long_wait.chosen_at, "the wait under way was cut short, not waited out"
    assert [b["event_id"] for b in got if b["event_id"] == alarm_id] == [alarm_id]


@pytest.mark.slow  # a broker flapping for about 13 s
async def test_an_alarm_raised_as_the_broker_goes_keeps_every_retry_within_5_s(tmp_path: Path) -> None:
    """Stop the broker, raise an alarm, let the uplink retry past the point where today's backoff exceeds 5 s,
    start the broker again on the same port: the alarm is delivered, and every wait the uplink chose while it
    waited was at most 5 s although the backoff alone would have chosen more."""
    broker = PersistentBroker(tmp_path / "broker")
    broker.start()
    recorder = SessionRecorder(broker)
    try:
        broker.save()
        async with forwarding(tmp_path, broker) as (ob, up):
            broker.stop()
            await eventually(lambda: not up.connected, timeout=30)
            [alarm_id] = await ob.append([ev("alarm", 1)])
            raised = time.monotonic()
            await eventually(lambda: any(d.backoff_s > URGENT_RETRY_MAX_S for d in up.retry_delays), timeout=90,
                             message="the uplink never got past the point where the backoff exceeds 5 s")
            port = broker.port
            broker.start()
            assert broker.port == port
            got = await asyncio.to_thread(recorder.wait_ids, {alarm_id}, 60)
            await all_delivered(ob)
            delays = list(up.retry_delays)
    finally:
        recorder.close()
        broker.stop()
    assert [b["event_id"] for b in got if b["event_id"] == alarm_id] == [alarm_id]
    before = [d for d in delays if d.chosen_at < raised]
    after = [d for d in delays if d.chosen_at >= raised]
    assert after and all(d.urgent and d.delay_s <= URGENT_RETRY_MAX_S for d in after), delays
    assert any(d.backoff_s > URGENT_RETRY_MAX_S for d in after), delays
    # the wait under way when the alarm came was short already, or was cut to 5 s from its start
    assert before[-1].delay_s <= URGENT_RETRY_MAX_S or any(
        d.chosen_at == before[-1].chosen_at and d.urgent for d in delays), delays


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_without_anything_urgent_the_backoff_is_todays(tmp_path: Path, broker: MosquittoBroker) -> None:
    async with forwarding(tmp_path, broker) as (ob, up):
        broker.stop()
        await ob.append([ev("telemetry", i) for i in range(5)])
        await eventually(lambda: any(d.delay_s > URGENT_RETRY_MAX_S for d in up.retry_delays), timeout=60,
                         message="the backoff never grew past 5 s")
        delays = list(up.retry_delays)
    assert not any(d.urgent for d in delays), "telemetry alone is not urgent"
    for i, d in enumerate(delays):  # 1 s doubling, each ×0.8–1.2, within [1, 60]
        assert max(1.0, 0.8 * 2**i) <= d.delay_s <= min(60.0, 1.2 * 2**i), (i, delays)


async def test_an_event_of_an_earlier_session_of_this_boot_is_aged_by_the_monotonic_clock(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    """The storage process restarted (a new session) without a reboot: its earlier events are historical, and
    their age still comes from the monotonic clock — not from a wall clock that NTP may have moved meanwhile."""
    recorder = mqtt_recorder_factory(broker, EVENTS)
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    detected = time.monotonic() - 100.0  # a hundred seconds ago, by the clock that does not jump
    wrong_wall = time.time() - 86_400.0  # the wall clock read a day behind then (no RTC, before NTP)
    [event_id] = await ob.append([Event("alarm", "raised", detected, device="gas-1", unit="u1", level="high",
                                        wall=wrong_wall)])
    await ob.close()
    async with forwarding(tmp_path, broker) as (ob, _):
        assert ob.session == 2 and ob.sessions_this_boot >= {1, 2}
        [alarm] = bodies(await asyncio.to_thread(recorder.wait_for_count, None, 1, 30))
        await all_delivered(ob)
    assert alarm["event_id"] == event_id and alarm["historical"] is True, "from an earlier session"
    assert 100.0 <= alarm["age_s"] < 86_400.0, alarm["age_s"]


# ------------------------------------------------------------------- several nodes of one cluster (mqtt.hosts)


def node(broker: MosquittoBroker) -> str:
    return f"{broker.host}:{broker.port}"


@pytest.fixture
def two_brokers(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, MosquittoBroker]]:
    """Two mosquittos on free ports, standing in for two nodes of one cluster."""
    first, second = MosquittoBroker(tmp_path / "node1"), MosquittoBroker(tmp_path / "node2")
    first.start()
    try:
        second.start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def drop_link(up: Uplink) -> None:
    """The network under the uplink's connection fails: the socket is shut down, no DISCONNECT is sent."""
    client = up.transport.client
    assert client is not None
    sock = client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("protocol", [5, 4])
async def test_commands_are_subscribed_at_qos_0_on_every_connection(tmp_path: Path, broker: MosquittoBroker,
                                                                   protocol: int) -> None:
    """The command subscription asks for QoS 0 (``COMMAND_QOS``: a clean session keeps nothing across a lost
    connection, and on a cluster QoS 1 costs a replicated consumer per building); the broker grants it, on
    the first connection and again after the link failed."""
    assert COMMAND_QOS == 0
    async with forwarding(tmp_path, broker, protocol=protocol) as (_ob, up):
        await eventually(lambda: up.command_subscription == [0], timeout=30,
                         message=lambda: f"SUBACK {up.command_subscription}")
        up.command_subscription = []
        drop_link(up)
        await eventually(lambda: up.connected and up.command_subscription == [0], timeout=60,
                         message=lambda: f"SUBACK after reconnecting: {up.command_subscription}")
        assert up.subscriptions_refused == 0


async def test_an_alarm_waiting_when_its_node_goes_away_arrives_through_the_next_node(
    tmp_path: Path, two_brokers: tuple[MosquittoBroker, MosquittoBroker], mqtt_recorder_factory: Any
) -> None:
    """Stop the node the uplink is on while an alarm waits: the next attempt goes to the second node at once, the
    alarm arrives there, and every wait chosen meanwhile was within 5 s and aimed at the second node."""
    first, second = two_brokers
    recorder = mqtt_recorder_factory(second, EVENTS)
    async with forwarding(tmp_path, first, hosts=(node(first), node(second))) as (ob, up):
        assert up.broker == node(first)
        assert [(a.node, a.connected) for a in up.transport.attempts] == [(node(first), True)]
        assert not up.retry_delays
        first.stop()
        await eventually(lambda: not up.connected or up.broker == node(second), timeout=30,  # it may be there at once
                         message="the uplink did not see its node go")
        [alarm_id] = await ob.append([ev("alarm", 1)])
        [got] = await asyncio.to_thread(recorder.wait_for_count, lambda m: m.json["event_id"] == alarm_id, 1, 30)
        await all_delivered(ob)
        assert up.connected and up.broker == node(second)
        attempts, delays = list(up.transport.attempts)[1:], list(up.retry_delays)
    assert got.json["kind"] == "alarm"
    assert attempts and attempts[0].node == node(second) and attempts[0].connected, attempts
    assert all(a.node == node(second) for a in attempts), "never back to the stopped node first"
    assert delays and all(d.delay_s <= URGENT_RETRY_MAX_S and d.node == node(second) for d in delays), delays
    assert delays[0].delay_s == 0.0, "the first attempt after the loss goes to the next node at once"


@pytest.mark.slow
async def test_nodes_are_tried_in_turn_and_the_waits_stay_within_5_s_while_an_alarm_waits(
    tmp_path: Path, two_brokers: tuple[MosquittoBroker, MosquittoBroker], mqtt_recorder_factory: Any
) -> None:
    """Both nodes down: each failed attempt moves to the other node, every wait while the alarm waits is at most
    5 s though the backoff alone grows past it, and the alarm arrives through whichever node returns."""
    first, second = two_brokers
    async with forwarding(tmp_path, first, hosts=(node(first), node(second))) as (ob, up):
        first.stop()
        second.stop()
        await eventually(lambda: not up.connected, timeout=30)
        [alarm_id] = await ob.append([ev("alarm", 2)])
        raised = time.monotonic()
        await eventually(lambda: any(d.backoff_s > URGENT_RETRY_MAX_S for d in up.retry_delays), timeout=90,
                         message="the backoff never grew past 5 s")
        second.start()
        recorder = mqtt_recorder_factory(second, EVENTS)
        await asyncio.to_thread(recorder.wait_for_count, lambda m: m.json["event_id"] == alarm_id, 1, 60)
        await all_delivered(ob)
        attempts = [a for a in up.transport.attempts if a.started_at >= raised]
        delays = [d for d in up.retry_delays if d.chosen_at >= raised]
    assert up.broker == node(second)
    failed = [a for a in attempts if not a.connected]
    assert len(failed) >= 3, attempts
    assert all(b.node != a.node for a, b in itertools.pairwise(failed)), "each failed attempt moves on"
    assert attempts[-1].connected and attempts[-1].node == node(second)
    assert all(d.urgent and d.delay_s <= URGENT_RETRY_MAX_S for d in delays), delays
    assert any(d.backoff_s > URGENT_RETRY_MAX_S for d in delays), delays


async def test_the_will_birth_and_availability_go_to_the_node_connected(
    tmp_path: Path, two_brokers: tuple[MosquittoBroker, MosquittoBroker], mqtt_recorder_factory: Any
) -> None:
    """On each node in turn: the retained ``online`` and birth are there, and when the link fails the node
    publishes the Will, so every connection carried it."""
    first, second = two_brokers
    watched = [TOPICS.availability, TOPICS.birth]
    births = 0

    def birth() -> dict[str, Any]:
        nonlocal births
        births += 1
        return {"gateway": "gw-test", "births": births}

    async with forwarding(tmp_path, first, hosts=(node(first), node(second)), birth=birth) as (_, up):
        for broker in (first, second, first):
            await eventually(lambda b=broker: up.connected and up.broker == node(b), timeout=30,  # type: ignore[misc]
                             message=f"the uplink did not move to {node(broker)}")
            recorder = mqtt_recorder_factory(broker, watched)  # joins after the publish: retained copies only
            online = await asyncio.to_thread(recorder.wait_for, lambda m: m.topic == TOPICS.availability, 30)
            assert online.retain and online.json["state"] == "online", online
            born = await asyncio.to_thread(recorder.wait_for, lambda m: m.topic == TOPICS.birth, 30)
            assert born.retain and born.json["births"] == up.connections, born
            drop_link(up)
            will = await asyncio.to_thread(
                recorder.wait_for, lambda m: m.topic == TOPICS.availability and m.json["state"] == "offline", 30)
            assert will.json["reason"] == "connection lost" and will.retain is False  # live, not a retained copy
            await eventually(lambda b=broker: up.broker != node(b), timeout=30)  # type: ignore[misc]
    connected = [a.node for a in up.transport.attempts if a.connected]
    assert connected[:3] == [node(first), node(second), node(first)], up.transport.attempts


def test_mqtt_hosts_parse_with_key_paths(tmp_path: Path) -> None:
    """``mqtt.hosts`` lists the nodes; it excludes host/port; each entry is checked and named by its index."""
    from tests.test_config import base

    def load(**mqtt: Any) -> MqttConfig:
        doc = base()
        doc["mqtt"] = mqtt
        return parse_config(doc, base_dir=tmp_path).mqtt

    cfg = load(hosts=["127.0.0.1:1884", "localhost", "[::1]:1885"])
    assert cfg.endpoints == (("127.0.0.1", 1884), ("localhost", 1883), ("::1", 1885))
    assert (cfg.host, cfg.port) == ("127.0.0.1", 1884), "host/port name the first node"
    assert load().endpoints == (("localhost", 1883),)
    assert load(host="127.0.0.2", port=1999).endpoints == (("127.0.0.2", 1999),)
    cases = {
        "mqtt.hosts[1]": dict(hosts=["localhost:1883", "localhost:x"]),
        "mqtt.hosts[2]": dict(hosts=["localhost:1", "localhost:2", "localhost:1"]),
        "mqtt.hosts[0]": dict(hosts=[5]),
        "mqtt.hosts": dict(hosts=[]),
        "mqtt.host": dict(hosts=["localhost:1"], host="localhost"),
        "mqtt.port": dict(hosts=["localhost:1"], port=1883),
    }
    for key, table in cases.items():
        with pytest.raises(ConfigError) as err:
            load(**table)
        assert err.value.path == key, (table, err.value)
    # plain MQTT to any node that is not this host is refused, not only to the first
    with pytest.raises(ConfigError, match=r"broker-2\.example\.net") as err:
        load(hosts=["127.0.0.1:1883", "broker-2.example.net:1883"])
    assert err.value.path == "mqtt.allow_plaintext"
    assert load(hosts=["127.0.0.1", "broker-2.example.net"], allow_plaintext=True).endpoints[1] == (
        "broker-2.example.net", 1883)


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_with_an_alarm_waiting_a_node_that_never_answers_gets_5_s_before_the_next_is_tried(
    tmp_path: Path, two_brokers: tuple[MosquittoBroker, MosquittoBroker], mqtt_recorder_factory: Any
) -> None:
    """The first node takes the TCP connection and never answers CONNECT (frozen, as a cluster node electing
    leaders can be): with an alarm waiting and another node listed, the attempt is given 5 s, not the 30 s
    connect timeout, and the alarm goes out through the second node."""
    first, second = two_brokers
    recorder = mqtt_recorder_factory(second, EVENTS)
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    [alarm_id] = await ob.append([ev("alarm", 3)])
    await ob.close()
    with frozen(first):
        async with forwarding(tmp_path, first, hosts=(node(first), node(second)), connect_timeout_s=30.0,
                              start=False) as (ob, up):
            # the record (QoS 1): the standby connection, up on the second node, has sent it already as a copy
            await asyncio.to_thread(recorder.wait_for_count,
                                    lambda m: m.json["event_id"] == alarm_id and m.qos == 1, 1, 60)
            attempts = list(up.transport.attempts)
    assert attempts[0].node == node(first) and not attempts[0].connected, attempts
    assert attempts[0].timeout_s == URGENT_RETRY_MAX_S, attempts
    assert attempts[1].node == node(second) and attempts[1].connected, attempts
