"""Mock pins for the demo and a ``mock`` daemon: gpiozero's ``MockFactory`` with pins of bounded memory.

Kept apart from :mod:`drivers.gpio` so that a daemon on real pins never imports gpiozero's mock module.
"""

from __future__ import annotations

import collections
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin

__all__ = ["MOCK_PIN_HISTORY", "BoundedMockPin", "mock_pin_factory"]

#: Changes a mock pin remembers.
MOCK_PIN_HISTORY = 64


class BoundedMockPin(MockPin):  # type: ignore[misc]
    """gpiozero's mock pin remembering only its last :data:`MOCK_PIN_HISTORY` changes.

    ``MockPin`` keeps every change in ``states`` for a test to assert, so a demo or a ``mock`` daemon sounding
    an alarm for hours grew by each beat of the buzzer, and the garbage collector walked every change (tens of
    thousands after a benchmark's thousand alarms: full collections of 6–16 ms)."""

    states: collections.deque[Any]

    def clear_states(self) -> None:
        super().clear_states()
        self.states = collections.deque(self.states, maxlen=MOCK_PIN_HISTORY)


def mock_pin_factory() -> MockFactory:
    """A ``MockFactory`` whose pins are :class:`BoundedMockPin`."""
    return MockFactory(pin_class=BoundedMockPin)
