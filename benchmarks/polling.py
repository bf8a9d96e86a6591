"""Polling cost and footprint: bare pymodbus vs the gateway on one simulated bus, then gatewayd with 64 detectors.

One run, one simulated RS-485 bus of 64 profile-A gas detectors (pymodbus's server on a pseudo-terminal, in
a child process — :mod:`simbus`):

1. ms per poll: a bare pymodbus ``ModbusSerialClient`` loop reading the detectors' ten registers, then the
   gateway's own polling code in this process polling the same detectors back to back: the panel's
   :class:`gateway.panel.side.AlarmSide` (bus thread, alarm panel and core, annunciator on mock pins) with
   ``poll_interval_s = 0``, its events dropped instead of handed to a storage process; ``ratio`` = gateway ÷
   bare. For reference also the bare loop with the gateway's own client class.
2. ``gatewayd`` as a real subprocess (``GPIOZERO_PIN_FACTORY=mock``) polling the 64 detectors at 1 Hz with a
   private mosquitto up: after warm-up, memory and CPU over 60 s of the whole service — gatewayd (the panel),
   its storage/uplink child and, with ``--modem``, its SMS child on a simulated modem, summed and per
   process. ``pss_mb_64_devices`` sums PSS (each shared page split between the processes mapping it);
   ``rss_mb_64_devices`` sums RSS (pages shared counted twice);
   ``rss_once_mb_64_devices`` counts each resident page of the service once (``/proc/<pid>/pagemap``, needs
   CAP_SYS_ADMIN; null without). CPU in % of one core.
3. Still in that service: ≥ 100 alarm readings (each detector rises to a low, then a high alarm), each
   timed from the simulated detector handing over the poll response that carries it to the PUBACK for its
   event (the storage child's "event forwarded" log line, which lands in gatewayd's log: the child inherits
   its stdout), and to a subscriber's receipt.

Prints one JSON line last, with ``targets`` (met or not). ``.venv/bin/python benchmarks/polling.py
[--seconds 60] [--devices 64] [--modem]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from common import log_to_file, mappings, percentile, resident_frames, site_toml
from service import DaemonLog, ServiceSampler, process, service_processes, start_gatewayd, stop_gatewayd, wall
from simbus import SimBuses

from gateway.config import parse_config
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


def _gateway_ms_per_poll(cfg: Any, polls: int) -> float:
    """The panel's real polling code (bus thread → alarm panel → core → annunciator) back to back."""
    from gpiozero import Device

    from drivers.mockpins import mock_pin_factory
    from gateway.health import Heartbeats
    from gateway.panel.side import AlarmSide

    Device.pin_factory = mock_pin_factory()
    cfg = dataclasses.replace(cfg, buses=tuple(dataclasses.replace(b, poll_interval_s=0.0) for b in cfg.buses))
    events: list[Any] = []
    side = AlarmSide(cfg, on_event=events.append, on_annunciation=lambda _a: None, heartbeats=Heartbeats())
    side.start()
    try:
        poller = side.buses[BUS]
        deadline = time.monotonic() + 60
        while poller.polls < len(poller.devices):  # first cycle: the port opens, devices become known
            if time.monotonic() > deadline:
                raise TimeoutError("the bus thread did not poll every detector within 60 s")
            time.sleep(0.05)
        first, start = poller.polls, time.perf_counter()
        while poller.polls - first < polls:
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        if poller.errors:
            raise RuntimeError(f"{poller.errors} failed polls: {dict(poller.errors_by_kind)}")
        return elapsed * 1000 / (poller.polls - first)
    finally:
        side.stop_inputs()
        side.close()


def _rss_once_mb(pids: list[int]) -> float | None:
    """Resident pages of the processes, each physical page counted once; None without the frame numbers
    (they read as 0 without CAP_SYS_ADMIN)."""
    frames: set[int] = set()
    for pid in pids:
        frames.update(resident_frames(pid, mappings(pid)).values())
    frames.discard(0)
    return round(len(frames) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1) if frames else None


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2 if k in ("cpu_pct", "cpu_s") else 1) if isinstance(v, float) else v for k, v in row.items()}


