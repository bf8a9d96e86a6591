"""Shared pieces of the benchmarks: a site config, a timestamping mock pin, percentiles, log capture."""

from __future__ import annotations

import array
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drivers.mockpins import BoundedMockPin  # noqa: E402
from gateway.realtime import raise_priority  # noqa: E402

__all__ = ["ROOT", "EdgeWatch", "TimedMockPin", "cpu_steal", "log_to_file", "machine_noise", "mappings", "percentile",
           "realtime_neighbours", "resident_frames", "site_toml", "stop_service", "summary"]


def site_toml(
    *,
    buses: dict[str, tuple[str, list[int]]],
    mqtt_port: int,
    db_path: Path,
    contacts: Sequence[tuple[str, int]] = (),
    realtime_priority: int = 0,
    telemetry_interval_s: float = 60.0,
    control_socket: Path | None = None,
    bus_timeout_s: float = 0.5,
) -> str:
    """A site: one household per detector (``gas-<bus>-<address>``), gas-relay contacts, a buzzer and LEDs.

    ``buses`` maps bus id → (port, detector addresses); ``contacts`` is (device id, BCM pin) of gas relays.
    """
    out = ['[site]\ncommunity = "bench"\nbuilding = "b01"\n', '[[units]]\nid = "u1"\n']
    for bus_id, (_port, addresses) in buses.items():
        for address in addresses:
            out.append(f'[[households]]\nid = "h-{bus_id}-{address}"\nunit = "u1"\n')
    for bus_id, (port, _addresses) in buses.items():
        out.append(f'[[buses]]\nid = "{bus_id}"\nport = "{port}"\nbaudrate = 9600\n'
                   f"timeout_s = {bus_timeout_s}\npoll_interval_s = 1.0\n")
    for bus_id, (_port, addresses) in buses.items():
        for address in addresses:
            out.append(f'[[devices]]\nid = "gas-{bus_id}-{address}"\nkind = "gas_detector"\n'
                       f'household = "h-{bus_id}-{address}"\nbus = "{bus_id}"\naddress = {address}\n'
                       'profile = "A"\ngas = "CH4"\n')
    for device_id, pin in contacts:
        out.append(f'[[devices]]\nid = "{device_id}"\nkind = "gas_relay"\nunit = "u1"\npin = {pin}\n'
                   'contact = "NO"\n')
    out.append("[outputs]\nbuzzer = { pin = 18, active_high = true }\n")
    out.append("[outputs.leds]\nalarm = 23\nfault = 24\nsupervisory = 25\n")
    out.append(f"[alarm]\ntelemetry_interval_s = {telemetry_interval_s}\ntelemetry_deadband = 1.0\n")
    out.append(f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nprotocol = 5\nkeepalive_s = 30\n')
    out.append(f'[storage]\npath = "{db_path}"\n')
    out.append(f'[control]\nsocket = "{control_socket or db_path.with_name("control.sock")}"\n')
    out.append(f"[runtime]\nrealtime_priority = {realtime_priority}\ngc_freeze = true\n")
    return "\n".join(out)


class TimedMockPin(BoundedMockPin):
    """A gpiozero mock pin that reports each change with ``time.perf_counter()`` to :attr:`watch`."""

    watch: Callable[[bool, float], None] | None = None

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed and self.watch is not None:
            self.watch(value, time.perf_counter())
        return changed


class EdgeWatch:
    """Records an output pin's edges; waits for the first rise after a moment, or for a state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.rises: list[float] = []
        self.state = False

    def __call__(self, value: bool, t: float) -> None:
        with self._cond:
            self.state = value
            if value:
                self.rises.append(t)
            self._cond.notify_all()

    def first_rise_after(self, t0: float, timeout: float = 10.0) -> float:
        def found() -> float | None:
            first = None
            for t in reversed(self.rises):
                if t < t0:
                    break
                first = t
            return first

        with self._cond:
            result = self._cond.wait_for(found, timeout)
        if result is None:
            raise TimeoutError("the buzzer did not go high")
        return result

    def wait_state(self, value: bool, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.state == value, timeout):
                raise TimeoutError(f"the buzzer did not go {'high' if value else 'low'}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(values_s: Sequence[float]) -> dict[str, Any]:
    """n, p50, p99, max of seconds, in milliseconds rounded to 3 decimals."""
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50": round(percentile(ms, 50), 3), "p99": round(percentile(ms, 99), 3),
            "max": round(max(ms), 3) if ms else float("nan")}


def log_to_file(path: Path) -> Any:
    """Send the gateway's structlog output (JSON lines) to ``path`` instead of stdout."""
    import structlog

    from gateway.logs import configure_logging

    configure_logging(json=True)
    handle = path.open("a", encoding="utf-8", buffering=1)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=handle))
    return handle


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from ``/proc/stat``: time a hypervisor gave this VM's CPUs
    to someone else."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])


