"""``scripts/demo`` (``python -m gateway_sim.demo``, or ``gatewayd --demo`` from a checkout): the example building on
a simulated bus and mock pins, playing a gas leak.

A technician's sandbox: the site file goes into the demo's working directory beside its database and control
socket, and the exact ``gatewayctl --config ...`` line to talk to it is printed (through ``scripts/gatewayctl``
in a source checkout, so it works without activating the virtual environment); ``--keep`` keeps that directory
afterwards; Ctrl-C ends it like a planned stop (exit 0, no traceback).

The demo keeps to itself: it forwards to a mosquitto of its own on a free loopback port when ``mosquitto`` is
installed, and to nothing otherwise (events stay buffered). Only ``--broker HOST:PORT`` sends its retained
birth and availability messages to a shared broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import structlog
from gpiozero import Device

from drivers.gpio import ContactInput
from drivers.mockpins import mock_pin_factory
from gateway.config import INSTALLED_EXAMPLE, SiteConfig, load_config, parse_endpoint
from gateway.panel.process import PanelProcess
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem

__all__ = ["DemoBroker", "demo_config", "gatewayctl_line", "main", "run_demo"]

log = structlog.get_logger()
ROOT = Path(__file__).resolve().parent.parent
#: The example building: the checkout's, or, in an installed gateway, the installer's copy of it.
_CHECKOUT_EXAMPLE = ROOT / "examples" / "building.toml"
EXAMPLE = _CHECKOUT_EXAMPLE if _CHECKOUT_EXAMPLE.exists() else INSTALLED_EXAMPLE
#: The wrapper a source checkout ships: gatewayctl from .venv, with nothing to activate.
WRAPPER = ROOT / "scripts" / "gatewayctl"
LEAK_HOUSEHOLD = "u1-201"
#: How long the demo's own mosquitto may take to listen.
BROKER_START_S = 10.0


def demo_config(workdir: Path, bus_port: str, *, source: Path = EXAMPLE,
                broker: tuple[str, int] | None = None) -> SiteConfig:
    """The example site, with its bus on ``bus_port``, its files in ``workdir`` and its uplink to ``broker``."""
    return load_config(write_demo_site(workdir, bus_port, source=source, broker=broker))


def write_demo_site(workdir: Path, bus_port: str, *, source: Path = EXAMPLE,
                    broker: tuple[str, int] | None = None) -> Path:
    """Write the example site with its bus on ``bus_port``, its files in ``workdir`` and its uplink to
    ``broker`` (default: a loopback port where nothing listens, so events stay buffered)."""
    host, port = broker if broker is not None else ("127.0.0.1", _free_port())
    text = source.read_text()
    replacements = {
        r'^port = "[^"]*"': f"port = {_toml(bus_port)}",
        r'^host = "[^"]*"': f"host = {_toml(host)}\nallow_plaintext = true",
        r"^port = 1883$": f"port = {port}",
        r'^path = "[^"]*"': f"path = {_toml(str(workdir / 'events.db'))}",
        r'^socket = "[^"]*"': f"socket = {_toml(str(workdir / 'control.sock'))}",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"the example site has no line matching {pattern!r}")
    text = re.sub(r"^group = .*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^timeout_s = .*$", "timeout_s = 0.3", text, count=1, flags=re.MULTILINE)
    # mock pins for whatever else reads this file (gatewayd --config, gatewayctl doctor): no GPIO here
    if re.search(r"^\[runtime\]$", text, flags=re.MULTILINE):
        text = re.sub(r"^\[runtime\]$", '[runtime]\npin_factory = "mock"', text, count=1, flags=re.MULTILINE)
    else:
        text += '\n[runtime]\npin_factory = "mock"\n'
    path = workdir / "building.toml"
    path.write_text(text)
    return path


def gatewayctl_line(config: Path, *, cwd: Path | None = None) -> str:
    """The command a technician types to talk to the demo, from ``cwd`` (default: the current directory).

    In a source checkout that is ``scripts/gatewayctl`` (relative when ``cwd`` is the checkout): ``gatewayctl``
    itself sits in ``.venv/bin``, which a fresh clone's shell does not have on its PATH.
    """
    return f"{_gatewayctl_command(cwd or Path.cwd())} --config {shlex.quote(str(config))} status"


def _gatewayctl_command(cwd: Path) -> str:
    if WRAPPER.is_file():
        return "scripts/gatewayctl" if cwd.resolve() == ROOT else shlex.quote(str(WRAPPER))
    installed = Path(sys.executable).with_name("gatewayctl")
    on_path = shutil.which("gatewayctl")
    if on_path is not None and Path(on_path).resolve() == installed.resolve():
        return "gatewayctl"
    return shlex.quote(str(installed)) if installed.exists() else "gatewayctl"


def _free_port() -> int:
    """A loopback TCP port free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


