"""GPIO through gpiozero: the pin factory, dry-contact inputs and on/off outputs (buzzer, LEDs, relays).

On a Pi the pins are driven through lgpio (``/dev/gpiochip*``), the backend gpiozero 2 uses on Raspberry Pi
OS Bookworm and the only one that works on a Pi 5; ``mock`` is gpiozero's ``MockFactory`` for the demo and
tests. A backend that cannot open its chip raises :class:`GpioUnavailable` with one line to show, so the
daemon stops at once instead of starting without a sounder.

gpiozero holds pin callbacks weakly, so every object here keeps strong references to its callbacks.
With gpiozero's ``MockFactory`` the callbacks run synchronously on the thread that drives the pin.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from gpiozero import Buzzer, Device, DigitalInputDevice, DigitalOutputDevice

__all__ = [
    "PIN_FACTORIES",
    "PIN_FACTORY_ENV",
    "ContactInput",
    "GpioUnavailable",
    "PinFactoryChoice",
    "choose_pin_factory",
    "lgpio_chip",
    "load_lgpio",
    "make_buzzer",
    "make_output",
    "make_pin_factory",
    "use_pin_factory",
]

#: Backends ``[runtime] pin_factory`` may name. gpiozero's ``native`` is left out on purpose: it maps
#: /dev/gpiomem, which a Pi 5 does not have and the unit's device policy does not allow.
PIN_FACTORIES = ("lgpio", "mock")
#: gpiozero's own override; it wins over the site config (docs/config.md), so tests and the demo can force
#: ``mock`` on a daemon they start. The systemd unit does not set it.
PIN_FACTORY_ENV = "GPIOZERO_PIN_FACTORY"


class GpioUnavailable(RuntimeError):
    """The GPIO backend cannot be used; ``line`` says why in one line, e.g.
    ``gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory``."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class PinFactoryChoice(NamedTuple):
    """The backend in use and where the choice came from: ``installed``, ``GPIOZERO_PIN_FACTORY`` or ``config``."""

    name: str
    source: str


def choose_pin_factory(configured: str = "lgpio", environ: Any = None) -> PinFactoryChoice:
    """Which backend to use: ``GPIOZERO_PIN_FACTORY`` when set, else the site's ``[runtime] pin_factory``."""
    env = os.environ if environ is None else environ
    forced = (env.get(PIN_FACTORY_ENV) or "").strip().lower()
    if forced:
        if forced not in PIN_FACTORIES:
            raise GpioUnavailable(f"gpio: {PIN_FACTORY_ENV}={forced} is not one of {', '.join(PIN_FACTORIES)}")
        return PinFactoryChoice(forced, PIN_FACTORY_ENV)
    if configured not in PIN_FACTORIES:
        raise GpioUnavailable(f"gpio: pin factory {configured!r} is not one of {', '.join(PIN_FACTORIES)}")
    return PinFactoryChoice(configured, "config")


def lgpio_chip() -> int:
    """The gpiochip lgpio opens for the 40-pin header: 4 on a Pi 5 with an RP1 numbered gpiochip4, else 0.

    The same rule as gpiozero's ``LGPIOFactory``, without its board lookup, so that a machine with no Pi
    revision still gets the message about the chip rather than one about the board.
    """
    if not os.path.exists("/dev/gpiochip4"):
        return 0
    from gpiozero.pins.local import get_pi_revision

    try:
        revision = int(get_pi_revision())
    except Exception:  # not a Pi: the header chip is 0
        return 0
    return 4 if (revision & 0xFF0) >> 4 == 0x17 else 0


def _open_failure(path: str) -> str:
    """Why ``path`` cannot be opened, as the kernel says it (lgpio itself only says "can not open")."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    return "lgpio could not use it"


def load_lgpio() -> Any:
    """The lgpio module, loaded without its side effects on the caller.

    Loading lgpio changes the process's working directory to ``$LG_WD`` (default: the current one) and opens a
    notification FIFO (``.lgd-nfy0``) there. The unit sets ``LG_WD=/run/gateway``; anywhere else a private
    directory, removed at exit, keeps the FIFO out of the caller's directory. The working directory is put back
    once the FIFO is open (lgpio names it relative to the directory only while loading).
    """
    if "lgpio" in sys.modules:
        return sys.modules["lgpio"]
    if not os.environ.get("LG_WD"):
        import shutil  # only off the unit (which sets LG_WD): not loaded into every panel, for memory
        import tempfile

        workdir = tempfile.mkdtemp(prefix="gateway-lgpio-")
        atexit.register(shutil.rmtree, workdir, True)
        os.environ["LG_WD"] = workdir
    cwd = os.getcwd()
    try:
        import lgpio
    finally:
        os.chdir(cwd)
    return lgpio


def make_pin_factory(name: str) -> Any:
    """A new gpiozero pin factory for ``name`` (one of :data:`PIN_FACTORIES`); :class:`GpioUnavailable` if the
    backend cannot be loaded or cannot open its chip."""
    if name == "mock":
        from drivers.mockpins import mock_pin_factory

        return mock_pin_factory()
    if name != "lgpio":
        raise GpioUnavailable(f"gpio: pin factory {name!r} is not one of {', '.join(PIN_FACTORIES)}")
    try:
        lgpio = load_lgpio()
        from gpiozero.pins.lgpio import LGPIOFactory
    except ImportError as exc:
        raise GpioUnavailable(f"gpio: the lgpio module does not load ({exc}); reinstall the gateway, which "
                              "installs it: sudo scripts/install.sh (docs/deploy.md)") from exc
    chip = lgpio_chip()
    path = f"/dev/gpiochip{chip}"
    try:
        return LGPIOFactory(chip=chip)
    except lgpio.error as exc:
        raise GpioUnavailable(f"gpio: cannot open {path} (lgpio): {_open_failure(path)}") from exc
    except OSError as exc:
        raise GpioUnavailable(f"gpio: cannot open {path} (lgpio): {exc.strerror or exc}") from exc


def use_pin_factory(configured: str = "lgpio") -> PinFactoryChoice:
    """Install the pin factory every device here uses, unless one is installed already (a test's or the demo's
    ``MockFactory``). Precedence: an installed factory, then ``GPIOZERO_PIN_FACTORY``, then ``configured``."""
    if Device.pin_factory is not None:
        installed = "mock" if type(Device.pin_factory).__name__ == "MockFactory" else type(Device.pin_factory).__name__
        return PinFactoryChoice(installed, "installed")
    choice = choose_pin_factory(configured)
    Device.pin_factory = make_pin_factory(choice.name)
    return choice


def _ensure_pin_factory() -> None:
    """gpiozero's own fallback would try every backend and end on ``native`` (no Pi 5, not in the unit's
    device policy); instead a device made before :func:`use_pin_factory` gets the configured default."""
    if Device.pin_factory is None:
        use_pin_factory()


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
        _ensure_pin_factory()
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
    _ensure_pin_factory()
    return DigitalOutputDevice(pin, active_high=active_high, initial_value=False)


def make_buzzer(pin: str, *, active_high: bool = True) -> Buzzer:
    """The sounder, initially off."""
    _ensure_pin_factory()
    return Buzzer(pin, active_high=active_high, initial_value=False)
