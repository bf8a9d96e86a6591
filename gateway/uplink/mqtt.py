"""The uplink's glue: the gateway announced on each connection (availability, birth) and its commands taken in.

``Uplink`` connects, forwards, takes commands and reconnects by wiring the parts, each with its own module.
:mod:`~gateway.uplink.transport` holds the connection (paho-mqtt on the asyncio loop),
:mod:`~gateway.uplink.retry` decides which node comes next and how long to wait (pure),
:mod:`~gateway.uplink.forward` sends the rows in order through the in-flight window, and
:mod:`~gateway.uplink.acks` marks them delivered — a row leaves the outbox only on its own PUBACK. Here: the
retained ``online`` and birth on each connection, the command subscription (asked for again when refused), each
command handed to the command handler, the waits between attempts (cut short when an urgent event is stored
meanwhile) and the planned stop (flush, a retained ``offline``, DISCONNECT). With several nodes, the
:mod:`~gateway.uplink.standby` connection is told when the main one is up or down and given the urgent rows to
copy while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig
from gateway.uplink.acks import AckStore
from gateway.uplink.contract import availability_message
from gateway.uplink.forward import ACK_TIMEOUT_S, PREFETCH_ROWS, URGENT_PRIORITY, Forwarder
from gateway.uplink.outbox import Outbox, PendingEvent
from gateway.uplink.retry import URGENT_RETRY_MAX_S, RetryDelay, RetryPolicy, subscribe_retry_s
from gateway.uplink.standby import Standby
from gateway.uplink.topics import Topics
from gateway.uplink.transport import Transport, UplinkError

__all__ = ["COMMAND_QOS", "Uplink"]

log = structlog.get_logger()
#: QoS of the command subscription. The session is clean, so a command reaches the gateway only while it is
#: connected, and QoS 1 would add nothing across a lost connection (its queue goes with the session); what
#: makes a command safe is its id, its validity window and its one result (docs/mqtt.md, "Remote commands").
#: On a clustered broker a QoS 1 subscription is a replicated consumer per building, which a lost node's
#: buildings must wait for to be elected again (benchmarks/fleet.py, 1000 buildings: failover p99 13.7–26.2 s
#: with QoS 1; with QoS 0, 1.1 s when the lost node led no event stream; docs/fleet.md).
COMMAND_QOS = 0


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
        self._connect_timeout = connect_timeout_s
        self.acks = AckStore(outbox)
        self.standby: Standby | None = None
        """With several nodes: the second connection that carries urgent events while this one is down."""
        if len(mqtt_cfg.endpoints) > 1:
            self.standby = Standby(mqtt_cfg, topics.event, lambda row: self.forwarder.wire_payload(row),
                                   on_connect=self._copy_urgent_soon)
        self.forwarder = Forwarder(outbox, self.acks, topics.event, heartbeat=self._beat, on_delivered=on_delivered,
                                   ack_timeout_s=ack_timeout_s, prefetch=prefetch,
                                   was_copied=None if self.standby is None else self.standby.was_copied)
        self.transport = Transport(mqtt_cfg, on_publish=self.forwarder.published, on_message=self._message,
                                   on_subscribe=self._subscribed, on_lost=self._lost)
        self.policy = RetryPolicy(self.transport.node_names())
        self._copy_tasks: set[asyncio.Future[None]] = set()
        self._sleep_wake = asyncio.Event()  # stop, or an urgent event stored during a backoff
        self._urgent_stored = False
        self._stopping = False
        outbox.on_append(self._appended)
        self.last_error: str | None = None
        self.subscriptions_refused = 0
        """Command subscriptions the broker refused (each asked for again)."""
        self.command_subscription: list[int] = []
        """The broker's answer to the last command subscription (SUBACK codes: the QoS granted, or 128)."""
        self._refusals: weakref.WeakKeyDictionary[mqtt.Client, int] = weakref.WeakKeyDictionary()
        self.retry_delays: deque[RetryDelay] = deque(maxlen=256)
        """The waits between connection attempts, newest last (a wait cut short by an urgent event is listed
        again with its shorter length)."""

    # ------------------------------------------------------------------------------ what others read

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def connections(self) -> int:
        return self.transport.connections

    @property
    def broker(self) -> str:
        """host:port of the node connected to (or tried next)."""
        return self.policy.node_name

    @property
    def inflight(self) -> int:
        """Events published and waiting for their PUBACK."""
        return self.forwarder.inflight

    @property
    def delivered_total(self) -> int:
        return self.forwarder.delivered_total

    @property
    def rejected_total(self) -> int:
        return self.forwarder.rejected_total

    @property
    def resent_total(self) -> int:
        return self.forwarder.resent_total

    @property
    def rtt_ms(self) -> float | None:
        return self.forwarder.rtt_ms

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, forward, reconnect — until :meth:`stop`. Nothing that goes wrong ends this loop."""
        if self.standby is not None:
            self.standby.start()
        while not self._stopping:
            self._beat()
            try:
                client = await self._connect()
            except UplinkError as exc:
                self.last_error = str(exc)
                await self.acks.flush_quietly()  # acknowledgements a failed write left behind
                failed = self.broker
                waiting = await self.acks.backlog()
                urgent = await self._urgent()
                wait = self._chose(self.policy.attempt_failed(now=time.monotonic(), urgent=urgent))
                log.warning("uplink down; events buffered", broker=failed, error=str(exc), waiting=waiting,
                            retry_in_s=round(wait.delay_s, 1), urgent=wait.urgent, next_broker=self.broker)
                await self._sleep(wait)
                continue
            connected_at = time.monotonic()
            if self.standby is not None:
                self.standby.primary_up(self.policy.node)
            try:
                await self._forward(client)
            except Exception as exc:  # a bug or storage trouble must not stall the uplink: reconnect
                self.last_error = f"forwarding failed: {exc!r}"
                log.error("uplink forwarding failed; reconnecting", error=repr(exc))
            finally:
                await self._drop(client)
            if not self._stopping:
                self._primary_down()  # the node may be gone; every node of the cluster serves the same
                urgent = await self._urgent()
                wait = self._chose(self.policy.connection_lost(connected_at=connected_at, now=time.monotonic(),
                                                               urgent=urgent))
                log.info("uplink reconnecting", next_broker=wait.node, retry_in_s=round(wait.delay_s, 1),
                         urgent=wait.urgent)
                await self._sleep(wait)

    async def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Planned stop: flush what can be flushed in time, publish a clean offline, disconnect."""
        await self.forwarder.drain(flush_timeout_s, lambda: self.connected)
        self._stopping = self.forwarder.stopping = True
        self._sleep_wake.set()
        if self.standby is not None:
            self.standby.stop()
        await self.transport.disconnect((self.topics.availability, self._availability("offline", "planned stop")))
        self.forwarder.progress.set()

    # ------------------------------------------------------------------------------ connection

    async def _connect(self) -> mqtt.Client:
        timeout = self._connect_timeout
        # Another node may answer at once: while something urgent waits, give this one no longer than the
        # longest wait between attempts (a cluster node can hold a CONNECT unanswered while it elects leaders).
        if self.policy.shortens_connect(timeout) and await self.acks.urgent_waiting():
            timeout = URGENT_RETRY_MAX_S
        will = (self.topics.availability, self._availability("offline", "connection lost"))
        client = await self.transport.connect(self.policy.node, timeout_s=timeout, will=will)
        log.info("uplink connected", broker=self.broker, session=self.outbox.session)
        return client

    async def _drop(self, client: mqtt.Client) -> None:
        self.forwarder.take_acks()  # PUBACKs that arrived before the end still count
        self.transport.release(client)
        await self.forwarder.end(client)
        self.transport.close(client)

    def _lost(self, reason: str) -> None:
        self.last_error = reason
        self.forwarder.progress.set()
        if not self._stopping:
            self._primary_down()

    def _subscribed(self, client: mqtt.Client, codes: list[ReasonCode]) -> None:
        self.command_subscription = [int(rc.value) for rc in codes]
        loop = self.transport.loop
        if any(rc.is_failure for rc in codes) and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (process ending)
                loop.call_soon_threadsafe(self._subscription_refused, client, [str(rc) for rc in codes])

    def _subscription_refused(self, client: mqtt.Client, codes: list[str]) -> None:
        """The broker refused the command subscription (a cluster node may time out creating it while another
        node is lost): ask again on the same connection, or the gateway would stay deaf to commands on it."""
        self.subscriptions_refused += 1
        refusals = self._refusals[client] = self._refusals.get(client, 0) + 1
        delay = subscribe_retry_s(refusals)
        log.warning("broker refused the command subscription; asking again", reason=codes, retry_in_s=delay)

        def again() -> None:
            if client is self.transport.client and self.connected:
                client.subscribe(self.topics.command_filter, qos=COMMAND_QOS)

        if self.transport.loop is not None:
            self.transport.loop.call_later(delay, again)

    # ------------------------------------------------------------------------------ on each connection

    async def _forward(self, client: mqtt.Client) -> None:
        client.publish(self.topics.availability, self._availability("online"), qos=1, retain=True)
        if self._birth is not None:
            birth = self._stamped(self._birth())
            client.publish(self.topics.birth, json.dumps(birth, separators=(",", ":")), qos=1, retain=True)
        client.subscribe(self.topics.command_filter, qos=COMMAND_QOS)
        ended = await self.forwarder.run(client, self.transport.window_limit, self.transport.lost)
        if ended is not None:
            self.last_error = ended

    def _appended(self, rows: list[PendingEvent]) -> None:
        """New rows committed: an urgent one stored while the uplink backs off shortens the wait (:meth:`_sleep`);
        the forwarder takes them."""
        if not self.connected and any(r.priority >= URGENT_PRIORITY for r in rows):
            self._urgent_stored = True
            self._sleep_wake.set()
            if self.standby is not None:
                self.standby.copy(r for r in rows if r.priority >= URGENT_PRIORITY)
        self.forwarder.appended(rows)

    def _message(self, msg: mqtt.MQTTMessage) -> None:
        if self._on_command is not None:
            task = asyncio.ensure_future(self._on_command(msg))
            task.add_done_callback(_log_failure)

    def publish_json(self, topic: str, body: dict[str, Any], *, retain: bool = False,
                     properties: Properties | None = None) -> bool:
        """Publish a message that is not an event (status, command result). False when offline."""
        if not self.connected:
            return False
        return self.transport.publish(topic, json.dumps(self._stamped(body), separators=(",", ":")), retain=retain,
                                      properties=properties)

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

    # ------------------------------------------------------------------------------ standby copies

    def _primary_down(self) -> None:
        """The main connection is down: urgent events waiting go out on the standby connection as copies."""
        if self.standby is not None:
            self.standby.primary_down()
            self._copy_urgent_soon()

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
            rows = await self.outbox.urgent_pending(limit=self.forwarder.prefetch)
        except Exception as exc:  # storage trouble must not end the uplink; the durable path still sends them
            log.warning("could not read urgent events for the standby connection", error=repr(exc))
            return
        if not self.connected:
            standby.copy(rows)

    # ------------------------------------------------------------------------------ between connections

    async def _urgent(self) -> bool:
        """Does an alarm, supervisory signal or fault wait? (Asked as each wait is chosen.)"""
        self._urgent_stored = False
        return await self.acks.urgent_waiting()

    def _chose(self, wait: RetryDelay) -> RetryDelay:
        self.retry_delays.append(wait)
        return wait

    async def _sleep(self, wait: RetryDelay) -> None:
        """Back off for ``wait``, feeding the heartbeat (the uplink is alive, only the broker is not) and waking
        at once on :meth:`stop`. An urgent event stored meanwhile cuts the wait to :data:`URGENT_RETRY_MAX_S`
        from its start."""
        urgent = wait.urgent
        end = wait.chosen_at + wait.delay_s
        while not self._stopping:
            self._beat()
            if self._urgent_stored and not urgent:
                urgent = True
                cut = self.policy.urgent_cut(wait)
                if cut is not None:
                    end = cut.chosen_at + cut.delay_s
                    self._chose(cut)
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

    def _beat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("command handler failed", error=repr(task.exception()))
