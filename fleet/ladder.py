"""The escalation ladder and the retry policy: who is due to be told, and when. Pure: no I/O, no clock reads.

An episode opens when the notifier takes up an alarm (or a supervisory signal, or a fault) that the inbox
routed. Step 1 is told at once; step ``k`` falls due ``(k - 1) * escalate_after_s`` after the episode opened,
unless someone acknowledged it or it was cleared first. Rules, each kept by tests/test_ladder.py:

* Steps are counted from the opening, not from the previous step's delivery, so a late step does not push the
  next one later; steps overdue together are all due (none is skipped, whatever the delay).
* An acknowledged or cleared episode has no step due, ever.
* Only the kinds listed in ``escalate_kinds`` (alarms, by default) climb past step 1: a fault or a supervisory
  signal tells its people and waits on the duty desk's page.
* A household marked ``alone`` (an elderly person living alone) adds ``alone_first_roles`` (the grid worker,
  someone at the door) to step 1, and climbs after ``alone_escalate_after_s`` instead.
* A role the gateway already reached by its own SMS (``sms_sent_to`` in the event) is not sent the same alarm
  again; it is still told of the acknowledgement and of the all-clear.
* A failed attempt is tried again after ``retry_base_s * 2 ** (attempt - 1)`` (at most ``retry_cap_s``), up to
  ``max_attempts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_STEPS", "Ladder", "LadderError", "RetryPolicy", "gateway_sms_roles"]

#: The issue's ladder: the household's relatives and the unit head; the building head and the community's
#: grid worker; the duty desk.
DEFAULT_STEPS: tuple[tuple[str, ...], ...] = (("relative", "unit head"), ("building head", "grid worker"),
                                              ("duty desk",))
#: Two minutes without an acknowledgement before the next step: of the order of EN 54-21's 100 s for a
#: transmission path to be acknowledged, and long enough for a relative to pick up a phone.
ESCALATE_AFTER_S = 120.0
#: Half that for a person living alone: nobody in the flat will open the door or call back.
ALONE_ESCALATE_AFTER_S = 60.0


class LadderError(ValueError):
    """A ladder setting that cannot work; the message names the key."""


@dataclass(frozen=True, slots=True)
class Ladder:
    """The configured ladder (``[ladder]`` of the notifier's file)."""

    steps: tuple[tuple[str, ...], ...] = DEFAULT_STEPS
    escalate_after_s: float = ESCALATE_AFTER_S
    alone_escalate_after_s: float = ALONE_ESCALATE_AFTER_S
    alone_first_roles: tuple[str, ...] = ("grid worker",)
    escalate_kinds: frozenset[str] = field(default_factory=lambda: frozenset({"alarm"}))

    def __post_init__(self) -> None:
        if not self.steps or any(not step for step in self.steps):
            raise LadderError("ladder.steps: at least one step, each naming at least one role")
        for key in ("escalate_after_s", "alone_escalate_after_s"):
            if not getattr(self, key) > 0:
                raise LadderError(f"ladder.{key}: must be a positive number of seconds, not {getattr(self, key)!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Ladder:
        """From the ``[ladder]`` table; unknown keys are refused by name."""
        known = {"steps", "escalate_after_s", "alone_escalate_after_s", "alone_first_roles", "escalate_kinds"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LadderError(f"ladder.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        if "steps" in data:
            kwargs["steps"] = tuple(tuple(str(r) for r in step.get("roles", ())) for step in data["steps"])
        for key in ("escalate_after_s", "alone_escalate_after_s"):
            if key in data:
                try:
                    kwargs[key] = float(data[key])
                except (TypeError, ValueError):
                    raise LadderError(f"ladder.{key}: a number of seconds, not {data[key]!r}") from None
        if "alone_first_roles" in data:
            kwargs["alone_first_roles"] = tuple(str(r) for r in data["alone_first_roles"])
        if "escalate_kinds" in data:
            kwargs["escalate_kinds"] = frozenset(str(k) for k in data["escalate_kinds"])
        return cls(**kwargs)

    def after_s(self, alone: bool) -> float:
        """Seconds between two steps."""
        return self.alone_escalate_after_s if alone else self.escalate_after_s

    def last_step(self, kind: str) -> int:
        """The highest step an episode of ``kind`` can reach."""
        return len(self.steps) if kind in self.escalate_kinds else 1

    def due_at(self, step: int, opened_at: float, alone: bool) -> float:
        """When step ``step`` (1-based) falls due."""
        return opened_at + (step - 1) * self.after_s(alone)

    def roles(self, step: int, alone: bool) -> tuple[str, ...]:
        """The roles told at ``step``."""
        roles = self.steps[step - 1]
        if step == 1 and alone:
            roles = roles + tuple(r for r in self.alone_first_roles if r not in roles)
        return roles

    def due_steps(self, *, kind: str, opened_at: float, started: int, now: float, alone: bool,
                  closed: bool) -> list[int]:
        """The steps above ``started`` due at ``now``, in order (all of them when several are overdue)."""
        if closed:
            return []
        return [s for s in range(started + 1, self.last_step(kind) + 1) if self.due_at(s, opened_at, alone) <= now]

    def next_due(self, *, kind: str, opened_at: float, started: int, alone: bool, closed: bool) -> float | None:
        """When the step after ``started`` falls due; None when there is none (top reached, or closed)."""
        if closed or started >= self.last_step(kind):
            return None
        return self.due_at(started + 1, opened_at, alone)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed delivery is tried again (``[retry]`` of the notifier's file)."""

    base_s: float = 5.0
    cap_s: float = 300.0
    max_attempts: int = 8

    def delay_s(self, attempt: int) -> float | None:
        """Seconds before the attempt after failed attempt number ``attempt`` (1-based); None: give up."""
        if attempt >= self.max_attempts:
            return None
        return float(min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


def gateway_sms_roles(event: Mapping[str, Any]) -> frozenset[str]:
    """The roles the gateway says it reached by its own modem: the event's optional ``sms_sent_to`` list."""
    raw = event.get("sms_sent_to")
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        return frozenset()
    return frozenset(str(r) for r in raw if isinstance(r, str))