def _daemon_run(args: argparse.Namespace, sim: SimBuses, port: str, addresses: list[int], workdir: Path,
                broker: MosquittoBroker) -> dict[str, Any]:
    text = site_toml(buses={BUS: (port, addresses)}, mqtt_port=broker.port, db_path=workdir / "daemon.db",
                     realtime_priority=args.realtime_priority, bus_timeout_s=0.3)
    modem = None
    if args.modem:
        # The SMS path configured: its process (python-gammu) counts in the service's memory.
        from tests.support.modem import SimulatedModem

        modem = SimulatedModem(workdir / "modem").__enter__()
        contacts = workdir / "sms-contacts.toml"
        contacts.write_text('[households."x/y/h1"]\nrelatives = [{ name = "R", phone = "+8613900000101" }]\n',
                            encoding="utf-8")
        contacts.chmod(0o600)
        text += (f'\n[sms]\ndevice = "{modem.port}"\ncontacts = "{contacts}"\nqueue = "{workdir / "sms.db"}"\n'
                 "check_interval_s = 30\n")
    config = workdir / "site.toml"
    config.write_text(text, encoding="utf-8")
    log_path = workdir / "gatewayd.log"
    recorder = MqttRecorder(broker.host, broker.port, "safety/+/+/event/alarm")
    proc = start_gatewayd(config, log_path, cmd=args.daemon_cmd.split() if args.daemon_cmd else None,
                          extra_env=dict(item.split("=", 1) for item in args.daemon_env))
    log = DaemonLog(log_path)
    panel = process(proc.pid)
    sampler = ServiceSampler(panel)
    result: dict[str, Any] = {}
    killed: list[int] = []
    try:
        log.wait(lambda e: e.get("event") == "uplink connected", 60)
        seen: set[str] = set()

        def all_read(entry: dict[str, Any]) -> bool:
            if entry.get("event") == "reading":
                seen.add(entry["device"])
            return len(seen) == len(addresses)

        log.wait(all_read, 60)
        time.sleep(args.settle)
        pids_before = {p.pid for p in service_processes(panel)}
        sampler.sample()
        sampler.reset_cpu()
        sampler.sample()  # CPU counts from here
        t0 = time.perf_counter()
        rss_samples = []
        while time.perf_counter() - t0 < args.seconds:
            time.sleep(1.0)
            rss_samples.append(sum(row["rss_mb"] for row in sampler.sample()))
            if proc.poll() is not None:
                raise RuntimeError("gatewayd exited")
        elapsed = time.perf_counter() - t0
        rows = sampler.sample()
        for row in rows:
            row["cpu_pct"] = 100 * row["cpu_s"] / elapsed  # over the whole window, not since the last sample
        pids = [row["pid"] for row in rows]
        if set(pids) != pids_before:
            print(f"the service's processes changed during the window: {sorted(pids_before)} → {sorted(pids)}",
                  file=sys.stderr)
        total = {key: sum(row[key] for row in rows) for key in ("rss_mb", "uss_mb", "pss_mb", "cpu_pct", "threads")}
        idle = {
            "rss_mb": round(total["rss_mb"], 1),
            "rss_max_mb": round(max(rss_samples), 1),
            "uss_mb": round(total["uss_mb"], 1),
            "pss_mb": round(total["pss_mb"], 1),
            "rss_once_mb": _rss_once_mb(pids),
            "cpu_pct": round(total["cpu_pct"], 2),
            "threads": total["threads"],
            "processes": [_rounded(row) for row in rows],
        }

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

                def forwarded(e: dict[str, Any], i: str = event_id) -> bool:
                    return e.get("event") == "event forwarded" and e.get("event_id") == i

                def received(m: Any, i: str = event_id) -> bool:
                    return isinstance(m.json, dict) and m.json.get("event_id") == i

                acked = log.wait(forwarded, 30)  # the storage child's line, in gatewayd's log
                to_puback.append(wall(acked) - sent_wall)
                message = recorder.wait_for(received, 30)
                to_subscriber.append(message.arrived - frame.response)
        after = sum(row["rss_mb"] for row in sampler.sample())
        result = {**idle, "rss_after_alarms_mb": round(after, 1), "to_puback": to_puback,
                  "to_subscriber": to_subscriber}
    finally:
        recorder.close()
        killed = stop_gatewayd(proc, panel)
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
        gateway_ms = _gateway_ms_per_poll(cfg, cycles * len(addresses))
        daemon = _daemon_run(args, sim, port, addresses, workdir, broker)
    finally:
        sim.stop()
        broker.stop()
        logfile.close()
    modem_figures: dict[str, Any] = {}
    if args.modem:
        modem_figures = {"pss_mb_64_devices_with_modem": daemon["pss_mb"],
                         "sms_process_pss_mb": next((r["pss_mb"] for r in daemon["processes"]
                                                     if "sms" in str(r.get("role", ""))), None)}
    puback, subscriber = daemon.pop("to_puback"), daemon.pop("to_subscriber")
    p99 = round(percentile(puback, 99) * 1000, 3)
    return {
        "bare_ms_per_poll": round(bare, 3),
        "gateway_ms_per_poll": round(gateway_ms, 3),
        "ratio": round(gateway_ms / bare, 3),
        "pss_mb_64_devices": daemon["pss_mb"],
        "idle_cpu_pct_64_devices": daemon["cpu_pct"],
        "alarm_to_puback_p50_ms": round(percentile(puback, 50) * 1000, 3),
        "alarm_to_puback_p99_ms": p99,
        "alarm_to_puback_max_ms": round(max(puback) * 1000, 3),
        "alarm_readings": len(puback),
        "alarm_to_subscriber_p50_ms": round(percentile(subscriber, 50) * 1000, 3),
        "alarm_to_subscriber_p99_ms": round(percentile(subscriber, 99) * 1000, 3),
        "processes": [{k: row[k] for k in ("role", "pid", "pss_mb", "uss_mb", "rss_mb", "cpu_pct", "threads")}
                      for row in daemon["processes"]],
        "rss_mb_64_devices": daemon["rss_mb"],
        "uss_mb_64_devices": daemon["uss_mb"],
        "rss_once_mb_64_devices": daemon["rss_once_mb"],
        "bare_same_client_ms_per_poll": round(bare_prompt, 3),
        "ratio_same_client": round(gateway_ms / bare_prompt, 3),
        **modem_figures,
        "targets": {
            "ratio_le_1.1": gateway_ms / bare <= 1.1,
            **({"pss_mb_with_modem_le_55": daemon["pss_mb"] <= 55} if args.modem else
               {"pss_mb_le_45": daemon["pss_mb"] <= 45}),
            "idle_cpu_pct_le_2": daemon["cpu_pct"] <= 2,
            "alarm_to_puback_p99_ms_le_20": p99 <= 20,
        },
        "memory_figures": {
            "pss_mb_64_devices": "PSS summed over gatewayd (panel), its storage child and (--modem) its SMS child: "
                                 "each shared page split between all processes mapping it, other Python processes "
                                 "on the machine included",
            "rss_mb_64_devices": "RSS summed over the service's processes; pages they share counted twice",
            "rss_once_mb_64_devices": "resident pages of the service, each counted once (pagemap); null without "
                                      "CAP_SYS_ADMIN",
        },
        "phase1": "in-process: the panel's AlarmSide (bus thread, panel, core, mock pins), poll_interval_s = 0",
        "devices": args.devices,
        "seconds": args.seconds,
        "daemon": daemon,
        "simulator_scheduling": sim.scheduling,
        "daemon_env": args.daemon_env,
        "workdir": str(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--modem", action="store_true",
                        help="configure the SMS path on a simulated modem: the service then has three processes "
                             "(target: PSS summed at most 55 MB)")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle measuring window of gatewayd")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after warm-up before measuring")
    parser.add_argument("--bare-polls", type=int, default=1280, help="polls timed in the bare and gateway loops")
    parser.add_argument("--realtime-priority", type=int, default=50, help="runtime.realtime_priority")
    parser.add_argument("--daemon-cmd", default="", help="command to run instead of gatewayd (an experiment)")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for gatewayd, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = parser.parse_args(argv)
    line = run(args)
    checks = [
        ("ratio", line["ratio"], "≤ 1.1", line["targets"]["ratio_le_1.1"]),
        (("pss_mb_64_devices", line["pss_mb_64_devices"], "≤ 55", line["targets"]["pss_mb_with_modem_le_55"])
         if args.modem else
         ("pss_mb_64_devices", line["pss_mb_64_devices"], "≤ 45", line["targets"]["pss_mb_le_45"])),
        ("idle_cpu_pct_64_devices", line["idle_cpu_pct_64_devices"], "≤ 2", line["targets"]["idle_cpu_pct_le_2"]),
        ("alarm_to_puback_p99_ms", line["alarm_to_puback_p99_ms"], "≤ 20",
         line["targets"]["alarm_to_puback_p99_ms_le_20"]),
    ]
    for name, value, target, ok in checks:
        print(f"{name:<26} {value:>9.3f}  target {target:<8} {'met' if ok else 'MISSED'}")
    for row in line["processes"]:
        print(f"  {row['role']:<8} pid {row['pid']:>7}  pss {row['pss_mb']:6.1f} MB  uss {row['uss_mb']:6.1f} MB  "
              f"rss {row['rss_mb']:6.1f} MB  cpu {row['cpu_pct']:5.2f} %  threads {row['threads']}")
    print(f"logs: {line['workdir']}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
