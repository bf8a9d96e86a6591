"""When an SMS goes, and when one is held back: the pure rule of the second path (time passed in).

Rules (docs/alarms.md, "The SMS path"):

- an alarm, supervisory signal or fault event is *owed* a message from the moment the panel makes it;
- it is *due* when it has had no PUBACK for ``after_s`` (from when it was made), or at once while the
  ``transmission`` fault is present, or at once with ``mode = "always"``; a PUBACK before that cancels it;
- its clear follows the same way (it is an event of its own);
- each recipient gets at most ``max_per_hour`` messages in any hour; over that a message is held back
  (counted, not sent) — except the first message of a new alarm episode, which is never held back. An
  episode of a device opens with its first alarm or supervisory raise and ends when it is reset.

Times are wall-clock seconds: what is owed is kept in SQLite and must still be owed after a reboot.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["HOUR_S", "Owed", "Send", "SmsPolicy"]

HOUR_S = 3600.0
#: Event kinds that may be owed a message, and the actions that are.
OWED_KINDS = frozenset({"alarm", "supervisory", "fault"})
OWED_ACTIONS = frozenset({"raised", "escalated", "cleared"})
#: Actions that open a new episode of a device.
OPENING_ACTIONS = frozenset({"raised"})


@dataclass(slots=True)
class Owed:
    """An event owed a message: its delivery key, what it is, when it was made, who is to be told."""

    key: str
    kind: str
    action: str
    device: str | None
    made: float
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Send:
    """One message to one recipient; ``first``: the first of a new alarm episode (never held back)."""

    key: str
    recipient: str
    first: bool


class SmsPolicy:
    """What is owed, what is due, and each recipient's count in the last hour."""

    def __init__(self, *, mode: str = "fallback", after_s: float = 30.0, max_per_hour: int = 10) -> None:
        self.mode = mode
        self.after_s = after_s
        self.max_per_hour = max_per_hour
        self.transmission_fault = False
        self._owed: dict[str, Owed] = {}
        self._sent: dict[str, collections.deque[float]] = {}
        self._episodes: dict[str, bool] = {}  # device → a message of this episode has gone
        self.held_back = 0
        self.cancelled = 0
        self.became_due: list[str] = []
        """The events the last :meth:`due` took off the owed list (those with no one to tell too)."""

    @staticmethod
    def wanted(kind: str, action: str) -> bool:
        """Whether an event of this kind and action is owed a message."""
        return kind in OWED_KINDS and action in OWED_ACTIONS

    def owe(self, item: Owed) -> None:
        """The panel made an event that is owed a message (a repeated key is ignored)."""
        if item.key in self._owed:
            return
        self._owed[item.key] = item
        if item.device is not None and item.kind in ("alarm", "supervisory") and item.action in OPENING_ACTIONS:
            self._episodes.setdefault(item.device, False)

    def delivered(self, keys: Iterable[str]) -> list[str]:
        """The broker acknowledged these events: those still owed are not any more; returns them."""
        done = [key for key in keys if self._owed.pop(key, None) is not None]
        self.cancelled += len(done)
        return done

    def reset(self, device: str | None) -> None:
        """An operator reset a device's alarm (or all): its episode ends."""
        if device is None:
            self._episodes.clear()
        else:
            self._episodes.pop(device, None)

    def sent_before(self, recipient: str, at: float) -> None:
        """A message that went at ``at`` (read back from the queue after a restart) counts for the cap."""
        self._sent.setdefault(recipient, collections.deque()).append(at)

    def owed(self) -> int:
        """Events owed a message and not yet due."""
        return len(self._owed)

    def next_due(self) -> float | None:
        """When the next owed event falls due (None: nothing owed)."""
        if not self._owed:
            return None
        if self.mode == "always" or self.transmission_fault:
            return min(o.made for o in self._owed.values())
        return min(o.made for o in self._owed.values()) + self.after_s

    def due(self, now: float) -> tuple[list[Send], list[Send]]:
        """Messages to send now, and those held back by the cap; the events they are for are no longer owed."""
        ready = [o for o in self._owed.values()
                 if self.mode == "always" or self.transmission_fault or now >= o.made + self.after_s]
        send: list[Send] = []
        held: list[Send] = []
        self.became_due = [o.key for o in sorted(ready, key=lambda o: o.made)]
        for item in sorted(ready, key=lambda o: o.made):
            del self._owed[item.key]
            first = False
            if item.device is not None and item.kind in ("alarm", "supervisory") and item.action != "cleared":
                first = self._episodes.get(item.device) is False
                if first:
                    self._episodes[item.device] = True
            for recipient in item.recipients:
                times = self._sent.setdefault(recipient, collections.deque())
                while times and times[0] <= now - HOUR_S:
                    times.popleft()
                if first or len(times) < self.max_per_hour:
                    times.append(now)
                    send.append(Send(item.key, recipient, first))
                else:
                    held.append(Send(item.key, recipient, first))
                    self.held_back += 1
        return send, held
