"""A simulated RS-485 bus: pymodbus's own RTU server serving several simulated slaves on one serial port.

Addresses with no slave stay silent, as on a real bus; :meth:`SimulatedBus.flaky` makes a slave fail a share of
its polls at random. Given a :class:`~gateway_sim.wireline.WireSpec` the server sits behind a line in wire time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
import tty
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway_sim.devices import (
    Profile,
    SimulatedController,
    SimulatedGasDetector,
    SimulatedIOStation,
    SimulatedSlave,
)
from gateway_sim.nullmodem import PtyEnd
from gateway_sim.wireline import WireFrame, WireLine, WireSpec, check_turnaround

__all__ = ["SimulatedBus"]

_log = logging.getLogger(__name__)


class SimulatedBus:
    """A pymodbus RTU server serving several slaves on one serial port, in its own thread and loop.

    Addresses with no slave (and slaves switched off with :meth:`responding`) stay silent, as on a
    real bus, so the master times out.

    Without ``wire`` bytes move at memory speed, as on any pseudo-terminal. With a :class:`WireSpec`
    the server listens on a pty of its own and a :class:`WireLine` relays between ``port`` and it in wire
    time; the line format then comes from the spec.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        on_response: Callable[[int, bytes, float], None] | None = None,
        on_request: Callable[[int, bytes, float], None] | None = None,
        wire: WireSpec | None = None,
    ) -> None:
        self.port = port
        self.wire = wire
        if wire is not None:
            baudrate, parity, stopbits, bytesize = wire.baud, wire.parity, wire.stopbits, wire.bytesize
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        #: Called in the server thread with (slave, frame, ``time.perf_counter()``) as each response
        #: frame is handed to the serial port.
        self.on_response = on_response
        #: Called in the server thread with (slave, frame, ``time.perf_counter()``) as each request frame
        #: reaches the server (with a wire: once its last character has arrived).
        self.on_request = on_request
        self._lock = threading.Lock()
        self._slaves: dict[int, SimulatedSlave] = {}
        self._answering: set[int] = set()
        self._turnarounds: dict[int, float] = {}
        self._flaky: dict[int, tuple[float, random.Random]] = {}
        self._dropped: dict[int, int] = {}
        self._wire_line: WireLine | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def slaves(self) -> dict[int, SimulatedSlave]:
        """The slaves on the bus by address."""
        return dict(self._slaves)

    def add_gas_detector(
        self,
        slave: int,
        profile: Profile = "A",
        *,
        unit: str = "%LEL",
        decimals: int = 1,
        full_scale: float = 100.0,
        low_setpoint: float = 10.0,
        high_setpoint: float = 25.0,
        gas: str = "CH4",
    ) -> SimulatedGasDetector:
        """Add a gas detector (before :meth:`start`)."""
        detector = SimulatedGasDetector(
            slave,
            profile,
            unit=unit,
            decimals=decimals,
            full_scale=full_scale,
            low_setpoint=low_setpoint,
            high_setpoint=high_setpoint,
            gas=gas,
        )
        self._add(detector)
        return detector

    def add_io_station(self, slave: int) -> SimulatedIOStation:
        """Add an extinguisher-cabinet I/O module (before :meth:`start`)."""
        station = SimulatedIOStation(slave)
        self._add(station)
        return station

    def add_controller(self, slave: int, **options: Any) -> SimulatedController:
        """Add a multi-channel controller (before :meth:`start`); options as for :class:`SimulatedController`."""
        controller = SimulatedController(slave, **options)
        self._add(controller)
        return controller

    def flaky(self, slave: int, fraction: float, *, seed: int | None = None) -> None:
        """Let ``slave`` leave ``fraction`` of its answers unsent, at random (``seed`` makes it repeatable):
        a device that fails that share of its polls. 0 makes it reliable again."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be 0–1, got {fraction}")
        with self._lock:
            if fraction:
                self._flaky[slave] = (fraction, random.Random(seed))
            else:
                self._flaky.pop(slave, None)

    def dropped(self, slave: int) -> int:
        """Answers of ``slave`` left unsent by :meth:`flaky` so far."""
        with self._lock:
            return self._dropped.get(slave, 0)

    def set_turnaround(self, slave: int, seconds: float) -> None:
        """Give ``slave`` its own turnaround (1–100 ms) on a bus with a wire; any time, also while running."""
        check_turnaround(seconds)
        with self._lock:
            self._turnarounds[slave] = float(seconds)

    def turnaround(self, slave: int) -> float:
        """The turnaround of ``slave`` (its own, else the wire's default; 0 without a wire)."""
        if self.wire is None:
            return 0.0
        with self._lock:
            return self._turnarounds.get(slave, self.wire.turnaround_s)

    def wire_frames(self) -> list[WireFrame]:
        """The last frames on the wire as it scheduled them (empty without a wire)."""
        return list(self._wire_line.frames) if self._wire_line is not None else []

    @property
    def corrupted_frames(self) -> int:
        """Frames the wire's noise has corrupted so far (0 without a wire)."""
        return self._wire_line.corrupted if self._wire_line is not None else 0

    def _add(self, sim: SimulatedSlave) -> None:
        if self._thread is not None:
            raise RuntimeError("slaves must be added before the bus starts")
        if sim.slave in self._slaves:
            raise ValueError(f"slave {sim.slave} already on the bus")
        with self._lock:
            self._slaves[sim.slave] = sim
            self._answering.add(sim.slave)

    def responding(self, slave: int, on: bool = True) -> None:
        """Let ``slave`` answer (True) or go silent like an offline device (False)."""
        if slave not in self._slaves:
            raise ValueError(f"no slave {slave} on the bus")
        with self._lock:
            if on:
                self._answering.add(slave)
            else:
                self._answering.discard(slave)

    def start(self, timeout: float = 10.0) -> None:
        """Start the server thread; returns once the serial port is open."""
        if self._thread is not None:
            raise RuntimeError("bus already started")
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._thread_main, name=f"modbus-sim {self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"simulated bus on {self.port} did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(f"simulated bus could not open {self.port}") from self._start_error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and close the port. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"simulated bus on {self.port} did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                _log.exception("simulated bus crashed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        devices = [sim._sim_device() for sim in self._slaves.values()]
        # Address 0 catches every other address; its (illegal address) answers are never sent.
        devices.append(SimDevice(id=0, simdata=[SimData(0, datatype=DataType.INVALID)]))
        with contextlib.ExitStack() as wire:
            port = self.port if self.wire is None else self._open_wire(wire, self.wire)
            await self._serve_on(devices, port, self._stop_event)

    def _open_wire(self, stack: contextlib.ExitStack, spec: WireSpec) -> str:
        """Put a :class:`WireLine` between :attr:`port` and a new pty; return the pty the server opens."""
        outer = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        stack.callback(os.close, outer)
        with contextlib.suppress(OSError):  # a pty or serial port; anything else is used as it is
            tty.setraw(outer)
        inner = PtyEnd.open()
        stack.callback(inner.close)
        line = WireLine(outer, inner.master, spec, turnaround=self.turnaround, name=f"wire {self.port}")
        line.start()
        stack.callback(line.stop)
        self._wire_line = line
        return inner.slave_path

    async def _serve_on(self, devices: list[SimDevice], port: str, stop: asyncio.Event) -> None:
        server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
            trace_packet=self._trace_packet,
        )
        await server.serve_forever(background=True)
        self._started.set()
        try:
            await stop.wait()
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not data:
            return data
        if not sending:
            request_hook = self.on_request
            if request_hook is not None:
                try:
                    request_hook(data[0], data, time.perf_counter())
                except Exception:
                    _log.exception("on_request hook failed")
            return data
        slave = data[0]
        with self._lock:
            answering = slave in self._answering
            flaky = self._flaky.get(slave)
            if answering and flaky is not None and flaky[1].random() < flaky[0]:
                answering = False
                self._dropped[slave] = self._dropped.get(slave, 0) + 1
        if not answering:
            return b""
        hook = self.on_response
        if hook is not None:
            try:
                hook(slave, data, time.perf_counter())
            except Exception:
                _log.exception("on_response hook failed")
        return data
