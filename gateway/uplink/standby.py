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
subscription; paho's own network thread runs it and reconnects it.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttConfig
from gateway.uplink.outbox import PendingEvent

__all__ = ["STANDBY_SUFFIX", "Standby", "apply_credentials", "standby_node"]

log = structlog.get_logger()
STANDBY_SUFFIX = "-standby"
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 5
#: Copies remembered per outage (each urgent event is copied once per outage).
COPIED_LIMIT = 10_000


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username, password and TLS from ``[mqtt]``: the broker's chain is always verified; ``tls_insecure`` only
    skips the host name check."""
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls or cfg.tls_ca_file or cfg.tls_cert_file:
        client.tls_set(ca_certs=cfg.tls_ca_file, certfile=cfg.tls_cert_file, keyfile=cfg.tls_key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
        if cfg.tls_insecure:
            client.tls_insecure_set(True)


def standby_node(primary: int, nodes: int) -> int:
    """The node the standby connection uses while the main one uses ``primary``: the one before it, since a lost
    main connection moves on to the one after it (so that with three nodes or more the two meet on none)."""
    return (primary - 1) % nodes


class Standby:
    """A second connection that carries QoS 0 copies of urgent events while the main connection is down.

    Every method is called on the uplink's event loop; paho's thread only connects, reconnects and writes.
    """

    def __init__(self, cfg: MqttConfig, topic: Callable[[str], str], wire: Callable[[PendingEvent], str], *,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self._on_connect = on_connect
        """Called on paho's thread each time the standby connection comes up."""
        self._topic = topic
        self._wire = wire
        self.nodes = cfg.endpoints
        self.node_index = standby_node(0, len(self.nodes))
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._primary_up = False
        self._copied: set[str] = set()  # event ids copied during this outage
        self._ever_copied: dict[str, None] = {}  # the latest COPIED_LIMIT ids copied, oldest first
        self.copies = 0
        """Copies handed to the standby connection since the start."""
        self.missed = 0
        """Copies that could not be sent (the standby connection was down too)."""
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def broker(self) -> str:
        host, port = self.nodes[self.node_index]
        return f"{host}:{port}"

    def start(self) -> None:
        """Connect to the standby node in the background (paho's thread retries until :meth:`stop`)."""
        self._open(self.node_index)

    def stop(self) -> None:
        """Disconnect and end paho's thread."""
        client, self._client = self._client, None
        self._connected = threading.Event()
        if client is not None:
            _close(client)

    def primary_up(self, primary: int) -> None:
        """The main connection is up on node ``primary``: no more copies; keep off that node."""
        self._primary_up = True
        self._copied.clear()
        if primary == self.node_index:
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
        sent = 0
        for row in rows:
            if row.event_id in self._copied:
                continue
            if client is None or not self.connected:
                self.missed += 1
                continue
            info = client.publish(self._topic(row.kind), self._wire(row), qos=0)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.missed += 1
                continue
            if len(self._copied) < COPIED_LIMIT:
                self._copied.add(row.event_id)
            self._ever_copied[row.event_id] = None
            if len(self._ever_copied) > COPIED_LIMIT:
                del self._ever_copied[next(iter(self._ever_copied))]
            sent += 1
        if sent:
            self.copies += sent
            log.info("urgent events copied over the standby connection", copies=sent, broker=self.broker)
        return sent

    def was_copied(self, event_id: str) -> bool:
        """Whether a copy of this event went out (the main connection then sends it as ``historical``)."""
        return event_id in self._ever_copied

    def _open(self, index: int) -> None:
        """(Re)connect to node ``index`` with a new client; the old one is closed on a thread of its own (paho's
        thread may take up to a second to notice)."""
        old, self._client = self._client, None
        if old is not None:
            threading.Thread(target=_close, args=(old,), name="standby-close", daemon=True).start()
        connected = self._connected = threading.Event()
        self.node_index = index
        host, port = self.nodes[index]
        v5 = self.cfg.protocol == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id + STANDBY_SUFFIX,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        apply_credentials(client, self.cfg)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_queued_messages_set(0)

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            if not rc.is_failure:
                connected.set()
                self.connections += 1
                if self._on_connect is not None:
                    self._on_connect()

        def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        kwargs: dict[str, Any] = {"clean_start": True} if v5 else {}
        client.connect_async(host, port, self.cfg.keepalive_s, **kwargs)
        client.loop_start()
        self._client = client


def _close(client: mqtt.Client) -> None:
    with contextlib.suppress(Exception):  # already gone
        client.disconnect()
    with contextlib.suppress(Exception):
        client.loop_stop()