def machine_noise(priority: int, runs: int = 3000) -> dict[str, Any]:
    """How much the machine itself stretches a fixed ~0.1 ms of Python, at the alarm threads' priority.

    Nothing of the gateway runs meanwhile, so a p99 well above the p50 is the machine (a hypervisor taking
    the CPU, an interrupt storm), which a run's latency tails then carry too.
    """
    samples: list[float] = []

    def probe() -> None:
        raise_priority(priority, "machine-noise")
        for _ in range(runs):
            start = time.perf_counter()
            total = 0
            for i in range(1500):
                total += i * i
            samples.append(time.perf_counter() - start)
            time.sleep(0.001)

    thread = threading.Thread(target=probe, name="machine-noise")
    thread.start()
    thread.join()
    return {"fixed_work_p50_ms": round(percentile(samples, 50) * 1000, 3),
            "fixed_work_p99_ms": round(percentile(samples, 99) * 1000, 3),
            "fixed_work_max_ms": round(max(samples) * 1000, 3)}


def realtime_neighbours(exclude: Sequence[int] = ()) -> int:
    """Threads of other user processes in a realtime class (SCHED_FIFO/RR), from ``/proc``: on a shared
    machine they take a CPU before anything at normal priority, and at the same or a higher priority before
    the alarm threads of the gateway under test too. Kernel threads and the pids in ``exclude`` are left out."""
    count = 0
    own = {os.getpid(), *exclude}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if not cmdline.read(1):  # a kernel thread
                    continue
            for tid in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{tid}/stat", encoding="ascii", errors="replace") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                if int(fields[38]) in (1, 2):  # policy: SCHED_FIFO, SCHED_RR
                    count += 1
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return count


def mappings(pid: int, *, heap_only: bool = False) -> list[tuple[int, int]]:
    """Address ranges mapped by ``pid`` (``/proc/PID/maps``); with ``heap_only``, ``[heap]`` and anonymous ones."""
    found = []
    with open(f"/proc/{pid}/maps", encoding="ascii") as maps:
        for line in maps:
            fields = line.split()
            if not heap_only or len(fields) == 5 or fields[5] == "[heap]":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end))
    return found


def resident_frames(pid: int, ranges: list[tuple[int, int]]) -> dict[int, int]:
    """Page address → physical frame, for the resident pages of ``ranges`` in ``pid`` (``/proc/PID/pagemap``).

    Frames read as 0 without CAP_SYS_ADMIN. A range that cannot be read ([vsyscall], or one unmapped
    meanwhile) is skipped.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    frames = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end in ranges:
            try:
                pagemap.seek(start // page * 8)
                entries = array.array("Q", pagemap.read((end - start) // page * 8))
            except (OSError, ValueError):
                continue
            for i, entry in enumerate(entries):
                if entry >> 63:  # present
                    frames[start + i * page] = entry & (2**55 - 1)
    return frames


def stop_service(proc: Any) -> None:
    """SIGTERM a service started as a subprocess (a planned stop), SIGKILL if it is still there after 30 s."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
