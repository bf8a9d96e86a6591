"""Forwarding throughput: a bare paho QoS 1 loop vs the outbox and uplink, then a 100 000-event backlog drained.

One run against one private mosquitto on loopback (``tests.support.broker.MosquittoBroker``, a free port),
whose Receive Maximum is set to hold the whole window (mosquitto's default of 20 would cap the gateway at 15):

1. ``baseline_eps``: a bare paho client publishing N messages at QoS 1 with at most ``--window`` without a
   PUBACK (the gateway's ``mqtt.max_inflight``); the payload is a real event payload of the gateway.
2. ``gateway_eps``: the same number of events through the gateway's path — appended to a real SQLite outbox
   in batches (each a fully synced transaction, as the writer commits them) while the uplink forwards them
   with the same window; the clock stops when every one has its own PUBACK and is marked delivered in SQLite.
   Baseline and gateway rounds alternate ``--rounds`` times; medians are reported, ``ratio`` = gateway ÷
   baseline.
3. ``drain_100k_s``: 100 000 events stored while the broker is stopped; the broker is started again and the
   time is taken from the uplink's reconnect (its CONNACK) until the last one is marked delivered.
   ``reconnect_s`` (broker start → reconnect, the jittered backoff) is reported beside it, and
   ``forward_only_ratio``: that drain rate (stored events, no appends meanwhile) ÷ ``baseline_eps``.

Targets: ratio ≥ 0.8, drain ≤ 60 s. Prints one JSON line last.
``.venv/bin/python benchmarks/forwarding.py [--events 20000] [--rounds 3] [--window 32] [--backlog 100000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import structlog  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.config import MqttConfig  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.logs import configure_logging  # noqa: E402
from gateway.uplink.mqtt import Uplink  # noqa: E402
from gateway.uplink.outbox import Outbox  # noqa: E402
from gateway.uplink.topics import Topics  # noqa: E402
from gateway.uplink.transport import CONTROL_INFLIGHT  # noqa: E402
from tests.support.broker import MosquittoBroker  # noqa: E402

TOPICS = Topics("safety", "bench", "b01")
GATEWAY = "bench-b01"


def log_to_file(path: Path) -> Any:
    """The gateway's log lines (JSON) to ``path``, not stdout."""
    configure_logging(json=True)
    handle = path.open("a", encoding="utf-8", buffering=1)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=handle))
    return handle


def _events(n: int, start: int = 0) -> list[Event]:
    now = time.time()
    return [Event("telemetry", "reading", time.monotonic(), device=f"gas-{i % 64}", unit="u1",
                  household=f"u1-{i % 64:03d}", value=round((start + i) % 250 / 10, 1), measure="%LEL", wall=now)
            for i in range(start, start + n)]


async def _sample_payload(workdir: Path) -> str:
    ob = await Outbox.open(str(workdir / "sample.db"), gateway_id=GATEWAY,
                           identity={"community": "bench", "building": "b01"})
    try:
        await ob.append(_events(1))
        row = (await ob.pending(limit=1))[0]
        return row.payload[:-1] + ',"historical":false}'
    finally:
        await ob.close()


