"""The panel stands alone: gateway/panel/process.py, gateway/panel/handover.py, gateway/panel/state.py.

The one layout everywhere: the panel (pins, buses, core, annunciator, relays, saved state, control socket)
and its storage/uplink process, a real child it starts and restarts. Shown here, against real peers (a
pymodbus detector on a pseudo-terminal, a private mosquitto, MockFactory pins, SQLite files):

* (a) kill -9 of the storage process during a gas alarm: the buzzer keeps its pattern, the valve stays
  closed, panel commands keep working, and what happened meanwhile reaches the broker once, in seq order;
* (b) kill -9 of the panel (``gatewayd``) with a latched high alarm and its valve on: after the restart the
  valve is on again before the first poll, and status shows the latch;
* (c) a corrupt saved state, and one from another site: each is set aside with a fault event;
* (d) a panel that cannot start exits at once with one line and a sysexits code, leaving no process;
* (e) SIGTERM under 150 events/s, 20 times: every event read is stored or counted (slow);
* the link: a storage process that breaks the protocol or stops beating is replaced; the hold is bounded
  and drops alarms last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import link
from gateway.config import load_config
from gateway.events import Event, Priority
from gateway.panel.handover import Handover, Hold, UplinkSupervisor
from gateway.panel.process import SUPPORT_PRIORITY
from gateway.panel.state import state_path
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import TimedMockPin, eventually, read_events, running_gateway, simulated_detectors
from tests.support.site import SiteSpec, build_site
from tests.support.unit import interpreter_environment
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
GATEWAYD = [sys.executable, "-m", "gateway.daemon"]
GATEWAYCTL = [sys.executable, "-m", "gateway.ops.cli"]
RELAY_ID, RELAY_PIN = "u1-gas-valve", 12
HIGH = 30.0  # %LEL, above the default high threshold (25 %LEL)
#: Temporal-4: four 100 ms pulses with 100 ms gaps, then 5 s off. No silence may be longer than its pause.
GAS_PAUSE_S = 5.0
PANEL_STATE_FAULT = "json_extract(payload, '$.code') = 'panel_state'"


def _site(directory: Path, bus_port: str, broker_port: int, *, households: int = 2,
          poll_interval_s: float = 0.2) -> tuple[SiteSpec, Path]:
    """A generated site plus a gas valve relay that a high gas alarm in unit u1 closes."""
    spec = build_site(bus_port=bus_port, db_path=directory / "events.db", broker_port=broker_port,
                      socket_path=directory / "control.sock", households=households,
                      poll_interval_s=poll_interval_s)
    extra = (f'\n[[outputs.relays]]\nid = "{RELAY_ID}"\npin = {RELAY_PIN}\n\n'
             f'[[linkage]]\nsignal = "gas_high"\nscope = "unit:u1"\noutput = "{RELAY_ID}"\n')
    toml = spec.toml.replace("\n[alarm]", extra + "\n[alarm]", 1)
    assert toml != spec.toml
    path = directory / "site.toml"
    path.write_text(toml, encoding="utf-8")
    return spec, path


def _records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    records.append(record)
    return records


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _pattern_gaps(changes: list[tuple[float, bool]], since: float, until: float) -> list[float]:
    """The buzzer's silences (off → on) between ``since`` and ``until``, in seconds."""
    gaps = []
    off_at: float | None = None
    for t, state in changes:
        if t < since or t > until:
            continue
        if not state:
            off_at = t
        elif off_at is not None:
            gaps.append(t - off_at)
            off_at = None
    return gaps


# ------------------------------------------------------------------------------------------- (a) storage killed


