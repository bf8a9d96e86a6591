"""The standby connection (gateway/uplink/standby.py) against two real mosquittos standing in for two nodes.

While the main connection is up nothing is copied; while it is down an alarm goes out at once as a QoS 0 copy over
the standby node, and the main connection later sends it as the record (QoS 1, ``historical``) and marks it
delivered only on its own PUBACK. tests/test_fleet_cluster.py shows the same through a NATS node's loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MqttConfig
from gateway.events import Event
from gateway.uplink.mqtt import Uplink
from gateway.uplink.outbox import Outbox
from gateway.uplink.standby import STANDBY_SUFFIX, standby_node
from gateway.uplink.topics import Topics
from tests.support.broker import MosquittoBroker, frozen
from tests.support.building import eventually

pytestmark = pytest.mark.timeout(120)

TOPICS = Topics("safety", "c1", "b1")
EVENTS = f"{TOPICS.base}/event/#"


def alarm(n: int) -> Event:
    return Event("alarm", "raised", time.monotonic(), device=f"gas-{n}", value=35.0, wall=time.time())


@contextlib.asynccontextmanager
async def uplink(tmp_path: Path, *nodes: MosquittoBroker,
                 connect_timeout_s: float = 1.0) -> AsyncIterator[tuple[Outbox, Uplink]]:
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    cfg = MqttConfig(host=nodes[0].host, port=nodes[0].port, client_id="gw-test", protocol=5,
                     hosts=tuple(name(n) for n in nodes))
    up = Uplink(cfg, ob, TOPICS, connect_timeout_s=connect_timeout_s)
    task = asyncio.create_task(up.run())
    try:
        yield ob, up
    finally:
        await up.stop(flush_timeout_s=0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


async def all_delivered(ob: Outbox, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await ob.backlog())[0]:
        assert time.monotonic() < deadline, "events never marked delivered"
        await asyncio.sleep(0.05)


def name(broker: MosquittoBroker) -> str:
    return f"{broker.host}:{broker.port}"


def test_the_standby_uses_the_node_before_the_main_connections() -> None:
    """A lost main connection moves on to the next node: the standby waits on the one before, out of its way."""
    assert [standby_node(i, 3) for i in range(3)] == [2, 0, 1]
    assert [standby_node(i, 2) for i in range(2)] == [1, 0]


async def test_one_node_has_no_standby(tmp_path: Path, broker: MosquittoBroker) -> None:
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="gw-test")
    try:
        up = Uplink(MqttConfig(host=broker.host, port=broker.port, client_id="gw-test"), ob, TOPICS)
        assert up.standby is None
    finally:
        await ob.close()


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_an_alarm_raised_while_the_main_connection_is_down_goes_at_once_over_the_standby_node(
    tmp_path: Path, mqtt_recorder_factory: Any
) -> None:
    """Three nodes: the main connection on the first, the standby on the third. The first is killed while the
    second hangs (SIGSTOP), so the main connection is down for the connect timeout: an alarm raised then reaches
    the third node at once as a QoS 0 copy, stays undelivered in the outbox, and later arrives there again through
    the main connection as the record (QoS 1, ``historical``). An alarm raised while the main connection was up
    was never copied."""
    first, second, third = (MosquittoBroker(tmp_path / f"node{i}").start() for i in (1, 2, 3))
    try:
        recorder = mqtt_recorder_factory(third, EVENTS)
        async with uplink(tmp_path, first, second, third, connect_timeout_s=5.0) as (ob, up):
            assert up.standby is not None
            await eventually(lambda: up.connected and up.standby is not None and up.standby.connected, timeout=30,
                             message="the main or the standby connection never came up")
            assert up.broker == name(first) and up.standby.broker == name(third)
            [quiet] = await ob.append([alarm(0)])
            await all_delivered(ob)
            assert up.standby.copies == 0, "nothing is copied while the main connection is up"
            with frozen(second):
                first.kill()
                await eventually(lambda: not up.connected, timeout=30, message="the uplink did not see its node go")
                [raised] = await ob.append([alarm(1)])
                [copy] = await asyncio.to_thread(
                    recorder.wait_for_count, lambda m: m.json["event_id"] == raised, 1, 30)
                down_at_copy = not up.connected
                waiting_at_copy = (await ob.backlog())[0]
                # the main connection gives up on the hung second node and connects to the third
                await all_delivered(ob)
                assert up.broker == name(third)
            both = await asyncio.to_thread(recorder.wait_for_count, lambda m: m.json["event_id"] == raised, 2, 30)
            copies = up.standby.copies
    finally:
        for broker in (third, second, first):
            broker.stop()
    assert down_at_copy, "the copy came while the main connection was down"
    assert waiting_at_copy == 1, "a copy is not a delivery: the alarm waited for its PUBACK"
    assert copy.qos == 0 and copy.json["historical"] is False and copy.json["kind"] == "alarm"
    record = both[1]
    assert record.qos == 1 and record.json["historical"] is True, "the record says a copy went first"
    assert copies == 1
    assert not [m for m in recorder.messages(EVENTS) if m.json["event_id"] == quiet], "never copied"


async def test_the_standby_moves_off_the_node_the_main_connection_moves_to(
    tmp_path: Path, mqtt_recorder_factory: Any
) -> None:
    first = MosquittoBroker(tmp_path / "node1").start()
    second = MosquittoBroker(tmp_path / "node2").start()
    try:
        async with uplink(tmp_path, first, second) as (_ob, up):
            assert up.standby is not None
            await eventually(lambda: up.connected and up.standby is not None and up.standby.connected, timeout=30)
            assert up.standby.broker == name(second)
            first.kill()
            await eventually(lambda: up.connected and up.broker == name(second), timeout=30)
            assert up.standby.broker == name(first), "off the main connection's node"
            first.start()
            await eventually(lambda: up.standby is not None and up.standby.connected, timeout=30,
                             message="the standby never came back on the first node")
            ids = [c for c in first.log_text().splitlines() if "gw-test" + STANDBY_SUFFIX in c]
    finally:
        second.stop()
        first.stop()
    assert ids, "the standby connects with its own client id"
