"""Store-and-forward end to end: ``gatewayd`` as a real subprocess under load from a simulated bus.

The test process runs the field side (a virtual null modem and pymodbus-served gas detectors whose readings
change all the time, so telemetry flows past the deadband) and a real mosquitto; the daemon opens the
gateway end of the pty with gpiozero's mock pins. Shown here:

* a 60 s broker outage at ≥ 50 events/s: every event delivered, per-device order kept, duplicates only
  under the same id (slow);
* kill -9 at 50 random moments under load: every committed event is delivered in the end and the file
  passes ``PRAGMA integrity_check`` after every kill (slow);
* a full disk (the ``storage_full`` fail point of the storage process) in a running gateway: the alarm
  still sounds, the gateway stays up, a ``storage_full`` fault is raised, and everything is stored and
  forwarded once space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.config import load_config
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker, free_port
from tests.support.building import TimedMockPin, eventually, read_events, running_gateway, simulated_detectors
from tests.support.site import SiteSpec, build_site
from tests.support.wait import wait_until
from tests.test_uplink import PersistentBroker, SessionRecorder

ROOT = Path(__file__).resolve().parent.parent
DETECTORS = 8  # polled every 0.1 s: about 50–80 telemetry events per second
OUTAGE_S = 60.0
KILLS = 50


# ------------------------------------------------------------------------------------------- helpers


def site(tmp_path: Path, modem: VirtualNullModem, broker_port: int, households: int = DETECTORS) -> SiteSpec:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", households=households, poll_interval_s=0.1,
                      timeout_s=0.2, telemetry_batch_s=0.2)
    toml = spec.toml.replace("[alarm]\n", "[alarm]\ntelemetry_deadband = 0.1\n", 1)
    assert toml != spec.toml
    spec = SiteSpec(toml=toml, community=spec.community, building=spec.building, topic_prefix=spec.topic_prefix,
                    buzzer_pin=spec.buzzer_pin, detectors=spec.detectors, contacts=spec.contacts)
    spec.write(tmp_path / "site.toml")
    return spec


class Wiggle:
    """Changes every detector's reading every 20 ms (1–6 %LEL, below any alarm); pinned ones stay put."""

    def __init__(self, sims: dict[str, SimulatedGasDetector], seed: int = 5) -> None:
        self.sims = sims
        self.pinned: dict[str, float] = {}
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wiggle", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for device, sim in self.sims.items():
                sim.set_concentration(self.pinned.get(device, round(self._rng.uniform(1.0, 6.0), 1)))

    def __enter__(self) -> Wiggle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Daemon:
    """``python -m gateway.daemon --config <site>`` with mock pins; output kept in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM (planned stop) and the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError("gatewayd did not stop on SIGTERM") from None
        return int(self.proc.returncode)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's file independently (a fresh sqlite3 connection each time)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return list(con.execute(sql, args))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        con.close()


def session_of(db: Path) -> int:
    rows = query(db, "SELECT value FROM meta WHERE key = 'session'")
    return int(rows[0][0]) if rows else 0


def _storage_full(gateway: Any) -> dict[str, Any] | None:
    """The storage figures once the storage process reports a full disk, else None."""
    figures = gateway.supervisor.beat
    if not figures:
        return None
    future = gateway.supervisor.request("storage")
    try:
        storage: dict[str, Any] = future.result(timeout=10)["storage"]
    except Exception:
        return None
    return storage if storage.get("storage_fault") == "storage_full" else None


def check_deliveries(stored: list[tuple[str, str]], received: list[dict[str, Any]]) -> dict[str, int]:
    """Every stored id received; duplicates only under the same id with the same content; per-device order."""
    by_id: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for body in received:
        same = {k: v for k, v in body.items() if k not in ("historical", "sent", "age_s")}  # per copy sent
        first = by_id.setdefault(body["event_id"], same)
        if first is not same:
            duplicates += 1
            assert first == same, f"two different events under one id: {first} vs {same}"
        assert body["event_id"] == f"{body['gateway']}:{body['install']}:{body['session']}:{body['seq']}"
    missing = [event_id for event_id, _ in stored if event_id not in by_id]
    assert not missing, f"{len(missing)} stored events never delivered, e.g. {missing[:5]}"
    last: dict[str, tuple[int, int]] = {}
    seen: set[str] = set()
    for body in received:
        if body["event_id"] in seen:
            continue
        seen.add(body["event_id"])
        key = (body["session"], body["seq"])
        device = body.get("device") or "-"
        assert key > last.get(device, (0, 0)), f"{device}: {key} after {last[device]}"
        last[device] = key
    return {"stored": len(stored), "received": len(received), "unique": len(by_id), "duplicates": duplicates,
            "historical": sum(1 for b in received if b["historical"])}


# ------------------------------------------------------------------------------------------- outage


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_broker_outage_of_60_s_at_50_events_per_s(tmp_path: Path) -> None:
    broker = PersistentBroker(tmp_path / "broker").start()
    db = tmp_path / "events.db"
    with contextlib.ExitStack() as stack:
        stack.callback(broker.stop)
        modem = stack.enter_context(VirtualNullModem(tmp_path / "dev"))
        spec = site(tmp_path, modem, broker.port)
        recorder = SessionRecorder(broker, f"{spec.topic_base}/event/#")
        stack.callback(recorder.close)
        broker.save()  # the recorder's session and queue survive the outage
        _, sims = stack.enter_context(simulated_detectors(modem.device_port, spec.detectors))
        wiggle = stack.enter_context(Wiggle(sims))
        daemon = Daemon(tmp_path / "site.toml", tmp_path / "gatewayd.log").start()
        stack.callback(lambda: daemon.alive() and daemon.stop())
        wait_until(lambda: (query(db, "SELECT COUNT(*) FROM events WHERE delivered = 1") or [(0,)])[0][0] >= 200,
                   timeout=120, message=lambda: f"no steady forwarding:\n{daemon.tail()}")

        broker.stop()
        down_at = time.time()
        alarmed = spec.detectors[0].id
        time.sleep(OUTAGE_S / 3)
        wiggle.pinned[alarmed] = 30.0  # a gas alarm in the middle of the outage
        time.sleep(OUTAGE_S * 2 / 3)
        up_at = time.time()
        broker.start()
        stored_down = query(db, "SELECT COUNT(*) FROM events WHERE wall BETWEEN ? AND ?", (down_at, up_at))[0][0]
        rate = stored_down / (up_at - down_at)
        time.sleep(5)  # a little more load while the backlog drains
        for device in sims:
            wiggle.pinned[device] = wiggle.pinned.get(device, 2.0)  # readings settle: the stream ends
        wait_until(lambda: query(db, "SELECT COUNT(*) FROM events WHERE delivered = 0")[0][0] == 0, timeout=240,
                   interval=0.5, message=lambda: f"backlog not drained:\n{daemon.tail()}")
        assert daemon.alive(), daemon.tail()
        assert daemon.stop() == 0, daemon.tail()
        stored = [(str(e), str(k)) for e, k in query(db, "SELECT event_id, kind FROM events ORDER BY seq")]
        received = recorder.wait_ids({e for e, _ in stored}, timeout=120)

    counts = check_deliveries(stored, received)
    session_seqs = [s for (s,) in query(db, "SELECT session_seq FROM events WHERE session = 1 ORDER BY seq")]
    assert session_seqs == list(range(1, len(session_seqs) + 1)), "a gap: an event was lost before storage"
    alarms = [b for b in received if b["kind"] == "alarm" and b.get("device") == alarmed]
    # raised in this session during the outage, sent for the first time when the broker is back: live, with its age
    assert alarms and alarms[0]["historical"] is False, "the alarm raised during the outage arrives, live"
    assert alarms[0]["age_s"] > 0
    print(f"\nbroker outage {up_at - down_at:.0f} s: stored {stored_down} events while down ({rate:.1f}/s); "
          f"stored {counts['stored']}, received {counts['received']} ({counts['unique']} unique, "
          f"{counts['duplicates']} duplicates with the same id, {counts['historical']} historical)")
    assert rate >= 40.0, f"load too light to show anything: {rate:.1f} events/s"


# ------------------------------------------------------------------------------------------- kill -9


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kill_9_at_50_random_moments_loses_nothing_committed(
    tmp_path: Path, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    db = tmp_path / "events.db"
    committed: set[str] = set()
    delays: list[float] = []
    with contextlib.ExitStack() as stack:
        modem = stack.enter_context(VirtualNullModem(tmp_path / "dev"))
        spec = site(tmp_path, modem, broker.port)
        recorder = mqtt_recorder_factory(broker, f"{spec.topic_base}/event/#")
        _, sims = stack.enter_context(simulated_detectors(modem.device_port, spec.detectors))
        wiggle = stack.enter_context(Wiggle(sims, seed=seed))
        daemon = Daemon(tmp_path / "site.toml", tmp_path / "gatewayd.log")
        for n in range(1, KILLS + 1):
            daemon.start()
            wait_until(lambda n=n: session_of(db) >= n or not daemon.alive(), timeout=60,  # type: ignore[misc]
                       message=lambda: f"gatewayd did not open its storage:\n{daemon.tail()}")
            assert daemon.alive(), daemon.tail()
            delay = rng.uniform(0.0, 2.0)
            delays.append(delay)
            time.sleep(delay)  # the random moment
            daemon.kill()
            check = query(db, "PRAGMA integrity_check")
            assert check == [("ok",)], f"after kill {n}: {check}"
            committed |= {str(e) for (e,) in query(db, "SELECT event_id FROM events")}
        wiggle.pinned.update({device: 2.0 for device in sims})
        daemon.start()
        wait_until(lambda: session_of(db) > KILLS and query(db, "SELECT COUNT(*) FROM events WHERE delivered = 0")
                   [0][0] == 0, timeout=300, interval=0.5, message=lambda: f"backlog not drained:\n{daemon.tail()}")
        assert daemon.stop() == 0, daemon.tail()
        stored = [(str(e), str(k)) for e, k in query(db, "SELECT event_id, kind FROM events ORDER BY seq")]
        assert committed <= {e for e, _ in stored}, "a committed event vanished from the file"
        wanted = {e for e, _ in stored}
        messages = recorder.wait_for_count(lambda m: True, len(wanted), timeout=120)
        received = [m.json for m in messages]
        for event_id in wanted - {b["event_id"] for b in received}:
            recorder.wait_for(lambda m, i=event_id: m.json.get("event_id") == i, timeout=60)  # type: ignore[misc]
        received = [m.json for m in recorder.messages()]
    counts = check_deliveries(stored, received)
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    print(f"\nkill -9 x{KILLS} (seed {seed}, after {min(delays):.2f}–{max(delays):.2f} s): committed at the kills "
          f"{len(committed)}, stored {counts['stored']}, received {counts['received']} ({counts['unique']} unique, "
          f"{counts['duplicates']} duplicates with the same id, {counts['historical']} historical)")


# ------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def broker_later(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker that persists its sessions (saved when it stops), not running: the test starts it."""
    broker = MosquittoBroker(tmp_path / "broker", port=free_port(), autosave_interval=1)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_a_full_disk_holds_events_sounds_the_alarm_and_recovers(
    tmp_path: Path, mock_pins: Any, mqtt_recorder_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = tmp_path / "disk-full"
    # The storage process reads its fail points at start: every commit fails as on a full disk while ``full``
    # exists (a capped SQLite file would cap only the connection that set it, which is in the other process).
    monkeypatch.setenv("GATEWAY_FAILPOINTS", f"storage_full=outbox@{full}")
    with broker_later(tmp_path) as broker, VirtualNullModem(tmp_path / "dev") as modem:
        spec = site(tmp_path, modem, broker.port, households=1)
        # The recorder's session outlives the broker's stop: whatever the gateway publishes once the broker is
        # back reaches it, even before it has reconnected itself.
        broker.start()
        recorder = mqtt_recorder_factory(broker, f"{spec.topic_base}/event/#", protocol=mqtt.MQTTv311,
                                         client_id="late-recorder", clean=False)
        broker.stop()
        detector = spec.detectors[0]
        buzzer = mock_pins.pin(f"GPIO{spec.buzzer_pin}", pin_class=TimedMockPin)
        cfg = load_config(tmp_path / "site.toml")
        db = tmp_path / "events.db"
        with simulated_detectors(modem.device_port, spec.detectors) as (_, sims):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: gateway.supervisor.beat.get("stored", 0) > 0, timeout=30)
                full.touch()
                storage_pid = gateway.uplink_pid
                sims[detector.id].set_concentration(30.0)
                await eventually(lambda: buzzer.first_high() is not None, timeout=20, message="the buzzer is silent")
                status = await eventually(lambda: _storage_full(gateway), timeout=30)
                assert status["storage_fault"] == "storage_full" and status["held_in_memory"] >= 2
                assert not read_events(db, "kind = 'alarm'"), "the alarm was stored on a full disk"
                assert "fault" in gateway.panel.snapshot()["annunciation"].leds  # shown locally, not only stored
                assert gateway.uplink_pid == storage_pid, "the storage process died"

                full.unlink()  # space returns
                await eventually(lambda: read_events(db, "kind = 'alarm'"), timeout=30)
                broker.start()
                await eventually(lambda: gateway.uplink_connected, timeout=60)

                def arrived(kind: str, action: str, code: str | None = None) -> Any:
                    return recorder.wait_for(lambda m: m.json.get("kind") == kind and m.json.get("action") == action
                                             and m.json.get("code") == code, timeout=60)

                alarm = await asyncio.to_thread(arrived, "alarm", "raised")
                raised = await asyncio.to_thread(arrived, "fault", "raised", "storage_full")
                cleared = await asyncio.to_thread(arrived, "fault", "cleared", "storage_full")
    assert alarm.json["device"] == detector.id
    assert alarm.json["seq"] < raised.json["seq"] < cleared.json["seq"]
    # raised in this session and sent for the first time: live, however late (docs/mqtt.md)
    assert json.loads(raised.payload)["historical"] is False