async def test_kill_9_of_the_storage_process_during_a_gas_alarm(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    valve = mock_pins.pin(f"GPIO{RELAY_PIN}", pin_class=TimedMockPin)
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec, path = _site(tmp_path, modem.gateway_port, broker.port)
        cfg = load_config(path)
        leak, other = spec.detectors
        recorder = mqtt_recorder_factory(broker, f"{spec.topic_base}/event/#")
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as panel:
                await eventually(lambda: panel.uplink_connected, timeout=30)
                sims[leak.id].set_concentration(HIGH)
                await eventually(lambda: buzzer.first_high() is not None and valve.state, timeout=30,
                                 message="the gas alarm did not sound and close the valve")
                first = panel.uplink_pid
                assert first is not None
                killed_at = time.monotonic()
                os.kill(first, signal.SIGKILL)
                await eventually(lambda: not panel.supervisor.up, timeout=30, message="the panel never saw it go")

                # Meanwhile the panel goes on: a second alarm sounds, its commands answer, status says so.
                sims[other.id].set_concentration(HIGH)
                await eventually(lambda: panel.panel.snapshot()["active"] and any(
                    d["device"] == other.id and d["state"] == "high_alarm" for d in panel.panel.snapshot()["devices"]),
                    timeout=30)
                status = await panel.commands.handle("status", {}, source="test")
                assert status.ok and status.data["uplink"]["process"] == "down"
                # the panel holds what it read while the process is away, unless the process started again (0.5 s)
                # took it already: the alarm is checked at the broker below either way
                assert status.data["storage"]["held_by_panel"] >= 1 or panel.uplink_pid not in (None, first), \
                    status.data["storage"]
                assert status.data["annunciator"]["relays"] == {RELAY_ID: True}
                read = await panel.commands.handle("read", {"device": other.id}, source="test")
                assert read.ok and read.data["value"] == HIGH
                events = await panel.commands.handle("events", {}, source="test")
                assert not events.ok and "down" in str(events.reason)

                await eventually(lambda: panel.supervisor.up and panel.uplink_pid not in (None, first), timeout=60,
                                 message="the storage process was not started again")
                back_at = time.monotonic()
                await eventually(lambda: panel.uplink_connected, timeout=30)
                message = await asyncio.to_thread(
                    recorder.wait_for, lambda m: m.json.get("device") == other.id and m.json.get("action") == "raised",
                    60.0)
                assert message.json["kind"] == "alarm"
                # the buzzer kept its pattern, and the valve stayed closed, throughout
                gaps = _pattern_gaps(list(buzzer.changes), killed_at, back_at)
                assert all(gap <= GAS_PAUSE_S * 1.1 for gap in gaps), gaps
                assert buzzer.changes[-1][0] > back_at - GAS_PAUSE_S * 1.1 or buzzer.state
                assert all(state for t, state in valve.changes if t >= killed_at), valve.changes
                assert valve.state
                rows = read_events(tmp_path / "events.db")
                await eventually(lambda: len(recorder.messages()) >= sum(
                    1 for r in read_events(tmp_path / "events.db") if r["kind"] != "telemetry"), timeout=60)
    # every stored event once, each session's seq without a gap
    rows = read_events(tmp_path / "events.db")
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an event stored twice"
    by_session: dict[int, list[int]] = {}
    for row in rows:
        by_session.setdefault(row["session"], []).append(row["session_seq"])
    for seqs in by_session.values():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert len(by_session) >= 2, "the storage process did not run a second session"
    raised = [r["body"]["device"] for r in rows if r["kind"] == "alarm" and r["action"] == "raised"]
    assert sorted(raised) == sorted([leak.id, other.id]), raised  # each alarm stored once, none lost


# ------------------------------------------------------------------------------------------- (b) panel killed


class Daemon:
    """``gatewayd`` as systemd would run it (the unit's interpreter settings, ``python -OO`` among them; mock
    pins), its log in a file, and gatewayctl beside it."""

    def __init__(self, directory: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.config = config
        self.log = directory / "gatewayd.log"
        self.env = {**os.environ, **interpreter_environment(), "GPIOZERO_PIN_FACTORY": "mock", "PYTHONPATH": str(ROOT),
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([*GATEWAYD, "--config", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        return self

    def ctl_json(self, *args: str) -> dict[str, Any]:
        result = subprocess.run([*GATEWAYCTL, "--config", str(self.config), *args, "--json"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT, env=self.env)
        assert result.returncode == 0, (args, result.stdout, result.stderr, self.tail())
        data: dict[str, Any] = json.loads(result.stdout)["data"]
        return data

    def answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        result = subprocess.run([*GATEWAYCTL, "--config", str(self.config), "status", "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT, env=self.env)
        return result.returncode == 0

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def storage_pids(self) -> list[int]:
        return [int(r["pid"]) for r in _records(self.log, "storage process started")]

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("gatewayd did not stop on SIGTERM") from None


@contextlib.contextmanager
def daemon_site(directory: Path, broker: MosquittoBroker,
                households: int = 2) -> Iterator[tuple[Daemon, SiteSpec, dict[int, SimulatedGasDetector]]]:
    with VirtualNullModem(directory / "dev") as modem:
        spec, path = _site(directory, modem.gateway_port, broker.port, households=households)
        bus = SimulatedBus(modem.device_port)
        sims = {d.address: bus.add_gas_detector(d.address, "A", unit="%LEL", decimals=1) for d in spec.detectors}
        for sim in sims.values():
            sim.set_status("normal")
        with bus:
            daemon = Daemon(directory, path)
            try:
                yield daemon, spec, sims
            finally:
                daemon.stop()
                for pid in daemon.storage_pids():  # none may outlive the test
                    if _alive(pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_panel_keeps_the_latch_and_the_valve_closed(tmp_path: Path, broker: MosquittoBroker) -> None:
    with daemon_site(tmp_path, broker) as (daemon, spec, sims):
        leak = spec.detectors[0]
        daemon.start()
        wait_until(daemon.answers, timeout=60, interval=0.2, message=daemon.tail)
        sims[leak.address].set_concentration(HIGH)
        wait_until(lambda: daemon.ctl_json("status")["annunciator"]["relays"] == {RELAY_ID: True}, timeout=30,
                   message=daemon.tail)
        state_file = state_path(str(tmp_path / "events.db"))
        wait_until(lambda: state_file.exists() and RELAY_ID in json.loads(state_file.read_text())["panel"]["relays"],
                   timeout=30, message="the latch was not saved")
        wait_until(daemon.storage_pids, timeout=30, message=daemon.tail)
        (storage,) = daemon.storage_pids()
        assert daemon.proc is not None
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)
        # the orphaned storage process stores what it had and exits by itself
        wait_until(lambda: not _alive(storage), timeout=30, message="the storage process outlived its panel")
        sims[leak.address].set_concentration(0.0)  # the gas is gone meanwhile: the latch must stay

        daemon.start()
        wait_until(daemon.answers, timeout=60, interval=0.2, message=daemon.tail)
        status = daemon.ctl_json("status")
        assert status["annunciator"]["relays"] == {RELAY_ID: True}
        row = next(d for d in status["devices"] if d["device"] == leak.id)
        assert row["latched"] == "high", row
        assert any(a["what"] == "alarm" and a["subject"] == leak.id for a in status["active"])
        started = _records(daemon.log, "panel started")
        assert len(started) == 2 and started[1]["restored"] == f"latch {leak.id} (high); relays on: {RELAY_ID}"

    rows = read_events(tmp_path / "events.db")
    second = max(r["session"] for r in rows)
    run = [r for r in rows if r["session"] == second]
    restored = next(i for i, r in enumerate(run) if r["kind"] == "alarm" and r["action"] == "restored")
    valve_on = next(i for i, r in enumerate(run) if r["kind"] == "relay" and r["action"] == "on")
    first_reading = next(i for i, r in enumerate(run) if r["kind"] == "telemetry")
    # The panel moves a pin before it hands the step's events on, in order: the valve was on before any poll.
    assert restored < valve_on < first_reading, [(r["kind"], r["action"]) for r in run[:6]]


# ------------------------------------------------------------------------------------------- (c) saved state


@pytest.mark.parametrize("content", ["corrupt", "another-site"])
async def test_a_saved_state_that_cannot_be_trusted_is_set_aside_with_a_fault(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any, content: str
) -> None:
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec, path = _site(tmp_path, modem.gateway_port, broker.port)
        cfg = load_config(path)
        state_file = state_path(cfg.storage.path)
        if content == "corrupt":
            state_file.write_bytes(b'{"format": 1, "site": {"community": "test-co')
        else:
            state_file.write_text(json.dumps({
                "format": 1, "saved_at": 0,
                "site": {"community": "elsewhere", "building": "b99", "gateway": "elsewhere-b99"},
                "panel": {"latches": [{"device": spec.detectors[0].id, "level": "high", "silenced": False,
                                       "cleared": False, "age_s": 1.0}], "walk_tests": [], "relays": [RELAY_ID]},
            }))
        with simulated_detectors(modem.device_port, spec.detectors):
            async with running_gateway(cfg) as panel:
                await eventually(lambda: read_events(cfg.storage.path, PANEL_STATE_FAULT), timeout=30)
                assert not panel.panel.snapshot()["active"], "an untrusted state was restored"
                assert not panel.annunciator.relay_states.get(RELAY_ID)
                await eventually(lambda: state_file.exists(), timeout=10)  # a fresh state saved in its place
    (fault,) = read_events(cfg.storage.path, PANEL_STATE_FAULT)
    assert fault["kind"] == "fault" and fault["action"] == "detected"
    assert ("corrupt" if content == "corrupt" else "from another site") in fault["body"]["detail"]
    aside = [p for p in state_file.parent.iterdir() if p.name.startswith(state_file.name + ".bad-")]
    assert len(aside) == 1
    fresh = json.loads(state_file.read_text())
    assert fresh["site"]["building"] == spec.building and fresh["panel"]["latches"] == []


async def test_latches_silence_and_walk_tests_come_back_after_a_planned_restart(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec, path = _site(tmp_path, modem.gateway_port, broker.port)
        cfg = load_config(path)
        leak, tested = spec.detectors
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as panel:
                sims[leak.id].set_concentration(HIGH)
                await eventually(lambda: panel.annunciator.relay_states.get(RELAY_ID), timeout=30)
                assert (await panel.commands.handle("silence", {}, source="test")).ok
                assert (await panel.commands.handle("test", {"device": tested.id}, source="test")).ok
            sims[leak.id].set_concentration(0.0)
            mock_pins.reset()
            async with running_gateway(cfg) as panel:
                saved = panel.panel.saved_state()
                assert [(x["device"], x["level"], x["silenced"]) for x in saved["latches"]] == [
                    (leak.id, "high", True)]
                assert [t["device"] for t in saved["walk_tests"]] == [tested.id]
                assert panel.annunciator.relay_states == {RELAY_ID: True}
                assert panel.annunciator.current.sound.name != "GAS", "a silenced alarm sounded again"


# ------------------------------------------------------------------------------------------- (d) start-up


def _start_fails(tmp_path: Path, broker: MosquittoBroker, *, env: dict[str, str], port: str | None = None,
                 ) -> tuple[int, str, str, float]:
    with VirtualNullModem(tmp_path / "dev") as modem:
        _spec, path = _site(tmp_path, port or modem.gateway_port, broker.port)
        started = time.monotonic()
        proc = subprocess.run([*GATEWAYD, "--config", str(path)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)
        elapsed = time.monotonic() - started
    return proc.returncode, proc.stdout, proc.stderr, elapsed


def test_no_gpio_backend_exits_at_once_with_one_line(tmp_path: Path, broker: MosquittoBroker) -> None:
    code, stdout, stderr, _elapsed = _start_fails(tmp_path, broker, env={"GPIOZERO_PIN_FACTORY": "no-such-backend"})
    assert code == 69, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatewayd: gpio:"), stderr
    assert "Traceback" not in stderr
    assert not _records_text(stdout, "storage process started"), "a storage process was started"


@pytest.mark.skipif(os.path.exists("/dev/gpiochip0"), reason="this machine has a GPIO chip")
def test_the_configured_lgpio_backend_without_a_chip_exits_with_one_line(tmp_path: Path,
                                                                        broker: MosquittoBroker) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"}
    with VirtualNullModem(tmp_path / "dev") as modem:
        _spec, path = _site(tmp_path, modem.gateway_port, broker.port)
        path.write_text(path.read_text().replace("[runtime]\n", '[runtime]\npin_factory = "lgpio"\n', 1))
        assert load_config(path).runtime.pin_factory == "lgpio"
        started = time.monotonic()
        proc = subprocess.run([*GATEWAYD, "--config", str(path)], capture_output=True, text=True, timeout=60,
                              env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
        elapsed = time.monotonic() - started
    assert proc.returncode == 69, (proc.returncode, proc.stderr)
    assert proc.stderr == "gatewayd: gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory\n"
    print(f"exited after {elapsed:.2f} s")


def test_the_shipped_example_unchanged_is_refused_at_every_start(tmp_path: Path) -> None:
    """The unit passes the installed copy of the example: a boot on an unedited site exits 78, one line."""
    example = ROOT / "examples" / "building.toml"
    site = tmp_path / "building.toml"
    site.write_bytes(example.read_bytes())
    args = [*GATEWAYD, "--config", str(site), "--unedited-example", str(example)]
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.startswith(f"gatewayd: config error: site: {site} is still the shipped example, unchanged")
    assert len(proc.stderr.strip().splitlines()) == 1
    # one edited byte is enough to pass this check (the config itself is then checked as always)
    edited_text = (example.read_text().replace('building = "b07"', 'building = "b08"')
                   .replace("/var/lib/gateway/events.db", str(tmp_path / "events.db"))
                   .replace("/run/gateway/control.sock", str(tmp_path / "control.sock")))
    assert str(tmp_path / "events.db") in edited_text and str(tmp_path / "control.sock") in edited_text
    site.write_text(edited_text)
    edited = subprocess.run([*args, "--duration", "1"], capture_output=True, text=True, timeout=60, env=env,
                            cwd=ROOT)
    assert "shipped example" not in edited.stderr


def test_a_serial_port_that_exists_but_cannot_be_opened_stops_the_start(tmp_path: Path,
                                                                       broker: MosquittoBroker) -> None:
    not_a_tty = tmp_path / "ttyUSB9"
    not_a_tty.write_text("")
    code, _stdout, stderr, _elapsed = _start_fails(tmp_path, broker, env={"GPIOZERO_PIN_FACTORY": "mock"},
                                                  port=str(not_a_tty))
    assert code == 69, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gatewayd: serial: cannot open {not_a_tty}"), stderr
    assert "Traceback" not in stderr


def test_an_absent_serial_adapter_is_a_port_lost_fault_not_a_start_failure(tmp_path: Path,
                                                                          broker: MosquittoBroker) -> None:
    with daemon_site(tmp_path, broker, households=1) as (daemon, _spec, _sims):
        text = daemon.config.read_text()
        daemon.config.write_text(text.replace(str(tmp_path / "dev"), str(tmp_path / "unplugged"), 1))
        daemon.start()
        wait_until(daemon.answers, timeout=60, interval=0.2, message=daemon.tail)
        wait_until(lambda: daemon.ctl_json("status")["buses"][0]["port_lost"], timeout=30, message=daemon.tail)


def _records_text(text: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


# ------------------------------------------------------------------------------------------- (e) planned stop


@pytest.mark.slow
def test_sigterm_under_150_events_a_second_stores_every_event_read(tmp_path: Path, broker: MosquittoBroker) -> None:
    stops = 20
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                          socket_path=tmp_path / "control.sock", households=24, poll_interval_s=0.1,
                          timeout_s=0.2, telemetry_batch_s=0.2)
        toml = spec.toml.replace("[alarm]\n", "[alarm]\ntelemetry_deadband = 0.1\n", 1)
        config = tmp_path / "site.toml"
        config.write_text(toml)
        bus = SimulatedBus(modem.device_port)
        sims = [bus.add_gas_detector(d.address, "A", unit="%LEL", decimals=1) for d in spec.detectors]
        stop_wiggle = threading.Event()

        def wiggle() -> None:
            value = 1.0
            while not stop_wiggle.wait(0.01):
                value = 1.0 if value >= 6.0 else value + 0.3
                for sim in sims:
                    sim.set_concentration(round(value, 1))

        for sim in sims:
            sim.set_status("normal")
        wiggler = threading.Thread(target=wiggle, daemon=True)
        rates: list[float] = []
        with bus:
            wiggler.start()
            daemon = Daemon(tmp_path, config)
            try:
                for _ in range(stops):
                    daemon.start()
                    before = len(_records(daemon.log, "storage process started"))
                    started = before + 1
                    wait_until(lambda: daemon.answers() and
                               len(_records(daemon.log, "storage process started")) >= started,  # noqa: B023
                               timeout=60, message=daemon.tail)
                    target = len(read_events(tmp_path / "events.db")) + 150
                    flowing = time.monotonic()
                    wait_until(lambda: len(read_events(tmp_path / "events.db")) >= target,  # noqa: B023
                               timeout=60, message="the events did not flow")
                    rates.append(150 / (time.monotonic() - flowing))
                    assert daemon.stop() == 0, daemon.tail()
            finally:
                stop_wiggle.set()
                daemon.stop()
    stopped = _records(daemon.log, "panel stopped")
    assert len(stopped) == stops
    print(f"events stored per second while running: median {sorted(rates)[len(rates) // 2]:.0f}")
    rows = read_events(tmp_path / "events.db")
    # Each run's events are stored under its storage sessions; a run reads ``events_read`` events and every
    # one of them is stored (or counted as unstored, which must then be none at a planned stop).
    sessions = sorted({r["session"] for r in rows})
    assert len(sessions) == stops
    for record, session in zip(stopped, sessions, strict=True):
        stored = sum(1 for r in rows if r["session"] == session)
        assert record["unstored"] == {}, record
        assert record["stored_upto"] == record["events_read"], record
        assert stored == record["events_read"], (session, stored, record)


# ------------------------------------------------------------------------------------------- scheduling


def _realtime_permitted() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0


def _thread_scheduling(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of ``pid``: its scheduling policy and realtime priority."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that just ended
            tid = int(task.name)
            found[tid] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
    return found


def test_panel_threads_all_run_realtime_and_the_storage_process_none(tmp_path: Path,
                                                                      broker: MosquittoBroker) -> None:
    """With realtime alarm threads, no thread of the panel can be preempted by a normal process while it holds
    the interpreter lock they need; the storage process (SQLite, MQTT) stays at normal priority."""
    if not _realtime_permitted():
        pytest.skip("SCHED_FIFO is not permitted here")
    priority = 20
    with daemon_site(tmp_path, broker) as (daemon, _spec, _sims):
        daemon.config.write_text(daemon.config.read_text().replace("realtime_priority = 0",
                                                                   f"realtime_priority = {priority}"))
        daemon.start()
        wait_until(daemon.answers, timeout=60, interval=0.2, message=daemon.tail)
        assert daemon.proc is not None
        panel = daemon.proc.pid
        wait_until(lambda: sum(prio == priority for _, prio in _thread_scheduling(panel).values()) >= 2,
                   timeout=60, message=lambda: f"{_thread_scheduling(panel)}\n{daemon.tail()}")
        threads = _thread_scheduling(panel)
        assert len(threads) >= 5, threads  # loop, hand-over, supervisor, saver, self-check, bus, annunciator
        assert all(policy == os.SCHED_FIFO for policy, _ in threads.values()), threads
        assert {prio for _, prio in threads.values()} == {SUPPORT_PRIORITY, priority}, threads
        wait_until(daemon.storage_pids, timeout=30, message=daemon.tail)
        storage = _thread_scheduling(daemon.storage_pids()[-1])
        assert all(policy == os.SCHED_OTHER for policy, _ in storage.values()), storage


# ------------------------------------------------------------------------------------------- the link


def test_messages_are_named_and_checked_field_by_field() -> None:
    frame = link.encode("fault", code="storage_full", present=True, detail=None)
    assert link.decode(frame[4:]) == {"v": 1, "type": "fault", "code": "storage_full", "present": True,
                                      "detail": None}
    for body, reason in [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"v": 2, "type": "beat"}', "version 2"),
        (b'{"v": 1, "type": "call", "name": "getattr"}', "unknown type \'call\'"),
        (b'{"v": 1, "type": "fault", "code": "x", "present": 1, "detail": null}', "present\' must be bool"),
        (b'{"v": 1, "type": "fault", "code": "x", "present": true}', "field \'detail\' missing"),
        (b'{"v": 1, "type": "stop", "flush_timeout_s": 1, "then": "rm -rf"}', "unknown field \'then\'"),
    ]:
        with pytest.raises(link.BadMessage, match=reason):
            link.decode(body)
    event = Event("alarm", "raised", 12.5, device="gas-1", level="high", value=30.0, wall=1.0)
    assert link.event_from_wire(link.event_to_wire(event)) == event
    with pytest.raises(link.BadMessage, match="unknown field"):
        link.event_from_wire({"kind": "alarm", "action": "raised", "mono": 1.0, "__class__": "x"})
    with pytest.raises(link.BadMessage, match="must be a number"):
        link.event_from_wire({"kind": "alarm", "action": "raised", "mono": "soon"})


def test_the_hold_is_bounded_drops_alarms_last_and_counts() -> None:
    hold = Hold(limit=10)
    hold.add(1, Priority.ALARM, b"alarm")
    for n in range(2, 40):
        hold.add(n, Priority.TELEMETRY, b"telemetry %d" % n)
    assert len(hold) <= 10
    assert dict(hold.after(0))[1] == b"alarm", "the alarm was dropped before the telemetry"
    assert hold.by_class() == {"alarm": 1, "telemetry": len(hold) - 1}
    assert hold.dropped["telemetry"] == 39 - len(hold)
    assert hold.take_unreported_drops() == {"telemetry": 39 - len(hold)}
    assert hold.take_unreported_drops() == {}
    up_to_35 = len([n for n, _ in hold.after(0) if n <= 35])
    assert hold.acknowledge(35) == up_to_35 and all(n > 35 for n, _ in hold.after(0))


def test_a_full_hold_gives_the_garbage_collector_nothing_to_walk() -> None:
    """What the hand-over thread keeps for an event is untracked once a collection has seen it, so a full
    hold does not lengthen the collections that pause every thread, the alarm path's too. Kept as event
    objects, 5000 held events added 5000 tracked objects."""
    handover = Handover(Hold(limit=5000))
    handover.start()
    try:
        gc.collect()
        before = len(gc.get_objects())
        for n in range(5000):
            handover.put(Event("telemetry", "reading", float(n), device="gas-2", unit="u1", value=1.0, wall=2.0))
        wait_until(lambda: len(handover.hold) == 5000, timeout=30)
        gc.collect()
        grown = len(gc.get_objects()) - before
        assert grown < 500, f"{grown} more objects for the garbage collector to walk"
    finally:
        handover.stop()


FAKE_STORAGE = textwrap.dedent("""
    import socket, struct, sys, time, msgspec
    args = sys.argv[1:]
    sock = socket.socket(fileno=int(args[args.index("--link-fd") + 1]))
    def send(body):
        data = msgspec.json.encode(body)
        sock.sendall(struct.pack(">I", len(data)) + data)
    send({"v": 1, "type": "call", "target": "panel", "name": "reset"})   # no such message
    send({"v": 1, "type": "fault", "code": "x"})                          # fields missing
    sock.sendall(struct.pack(">I", 5) + b"{nope")                        # not JSON
    send({"v": 1, "type": "hello", "handover": None, "pid": 1})
    mode = open(args[args.index("--config") + 1]).read()
    while True:
        if mode == "beat":
            send({"v": 1, "type": "beat", "session": 1, "connected": False, "connections": 0,
                  "last_error": None, "stored": 0, "held": 0})
        time.sleep(0.1)
""")


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
@pytest.mark.parametrize("mode", ["beat", "silent"])
def test_a_storage_process_that_breaks_the_protocol_is_rejected_and_one_that_hangs_is_replaced(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "fake_storage.py"
    script.write_text(FAKE_STORAGE)
    config = tmp_path / "mode"
    config.write_text(mode)
    handover = Handover()
    handover.start()
    faults: list[tuple[str, bool, str | None]] = []
    supervisor = UplinkSupervisor(str(config), handover, on_request=lambda *a: None,
                                  on_fault=lambda *a: faults.append(a), command=[sys.executable, str(script)],
                                  deadline_s=2.0)
    supervisor.start()
    try:
        wait_until(lambda: supervisor.up, timeout=30, message="the fake storage process never said hello")
        handover.put(Event("alarm", "raised", 1.0, device="gas-1"))
        wait_until(lambda: len(handover.hold) == 1, timeout=10)
        if mode == "beat":
            wait_until(lambda: supervisor.beat.get("session") == 1, timeout=30)
            assert supervisor.starts == 1 and not faults  # the bad messages were rejected, nothing else happened
        else:
            wait_until(lambda: supervisor.starts >= 2, timeout=60, message="a silent storage process was kept")
            wait_until(lambda: (supervisor.last_exit or "").startswith("no beat"), timeout=30,
                       message=lambda: f"last exit: {supervisor.last_exit}")
        assert len(handover.hold) == 1, "an event left the hold without being stored"
    finally:
        supervisor.stop(timeout_s=5)
        handover.stop()


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
async def test_the_storage_loop_busy_fail_point_burns_the_childs_cpu_only_while_armed(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``loop_busy=storage@PATH`` (the stress of benchmarks/buzzer_latency.py) keeps the storage process's loop
    busy while the file exists, and only then; the panel goes on deciding meanwhile."""
    flag = tmp_path / "busy"
    monkeypatch.setenv("GATEWAY_FAILPOINTS", f"loop_busy=storage@{flag}")  # inherited by the child

    def cpu_s(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with VirtualNullModem(tmp_path / "dev") as modem:
        spec, path = _site(tmp_path, modem.gateway_port, broker.port)
        cfg = load_config(path)
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as panel:
                pid = panel.uplink_pid
                assert pid is not None
                idle_from = cpu_s(pid)
                await asyncio.sleep(3.0)  # a window to measure, not a wait for a condition
                idle = cpu_s(pid) - idle_from
                flag.touch()
                busy_from = cpu_s(pid)
                await eventually(lambda: cpu_s(pid) - busy_from >= 1.5, timeout=30,
                                 message=lambda: f"child burnt {cpu_s(pid) - busy_from:.2f} s")
                sims[spec.detectors[0].id].set_concentration(30.0)  # a high alarm while the child is busy
                await eventually(lambda: panel.panel.snapshot()["active"], timeout=30, message="no alarm")
                flag.unlink()
    assert idle < 1.0, idle


def test_the_storage_process_loads_no_part_of_the_panel() -> None:
    """The child imports the link, which carries the panel's snapshot, but not the alarm core, the bus threads,
    the pins or the command handler: what the link reads of the panel lives in gateway/annunciation.py."""
    code = ("import sys, gateway.uplink.process; print(' '.join(sorted(m for m in sys.modules if m.startswith(("
            "'gateway.panel', 'gateway.control', 'gateway.ops', 'gateway_sim', 'gpiozero', 'pymodbus')))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == []
