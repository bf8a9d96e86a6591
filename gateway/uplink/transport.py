"""The uplink's transport: one MQTT connection at a time, to the broker node it is told, run on the asyncio loop.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) does its network I/O on the asyncio loop through its external-loop
callbacks (:class:`LoopIO`): no thread of its own, so nothing is handed between threads and no lock is shared.
A fresh paho client is made for every connection and paho queues nothing (``max_queued_messages_set(0)``), so
paho's memory is never the store: what was in flight when a connection ends is the outbox's to send again. The
Will, availability and birth go to whichever node the gateway is connected to; which node that is, and when
to try again, is the retry policy's (gateway/uplink/retry.py).

aiomqtt was considered for this module and rejected: it would replace :class:`LoopIO` (it runs paho on the
loop the same way), but aiomqtt 2.5 drops what the forwarder needs. Its ``on_publish`` ignores the PUBACK's
reason code, so a 0x87 "not authorized" would complete ``publish()`` as a success and the row would leave the
outbox unsent; its ``publish()`` awaits each PUBACK, so a window of 32 in flight needs 32 waiting tasks where
ours publishes the next row from the PUBACK callback; a pending ``publish()`` does not wake on a disconnect
(it waits out its timeout); and its CONNACK handler drops the broker's Receive Maximum (:func:`event_window`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig, is_loopback

__all__ = ["CONTROL_INFLIGHT", "NodeAttempt", "Transport", "UplinkError", "apply_credentials", "event_window",
           "node_name"]

log = structlog.get_logger()
#: Messages in flight kept free beside the events for availability, birth, status and command results.
CONTROL_INFLIGHT = 16


class UplinkError(Exception):
    """A connection attempt failed."""


class NodeAttempt(NamedTuple):
    """One connection attempt and the node it went to (``Transport.attempts``)."""

    started_at: float
    """Monotonic time the attempt began."""
    node: str
    """``host:port``."""
    node_index: int
    """Its place in ``mqtt.hosts`` (0 for the one node of ``host``/``port``)."""
    connected: bool
    error: str | None
    timeout_s: float = 0.0
    """How long it was given: the connect timeout, or the retry policy's shorter one while something urgent
    waits with several nodes."""


def event_window(configured: int, receive_maximum: int | None) -> int:
    """Events in flight on one connection: the configured window, within the broker's Receive Maximum.

    MQTT 5 brokers state in CONNACK how many QoS 1 messages they take unacknowledged (absent: 65 535); a
    client that sends more is disconnected (0x93). A share of it stays free for availability, status and
    command results.
    """
    if not receive_maximum:
        return configured
    return max(1, min(configured, receive_maximum - min(CONTROL_INFLIGHT, receive_maximum // 4)))


def node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LoopIO:
    """Runs one paho client's network I/O on the asyncio loop, through paho's external-loop callbacks.

    The socket is read when it is readable, written when paho has bytes queued, and ``loop_misc`` (keepalive)
    runs every second: PUBACK handling, refilling the window and publishing all happen on the loop thread.
    ``connect()`` runs on a worker thread and calls back from there; those calls are moved to the loop.
    An exception out of paho or one of the callbacks it calls ends the link (``on_failure``): a reader that
    raised would otherwise be called again and again, and a half-handled PUBACK leaves the window unsure.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: mqtt.Client,
                 on_failure: Callable[[str], None]) -> None:
        self.loop = loop
        self.client = client
        self._on_failure = on_failure
        self._loop_thread = threading.get_ident()
        self._sock: Any = None
        self._fd = -1
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        self._detached = False
        client.on_socket_open = lambda c, u, sock: self._on_loop(self._opened, sock)
        client.on_socket_close = lambda c, u, sock: self._on_loop(self._closed, sock)
        client.on_socket_register_write = lambda c, u, sock: self._on_loop(self._want_write, sock)
        client.on_socket_unregister_write = lambda c, u, sock: self._on_loop(self._written, sock)

    def _on_loop(self, callback: Callable[[Any], None], sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            callback(sock)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                self.loop.call_soon_threadsafe(callback, sock)

    def _opened(self, sock: Any) -> None:
        if self._detached:  # connect() finished after the uplink gave up on it
            sock.close()
            return
        self._sock, self._fd = sock, sock.fileno()
        self.loop.add_reader(self._fd, self._guarded, self._read)
        self._misc = self.loop.create_task(self._keepalive(), name="mqtt-keepalive")

    def _guarded(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:
            log.error("MQTT connection handling failed; dropping the connection", error=repr(exc))
            self.detach()
            self._on_failure(f"connection handling failed: {exc!r}")

    def _read(self) -> None:
        sock = self._sock
        self.client.loop_read()
        # TLS: decrypted bytes already taken off the socket do not make it readable again.
        while sock is not None and self._sock is sock and getattr(sock, "pending", None) and sock.pending():
            self.client.loop_read()

    def _want_write(self, sock: Any) -> None:
        if sock is self._sock and not self._writing:
            self._writing = True
            self.loop.add_writer(self._fd, self._guarded, self.client.loop_write)

    def _written(self, sock: Any) -> None:
        if sock is self._sock and self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)

    def _closed(self, sock: Any) -> None:
        if sock is self._sock:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._sock is None:
            return
        if self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False
        self.loop.remove_reader(self._fd)
        self._sock, self._fd = None, -1
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    async def _keepalive(self) -> None:
        while self._sock is not None:
            self._guarded(self.client.loop_misc)
            await asyncio.sleep(1.0)

    def detach(self) -> None:
        """Stop watching the socket and close it, if paho has not already (a socket opened later is closed)."""
        self._detached = True
        sock = self._sock
        self._unwatch()
        if sock is not None:
            sock.close()


class Transport:
    """The connection to the broker: connect to a node, publish, subscribe, and say when the link is lost.

    Callbacks, all on the loop thread: ``on_publish(client, mid, rc)`` for each PUBACK, while the socket is read;
    ``on_message(msg)`` for each message received; ``on_subscribe(client, codes)`` for each SUBACK;
    ``on_lost(reason)`` once the current connection is gone.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        on_publish: Callable[[mqtt.Client, int, ReasonCode], None],
        on_message: Callable[[mqtt.MQTTMessage], None],
        on_subscribe: Callable[[mqtt.Client, list[ReasonCode]], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.nodes: tuple[tuple[str, int], ...] = cfg.endpoints
        """The broker's nodes, ``mqtt.hosts`` in order (one node: ``mqtt.host``/``mqtt.port``)."""
        self.client: mqtt.Client | None = None
        """The paho client of the current connection, None while there is none."""
        self.connected = False
        self.connections = 0
        self.attempts: deque[NodeAttempt] = deque(maxlen=256)
        """Every connection attempt and its node, newest last."""
        self.window_limit = cfg.max_inflight
        """Events allowed in flight on the current connection (see :func:`event_window`)."""
        self.lost = asyncio.Event()
        """Set when the current connection is gone (or the uplink stops); cleared by :meth:`connect`."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._io: LoopIO | None = None
        self._on_publish = on_publish
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._on_lost = on_lost
        warn_if_unprotected(cfg)

    def node_names(self) -> list[str]:
        return [node_name(host, port) for host, port in self.nodes]

    async def connect(self, node: int, *, timeout_s: float, will: tuple[str, str]) -> mqtt.Client:
        """Connect to ``nodes[node]`` with ``will`` (topic, payload) as the Will; :class:`UplinkError` if it fails."""
        loop = self.loop = asyncio.get_running_loop()
        outcome: asyncio.Future[ReasonCode | str] = loop.create_future()

        def settle(value: ReasonCode | str) -> None:
            if not outcome.done():
                outcome.set_result(value)

        client = self._client(will)
        client.connect_timeout = timeout_s
        connack: dict[str, int] = {}

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
            receive_maximum = getattr(props, "ReceiveMaximum", None)
            if receive_maximum:
                connack["receive_maximum"] = int(receive_maximum)
                # Nothing is in flight yet: from now on paho holds back what would go beyond the broker's
                # limit (control messages; events never do). Its public setter refuses once connected.
                if 0 < receive_maximum < c.max_inflight_messages:
                    c._max_inflight_messages = int(receive_maximum)
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(settle, rc)

        def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(self._disconnected, c, rc)

        def on_publish(c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            self._on_publish(c, mid, rc)

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(self._on_message, msg)

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: list[ReasonCode], props: Any) -> None:
            self._on_subscribe(c, codes)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        self.lost.clear()
        io = LoopIO(loop, client, lambda reason: self._disconnected(client, reason))
        self._io = io
        kwargs: dict[str, Any] = {"clean_start": True} if self.cfg.protocol == 5 else {}
        host, port = self.nodes[node]
        attempt = NodeAttempt(time.monotonic(), node_name(host, port), node, False, None, timeout_s)
        connect = functools.partial(client.connect, host, port, self.cfg.keepalive_s, **kwargs)
        try:
            # connect() resolves, opens the socket and shakes hands (TLS): blocking work, so on a worker thread.
            await asyncio.wait_for(loop.run_in_executor(None, connect), timeout=timeout_s + 2.0)
            result = await asyncio.wait_for(outcome, timeout=timeout_s + 2.0)
        except (TimeoutError, OSError, ValueError) as exc:
            self.release(client)
            self.close(client)
            error = f"connect: {exc or 'timed out'}"
            self.attempts.append(attempt._replace(error=error))
            raise UplinkError(error) from None
        except asyncio.CancelledError:  # stopping while a connect hangs: the socket is closed once it opens
            io.detach()
            raise
        if isinstance(result, str) or result.is_failure:
            self.release(client)
            self.close(client)
            self.attempts.append(attempt._replace(error=f"connect refused: {result}"))
            raise UplinkError(f"connect refused: {result}")
        self.attempts.append(attempt._replace(connected=True))
        receive_maximum = connack.get("receive_maximum")
        self.window_limit = event_window(self.cfg.max_inflight, receive_maximum)
        if self.window_limit < self.cfg.max_inflight:
            log.info("broker's receive maximum limits the events in flight", receive_maximum=receive_maximum,
                     window=self.window_limit, configured=self.cfg.max_inflight)
        self.client = client
        self.connected = True
        self.connections += 1
        return client

    def _client(self, will: tuple[str, str]) -> mqtt.Client:
        """A fresh paho client for one connection: protocol, Will, credentials, TLS, in-flight limits."""
        cfg = self.cfg
        v5 = cfg.protocol == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
            clean_session=None if v5 else True,
        )
        will_topic, will_payload = will
        client.will_set(will_topic, will_payload, qos=1, retain=True)
        apply_credentials(client, cfg)
        # Room beyond the event window for availability, birth, status and command results (lowered to the
        # broker's Receive Maximum once CONNACK states one).
        client.max_inflight_messages_set(cfg.max_inflight + CONTROL_INFLIGHT)
        client.max_queued_messages_set(0)
        return client

    def release(self, client: mqtt.Client) -> None:
        """``client``'s connection is over for the uplink (nothing more is published on it)."""
        if self.client is client:
            self.client = None
        self.connected = False

    def close(self, client: mqtt.Client) -> None:
        """Send DISCONNECT if the socket still takes it, and stop watching and close the socket."""
        with contextlib.suppress(Exception):  # already gone
            client.disconnect()
            client.loop_write()  # hands DISCONNECT to the socket now; paho closes it after
        io, self._io = self._io, None
        if io is not None and io.client is client:
            io.detach()

    def _disconnected(self, client: mqtt.Client, reason: object) -> None:
        if client is self.client:
            self.connected = False
            self.lost.set()
            self._on_lost(f"disconnected: {reason}")

    def publish(self, topic: str, payload: str, *, retain: bool = False,
                properties: Properties | None = None) -> bool:
        """Publish at QoS 1 on the current connection. False when there is none or paho refuses it."""
        client = self.client
        if client is None or not self.connected:
            return False
        info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return bool(info.rc == mqtt.MQTT_ERR_SUCCESS)

    async def disconnect(self, last: tuple[str, str]) -> None:
        """Planned stop: publish ``last`` (topic, payload; retained), wait up to 2 s for its PUBACK, disconnect."""
        client = self.client
        if client is not None and self.connected:
            topic, payload = last
            info = client.publish(topic, payload, qos=1, retain=True)
            with contextlib.suppress(TimeoutError, RuntimeError, ValueError):
                await asyncio.wait_for(asyncio.to_thread(info.wait_for_publish, 2.0), timeout=3.0)
            client.disconnect()
        self.lost.set()


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username, password and TLS from ``[mqtt]`` (the main and the standby connection alike). The broker's
    certificate chain is always verified (the system CAs when no ca_file is given); ``mqtt.tls.insecure`` only
    skips the host name check."""
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls or cfg.tls_ca_file or cfg.tls_cert_file:
        client.tls_set(ca_certs=cfg.tls_ca_file, certfile=cfg.tls_cert_file, keyfile=cfg.tls_key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
        if cfg.tls_insecure:
            client.tls_insecure_set(True)


def warn_if_unprotected(cfg: MqttConfig) -> None:
    """Loud warnings, at every start, for a link to the broker that is not fully protected."""
    tls = cfg.tls or bool(cfg.tls_ca_file or cfg.tls_cert_file)
    if tls and cfg.tls_insecure:
        log.warning("INSECURE MQTT TLS: mqtt.tls.insecure is set, the broker's host name is NOT verified; "
                    "anyone with a certificate from the same CA can pose as the broker", broker=cfg.host)
    elif not tls:  # allowed only by mqtt.allow_plaintext (gateway/config.py)
        for host, _ in cfg.endpoints:
            if not is_loopback(host):
                log.warning("MQTT WITHOUT TLS: events, commands and credentials travel in clear "
                            "(mqtt.allow_plaintext = true); configure [mqtt.tls]", broker=host)
