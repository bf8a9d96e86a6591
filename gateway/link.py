"""Named messages between the panel process and the storage/uplink process.

Every message is one frame: a 4-byte big-endian length, then a JSON object ``{"v": 1, "type": ..., ...}``.
Each type is a msgspec struct with a fixed set of fields of fixed types (:data:`MESSAGES`); :func:`encode`
and :func:`decode` check them, and :func:`decode` raises
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

import msgspec
from msgspec import inspect as mi

from gateway.annunciation import Annunciation, Sound
from gateway.events import Event
from gateway.validation import problem

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


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    """A message: ``{"v": 1, "type": <its tag>, ...its fields}``; every field is required."""

    v: int


class Hello(Message, tag="hello"):
    handover: str | None
    pid: int


class EventMessage(Message, tag="event"):
    n: int
    boot: str
    event: dict[str, Any]


class Stored(Message, tag="stored"):
    boot: str
    upto: int
    dropped: dict[str, Any]


class Fault(Message, tag="fault"):
    code: str
    present: bool
    detail: str | None


class Beat(Message, tag="beat"):
    session: int
    connected: bool
    connections: int
    last_error: str | None
    stored: int
    held: int


class Request(Message, tag="request"):
    id: int
    name: str
    args: dict[str, Any]


class Reply(Message, tag="reply"):
    id: int
    ok: bool
    data: dict[str, Any]


class Stop(Message, tag="stop"):
    flush_timeout_s: float


class Delivered(Message, tag="delivered"):
    """Transmission supervision and the second path (gateway/panel/transmission.py, gateway/sms/)."""

    keys: list[Any]


class Transmission(Message, tag="transmission"):
    present: bool
    detail: str | None


#: Each message type and its struct.
MESSAGES: dict[str, type[Message]] = {
    str(kind.__struct_config__.tag): kind
    for kind in (Hello, EventMessage, Stored, Fault, Beat, Request, Reply, Stop, Delivered, Transmission)
}
_DECODER = msgspec.json.Decoder(Hello | EventMessage | Stored | Fault | Beat | Request | Reply | Stop | Delivered
                                | Transmission)
_ENCODER = msgspec.json.Encoder()
_EVENT_FIELDS = frozenset(f.name for f in fields(Event))
#: How a field's type is named in a refusal ("must be bool, got int").
_TYPE_NAMES: dict[type[mi.Type], str] = {mi.BoolType: "bool", mi.IntType: "int", mi.FloatType: "float",
                                         mi.StrType: "str", mi.DictType: "dict", mi.ListType: "list"}


class BadMessage(ValueError):
    """A frame that is not a valid message; the text says why."""


def encode(kind: str, **body: Any) -> bytes:
    """One frame of message ``kind`` (its fields checked as the receiver will check them)."""
    message = {"v": VERSION, "type": kind, **body}
    struct_type = MESSAGES.get(kind)
    if struct_type is None:
        raise BadMessage(f"unknown type {kind!r}")
    try:
        data = _ENCODER.encode(msgspec.convert(message, struct_type, strict=True))
    except msgspec.ValidationError as exc:
        raise _bad(exc, message) from None
    if message["v"] != VERSION:
        raise BadMessage(f"version {message['v']!r} is not {VERSION}")
    return _HEADER.pack(len(data)) + data


def decode(data: bytes) -> dict[str, Any]:
    """The message in a frame's body; :class:`BadMessage` if it is not JSON or not a known, valid message."""
    try:
        message = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _bad(exc, msgspec.json.decode(data)) from None
    except msgspec.DecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if message.v != VERSION:
        raise BadMessage(f"version {message.v!r} is not {VERSION}")
    out = msgspec.structs.asdict(message)
    out["type"] = message.__struct_config__.tag
    return out


def _bad(exc: msgspec.ValidationError, raw: Any) -> BadMessage:
    """msgspec's refusal of ``raw`` in the link's words (the slow path: a refused message only)."""
    if not isinstance(raw, dict):
        return BadMessage(f"not an object: {type(raw).__name__}")
    if raw.get("v") != VERSION:
        return BadMessage(f"version {raw.get('v')!r} is not {VERSION}")
    kind = raw.get("type")
    struct_type = MESSAGES.get(kind) if isinstance(kind, str) else None
    if struct_type is None:
        return BadMessage(f"unknown type {kind!r}")
    found = problem(exc, raw, struct_type)
    name = found.path[0] if found.path else "?"
    if found.kind == "unknown":
        return BadMessage(f"{kind}: unknown field {name!r}")
    if found.kind == "missing":
        return BadMessage(f"{kind}: field {name!r} missing")
    return BadMessage(f"{kind}: field {name!r} must be {_type_name(found.expected)}, got {type(found.value).__name__}")


def _type_name(info: mi.Type | None) -> str:
    if isinstance(info, mi.UnionType):
        info = next((t for t in info.types if not isinstance(t, mi.NoneType)), None)
    return "something else" if info is None else _TYPE_NAMES.get(type(info), "something else")


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
    unknown = sorted(set(data) - _EVENT_FIELDS)
    if unknown:
        raise BadMessage(f"event: unknown field {unknown[0]!r}")
    try:
        return msgspec.convert(data, Event, strict=True)
    except msgspec.ValidationError as exc:
        found = problem(exc, data, Event)
        name = found.path[0] if found.path else "?"
        if found.kind == "missing":
            raise BadMessage(f"event: field {name!r} missing") from None
        if _type_name(found.expected) == "float":
            raise BadMessage(f"event: field {name!r} must be a number, got {type(found.value).__name__}") from None
        raise BadMessage(f"event: field {name!r} must be str, got {type(found.value).__name__}") from None


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
