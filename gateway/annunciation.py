"""What the panel shows: the sounder's signal (:class:`Sound`, in priority order) and the lit LEDs and relays that
are on (:class:`Annunciation`).

The alarm core decides it (:mod:`gateway.panel.core`), the annunciator drives the pins from it
(:mod:`gateway.panel.annunciator`) and the link carries it to the storage/uplink process for the birth and status
messages (:mod:`gateway.link`). Its own module, so that the uplink process does not load the alarm core to read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Annunciation", "Sound"]


class Sound(IntEnum):
    """What the sounder plays, in priority order (higher wins)."""

    QUIET = 0
    TROUBLE = 1
    TEST = 2
    SUPERVISORY = 3
    GAS = 4
    FIRE = 5


@dataclass(frozen=True, slots=True)
class Annunciation:
    """Desired output state: the sounder's signal, the lit LEDs, the relays that are on."""

    sound: Sound = Sound.QUIET
    leds: frozenset[str] = frozenset()
    relays: frozenset[str] = frozenset()
