"""Buzzer latency of the three alarm paths, idle and under stress, in one run.

Runs a real :class:`gateway.daemon.Gateway` in this process — bus threads with pymodbus's sync client on
pseudo-terminals, GPIO contacts and outputs on gpiozero mock pins, the annunciator, SQLite outbox and MQTT
uplink (a private mosquitto) — while the simulated detectors run in a child process (:mod:`simbus`), as a
real detector does not share the gateway's interpreter.

Paths, each measured to the buzzer pin going high (a mock pin that timestamps its changes):

* serial — from the simulated detector (pymodbus's server) handing over the response frame that carries
  the alarm value;
* decode — from a decoded reading entering the alarm panel;
* GPIO — from ``drive_low()`` closing a gas-relay contact.

Conditions: idle (broker up, nothing else going on), and stressed: the asyncio loop blocked for 2 s at
random moments by pure-Python work (it holds the GIL), the broker unreachable (its port black-holed by a
socket that never accepts, plus a second uplink to a port that refuses), the SQLite database locked by
another connection (``BEGIN EXCLUSIVE`` held 1–6 s at random), and 1000 telemetry events/s flowing.

Between trials the alarm is reset through the panel. Prints a table and, last, one JSON line; saves a
histogram PNG under ``benchmarks/out/``.

With ``--alarm-process on`` the daemon is split as ``gatewayd`` splits it (``runtime.alarm_process``): this
process is the alarm process — an :class:`gateway.alarm_link.AlarmHost` with the bus threads, contacts,
panel and annunciator, the trial driver and the telemetry storm (detector telemetry enters the panel here,
as in production) — and a child forked before any thread starts runs the daemon's loop side
(``Gateway(cfg, alarm_process=...)``: outbox, uplink, control socket) with the stress that belongs to it:
the loop blocker, the refused uplink and the database locker. The broker's port is black-holed from here.
The two talk over the alarm link, and the benchmark drives the child over a second socket pair (JSON lines).

    .venv/bin/python benchmarks/buzzer_latency.py [--trials 1000] [--realtime-priority 0] [--alarm-process on]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any, NoReturn, cast

from common import ROOT, EdgeWatch, TimedMockPin, cpu_steal, log_to_file, machine_noise, percentile, site_toml
from gateway.alarm_link import AlarmHost, AlarmLinkError, prepare_alarm_process
from simbus import SimBuses

from drivers.profiles import GasReading
from gateway.config import SiteConfig, parse_config
from gateway.daemon import Gateway
from gateway.panel.alarm_panel import AlarmPanel
from gateway.panel.core import Sound
from gateway.panel.side import AlarmSide
from gateway.realtime import raise_priority, release_startup_heap
from gateway.uplink.mqtt import Uplink
from tests.support.broker import MosquittoBroker, free_port

TRIAL_BUS, FIELD_BUS = "trial", "field"
SERIAL_DEVICE = f"gas-{TRIAL_BUS}-1"
DECODE_DEVICE = f"gas-{FIELD_BUS}-1"
GPIO_DEVICE, GPIO_PIN = "relay-gpio", 5
STORM_ADDRESSES = list(range(2, 18))  # 16 detectors whose readings make the telemetry stream
ALARM = GasReading(value=30.0, measure="%LEL", status=frozenset({"normal"}))
CLEAN = GasReading(value=0.0, measure="%LEL", status=frozenset({"normal"}))
OUT = ROOT / "benchmarks" / "out"
#: How long the benchmark waits for an answer from the loop side (its start waits for the alarm process).
LOOP_SIDE_TIMEOUT_S = 90.0


# ----------------------------------------------------------------------------------------------- stress


@dataclasses.dataclass
class StressStats:
    loop_blocks: int = 0
    loop_blocked_s: float = 0.0
    db_locks: int = 0
    db_locked_s: float = 0.0
    storm_readings: int = 0
    storm_s: float = 0.0
    events_stored: int = 0
    refused_attempts: str | None = None
    blackhole_error: str | None = None


def _black_hole(broker: MosquittoBroker) -> socket.socket:
    """Stop the broker; listen on its port without ever accepting, so that connects go unanswered."""
    broker.stop()
    hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind((broker.host, broker.port))
    hole.listen(0)
    return hole


def _telemetry_storm(panel: AlarmPanel, rate: int, stop: threading.Event, stats: StressStats) -> None:
    """``rate`` detector readings per second that each make a telemetry event (values flip by 2 %LEL)."""
    devices = [f"gas-{FIELD_BUS}-{a}" for a in STORM_ADDRESSES]
    readings = [dataclasses.replace(CLEAN, value=v) for v in (1.0, 3.0)]
    period = 0.01
    per_tick = max(1, round(rate * period))
    n = 0
    start = next_tick = time.perf_counter()
    while not stop.is_set():
        for _ in range(per_tick):
            panel.reading(devices[n % len(devices)], readings[(n // len(devices)) % 2])
            n += 1
        next_tick += period
        delay = next_tick - time.perf_counter()
        if delay > 0:
            stop.wait(delay)
    stats.storm_readings = n
    stats.storm_s = time.perf_counter() - start


def _stress_summary(st: StressStats, seconds: float) -> dict[str, Any]:
    """The "stress" object of the JSON line; ``seconds`` is how long the stressed trials took."""
    return {
        "loop_blocks": st.loop_blocks, "loop_blocked_pct": round(100 * st.loop_blocked_s / seconds, 1),
        "db_locks": st.db_locks, "db_locked_pct": round(100 * st.db_locked_s / seconds, 1),
        "telemetry_per_s": round(st.storm_readings / st.storm_s) if st.storm_s else 0,
        "events_stored": st.events_stored,
        "gateway_uplink": st.blackhole_error, "refused_uplink": st.refused_attempts,
    }


class Stress:
    """Everything that must not slow the alarm path, switched on together.

    In the loop side's process of ``--alarm-process on``: no ``broker`` (the benchmark process black-holes
    it) and no ``storm`` (telemetry enters the panel in the alarm process).
    """

    def __init__(self, gateway: Gateway, broker: MosquittoBroker | None, db_path: Path, rate: int, block: str,
                 *, storm: bool = True) -> None:
        self.gateway = gateway
        self.block = block
        self.broker = broker
        self.db_path = db_path
        self.rate = rate
        self.storm = storm
        self.stats = StressStats()
        self._stop = threading.Event()
        self._loop_stop = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._blackhole: socket.socket | None = None
        self._refused: Uplink | None = None
        self._stored_before = 0

    async def start(self) -> None:
        gw = self.gateway
        self._stored_before = gw.outbox.stored_total
        # Broker unreachable: the gateway's broker port now accepts nothing, and a second uplink is refused.
        if self.broker is not None:
            self._blackhole = _black_hole(self.broker)
        refused_cfg = dataclasses.replace(gw.cfg.mqtt, port=free_port(), client_id="bench-refused")
        self._refused = Uplink(refused_cfg, gw.outbox, gw.topics)
        self._tasks = [asyncio.create_task(self._refused.run(), name="refused-uplink"),
                       asyncio.create_task(self._block_loop(), name="loop-blocker")]
        self._threads = [threading.Thread(target=self._lock_db, name="db-locker", daemon=True)]
        if self.storm:
            self._threads.append(threading.Thread(target=self._storm, name="telemetry-storm", daemon=True))
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        self._stop.set()
        self._loop_stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 15)
        assert self._refused is not None
        self.stats.refused_attempts = self._refused.last_error
        self.stats.blackhole_error = self.gateway.uplink.last_error
        await self._refused.stop(flush_timeout_s=0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._blackhole is not None:
            self._blackhole.close()
        self.stats.events_stored = self.gateway.outbox.stored_total - self._stored_before

    async def _block_loop(self) -> None:
        """Block the loop for 2 s at random moments: pure-Python work holding the GIL ("cpu"), or a
        blocking call that releases it ("sleep", like a synchronous file or database call)."""
        while not self._loop_stop.is_set():
            await asyncio.sleep(random.uniform(0.5, 2.0))
            if self._loop_stop.is_set():
                return
            start = time.perf_counter()
            end = start + 2.0
            if self.block == "sleep":
                time.sleep(2.0)
            while time.perf_counter() < end:
                pass
            self.stats.loop_blocks += 1
            self.stats.loop_blocked_s += time.perf_counter() - start

    def _lock_db(self) -> None:
        """Another connection holds the database exclusively for 1–6 s at random moments."""
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            while not self._stop.wait(random.uniform(0.5, 2.0)):
                con.execute("BEGIN EXCLUSIVE")
                start = time.perf_counter()
                self._stop.wait(random.uniform(1.0, 6.0))
                con.execute("COMMIT")
                self.stats.db_locks += 1
                self.stats.db_locked_s += time.perf_counter() - start
        finally:
            con.close()

    def _storm(self) -> None:
        # In one process the gateway's panel is the real one.
        _telemetry_storm(cast(AlarmPanel, self.gateway.panel), self.rate, self._stop, self.stats)


# ----------------------------------------------------------------------------------------------- trials


class Trials:
    """The three paths and the bare Modbus transaction, measured from a driver thread.

    The driver thread stands for the threads that carry evidence in the daemon — a bus thread (decode
    path) and lgpio's callback thread (GPIO path) — so it runs at their priority: ``realtime_priority``,
    as the daemon raises them (the callback thread on its first edge, :mod:`gateway.panel.side`).
    """

    def __init__(self, gateway: Gateway | AlarmSide, sim: SimBuses, watch: EdgeWatch, contact_pin: Any,
                 priority: int = 0) -> None:
        self.gw = gateway
        self.sim = sim
        self.watch = watch
        self.contact_pin = contact_pin
        self.priority = priority
        self.anomalies: list[str] = []
        self.wake_lag: list[float] = []

    def _as_alarm_thread(self) -> None:
        raise_priority(self.priority, "trial-driver")

    def _pause(self, lo: float = 0.002, hi: float = 0.02) -> None:
        """Sleep a random while (the GIL released); record how late the thread gets going again."""
        target = time.perf_counter() + random.uniform(lo, hi)
        time.sleep(max(0.0, target - time.perf_counter()))
        self.wake_lag.append(time.perf_counter() - target)

    def _check_sound(self, path: str) -> None:
        sound = self.gw.annunciator.current.sound
        if sound is not Sound.GAS:
            self.anomalies.append(f"{path}: sounder showed {sound.name} instead of GAS")

    def _reset(self, device: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            result = self.gw.panel.reset(device, "bench")
            if device in result.reset or device not in result.still_active:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{device} stayed in alarm")
            time.sleep(0.002)
        self.watch.wait_state(False)

    def serial(self, n: int) -> list[float]:
        """The detector hands the response frame carrying the alarm value to its port → buzzer high.

        Timed from pymodbus's server handing the frame over (before the bytes reach the pty), so the
        gateway cannot have seen them earlier; the null modem's hop is part of the wire, as it is in the
        bare transaction time this is compared with.
        """
        self._as_alarm_thread()
        out: list[float] = []
        for _ in range(n):
            self._pause(0.0, 0.02)
            armed_at = time.perf_counter()
            token = self.sim.set(TRIAL_BUS, 1, ALARM.value, arm=True)
            assert token is not None
            rise = self.watch.first_rise_after(armed_at)  # only then ask the simulator when it answered
            frame = self.sim.report(token)
            if not frame.response <= rise:
                self.anomalies.append(f"serial: buzzer high {1000 * (frame.response - rise):.3f} ms before the frame")
            out.append(rise - frame.response)
            self._check_sound("serial")
            token = self.sim.set(TRIAL_BUS, 1, CLEAN.value, arm=True)
            assert token is not None
            self.sim.report(token)
            self._reset(SERIAL_DEVICE)
        return out

    def decode(self, n: int) -> list[float]:
        """A decoded reading enters the panel → buzzer high."""
        self._as_alarm_thread()
        panel = self.gw.panel
        out = []
        for _ in range(n):
            self._pause()
            t0 = time.perf_counter()
            panel.reading(DECODE_DEVICE, ALARM)
            out.append(self.watch.first_rise_after(t0) - t0)
            self._check_sound("decode")
            panel.reading(DECODE_DEVICE, CLEAN)
            self._reset(DECODE_DEVICE)
        return out

    def gpio(self, n: int) -> list[float]:
        """``drive_low()`` closes the gas relay's contact (pull-up input) → buzzer high."""
        self._as_alarm_thread()
        pin = self.contact_pin
        out = []
        for _ in range(n):
            self._pause()
            t0 = time.perf_counter()
            pin.drive_low()
            out.append(self.watch.first_rise_after(t0) - t0)
            self._check_sound("gpio")
            pin.drive_high()
            self._reset(GPIO_DEVICE)
        return out

    def transactions(self, n: int) -> list[float]:
        """One bare read of the detector's ten registers by the bus thread's own pymodbus client."""
        self._as_alarm_thread()
        poller = self.gw.buses[TRIAL_BUS]

        def read(client: Any) -> float:
            t0 = time.perf_counter()
            response = client.read_holding_registers(0, count=10, device_id=1)
            elapsed = time.perf_counter() - t0
            if response.isError():
                raise RuntimeError(str(response))
            return elapsed

        out = []
        for _ in range(n):
            out.append(poller.submit(read).result(timeout=10))
        return out


