"""Simulated RS-485 buses in a process of their own, for the benchmarks.

The detectors (pymodbus's RTU server on a pseudo-terminal, :mod:`gateway_sim`) must not share an
interpreter — and its GIL — with the gateway under test, any more than a real detector does. This module
runs one :class:`~gateway_sim.nullmodem.VirtualNullModem` and :class:`~gateway_sim.bus.SimulatedBus` per bus
in a child process and lets the parent set concentrations and *arm* a detector: the child then reports
when the first response frame carrying the armed concentration was handed over (``time.perf_counter()``,
which is CLOCK_MONOTONIC on Linux and so comparable across processes, plus ``time.time()``).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["FrameReport", "SimBuses"]

SIM_PRIORITY = 60  # above the gateway's alarm threads (runtime.realtime_priority, e.g. 50)


@dataclass(frozen=True)
class FrameReport:
    """When the armed response frame left the detector and reached the gateway's port."""

    bus: str
    slave: int
    raw: int
    response: float  # perf_counter when pymodbus handed the frame to its serial port
    handed_over: float  # perf_counter when the null modem began writing it to the gateway side
    wall: float  # time.time() at hand-over


def _regs_of(frame: bytes, start: int) -> tuple[int, int] | None:
    """(slave, register 1) of a function-3 response frame whose request began at register ``start``; None when
    the frame does not carry register 1 (profile A: the gateway reads 0–9 now and then, the fast window 1–5
    in between)."""
    if len(frame) < 5 or frame[1] != 3:
        return None
    count = frame[2] // 2
    offset = 1 - start
    if not 0 <= offset < count or len(frame) < 5 + 2 * offset:
        return None
    return frame[0], (frame[3 + 2 * offset] << 8) | frame[4 + 2 * offset]


def _hardware_priority() -> str:
    """Run the simulated detectors and cable like hardware: not queued behind the gateway for a CPU.

    SCHED_FIFO (inherited by the threads started afterwards) when permitted, else normal scheduling —
    then the stressed gateway's CPU load also delays the simulated wire, and the serial figures say so.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SIM_PRIORITY))
    except (AttributeError, PermissionError, OSError):
        return "normal"
    return f"fifo:{SIM_PRIORITY}"


def _misbehaving_bus_class() -> type[Any]:
    from gateway_sim.bus import SimulatedBus

    class MisbehavingBus(SimulatedBus):  # type: ignore[misc]
        """A bus whose slaves in :attr:`garbled` answer with a corrupted frame (CRC no longer matches)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.garbled: set[int] = set()

        def _trace_packet(self, sending: bool, data: bytes) -> bytes:
            out: bytes = super()._trace_packet(sending, data)
            if sending and out and out[0] in self.garbled:
                return out[:-1] + bytes([out[-1] ^ 0x5A])
            return out

    return MisbehavingBus


#: What a misbehaving detector does, in turn, for this many seconds each: silent (the gateway times out),
#: garbled frames (bad CRC), an unknown status code (0xEE), then normal.
MISBEHAVIOUR = (("silent", 3.0), ("garbled", 3.0), ("bad_status", 3.0), ("normal", 6.0))


def _misbehave(bus: Any, detector: Any, slave: int, stop: threading.Event) -> None:
    while not stop.is_set():
        for phase, seconds in MISBEHAVIOUR:
            bus.responding(slave, phase != "silent")
            if phase == "garbled":
                bus.garbled.add(slave)
            else:
                bus.garbled.discard(slave)
            detector.set_status_code(0xEE if phase == "bad_status" else 0x01)
            if stop.wait(seconds):
                return


