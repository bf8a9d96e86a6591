"""The event record that flows from the alarm core to the outbox and the uplink."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

__all__ = ["KIND_PRIORITY", "Event", "Priority"]


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

    def as_dict(self) -> dict[str, Any]:
        """Plain fields for JSON."""
        return {k: v for k, v in asdict(self).items() if v is not None}