# ----------------------------------------------------------------------------------------------- GC


class GcPauses:
    """Duration of every garbage collection, from gc.callbacks."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (end perf_counter, generation, seconds)
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            end = time.perf_counter()
            self.pauses.append((end, int(info["generation"]), end - self._start))

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        inside = [(g, d) for end, g, d in self.pauses if t0 <= end <= t1]
        return {"collections": len(inside), "gen2": sum(1 for g, _ in inside if g == 2),
                "max_ms": round(max((d for _, d in inside), default=0.0) * 1000, 3)}


# ----------------------------------------------------------------------------------------------- run


def _quiet(snap: dict[str, Any], watch: EdgeWatch) -> bool:
    """Every detector normal, nothing active, the buzzer low."""
    states = {d["state"] for d in snap["devices"] if d["kind"] == "gas_detector"}
    return states == {"normal"} and not snap["active"] and not watch.state


async def _settle(gateway: Gateway, watch: EdgeWatch, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = gateway.panel.snapshot()
        if gateway.uplink.connected and _quiet(snap, watch):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"gateway did not settle: {gateway.panel.snapshot()['active']}")


def _config(text: str, args: argparse.Namespace) -> SiteConfig:
    """The site of ``text`` with this run's GIL hand-off, and the trial bus polled back to back."""
    cfg = parse_config(tomllib.loads(text))
    # The trial bus polls its one detector back to back (20 ms apart) so 1000 trials fit in a minute.
    return dataclasses.replace(cfg, buses=tuple(
        dataclasses.replace(b, poll_interval_s=0.02) if b.id == TRIAL_BUS else b for b in cfg.buses))


