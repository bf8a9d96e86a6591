"""Running the real daemon components in-process against a simulated building.

* :func:`simulated_detectors` puts one pymodbus-served gas detector per :class:`DetectorSpec` on a bus.
* :func:`running_gateway` runs the panel in this process and its storage/uplink process as a real child.
* :class:`TimedMockPin` is a gpiozero ``MockPin`` that also keeps the monotonic time of every change,
  for ordering checks against other clocks (``MockPin.states`` keeps only deltas).
* :func:`read_events` reads the outbox with plain ``sqlite3``, independently of the daemon.
* :func:`eventually` is an async ``wait_until`` that lets the loop (and so the gateway) run meanwhile.
* :class:`CountingHeartbeats` keeps the time of every beat, so a test can count a bus thread's cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gpiozero.pins.mock import MockPin

from gateway.config import SiteConfig, load_config
from gateway.health import Heartbeats
from gateway.panel.process import PanelProcess
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from tests.support.site import DetectorSpec

__all__ = [
    "CountingHeartbeats", "TimedMockPin", "eventually", "read_events", "running_gateway", "simulated_detectors",
    "uplink_records",
]

T = TypeVar("T")


class TimedMockPin(MockPin):  # type: ignore[misc]
    """A ``MockPin`` recording ``(time.monotonic(), state)`` for every change in :attr:`changes`.

    Create it before the device that uses it: ``factory.pin("GPIO18", pin_class=TimedMockPin)``.
    """

    def __init__(self, factory: Any, info: Any) -> None:
        self.changes: list[tuple[float, bool]] = []
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed:
            self.changes.append((time.monotonic(), bool(value)))
        return changed

    def first_high(self, after: float = float("-inf")) -> float | None:
        """Monotonic time the pin first went high after ``after``, or None."""
        return next((t for t, state in list(self.changes) if state and t > after), None)


class CountingHeartbeats(Heartbeats):
    """Heartbeats that also remember when each part beat (a bus thread beats once per poll cycle)."""

    def __init__(self) -> None:
        super().__init__()
        self.beats: dict[str, list[float]] = {}

    def beat(self, name: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self.beats.setdefault(name, []).append(t)
        super().beat(name, t)

    def count(self, name: str, after: float = float("-inf"), before: float = float("inf")) -> int:
        """Beats of ``name`` strictly between ``after`` and ``before`` (monotonic seconds)."""
        return sum(1 for t in list(self.beats.get(name, ())) if after < t < before)


@contextlib.contextmanager
def simulated_detectors(
    device_port: str, detectors: Sequence[DetectorSpec], *, profile: str = "A"
) -> Iterator[tuple[SimulatedBus, dict[str, SimulatedGasDetector]]]:
    """A running :class:`SimulatedBus` with a %LEL gas detector (status normal, clean air) per spec."""
    bus = SimulatedBus(device_port)
    sims: dict[str, SimulatedGasDetector] = {}
    for spec in detectors:
        sim = bus.add_gas_detector(spec.address, "A" if profile == "A" else "B", unit="%LEL", decimals=1)
        sim.set_status("normal")
        sims[spec.id] = sim
    bus.start()
    try:
        yield bus, sims
    finally:
        bus.stop()


@contextlib.asynccontextmanager
async def running_gateway(
    cfg: SiteConfig,
    *,
    heartbeats: Heartbeats | None = None,
    on_pins_ready: Callable[[PanelProcess], None] | None = None,
    wait_storage: bool = True,
) -> AsyncIterator[PanelProcess]:
    """The real layout: this process is the panel (MockFactory pins, on the running loop); its storage/uplink
    process is a real child started from ``cfg.source``. Stops with a planned stop afterwards.

    The child reads the site file, so a test that changes the storage or MQTT settings must write them there.
    """
    on_file = load_config(cfg.source)
    for part in ("community", "building", "gateway_id", "mqtt", "storage"):
        if getattr(on_file, part) != getattr(cfg, part):
            raise AssertionError(f"cfg.{part} differs from {cfg.source}: the storage process would not see it")
    panel = PanelProcess(cfg, cfg.source, heartbeats=heartbeats, uplink_log=str(uplink_log_path(cfg)))
    if on_pins_ready is not None:
        panel.side._on_pins_ready = lambda: on_pins_ready(panel)
    panel.open()
    try:
        await panel.start_services()
        if wait_storage:
            await eventually(lambda: panel.supervisor.up, timeout=60, message="storage process connected")
        yield panel
    finally:
        await panel.stop(flush_timeout_s=2.0)


def uplink_log_path(cfg: SiteConfig) -> Path:
    """Where :func:`running_gateway` puts the storage process's log (JSON lines)."""
    return Path(cfg.storage.path).with_name("uplink.log")


def uplink_records(cfg: SiteConfig) -> list[dict[str, Any]]:
    """The storage process's log records so far (what ``capture_logs`` gives for this process)."""
    path = uplink_log_path(cfg)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def read_events(db_path: str | os.PathLike[str], where: str = "1", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of the ``events`` table (payload decoded into ``body``), in commit order."""
    if not os.path.exists(db_path):
        return []
    con = sqlite3.connect(db_path, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        rows = con.execute(f"SELECT * FROM events WHERE {where} ORDER BY seq", tuple(params)).fetchall()
    except sqlite3.OperationalError as exc:  # schema not created yet
        if "no such table" in str(exc):
            return []
        raise
    finally:
        con.close()
    result = []
    for row in rows:
        item = dict(row)
        item["body"] = json.loads(item["payload"])
        result.append(item)
    return result


async def eventually(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Await until ``predicate()`` is truthy and return it; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (after {timeout}s)")
        await asyncio.sleep(interval)
