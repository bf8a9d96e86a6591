"""Polling cost and footprint: bare pymodbus vs the gateway on one simulated bus, then gatewayd with 64 detectors.

One run, one simulated RS-485 bus of 64 profile-A gas detectors (pymodbus's server on a pseudo-terminal, in
a child process — :mod:`simbus`):

1. ms per poll: a bare pymodbus ``ModbusSerialClient`` loop reading the detectors' ten registers, then the
   gateway (a :class:`gateway.daemon.Gateway` in this process) polling the same detectors back to back;
   ``ratio`` = gateway ÷ bare. For reference also the bare loop with the gateway's own client class.
2. ``gatewayd`` as a real subprocess (``GPIOZERO_PIN_FACTORY=mock``) polling the 64 detectors at 1 Hz with a
   private mosquitto up: after warm-up, its RSS (psutil) and CPU time over 60 s, in % of one core.
3. Still in that subprocess: ≥ 100 alarm readings (each detector rises to a low, then a high alarm), each
   timed from the simulated detector handing over the poll response that carries it to the gateway's
   PUBACK for its event (the daemon's own "event forwarded" log line), and to a subscriber's receipt.

With ``--alarm-process on`` (``runtime.alarm_process``) phases 2–3 run gatewayd with its alarm path in a
child process, and memory and CPU count the whole daemon: gatewayd and its children. Phase 1 stays in-process
(it compares polling code). ``rss_mb`` is then summed over the processes (pages they share counted twice);
``pss_mb`` splits each shared page between the processes mapping it; ``rss_once_mb`` counts each resident
page of the daemon once (``/proc/<pid>/pagemap``, needs CAP_SYS_ADMIN) and compares with a single process's RSS.

Prints one JSON line last. ``.venv/bin/python benchmarks/polling.py [--seconds 60] [--devices 64]
[--alarm-process on]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from common import log_to_file, mappings, percentile, resident_frames, site_toml
from simbus import SimBuses

from gateway.config import parse_config
from gateway.daemon import Gateway
from tests.support.broker import MosquittoBroker
from tests.support.mqtt import MqttRecorder

BUS = "rs485-1"
LOW, HIGH = 15.0, 30.0  # %LEL: above the default low (10) and high (25) thresholds


def _bare_ms_per_poll(port: str, addresses: list[int], cycles: int, client_class: Any) -> float:
    from pymodbus import FramerType

    client = client_class(port=port, framer=FramerType.RTU, baudrate=9600, timeout=0.3, retries=0)
    if not client.connect():
        raise RuntimeError(f"cannot open {port}")
    try:
        start = time.perf_counter()
        for _ in range(cycles):
            for address in addresses:
                response = client.read_holding_registers(0, count=10, device_id=address)
                if response.isError():
                    raise RuntimeError(f"detector {address}: {response}")
        return (time.perf_counter() - start) * 1000 / (cycles * len(addresses))
    finally:
        client.close()


async def _gateway_ms_per_poll(cfg: Any, polls: int) -> float:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    Device.pin_factory = MockFactory()
    cfg = dataclasses.replace(cfg, buses=tuple(dataclasses.replace(b, poll_interval_s=0.0) for b in cfg.buses))
    gateway = Gateway(cfg)
    await gateway.start()
    try:
        poller = gateway.buses[BUS]
        while poller.polls < len(poller.devices):  # first cycle: the port opens, devices become known
            await asyncio.sleep(0.05)
        first, start = poller.polls, time.perf_counter()
        while poller.polls - first < polls:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
        if poller.errors:
            raise RuntimeError(f"{poller.errors} failed polls")
        return elapsed * 1000 / (poller.polls - first)
    finally:
        await gateway.stop(flush_timeout_s=0.5)


class DaemonLog:
    """Reads gatewayd's JSON log lines as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        new = []
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                try:
                    new.append(json.loads(line))
                except ValueError:
                    continue
        self.entries.extend(new)
        return new

    def wait(self, predicate: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for entry in self.entries:
            if predicate(entry):
                return entry
        while time.monotonic() < deadline:
            for entry in self.poll():
                if predicate(entry):
                    return entry
            time.sleep(0.01)
        raise TimeoutError("gatewayd did not log what was expected")


def _wall(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def _rss_once_mb(pids: list[int]) -> float | None:
    """Resident pages of the processes, each physical page counted once; None without the frame numbers
    (they read as 0 without CAP_SYS_ADMIN)."""
    frames: set[int] = set()
    for pid in pids:
        frames.update(resident_frames(pid, mappings(pid)).values())
    frames.discard(0)
    return round(len(frames) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1) if frames else None


def _footprint(procs: list[psutil.Process], roles: dict[int, str], cpu0: dict[int, float],
               elapsed: float) -> dict[str, Any]:
    """Memory and CPU of each process of the daemon (the alarm process's role is ``alarm``), and their sums."""
    rows = []
    for p in procs:
        full, cpu = p.memory_full_info(), p.cpu_times()
        rows.append({"pid": p.pid, "role": roles.get(p.pid, "child"), "rss_mb": full.rss / 2**20,
                     "pss_mb": getattr(full, "pss", 0) / 2**20, "uss_mb": full.uss / 2**20,
                     "cpu_pct": 100 * (cpu.user + cpu.system - cpu0[p.pid]) / elapsed, "threads": p.num_threads()})
    total = {key: sum(row[key] for row in rows) for key in ("rss_mb", "uss_mb", "pss_mb", "cpu_pct", "threads")}
    rounded = [{k: round(v, 2 if k == "cpu_pct" else 1) if isinstance(v, float) else v for k, v in row.items()}
               for row in rows]
    return {**total, "processes": rounded}


def _stop(proc: subprocess.Popen[bytes], ps: psutil.Process) -> list[int]:
    """SIGTERM gatewayd (it stops its alarm process over the link); kill any child left running: their pids."""
    try:
        children = ps.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    killed = []
    for child in children:
        try:
            child.wait(5)
        except psutil.TimeoutExpired:
            if child.status() != psutil.STATUS_ZOMBIE:
                print(f"gatewayd left pid {child.pid} running; killing it", file=sys.stderr)
                killed.append(child.pid)
                child.kill()
                child.wait(5)
        except psutil.NoSuchProcess:
            pass
    return killed


def _daemon_run(args: argparse.Namespace, sim: SimBuses, port: str, addresses: list[int], workdir: Path,
                broker: MosquittoBroker) -> dict[str, Any]:
    text = site_toml(buses={BUS: (port, addresses)}, mqtt_port=broker.port, db_path=workdir / "daemon.db",
                     realtime_priority=args.realtime_priority, bus_timeout_s=0.3,
                     gil_handoff=args.gil_handoff == "on", alarm_process=args.alarm_process == "on")
    config = workdir / "site.toml"
    config.write_text(text, encoding="utf-8")
    log_path = workdir / "gatewayd.log"
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock", "PYTHONUNBUFFERED": "1",
           **dict(item.split("=", 1) for item in args.daemon_env)}
    gatewayd = Path(sys.executable).with_name("gatewayd")
    cmd = [str(gatewayd)] if gatewayd.exists() else [sys.executable, "-m", "gateway.daemon"]
    if args.daemon_cmd:
        cmd = args.daemon_cmd.split()
    recorder = MqttRecorder(broker.host, broker.port, "safety/+/+/event/alarm")
    with log_path.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    log = DaemonLog(log_path)
    ps = psutil.Process(proc.pid)
    result: dict[str, Any] = {}
    killed: list[int] = []
    try:
        log.wait(lambda e: e.get("event") == "uplink connected", 60)
        procs, roles = [ps], {ps.pid: "daemon"}
        if args.alarm_process == "on":
            alarm_pid = log.wait(lambda e: e.get("event") == "alarm process started", 60)["pid"]
            procs += ps.children(recursive=True)
            if alarm_pid not in {p.pid for p in procs}:
                raise RuntimeError(f"alarm process {alarm_pid} is not a child of gatewayd {ps.pid}")
            roles[alarm_pid] = "alarm"
        seen: set[str] = set()

        def all_read(entry: dict[str, Any]) -> bool:
            if entry.get("event") == "reading":
                seen.add(entry["device"])
            return len(seen) == len(addresses)

        log.wait(all_read, 60)
        time.sleep(args.settle)
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        t0 = time.perf_counter()
        rss_samples = []
        while time.perf_counter() - t0 < args.seconds:
            time.sleep(1.0)
            rss_samples.append(sum(p.memory_info().rss for p in procs))
            if proc.poll() is not None:
                raise RuntimeError("gatewayd exited")
        footprint = _footprint(procs, roles, cpu0, time.perf_counter() - t0)
        idle = {
            "rss_mb": round(footprint["rss_mb"], 1),
            "rss_max_mb": round(max(rss_samples) / 2**20, 1),
            "uss_mb": round(footprint["uss_mb"], 1),
            "pss_mb": round(footprint["pss_mb"], 1),
            "cpu_pct": round(footprint["cpu_pct"], 2),
            "threads": footprint["threads"],
        }
        if args.alarm_process == "on":
            idle["rss_once_mb"] = _rss_once_mb([p.pid for p in procs])
            idle["processes"] = footprint["processes"]

        to_puback: list[float] = []
        to_subscriber: list[float] = []
        for value, action in ((LOW, "raised"), (HIGH, "escalated")):
            for address in addresses:
                device = f"gas-{BUS}-{address}"
                token = sim.set(BUS, address, value, arm=True)
                assert token is not None
                frame = sim.report(token, timeout=30)
                sent_wall = frame.wall - (frame.handed_over - frame.response)

                def stored(e: dict[str, Any], device: str = device, action: str = action) -> bool:
                    return (e.get("event") == "event stored" and e.get("kind") == "alarm"
                            and e.get("device") == device and e.get("action") == action)

                event_id = log.wait(stored, 30)["event_id"]
                acked = log.wait(lambda e, i=event_id: e.get("event") == "event forwarded" and e["event_id"] == i,
                                 30)
                to_puback.append(_wall(acked) - sent_wall)
                message = recorder.wait_for(lambda m, i=event_id: isinstance(m.json, dict)
                                            and m.json.get("event_id") == i, 30)
                to_subscriber.append(message.arrived - frame.response)
        after = sum(p.memory_info().rss for p in procs)
        result = {**idle, "rss_after_alarms_mb": round(after / 2**20, 1), "to_puback": to_puback,
                  "to_subscriber": to_subscriber}
    finally:
        recorder.close()
        killed = _stop(proc, ps)
    if args.alarm_process == "on":
        result["orphans_killed"] = killed
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-polling-"))
    logfile = log_to_file(workdir / "gateway.log")
    addresses = list(range(1, args.devices + 1))
    sim = SimBuses(workdir / "sim", {BUS: addresses})
    port = sim.start()[BUS]
    broker = MosquittoBroker(workdir / "broker")
    broker.start()
    try:
        from pymodbus.client import ModbusSerialClient

        from gateway.panel.buses import _prompt_client_class

        cycles = max(1, args.bare_polls // len(addresses))
        bare = _bare_ms_per_poll(port, addresses, cycles, ModbusSerialClient)
        bare_prompt = _bare_ms_per_poll(port, addresses, cycles, _prompt_client_class())
        cfg = parse_config(tomllib.loads(site_toml(
            buses={BUS: (port, addresses)}, mqtt_port=broker.port, db_path=workdir / "inproc.db",
            realtime_priority=args.realtime_priority, bus_timeout_s=0.3)))
        gateway_ms = asyncio.run(_gateway_ms_per_poll(cfg, cycles * len(addresses)))
        daemon = _daemon_run(args, sim, port, addresses, workdir, broker)
    finally:
        sim.stop()
        broker.stop()
        logfile.close()
    puback, subscriber = daemon.pop("to_puback"), daemon.pop("to_subscriber")
    line: dict[str, Any] = {
        "bare_ms_per_poll": round(bare, 3),
        "gateway_ms_per_poll": round(gateway_ms, 3),
        "ratio": round(gateway_ms / bare, 3),
        "rss_mb_64_devices": daemon["rss_mb"],
        "idle_cpu_pct_64_devices": daemon["cpu_pct"],
        "alarm_to_puback_p50_ms": round(percentile(puback, 50) * 1000, 3),
        "alarm_to_puback_p99_ms": round(percentile(puback, 99) * 1000, 3),
        "alarm_to_puback_max_ms": round(max(puback) * 1000, 3),
        "alarm_readings": len(puback),
        "alarm_to_subscriber_p50_ms": round(percentile(subscriber, 50) * 1000, 3),
        "alarm_to_subscriber_p99_ms": round(percentile(subscriber, 99) * 1000, 3),
        "bare_same_client_ms_per_poll": round(bare_prompt, 3),
        "ratio_same_client": round(gateway_ms / bare_prompt, 3),
        "devices": args.devices,
        "seconds": args.seconds,
        "daemon": daemon,
        "simulator_scheduling": sim.scheduling,
        "daemon_env": args.daemon_env,
        "gil_handoff": args.gil_handoff,
        "alarm_process": args.alarm_process,
        "workdir": str(workdir),
    }
    if args.alarm_process == "on":
        line |= {
            "pss_mb_64_devices": daemon["pss_mb"],
            "rss_once_mb_64_devices": daemon["rss_once_mb"],
            "memory_figures": {
                "rss_mb_64_devices": "RSS summed over gatewayd and its children; pages they share counted twice",
                "pss_mb_64_devices": "PSS summed: each shared page split between all processes mapping it, "
                                     "this benchmark's own Python processes included",
                "rss_once_mb_64_devices": "resident pages of gatewayd and its children, each counted once "
                                          "(pagemap); null without CAP_SYS_ADMIN",
            },
            "phase1": "in-process (ratio and ms per poll: the alarm path in the benchmark's process)",
        }
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle measuring window of gatewayd")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after warm-up before measuring")
    parser.add_argument("--bare-polls", type=int, default=1280, help="polls timed in the bare and gateway loops")
    parser.add_argument("--realtime-priority", type=int, default=50, help="runtime.realtime_priority")
    parser.add_argument("--gil-handoff", choices=("on", "off"), default="off",
                        help="runtime.gil_handoff of gatewayd (off by default)")
    parser.add_argument("--alarm-process", choices=("on", "off"), default="on",
                        help="runtime.alarm_process of gatewayd: memory and CPU then sum its processes")
    parser.add_argument("--daemon-cmd", default="", help="command to run instead of gatewayd (an experiment)")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for gatewayd, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = parser.parse_args(argv)
    line = run(args)
    checks = [
        ("ratio", line["ratio"], "≤ 1.1", line["ratio"] <= 1.1),
        ("rss_mb_64_devices", line["rss_mb_64_devices"], "≤ 40", line["rss_mb_64_devices"] <= 40),
        ("idle_cpu_pct_64_devices", line["idle_cpu_pct_64_devices"], "≤ 2", line["idle_cpu_pct_64_devices"] <= 2),
        ("alarm_to_puback_p99_ms", line["alarm_to_puback_p99_ms"], "≤ 20", line["alarm_to_puback_p99_ms"] <= 20),
    ]
    for key in ("rss_once_mb_64_devices", "pss_mb_64_devices"):
        if line.get(key) is not None:
            checks.insert(2, (key, line[key], "≤ 40", line[key] <= 40))
    for name, value, target, ok in checks:
        print(f"{name:<26} {value:>9.3f}  target {target:<8} {'met' if ok else 'MISSED'}")
    print(f"logs: {line['workdir']}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
