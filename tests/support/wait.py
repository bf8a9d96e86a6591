"""Polling wait for state that offers no notification hook (GPIO pins, database rows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises AssertionError with ``message`` (a string or a callable producing one) after
    ``timeout`` seconds. The predicate is always evaluated once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = predicate()
    if result:
        return result
    text = message() if callable(message) else message
    raise AssertionError(f"{text} (after {timeout}s)")
