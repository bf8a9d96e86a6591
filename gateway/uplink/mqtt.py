"""MQTT uplink: connect, announce, forward the outbox in order, and drop a row only on its own PUBACK.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) does its network I/O on the asyncio loop through its
external-loop callbacks: no thread of its own, so nothing is handed between threads and no lock is shared.
A fresh paho client is made for every connection, so paho's in-memory queue is never the store: on a
disconnect every row without a PUBACK is "outcome unknown" and is sent again — with the same event id —
from the outbox after reconnecting (jittered backoff, 1 s to 60 s; at most 5 s between attempts while an alarm,
supervisory signal or fault waits, so it reaches a returning broker well within the 10 s GB/T 45839 allows).
With several nodes of one cluster (``mqtt.hosts``), each failed attempt and each lost connection moves on to the
next node — the first attempt after a lost connection at once, with no wait — and the Will, availability and birth go to
whichever node the gateway is connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import sqlite3
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig, is_loopback
from gateway.events import Priority
from gateway.uplink.contract import availability_message, iso_time
from gateway.uplink.outbox import Outbox, PendingEvent
from gateway.uplink.standby import Standby
from gateway.uplink.topics import Topics

__all__ = [
    "COMMAND_QOS",
    "URGENT_RETRY_MAX_S",
    "NodeAttempt",
    "RetryDelay",
    "Uplink",
    "UplinkError",
    "event_window",
]

log = structlog.get_logger()
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
#: Longest wait between connection attempts while an alarm, supervisory signal or fault waits in the outbox.
URGENT_RETRY_MAX_S = 5.0
#: Events of at least this class make a reconnect urgent.
URGENT_PRIORITY = Priority.TROUBLE
STABLE_CONNECTION_S = 30.0
REJECTED_RETRY_S = 5.0
ACK_TIMEOUT_S = 30.0
PREFETCH_ROWS = 500
ACK_BATCH = 256
ACK_DELAY_S = 0.2
STORAGE_RETRY_S = 0.2
CONTROL_INFLIGHT = 16
OUTCOME_BATCH = 64  # PUBACKs gathered in the window before the loop is woken to take them
#: Pause before the command subscription is asked for again after the broker refused it (SUBACK 0x80),
#: doubling on each refusal of the same connection up to SUBSCRIBE_RETRY_MAX_S.
SUBSCRIBE_RETRY_S = 2.0
SUBSCRIBE_RETRY_MAX_S = 60.0
#: QoS of the command subscription. The session is clean, so a command reaches the gateway only while it is
#: connected, and QoS 1 would add nothing across a lost connection (its queue goes with the session); what
#: makes a command safe is its id, its validity window and its one result (docs/mqtt.md, "Remote commands").
#: On a clustered broker a QoS 1 subscription is a replicated consumer per building, which a lost node's
#: buildings must wait for to be elected again (benchmarks/fleet.py, 1000 buildings: failover p99 13.7–26.2 s
#: with QoS 1; with QoS 0, 1.1 s when the lost node led no event stream; docs/fleet.md).
COMMAND_QOS = 0


@dataclass(slots=True)
class _InFlight:
    row: PendingEvent
    sent_at: float
    sends: int


class _Window:
    """The rows queued on one connection and those in flight on it (the loop thread only).

    On each PUBACK (paho's ``on_publish``, called while the loop reads the socket) the row leaves the window
    and the next queued row is published at once; the loop adds rows, handles the outcomes in batches
    (marking delivered, retrying refusals) and watches the ack timeout.
    """

    def __init__(self, client: mqtt.Client, limit: int, topic: Callable[[str], str],
                 wire: Callable[[PendingEvent, bool], str], sends: dict[int, int]) -> None:
        self.client = client
        self.limit = limit
        self._topic = functools.lru_cache(maxsize=16)(topic)  # one topic per event kind
        self._wire = wire
        # seq → publishes of rows that went out without a successful PUBACK: those in flight when the
        # connection ended, and refused ones. Rows acknowledged at once never get here.
        self.sends = sends
        self.queue: deque[PendingEvent] = deque()
        self.inflight: dict[int, _InFlight] = {}  # mid → row, in publish order
        self.outcomes: list[tuple[_InFlight, ReasonCode, float]] = []
        self.refused = False  # paho refused a publish: the connection is gone
        self.closed = False
        self.resent = 0

    def fill(self) -> None:
        """Publish queued rows, in order, while there is room."""
        queue, inflight = self.queue, self.inflight
        while queue and len(inflight) < self.limit and not (self.closed or self.refused):
            row = queue.popleft()
            sends = self.sends.get(row.seq, 0)
            info = self.client.publish(self._topic(row.kind), self._wire(row, sends > 0), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                queue.appendleft(row)
                self.refused = True
                return
            if sends:
                self.resent += 1
            inflight[info.mid] = _InFlight(row, time.monotonic(), sends + 1)

    def acknowledged(self, mid: int, rc: ReasonCode) -> bool:
        """A PUBACK arrived. True when the loop should come for the outcomes now: a refusal, a batch gathered,
        or the queue ran dry (the loop refills it); otherwise it takes them on its next turn."""
        entry = self.inflight.pop(mid, None)
        if entry is None:  # not an event (availability, status, a command result)
            return False
        self.outcomes.append((entry, rc, time.monotonic()))
        return rc.is_failure or len(self.outcomes) >= OUTCOME_BATCH or not self.queue

    def take_outcomes(self) -> list[tuple[_InFlight, ReasonCode, float]]:
        out, self.outcomes = self.outcomes, []
        return out

    def add(self, rows: Iterable[PendingEvent], *, front: bool = False) -> None:
        if front:
            self.queue.extendleft(reversed(list(rows)))
        else:
            self.queue.extend(rows)

    def sizes(self) -> tuple[int, int]:
        """(queued, in flight)."""
        return len(self.queue), len(self.inflight)

    def oldest_sent(self) -> float | None:
        oldest = next(iter(self.inflight.values()), None)
        return None if oldest is None else oldest.sent_at

    def close(self) -> int:
        """No more publishing; returns how many were in flight (their outcome is unknown)."""
        self.closed = True
        for entry in self.inflight.values():
            self.sends[entry.row.seq] = entry.sends
        unknown = len(self.inflight)
        self.inflight.clear()
        self.queue.clear()
        return unknown

    def forget(self) -> None:
        """The outbox file was replaced: every seq here means nothing now."""
        self.queue.clear()
        self.inflight.clear()
        self.outcomes.clear()
        self.sends.clear()


def event_window(configured: int, receive_maximum: int | None) -> int:
    """Events in flight on one connection: the configured window, within the broker's Receive Maximum.

    MQTT 5 brokers state in CONNACK how many QoS 1 messages they take unacknowledged (absent: 65 535); a
    client that sends more is disconnected (0x93). A share of it stays free for availability, status and
    command results.
    """
    if not receive_maximum:
        return configured
    return max(1, min(configured, receive_maximum - min(CONTROL_INFLIGHT, receive_maximum // 4)))


class UplinkError(Exception):
    """A connection attempt failed."""


class RetryDelay(NamedTuple):
    """A wait before the next connection attempt, as the uplink chose it (``Uplink.retry_delays``)."""

    chosen_at: float
    """Monotonic time the wait began."""
    delay_s: float
    urgent: bool
    """An alarm, supervisory signal or fault was waiting: the wait was capped at :data:`URGENT_RETRY_MAX_S`."""
    backoff_s: float
    """The wait the backoff alone would have chosen."""
    node: str = ""
    """``host:port`` of the node the attempt after this wait goes to."""


class NodeAttempt(NamedTuple):
    """One connection attempt and the node it went to, as the uplink chose it (``Uplink.attempts``)."""

    started_at: float
    """Monotonic time the attempt began."""
    node: str
    """``host:port``."""
    node_index: int
    """Its place in ``mqtt.hosts`` (0 for the one node of ``host``/``port``)."""
    connected: bool
    error: str | None
    timeout_s: float = 0.0
    """How long it was given: the connect timeout, or :data:`URGENT_RETRY_MAX_S` with several nodes while
    something urgent waits."""


def backoff_delays(rng: random.Random | None = None) -> Any:
    """Jittered exponential backoff: 1 s doubling to 60 s, each delay ×0.8–1.2, clamped to [1, 60]."""
    r = rng or random.Random()
    base = BACKOFF_MIN_S
    while True:
        yield min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, base * r.uniform(0.8, 1.2)))
        base = min(BACKOFF_MAX_S, base * 2)


class _LoopIO:
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


class Uplink:
    """Forwards the outbox to the broker and receives commands."""

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        outbox: Outbox,
        topics: Topics,
        *,
        birth: Callable[[], dict[str, Any]] | None = None,
        on_command: Callable[[mqtt.MQTTMessage], Awaitable[None]] | None = None,
        heartbeat: Callable[[], None] | None = None,
        on_delivered: Callable[[list[PendingEvent]], None] | None = None,
        connect_timeout_s: float = 10.0,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        prefetch: int = PREFETCH_ROWS,
    ) -> None:
        self.cfg = mqtt_cfg
        self.outbox = outbox
        self.topics = topics
        self._birth = birth
        self._on_command = on_command
        self._heartbeat = heartbeat
        self._on_delivered = on_delivered
        """Told of each alarm, supervisory and fault row the broker acknowledged (transmission supervision)."""
        self._connect_timeout = connect_timeout_s
        self._client: mqtt.Client | None = None
        self.ack_timeout_s = ack_timeout_s
        self.rejected_retry_s = REJECTED_RETRY_S
        self.prefetch = max(1, prefetch)
        # Forwarding state (the loop thread only); what one connection has queued and in flight is its _Window.
        self._window: _Window | None = None
        self._acked: list[tuple[int, int]] = []  # (seq, publishes) acknowledged, not yet marked in SQLite
        self._acked_since: float | None = None
        self._acked_generation = outbox.generation
        self._rejected: dict[int, tuple[PendingEvent, float]] = {}  # seq → (row, retry due)
        self._sends: dict[int, int] = {}  # publishes of rows still without a successful PUBACK
        self._cursor = 0  # highest seq taken from the outbox on this connection
        self._stale = True  # the outbox may hold rows after the cursor
        self._fetching = False
        self._arrived: list[PendingEvent] = []  # rows committed while a fetch was under way
        self._window_generation = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: _LoopIO | None = None
        self._marking: asyncio.Task[None] | None = None  # acks being written to the outbox, beside publishing
        self._ack_wake_scheduled = False
        self._progress = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._sleep_wake = asyncio.Event()  # stop, or an urgent event stored during a backoff
        self._urgent_stored = False
        self._stopping = False
        outbox.on_append(self._appended)
        self.resent_total = 0
        self.outcome_unknown_total = 0
        self.connected = False
        self.rtt_ms: float | None = None
        self.window_limit = mqtt_cfg.max_inflight
        """Events allowed in flight on the current connection (see :func:`event_window`)."""
        self.delivered_total = 0
        self.rejected_total = 0
        self.subscriptions_refused = 0
        """Command subscriptions the broker refused (each asked for again)."""
        self.command_subscription: list[int] = []
        """The broker's answer to the last command subscription (SUBACK codes: the QoS granted, or 128)."""
        self._refusals: weakref.WeakKeyDictionary[mqtt.Client, int] = weakref.WeakKeyDictionary()
        self.connections = 0
        self.last_error: str | None = None
        self.retry_delays: deque[RetryDelay] = deque(maxlen=256)
        """The waits between connection attempts, newest last (a wait cut short by an urgent event is listed
        again with its shorter length)."""
        self.nodes: tuple[tuple[str, int], ...] = mqtt_cfg.endpoints
        """The broker's nodes, ``mqtt.hosts`` in order (one node: ``mqtt.host``/``mqtt.port``)."""
        self._moved_at_once = -STABLE_CONNECTION_S  # when a lost connection last moved on without a wait
        self.node_index = 0
        """The node connected to, or the one the next attempt goes to."""
        self.attempts: deque[NodeAttempt] = deque(maxlen=256)
        """Every connection attempt and its node, newest last."""
        self._copy_tasks: set[asyncio.Future[None]] = set()
        self.standby: Standby | None = None
        """With several nodes: the second connection that carries urgent events while this one is down."""
        if len(self.nodes) > 1:
            self.standby = Standby(mqtt_cfg, topics.event, self._wire_payload, on_connect=self._standby_connected)
        _warn_transport(mqtt_cfg)

    @property
    def broker(self) -> str:
        """host:port of the node connected to (or tried next)."""
        host, port = self.nodes[self.node_index]
        return _node_name(host, port)

    def _next_node(self) -> None:
        """Move on to the next node of the cluster (no-op with one node)."""
        self.node_index = (self.node_index + 1) % len(self.nodes)

    @property
    def inflight(self) -> int:
        """Events published and waiting for their PUBACK."""
        window = self._window
        return 0 if window is None else window.sizes()[1]

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, forward, reconnect — until :meth:`stop`. Nothing that goes wrong ends this loop."""
        delays = backoff_delays()
        self._loop = asyncio.get_running_loop()
        if self.standby is not None:
            self.standby.start()
        while not self._stopping:
            self._beat()
            try:
                client = await self._connect()
            except UplinkError as exc:
                self.last_error = str(exc)
                failed = self.broker
                self._next_node()
                waiting: int | str = "unknown"
                with contextlib.suppress(sqlite3.Error, ValueError):
                    waiting, _ = await self.outbox.backlog()
                wait = await self._retry_delay(next(delays))
                log.warning("uplink down; events buffered", broker=failed, error=str(exc), waiting=waiting,
                            retry_in_s=round(wait.delay_s, 1), urgent=wait.urgent, next_broker=self.broker)
                await self._sleep(wait.delay_s, urgent=wait.urgent, start=wait.chosen_at)
                continue
            connected_at = time.monotonic()
            if self.standby is not None:
                self.standby.primary_up(self.node_index)
            try:
                await self._forward(client)
            except Exception as exc:  # a bug or storage trouble must not stall the uplink: reconnect
                self.last_error = f"forwarding failed: {exc!r}"
                log.error("uplink forwarding failed; reconnecting", error=repr(exc))
            finally:
                await self._drop(client)
                if not self._stopping:
                    self._next_node()
                    if self.standby is not None:
                        self.standby.primary_down()
                        self._copy_urgent_soon()  # the node may be gone; every node of the cluster serves the same
            # The backoff starts over only after a connection that held; one the broker drops at once (a
            # client id taken over, an ACL) must not turn into a reconnect storm. Never straight back in.
            now = time.monotonic()
            if now - connected_at >= STABLE_CONNECTION_S:
                delays = backoff_delays()
            if not self._stopping:
                # Another node of the cluster is as good as the lost one: the first attempt goes to it at once,
                # the backoff applies from the next one on — at most once per STABLE_CONNECTION_S, so that
                # connections the nodes drop at once do not turn into a storm.
                at_once = len(self.nodes) > 1 and now - self._moved_at_once >= STABLE_CONNECTION_S
                if at_once:
                    self._moved_at_once = now
                wait = await self._retry_delay(0.0 if at_once else next(delays))
                log.info("uplink reconnecting", next_broker=wait.node, retry_in_s=round(wait.delay_s, 1),
                         urgent=wait.urgent)
                await self._sleep(wait.delay_s, urgent=wait.urgent, start=wait.chosen_at)

    async def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Planned stop: flush what can be flushed in time, publish a clean offline, disconnect."""
        deadline = time.monotonic() + flush_timeout_s
        while self.connected and time.monotonic() < deadline:
            try:
                self._take_acks()
                await self._marked()
                await self._flush_acks()
                waiting, _ = await self.outbox.backlog()
            except (sqlite3.Error, ValueError):
                break
            if waiting == 0 and not self.inflight:
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=max(0.01, min(0.1, deadline - time.monotonic())))
        self._stopping = True
        self._stop_requested.set()
        self._sleep_wake.set()
        if self.standby is not None:
            self.standby.stop()
        client = self._client
        if client is not None and self.connected:
            info = client.publish(self.topics.availability, self._availability("offline", "planned stop"),
                                  qos=1, retain=True)
            with contextlib.suppress(TimeoutError, RuntimeError, ValueError):
                await asyncio.wait_for(asyncio.to_thread(info.wait_for_publish, 2.0), timeout=3.0)
            client.disconnect()
        self._lost.set()
        self._progress.set()

    # ------------------------------------------------------------------------------ connection

    async def _connect(self) -> mqtt.Client:
        loop = self._loop = asyncio.get_running_loop()
        outcome: asyncio.Future[ReasonCode | str] = loop.create_future()

        def settle(value: ReasonCode | str) -> None:
            if not outcome.done():
                outcome.set_result(value)

        v5 = self.cfg.protocol == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
            clean_session=None if v5 else True,
        )
        client.will_set(self.topics.availability, self._availability("offline", "connection lost"), qos=1,
                        retain=True)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls or self.cfg.tls_ca_file or self.cfg.tls_cert_file:
            # The broker's certificate chain is always verified (the system CAs when no ca_file is given);
            # mqtt.tls.insecure only skips the host name check.
            client.tls_set(ca_certs=self.cfg.tls_ca_file, certfile=self.cfg.tls_cert_file,
                           keyfile=self.cfg.tls_key_file, cert_reqs=ssl.CERT_REQUIRED)
            if self.cfg.tls_insecure:
                client.tls_insecure_set(True)
        # Room beyond the event window for availability, birth, status and command results (lowered to the
        # broker's Receive Maximum once CONNACK states one).
        client.max_inflight_messages_set(self.cfg.max_inflight + CONTROL_INFLIGHT)
        client.max_queued_messages_set(0)
        timeout = self._connect_timeout
        if len(self.nodes) > 1 and timeout > URGENT_RETRY_MAX_S:
            # Another node may answer at once: while something urgent waits, give this one no longer than the
            # longest wait between attempts (a cluster node can hold a CONNECT unanswered while it elects leaders).
            with contextlib.suppress(sqlite3.Error, ValueError):
                if await self.outbox.urgent_waiting():
                    timeout = URGENT_RETRY_MAX_S
        client.connect_timeout = timeout
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
            window = self._window
            if window is not None and window.client is c:
                wake = window.acknowledged(mid, rc)
                window.fill()
                if wake:
                    self._wake_for_outcomes()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(self._message, msg)

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: list[ReasonCode], props: Any) -> None:
            self.command_subscription = [int(rc.value) for rc in codes]
            if any(rc.is_failure for rc in codes):
                with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                    loop.call_soon_threadsafe(self._subscription_refused, c, [str(rc) for rc in codes])

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        self._lost.clear()
        io = _LoopIO(loop, client, lambda reason: self._disconnected(client, reason))
        self._io = io
        kwargs: dict[str, Any] = {"clean_start": True} if v5 else {}
        host, port = self.nodes[self.node_index]
        attempt = NodeAttempt(time.monotonic(), _node_name(host, port), self.node_index, False, None, timeout)
        connect = functools.partial(client.connect, host, port, self.cfg.keepalive_s, **kwargs)
        try:
            # connect() resolves, opens the socket and shakes hands (TLS): blocking work, so on a worker thread.
            await asyncio.wait_for(loop.run_in_executor(None, connect), timeout=timeout + 2.0)
            result = await asyncio.wait_for(outcome, timeout=timeout + 2.0)
        except (TimeoutError, OSError, ValueError) as exc:
            await self._drop(client)
            error = f"connect: {exc or 'timed out'}"
            self.attempts.append(attempt._replace(error=error))
            raise UplinkError(error) from None
        except asyncio.CancelledError:  # stopping while a connect hangs: the socket is closed once it opens
            io.detach()
            raise
        if isinstance(result, str) or result.is_failure:
            await self._drop(client)
            self.attempts.append(attempt._replace(error=f"connect refused: {result}"))
            raise UplinkError(f"connect refused: {result}")
        self.attempts.append(attempt._replace(connected=True))
        receive_maximum = connack.get("receive_maximum")
        self.window_limit = event_window(self.cfg.max_inflight, receive_maximum)
        if self.window_limit < self.cfg.max_inflight:
            log.info("broker's receive maximum limits the events in flight", receive_maximum=receive_maximum,
                     window=self.window_limit, configured=self.cfg.max_inflight)
        self._client = client
        self.connected = True
        self.connections += 1
        log.info("uplink connected", broker=self.broker, session=self.outbox.session)
        return client

    async def _drop(self, client: mqtt.Client) -> None:
        self._take_acks()  # PUBACKs that arrived before the end still count
        if self._client is client:
            self._client = None
        self.connected = False
        window, self._window = self._window, None
        unknown = 0
        if window is not None and window.client is client:
            unknown = window.close()
            self._outcomes(window, window.take_outcomes())
        self.outcome_unknown_total += unknown
        self._rejected.clear()
        self._cursor = 0
        self._stale = True
        await self._marked()  # before the next connection reads the outbox again
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._flush_acks()
        if unknown:
            log.warning("uplink lost with events in flight: outcome unknown, they will be sent again",
                        inflight=unknown)
        with contextlib.suppress(Exception):  # already gone
            client.disconnect()
            client.loop_write()  # hands DISCONNECT to the socket now; paho closes it after
        io, self._io = self._io, None
        if io is not None and io.client is client:
            io.detach()

    def _subscription_refused(self, client: mqtt.Client, codes: list[str]) -> None:
        """The broker refused the command subscription (a cluster node may time out creating it while another
        node is lost): ask again on the same connection, or the gateway would stay deaf to commands on it."""
        self.subscriptions_refused += 1
        refusals = self._refusals[client] = self._refusals.get(client, 0) + 1
        delay = min(SUBSCRIBE_RETRY_MAX_S, SUBSCRIBE_RETRY_S * 2 ** (refusals - 1))
        log.warning("broker refused the command subscription; asking again", reason=codes, retry_in_s=delay)

        def again() -> None:
            if client is self._client and self.connected:
                client.subscribe(self.topics.command_filter, qos=COMMAND_QOS)

        if self._loop is not None:
            self._loop.call_later(delay, again)

    def _disconnected(self, client: mqtt.Client, reason: object) -> None:
        if client is self._client:
            self.connected = False
            self.last_error = f"disconnected: {reason}"
            self._lost.set()
            self._progress.set()
            if self.standby is not None and not self._stopping:
                self.standby.primary_down()
                self._copy_urgent_soon()

    # ------------------------------------------------------------------------------ standby copies

    def _standby_connected(self) -> None:
        """On paho's thread: the standby connection came up; copy what waits if the main one is down."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(self._copy_urgent_soon)

    def _copy_urgent_soon(self) -> None:
        """Copy every urgent event still waiting for its PUBACK over the standby connection, in a task."""
        if self.standby is not None and self.standby.copying and not self._stopping:
            task = asyncio.ensure_future(self._copy_urgent())
            self._copy_tasks.add(task)
            task.add_done_callback(self._copy_tasks.discard)

    async def _copy_urgent(self) -> None:
        standby = self.standby
        if standby is None:
            return
        try:
            rows = await self.outbox.urgent_pending(limit=self.prefetch)
        except Exception as exc:  # storage trouble must not end the uplink; the durable path still sends them
            log.warning("could not read urgent events for the standby connection", error=repr(exc))
            return
        if not self.connected:
            standby.copy(rows)

    # ------------------------------------------------------------------------------ forwarding

    async def _forward(self, client: mqtt.Client) -> None:
        client.publish(self.topics.availability, self._availability("online"), qos=1, retain=True)
        if self._birth is not None:
            birth = self._stamped(self._birth())
            client.publish(self.topics.birth, json.dumps(birth, separators=(",", ":")), qos=1, retain=True)
        client.subscribe(self.topics.command_filter, qos=COMMAND_QOS)
        # Rows flow: outbox (by seq, after the cursor) → window queue → publish (at most max_inflight without a
        # PUBACK; refilled as each PUBACK is read) → PUBACK → marked delivered in batches. A row is
        # never taken twice on one connection.
        generation = self.outbox.generation
        window = _Window(client, self.window_limit, self.topics.event, self._wire_payload, self._sends)
        self._window, self._window_generation = window, generation
        self._stale = True
        await self._pump(window, generation)

    async def _pump(self, window: _Window, generation: int) -> None:
        while not self._lost.is_set():
            self._beat()
            if self.outbox.generation != generation:  # the file was replaced: its seqs mean nothing now
                generation = self._window_generation = self.outbox.generation
                window.forget()
                self._forget_rows()
            if window.refused:
                self.last_error = "publish refused: not connected"
                return
            sent_at = window.oldest_sent()
            if sent_at is not None and time.monotonic() - sent_at > self.ack_timeout_s:
                self.last_error = f"no PUBACK within {self.ack_timeout_s:g} s"
                log.warning("broker stopped acknowledging; reconnecting", inflight=self.inflight,
                            ack_timeout_s=self.ack_timeout_s)
                return
            self._requeue_rejected(window)
            queued, _ = window.sizes()
            try:
                if self._stale and queued < self.prefetch // 2 + 1:
                    self._stale = False
                    self._fetching = True
                    try:
                        rows = await self.outbox.pending(after=self._cursor, limit=self.prefetch)
                    finally:
                        self._fetching = False
                        arrived, self._arrived = self._arrived, []
                    if len(rows) >= self.prefetch:
                        self._stale = True
                    if rows and self.outbox.generation == generation:
                        window.add(r for r in rows if r.seq > self._cursor)
                        self._cursor = max(self._cursor, rows[-1].seq)
                    if arrived:
                        self._take_appended([r for r in arrived if r.seq > self._cursor])
                window.fill()
                queued, _ = window.sizes()
                if self._acks_due(idle=not queued and not self._stale) and (
                        self._marking is None or self._marking.done()):
                    # In a task of its own: publishing goes on while the outbox is busy with a commit.
                    self._marking = asyncio.create_task(self._mark_in_background(generation))
            except (sqlite3.Error, ValueError) as exc:
                self._stale = True
                await self._storage_trouble(exc, generation)
                continue
            self._progress.clear()
            queued, inflight = window.sizes()
            if (self._stale and queued < self.prefetch // 2 + 1) or (queued and inflight < window.limit):
                continue
            await self._wait_progress(self._wait_timeout())

    def _wire_payload(self, row: PendingEvent, resend: bool = False) -> str:
        """The stored JSON plus ``historical``, ``sent`` and ``age_s``.

        ``historical`` is true only for a copy sent again (a standby copy went first, too) or an event of an
        earlier session: an alarm raised in this session before the link came up is sent for the first time, and
        is live — ``age_s`` says how long it waited. The age comes from the monotonic clock for events of this
        boot (a wall clock set by NTP meanwhile does not change it), from the wall clock for events from before a
        reboot.
        """
        now = time.time()
        historical = (resend or row.session != self.outbox.session
                      or (self.standby is not None and self.standby.was_copied(row.event_id)))
        age = time.monotonic() - row.mono if row.session in self.outbox.sessions_this_boot else now - row.wall
        return (f'{row.payload[:-1]},"historical":{"true" if historical else "false"},"sent":"{iso_time(now)}",'
                f'"age_s":{max(0.0, round(age, 3))}}}')

    def _wake_for_outcomes(self) -> None:
        """Have the loop take the window's outcomes after this read of the socket (one call for a run of PUBACKs)."""
        if self._ack_wake_scheduled:
            return
        self._ack_wake_scheduled = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon(self._take_acks)

    def _take_acks(self) -> None:
        """On the loop: handle the outcomes of every PUBACK since the last call."""
        self._ack_wake_scheduled = False
        window = self._window
        if window is not None:
            self._outcomes(window, window.take_outcomes())

    def _outcomes(self, window: _Window, outcomes: list[tuple[_InFlight, ReasonCode, float]]) -> None:
        refused = False
        urgent: list[PendingEvent] = []
        for entry, rc, acked_at in outcomes:
            row = entry.row
            if rc.is_failure:  # MQTT 5 reason code ≥ 0x80: the broker did not take it
                refused = True
                self.rejected_total += 1
                self._rejected[row.seq] = (row, time.monotonic() + self.rejected_retry_s)
                log.error("broker rejected event; will retry", event_id=row.event_id, kind=row.kind,
                          reason=str(rc), reason_code=f"0x{rc.value:02x}", retry_in_s=self.rejected_retry_s)
                continue
            # Success, including 0x10 "no matching subscribers": the broker has it.
            rtt = (acked_at - entry.sent_at) * 1000
            self.rtt_ms = rtt if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * rtt
            if not self._acked:
                self._acked_since = acked_at
            self._acked.append((row.seq, entry.sends))
            self.delivered_total += 1
            if row.priority > 0:
                log.info("event forwarded", event_id=row.event_id, kind=row.kind)
            if row.priority >= URGENT_PRIORITY:
                urgent.append(row)
        if urgent and self._on_delivered is not None:
            try:
                self._on_delivered(urgent)
            except Exception:  # a listener must not leave the window half-handled
                log.exception("delivery listener failed")
        if outcomes:
            if window.sends or refused:
                for entry, rc, _ in outcomes:
                    if rc.is_failure:
                        window.sends[entry.row.seq] = entry.sends
                    else:
                        window.sends.pop(entry.row.seq, None)
            self.resent_total += window.resent
            window.resent = 0
            if len(self._sends) > 100_000:  # rows evicted while unacknowledged leave entries behind
                self._sends.clear()
            self._progress.set()

    def _requeue_rejected(self, window: _Window) -> None:
        """Rejected rows whose wait is over go to the front of the queue (later rows were not held back)."""
        if not self._rejected:
            return
        now = time.monotonic()
        due = sorted(seq for seq, (_, at) in self._rejected.items() if now >= at)
        if due:
            window.add((self._rejected.pop(seq)[0] for seq in due), front=True)

    def _acks_due(self, *, idle: bool) -> bool:
        if not self._acked:
            return False
        return (idle or self._stopping or len(self._acked) >= ACK_BATCH
                or time.monotonic() - (self._acked_since or 0.0) >= ACK_DELAY_S)

    async def _marked(self) -> None:
        """Wait for the background ack marking, if one runs."""
        if self._marking is not None:
            with contextlib.suppress(Exception):
                await self._marking

    async def _mark_in_background(self, generation: int) -> None:
        try:
            await self._flush_acks()
        except (sqlite3.Error, ValueError) as exc:  # the acks stay queued; the next flush tries again
            await self._storage_trouble(exc, generation)

    async def _flush_acks(self) -> None:
        """Mark acknowledged rows delivered, in one transaction. On failure they stay queued for the next try."""
        if not self._acked:
            return
        if self._acked_generation != self.outbox.generation:  # acks for a file that was replaced
            self._acked.clear()
            self._acked_generation = self.outbox.generation
            return
        acked, self._acked = self._acked, []
        since, self._acked_since = self._acked_since, None
        try:
            await self.outbox.mark_delivered(acked)
        except BaseException:
            self._acked = acked + self._acked
            self._acked_since = since
            raise

    def _forget_rows(self) -> None:
        """Drop every seq-based state of the loop (the outbox file was replaced)."""
        self._rejected.clear()
        self._acked.clear()
        self._acked_generation = self.outbox.generation
        self._cursor = 0
        self._stale = True

    def _appended(self, rows: list[PendingEvent]) -> None:
        """New rows committed: when caught up, take them straight into the window (no re-read); else re-read.

        Rows committed while a fetch is under way may or may not be in its result: they wait beside it and
        those after what it returned are taken when it is done. An urgent row stored while the uplink backs
        off shortens the wait (:meth:`_sleep`).
        """
        if not self.connected and any(r.priority >= URGENT_PRIORITY for r in rows):
            self._urgent_stored = True
            self._sleep_wake.set()
            if self.standby is not None:
                self.standby.copy(r for r in rows if r.priority >= URGENT_PRIORITY)
        if self._fetching:
            self._arrived.extend(rows)
        else:
            self._take_appended(rows)
        self._progress.set()

    def _take_appended(self, rows: list[PendingEvent]) -> None:
        window = self._window
        if not rows:
            return
        if (window is not None and not self._stale and self._window_generation == self.outbox.generation
                and rows[0].seq == self._cursor + 1 and window.sizes()[0] < self.prefetch):
            window.add(rows)
            self._cursor = rows[-1].seq
        else:
            self._stale = True

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        timeout = 1.0  # heartbeat and ack-timeout checks
        window = self._window
        if window is not None and window.outcomes:
            timeout = ACK_DELAY_S
        if self._acked:
            timeout = min(timeout, (self._acked_since or now) + ACK_DELAY_S - now)
        if self._rejected:
            timeout = min(timeout, min(at for _, at in self._rejected.values()) - now)
        return max(0.001, timeout)

    async def _wait_progress(self, timeout: float) -> None:
        """Wait for a PUBACK, new rows, a disconnect or stop — or ``timeout`` (no task per wait)."""
        handle = asyncio.get_running_loop().call_later(timeout, self._progress.set)
        try:
            await self._progress.wait()
        finally:
            handle.cancel()

    async def _storage_trouble(self, exc: BaseException, generation: int) -> None:
        """A read or ack write failed: busy → wait and retry; corrupt → the outbox replaces the file."""
        log.warning("outbox unavailable to the uplink; retrying", error=str(exc))
        with contextlib.suppress(sqlite3.Error, OSError, ValueError):
            await self.outbox.recover(exc, generation=generation)
        await self._wait_progress(STORAGE_RETRY_S)

    def _beat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat()

    # ------------------------------------------------------------------------------ helpers

    def _message(self, msg: mqtt.MQTTMessage) -> None:
        if self._on_command is not None:
            task = asyncio.ensure_future(self._on_command(msg))
            task.add_done_callback(_log_failure)

    def publish_json(self, topic: str, body: dict[str, Any], *, retain: bool = False,
                     properties: Properties | None = None) -> bool:
        """Publish a message that is not an event (status, command result). False when offline."""
        client = self._client
        if client is None or not self.connected:
            return False
        info = client.publish(topic, json.dumps(self._stamped(body), separators=(",", ":")), qos=1, retain=retain,
                              properties=properties)
        return bool(info.rc == mqtt.MQTT_ERR_SUCCESS)

    def _stamped(self, body: dict[str, Any]) -> dict[str, Any]:
        """A message that names a session also names the installation that session belongs to."""
        if "session" in body and "install" not in body and self.outbox.install:
            body = {**body, "install": self.outbox.install}
        return body

    def _availability(self, state: str, reason: str | None = None) -> str:
        body = availability_message(gateway=self.outbox.gateway_id, community=self.topics.community,
                                    building=self.topics.building, state=state, session=self.outbox.session,
                                    reason=reason, install=self.outbox.install or None)
        return json.dumps(body, separators=(",", ":"))

    async def _retry_delay(self, backoff: float) -> RetryDelay:
        """The wait before the next attempt: today's backoff, capped while something urgent waits."""
        self._urgent_stored = False
        try:
            urgent = await self.outbox.urgent_waiting()
        except (sqlite3.Error, ValueError):  # nothing can be read, so nothing could be sent either
            urgent = False
        wait = RetryDelay(time.monotonic(), min(backoff, URGENT_RETRY_MAX_S) if urgent else backoff, urgent, backoff,
                          self.broker)
        self.retry_delays.append(wait)
        return wait

    async def _sleep(self, seconds: float, *, urgent: bool = False, start: float | None = None) -> None:
        """Back off for ``seconds``, feeding the heartbeat (the uplink is alive, only the broker is not) and waking
        at once on :meth:`stop`. An urgent event stored meanwhile cuts the wait to :data:`URGENT_RETRY_MAX_S`
        from its ``start`` (default: now)."""
        start = time.monotonic() if start is None else start
        end = start + seconds
        while not self._stopping:
            self._beat()
            if self._urgent_stored and not urgent:
                urgent = True
                if end > start + URGENT_RETRY_MAX_S:
                    end = start + URGENT_RETRY_MAX_S
                    self.retry_delays.append(RetryDelay(start, URGENT_RETRY_MAX_S, True, seconds, self.broker))
                    log.info("urgent event waiting; next connection attempt sooner",
                             retry_in_s=round(max(0.0, end - time.monotonic()), 1))
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._sleep_wake.clear()
            if self._stopping or (self._urgent_stored and not urgent):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sleep_wake.wait(), min(remaining, 5.0))


def _node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _warn_transport(cfg: MqttConfig) -> None:
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


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("command handler failed", error=repr(task.exception()))
