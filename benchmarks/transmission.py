"""Transmission supervision and the SMS path, measured on the simulated modem (tests/support/modem.py).

Three parts, one JSON line at the end:

1. ``ack_to_fault_s`` — from an urgent event's PUBACK deadline to the ``transmission`` fault being raised, p99,
   over 40 :class:`~gateway.panel.transmission.TransmissionMonitor` runs at once (their own threads and clock).
2. ``alarm_to_sms_p50_ms``/``_p99_ms`` — the real layout in this process (the panel with mock pins, its storage/
   uplink child and its SMS child, the real python-gammu against the simulated modem), the broker killed and
   ``sms.after_s = 0``: from a gas-relay contact closing to the modem's OK for the alarm's SMS (one recipient).
   ``modem_send_ms`` is the simulated modem's own delay for one SMS (p50), reported apart; Gammu itself waits
   0.7 s per part between the prompt and the modem's answer (libgammu/phone/at/at-sms.c), which is part of
   the alarm-to-SMS figure. The buzzer pin's record while the gas alarm sounded, against Temporal-4 (four 0.1 s
   pulses with 0.1 s gaps, then 5 s off): ``buzzer_gap_max_ms``, the longest the buzzer stayed off beyond the
   pattern's own off-time at that point (0 when no gap outlasted its design); ``buzzer_timing_error_max_ms``,
   the largest difference of any on or off interval from its design; ``buzzer_pattern_unbroken``, whether the
   timeline is Temporal-4 to ±10 ms by the tests' checker (tests/test_command_fuzz.py ``temporal4_problems``),
   with its first ``buzzer_pattern_problems``. The benchmark runs at normal priority, not the deployed
   SCHED_FIFO (``realtime_priority``), so a loaded machine shows here what the tests' priority keeps out.
3. ``gatewayd`` as a real process with a pymodbus detector, the broker down, 200 alarms (each raised and
   cleared, each with a value of its own so every SMS is matched to its event), and random kill -9 of the
   panel, the uplink process and the SMS process: ``sms_sent``, ``sms_expected`` (alarm events stored),
   ``sms_duplicates``, ``sms_lost``, ``kills``.

    .venv/bin/python benchmarks/transmission.py [--alarms 200] [--latency-trials 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import TransmissionConfig  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.panel.transmission import TransmissionMonitor  # noqa: E402
from gateway_sim.nullmodem import VirtualNullModem  # noqa: E402
from tests.support.broker import MosquittoBroker, free_port  # noqa: E402
from tests.support.building import TimedMockPin, eventually, running_gateway, simulated_detectors  # noqa: E402
from tests.support.modem import SimulatedModem, reassemble  # noqa: E402
from tests.support.site import ContactSpec, build_site  # noqa: E402
from tests.test_annunciator import TOLERANCE_S  # noqa: E402
from tests.test_command_fuzz import temporal4_problems  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------------------ 1. ack → fault


def ack_to_fault(runs: int = 40, deadline_s: float = 0.5) -> list[float]:
    lags: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    monitors = []
    start = time.monotonic()
    for n in range(runs):
        made = start + n * 0.013  # spread over the check interval

        def changed(present: bool, detail: str | None, made: float = made) -> None:
            if present:
                with lock:
                    lags.append(time.monotonic() - (made + deadline_s))
                    if len(lags) == runs:
                        done.set()

        monitor = TransmissionMonitor(TransmissionConfig(ack_deadline_s=deadline_s, path_down_s=3600.0),
                                      path_up=lambda: (True, ""), on_change=changed)
        monitor.note(Event("alarm", "raised", made, device=f"d{n}"))
        monitors.append(monitor)
    for monitor in monitors:
        monitor.start()
    done.wait(30)
    for monitor in monitors:
        monitor.stop()
    return lags


# ------------------------------------------------------------------------------------------ contacts, site


def write_contacts(path: Path, community: str, building: str, household: str) -> None:
    path.write_text(f'[households."{community}/{building}/{household}"]\n'
                    'relatives = [{ name = "Relative", phone = "+8613900000101" }]\n', encoding="utf-8")
    os.chmod(path, 0o600)


def sms_section(modem: SimulatedModem, contacts: Path, queue: Path, after_s: float) -> str:
    return "\n".join(["[sms]", f'device = "{modem.port}"', f'contacts = "{contacts}"', f'queue = "{queue}"',
                      f"after_s = {after_s}", "max_per_hour = 1000", "check_interval_s = 30", ""])


# ------------------------------------------------------------------------------------------ 2. alarm → SMS


async def alarm_to_sms(tmp: Path, trials: int) -> dict[str, Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from gateway.config import load_config

    factory = MockFactory()
    Device.pin_factory = factory
    buzzer = factory.pin("GPIO18", pin_class=TimedMockPin)
    broker = MosquittoBroker(tmp / "broker").start()
    latencies: list[float] = []
    windows: list[list[tuple[float, bool]]] = []
    with VirtualNullModem(tmp / "dev") as bus, SimulatedModem(tmp / "modem") as modem:
        spec = build_site(bus_port=bus.gateway_port, db_path=tmp / "events.db", broker_port=broker.port,
                          socket_path=tmp / "control.sock", households=1,
                          contacts=[ContactSpec("relay-1", "gas_relay", 17, household="u1-h001")])
        contacts = tmp / "contacts.toml"
        write_contacts(contacts, spec.community, spec.building, "u1-h001")
        site = tmp / "site.toml"
        site.write_text(spec.toml + "\n" + sms_section(modem, contacts, tmp / "sms.db", 0.0), encoding="utf-8")
        cfg = load_config(site)
        relay = factory.pin("GPIO17")
        relay.drive_high()  # NO contact with pull-up: open (normal)
        with simulated_detectors(bus.device_port, spec.detectors):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: gateway.uplink_connected, timeout=30)
                await eventually(lambda: any(c.startswith("AT+CSQ") for c in modem.commands), timeout=60)
                await asyncio.sleep(1.0)
                broker.kill()
                await eventually(lambda: not gateway.uplink_connected, timeout=30)
                for _ in range(trials):
                    count = len(modem.submitted_pdus())
                    sounding_from = time.monotonic()
                    relay.drive_low()  # closed: gas
                    t0 = time.monotonic()
                    await eventually(lambda count=count: len(modem.submitted_pdus()) > count, timeout=60)
                    latencies.append((modem.submitted_pdus()[count].at - t0) * 1000)
                    await asyncio.sleep(random.uniform(0.5, 6.0))  # let the pattern play past a pause or not
                    windows.append([(t, s) for t, s in list(buzzer.changes) if t >= sounding_from])
                    count = len(modem.submitted_pdus())
                    relay.drive_high()
                    await eventually(lambda count=count: len(modem.submitted_pdus()) > count, timeout=60)
                    gateway.panel.reset(None, "benchmark")
                    await asyncio.sleep(0.2)
        sends = [s.at for s in modem.submitted_pdus()]
        send_ms = modem.send_delay_s * 1000
    broker.stop()
    factory.reset()
    return {"latencies": latencies, "windows": windows, "modem_send_ms": send_ms, "sent": len(sends)}


def buzzer_figures(windows: list[list[tuple[float, bool]]]) -> dict[str, Any]:
    """Each sounding window's buzzer record against Temporal-4 (the module's docstring says what each means)."""
    beyond, error, problems = 0.0, 0.0, []
    for changes in windows:
        problems += temporal4_problems(changes, float("-inf"), float("inf"), tolerance=TOLERANCE_S)
        for (t, on), (t_next, _) in itertools.pairwise(changes):
            lasted = t_next - t
            designed = 5.0 if not on and lasted > 2.55 else 0.1  # the pause, else a pulse or the gap between two
            error = max(error, abs(lasted - designed))
            if not on:
                beyond = max(beyond, lasted - designed)
    return {"buzzer_gap_max_ms": round(beyond * 1000, 1), "buzzer_timing_error_max_ms": round(error * 1000, 1),
            "buzzer_pattern_unbroken": not problems and any(len(w) > 1 for w in windows),
            "buzzer_pattern_problems": problems[:3]}


# ------------------------------------------------------------------------------------------ 3. kills


#: How long each level (alarm, then clear) is held: four polls of the detector.
CYCLE_S = 0.8


def _daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PYTHONPATH=str(ROOT))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _children(pid: int, module: str) -> list[int]:
    """gatewayd's children running ``module``: forked at start-up (named, gateway/panel/children.py) or started as
    ``python -m module``."""
    import psutil

    from gateway.panel.children import PROCESS_NAMES, process_name

    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children()
                if module in " ".join(c.cmdline()) or process_name(c.pid) == PROCESS_NAMES[module]]
    return []


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return list(con.execute(sql))
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def kill_run(tmp: Path, alarms: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    kills = {"gatewayd": 0, "uplink": 0, "sms": 0}
    with VirtualNullModem(tmp / "dev") as bus, SimulatedModem(tmp / "modem", send_delay_s=0.02) as modem:
        spec = build_site(bus_port=bus.gateway_port, db_path=tmp / "events.db", broker_port=free_port(),
                          socket_path=tmp / "control.sock", households=1)  # no broker: the path is down
        contacts = tmp / "contacts.toml"
        det = spec.detectors[0]
        write_contacts(contacts, spec.community, spec.building, det.household)
        site = tmp / "site.toml"
        site.write_text(spec.toml + "\n" + sms_section(modem, contacts, tmp / "sms.db", 1.0), encoding="utf-8")
        db = tmp / "events.db"
        log = tmp / "gatewayd.log"
        with simulated_detectors(bus.device_port, spec.detectors) as (_, sims):
            sim = sims[det.id]
            daemon = _daemon(site, log)
            deadline = time.monotonic() + 90
            while not any(c.startswith("AT+CSQ") for c in modem.commands) and time.monotonic() < deadline:
                time.sleep(0.1)
            for i in range(alarms):
                high = 30.0 + i / 10  # one decimal, as the detector reports it: unique per alarm
                for value in (high, 1.0):
                    sim.set_concentration(value)
                    end = time.monotonic() + CYCLE_S  # a few polls; the store is counted at the end
                    while time.monotonic() < end:
                        if daemon.poll() is not None:
                            daemon = _daemon(site, log)
                        time.sleep(0.05)
                    if rng.random() < 0.06:
                        victim = rng.choice(["gatewayd", "uplink", "sms"])
                        pids = ([daemon.pid] if victim == "gatewayd" else
                                _children(daemon.pid, f"gateway.{'uplink' if victim == 'uplink' else 'sms'}.process"))
                        for pid in pids:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                                kills[victim] += 1
                        if victim == "gatewayd":
                            daemon.wait(timeout=30)
                            daemon = _daemon(site, log)
            # Drain: every owed message sent.
            end = time.monotonic() + 900
            while time.monotonic() < end:
                owed = _rows(tmp / "sms.db", "SELECT COUNT(*) FROM owed WHERE state = 'owed'")
                pending = _rows(tmp / "sms.db", "SELECT COUNT(*) FROM outgoing WHERE state = 'pending'")
                if owed and pending and owed[0][0] == 0 and pending[0][0] == 0:
                    break
                time.sleep(0.5)
            time.sleep(2)
            daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=60)
        expected = [(str(a), float(v)) for a, v in _rows(
            db, "SELECT action, json_extract(payload, '$.value') FROM events WHERE kind = 'alarm' "
                "AND action IN ('raised', 'cleared')")]
        texts = [m["Text"] for m in reassemble(modem.submitted_pdus())]
    raised = {v for a, v in expected if a == "raised"}
    cleared_rows = sum(1 for a, _ in expected if a == "cleared")
    values: dict[float, int] = {}
    cleared_sms = 0
    for text in texts:
        if text.startswith("【报警解除】"):
            cleared_sms += 1
            continue
        match = re.search(r"([0-9.]+)%LEL", text)
        if match:
            value = float(match.group(1))
            values[value] = values.get(value, 0) + 1
    lost = sorted(v for v in raised if v not in values) + [None] * max(0, cleared_rows - cleared_sms)
    duplicates = sum(n - 1 for n in values.values() if n > 1) + max(0, cleared_sms - cleared_rows)
    return {"sms_sent": len(texts), "sms_expected": len(expected), "sms_duplicates": duplicates,
            "sms_lost": len(lost), "kills": sum(kills.values()), "kills_by_process": kills,
            "alarm_events_by_driver": 2 * alarms, "lost_values": lost[:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alarms", type=int, default=200)
    parser.add_argument("--latency-trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    result: dict[str, Any] = {}
    lags = ack_to_fault()
    result["ack_to_fault_s"] = None if not lags else round(pct(lags, 99) or 0.0, 3)
    with tempfile.TemporaryDirectory(prefix="bench-transmission-") as tmp:
        a = asyncio.run(alarm_to_sms(Path(tmp) / "latency", args.latency_trials))
    result["alarm_to_sms_p50_ms"] = round(pct(a["latencies"], 50) or 0.0, 1)
    result["alarm_to_sms_p99_ms"] = round(pct(a["latencies"], 99) or 0.0, 1)
    result["alarm_to_sms_trials"] = len(a["latencies"])
    result["modem_send_ms"] = a["modem_send_ms"]
    result["alarm_to_sms_target_ms"] = 3000 + a["modem_send_ms"]
    result.update(buzzer_figures(a["windows"]))
    print(f"ack→fault p99 {result['ack_to_fault_s']} s; alarm→SMS p50 {result['alarm_to_sms_p50_ms']} ms, "
          f"p99 {result['alarm_to_sms_p99_ms']} ms; buzzer gap beyond the pattern {result['buzzer_gap_max_ms']} ms, "
          f"pattern unbroken {result['buzzer_pattern_unbroken']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-transmission-kills-") as tmp:
        result.update(kill_run(Path(tmp), args.alarms, args.seed))
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
