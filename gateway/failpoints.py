"""Fault injection for supervision tests: make a part hang on purpose, from the environment only.

``GATEWAY_FAILPOINTS="bus_hang=bus1@/run/x/hang"`` makes the poll thread of bus ``bus1`` stop making
progress while the file ``/run/x/hang`` exists (without ``@path``: at once); ``storage_full=outbox@PATH``
makes every commit of the outbox fail as a full disk does; ``loop_busy=storage@PATH`` keeps the storage
process's event loop busy with pure-Python work for 2 s of every 3 while the file exists (the stress of
benchmarks/buzzer_latency.py). Unset in production: each check is one lookup in an empty dict.
"""

from __future__ import annotations

import os

__all__ = ["configured", "failpoint"]


def _parse(spec: str) -> dict[tuple[str, str], str | None]:
    points: dict[tuple[str, str], str | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition("=")
        target, _, trigger = rest.partition("@")
        points[name, target] = trigger or None
    return points


_POINTS = _parse(os.environ.get("GATEWAY_FAILPOINTS", ""))


def failpoint(name: str, target: str) -> bool:
    """Whether the fail point ``name`` is armed for ``target`` now."""
    if not _POINTS:
        return False
    key = (name, target)
    if key not in _POINTS:
        return False
    trigger = _POINTS[key]
    return trigger is None or os.path.exists(trigger)


def configured(name: str, target: str) -> bool:
    """Whether the fail point ``name`` is configured for ``target`` at all (armed now or later)."""
    return (name, target) in _POINTS
