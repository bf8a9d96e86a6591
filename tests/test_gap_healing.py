"""A broker that acknowledged events and then died: the reference consumer notices the gap and heals it.

mosquitto answers PUBACK before it has the message on disk (docs/mqtt.md, "What an acknowledgement means").
Here a burst is acknowledged to the gateway while the consumer cannot take it, the broker is killed with
SIGKILL and started again on the same port; the consumer (examples/consumer.py as a subprocess) sees the next
event's ``seq`` jump, asks the gateway for the missing range with the ``events`` command — answered by the
real command handler from the real outbox — and ends with every event exactly once.

The same for each gap no later event of the session shows: a session's first events (the consumer first sees
it at a seq above 1), its last events (the gateway restarted before sending more: the next session's birth
says where it ended), and a session lost entirely (only a later birth lists it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway import link
from gateway.config import MqttConfig
from gateway.control.commands import CommandHandler, StorageAway
from gateway.events import Event
from gateway.uplink.contract import CommandGate, CommandService, birth_message
from gateway.uplink.mqtt import Uplink
from gateway.uplink.outbox import Outbox
from gateway.uplink.topics import Topics
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually

CONSUMER = Path(__file__).resolve().parent.parent / "examples" / "consumer.py"
TOPICS = Topics("safety", "c1", "b1")

pytestmark = pytest.mark.timeout(240)


class History:
    """What the command handler needs for ``events``: the stored history (as the storage process serves it)."""

    cfg: Any = None

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def recent_events(self, **query: Any) -> list[dict[str, Any]]:
        return await self.outbox.recent(**query)

    async def storage(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        raise StorageAway(f"{name}: not served here (no panel)")  # the consumer also asks for a rebirth


class Consumer:
    """examples/consumer.py --json --all-events, its lines collected by a reader thread."""

    def __init__(self, broker: MosquittoBroker, contacts: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CONSUMER), "--json", "--all-events", "--protocol", "311", "--host", broker.host,
             "--port", str(broker.port), "--community", "c1", "--contacts", str(contacts), "--client-id",
             "consumer-heal"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def seen(self, action: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if x["action"] == action]

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> str:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[1]


def readings(n: int, start: int) -> list[Event]:
    return [Event("telemetry", "reading", time.monotonic(), device="gas-1", unit="u1", household="u1-101",
                  value=float(start + i), measure="%LEL", quality="good", wall=time.time()) for i in range(n)]


async def test_events_acknowledged_then_lost_by_a_killed_broker_reach_the_consumer_exactly_once(
    tmp_path: Path,
) -> None:
    broker = MosquittoBroker(tmp_path / "broker").start()  # no persistence: a kill loses what it held in memory
    contacts = tmp_path / "contacts.toml"
    contacts.write_text('[buildings."c1/b1"]\nhead = { name = "Head", phone = "100" }\n', encoding="utf-8")
    ob = await Outbox.open(str(tmp_path / "events.db"), gateway_id="c1-b1",
                           identity={"community": "c1", "building": "b1"})
    cfg = MqttConfig(host=broker.host, port=broker.port, client_id="c1-b1", max_inflight=32)
    service: CommandService | None = None

    async def on_command(msg: Any) -> None:
        assert service is not None
        await service.on_message(msg)

    up = Uplink(cfg, ob, TOPICS, on_command=on_command, connect_timeout_s=1.0)
    service = CommandService(CommandGate(TOPICS, started_at=time.time()), CommandHandler(History(ob)),  # type: ignore[arg-type]
                             lambda topic, body, props: up.publish_json(topic, body, properties=props),
                             gateway="c1-b1", session=lambda: ob.session)
    task = asyncio.create_task(up.run())
    consumer = Consumer(broker, contacts)
    error = ""
    try:
        await eventually(lambda: up.connected, timeout=30)
        await eventually(lambda: consumer.seen("ready") or consumer.proc.poll() is not None, timeout=30)
        assert consumer.proc.poll() is None
        ids = await ob.append(readings(10, 0))
        await eventually(lambda: len(consumer.seen("event")) == 10, timeout=30)

        os.kill(consumer.proc.pid, signal.SIGSTOP)  # it takes nothing more: the broker queues for it
        ids += await ob.append(readings(300, 10))
        await eventually(lambda: up.delivered_total == 310, timeout=60, message="the burst was not acknowledged")
        broker.kill()  # acknowledged to the gateway, never saved by the broker
        broker.start()
        os.kill(consumer.proc.pid, signal.SIGCONT)
        await eventually(lambda: len(consumer.seen("ready")) >= 2, timeout=60, message="the consumer did not return")
        await eventually(lambda: up.connected, timeout=60)

        ids += await ob.append(readings(5, 310))  # the next events show the consumer the gap
        await eventually(lambda: {e["event_id"] for e in consumer.seen("event")} >= set(ids), timeout=90,
                         message="the consumer did not get every event")
    finally:
        error = consumer.stop()
        await up.stop(flush_timeout_s=0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()
        broker.stop()
    taken = Counter(e["event_id"] for e in consumer.seen("event"))
    assert set(taken) == set(ids) and set(taken.values()) == {1}, "every event exactly once"
    recovered = consumer.seen("recovered")
    assert recovered, "the broker lost nothing: the test did not test healing"
    assert consumer.seen("gap") and consumer.seen("range_requested")
    assert not consumer.seen("unrecoverable"), consumer.seen("unrecoverable")
    print(f"{len(recovered)} of {len(ids)} events were lost by the broker and recovered from the gateway; "
          f"{len(consumer.seen('range_requested'))} range requests")
    assert consumer.proc.returncode is not None, error


class Gateway:
    """One run (session) of a gateway: the real outbox, uplink (with its birth) and command door."""

    def __init__(self, broker: MosquittoBroker, db: Path) -> None:
        self.broker = broker
        self.db = db
        self.ob: Outbox
        self.up: Uplink
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Gateway:
        ob = self.ob = await Outbox.open(str(self.db), gateway_id="c1-b1",
                                         identity={"community": "c1", "building": "b1"})
        cfg = MqttConfig(host=self.broker.host, port=self.broker.port, client_id="c1-b1", max_inflight=32)
        service: CommandService | None = None

        async def on_command(msg: Any) -> None:
            assert service is not None
            await service.on_message(msg)

        def birth() -> dict[str, Any]:
            return birth_message(gateway="c1-b1", community="c1", building="b1", session=ob.session, software="t",
                                 config={"units": [], "households": 0, "devices": 0, "buses": []},
                                 snapshot=link.snapshot_from_wire(None), last_seq=ob.session_seq,
                                 sessions=ob.earlier_sessions)

        up = self.up = Uplink(cfg, ob, TOPICS, birth=birth, on_command=on_command, connect_timeout_s=1.0)
        service = CommandService(CommandGate(TOPICS, started_at=time.time()), CommandHandler(History(ob)),  # type: ignore[arg-type]
                                 lambda topic, body, props: up.publish_json(topic, body, properties=props),
                                 gateway="c1-b1", session=lambda: ob.session)
        self.task = asyncio.create_task(up.run())
        await eventually(lambda: up.connected, timeout=60, message="the gateway did not connect")
        return self

    async def send(self, n: int) -> list[str]:
        """Store ``n`` readings and wait until the broker acknowledged every event of this run."""
        ids = await self.ob.append(readings(n, 0))
        await eventually(lambda: self.up.delivered_total >= self.ob.session_seq, timeout=60,
                         message="the events were not acknowledged")
        return ids

    async def stop(self) -> None:
        await self.up.stop(flush_timeout_s=0.5)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.ob.close()


async def _started(broker: MosquittoBroker, contacts: Path) -> Consumer:
    consumer = Consumer(broker, contacts)
    await eventually(lambda: consumer.seen("ready") or consumer.proc.poll() is not None, timeout=30)
    assert consumer.proc.poll() is None, consumer.stop()
    return consumer


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
@pytest.mark.parametrize("lost", ["head", "tail", "session"])
async def test_a_gap_no_later_event_of_its_session_shows_is_healed(tmp_path: Path, lost: str) -> None:
    """The consumer is away (cut off by a broker killed and started again) while: head — a session's first 10
    events are sent, then its next ones reach the consumer; tail — the last 10 events of session 1 are sent and
    the gateway restarts; session — every event of session 2 is sent, and session 3 follows. The consumer gets
    every event exactly once, and names the kind of gap it healed."""
    broker = MosquittoBroker(tmp_path / "broker").start()
    contacts = tmp_path / "contacts.toml"
    contacts.write_text('[buildings."c1/b1"]\nhead = { name = "Head", phone = "100" }\n', encoding="utf-8")
    consumer: Consumer | None = None
    gw: Gateway | None = None
    ids: list[str] = []
    error = ""
    try:
        if lost == "head":  # the consumer was away for the first events, its queue died with the broker's memory
            gw = await Gateway(broker, tmp_path / "events.db").start()
            ids += await gw.send(10)
            broker.kill()
            broker.start()
            await eventually(lambda: gw is not None and gw.up.connected, timeout=60)
            consumer = await _started(broker, contacts)
            ids += await gw.send(5)
        else:
            consumer = await _started(broker, contacts)
            gw = await Gateway(broker, tmp_path / "events.db").start()
            ids += await gw.send(5)
            await eventually(lambda: consumer is not None and len(consumer.seen("event")) == 5, timeout=30)
            ready = len(consumer.seen("ready"))
            consumer.pause()
            broker.kill()  # the consumer is cut off: from here on nothing reaches it until it is back
            broker.start()
            await eventually(lambda: gw is not None and gw.up.connected, timeout=60)
            if lost == "session":
                await gw.stop()
                gw = await Gateway(broker, tmp_path / "events.db").start()
            ids += await gw.send(10)
            await gw.stop()
            gw = await Gateway(broker, tmp_path / "events.db").start()
            consumer.resume()
            await eventually(lambda: consumer is not None and len(consumer.seen("ready")) > ready, timeout=60,
                             message="the consumer did not return")
            ids += await gw.send(5)
        await eventually(lambda: consumer is not None and {e["event_id"] for e in consumer.seen("event")} >= set(ids),
                         timeout=45, message=f"the consumer did not get every event ({lost} lost)")
    finally:
        error = consumer.stop() if consumer is not None else ""
        if gw is not None:
            await gw.stop()
        broker.stop()
    assert consumer is not None
    taken = Counter(e["event_id"] for e in consumer.seen("event"))
    assert set(taken) == set(ids) and set(taken.values()) == {1}, "every event exactly once"
    healed = Counter(r["gap"] for r in consumer.seen("recovered"))
    assert healed == {lost: 10}, healed
    assert not consumer.seen("unrecoverable"), consumer.seen("unrecoverable")
    assert consumer.proc.returncode is not None, error
