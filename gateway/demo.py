"""``gatewayd --demo``: the example building on a simulated bus and mock pins, playing a gas leak."""

from __future__ import annotations

import asyncio
import re
import tempfile
import threading
from pathlib import Path

import structlog
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from drivers.gpio import ContactInput
from drivers.simulated import SimulatedBus, SimulatedGasDetector, VirtualNullModem
from gateway.config import SiteConfig, load_config
from gateway.panel.process import PanelProcess

__all__ = ["demo_config", "run_demo"]

log = structlog.get_logger()
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "building.toml"
LEAK_HOUSEHOLD = "u1-201"


def demo_config(workdir: Path, bus_port: str, *, source: Path = EXAMPLE) -> SiteConfig:
    """The example site, with its bus on ``bus_port`` and its files in ``workdir``."""
    return load_config(write_demo_site(workdir, bus_port, source=source))


def write_demo_site(workdir: Path, bus_port: str, *, source: Path = EXAMPLE) -> Path:
    """Write the example site with its bus on ``bus_port``, its files in ``workdir`` and a local broker."""
    text = source.read_text()
    replacements = {
        r'^port = "[^"]*"': f"port = {_toml(bus_port)}",
        r'^host = "[^"]*"': 'host = "127.0.0.1"',
        r'^path = "[^"]*"': f"path = {_toml(str(workdir / 'events.db'))}",
        r'^socket = "[^"]*"': f"socket = {_toml(str(workdir / 'control.sock'))}",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"the example site has no line matching {pattern!r}")
    text = re.sub(r"^group = .*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^timeout_s = .*$", "timeout_s = 0.3", text, count=1, flags=re.MULTILINE)
    path = workdir / "building.toml"
    path.write_text(text)
    return path


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
        detector.set_concentration(value)
        await asyncio.sleep(1.0)
    await asyncio.sleep(max(0.0, duration * 0.45 - 10.0))
    log.info("demo: window opened, gas clearing", household=LEAK_HOUSEHOLD)
    for value in (20.0, 9.0, 3.0, 0.0):
        detector.set_concentration(value)
        await asyncio.sleep(1.0)


async def _demo(duration: float, workdir: Path) -> int:
    with VirtualNullModem(workdir) as modem:
        bus = SimulatedBus(modem.device_port)
        cfg = demo_config(workdir, modem.gateway_port)
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
            leak = asyncio.create_task(_play_leak(detectors[LEAK_HOUSEHOLD], duration))
            try:
                await stop.wait()
            finally:
                leak.cancel()
                log.info("demo finished", held_by_panel=len(panel.handover.hold))
                await panel.stop(flush_timeout_s=2.0)
    return 0


def run_demo(*, duration: float = 30.0) -> int:
    """Run the simulated building for ``duration`` seconds; returns the exit status."""
    Device.pin_factory = MockFactory()
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        code = asyncio.run(_demo(duration, Path(tmp)))
    threading.Event().wait(0)  # let daemon threads notice shutdown
    return code