def _phase(gc_pauses: GcPauses, t0: float, t1: float) -> dict[str, Any]:
    return {"seconds": round(t1 - t0, 1), "gc": {
        **gc_pauses.between(t0, t1), "tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}}


def _start_peers(workdir: Path) -> tuple[SimBuses, MosquittoBroker]:
    """The simulated detectors (a child process) and a private broker, both running."""
    sim = SimBuses(workdir / "sim", {TRIAL_BUS: [1], FIELD_BUS: [1, *STORM_ADDRESSES]})
    sim.start()
    broker = MosquittoBroker(workdir / "broker")
    try:
        broker.start()
    except BaseException:
        sim.stop()
        raise
    return sim, broker


def _site(sim: SimBuses, broker: MosquittoBroker, db_path: Path, args: argparse.Namespace, *,
          alarm_process: bool) -> tuple[str, SiteConfig]:
    """The benchmark's site (its TOML, and parsed): the trial detector, the storm's field bus, a gas relay."""
    ports = sim.ports
    text = site_toml(buses={TRIAL_BUS: (ports[TRIAL_BUS], [1]), FIELD_BUS: (ports[FIELD_BUS], [1, *STORM_ADDRESSES])},
                     mqtt_port=broker.port, db_path=db_path, contacts=[(GPIO_DEVICE, GPIO_PIN)],
                     realtime_priority=args.realtime_priority, alarm_process=alarm_process)
    return text, _config(text, args)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    workdir = Path(tempfile.mkdtemp(prefix="bench-buzzer-"))
    logfile = log_to_file(workdir / "gateway.log")
    Device.pin_factory = MockFactory(pin_class=TimedMockPin)
    sim, broker = _start_peers(workdir)
    db_path = workdir / "events.db"
    _, cfg = _site(sim, broker, db_path, args, alarm_process=False)
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    gateway = Gateway(cfg)
    await gateway.start()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    factory = Device.pin_factory
    watch = EdgeWatch()
    factory.pin(cfg.outputs.buzzer.pin).watch = watch
    trials = Trials(gateway, sim, watch, factory.pin(f"GPIO{GPIO_PIN}"), cfg.runtime.realtime_priority)
    results: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    try:
        await _settle(gateway, watch)
        for condition in ("idle", "stress"):
            stress = None
            if condition == "stress":
                stress = Stress(gateway, broker, db_path, args.telemetry_rate, args.loop_block)
                await stress.start()
                await asyncio.sleep(2.0)
            t0 = time.perf_counter()
            trials.wake_lag = []
            n = args.trials
            results[f"serial_{condition}"] = await asyncio.to_thread(trials.serial, n)
            results[f"decode_{condition}"] = await asyncio.to_thread(trials.decode, n)
            results[f"gpio_{condition}"] = await asyncio.to_thread(trials.gpio, n)
            results[f"txn_{condition}"] = await asyncio.to_thread(trials.transactions, max(200, n // 3))
            results[f"wake_{condition}"] = list(trials.wake_lag)
            t1 = time.perf_counter()
            phase = _phase(gc_pauses, t0, t1)
            if stress is not None:
                await stress.stop()
                phase["stress"] = _stress_summary(stress.stats, t1 - t0)
            phases[condition] = phase
    finally:
        gc.callbacks.remove(gc_pauses)
        with contextlib.suppress(Exception):
            await gateway.stop(flush_timeout_s=0.5)
        sim.stop()
        broker.stop()
        logfile.close()
    return {"samples": results, "phases": phases, "anomalies": trials.anomalies, "workdir": str(workdir),
            "simulator_scheduling": sim.scheduling}


# ----------------------------------------------------------------------------------------------- alarm process


class LoopSide:
    """The child running the daemon's loop side, driven over JSON lines: one request, one answer."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid: int | None = pid
        self.status: int | None = None
        sock.settimeout(LOOP_SIDE_TIMEOUT_S)
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._reap_lock = threading.Lock()

    def send(self, op: str, **fields: Any) -> None:
        self._file.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        self._file.flush()

    def answer(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("the loop side closed its control socket")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"loop side: {reply['error']}")
        return reply

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.answer()

    def stop(self, timeout: float = 30.0) -> None:
        """Have the loop side stop its gateway (which stops the alarm host's serve()) and exit; reap it."""
        if self.pid is None:
            return
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            self.call("stop")
        self.reap(timeout)

    def close(self, timeout: float = 15.0) -> None:
        """Close the control socket (a loop side still running stops at that) and reap the child."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self.reap(timeout)

    def reap(self, timeout: float) -> None:
        """Wait for the child to exit; SIGKILL it after ``timeout``."""
        with self._reap_lock:
            if self.pid is None:
                return
            deadline = time.monotonic() + timeout
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            while pid == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                print(f"loop side (pid {self.pid}) did not exit; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
            self.pid = None
            with contextlib.suppress(OSError):
                self._file.close()
                self._sock.close()


def _loop_side_main(args: argparse.Namespace, link: socket.socket, control: socket.socket) -> NoReturn:
    """The forked child: the daemon's loop side until the benchmark says stop (or either socket closes)."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the benchmark process stops this one
        code = asyncio.run(_loop_side(args, link, control))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


async def _loop_side(args: argparse.Namespace, link: socket.socket, control: socket.socket) -> int:
    """Start a Gateway on the alarm link from the site sent by the benchmark; answer its requests."""
    reader, writer = await asyncio.open_connection(sock=control)

    async def answer(reply: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):  # the benchmark is gone: it reaps this process anyway
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()

    line = await reader.readline()
    if not line:
        return 1
    cfg = _config(json.loads(line)["toml"], args)
    gateway = Gateway(cfg, alarm_process=(None, link))
    try:
        await gateway.start()
    except AlarmLinkError as exc:
        await answer({"error": f"the gateway did not start: {exc}"})
        return 1
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    await answer({"pid": os.getpid()})
    stress: Stress | None = None
    lost = asyncio.create_task(gateway.failed.wait())
    code = 1
    try:
        while True:
            request = asyncio.create_task(reader.readline())
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done():  # the alarm process is gone
                request.cancel()
                break
            line = request.result()
            if not line:  # the benchmark is gone
                break
            message = json.loads(line)
            op = message["op"]
            if op == "stop":
                code = 0
                break
            try:
                if op == "settled?":
                    reply: dict[str, Any] = {"connected": gateway.uplink.connected}
                elif op == "stress" and message["on"]:
                    stress = Stress(gateway, None, Path(cfg.storage.path), args.telemetry_rate, args.loop_block,
                                    storm=False)
                    await stress.start()
                    reply = {}
                elif op == "stress" and stress is not None:
                    await stress.stop()
                    reply = dataclasses.asdict(stress.stats)
                    stress = None
                else:
                    reply = {"error": f"unexpected request {message}"}
            except Exception as exc:
                reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
            await answer(reply)
    finally:
        lost.cancel()
        if stress is not None:
            with contextlib.suppress(Exception):
                await stress.stop()
        with contextlib.suppress(Exception):
            await gateway.stop(flush_timeout_s=0.5)
    if code == 0:
        await answer({"stopped": True})
    writer.close()
    return code


def _settle_split(panel: AlarmPanel, loop_side: LoopSide, watch: EdgeWatch, timeout: float = 30.0) -> None:
    """As :func:`_settle`, from the alarm process: the local panel, and the loop side's uplink connected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _quiet(panel.snapshot(), watch) and loop_side.call("settled?")["connected"]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"gateway did not settle: {panel.snapshot()['active']}")


def _measure_split(args: argparse.Namespace, trials: Trials, panel: AlarmPanel, loop_side: LoopSide,
                   broker: MosquittoBroker, watch: EdgeWatch, gc_pauses: GcPauses) -> dict[str, Any]:
    """The trial driver thread of ``--alarm-process on``: idle, then stressed; stops the loop side after."""
    results: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    storm_stop = threading.Event()
    hole: socket.socket | None = None
    try:
        _settle_split(panel, loop_side, watch)
        for condition in ("idle", "stress"):
            storm: threading.Thread | None = None
            storm_stats = StressStats()
            if condition == "stress":  # in Stress.start's order: black hole, loop side's part, storm
                hole = _black_hole(broker)
                loop_side.call("stress", on=True)
                storm = threading.Thread(target=_telemetry_storm, name="telemetry-storm", daemon=True,
                                         args=(panel, args.telemetry_rate, storm_stop, storm_stats))
                storm.start()
                time.sleep(2.0)
            t0 = time.perf_counter()
            trials.wake_lag = []
            n = args.trials
            results[f"serial_{condition}"] = trials.serial(n)
            results[f"decode_{condition}"] = trials.decode(n)
            results[f"gpio_{condition}"] = trials.gpio(n)
            results[f"txn_{condition}"] = trials.transactions(max(200, n // 3))
            results[f"wake_{condition}"] = list(trials.wake_lag)
            t1 = time.perf_counter()
            phase = _phase(gc_pauses, t0, t1)
            if storm is not None:
                storm_stop.set()
                storm.join(15)
                st = StressStats(**loop_side.call("stress", on=False))
                st.storm_readings, st.storm_s = storm_stats.storm_readings, storm_stats.storm_s
                phase["stress"] = _stress_summary(st, t1 - t0)
            phases[condition] = phase
    finally:
        storm_stop.set()
        loop_side.stop()
        if hole is not None:
            hole.close()
    return {"samples": results, "phases": phases}


def run_split(args: argparse.Namespace) -> dict[str, Any]:
    """``--alarm-process on``: this process is the alarm process; a forked child runs the loop side."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    workdir = Path(tempfile.mkdtemp(prefix="bench-buzzer-"))
    logfile = log_to_file(workdir / "gateway.log")
    link, link_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if threading.active_count() != 1:
        raise RuntimeError("the loop side must be forked before any thread starts")
    gc.collect()
    gc.freeze()  # as fork_alarm_process does
    pid = os.fork()
    if pid == 0:
        link.close()
        control.close()
        _loop_side_main(args, link_child, control_child)
    link_child.close()
    control_child.close()
    loop_side = LoopSide(pid, control)
    sim: SimBuses | None = None
    broker: MosquittoBroker | None = None
    host: AlarmHost | None = None
    trials: Trials | None = None
    gc_pauses = GcPauses()
    outcome: dict[str, Any] = {}
    try:
        Device.pin_factory = MockFactory(pin_class=TimedMockPin)
        sim, broker = _start_peers(workdir)
        db_path = workdir / "events.db"
        text, cfg = _site(sim, broker, db_path, args, alarm_process=True)
        gc.callbacks.append(gc_pauses)
        loop_side.send("start", toml=text)  # its Gateway opens the outbox, then waits for the host's "ready"
        # As gateway.alarm_link.run_alarm_process does.
        prepare_alarm_process(cfg)
        host = AlarmHost(cfg, link)
        host.start()
        if cfg.runtime.gc_freeze:
            gc.collect()
            gc.freeze()
            release_startup_heap()
        loop_side.answer()
        if args.switch_interval_ms:
            sys.setswitchinterval(args.switch_interval_ms / 1000)
        factory = Device.pin_factory
        watch = EdgeWatch()
        factory.pin(cfg.outputs.buzzer.pin).watch = watch
        trials = Trials(host.side, sim, watch, factory.pin(f"GPIO{GPIO_PIN}"), cfg.runtime.realtime_priority)

        def drive() -> None:
            assert trials is not None and host is not None and broker is not None
            try:
                outcome.update(_measure_split(args, trials, host.side.panel, loop_side, broker, watch, gc_pauses))
            except BaseException as exc:
                outcome["error"] = exc

        driver = threading.Thread(target=drive, name="trial-driver", daemon=True)
        driver.start()
        host.serve()  # in the main thread, as in the alarm process; returns when the loop side's gateway stops
        driver.join(LOOP_SIDE_TIMEOUT_S)
        if driver.is_alive():
            raise RuntimeError("the trial driver did not finish after the alarm link closed")
        if "error" in outcome:
            raise outcome["error"]
    finally:
        if gc_pauses in gc.callbacks:
            gc.callbacks.remove(gc_pauses)
        if host is not None:
            host.close()
        link.close()  # if the host never took it: the loop side's link then closes
        loop_side.close()
        if sim is not None:
            sim.stop()
        if broker is not None:
            broker.stop()
        logfile.close()
    if loop_side.status:
        print(f"loop side exited with status {loop_side.status}", file=sys.stderr)
    assert trials is not None and sim is not None
    return {**outcome, "anomalies": trials.anomalies, "workdir": str(workdir),
            "simulator_scheduling": sim.scheduling}


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 3)


def report(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    s = data["samples"]
    txn_idle = _ms(s["txn_idle"], 50)
    line: dict[str, Any] = {
        "serial_idle_p50_ms": _ms(s["serial_idle"], 50),
        "serial_idle_p99_ms": _ms(s["serial_idle"], 99),
        "serial_stress_p99_ms": _ms(s["serial_stress"], 99),
        "serial_stress_max_ms": _ms(s["serial_stress"], 100),
        "decode_idle_p99_ms": _ms(s["decode_idle"], 99),
        "decode_stress_p99_ms": _ms(s["decode_stress"], 99),
        "gpio_idle_p99_ms": _ms(s["gpio_idle"], 99),
        "gpio_stress_p99_ms": _ms(s["gpio_stress"], 99),
        "gpio_stress_max_ms": _ms(s["gpio_stress"], 100),
    }
    worst = max(("serial", "decode", "gpio"), key=lambda p: percentile(s[f"{p}_stress"], 99))
    ratios = {p: round(percentile(s[f"{p}_stress"], 99) / percentile(s[f"{p}_idle"], 99), 3)
              for p in ("serial", "decode", "gpio")}
    line["stress_ratio_p99"] = ratios[worst]
    line.update({
        "stress_ratio_path": worst,
        "stress_ratio_serial": ratios["serial"], "stress_ratio_decode": ratios["decode"],
        "stress_ratio_gpio": ratios["gpio"],
        "modbus_transaction_idle_p50_ms": txn_idle,
        "modbus_transaction_idle_p99_ms": _ms(s["txn_idle"], 99),
        "modbus_transaction_stress_p50_ms": _ms(s["txn_stress"], 50),
        "decode_stress_max_ms": _ms(s["decode_stress"], 100),
        "wake_lag_idle_p99_ms": _ms(s["wake_idle"], 99),
        "wake_lag_stress_p99_ms": _ms(s["wake_stress"], 99),
        "trials": args.trials,
        "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
        "realtime_priority": args.realtime_priority,
        "loop_block": args.loop_block,
        "alarm_process": args.alarm_process,
        "gc_idle": data["phases"]["idle"]["gc"], "gc_stress": data["phases"]["stress"]["gc"],
        "stress": data["phases"]["stress"].get("stress"),
        "simulator_scheduling": data["simulator_scheduling"],
        "anomalies": len(data["anomalies"]),
    })
    return line


def targets(line: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    txn = line["modbus_transaction_idle_p50_ms"]
    checks = [
        ("decode_idle_p99_ms", line["decode_idle_p99_ms"], "≤ 2", line["decode_idle_p99_ms"] <= 2),
        ("decode_stress_p99_ms", line["decode_stress_p99_ms"], "≤ 2", line["decode_stress_p99_ms"] <= 2),
        ("gpio_idle_p99_ms", line["gpio_idle_p99_ms"], "≤ 2", line["gpio_idle_p99_ms"] <= 2),
        ("gpio_stress_p99_ms", line["gpio_stress_p99_ms"], "≤ 2", line["gpio_stress_p99_ms"] <= 2),
        ("gpio_stress_max_ms", line["gpio_stress_max_ms"], "≤ 10", line["gpio_stress_max_ms"] <= 10),
        ("stress_ratio_p99", line["stress_ratio_p99"], "≤ 1.3", line["stress_ratio_p99"] <= 1.3),
        ("serial_idle_p99_ms", line["serial_idle_p99_ms"], f"≤ {txn:.3f} + 2",
         line["serial_idle_p99_ms"] <= txn + 2),
        ("serial_stress_p99_ms", line["serial_stress_p99_ms"], f"≤ {txn:.3f} + 2",
         line["serial_stress_p99_ms"] <= txn + 2),
    ]
    return checks


def histogram(samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, name, title in zip(axes, ("serial", "decode", "gpio"),
                               ("serial: detector response → buzzer", "decode: reading → buzzer",
                                "GPIO: contact edge → buzzer"), strict=True):
        idle = np.array(samples[f"{name}_idle"]) * 1000
        stress = np.array(samples[f"{name}_stress"]) * 1000
        lo = max(1e-3, min(idle.min(), stress.min()))
        bins = np.logspace(np.log10(lo), np.log10(max(idle.max(), stress.max()) * 1.05), 60)
        ax.hist(idle, bins=bins, alpha=0.6, label=f"idle (p99 {np.percentile(idle, 99):.2f} ms)")
        ax.hist(stress, bins=bins, alpha=0.6, label=f"stress (p99 {np.percentile(stress, 99):.2f} ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency to buzzer pin high (ms)")
        ax.set_ylabel("trials")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials per path and condition")
    parser.add_argument("--realtime-priority", type=int, default=50,
                        help="runtime.realtime_priority of the gateway (50 as deployed; 0 = normal scheduling)")
    parser.add_argument("--switch-interval-ms", type=float, default=0.0,
                        help="override sys.setswitchinterval for this run (0 = leave the gateway's setting)")
    parser.add_argument("--gil-handoff", choices=("on", "off"), default="off",
                        help="runtime.gil_handoff of the gateway (off by default)")
    parser.add_argument("--loop-block", choices=("cpu", "sleep"), default="cpu",
                        help="how the stressed loop is blocked: Python work holding the GIL, or a blocking call")
    parser.add_argument("--telemetry-rate", type=int, default=1000, help="telemetry events/s under stress")
    parser.add_argument("--alarm-process", choices=("on", "off"), default="on",
                        help="runtime.alarm_process: the alarm path in this process, the loop side in a child")
    parser.add_argument("--png", type=Path, default=OUT / "buzzer_latency.png")
    args = parser.parse_args(argv)
    noise = machine_noise(args.realtime_priority)
    steal0 = cpu_steal()
    data = asyncio.run(run(args)) if args.alarm_process == "off" else run_split(args)
    steal1 = cpu_steal()
    line = report(data, args)
    line["machine"] = {**noise, "steal_pct": round(100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]), 2)}
    histogram(data["samples"], args.png)
    for name, value, target, ok in targets(line):
        print(f"{name:<24} {value:>9.3f}  target {target:<16} {'met' if ok else 'MISSED'}")
    for anomaly in data["anomalies"][:10]:
        print("anomaly:", anomaly)
    print(f"histogram: {args.png}  logs: {data['workdir']}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
