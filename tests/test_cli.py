"""``gatewayctl`` as a real subprocess against a real ``gatewayd`` subprocess.

The daemon runs with ``GPIOZERO_PIN_FACTORY=mock``; its RS-485 bus is simulated in this test process on a
virtual null modem; the uplink talks to a private mosquitto. One daemon serves the module (tests leave the
site as they found it); the daemon-down tests start and stop their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.site import SiteSpec
from tests.support.wait import wait_until
from tests.test_commands import DOOR_ID, PASSWORD, RELAY_ID, populate_bus, write_site

BIN = Path(sys.executable).parent
GATEWAYCTL = str(BIN / "gatewayctl")
GATEWAYD = str(BIN / "gatewayd")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REJECTED = 0, 1, 2, 3, 4


@dataclass
class DaemonSite:
    directory: Path
    config: Path
    spec: SiteSpec
    bus: SimulatedBus
    detectors: list[SimulatedGasDetector]
    daemon: subprocess.Popen[bytes] | None = None

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.spec.detectors]

    def ctl(self, *args: str, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_ctl("--config", str(self.config), *args, timeout=timeout, **kwargs)

    def ctl_json(self, *args: str, expect: int = EXIT_OK) -> dict[str, Any]:
        result = self.ctl(*args, "--json")
        assert result.returncode == expect, (args, result.returncode, result.stdout, result.stderr)
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def start_daemon(self) -> None:
        env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
        log = (self.directory / "gatewayd.log").open("ab")
        self.daemon = subprocess.Popen([GATEWAYD, "--config", str(self.config)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._healthy, timeout=60, interval=0.2, message=self._log_tail)

    def _healthy(self) -> bool:
        assert self.daemon is not None and self.daemon.poll() is None, self._log_tail()
        result = self.ctl("status", "--json", timeout=20)
        if result.returncode != EXIT_OK:
            return False
        data = json.loads(result.stdout)["data"]
        # every device answered (a latch restored from before a restart is not "normal", and that is right)
        return data["uplink"]["process"] == "up" and all(d["state"] != "unknown" for d in data["devices"])

    def stop_daemon(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            code = self.daemon.wait(timeout=10)
        self.daemon = None
        return code

    def _log_tail(self) -> str:
        path = self.directory / "gatewayd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "gatewayd did not become healthy; log tail:\n" + "\n".join(text.splitlines()[-30:])

    def status(self) -> dict[str, Any]:
        return self.ctl_json("status")["data"]

    def device_state(self, device: str) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["device"] == device)


def run_ctl(*args: str, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAYCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": ""}, **kwargs)


@contextlib.contextmanager
def daemon_site(directory: Path, *, valve_on_gas: bool = False) -> Iterator[DaemonSite]:
    """A running daemon on its own broker and bus; with ``valve_on_gas`` the first detector's unit's high gas
    alarm drives the relay (the gas valve), as in the example building."""
    broker = MosquittoBroker(directory / "broker")
    broker.start()
    try:
        with VirtualNullModem(directory) as modem:
            spec, config = write_site(directory, bus_port=modem.gateway_port, broker_port=broker.port)
            if valve_on_gas:
                with config.open("a") as f:
                    f.write(f'\n[[linkage]]\nsignal = "gas_high"\nscope = "unit:{spec.detectors[0].unit}"\n'
                            f'output = "{RELAY_ID}"\n')
            bus = SimulatedBus(modem.device_port)
            detectors = populate_bus(bus, spec)
            with bus:
                site = DaemonSite(directory, config, spec, bus, detectors)
                site.start_daemon()
                try:
                    yield site
                finally:
                    if site.daemon is not None:
                        site.stop_daemon()
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def site() -> Iterator[DaemonSite]:
    """One running daemon for the module, in a directory others may traverse (for the permission test)."""
    directory = Path(tempfile.mkdtemp(prefix="gatewayctl-test-"))
    directory.chmod(0o755)
    try:
        with daemon_site(directory) as s:
            yield s
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------- no daemon needed


def test_version_and_usage_errors_exit_2() -> None:
    version = run_ctl("--version")
    assert version.returncode == EXIT_OK and version.stdout.startswith("gatewayctl ")
    for args in ([], ["frobnicate"], ["events", "--kind", "party"], ["events", "--since", "yesterday"],
                 ["events", "--limit", "0"], ["reset"], ["reset", "gas-1", "--all"], ["test"],
                 ["scan", "bus1", "--from", "9", "--to", "3"], ["buzzer-test", "--seconds", "0"], ["read"],
                 ["relay-test"], ["config"]):
        result = run_ctl(*args)
        assert result.returncode == EXIT_USAGE, (args, result.stdout, result.stderr)
        assert "usage" in result.stderr


def test_config_check_ok_and_error(tmp_path: Path) -> None:
    good, _ = write_site(tmp_path, bus_port="/dev/ttyUSB0", broker_port=1883)
    spec_file = tmp_path / "site.toml"
    ok = run_ctl("config", "check", str(spec_file), "--json")
    assert ok.returncode == EXIT_OK
    assert json.loads(ok.stdout)["data"] == {"file": str(spec_file), "gateway": "test-community-b01", "units": 1,
                                            "households": 2, "devices": 3, "buses": 1}
    bad = tmp_path / "bad.toml"
    bad.write_text(spec_file.read_text().replace("baudrate = 9600", "baudrate = 9601"))
    result = run_ctl("config", "check", str(bad))
    assert result.returncode == EXIT_ERROR
    assert "buses[0].baudrate" in result.stderr and "9601" in result.stderr
    assert good.community == "test-community"


# ------------------------------------------------------------------------------------------- running daemon


def test_status_json_and_plain_text(site: DaemonSite) -> None:
    data = site.ctl_json("status")
    assert data["ok"] is True and data["daemon"] == "running"
    status = data["data"]
    assert status["gateway"]["id"] == "test-community-b01"
    assert status["gateway"]["pid"] == site.daemon.pid  # type: ignore[union-attr]
    assert status["uplink"]["connected"] is True and status["uplink"]["broker"].startswith("127.0.0.1:")
    assert status["annunciator"]["sound"] == "quiet" and status["annunciator"]["relays"] == {RELAY_ID: False}
    rows = {d["device"]: d for d in status["devices"]}
    assert set(rows) == {*site.device_ids, DOOR_ID}
    first = rows[site.device_ids[0]]
    assert (first["household"], first["unit"], first["kind"], first["state"], first["measure"]) == (
        site.spec.detectors[0].household, "u1", "gas_detector", "normal", "%LEL")
    text = site.ctl("status")
    assert text.returncode == EXIT_OK
    assert "\033[" not in text.stdout  # plain when piped
    lines = text.stdout.splitlines()
    assert lines[0] == "ALL CLEAR  test-community-b01  3 devices: 0 alarms, 0 supervisory, 0 faults", lines
    assert "connected to 127.0.0.1:" in text.stdout and "storage ok" in text.stdout
    assert status["storage"]["storage_fault"] is None
    assert "Unit u1 · 3 devices · all normal" in text.stdout  # nothing wrong: one line per unit
    assert all(device not in text.stdout for device in site.device_ids)
    every = site.ctl("status", "--all")
    assert every.returncode == EXIT_OK and "HOUSEHOLD" in every.stdout
    assert all(device in every.stdout for device in site.device_ids)


def _building_status(units: int, per_unit: int) -> dict[str, Any]:
    """A status answer as the daemon gives it, for a building where nothing is wrong."""
    now = time.time()
    devices = [{"device": f"gas-u{u}-{n:02d}01", "unit": f"u{u}", "household": f"u{u}-{n:02d}01",
                "kind": "gas_detector", "state": "normal", "value": 0.0, "measure": "%LEL", "last_seen": now - 0.4,
                "last_seen_age_s": 0.4, "faults": [], "supervisory": [], "latched": None,
                "condition_present": False, "comm_errors": 0, "errors_by_kind": {}}
               for u in range(1, units + 1) for n in range(1, per_unit + 1)]
    return {
        "gateway": {"id": "sunshine-garden-b07", "version": "0.1.0", "session": 12, "pid": 4242,
                    "uplink_process": {"pid": 4243}, "uptime_s": 86400.0 * 12},
        "uplink": {"process": "up", "connected": True, "broker": "mqtt.sunshine-garden.example.org:8883",
                   "rtt_ms": 23.5, "backlog": 0, "oldest_undelivered_age_s": None, "last_error": None},
        "annunciator": {"sound": "quiet", "pattern": None, "buzzer_on": False, "leds": ["power"],
                        "relays": {"u1-gas-valve": False, "u2-gas-valve": False}},
        "storage": {"storage_fault": None, "history": 1_234_567, "evicted_undelivered": {}, "dropped_in_memory": {}},
        "buses": [{"id": f"rs485-{b}", "port": f"/dev/ttyRS485-{b}", "port_lost": False, "paused": False,
                   "scanning": False, "polls": 12_345_678, "errors": 12, "errors_by_kind": {"timeout": 12},
                   "floor_s": 0.99, "cycle_s": 1.02} for b in (1, 2)],
        "active": [],
        "devices": devices,
    }


@pytest.mark.parametrize(("units", "per_unit"), [(2, 32), (8, 8), (16, 4)])
def test_a_64_device_building_with_nothing_wrong_fits_80_by_24(units: int, per_unit: int) -> None:
    from gateway.ops.cli import Style, render_status

    lines = list(render_status(_building_status(units, per_unit), Style(io.StringIO())))
    assert len(lines) <= 24, "\n".join(lines)
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert lines[0] == "ALL CLEAR  sunshine-garden-b07  64 devices: 0 alarms, 0 supervisory, 0 faults"


def test_status_puts_what_is_wrong_first_and_filters(site: DaemonSite) -> None:
    det, device = site.detectors[1], site.device_ids[1]
    det.set_concentration(30.0)
    try:
        wait_until(lambda: site.device_state(device)["state"] == "high_alarm", timeout=30)
        text = site.ctl("status").stdout.splitlines()
        assert text[0].startswith("ALARM  test-community-b01  3 devices: 1 alarm, "), text
        what, place, since = text[1].split(device)[0], text[1].split(device)[1], text[1]
        assert what.split() == ["ALARM", "high", "gas", "alarm"]
        household = site.spec.detectors[1].household
        assert f"household {household}, unit" in place and " since " in since
        unit = site.device_state(device)["unit"]
        units = [line for line in text if line.startswith("Unit ")]
        assert units[0].startswith(f"Unit {unit} ") and "1 in trouble" in units[0]
        row = text[text.index(units[0]) + 2]  # the unit's line, the column names, then its device in trouble
        assert row.split()[:4] == [device, household, "gas", "high_alarm"], text

        problems = site.ctl("status", "--problems").stdout
        assert device in problems and "Sounder" not in problems
        assert site.device_ids[0] not in problems and DOOR_ID not in problems
        data = site.ctl_json("status", "--problems")["data"]
        assert [d["device"] for d in data["devices"]] == [device]
        assert data["active"][0]["place"].startswith(f"household {household}")
        by_unit = site.ctl_json("status", "--unit", unit)["data"]["devices"]
        assert by_unit and {d["unit"] for d in by_unit} == {unit}
        assert site.ctl("status", "--unit", "nowhere").returncode == EXIT_ERROR
    finally:
        det.set_concentration(0.0)
        wait_until(lambda: site.device_state(device)["condition_present"] is False, timeout=30)
        site.ctl("reset", "--all")
        wait_until(lambda: site.device_state(device)["state"] == "normal", timeout=30)


def test_status_watch_redraws_in_place(site: DaemonSite) -> None:
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "status", "--watch", "0.2"],
                                stdout=terminal, stderr=subprocess.PIPE, start_new_session=True)
        os.close(terminal)
        output = ""
        deadline = time.monotonic() + 30
        while output.count("\033[H") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                output += os.read(controller, 65536).decode(errors="replace")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == EXIT_OK
    finally:
        os.close(controller)
    frames = output.split("\033[H")[1:]
    assert len(frames) >= 3, output[-2000:]
    assert frames[0].startswith("\033[2J")  # cleared once, then drawn over
    assert all("\033[2J" not in frame for frame in frames[1:])
    assert all("test-community-b01" in frame and frame.endswith("\033[J") for frame in frames[1:-1])
    piped = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "status", "--watch", "0.2", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert piped.stdout is not None
        objects = [json.loads(piped.stdout.readline()) for _ in range(2)]  # one status a line, no screen codes
    finally:
        os.killpg(piped.pid, signal.SIGINT)
        piped.wait(timeout=30)
    assert all(o["ok"] and o["data"]["gateway"]["id"] == "test-community-b01" for o in objects)


def test_status_is_coloured_on_a_terminal(site: DaemonSite) -> None:
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "status"], stdout=terminal,
                                stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if k != "NO_COLOR"})
        os.close(terminal)
        output = _read_all(controller, proc)
    finally:
        os.close(controller)
    assert proc.returncode == EXIT_OK
    assert "\033[32mALL CLEAR" in output  # green headline


def _read_all(fd: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    return b"".join(chunks).decode(errors="replace")


def test_events_json_with_filters(site: DaemonSite) -> None:
    device = site.device_ids[0]
    rows = site.ctl_json("events", "--kind", "telemetry", "--device", device, "--limit", "2")["data"]["events"]
    assert 1 <= len(rows) <= 2 and all(r["kind"] == "telemetry" and r["device"] == device for r in rows)
    assert all(r["event_id"].startswith("test-community-b01:") for r in rows)
    household = site.spec.detectors[1].household
    by_household = site.ctl_json("events", "--household", household, "--since", "1h")["data"]["events"]
    assert by_household and {r["household"] for r in by_household} == {household}
    future = site.ctl_json("events", "--since", "2099-01-01T00:00")["data"]["events"]
    assert future == []
    text = site.ctl("events", "--limit", "5")
    assert text.returncode == EXIT_OK and text.stdout.startswith("TIME") and "telemetry" in text.stdout
    unknown = site.ctl("events", "--device", "gas-nowhere")
    assert unknown.returncode == EXIT_REJECTED and "unknown device 'gas-nowhere'" in unknown.stderr


def test_follow_sees_a_new_alarm(site: DaemonSite) -> None:
    device = site.device_ids[1]
    # Ctrl-C as at a terminal: a suite started in the background by a shell inherits SIGINT ignored (POSIX),
    # and Python then leaves it ignored in every child
    follower = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "events", "--follow", "--json",
                                 "--kind", "alarm", "--limit", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[dict[str, Any]] = []
    signals: list[str] = []

    def reader() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.append(json.loads(line))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        site.detectors[1].set_concentration(30.0)
        wait_until(lambda: any(e["device"] == device and e["action"] == "raised" for e in lines), timeout=30,
                   message=lambda: f"follower saw {lines}")
        raised = next(e for e in lines if e["device"] == device and e["action"] == "raised")
        assert raised["kind"] == "alarm" and raised["level"] == "high" and raised["value"] == 30.0
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            code: int | None = follower.wait(timeout=60)
        except subprocess.TimeoutExpired:  # reported below, after the alarm is reset for the tests that follow
            signals = [line for line in Path(f"/proc/{follower.pid}/status").read_text().splitlines()
                       if line.startswith(("State", "Sig"))]
            follower.kill()
            follower.wait()
            code = None
        site.detectors[1].set_concentration(0.0)
        wait_until(lambda: not site.device_state(device)["condition_present"], timeout=30)
        assert site.ctl("reset", "--all").returncode == EXIT_OK
    assert code == EXIT_OK, f"gatewayctl events --follow did not end within 60 s of SIGINT: {signals}"


def test_follow_in_text_has_a_header_and_aligned_columns(site: DaemonSite) -> None:
    follower = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "events", "-f", "--kind", "telemetry",
                                 "--limit", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)
    try:
        assert follower.stdout is not None
        lines = [follower.stdout.readline().rstrip("\n") for _ in range(4)]
    finally:
        os.killpg(follower.pid, signal.SIGINT)
        follower.wait(timeout=30)
    assert lines[0].split() == ["TIME", "KIND", "ACTION", "DEVICE", "WHERE", "LEVEL/CODE", "VALUE", "SENT", "SOURCE",
                                "/", "DETAIL"]
    for name in ("KIND", "ACTION", "DEVICE", "VALUE"):
        column = lines[0].index(name)
        assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines[1:]), (name, lines)
    assert all(dt_has_offset(line.split()[0]) for line in lines[1:]), lines


def dt_has_offset(text: str) -> bool:
    import datetime as dt

    return dt.datetime.fromisoformat(text).utcoffset() is not None


def test_silence_reset_and_walk_test(site: DaemonSite) -> None:
    device = site.device_ids[0]
    site.detectors[0].set_concentration(30.0)
    wait_until(lambda: site.status()["annunciator"]["sound"] == "gas", timeout=30)
    silenced = site.ctl_json("silence")
    assert silenced["data"] == {"sound": "quiet"}
    still = site.ctl("reset", device)
    assert still.returncode == EXIT_REJECTED and "still present" in still.stderr
    site.detectors[0].set_concentration(0.0)
    wait_until(lambda: not site.device_state(device)["condition_present"], timeout=30)
    assert site.device_state(device)["latched"] == "high"
    reset = site.ctl_json("reset", device)
    assert reset["data"] == {"reset": [device], "still_active": [], "tests_ended": []}
    assert site.device_state(device)["state"] == "normal"
    walk = site.ctl_json("test", device)
    assert walk["data"] == {"started": [device], "skipped": []}
    assert site.device_state(device)["state"] == "test"
    everything = site.ctl("test", "--all")
    assert everything.returncode == EXIT_OK and "walk test started for 3 device(s)" in everything.stdout
    assert site.ctl_json("reset", "--all")["ok"] is True  # ends the walk tests
    assert site.device_state(device)["state"] == "normal"
    unknown = site.ctl("test", "gas-nowhere", "--json")
    assert unknown.returncode == EXIT_REJECTED
    assert json.loads(unknown.stdout) == {"ok": False, "reason": "test: device: unknown device 'gas-nowhere'",
                                          "data": {}, "daemon": "running"}
    sources = {e["source"] for e in site.ctl_json("events", "--kind", "silence")["data"]["events"]}
    assert sources == {f"cli:uid={os.getuid()}"}


def test_read_fresh_value_raw_registers_and_failures(site: DaemonSite) -> None:
    det = site.detectors[1]
    det.set_concentration(4.2)
    try:
        data = site.ctl_json("read", site.device_ids[1], "--raw")["data"]
        assert data["value"] == 4.2 and data["status"] == ["normal"] and data["address"] == det.slave
        assert data["raw"] == {"function": 3, "start": 0, "registers": det.registers()}
        text = site.ctl("read", site.device_ids[1], "--raw")
        assert text.returncode == EXIT_OK and "4.2 %LEL" in text.stdout
        assert "panel: normal (alarm at" in text.stdout and "own status word: normal" in text.stdout
        assert "42  0x002A" in text.stdout
    finally:
        det.set_concentration(0.0)
    contact = site.ctl_json("read", DOOR_ID)["data"]
    assert contact["kind"] == "cabinet_door" and contact["active"] is False
    assert site.ctl("read", "gas-nowhere").returncode == EXIT_REJECTED
    site.bus.responding(det.slave, False)
    try:
        silent = site.ctl("read", site.device_ids[1])
    finally:
        site.bus.responding(det.slave, True)
    assert silent.returncode == EXIT_ERROR and "no valid answer" in silent.stderr


def test_scan_refused_while_polling_then_finds_responders(site: DaemonSite) -> None:
    refused = site.ctl("scan", "bus1", "--from", "1", "--to", "7")
    assert refused.returncode == EXIT_REJECTED and "--pause-polling" in refused.stderr
    data = site.ctl_json("scan", "bus1", "--from", "1", "--to", "7", "--pause-polling")["data"]
    found = {r["address"]: (r["profile"], r["configured_as"]) for r in data["responders"]}
    assert found == {1: ("A", site.device_ids[0]), 2: ("A", site.device_ids[1]), 5: ("B", None),
                     6: ("io-station", None)}
    assert site.status()["buses"][0]["paused"] is False
    text = site.ctl("scan", "bus1", "--from", "4", "--to", "6", "--pause-polling")
    assert text.returncode == EXIT_OK and "2 responding address(es) in 4–6" in text.stdout
    assert "[" not in text.stderr  # no progress bar when stderr is not a terminal
    assert site.ctl("scan", "bus9", "--pause-polling").returncode == EXIT_REJECTED


def _log_errors(site: DaemonSite, offset: int) -> list[str]:
    """Error lines the daemon logged after byte ``offset`` of its log (structlog JSON or stdlib logging)."""
    with (site.directory / "gatewayd.log").open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if line.startswith(("ERROR", "CRITICAL", "Traceback")) or '"level": "error"' in line
            or '"level":"error"' in line]


def test_scans_refused_or_done_leave_no_error_in_the_daemon_log(site: DaemonSite) -> None:
    offset = (site.directory / "gatewayd.log").stat().st_size
    refused = site.ctl("scan", "bus1", "--from", "1", "--to", "2")
    assert refused.returncode == EXIT_REJECTED, refused.stderr
    done = site.ctl("scan", "bus1", "--from", "1", "--to", "2", "--pause-polling")
    assert done.returncode == EXIT_OK, done.stderr
    # one more command: a connection that failed after its scan has logged it by now
    assert site.ctl("status").returncode == EXIT_OK
    assert _log_errors(site, offset) == []


def test_scan_progress_bar_on_a_terminal(site: DaemonSite) -> None:
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen([GATEWAYCTL, "--config", str(site.config), "scan", "bus1", "--from", "1", "--to",
                                 "3", "--pause-polling"], stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        progress = _read_all(controller, proc)
    finally:
        os.close(controller)
    assert proc.returncode == EXIT_OK
    assert "scanning bus1 [" in progress and "3/3" in progress and "found 2" in progress


def test_buzzer_and_relay_tests(site: DaemonSite) -> None:
    # The daemon is shared by this module: end any walk test another test left sounding (its test tone).
    site.ctl("reset", "--all")
    site.ctl("silence")
    wait_until(lambda: site.status()["annunciator"]["sound"] == "quiet", timeout=30)
    buzzer = site.ctl_json("buzzer-test", "--seconds", "0.1")["data"]
    assert buzzer["patterns"] == ["temporal-4", "temporal-3", "supervisory", "trouble", "test"]
    relay = site.ctl_json("relay-test", RELAY_ID, "--seconds", "0.2")["data"]
    assert relay == {"output": RELAY_ID, "seconds": 0.2, "left_on_by_linkage": False}
    text = site.ctl("relay-test", RELAY_ID, "--seconds", "0.2")
    assert text.returncode == EXIT_OK and "off again" in text.stdout
    unknown = site.ctl("relay-test", "fan")
    assert unknown.returncode == EXIT_REJECTED and "unknown relay 'fan'" in unknown.stderr
    too_long = site.ctl("buzzer-test", "--seconds", "30")
    assert too_long.returncode == EXIT_REJECTED and "0.1–5" in too_long.stderr


def test_config_show_masks_secrets(site: DaemonSite) -> None:
    config = site.ctl_json("config", "show")["data"]["config"]
    assert config["mqtt"]["password"] == "********" and config["mqtt"]["username"] == "gw"
    assert config["control"]["socket"] == str(site.directory / "control.sock")
    text = site.ctl("config", "show")
    assert text.returncode == EXIT_OK and 'mqtt.password = "********"' in text.stdout
    assert PASSWORD not in text.stdout


def _without_dac_override() -> None:
    """In the child before exec: drop the capabilities that let root ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def test_permission_error_prints_a_one_line_hint(site: DaemonSite) -> None:
    socket_path = site.directory / "control.sock"
    socket_path.chmod(0)  # nobody may connect: as for a technician outside the socket's group
    try:
        result = site.ctl("status", preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    finally:
        socket_path.chmod(0o660)
    assert result.returncode == EXIT_ERROR, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    group = grp.getgrgid(socket_path.stat().st_gid).gr_name  # the group that owns the socket is named
    assert len(lines) == 1 and "permission denied" in lines[0] and f"add yourself to group {group}" in lines[0]
    assert site.ctl("status").returncode == EXIT_OK


# ------------------------------------------------------------------------------------------- export


def store_telemetry(database: Path, base: float, seconds: range) -> None:
    """One telemetry event a second (at ``base + i`` for each ``i``) appended through the outbox."""
    import asyncio

    from gateway.events import Event
    from gateway.uplink.outbox import Outbox

    async def fill() -> None:
        outbox = await Outbox.open(str(database), gateway_id="test-community-b01")
        try:
            for start in range(seconds.start, seconds.stop, 2000):
                await outbox.append([Event("telemetry", "reading", float(i), device=f"gas-{i % 7}", unit="u1",
                                           value=float(i % 50), measure="%LEL", wall=base + i)
                                     for i in range(start, min(start + 2000, seconds.stop))])
        finally:
            await outbox.close()

    asyncio.run(fill())


def test_30000_events_leave_the_box_as_csv_between_since_and_until(tmp_path: Path) -> None:
    import csv
    import datetime as dt
    import sqlite3

    database = tmp_path / "events.db"
    base = 1_796_600_000.0
    store_telemetry(database, base, range(0, 32_000))  # one event a second; the window below holds 30 000
    config = tmp_path / "site.toml"
    config.write_text(f'[storage]\npath = "{database}"\n')  # export needs only where the database is
    zone = dt.timezone(dt.timedelta(hours=8))
    since = dt.datetime.fromtimestamp(base + 1000, zone).isoformat()
    until = dt.datetime.fromtimestamp(base + 31_000, zone).isoformat()
    result = run_ctl("--config", str(config), "events", "--since", since, "--until", until, "--format", "csv")
    assert result.returncode == EXIT_OK, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    with sqlite3.connect(database) as db:
        expected = db.execute("SELECT event_id, wall FROM events WHERE wall >= ? AND wall < ? ORDER BY seq",
                              (base + 1000, base + 31_000)).fetchall()
    assert len(rows) == len(expected) == 30_000
    assert result.stderr.strip() == "gatewayctl: 30000 events"
    for row, (event_id, wall) in ((rows[0], expected[0]), (rows[-1], expected[-1])):
        assert row["event_id"] == event_id
        shown = dt.datetime.fromisoformat(row["time"])
        assert shown.utcoffset() is not None and abs(shown.timestamp() - wall) < 0.001
    assert rows[0]["device"] == "gas-6" and rows[0]["value"] == "0.0" and rows[0]["delivered"] == "no"

    jsonl = run_ctl("--config", str(config), "events", "--since", since, "--until", until, "--format", "jsonl",
                    "--kind", "telemetry", "--device", "gas-3")
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(lines) == sum(1 for i in range(1000, 31_000) if i % 7 == 3)
    assert all(item["device"] == "gas-3" and "+" in item["local_time"] for item in lines)


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_an_export_held_mid_way_does_not_stop_wal_checkpoints(tmp_path: Path, form: str) -> None:
    """``gatewayctl events --format csv | less`` left open: the export waits on its full pipe holding no read
    transaction, so the daemon's writes still checkpoint and the WAL on the SD card does not grow."""
    import sqlite3

    database = tmp_path / "events.db"
    base = 1_796_600_000.0
    store_telemetry(database, base, range(0, 30_000))  # megabytes of output: far more than a pipe holds
    config = tmp_path / "site.toml"
    config.write_text(f'[storage]\npath = "{database}"\n')
    export = subprocess.Popen([GATEWAYCTL, "--config", str(config), "events", "--format", form],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": ""})
    try:
        assert export.stdout is not None
        first = [export.stdout.readline() for _ in range(5)]  # then hold: the export blocks on the pipe
        assert all(first) and export.poll() is None
        store_telemetry(database, base, range(30_000, 32_000))  # the daemon goes on storing events
        with sqlite3.connect(database) as db:
            db.execute("PRAGMA busy_timeout = 0")
            busy, _wal_frames, _checkpointed = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        assert export.poll() is None  # still mid-way, still held
        assert os.path.getsize(f"{database}-wal") == 0  # truncated: the WAL does not grow behind the reader
    finally:
        export.kill()
        export.communicate(timeout=30)


# ------------------------------------------------------------------------------------------- daemon down


def test_a_killed_daemon_s_latch_and_relays_show_from_its_state_file(tmp_path: Path) -> None:
    with daemon_site(tmp_path, valve_on_gas=True) as down:
        device = down.device_ids[0]
        down.detectors[0].set_concentration(30.0)
        wait_until(lambda: down.device_state(device)["latched"] == "high", timeout=30)
        wait_until(lambda: down.status()["annunciator"]["relays"][RELAY_ID], timeout=30)
        relays = {k for k, on in down.status()["annunciator"]["relays"].items() if on}
        assert relays == {RELAY_ID}  # the gas valve, closed by the high gas alarm
        assert down.daemon is not None
        down.daemon.kill()  # kill -9: no planned stop, the state file is what the panel last saved
        down.daemon.wait(timeout=30)
        down.daemon = None

        status = down.ctl("status")
        assert status.returncode == EXIT_UNAVAILABLE, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith("DAEMON DOWN: the daemon is not running")
        assert lines[1].startswith("ALARM  test-community-b01  3 devices: 1 alarm, ")
        assert device in lines[2] and "high gas alarm" in lines[2] and "saved latch" in lines[2]
        relay_line = next(line for line in lines if line.startswith("Relays"))
        assert all(relay in relay_line for relay in relays) and "saved state" in relay_line
        row = next(line for line in lines if line.strip().startswith(device))
        assert "high_alarm" in row
        data = down.ctl_json("status", expect=EXIT_UNAVAILABLE)["data"]
        assert [(c["subject"], c["level"], c["note"]) for c in data["active"]] == [(device, "high", "saved latch")]
        assert set(data["saved_state"]["relays"]) == relays


def test_daemon_down_status_and_events_read_the_database_others_exit_3(tmp_path: Path) -> None:
    with daemon_site(tmp_path) as down:
        down.detectors[0].set_concentration(30.0)
        wait_until(lambda: any(e["kind"] == "alarm" for e in down.ctl_json("events")["data"]["events"]), timeout=30)
        assert down.stop_daemon() == 0
        assert not (tmp_path / "control.sock").exists()

        status = down.ctl("status")
        assert status.returncode == EXIT_UNAVAILABLE
        assert status.stdout.startswith("DAEMON DOWN: the daemon is not running")
        assert down.device_ids[0] in status.stdout and "read-only" in status.stdout
        data = down.ctl_json("status", expect=EXIT_UNAVAILABLE)
        assert data["daemon"] == "down" and data["data"]["gateway"]["id"] == "test-community-b01"
        offline_rows = {d["device"]: d for d in data["data"]["devices"]}
        assert set(offline_rows) == {*down.device_ids, DOOR_ID}
        assert offline_rows[down.device_ids[0]]["kind"] == "gas_detector"
        assert offline_rows[DOOR_ID]["state"] == "no stored event"

        events = down.ctl_json("events", "--kind", "alarm", expect=EXIT_UNAVAILABLE)
        assert events["daemon"] == "down"
        assert [(e["device"], e["action"]) for e in events["data"]["events"]] == [(down.device_ids[0], "raised")]
        text = down.ctl("events")
        assert text.returncode == EXIT_UNAVAILABLE and "DAEMON DOWN" in text.stdout and "alarm" in text.stdout
        follow = down.ctl("events", "--follow")
        assert follow.returncode == EXIT_UNAVAILABLE and "cannot follow" in follow.stderr

        for args in (["silence"], ["reset", "--all"], ["test", "--all"], ["buzzer-test"],
                     ["relay-test", RELAY_ID], ["read", down.device_ids[0]], ["scan", "bus1", "--pause-polling"],
                     ["config", "show"]):
            result = down.ctl(*args)
            assert result.returncode == EXIT_UNAVAILABLE, (args, result.stderr)
            assert "the daemon is not running" in result.stderr
        database_untouched = (tmp_path / "events.db").stat().st_mtime
        down.ctl("status")
        assert (tmp_path / "events.db").stat().st_mtime == database_untouched

        missing = tmp_path / "elsewhere.toml"
        missing.write_text(down.config.read_text().replace(str(tmp_path / "events.db"), str(tmp_path / "no.db")))
        nothing = run_ctl("--config", str(missing), "status")
        assert nothing.returncode == EXIT_UNAVAILABLE and "no database at" in nothing.stderr
        assert run_ctl("--config", str(tmp_path / "absent.toml"), "status").returncode == EXIT_ERROR

        # after a crash: the socket file is left behind, the database has its WAL files
        down.detectors[0].set_concentration(0.0)
        down.start_daemon()
        assert down.daemon is not None
        down.daemon.kill()
        down.daemon.wait(timeout=30)
        down.daemon = None
        assert (tmp_path / "control.sock").exists()
        crashed = down.ctl_json("events", "--kind", "alarm", expect=EXIT_UNAVAILABLE)
        # the latch came back with the restart (restored), then its gas was found gone (cleared)
        assert crashed["daemon"] == "down"
        assert [e["action"] for e in crashed["data"]["events"]] == ["raised", "restored", "cleared"]
        assert down.ctl("silence").returncode == EXIT_UNAVAILABLE
        after_crash = down.ctl_json("status", expect=EXIT_UNAVAILABLE)["data"]
        assert after_crash["gateway"]["session"] == 2