def _child(conn: Connection, workdir: str, layout: dict[str, list[int]],
           misbehaving: tuple[tuple[str, int], ...] = ()) -> None:
    from gateway_sim.bus import SimulatedBus
    from gateway_sim.nullmodem import VirtualNullModem

    scheduling = _hardware_priority()
    modems = {}
    buses = {}
    detectors = {}
    armed: dict[tuple[str, int], tuple[int, int]] = {}  # (bus, slave) → (token, raw)
    pending: dict[str, list[tuple[int, int, int, bytes, float]]] = {}  # bus → frames awaiting hand-over
    reports: dict[int, FrameReport] = {}
    starts: dict[tuple[str, int], int] = {}  # (bus, slave) → first register of its last read request
    cond = threading.Condition()

    for name, slaves in layout.items():
        pending[name] = []
        buffer = bytearray()

        def on_request(slave: int, frame: bytes, _t: float, name: str = name) -> None:
            if len(frame) >= 4 and frame[1] == 3:
                starts[(name, slave)] = (frame[2] << 8) | frame[3]

        def on_response(slave: int, frame: bytes, t: float, name: str = name) -> None:
            parsed = _regs_of(frame, starts.get((name, slave), 0))
            if parsed is None:
                return
            with cond:
                entry = armed.get((name, slave))
                if entry is not None and entry[1] == parsed[1]:
                    del armed[(name, slave)]
                    pending[name].append((entry[0], slave, parsed[1], bytes(frame), t))

        def on_device_write(data: bytes, t: float, name: str = name, buffer: bytearray = buffer) -> None:
            wall = time.time()
            with cond:
                waiting = pending[name]
                if not waiting:
                    buffer.clear()
                    return
                buffer.extend(data)
                for p in [p for p in waiting if p[3] in buffer]:
                    waiting.remove(p)
                    token, slave, raw, _frame, t_resp = p
                    reports[token] = FrameReport(name, slave, raw, t_resp, t, wall)
                if waiting:
                    del buffer[:-64]
                else:
                    buffer.clear()
                cond.notify_all()

        modem = VirtualNullModem(Path(workdir) / name, on_device_write=on_device_write)
        modem.start()
        bus_class = _misbehaving_bus_class() if any(b == name for b, _ in misbehaving) else SimulatedBus
        bus = bus_class(modem.device_port, on_response=on_response, on_request=on_request)
        for slave in slaves:
            det = bus.add_gas_detector(slave, "A", unit="%LEL", decimals=1)
            det.set_status("normal")
            detectors[(name, slave)] = det
        bus.start()
        modems[name] = modem
        buses[name] = bus

    stop_misbehaving = threading.Event()
    for bus_name, slave in misbehaving:
        threading.Thread(target=_misbehave, args=(buses[bus_name], detectors[(bus_name, slave)], slave,
                                                  stop_misbehaving), name=f"misbehave-{slave}", daemon=True).start()

    conn.send(("ready", {name: m.gateway_port for name, m in modems.items()}, scheduling))
    try:
        while True:
            msg = conn.recv()
            op = msg[0]
            if op == "stop":
                break
            if op == "set":  # no reply: the parent must not be woken while the gateway works
                _, bus_name, slave, value, token = msg
                with cond:
                    detectors[(bus_name, slave)].set_concentration(value)
                    if token is not None:
                        armed[(bus_name, slave)] = (token, round(value * 10))
            elif op == "report":
                _, token, timeout = msg
                with cond:
                    cond.wait_for(lambda: token in reports, timeout)  # noqa: B023
                    conn.send(reports.pop(token, None))
    finally:
        stop_misbehaving.set()
        for bus in buses.values():
            bus.stop()
        for modem in modems.values():
            modem.close()
        conn.send(("stopped", None))


class SimBuses:
    """Profile A gas detectors (%LEL, one decimal) on simulated buses served by a child process.

    Calls are synchronous and must come from one thread at a time. :meth:`set` sends and returns at once;
    the child says nothing until asked with :meth:`report`, so no thread of the calling process wakes up
    while the gateway under test is reacting to a frame.
    """

    def __init__(self, workdir: str | Path, layout: dict[str, list[int]],
                 misbehaving: tuple[tuple[str, int], ...] = ()) -> None:
        """``misbehaving``: (bus, slave) of detectors that cycle through :data:`MISBEHAVIOUR`."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_conn, str(workdir), layout, tuple(misbehaving)),
                                 name="simbus", daemon=True)
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self.ports: dict[str, str] = {}
        self.scheduling = ""

    def start(self, timeout: float = 30.0) -> dict[str, str]:
        """Start the child; returns bus name → the gateway-side port path."""
        self._proc.start()
        if not self._conn.poll(timeout):
            raise TimeoutError("simulated buses did not start")
        op, ports, self.scheduling = self._conn.recv()
        assert op == "ready", op
        self.ports = ports
        return ports

    def set(self, bus: str, slave: int, value: float, *, arm: bool = False) -> int | None:
        """Set a detector's concentration; with ``arm`` returns a token for :meth:`report`."""
        token = next(self._tokens) if arm else None
        with self._lock:
            self._conn.send(("set", bus, slave, value, token))
        return token

    def report(self, token: int, timeout: float = 10.0) -> FrameReport:
        """When the first response frame carrying an armed :meth:`set`'s value was sent (waits for it)."""
        with self._lock:
            self._conn.send(("report", token, timeout))
            if not self._conn.poll(timeout + 5):
                raise TimeoutError("the simulated buses did not answer")
            report = self._conn.recv()
        if report is None:
            raise TimeoutError(f"no frame carried the value armed with token {token}")
        assert isinstance(report, FrameReport)
        return report

    def stop(self) -> None:
        """Stop the buses and the child."""
        if self._proc.is_alive():
            with self._lock:
                self._conn.send(("stop",))
            self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
