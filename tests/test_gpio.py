"""GPIO drivers on gpiozero's MockFactory: dry contacts (NO/NC, supervision pair) and outputs; the pin factory
(lgpio on a Pi, which fails here with one line since this machine has no gpiochip; mock; the env override)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device

from drivers.gpio import (
    PIN_FACTORIES,
    PIN_FACTORY_ENV,
    ContactInput,
    GpioUnavailable,
    choose_pin_factory,
    lgpio_chip,
    load_lgpio,
    make_buzzer,
    make_output,
    make_pin_factory,
    use_pin_factory,
)
from gateway.config import PIN_FACTORIES as CONFIG_PIN_FACTORIES
from gateway.config import ConfigError, parse_config
from tests.support.site import build_site


class Recorder:
    """Collects callback values and the thread each one ran on."""

    def __init__(self) -> None:
        self.values: list[bool] = []
        self.threads: list[int] = []

    def __call__(self, value: bool) -> None:
        self.values.append(value)
        self.threads.append(threading.get_ident())


@pytest.fixture
def contacts() -> Iterator[list[ContactInput]]:
    """Contacts created by a test, closed at teardown."""
    made: list[ContactInput] = []
    yield made
    for contact in made:
        contact.close()


def contact_on(made: list[ContactInput], pin: str, **kwargs: Any) -> tuple[ContactInput, Recorder]:
    changes = Recorder()
    contact = ContactInput(pin, on_change=changes, **kwargs)
    made.append(contact)
    return contact, changes


# -- NO / NC with the pull-up: pin low = contact closed ----------------------------------------------------


def test_normally_open_contact(mock_pins: Any, contacts: list[ContactInput]) -> None:
    contact, changes = contact_on(contacts, "GPIO5", contact="NO")
    pin = mock_pins.pin("GPIO5")
    assert pin.state == 1  # pulled up: the contact is open
    assert (contact.is_closed, contact.is_active) == (False, False)
    pin.drive_low()  # the detector's alarm relay closes
    assert (contact.is_closed, contact.is_active) == (True, True)
    pin.drive_high()
    assert (contact.is_closed, contact.is_active) == (False, False)
    assert changes.values == [True, False]


def test_normally_closed_contact(mock_pins: Any, contacts: list[ContactInput]) -> None:
    contact, changes = contact_on(contacts, "GPIO6", contact="NC")
    pin = mock_pins.pin("GPIO6")
    assert contact.is_active  # open (or a broken wire) is the event for an NC contact
    pin.drive_low()  # the extinguisher sits on its switch
    assert (contact.is_closed, contact.is_active) == (True, False)
    pin.drive_high()  # taken away
    assert (contact.is_closed, contact.is_active) == (False, True)
    assert changes.values == [False, True]


def test_without_pull_up_pin_high_is_closed(mock_pins: Any, contacts: list[ContactInput]) -> None:
    contact, changes = contact_on(contacts, "GPIO13", contact="NO", pull_up=False)
    pin = mock_pins.pin("GPIO13")
    assert pin.state == 0 and not contact.is_closed
    pin.drive_high()
    assert contact.is_closed and contact.is_active
    assert changes.values == [True]


def test_repeated_level_is_not_a_change(mock_pins: Any, contacts: list[ContactInput]) -> None:
    _, changes = contact_on(contacts, "GPIO5", contact="NO")
    pin = mock_pins.pin("GPIO5")
    pin.drive_low()
    pin.drive_low()
    assert changes.values == [True]


# -- callbacks run on the thread that drives the pin ------------------------------------------------------


def test_callback_runs_on_the_driving_thread(mock_pins: Any, contacts: list[ContactInput]) -> None:
    _, changes = contact_on(contacts, "GPIO19", contact="NO")
    pin = mock_pins.pin("GPIO19")
    driver_ident: list[int] = []

    def drive() -> None:
        driver_ident.append(threading.get_ident())
        pin.drive_low()

    thread = threading.Thread(target=drive)
    thread.start()
    thread.join(10)
    assert changes.values == [True]  # already delivered when drive_low() returned
    assert changes.threads == driver_ident
    pin.drive_high()
    assert changes.threads[-1] == threading.get_ident()


def test_callbacks_survive_garbage_collection(mock_pins: Any, contacts: list[ContactInput]) -> None:
    """gpiozero holds callbacks weakly; the contact must keep its own strong references."""
    changes = Recorder()
    contacts.append(ContactInput("GPIO20", contact="NO", on_change=changes, supervision_pin="GPIO21",
                                 on_plausibility=changes))
    gc.collect()
    mock_pins.pin("GPIO20").drive_low()
    mock_pins.pin("GPIO21").drive_low()
    assert changes.values  # both handlers still fire


# -- supervision pair: the two sides of a changeover contact must differ -----------------------------------


def test_supervision_pair_plausibility(mock_pins: Any, contacts: list[ContactInput]) -> None:
    plausibility = Recorder()
    contact, changes = contact_on(contacts, "GPIO5", contact="NC", supervision_pin="GPIO6",
                                  on_plausibility=plausibility)
    main, other = mock_pins.pin("GPIO5"), mock_pins.pin("GPIO6")
    assert not contact.is_plausible  # both sides open: a wiring fault
    main.drive_low()  # main closed, other side open: a healthy changeover
    assert contact.is_plausible and not contact.is_active
    assert changes.values == [False] and plausibility.values == [True]
    other.drive_low()  # both sides closed: stuck or shorted
    assert not contact.is_plausible
    assert plausibility.values == [True, False]
    other.drive_high()
    main.drive_high()  # the switch flips: main open, other closed would be plausible, both open is not
    assert not contact.is_plausible and contact.is_active
    other.drive_low()
    assert contact.is_plausible
    assert plausibility.values[-1] is True


def test_without_supervision_always_plausible(mock_pins: Any, contacts: list[ContactInput]) -> None:
    contact, _ = contact_on(contacts, "GPIO5")
    assert contact.is_plausible
    mock_pins.pin("GPIO5").drive_low()
    assert contact.is_plausible


def test_close_releases_the_pins(mock_pins: Any) -> None:
    first = ContactInput("GPIO5", on_change=Recorder(), supervision_pin="GPIO6")
    first.close()
    second = ContactInput("GPIO5", on_change=Recorder(), supervision_pin="GPIO6")
    second.close()


# -- outputs start off -----------------------------------------------------------------------------------------


def test_buzzer_starts_off(mock_pins: Any) -> None:
    buzzer = make_buzzer("GPIO18")
    try:
        pin = mock_pins.pin("GPIO18")
        assert pin.state == 0 and not buzzer.is_active
        buzzer.on()
        assert pin.state == 1
        buzzer.off()
        pin.assert_states([0, 1, 0])
    finally:
        buzzer.close()


def test_active_low_buzzer_starts_off(mock_pins: Any) -> None:
    buzzer = make_buzzer("GPIO18", active_high=False)
    try:
        pin = mock_pins.pin("GPIO18")
        assert pin.state == 1 and not buzzer.is_active  # off = high for an active-low sounder
        buzzer.on()
        assert pin.state == 0
    finally:
        buzzer.close()


@pytest.mark.parametrize(("active_high", "off_level"), [(True, 0), (False, 1)])
def test_output_starts_off(mock_pins: Any, active_high: bool, off_level: int) -> None:
    relay = make_output("GPIO12", active_high=active_high)
    try:
        pin = mock_pins.pin("GPIO12")
        assert pin.state == off_level and not relay.is_active
        # Never pulsed on while being set up (the first entry is the mock pin's state before it was claimed).
        assert 1 - off_level not in [entry.state for entry in pin.states[1:]]
        relay.on()
        assert pin.state == 1 - off_level
    finally:
        relay.close()


# -- the pin factory: lgpio on a Pi, mock off one ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
no_gpiochip = pytest.mark.skipif(Path("/dev/gpiochip0").exists(), reason="this machine has a real /dev/gpiochip0")


def test_config_and_driver_name_the_same_backends() -> None:
    assert CONFIG_PIN_FACTORIES == PIN_FACTORIES == ("lgpio", "mock")


def test_lgpio_module_is_installed() -> None:
    """The project depends on lgpio, so the venv gpiozero runs in has it; loading it leaves no FIFO here."""
    lgpio = load_lgpio()
    assert callable(lgpio.gpiochip_open)
    assert not list(Path.cwd().glob(".lgd-nfy*"))
    assert not list(ROOT.glob(".lgd-nfy*"))


def test_environment_wins_over_the_config() -> None:
    assert choose_pin_factory("lgpio", {PIN_FACTORY_ENV: "mock"}) == ("mock", PIN_FACTORY_ENV)
    assert choose_pin_factory("mock", {}) == ("mock", "config")
    assert choose_pin_factory("lgpio", {PIN_FACTORY_ENV: ""}) == ("lgpio", "config")


@pytest.mark.parametrize("value", ["native", "rpigpio", "bogus"])
def test_environment_naming_another_backend_is_refused(value: str) -> None:
    with pytest.raises(GpioUnavailable) as err:
        choose_pin_factory("lgpio", {PIN_FACTORY_ENV: value})
    assert err.value.line == f"gpio: {PIN_FACTORY_ENV}={value} is not one of lgpio, mock"


def test_an_installed_factory_is_kept(mock_pins: Any) -> None:
    assert use_pin_factory("lgpio") == ("mock", "installed")
    assert Device.pin_factory is mock_pins


def test_lgpio_chip_is_0_without_a_pi5_chip() -> None:
    if Path("/dev/gpiochip4").exists():
        pytest.skip("this machine has /dev/gpiochip4")
    assert lgpio_chip() == 0


@no_gpiochip
def test_lgpio_without_a_chip_is_one_clear_line() -> None:
    with pytest.raises(GpioUnavailable) as err:
        make_pin_factory("lgpio")
    assert err.value.line == "gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory"
    assert str(err.value) == err.value.line
    assert "\n" not in err.value.line


def _fresh_process(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (PIN_FACTORY_ENV, "LG_WD")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          cwd=ROOT, env=environ)


MAKE_BUZZER = """
from drivers.gpio import GpioUnavailable, make_buzzer
try:
    buzzer = make_buzzer("GPIO18")
