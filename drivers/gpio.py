"""GPIO through gpiozero: dry-contact inputs and on/off outputs (buzzer, LEDs, relays).

gpiozero holds pin callbacks weakly, so every object here keeps strong references to its callbacks.
With gpiozero's ``MockFactory`` the callbacks run synchronously on the thread that drives the pin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from gpiozero import Buzzer, DigitalInputDevice, DigitalOutputDevice

__all__ = ["ContactInput", "make_buzzer", "make_output"]


class ContactInput:
    """A dry contact on a pin. ``is_active`` means "away from its normal state".

    ``contact`` is the contact's state when all is well: ``"NO"`` (normally open: it closes on the event,
    e.g. a detector's alarm relay) or ``"NC"`` (normally closed: it opens on the event or a broken wire,
    e.g. an extinguisher presence switch). With ``supervision_pin`` the contact is a changeover pair whose
    two sides must always differ; equal sides mean a stuck contact or a wiring fault.
    """

    def __init__(
        self,
        pin: str,
        *,
        contact: Literal["NO", "NC"] = "NO",
        pull_up: bool = True,
        bounce_ms: int = 50,
        supervision_pin: str | None = None,
        on_change: Callable[[bool], None],
        on_plausibility: Callable[[bool], None] | None = None,
    ) -> None:
        self.contact = contact
        bounce = bounce_ms / 1000 if bounce_ms else None
        self._input = DigitalInputDevice(pin, pull_up=pull_up, bounce_time=bounce)
        self._on_change = on_change
        self._on_plausibility = on_plausibility
        self._handlers: list[Callable[[], None]] = [self._changed, self._changed]
        self._input.when_activated = self._handlers[0]
        self._input.when_deactivated = self._handlers[1]
        self._supervision: Any = None
        if supervision_pin is not None:
            self._supervision = DigitalInputDevice(supervision_pin, pull_up=pull_up, bounce_time=bounce)
            self._handlers.append(self._check_plausible)
            self._supervision.when_activated = self._handlers[-1]
            self._supervision.when_deactivated = self._handlers[-1]

    @property
    def is_closed(self) -> bool:
        """Whether the contact is closed now."""
        return bool(self._input.is_active)

    @property
    def is_active(self) -> bool:
        """Whether the contact is away from its normal state."""
        return self.is_closed if self.contact == "NO" else not self.is_closed

    @property
    def is_plausible(self) -> bool:
        """False when a changeover pair reads the same on both sides."""
        return self._supervision is None or bool(self._supervision.is_active) != self.is_closed

    def _changed(self) -> None:
        self._on_change(self.is_active)
        if self._supervision is not None:
            self._check_plausible()

    def _check_plausible(self) -> None:
        if self._on_plausibility is not None:
            self._on_plausibility(self.is_plausible)

    def close(self) -> None:
        """Release the pins."""
        self._input.close()
        if self._supervision is not None:
            self._supervision.close()


def make_output(pin: str, *, active_high: bool = True) -> DigitalOutputDevice:
    """An on/off output, initially off."""
    return DigitalOutputDevice(pin, active_high=active_high, initial_value=False)


def make_buzzer(pin: str, *, active_high: bool = True) -> Buzzer:
    """The sounder, initially off."""
    return Buzzer(pin, active_high=active_high, initial_value=False)
