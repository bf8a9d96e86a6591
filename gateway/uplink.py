"""MQTT uplink: connect, announce, forward the outbox in order, and drop a row only on its own PUBACK.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) runs its network thread; its callbacks only post to the
asyncio loop. A fresh paho client is made for every connection, so paho's in-memory queue is never the
store: on a disconnect every row without a PUBACK is "outcome unknown" and is sent again — with the same
event id — from the outbox after reconnecting (jittered backoff, 1 s to 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig
from gateway.contract import availability_message
from gateway.outbox import Outbox, PendingEvent
from gateway.topics import Topics

__all__ = ["Uplink", "UplinkError"]

log = structlog.get_logger()
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
REJECTED_RETRY_S = 5.0


class UplinkError(Exception):
    """A connection attempt failed."""


def backoff_delays(rng: random.Random | None = None) -> Any:
    """Jittered exponential backoff: 1 s doubling to 60 s, each delay ×0.8–1.2, clamped to [1, 60]."""
    r = rng or random.Random()
    base = BACKOFF_MIN_S
    while True:
        yield min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, base * r.uniform(0.8, 1.2)))
        base = min(BACKOFF_MAX_S, base * 2)


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
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.cfg = mqtt_cfg
        self.outbox = outbox
        self.topics = topics
        self._birth = birth
        self._on_command = on_command
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout_s
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, tuple[PendingEvent, float]] = {}
        self._acked: list[int] = []
        self._rejected: dict[int, float] = {}
        self._next_after = 0
        self._progress = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._connected_mono = 0.0
        self.connected = False
        self.rtt_ms: float | None = None
        self.delivered_total = 0
        self.rejected_total = 0
        self.connections = 0
        self.last_error: str | None = None
        _warn_transport(mqtt_cfg)

    @property
    def broker(self) -> str:
        """host:port of the broker."""
        return f"{self.cfg.host}:{self.cfg.port}"

    @property
    def inflight(self) -> int:
        """Events published and waiting for their PUBACK."""
        return len(self._inflight)

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, forward, reconnect — until :meth:`stop`."""
        delays = backoff_delays()
        while not self._stopping:
            try:
                client = await self._connect()
            except UplinkError as exc:
                self.last_error = str(exc)
                waiting, _ = await self.outbox.backlog()
                delay = next(delays)
                log.warning("uplink down; events buffered", broker=self.broker, error=str(exc),
                            waiting=waiting, retry_in_s=round(delay, 1))
                await self._sleep(delay)
                continue
            delays = backoff_delays()
            try:
                await self._forward(client)
            finally:
                await self._drop(client)

    async def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Planned stop: flush what can be flushed in time, publish a clean offline, disconnect."""
        deadline = time.monotonic() + flush_timeout_s
        while self.connected and time.monotonic() < deadline:
            waiting, _ = await self.outbox.backlog()
            if waiting == 0 and not self._inflight:
                break
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        self._stopping = True
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
        loop = asyncio.get_running_loop()
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
        client.max_inflight_messages_set(self.cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = self._connect_timeout
        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
            loop.call_soon_threadsafe(settle, rc)

        def on_connect_fail(c: mqtt.Client, u: Any) -> None:
            # paho calls this while handling the OSError (TLS verification, refused, ...): keep its reason
            failure = sys.exc_info()[1]
            loop.call_soon_threadsafe(settle, f"connection failed: {failure}" if failure else "connection failed")

        def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
            loop.call_soon_threadsafe(self._disconnected, c, rc)

        def on_publish(c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            loop.call_soon_threadsafe(self._puback, c, mid, rc)

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            loop.call_soon_threadsafe(self._message, msg)

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        self._lost.clear()
        try:
            if v5:
                client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=True)
            else:
                client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
            client.loop_start()
            result = await asyncio.wait_for(outcome, timeout=self._connect_timeout + 2.0)
        except (TimeoutError, OSError, ValueError) as exc:
            await self._drop(client)
            raise UplinkError(f"connect: {exc or 'timed out'}") from None
        if isinstance(result, str) or result.is_failure:
            await self._drop(client)
            raise UplinkError(f"connect refused: {result}")
        self._client = client
        self.connected = True
        self.connections += 1
        self._connected_mono = time.monotonic()
        log.info("uplink connected", broker=self.broker, session=self.outbox.session)
        return client

    async def _drop(self, client: mqtt.Client) -> None:
        if self._client is client:
            self._client = None
        self.connected = False
        lost = len(self._inflight)
        self._inflight.clear()
        self._rejected.clear()
        self._next_after = 0
        await self._flush_acks()
        if lost:
            log.warning("uplink lost with events in flight; they will be sent again", inflight=lost)
        with contextlib.suppress(Exception):  # already gone
            client.disconnect()
        await asyncio.to_thread(client.loop_stop)

    def _disconnected(self, client: mqtt.Client, rc: ReasonCode) -> None:
        if client is self._client:
            self.connected = False
            self.last_error = f"disconnected: {rc}"
            self._lost.set()
            self._progress.set()

    # ------------------------------------------------------------------------------ forwarding

    async def _forward(self, client: mqtt.Client) -> None:
        client.publish(self.topics.availability, self._availability("online"), qos=1, retain=True)
        if self._birth is not None:
            client.publish(self.topics.birth, json.dumps(self._birth(), separators=(",", ":")), qos=1, retain=True)
        client.subscribe(self.topics.command_filter, qos=1)
        while not self._lost.is_set():
            if self._heartbeat is not None:
                self._heartbeat()
            self._retry_rejected()
            room = self.cfg.max_inflight - len(self._inflight)
            self._progress.clear()
            self.outbox.appended.clear()
            if room > 0:
                rows = await self.outbox.pending(after=self._next_after, limit=room)
                sent = []
                for row in rows:
                    info = client.publish(self.topics.event(row.kind), self._wire_payload(row), qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        self._lost.set()
                        break
                    self._inflight[info.mid] = (row, time.monotonic())
                    self._next_after = row.seq
                    sent.append(row.seq)
                if sent:
                    await self.outbox.mark_sent(sent)
                    continue
            await self._flush_acks()
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._progress, self.outbox.appended, self._lost)]
            try:
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            await self._flush_acks()

    def _wire_payload(self, row: PendingEvent) -> str:
        historical = (row.session != self.outbox.session or row.attempts > 0
                      or row.mono < self._connected_mono)
        return row.payload[:-1] + (',"historical":true}' if historical else ',"historical":false}')

    def _puback(self, client: mqtt.Client, mid: int, rc: ReasonCode) -> None:
        if client is not self._client:
            return
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        row, sent_at = entry
        if rc.is_failure:
            self.rejected_total += 1
            self._rejected[row.seq] = time.monotonic()
            log.error("broker rejected event; will retry", event_id=row.event_id, reason=str(rc))
        else:
            rtt = (time.monotonic() - sent_at) * 1000
            self.rtt_ms = rtt if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * rtt
            self._acked.append(row.seq)
            if row.priority > 0:
                log.info("event forwarded", event_id=row.event_id, kind=row.kind)
        self._progress.set()

    def _retry_rejected(self) -> None:
        if not self._rejected:
            return
        now = time.monotonic()
        due = [seq for seq, at in self._rejected.items() if now - at >= REJECTED_RETRY_S]
        if due and len(due) == len(self._rejected):
            self._next_after = min(self._next_after, min(due) - 1)
            self._rejected.clear()

    async def _flush_acks(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            await self.outbox.mark_delivered(acked)
            self.delivered_total += len(acked)

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
        info = client.publish(topic, json.dumps(body, separators=(",", ":")), qos=1, retain=retain,
                              properties=properties)
        return bool(info.rc == mqtt.MQTT_ERR_SUCCESS)

    def _availability(self, state: str, reason: str | None = None) -> str:
        body = availability_message(gateway=self.outbox.gateway_id, community=self.topics.community,
                                    building=self.topics.building, state=state, session=self.outbox.session,
                                    reason=reason)
        return json.dumps(body, separators=(",", ":"))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait() if self._stopping else asyncio.sleep(seconds), seconds)


def _warn_transport(cfg: MqttConfig) -> None:
    """Loud warnings, at every start, for a link to the broker that is not fully protected."""
    tls = cfg.tls or bool(cfg.tls_ca_file or cfg.tls_cert_file)
    if tls and cfg.tls_insecure:
        log.warning("INSECURE MQTT TLS: mqtt.tls.insecure is set, the broker's host name is NOT verified; "
                    "anyone with a certificate from the same CA can pose as the broker", broker=cfg.host)
    elif not tls and cfg.host not in ("localhost", "127.0.0.1", "::1"):
        log.warning("MQTT WITHOUT TLS: events, commands and credentials travel in clear; configure [mqtt.tls]",
                    broker=cfg.host)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("command handler failed", error=repr(task.exception()))
