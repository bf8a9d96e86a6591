"""A recording paho-mqtt subscriber for asserting on what reached the broker."""

from __future__ import annotations

import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["MqttRecorder", "RecordedMessage"]

_NO_JSON: Any = object()
_client_ids = itertools.count(1)


@dataclass(frozen=True)
class RecordedMessage:
    """One message as delivered to the recorder."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any]
    arrived: float
    """``time.monotonic()`` at arrival."""
    index: int
    """Position in the recorder's arrival order."""
    _json: Any = field(default=_NO_JSON, repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    @property
    def json(self) -> Any:
        """The payload decoded as JSON, or None if it is not valid JSON."""
        return None if self._json is _NO_JSON else self._json

    @property
    def is_json(self) -> bool:
        return self._json is not _NO_JSON

    @property
    def user_properties(self) -> dict[str, str]:
        return dict(self.properties.get("UserProperty", []))

    def matches(self, topic_filter: str) -> bool:
        return bool(mqtt.topic_matches_sub(topic_filter, self.topic))


def _decode_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return _NO_JSON


Predicate = Callable[[RecordedMessage], bool]


class MqttRecorder:
    """Subscribes to ``topics`` with QoS 1 and records every message it receives.

    Runs paho's network loop in a background thread, reconnects by itself when the
    broker goes away and re-subscribes on every connection. The constructor returns
    once the first subscription is acknowledged.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: str | Iterable[str] = ("#",),
        *,
        protocol: int = mqtt.MQTTv5,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        connect_timeout: float = 30.0,
        wait_connected: bool = True,
        clean: bool = True,
    ) -> None:
        """``clean=False`` (MQTT 3.1.1 only) keeps the recorder's session: with a broker that persists, what is
        published while the recorder is away (the broker restarting) is delivered when it is back."""
        self.host = host
        self.port = port
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.protocol = protocol
        self.client_id = client_id or f"test-recorder-{next(_client_ids)}"
        self._cond = threading.Condition()
        self._messages: list[RecordedMessage] = []
        self._connected = False
        self._subscribed = False
        self._connect_count = 0
        self._disconnect_count = 0
        self._pending_sub_mid: int | None = None
        self._acked: dict[int, ReasonCode | None] = {}
        self._last_error: str | None = None
        self._closed = False

        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion(protocol),
            reconnect_on_failure=True,
            clean_session=None if protocol == mqtt.MQTTv5 else clean,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_certs is not None or certfile is not None:
            self.client.tls_set(
                ca_certs=ca_certs, certfile=certfile, keyfile=keyfile, cert_reqs=ssl.CERT_REQUIRED
            )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()
        if wait_connected:
            try:
                self.wait_connected(timeout=connect_timeout)
            except BaseException:
                self.close()
                raise

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            with self._cond:
                self._last_error = f"CONNACK refused: {reason_code}"
                self._cond.notify_all()
            return
        with self._cond:
            self._connected = True
            self._subscribed = False
            self._connect_count += 1
        result, mid = client.subscribe([(topic, 1) for topic in self.topics])
        with self._cond:
            if result == mqtt.MQTT_ERR_SUCCESS:
                self._pending_sub_mid = mid
            else:
                self._last_error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = False
            self._subscribed = False
            self._disconnect_count += 1
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid != self._pending_sub_mid:
                return
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            if refused:
                self._last_error = f"SUBSCRIBE refused for {self.topics}: {refused}"
            else:
                self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props: dict[str, Any] = {}
        if message.properties is not None:
            props = message.properties.json()  # type: ignore[no-untyped-call]
        payload = bytes(message.payload)
        with self._cond:
            record = RecordedMessage(
                topic=message.topic,
                payload=payload,
                qos=message.qos,
                retain=bool(message.retain),
                properties=props,
                arrived=time.monotonic(),
                index=len(self._messages),
                _json=_decode_json(payload),
            )
            self._messages.append(record)
            self._cond.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._acked[mid] = reason_code
            self._cond.notify_all()

    # -- state ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        with self._cond:
            return self._connected and self._subscribed

    @property
    def connect_count(self) -> int:
        """Number of successful connections so far (grows on every reconnect)."""
        with self._cond:
            return self._connect_count

    @property
    def disconnect_count(self) -> int:
        with self._cond:
            return self._disconnect_count

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = f" (last error: {self._last_error})" if self._last_error else ""
                    raise AssertionError(f"{what} within {timeout}s on {self.host}:{self.port}{detail}")
                self._cond.wait(remaining)

    def wait_connected(self, timeout: float = 30.0, min_connections: int = 1) -> None:
        """Wait until connected and subscribed, after at least ``min_connections`` connections.

        To wait for a reconnect, pass ``connect_count + 1`` as read before the disruption.
        """
        self._wait(
            lambda: self._connected and self._subscribed and self._connect_count >= min_connections,
            timeout,
            f"recorder {self.client_id} not connected and subscribed (connection #{min_connections})",
        )

    def wait_disconnected(self, timeout: float = 30.0, min_disconnections: int = 1) -> None:
        """Wait until at least ``min_disconnections`` disconnects have been seen."""
        self._wait(
            lambda: self._disconnect_count >= min_disconnections,
            timeout,
            f"recorder {self.client_id} saw no disconnect #{min_disconnections}",
        )

    # -- recorded messages -----------------------------------------------------

    def messages(self, topic_filter: str | None = None) -> list[RecordedMessage]:
        """Snapshot of recorded messages, optionally only those matching an MQTT topic filter."""
        with self._cond:
            snapshot = list(self._messages)
        if topic_filter is None:
            return snapshot
        return [m for m in snapshot if m.matches(topic_filter)]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(self, predicate: Predicate | None = None, timeout: float = 30.0) -> RecordedMessage:
        """Return the first recorded message (past or future) satisfying ``predicate``."""
        return self.wait_for_count(predicate, 1, timeout)[0]

    def wait_for_count(
        self, predicate: Predicate | None, n: int, timeout: float = 30.0
    ) -> list[RecordedMessage]:
        """Wait until ``n`` recorded messages satisfy ``predicate``; return all that do."""
        check = predicate or (lambda _m: True)
        deadline = time.monotonic() + timeout
        matched: list[RecordedMessage] = []
        scanned = 0
        with self._cond:
            while True:
                matched.extend(m for m in self._messages[scanned:] if check(m))
                scanned = len(self._messages)
                if len(matched) >= n:
                    return matched
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            recent = [f"{m.topic}: {m.payload[:200]!r}" for m in self._messages[-10:]]
        listing = "\n  ".join(recent) or "(none)"
        raise AssertionError(
            f"timed out after {timeout}s waiting for {n} matching message(s), got {len(matched)}; "
            f"{scanned} recorded, last ones:\n  {listing}"
        )

    # -- publishing ------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any] | list[Any] | None = None,
        qos: int = 1,
        properties: Properties | None = None,
        *,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish and, for QoS > 0, wait for the broker's acknowledgement.

        dict and list payloads are sent as JSON. Waits for the recorder to be connected first.
        """
        if isinstance(payload, dict | list):
            payload = json.dumps(payload).encode()
        deadline = time.monotonic() + timeout
        self.wait_connected(timeout=timeout)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise AssertionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # On MQTT_ERR_NO_CONN paho keeps the message queued and sends it after reconnecting.
        self._wait(
            lambda: info.mid in self._acked,
            max(0.0, deadline - time.monotonic()),
            f"no acknowledgement for publish to {topic} (mid {info.mid})",
        )
        with self._cond:
            reason = self._acked.pop(info.mid)
        if reason is not None and reason.is_failure:
            raise AssertionError(f"publish to {topic} refused: {reason}")

    # -- teardown --------------------------------------------------------------

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> MqttRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MqttRecorder {self.client_id} {self.host}:{self.port} {len(self._messages)} messages>"