except GpioUnavailable as exc:
    print(exc.line)
    raise SystemExit(69)
print(type(buzzer.pin_factory).__name__)
"""


@no_gpiochip
def test_a_device_made_with_no_factory_installed_uses_lgpio() -> None:
    """A fresh interpreter, no environment override: the first device opens lgpio and says why it cannot."""
    result = _fresh_process(MAKE_BUZZER)
    assert result.returncode == 69, result.stderr
    assert result.stdout.splitlines() == ["gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory"]
    assert not list(ROOT.glob(".lgd-nfy*"))  # lgpio's FIFO went to a private directory, not the cwd


def test_the_environment_gives_a_fresh_process_mock_pins() -> None:
    result = _fresh_process(MAKE_BUZZER, **{PIN_FACTORY_ENV: "mock"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "MockFactory"


def test_configured_mock_is_used_without_the_environment() -> None:
    code = ("from drivers.gpio import use_pin_factory, make_output\n"
            "print(use_pin_factory('mock')); print(type(make_output('GPIO12').pin_factory).__name__)")
    result = _fresh_process(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["PinFactoryChoice(name='mock', source='config')", "MockFactory"]


def _runtime(extra: dict[str, Any]) -> Any:
    site = tomllib.loads(build_site(bus_port="/dev/null", db_path="/tmp/x.db", broker_port=1883,
                                    socket_path="/tmp/x.sock").toml)
    site["runtime"].update(extra)
    return parse_config(site)


def test_config_pin_factory_defaults_to_lgpio() -> None:
    assert _runtime({}).runtime.pin_factory == "lgpio"
    assert _runtime({"pin_factory": "mock"}).runtime.pin_factory == "mock"


@pytest.mark.parametrize("value", ["native", "LGPIO", 1])
def test_config_pin_factory_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        _runtime({"pin_factory": value})
    assert err.value.path == "runtime.pin_factory"
    assert "'lgpio', 'mock'" in err.value.reason


def test_a_mock_daemons_pins_remember_a_bounded_history() -> None:
    """gpiozero's MockPin keeps every change; the ``mock`` backend's pins keep the last MOCK_PIN_HISTORY, so a
    demo sounding an alarm for hours does not grow by each beat of its buzzer."""
    from gpiozero import DigitalOutputDevice

    from drivers.mockpins import MOCK_PIN_HISTORY

    factory = make_pin_factory("mock")
    try:
        output = DigitalOutputDevice("GPIO17", pin_factory=factory)
        for _ in range(5000):
            output.toggle()
        states = factory.pin("GPIO17").states
        assert len(states) == MOCK_PIN_HISTORY
        assert states[-1].state == output.value, "the newest change is kept"
        output.close()
    finally:
        factory.close()
