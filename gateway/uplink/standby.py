"""The standby connection: fast copies of urgent events over another node while the main connection is down.

On a clustered broker (``mqtt.hosts`` with two nodes or more) the gateway keeps a second, idle connection to a
node other than the one its main connection uses (the one before it in ``mqtt.hosts``). When the main connection
is lost — its node killed, say — it may not come back until the cluster has elected a new leader for the MQTT
session stream, because nats-server stores the session before it answers CONNECT (8 s in
tests/test_fleet_cluster.py). The standby connection
is already up, so while the main one is down every alarm, supervisory signal and fault that waits in the outbox is
published on it at once, with QoS 0: nats-server hands a PUBLISH to core NATS subscribers at once, and the central
inbox listens there (its fast path), so the first notice does not wait for the election.

A copy is never the record. It does not touch the outbox: the event stays undelivered until the main connection
gets its own PUBACK, and it is sent again there (the inbox stores each id once; docs/mqtt.md, "Two paths").
The standby connection has its own client id (``<client_id>-standby``), a clean session, no will, and no
subscription; it runs on the uplink's event loop like the main connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttConfig
from gateway.uplink.outbox import PendingEvent
from gateway.uplink.transport import LoopIO, apply_credentials

__all__ = ["STANDBY_SUFFIX", "Standby", "standby_node"]

log = structlog.get_logger()
STANDBY_SUFFIX = "-standby"
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 5
#: Copies remembered per outage (each urgent event is copied once per outage).
COPIED_LIMIT = 10_000


def standby_node(primary: int, nodes: int) -> int:
    """The node the standby connection uses while the main one uses ``primary``: the one before it, since a lost
    main connection moves on to the one after it (so that with three nodes or more the two meet on none)."""
    return (primary - 1) % nodes


class Standby:
    """A second connection that carries QoS 0 copies of urgent events while the main connection is down.

    Everything runs on the uplink's event loop, the socket too (:class:`~gateway.uplink.transport.LoopIO`, as the
    main connection: paho's own thread uses ``select()``, which cannot watch a descriptor above 1023 — the fleet
    simulator's 250 gateways in one process have them). A lost or refused connection is tried again after
    ``RECONNECT_MIN_S``, doubling up to ``RECONNECT_MAX_S``.
    """

    def __init__(self, cfg: MqttConfig, topic: Callable[[str], str], wire: Callable[[PendingEvent], str], *,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self._on_connect = on_connect
        """Called on the loop each time the standby connection comes up."""
        self._topic = topic
        self._wire = wire
        self.nodes = cfg.endpoints
        self.node_index = standby_node(0, len(self.nodes))
        self._client: mqtt.Client | None = None
        self._io: LoopIO | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay = float(RECONNECT_MIN_S)
        self._stopped = False
        self.connected = False
        """Whether the standby connection is up now."""
        self._primary_up = False
        self._copied: set[str] = set()  # event ids copied during this outage
        self._ever_copied: dict[str, None] = {}  # the latest COPIED_LIMIT ids copied, oldest first
        self.copies = 0
        """Copies handed to the standby connection since the start."""
        self.missed = 0
        """Copies that could not be sent (the standby connection was down too)."""
        self.connections = 0

    @property
    def broker(self) -> str:
        host, port = self.nodes[self.node_index]
        return f"{host}:{port}"

    def start(self) -> None:
        """On the loop: connect to the standby node, and keep trying until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._open(self.node_index)

    def stop(self) -> None:
        """Disconnect; no more attempts."""
        self._stopped = True
        self._close()

    def primary_up(self, primary: int) -> None:
        """The main connection is up on node ``primary``: no more copies; keep off that node."""
        self._primary_up = True
        self._copied.clear()
        if primary == self.node_index:
            self._delay = float(RECONNECT_MIN_S)
            self._open(standby_node(primary, len(self.nodes)))

    def primary_down(self) -> None:
        """The main connection is down (or not up yet): urgent events go out on the standby connection too."""
        self._primary_up = False

    @property
    def copying(self) -> bool:
        """Whether urgent events are copied now (the main connection is down)."""
        return not self._primary_up

    def copy(self, rows: Iterable[PendingEvent]) -> int:
        """Publish a QoS 0 copy of each row not copied yet in this outage; the number sent."""
        if self._primary_up:
            return 0
        client = self._client
        sent = missed = 0
        for row in rows:
            if row.event_id in self._copied:
                continue
            if client is None or not self.connected or client.publish(
                    self._topic(row.kind), self._wire(row), qos=0).rc != mqtt.MQTT_ERR_SUCCESS:
                missed += 1
                continue
            if len(self._copied) < COPIED_LIMIT:
                self._copied.add(row.event_id)
            self._ever_copied[row.event_id] = None
            if len(self._ever_copied) > COPIED_LIMIT:
                del self._ever_copied[next(iter(self._ever_copied))]
            sent += 1
        if missed:
            self.missed += missed
            log.warning("urgent events not copied: the standby connection is down too", events=missed,
                        broker=self.broker)
        if sent:
            self.copies += sent
            log.info("urgent events copied over the standby connection", copies=sent, broker=self.broker)
        return sent

    def was_copied(self, event_id: str) -> bool:
        """Whether a copy of this event went out (the main connection then sends it as ``historical``)."""
        return event_id in self._ever_copied

    def _open(self, index: int) -> None:
        """(Re)connect to node ``index`` with a new client (the old one closed first)."""
        self._close()
        loop = self._loop
        if loop is None or self._stopped:
            return
        self.node_index = index
        host, port = self.nodes[index]
        v5 = self.cfg.protocol == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id + STANDBY_SUFFIX,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        apply_credentials(client, self.cfg)
        client.max_queued_messages_set(0)
        client.connect_timeout = float(RECONNECT_MAX_S)

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            if c is self._client and not rc.is_failure:
                self.connected = True
                self.connections += 1
                self._delay = float(RECONNECT_MIN_S)
                if self._on_connect is not None:
                    self._on_connect()

        def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            self._lost(c)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        self._client = client
        self._io = LoopIO(loop, client, lambda reason: self._lost(client))
        kwargs: dict[str, Any] = {"clean_start": True} if v5 else {}
        connect = functools.partial(client.connect, host, port, self.cfg.keepalive_s, **kwargs)

        async def connecting() -> None:
            try:  # resolves, opens the socket and shakes hands (TLS): blocking, so on a worker thread
                await asyncio.wait_for(loop.run_in_executor(None, connect), timeout=RECONNECT_MAX_S + 2.0)
            except (TimeoutError, OSError, ValueError):
                self._lost(client)

        task = loop.create_task(connecting(), name="standby-connect")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, client: mqtt.Client) -> None:
        """On the loop (paho's callbacks come from the loop or are moved there): try again after the delay."""
        if client is not self._client or self._loop is None:
            return
        self.connected = False
        self._close()
        if not self._stopped and self._retry is None:
            delay, self._delay = self._delay, min(self._delay * 2, float(RECONNECT_MAX_S))
            self._retry = self._loop.call_later(delay, self._again)

    def _again(self) -> None:
        self._retry = None
        if not self._stopped and self._client is None:
            self._open(self.node_index)

    def _close(self) -> None:
        client, self._client = self._client, None
        io, self._io = self._io, None
        self.connected = False
        if client is not None:
            with contextlib.suppress(Exception):  # already gone
                client.disconnect()
                client.loop_write()
        if io is not None:
            io.detach()
