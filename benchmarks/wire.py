"""Polling at wire speed: gatewayd on a simulated RS-485 line that honours the baud rate.

Each case runs ``gatewayd`` as a real subprocess (``GPIOZERO_PIN_FACTORY=mock``) against pymodbus's own RTU
server behind :class:`gateway_sim.wireline.WireLine` (bytes paced at the baud rate and character format, the
3.5-character silence, half duplex, a 10 ms turnaround per detector), in this process:

- ``floor_ms``: the wire's floor of one cycle as polled (each detector's fast window), and
  ``floor_full_read_ms`` if every register of the block were read each cycle (:mod:`drivers.wire`);
- ``cycle_ms``: the median time between two requests to the same detector, as the simulated devices
  received them, over a quiet window (no alarms); ``cycle_over_floor`` = cycle ÷ floor;
- ``cpu_pct``: CPU time of gatewayd and all its children over that quiet window, in % of one core;
- ``change_to_buzzer_*``: each detector in turn rises to a low alarm (and, without ``--quick``, then to a high
  one) at a random moment. Measured from the moment the simulated detector's concentration changed
  (``time.time()`` read as the benchmark sets it: the detector's own clock) to the ``wall`` of the alarm
  event (``raised``/``escalated``) in gatewayd's outbox. The panel stamps that ``wall`` right after
  ``Annunciator.show()`` set the buzzer to the first state of its pattern, so for the first alarm of a case
  it is the moment the (mock) buzzer pin went on; later alarms find the buzzer already sounding, and their
  stamp is the moment it would have gone on. The first alarm is cross-checked against the timestamp of
  gatewayd's ``annunciator`` log line (``first_alarm_log_lag_ms``).

Prints one JSON line last: ``{"cases": [...]}``. ``.venv/bin/python benchmarks/wire.py [--quick]
[--case NAME ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from common import ROOT, percentile, stop_service

from drivers.profiles import BUILTIN_DETECTOR_PROFILES
from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat, bus_floor_s
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from gateway_sim.wireline import WireSpec
from tests.support.broker import MosquittoBroker
from tests.support.site import build_site

LOW, HIGH = 15.0, 30.0  # %LEL: above the default low (10) and high (25) thresholds
BUS_TIMEOUT_S = 0.3
POLL_INTERVAL_S = 1.0  # below every case's floor: the bus polls back to back


@dataclass(frozen=True)
class Case:
    name: str
    baud: int
    devices: int
    profile: str


CASES = (
    Case("64xA-9600", 9600, 64, "A"),
    Case("64xA-19200", 19200, 64, "A"),
    Case("64xA-38400", 38400, 64, "A"),
    Case("32xB-9600", 9600, 32, "B"),
)


class RequestLog:
    """When each simulated detector received each request (``time.monotonic()``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: dict[int, list[float]] = defaultdict(list)

    def __call__(self, slave: int, _frame: bytes, _at: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.times[slave].append(now)

    def polled_at_least(self, slaves: list[int], n: int) -> bool:
        with self._lock:
            return all(len(self.times[s]) >= n for s in slaves)

    def first_after(self, slave: int, t: float) -> float | None:
        """When ``slave`` next received a request after ``t``."""
        with self._lock:
            return next((at for at in self.times[slave] if at > t), None)

    def cycle_s(self, since: float, until: float) -> float:
        """Median gap between consecutive requests to one detector, within [since, until]."""
        gaps = []
        with self._lock:
            for times in self.times.values():
                inside = [t for t in times if since <= t <= until]
                gaps += [b - a for a, b in itertools.pairwise(inside)]
        return statistics.median(gaps) if gaps else float("nan")


def _service_processes(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_s(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            out[p.pid] = times.user + times.system + times.children_user + times.children_system
    return out


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"gatewayd exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _gatewayd(config: Path, log_path: Path, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
           "PYTHONPATH": str(ROOT)}
    exe = Path(sys.executable).with_name("gatewayd")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.daemon"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    try:
        yield proc
    finally:
        stop_service(proc)


def _alarm_events(db: Path) -> dict[tuple[str, str], float]:
    """(device, action) → wall of the first such alarm event in the outbox."""
    found: dict[tuple[str, str], float] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for device, action, wall in conn.execute(
                "SELECT device, action, wall FROM events WHERE kind = 'alarm' ORDER BY seq"):
            found.setdefault((device, action), wall)
    return found


def _annunciator_log(log_path: Path) -> list[float]:
    """Wall times of gatewayd's ``annunciator`` log lines that turned the buzzer on."""
    times = []
    for line in log_path.read_bytes().splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "annunciator" and entry.get("buzzer") == "on":
            times.append(datetime.fromisoformat(entry["timestamp"]).timestamp())
    return times


def run_case(case: Case, broker: MosquittoBroker, workdir: Path, *, quiet_s: float, levels: int,
             spacing_s: float) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    profile = BUILTIN_DETECTOR_PROFILES[case.profile]
    line = LineFormat(baud=case.baud)
    floor = bus_floor_s(line, list(profile.cycle_reads) * case.devices, turnaround_s=DEFAULT_TURNAROUND_S)
    floor_full = bus_floor_s(line, list(profile.full_reads) * case.devices, turnaround_s=DEFAULT_TURNAROUND_S)
    requests = RequestLog()
    addresses = list(range(1, case.devices + 1))
    with VirtualNullModem(workdir / "dev") as modem:
        sim = SimulatedBus(modem.device_port, wire=WireSpec(baud=case.baud, turnaround_s=DEFAULT_TURNAROUND_S),
                           on_request=requests)
        detectors: dict[int, SimulatedGasDetector] = {a: sim.add_gas_detector(a, "A" if case.profile == "A" else "B")
                                                      for a in addresses}
        for detector in detectors.values():
            detector.set_concentration(0.0)
        spec = build_site(bus_port=modem.gateway_port, db_path=workdir / "gateway.db", broker_port=broker.port,
                          socket_path=workdir / "control.sock", households=case.devices, profile=case.profile,
                          timeout_s=BUS_TIMEOUT_S, poll_interval_s=POLL_INTERVAL_S)
        text = spec.toml.replace("baudrate = 9600", f"baudrate = {case.baud}").replace("gc_freeze = false",
                                                                                        "gc_freeze = true")
        config = workdir / "site.toml"
        config.write_text(text, encoding="utf-8")
        device_of = {d.address: d.id for d in spec.detectors}
        log_path = workdir / "gatewayd.log"
        with sim, _gatewayd(config, log_path, workdir) as proc:
            _wait(lambda: requests.polled_at_least(addresses, 3), 120, "three cycles", proc)
            procs = _service_processes(proc.pid)
            cpu0, t0 = _cpu_s(procs), time.monotonic()
            time.sleep(quiet_s)
            cpu1, t1 = _cpu_s(procs), time.monotonic()
            cpu_pct = 100 * sum(cpu1.get(pid, 0.0) - cpu0[pid] for pid in cpu0) / (t1 - t0)
            cycle = requests.cycle_s(t0, t1)
            daemon_view = _daemon_bus_view(config)

            rng = random.Random(20)
            changes: list[tuple[str, str, float]] = []  # (device, action, wall of the change)
            polled_after: list[tuple[int, float]] = []  # (address, monotonic time of the change)
            for level, action in ((LOW, "raised"), (HIGH, "escalated"))[:levels]:
                for address in rng.sample(addresses, len(addresses)):
                    time.sleep(rng.uniform(0, 2 * spacing_s))
                    detectors[address].set_concentration(level)
                    changes.append((device_of[address], action, time.time()))
                    polled_after.append((address, time.monotonic()))
            time.sleep(2 * cycle + 1.0)
            events = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                events = _alarm_events(workdir / "gateway.db")
                if all((device, action) in events for device, action, _ in changes):
                    break
                time.sleep(0.5)
            # The first request that could carry the change: how long the change waited for its poll.
            waits_ms = [((requests.first_after(a, t) or math.nan) - t) * 1000 for a, t in polled_after]
        missing = [(d, a) for d, a, _ in changes if (d, a) not in events]
        after_poll_ms = [(events[(d, a)] - at) * 1000 - wait for (d, a, at), wait in zip(changes, waits_ms, strict=True)
                         if (d, a) in events]
        latencies_ms = [(events[(d, a)] - at) * 1000 for d, a, at in changes if (d, a) in events]
        first_change = min(at for _, _, at in changes)
        buzzer_log = [t for t in _annunciator_log(log_path) if t >= first_change]
        first_event = min(events[(d, a)] for d, a, _ in changes if (d, a) in events)
    return {
        "name": case.name,
        "baud": case.baud,
        "devices": case.devices,
        "profile": case.profile,
        "floor_ms": round(floor * 1000, 1),
        "floor_full_read_ms": round(floor_full * 1000, 1),
        "cycle_ms": round(cycle * 1000, 1),
        "cycle_over_floor": round(cycle / floor, 3),
        "change_to_buzzer_p50_ms": round(percentile(latencies_ms, 50), 1),
        "change_to_buzzer_p99_ms": round(percentile(latencies_ms, 99), 1),
        "change_to_buzzer_max_ms": round(max(latencies_ms), 1) if latencies_ms else None,
        "cpu_pct": round(cpu_pct, 2),
        "change_to_poll_p99_ms": round(percentile(waits_ms, 99), 1),
        "change_to_poll_max_ms": round(max(waits_ms), 1),
        "poll_to_buzzer_p50_ms": round(percentile(after_poll_ms, 50), 1),
        "poll_to_buzzer_p99_ms": round(percentile(after_poll_ms, 99), 1),
        "poll_to_buzzer_max_ms": round(max(after_poll_ms), 1),
        "alarms": len(latencies_ms),
        "alarms_missing": len(missing),
        "first_alarm_log_lag_ms": round((buzzer_log[0] - first_event) * 1000, 2) if buzzer_log else None,
        "quiet_window_s": round(t1 - t0, 1),
        "daemon_bus": daemon_view,
        "workdir": str(workdir),
    }


def _daemon_bus_view(config: Path) -> dict[str, Any] | None:
    """The bus as ``gatewayctl status --json`` shows it (its own floor and last cycle, where it reports them)."""
    exe = Path(sys.executable).with_name("gatewayctl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.ops.cli"]
    try:
        out = subprocess.run([*cmd, "--config", str(config), "status", "--json"], capture_output=True, text=True,
                             timeout=20, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        buses = json.loads(out.stdout)["data"].get("buses", [])
    except (ValueError, KeyError, TypeError, subprocess.TimeoutExpired, AttributeError):
        return None
    return buses[0] if buses else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short quiet window and one alarm per detector")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES], help="run only these cases")
    args = parser.parse_args(argv)
    quiet_s, levels, spacing_s = (8.0, 1, 0.15) if args.quick else (20.0, 2, 0.15)
    root = Path(tempfile.mkdtemp(prefix="bench-wire-"))
    broker = MosquittoBroker(root / "broker")
    broker.start()
    results = []
    try:
        for case in CASES:
            if args.case and case.name not in args.case:
                continue
            result = run_case(case, broker, root / case.name, quiet_s=quiet_s, levels=levels, spacing_s=spacing_s)
            results.append(result)
            ok_cycle = result["cycle_over_floor"] <= 1.05
            ok_alarm = result["change_to_buzzer_p99_ms"] <= result["cycle_ms"] + 2
            ok_cpu = result["cpu_pct"] <= 2
            print(f"{case.name:<11} floor {result['floor_ms']:>7.1f} ms "
                  f"(whole reads {result['floor_full_read_ms']:.1f})"
                  f"  cycle {result['cycle_ms']:>7.1f} ms ×{result['cycle_over_floor']:.3f} "
                  f"{'met' if ok_cycle else 'MISSED'}  change→buzzer p50 {result['change_to_buzzer_p50_ms']:.1f} "
                  f"p99 {result['change_to_buzzer_p99_ms']:.1f} max {result['change_to_buzzer_max_ms']} ms "
                  f"{'met' if ok_alarm else 'MISSED'}  cpu {result['cpu_pct']:.2f} % {'met' if ok_cpu else 'MISSED'}",
                  file=sys.stderr)
    finally:
        broker.stop()
    print(json.dumps({"cases": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
