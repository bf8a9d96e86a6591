"""Named messages between the panel process and the storage/uplink process.

Every message is one frame: a 4-byte big-endian length, then a JSON object ``{"v": 1, "type": ..., ...}``.
Each type has a fixed set of fields with fixed types (:data:`MESSAGES`); :func:`decode` checks them and raises
:class:`BadMessage` with a reason for anything else, so a peer can reject a message and go on. There are no
pickles and no generic calls: the receiver decides what a named message does.

Panel → uplink: ``event`` (a hand-over number and the event), ``request`` (``events``, ``storage``,
``rebirth``), ``reply`` (to the uplink's requests), ``stop``.
Uplink → panel: ``hello`` (the last hand-over number it committed), ``stored`` (hand-over numbers committed
to SQLite: only these leave the panel's hold), ``fault`` (a storage fault raised or cleared), ``beat`` (the
session, the broker connection, events stored), ``request`` (``command``, ``panel``), ``reply``,
``delivered`` (the delivery keys, :func:`gateway.events.delivery_key`, of urgent events the broker acknowledged).

The SMS process (:mod:`gateway.sms.process`) speaks the same messages with the panel: it receives the events it
may owe a message for, ``delivered`` (passed on from the uplink) and ``transmission`` (the fault raised or
cleared), and answers with ``hello``, ``stored``, ``beat``, ``fault`` (``modem``) and ``reply``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import fields
from typing import Any

import orjson

from gateway.annunciation import Annunciation, Sound
from gateway.events import Event

__all__ = [
    "MAX_FRAME",
    "MESSAGES",
    "VERSION",
    "BadMessage",
    "decode",
    "encode",
    "event_from_wire",
    "event_to_wire",
    "read_frame",
    "snapshot_from_wire",
    "snapshot_to_wire",
]

VERSION = 1
#: A frame longer than this is refused (a reply with a full history page is well below it).
MAX_FRAME = 32 * 1024 * 1024
_HEADER = struct.Struct(">I")

_NUMBER = (int, float)
_OPT_TEXT = (str, type(None))
#: Each message type and its fields with their allowed types.
MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"handover": _OPT_TEXT, "pid": (int,)},
    "event": {"n": (int,), "boot": (str,), "event": (dict,)},
    "stored": {"boot": (str,), "upto": (int,), "dropped": (dict,)},
    "fault": {"code": (str,), "present": (bool,), "detail": _OPT_TEXT},
    "beat": {"session": (int,), "connected": (bool,), "connections": (int,), "last_error": _OPT_TEXT,
             "stored": (int,), "held": (int,)},
    "request": {"id": (int,), "name": (str,), "args": (dict,)},
    "reply": {"id": (int,), "ok": (bool,), "data": (dict,)},
    "stop": {"flush_timeout_s": _NUMBER},
    # Transmission supervision and the second path (gateway/panel/transmission.py, gateway/sms/).
    "delivered": {"keys": (list,)},
    "transmission": {"present": (bool,), "detail": _OPT_TEXT},
}

_EVENT_FIELDS = {f.name: f for f in fields(Event)}
_EVENT_TEXT = {name for name in _EVENT_FIELDS if name not in ("mono", "value", "wall")}


class BadMessage(ValueError):
    """A frame that is not a valid message; the text says why."""


def encode(kind: str, **body: Any) -> bytes:
    """One frame of message ``kind`` (its fields checked as the receiver will check them)."""
    message = {"v": VERSION, "type": kind, **body}
    _check(message)
    data = orjson.dumps(message)
    return _HEADER.pack(len(data)) + data


def decode(data: bytes) -> dict[str, Any]:
    """The message in a frame's body; :class:`BadMessage` if it is not JSON or not a known, valid message."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"not an object: {type(message).__name__}")
    _check(message)
    return message


def _check(message: dict[str, Any]) -> None:
    if message.get("v") != VERSION:
        raise BadMessage(f"version {message.get('v')!r} is not {VERSION}")
    kind = message.get("type")
    spec = MESSAGES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise BadMessage(f"unknown type {kind!r}")
    extra = set(message) - set(spec) - {"v", "type"}
    if extra:
        raise BadMessage(f"{kind}: unknown field {sorted(extra)[0]!r}")
    for name, types in spec.items():
        if name not in message:
            raise BadMessage(f"{kind}: field {name!r} missing")
        value = message[name]
        if isinstance(value, bool) and bool not in types:
            raise BadMessage(f"{kind}: field {name!r} must be {types[0].__name__}, got bool")
        if not isinstance(value, types):
            raise BadMessage(f"{kind}: field {name!r} must be {types[0].__name__}, got {type(value).__name__}")


def read_frame(sock: socket.socket) -> bytes | None:
    """The next frame's body from a blocking socket; None at a clean end of stream."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise BadMessage(f"frame of {size} bytes is longer than {MAX_FRAME}")
    body = _read_exactly(sock, size)
    if body is None:
        raise ConnectionError("the link closed inside a frame")
    return body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            if chunks:
                raise ConnectionError("the link closed inside a frame")
            return None
        chunks += chunk
    return bytes(chunks)


def event_to_wire(event: Event) -> dict[str, Any]:
    """An event's fields for an ``event`` message."""
    return event.as_dict()


def event_from_wire(data: dict[str, Any]) -> Event:
    """The event in an ``event`` message; :class:`BadMessage` for an unknown field or a wrong type."""
    for name, value in data.items():
        if name not in _EVENT_FIELDS:
            raise BadMessage(f"event: unknown field {name!r}")
        if name in _EVENT_TEXT:
            if not isinstance(value, str):
                raise BadMessage(f"event: field {name!r} must be str, got {type(value).__name__}")
        elif isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise BadMessage(f"event: field {name!r} must be a number, got {type(value).__name__}")
    for name in ("kind", "action", "mono"):
        if name not in data:
            raise BadMessage(f"event: field {name!r} missing")
    return Event(**data)


def snapshot_to_wire(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The panel's snapshot (:meth:`AlarmPanel.snapshot`) as plain JSON values."""
    ann: Annunciation = snapshot["annunciation"]
    return {**snapshot, "annunciation": {"sound": ann.sound.name.lower(), "leds": sorted(ann.leds),
                                         "relays": sorted(ann.relays)}}


def snapshot_from_wire(data: dict[str, Any] | None) -> dict[str, Any]:
    """A snapshot from :func:`snapshot_to_wire` (an empty, quiet one for None)."""
    if not data:
        return {"devices": [], "active": [], "annunciation": Annunciation(), "now": 0.0}
    ann = data.get("annunciation") or {}
    return {**data, "annunciation": Annunciation(Sound[str(ann.get("sound", "quiet")).upper()],
                                                 frozenset(ann.get("leds", ())), frozenset(ann.get("relays", ())))}
