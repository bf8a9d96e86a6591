"""Polling wait for state that offers no notification hook (GPIO pins, database rows)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

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


def kill_demo(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a demo started in its own process group, and what it started in sessions of their own (its
    mosquitto, which a planned stop ends and a SIGKILL would leave behind)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
