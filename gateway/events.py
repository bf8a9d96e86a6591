"""The event record that flows from the alarm core to the outbox and the uplink."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from operator import attrgetter
from typing import Any

__all__ = ["KIND_PRIORITY", "Event", "Priority", "delivery_key", "event_delivery_key"]


class Priority(IntEnum):
    """Storage class: what may be evicted first and what is committed with a full sync."""

    TELEMETRY = 0
    INFO = 1
    TROUBLE = 2
    SUPERVISORY = 3
    ALARM = 4


KIND_PRIORITY: dict[str, Priority] = {
    "telemetry": Priority.TELEMETRY,
    "test": Priority.INFO,
    "reset": Priority.INFO,
    "silence": Priority.INFO,
    "relay": Priority.INFO,
    "system": Priority.INFO,
    "fault": Priority.TROUBLE,
    "supervisory": Priority.SUPERVISORY,
    "alarm": Priority.ALARM,
}


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened, as the alarm core saw it. Immutable: threads hand copies to the loop.

    ``kind`` is alarm/fault/supervisory/telemetry/test/reset/silence/relay/system; ``action`` says what
    happened to it (raised, escalated, cleared, restored, reset, silenced, on, off, started, detected,
    reading). ``mono`` is the monotonic time it was detected; ``wall`` the system clock then.
    """

    kind: str
    action: str
    mono: float
    device: str | None = None
    unit: str | None = None
    household: str | None = None
    level: str | None = None
    code: str | None = None
    value: float | None = None
    measure: str | None = None
    source: str | None = None
    detail: str | None = None
    wall: float = 0.0
    quality: str | None = None
    """Telemetry: ``good``, ``uncertain`` or ``bad`` (``code`` says why when not good)."""

    @property
    def priority(self) -> Priority:
        """Storage priority of this event."""
        return KIND_PRIORITY.get(self.kind, Priority.INFO)

    def at_wall(self, wall: float) -> Event:
        """This event with its wall-clock time set (the panel stamps each event it hands on). A plain constructor
        call: ``dataclasses.replace`` cost 10 µs per event on the bus threads, this 6 (docs/performance.md)."""
        values = _field_values(self)
        return Event(*values[:_WALL], wall, *values[_WALL + 1:])  # type: ignore[call-arg]  # every field, in order

    def as_dict(self) -> dict[str, Any]:
        """Plain fields for JSON, those that are None left out. Every field is a str or a number, so no copy
        is needed: ``dataclasses.asdict`` deep-copies each one and cost 14 times as much (docs/performance.md)."""
        return {k: v for k, v in zip(_FIELD_NAMES, _field_values(self), strict=True) if v is not None}


_FIELD_NAMES = tuple(f.name for f in fields(Event))
_field_values = attrgetter(*_FIELD_NAMES)
_WALL = _FIELD_NAMES.index("wall")


def delivery_key(kind: str, action: str, device: str | None, code: str | None, mono: float) -> str:
    """What names one event between the processes until the broker acknowledges it: the panel gives it when it
    makes the event, the storage process when the PUBACK of its stored row arrives (from the row's payload), the
    SMS process to match the alarm it owes a message. ``mono`` (the panel's monotonic time, the same clock in
    every process of one boot) tells apart two events of one device."""
    return f"{kind}|{action}|{device or ''}|{code or ''}|{mono!r}"


def event_delivery_key(event: Event) -> str:
    """:func:`delivery_key` of an event."""
    return delivery_key(event.kind, event.action, event.device, event.code, event.mono)