def baseline(broker: MosquittoBroker, n: int, window: int, payload: str) -> float:
    """Events per second of a bare paho QoS 1 publish loop with ``window`` in flight."""
    room = threading.Semaphore(window)
    done = threading.Event()
    acked = 0

    def on_publish(c: mqtt.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        room.release()
        if acked == n:
            done.set()

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-baseline", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(30):
            raise RuntimeError("baseline client did not connect")
        topic = TOPICS.event("telemetry")
        start = time.perf_counter()
        for _ in range(n):
            room.acquire()
            client.publish(topic, payload, qos=1)
        if not done.wait(300):
            raise RuntimeError(f"baseline: only {acked} of {n} acknowledged")
        return n / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


async def _uplink(broker: MosquittoBroker, ob: Outbox, window: int) -> tuple[Uplink, asyncio.Task[None]]:
    cfg = MqttConfig(host=broker.host, port=broker.port, client_id=GATEWAY, max_inflight=window, keepalive_s=30)
    up = Uplink(cfg, ob, TOPICS)
    return up, asyncio.create_task(up.run())


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        await asyncio.sleep(0.001)


async def _all_delivered(ob: Outbox, up: Uplink, n: int, timeout: float) -> None:
    await _until(lambda: up.delivered_total >= n, timeout, f"{up.delivered_total} of {n} acknowledged")
    while (await ob.backlog())[0]:  # the last acks are marked in SQLite within ACK_DELAY_S
        await asyncio.sleep(0.001)


async def gateway(broker: MosquittoBroker, workdir: Path, n: int, window: int, batch: int) -> float:
    """Events per second appended to the outbox and forwarded by the uplink, each marked delivered."""
    ob = await Outbox.open(str(workdir / "events.db"), gateway_id=GATEWAY,
                           identity={"community": "bench", "building": "b01"})
    up, task = await _uplink(broker, ob, window)
    try:
        await _until(lambda: up.connected, 30, "uplink connect")
        batches = [_events(batch, i) for i in range(0, n, batch)]
        start = time.perf_counter()
        for events in batches:
            await ob.append(events)
            await asyncio.sleep(0)
        await _all_delivered(ob, up, n, 300)
        return n / (time.perf_counter() - start)
    finally:
        await up.stop(flush_timeout_s=1)
        task.cancel()
        await ob.close()


async def drain(broker: MosquittoBroker, workdir: Path, backlog: int, window: int) -> dict[str, float]:
    """Seconds to forward ``backlog`` stored events after the broker comes back."""
    ob = await Outbox.open(str(workdir / "backlog.db"), gateway_id=GATEWAY,
                           identity={"community": "bench", "building": "b01"})
    up, task = await _uplink(broker, ob, window)
    try:
        await _until(lambda: up.connected, 30, "uplink connect")
        broker.stop()
        await _until(lambda: not up.connected, 30, "uplink notices the broker is gone")
        for i in range(0, backlog, 1000):
            await ob.append(_events(min(1000, backlog - i), i))
        connections = up.connections
        broker.start()
        started = time.perf_counter()
        await _until(lambda: up.connections > connections, 120, "uplink reconnect")
        reconnected = time.perf_counter()
        await _all_delivered(ob, up, backlog, 600)
        done = time.perf_counter()
        return {"drain_100k_s": round(done - reconnected, 2), "reconnect_s": round(reconnected - started, 2),
                "drain_eps": round(backlog / (done - reconnected))}
    finally:
        await up.stop(flush_timeout_s=1)
        task.cancel()
        await ob.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-forwarding-") as tmp:
        workdir = Path(tmp)
        log = log_to_file(workdir / "gateway.log")
        # The broker takes the whole window plus the gateway's share for control messages (its CONNACK
        # Receive Maximum), so both sides keep ``--window`` events in flight; mosquitto's default is 20.
        broker = MosquittoBroker(workdir / "broker", max_inflight_messages=args.window + CONTROL_INFLIGHT).start()
        try:
            payload = asyncio.run(_sample_payload(workdir))
            base: list[float] = []
            gw: list[float] = []
            for r in range(args.rounds):
                base.append(baseline(broker, args.events, args.window, payload))
                round_dir = workdir / f"round{r}"
                round_dir.mkdir()
                gw.append(asyncio.run(gateway(broker, round_dir, args.events, args.window, args.batch)))
                print(f"round {r + 1}: baseline {base[-1]:.0f}/s, gateway {gw[-1]:.0f}/s", flush=True)
            drained = asyncio.run(drain(broker, workdir, args.backlog, args.window))
            print(f"backlog {args.backlog}: reconnect {drained['reconnect_s']} s, drain {drained['drain_100k_s']} s",
                  flush=True)
        finally:
            broker.stop()
            log.close()
    baseline_eps = statistics.median(base)
    gateway_eps = statistics.median(gw)
    return {
        "baseline_eps": round(baseline_eps),
        "gateway_eps": round(gateway_eps),
        "ratio": round(gateway_eps / baseline_eps, 3),
        **drained,
        "forward_only_ratio": round(drained["drain_eps"] / baseline_eps, 3),
        "events": args.events,
        "rounds": args.rounds,
        "window": args.window,
        "batch": args.batch,
        "backlog": args.backlog,
        "payload_bytes": len(payload),
        "baseline_rounds": [round(x) for x in base],
        "gateway_rounds": [round(x) for x in gw],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/gateway rounds")
    parser.add_argument("--window", type=int, default=MqttConfig().max_inflight, help="publishes without PUBACK")
    parser.add_argument("--batch", type=int, default=100, help="events per outbox transaction")
    parser.add_argument("--backlog", type=int, default=100_000, help="events drained after the broker restart")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
