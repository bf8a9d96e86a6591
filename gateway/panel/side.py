"""The real-time half of the gateway: outputs, annunciator, alarm panel and ticker, GPIO contacts, bus threads.

Everything from a reading or a contact edge to the buzzer pin lives here, and nothing here waits for an
event loop: the panel hands copies of its events and annunciations to two callbacks that must not block (the
hand-over's queue, :mod:`gateway.panel.handover`, and a log call scheduled on the panel's loop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from drivers.gpio import ContactInput, make_buzzer, make_output
from drivers.modbus import ExtinguisherStation, GasDetector, ModbusDevice
from gateway.annunciation import Annunciation, Sound
from gateway.config import DeviceConfig, SiteConfig
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.panel.alarm_panel import AlarmPanel
from gateway.panel.annunciator import Annunciator, trouble_pattern
from gateway.panel.buses import BusPoller
from gateway.panel.core import AlarmCore
from gateway.realtime import raise_priority

__all__ = ["AlarmSide", "bus_drivers"]


def bus_drivers(cfg: SiteConfig, bus_id: str) -> list[ModbusDevice]:
    """The Modbus drivers of the devices configured on bus ``bus_id``, in config order."""
    drivers: list[ModbusDevice] = []
    for dev in cfg.bus_devices(bus_id):
        assert dev.address is not None
        if dev.detector_profile is not None:
            drivers.append(GasDetector(dev.id, dev.address, dev.detector_profile))
        elif dev.station_profile is not None:
            drivers.append(ExtinguisherStation(dev.id, dev.address, dev.station_profile))
    return drivers


class AlarmSide:
    """Builds, starts and stops the alarm path of one site; ``on_event``/``on_annunciation`` must not block."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        on_event: Callable[[Event], None],
        on_annunciation: Callable[[Annunciation], None],
        heartbeats: Heartbeats,
        on_pins_ready: Callable[[], None] | None = None,
        saved: dict[str, Any] | None = None,
        on_saved_change: Callable[[], None] | None = None,
    ) -> None:
        """``saved``: the panel state of the last run (:mod:`gateway.panel.state`), restored before the first
        poll; ``on_saved_change`` is told when it changes (it must only set a flag)."""
        self.cfg = cfg
        self._saved = saved
        self._on_saved_change = on_saved_change
        self.restore_problem: str | None = None
        self.heartbeats = heartbeats
        self._on_event = on_event
        self._on_annunciation = on_annunciation
        self._on_pins_ready = on_pins_ready
        self.panel: AlarmPanel
        self.annunciator: Annunciator
        self.buses: dict[str, BusPoller] = {}
        self.contacts: dict[str, ContactInput] = {}
        self._outputs: list[Any] = []
        self._callback_thread = threading.local()

    def start(self) -> None:
        """Open the pins, start the annunciator and ticker, read the contacts, start one thread per bus."""
        cfg = self.cfg
        self.heartbeats.register("annunciator", 5.0)
        buzzer = make_buzzer(cfg.outputs.buzzer.pin, active_high=cfg.outputs.buzzer.active_high)
        leds = {name: make_output(p.pin, active_high=p.active_high) for name, p in cfg.outputs.leds.items()}
        relays = {r.id: make_output(r.pin, active_high=r.active_high) for r in cfg.outputs.relays}
        self._outputs = [buzzer, *leds.values(), *relays.values()]
        self.annunciator = Annunciator(
            buzzer, leds=leds, relays=relays,
            patterns={Sound.TROUBLE: trouble_pattern(cfg.alarm.trouble_chirp_interval_s)},
            heartbeat=self._beater("annunciator"),
            realtime_priority=cfg.runtime.realtime_priority,
        )
        self.annunciator.start()
        core = AlarmCore(cfg.devices, cfg.alarm, cfg.linkage)
        restored: list[Event] = []
        if self._saved is not None:
            try:
                restored = core.restore(self._saved, time.monotonic())
            except (KeyError, ValueError, TypeError) as exc:
                self.restore_problem = f"saved state does not fit this site: {type(exc).__name__}: {exc}"
                core = AlarmCore(cfg.devices, cfg.alarm, cfg.linkage)
        self.panel = AlarmPanel(core, self.annunciator, self._on_event, on_annunciation=self._on_annunciation,
                                on_saved_change=self._on_saved_change)
        if restored:
            self.panel.restore(restored)  # latches and their relays are back before any input is read
        self.heartbeats.register("alarm-ticker", 5.0)
        self.panel.start_ticker(heartbeat=self._beater("alarm-ticker"))
        for dev in cfg.devices:
            if dev.pin is not None:
                self._attach_contact(dev)
        if self._on_pins_ready is not None:
            self._on_pins_ready()
        for device_id, contact in self.contacts.items():
            if contact.is_active:
                self.panel.contact(device_id, True)
            if not contact.is_plausible:
                self.panel.contact_fault(device_id, False)
        for bus in cfg.buses:
            name = f"bus:{bus.id}"
            poller = BusPoller(bus, bus_drivers(cfg, bus.id), self.panel, heartbeat=self._beater(name),
                               realtime_priority=cfg.runtime.realtime_priority)
            self.heartbeats.register(name, poller.deadline_s)
            self.buses[bus.id] = poller
            poller.start()

    def stop_inputs(self) -> None:
        """Stop the bus threads and the ticker (blocks up to a poll cycle); the outputs stay as they are."""
        for poller in self.buses.values():
            poller.stop()
        self.panel.stop()

    def close(self) -> None:
        """Stop the annunciator and release every pin."""
        self.annunciator.stop()
        for contact in self.contacts.values():
            contact.close()
        for output in self._outputs:
            output.close()

    def _beater(self, name: str) -> Callable[[], None]:
        return lambda: self.heartbeats.beat(name)

    def _raise_callback_thread(self) -> None:
        """The GPIO callback thread belongs to lgpio, so it raises itself to the alarm threads' priority once
        it has handled its first edge (once per thread: one system call)."""
        if not getattr(self._callback_thread, "raised", False):
            self._callback_thread.raised = True
            raise_priority(self.cfg.runtime.realtime_priority, "gpio-callback")

    def _attach_contact(self, dev: DeviceConfig) -> None:
        device_id = dev.id

        def changed(active: bool) -> None:
            self.panel.contact(device_id, active)
            self._raise_callback_thread()  # after the pin: nothing stands before it, not even the first time

        def plausible(ok: bool) -> None:
            self.panel.contact_fault(device_id, ok)
            self._raise_callback_thread()

        assert dev.pin is not None
        self.contacts[device_id] = ContactInput(
            dev.pin, contact=dev.contact, pull_up=dev.pull_up, bounce_ms=dev.bounce_ms,
            supervision_pin=dev.supervision_pin, on_change=changed, on_plausibility=plausible)