class DemoBroker:
    """The demo's own mosquitto: loopback only, anonymous, no persistence, on a free port; stopped with the
    demo. :meth:`start` returns False when mosquitto is not installed or would not listen."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        binary = _find_mosquitto()
        if binary is None:
            return False
        for _ in range(3):  # the free port may be taken between the look and the bind: try another
            self.port = _free_port()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            f"log_dest file {self.workdir / 'mosquitto.log'}\n")
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)  # Ctrl-C reaches the demo, which stops it
            deadline = time.monotonic() + BROKER_START_S
            while self._proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return True
                time.sleep(0.05)
            self.stop()
        return False

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _close_nc_contacts(panel: PanelProcess) -> None:
    """On mock pins every contact starts open; close the normally-closed ones (all is well)."""
    for contact in panel.contacts.values():
        if contact.contact == "NC" and isinstance(contact, ContactInput):
            contact._input.pin.drive_low()


async def _play_leak(detector: SimulatedGasDetector, duration: float) -> None:
    """Rise to 35 %LEL, hold, then fall back to clean air."""
    await asyncio.sleep(min(3.0, duration * 0.1))
    log.info("demo: gas leak starts", household=LEAK_HOUSEHOLD)
    for value in (2.0, 5.0, 8.0, 12.0, 18.0, 26.0, 35.0):
        _measure(detector, value)
        await asyncio.sleep(1.0)
    await asyncio.sleep(max(0.0, duration * 0.45 - 10.0))
    log.info("demo: window opened, gas clearing", household=LEAK_HOUSEHOLD)
    for value in (20.0, 9.0, 3.0, 0.0):
        _measure(detector, value)
        await asyncio.sleep(1.0)


def _measure(detector: SimulatedGasDetector, value: float) -> None:
    """A concentration, and the status word a detector with the usual 10 / 25 %LEL set-points shows with it."""
    detector.set_concentration(value)
    detector.set_status("high_alarm" if value >= 25.0 else "low_alarm" if value >= 10.0 else "normal")


async def _demo(duration: float, workdir: Path, broker: tuple[str, int] | None) -> int:
    own = DemoBroker(workdir) if broker is None else None
    try:
        if own is not None:
            if own.start():
                broker = ("127.0.0.1", own.port)
                log.info("demo: its own MQTT broker", broker=f"127.0.0.1:{own.port}")
            else:
                log.info("demo: no MQTT broker (mosquitto is not installed): events stay buffered; "
                         "--broker HOST:PORT forwards them to one")
        return await _run(duration, workdir, broker)
    finally:
        if own is not None:
            own.stop()


async def _run(duration: float, workdir: Path, broker: tuple[str, int] | None) -> int:
    with VirtualNullModem(workdir) as modem:
        bus = SimulatedBus(modem.device_port)
        cfg = demo_config(workdir, modem.gateway_port, broker=broker)
        detectors: dict[str, SimulatedGasDetector] = {}
        for dev in cfg.devices:
            if dev.address is not None and dev.kind == "gas_detector":
                det = bus.add_gas_detector(dev.address, "A", unit="%LEL", decimals=1)
                det.set_status("normal")
                detectors[dev.household or dev.id] = det
        with bus:
            config_path = workdir / "building.toml"
            panel = PanelProcess(cfg, str(config_path))
            panel.side._on_pins_ready = lambda: _close_nc_contacts(panel)
            panel.open()
            await panel.start_services()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.call_later(duration, stop.set)
            for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C is a planned stop, not a traceback
                loop.add_signal_handler(sig, stop.set)
            _announce(config_path)
            leak = asyncio.create_task(_play_leak(detectors[LEAK_HOUSEHOLD], duration))
            try:
                await stop.wait()
            finally:
                leak.cancel()
                log.info("demo finished", held_by_panel=len(panel.handover.hold))
                await panel.stop(flush_timeout_s=2.0)
    return 0


def _announce(config_path: Path) -> None:
    """Say how to reach the demo: a log event always, and a plain line for a person at a terminal."""
    line = gatewayctl_line(config_path)
    log.info("demo: talk to it with gatewayctl", gatewayctl=line)
    if sys.stdout.isatty():
        print(f"\n  In another terminal:  {line}\n", flush=True)


@contextlib.contextmanager
def _workdir(directory: Path | None, keep: bool) -> Iterator[Path]:
    """The demo's directory: ``directory`` (made if missing) or a new temporary one; removed afterwards unless
    ``keep`` or it was given."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory.resolve()
        return
    if keep:
        path = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        yield path
        log.info("demo: directory kept", directory=str(path), config=str(path / "building.toml"),
                 database=str(path / "events.db"))
        return
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        yield Path(tmp)


def run_demo(*, duration: float = 30.0, keep: bool = False, directory: Path | None = None,
             broker: tuple[str, int] | None = None) -> int:
    """Run the simulated building for ``duration`` seconds (or until Ctrl-C); returns the exit status, 0 for
    either way of ending it. ``broker``: forward to that one instead of the demo's own."""
    Device.pin_factory = mock_pin_factory()
    try:
        with _workdir(directory, keep) as workdir:
            code = asyncio.run(_demo(duration, workdir, broker))
    except KeyboardInterrupt:  # before the loop's own handler was installed, or after it was removed
        log.info("demo stopped")
        code = 0
    threading.Event().wait(0)  # let daemon threads notice shutdown
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway_sim.demo [--duration S] [--keep] [--dir DIR] [--broker HOST:PORT]`` (what scripts/demo
    runs)."""
    from gateway.logs import configure_logging

    parser = argparse.ArgumentParser(prog="gateway_sim.demo", description="the example building, simulated")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60; Ctrl-C stops)")
    parser.add_argument("--keep", action="store_true", help="keep the directory, its config and database")
    parser.add_argument("--dir", type=Path, default=None, help="work in this directory (kept) instead of a new one")
    parser.add_argument("--broker", type=_endpoint, default=None, metavar="HOST:PORT",
                        help="forward to this MQTT broker (default: the demo's own, or none without mosquitto)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    return run_demo(duration=args.duration, keep=args.keep, directory=args.dir, broker=args.broker)


def _endpoint(text: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
