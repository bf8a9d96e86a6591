"""The one place where threads hand work to the asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["Bridge"]


class Bridge:
    """Hands copies of events from bus threads and GPIO callbacks to the loop with ``call_soon_threadsafe``.

    Never waits: if the loop is blocked, calls queue up in the loop's ready queue and run when it wakes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.dropped = 0

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop, from any thread."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed during shutdown
            self.dropped += 1

    def sink(self, callback: Callable[[Any], Any]) -> Callable[[Any], None]:
        """A one-argument function that runs ``callback(arg)`` on the loop."""

        def submit(item: Any) -> None:
            self.call(callback, item)

        return submit
