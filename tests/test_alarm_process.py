"""The alarm path in a process of its own (``runtime.alarm_process``): gateway/alarm_link.py.

Two halves:

* ``gatewayd`` as a real subprocess with ``alarm_process = true`` (``GPIOZERO_PIN_FACTORY=mock``): it forks the
  alarm process, which owns the pins and the bus; the detector is pymodbus's RTU server on a virtual null modem
  in this process, the broker a private mosquitto, the operator ``gatewayctl`` as a subprocess. Alarms, operator
  commands and bus requests cross the link; killing either process ends the other; a hung bus thread in the
  child stops the systemd watchdog feed by name.
* :class:`AlarmHost` and :class:`AlarmLink` in this process on a socket pair (MockFactory pins, the same
  simulated bus): ordering, errors carried back as themselves, contact edges, heartbeat mirroring, a lost link.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import CommError, GasDetector, ModbusClient
from drivers.profiles import GasReading
from drivers.simulated import SimulatedBus, SimulatedGasDetector, VirtualNullModem
from gateway.alarm_link import (
    PART,
    SUPPORT_PRIORITY,
    AlarmHost,
    AlarmLink,
    AlarmLinkError,
    RemoteAnnunciator,
    RemoteBus,
    RemoteContact,
    RemotePanel,
)
from gateway.config import SiteConfig, load_config
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.panel.annunciator import PATTERNS
from gateway.panel.core import Annunciation, ResetResult, Sound
from gateway.panel.side import bus_drivers
from tests.support.broker import MosquittoBroker
from tests.support.building import simulated_detectors
from tests.support.mqtt import RecordedMessage
from tests.support.notify import NotifyListener
from tests.support.site import ContactSpec, SiteSpec, build_site
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 4
GATEWAYD = [sys.executable, "-m", "gateway.daemon"]
GATEWAYCTL = [sys.executable, "-m", "gateway.ops.cli"]
DOOR_ID, DOOR_PIN = "u1-cabinet-door", 13
RELAY_ID, RELAY_PIN = "u1-gas-valve", 12
HIGH = 30.0  # %LEL, above the default high threshold (25 %LEL)
LOST_LINE = "alarm process lost; the daemon stops so that it is restarted"
CHILD_EOF_LINE = "alarm link closed by the daemon; the alarm process stops"


# ------------------------------------------------------------------------------------------- process helpers


def _proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict ({} when there is no such process)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (neither gone nor a zombie)."""
    state = _proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` has ended (a pidfd turns readable then, child of ours or not)."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This process adopts the orphans of its children for the test (instead of PID 1).

    An alarm process its daemon did not reap stays visible as a zombie whose parent is this process, whatever
    PID 1 does; and the exit status of an alarm process that outlived its daemon can be read with waitpid.
    """
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


@dataclass
class AlarmDaemon:
    """A ``gatewayd`` subprocess in alarm-process mode, its simulated bus and its log (daemon and child)."""

    directory: Path
    config: Path
    spec: SiteSpec
    bus: SimulatedBus
    detectors: list[SimulatedGasDetector]
    proc: subprocess.Popen[bytes]
    child_pids: set[int] = field(default_factory=set)

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.spec.detectors]

    def log_text(self) -> str:
        path = self.directory / "gatewayd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        records = _json_lines(self.log_text())
        return records if event is None else [r for r in records if r.get("event") == event]

    def tail(self, lines: int = 40) -> str:
        return "gatewayd log tail:\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def alarm_pid(self) -> int:
        """The pid the alarm process logged at start-up."""
        started = wait_until(lambda: self.records("alarm process started"), timeout=60, message=self.tail)
        assert len(started) == 1, started
        pid = int(started[0]["pid"])
        self.child_pids.add(pid)
        return pid

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GATEWAYCTL, "--config", str(self.config), *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "NO_COLOR": ""})

    def ctl_json(self, *args: str, expect: int = EXIT_OK) -> dict[str, Any]:
        result = self.ctl(*args, "--json")
        assert result.returncode == expect, (args, result.returncode, result.stdout, result.stderr, self.tail())
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.ctl_json("status")["data"]
        return data

    def device_state(self, device: str) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["device"] == device)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.tail()
        result = self.ctl("status", "--json", timeout=30)
        if result.returncode != EXIT_OK:
            return False
        return all(d["state"] == "normal" for d in json.loads(result.stdout)["data"]["devices"])


def _site_toml(spec: SiteSpec) -> str:
    """The generated site plus a relay output (for relay-test through the link)."""
    relay = f'\n[[outputs.relays]]\nid = "{RELAY_ID}"\npin = {RELAY_PIN}\n'
    toml = spec.toml.replace("\n[alarm]", relay + "\n[alarm]", 1)
    assert toml != spec.toml
    return toml


@contextlib.contextmanager
def alarm_daemon(directory: Path, broker: MosquittoBroker, *, env: dict[str, str] | None = None,
                 wait_healthy: bool = True, realtime_priority: int = 0) -> Iterator[AlarmDaemon]:
    """A running ``gatewayd`` with ``alarm_process = true`` on two simulated detectors, a door contact and a relay.

    At the end: SIGTERM (then SIGKILL) for a daemon still running, and SIGKILL for an alarm process this
    daemon started that is still alive (so a failing test leaves no process behind).
    """
    with VirtualNullModem(directory) as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=directory / "events.db", broker_port=broker.port,
                          socket_path=directory / "control.sock", households=2,
                          contacts=[ContactSpec(DOOR_ID, "cabinet_door", DOOR_PIN)],
                          realtime_priority=realtime_priority)
        config = directory / "site.toml"
        config.write_text(_site_toml(spec), encoding="utf-8")
        bus = SimulatedBus(modem.device_port)
        detectors = [bus.add_gas_detector(d.address, "A") for d in spec.detectors]
        with bus:
            with (directory / "gatewayd.log").open("ab") as log:
                proc = subprocess.Popen([*GATEWAYD, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "GPIOZERO_PIN_FACTORY": "mock", **(env or {})})
            daemon = AlarmDaemon(directory, config, spec, bus, detectors, proc)
            try:
                if wait_healthy:
                    wait_until(daemon.healthy, timeout=60, interval=0.2, message=daemon.tail)
                yield daemon
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
                for record in daemon.records("alarm process started"):
                    daemon.child_pids.add(int(record["pid"]))
                for pid in daemon.child_pids:
                    if _running(pid) and "gateway.daemon" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):  # adopted by this process (subreaper)
                        os.waitpid(pid, 0)


def alarm_raised(device_id: str) -> Any:
    def match(m: RecordedMessage) -> bool:
        body = m.json
        return (m.topic.endswith("/event/alarm") and isinstance(body, dict) and body.get("device") == device_id
                and body.get("action") == "raised")

    return match


# ------------------------------------------------------------------------------------------- gatewayd subprocess


def test_alarm_and_operator_commands_cross_the_link(tmp_path: Path, broker: MosquittoBroker,
                                                    mqtt_recorder_factory: Any) -> None:
    recorder = None
    with alarm_daemon(tmp_path, broker) as gw:
        # Two processes: the alarm process is a child of the daemon, with its own pid.
        child = gw.alarm_pid()
        assert child != gw.proc.pid
        child_status = _proc_status(child)
        assert child_status.get("PPid") == str(gw.proc.pid), child_status
        assert child_status.get("Name") == "gatewayd-alarm", child_status  # as ps and top show it
        assert _running(child)
        assert [r["pid"] for r in gw.records("alarm path runs in its own process")] == [child]
        started = gw.records("alarm process started")[0]
        assert (started["buses"], started["contacts"]) == (1, 1)
        gateway_status = gw.status()["gateway"]
        assert gateway_status["pid"] == gw.proc.pid  # gatewayctl talks to the daemon, not the child
        assert gateway_status["alarm_pid"] == child  # and says where the alarm path runs

        spec = gw.spec
        leak, quiet = spec.detectors
        recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/#")

        # A detector alarm: read by the child's bus thread, sounded there, reported to the daemon.
        gw.detectors[0].set_concentration(HIGH)
        wait_until(lambda: gw.status()["annunciator"]["sound"] == "gas", timeout=30, message=gw.tail)
        status = gw.status()
        assert status["annunciator"]["pattern"] == PATTERNS[Sound.GAS].name == "temporal-4"
        assert "alarm" in status["annunciator"]["leds"]
        rows = {d["device"]: d for d in status["devices"]}
        assert rows[leak.id]["state"] == "high_alarm" and rows[leak.id]["value"] == HIGH
        assert rows[quiet.id]["state"] == "normal"
        active = [(a["subject"], a["category"], a["level"], a["silenced"]) for a in status["active"]]
        assert active == [(leak.id, "alarm", "high", False)], status["active"]

        message = recorder.wait_for(alarm_raised(leak.id), 30.0)
        body = message.json
        assert (body["kind"], body["level"], body["value"]) == ("alarm", "high", HIGH)
        assert (body["household"], body["unit"]) == (leak.household, leak.unit)
        stored = gw.ctl_json("events", "--kind", "alarm")["data"]["events"]
        assert [(e["device"], e["action"], e["event_id"]) for e in stored] == [(leak.id, "raised", body["event_id"])]
        logged = [r for r in gw.records("event stored") if r.get("kind") == "alarm"]
        assert [r["event_id"] for r in logged] == [body["event_id"]]

        # silence, then a reset refused while the gas is there (a ResetResult comes back over the link)
        assert gw.ctl_json("silence")["data"] == {"sound": "quiet"}
        assert gw.status()["annunciator"]["sound"] == "quiet"
        still = gw.ctl("reset", leak.id)
        assert still.returncode == EXIT_REJECTED and "still present" in still.stderr, still.stderr
        gw.detectors[0].set_concentration(0.0)
        wait_until(lambda: not gw.device_state(leak.id)["condition_present"], timeout=30, message=gw.tail)
        assert gw.device_state(leak.id)["latched"] == "high"
        assert gw.ctl_json("reset", leak.id)["data"] == {"reset": [leak.id], "still_active": []}
        assert gw.device_state(leak.id)["state"] == "normal"

        # outputs in the child: a pattern object and a relay switched over the link
        buzzer = gw.ctl_json("buzzer-test", "--seconds", "0.1")["data"]
        assert buzzer["patterns"] == ["temporal-4", "temporal-3", "supervisory", "trouble", "test"]
        relay = gw.ctl_json("relay-test", RELAY_ID, "--seconds", "0.2")["data"]
        assert relay == {"output": RELAY_ID, "seconds": 0.2, "left_on_by_linkage": False}
        assert gw.status()["annunciator"]["relays"] == {RELAY_ID: False}

        # walk tests, one device and all
        assert gw.ctl_json("test", quiet.id)["data"]["devices"] == [quiet.id]
        assert gw.device_state(quiet.id)["state"] == "test"
        everything = gw.ctl("test", "--all")
        assert everything.returncode == EXIT_OK and "walk test started for 3 device(s)" in everything.stdout
        assert {d["state"] for d in gw.status()["devices"]} == {"test"}
        assert gw.ctl_json("reset", "--all")["ok"] is True
        assert {d["state"] for d in gw.status()["devices"]} == {"normal"}

        # an unknown device is refused with a reason; nothing changes
        unknown = gw.ctl("reset", "gas-nowhere", "--json")
        assert unknown.returncode == EXIT_REJECTED
        assert json.loads(unknown.stdout) == {"ok": False, "reason": "reset: device: unknown device 'gas-nowhere'",
                                              "data": {}, "daemon": "running"}

        # read: the driver's poll method is pickled to the child's bus thread, the reading pickled back
        gw.detectors[1].set_concentration(4.2)
        read = gw.ctl_json("read", quiet.id, "--raw")["data"]
        assert (read["device"], read["bus"], read["address"]) == (quiet.id, "bus1", quiet.address)
        assert read["value"] == 4.2 and read["status"] == ["normal"]
        assert read["raw"] == {"function": 3, "start": 0, "registers": gw.detectors[1].registers()}
        gw.detectors[1].set_concentration(0.0)
        door = gw.ctl_json("read", DOOR_ID)["data"]
        assert (door["kind"], door["closed"], door["active"], door["plausible"]) == ("cabinet_door", False, False, True)
        # a device that does not answer: the CommError raised on the child's bus thread comes back as one
        gw.bus.responding(quiet.address, False)
        try:
            silent = gw.ctl("read", quiet.id)
        finally:
            gw.bus.responding(quiet.address, True)
        assert silent.returncode == EXIT_ERROR, (silent.stdout, silent.stderr)
        assert f"read: {quiet.id} at address {quiet.address} on bus1: no valid answer (timeout" in silent.stderr

        # scan pauses the child's poller over the link and probes through it
        scan = gw.ctl_json("scan", "bus1", "--from", "1", "--to", "3", "--pause-polling")["data"]
        assert {r["address"]: r["configured_as"] for r in scan["responders"]} == {1: leak.id, 2: quiet.id}
        assert scan["paused_polling"] is True and gw.status()["buses"][0]["paused"] is False

        sources = {e["source"] for e in gw.ctl_json("events", "--kind", "silence")["data"]["events"]}
        assert sources == {f"cli:uid={os.getuid()}"}
        assert gw.proc.poll() is None and _running(child)
        assert not gw.records("alarm link: request failed") and not gw.records("command failed"), gw.tail()


def test_sigterm_stops_both_processes(tmp_path: Path, broker: MosquittoBroker, subreaper: None) -> None:
    with alarm_daemon(tmp_path, broker) as gw:
        child = gw.alarm_pid()
        pidfd = os.pidfd_open(child)
        try:
            assert not _exited(pidfd, 0)
            gw.proc.send_signal(signal.SIGTERM)
            code = gw.proc.wait(timeout=60)
            # the daemon waited for its alarm process: it had ended before the daemon did
            assert _exited(pidfd, 0), _proc_status(child)
        finally:
            os.close(pidfd)
        assert code == 0, gw.tail()
        assert _proc_status(child) == {}, "the daemon did not reap its alarm process"  # else: our zombie now
        assert gw.records("gateway stopped")
        assert not gw.records("alarm process did not exit; killing it"), gw.tail()
        assert not gw.records(LOST_LINE), gw.tail()


def test_alarm_process_killed_daemon_exits_1(tmp_path: Path, broker: MosquittoBroker, subreaper: None) -> None:
    with alarm_daemon(tmp_path, broker) as gw:
        child = gw.alarm_pid()
        os.kill(child, signal.SIGKILL)
        code = gw.proc.wait(timeout=60)
        assert code == 1, gw.tail()
        lost = gw.records(LOST_LINE)
        assert len(lost) == 1, gw.tail()
        assert lost[0]["level"] == "critical" and lost[0]["reason"] == "the alarm process closed the link"
        assert gw.records("gateway stopped"), gw.tail()  # an orderly stop of the daemon's half
        assert _proc_status(child) == {}, "the daemon did not reap its killed alarm process"


def test_daemon_killed_alarm_process_exits_by_itself(tmp_path: Path, broker: MosquittoBroker,
                                                     subreaper: None) -> None:
    with alarm_daemon(tmp_path, broker) as gw:
        child = gw.alarm_pid()
        pidfd = os.pidfd_open(child)
        try:
            gw.proc.kill()
            gw.proc.wait(timeout=30)
            assert _exited(pidfd, 60), f"the alarm process outlived its daemon: {_proc_status(child)}"
        finally:
            os.close(pidfd)
        assert _proc_status(child).get("PPid") == str(os.getpid())  # an orphan, adopted here
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, gw.tail()  # it stopped on its own, not by a signal
        assert gw.records(CHILD_EOF_LINE), gw.tail()


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


def test_alarm_process_threads_all_run_realtime_and_the_daemon_none(tmp_path: Path, broker: MosquittoBroker,
                                                                   subreaper: None) -> None:
    """With realtime alarm threads, none of the alarm process's threads can be preempted by a normal process
    while it holds the interpreter lock they need; the daemon's loop and I/O threads stay normal."""
    if not _realtime_permitted():
        pytest.skip("SCHED_FIFO is not permitted here")
    priority = 20
    with alarm_daemon(tmp_path, broker, realtime_priority=priority) as gw:
        child = gw.alarm_pid()
        # the bus thread and the annunciator raise themselves once running; every other thread is at the floor
        wait_until(lambda: sum(prio == priority for _, prio in _thread_scheduling(child).values()) >= 2,
                   timeout=60, message=lambda: f"{_thread_scheduling(child)}\n{gw.tail()}")
        threads = _thread_scheduling(child)
        assert len(threads) >= 4, threads  # main (requests), link writer, self-check, bus, annunciator
        assert all(policy == os.SCHED_FIFO for policy, _ in threads.values()), threads
        assert {prio for _, prio in threads.values()} == {SUPPORT_PRIORITY, priority}, threads
        daemon = _thread_scheduling(gw.proc.pid)
        assert all(policy == os.SCHED_OTHER for policy, _ in daemon.values()), daemon
        assert not gw.records("realtime scheduling not permitted; running with normal priority"), gw.tail()


@pytest.mark.slow
def test_watchdog_names_a_stale_bus_of_the_alarm_process(tmp_path: Path, broker: MosquittoBroker,
                                                         listener: NotifyListener, subreaper: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hang = tmp_path / "hang-bus1"
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000",
           "GATEWAY_FAILPOINTS": f"bus_hang=bus1@{hang}"}
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with alarm_daemon(tmp_path, broker, env=env, wait_healthy=False) as gw:
        child = gw.alarm_pid()
        after = listener.expect_stale_part("bus:bus1", hang, context=gw.tail)  # a bus thread of the alarm process
        # the part is named, not the link: the alarm process is alive and still reporting
        stale_names = after[0]["STATUS"].split("|")[0].removeprefix("stale:").strip().split(", ")
        assert "bus:bus1" in stale_names and PART not in stale_names, after[0]
        assert gw.proc.poll() is None and _running(child)

        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(timeout=60)
        assert code == 0, gw.tail()
        assert listener.index_of("STOPPING") is not None
        assert _proc_status(child) == {}, "the daemon did not reap its alarm process"


# ------------------------------------------------------------------------------------------- link in-process

RELAY_CONTACT = ContactSpec("u1-gas-relay", "gas_relay", 5, household="u1-h001")
_gate = threading.Event()  # the bus thread waits on it in _hold_the_bus (host and test share this process)


def _hold_the_bus(client: ModbusClient) -> str:
    """Work for the bus thread that takes until the test releases it."""
    _gate.wait(timeout=60)
    return "released"


def _bad_frame(client: ModbusClient) -> None:
    raise CommError("bad_response", "crc mismatch at byte 7")


class StubbornError(Exception):
    """An exception that pickles but cannot be unpickled (its constructor wants two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def _stubborn(client: ModbusClient) -> None:
    raise StubbornError("left", "right")


@dataclass
class LinkRig:
    """An AlarmHost served on a thread and the AlarmLink on the other end of a socket pair."""

    cfg: SiteConfig
    spec: SiteSpec
    link: AlarmLink
    host: AlarmHost
    heartbeats: Heartbeats
    sims: dict[str, SimulatedGasDetector]
    bus: SimulatedBus
    host_end: socket.socket  # a second descriptor of the host's end, to cut the link as a dying process does
    events: list[Event] = field(default_factory=list)
    annunciations: list[Annunciation] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    @property
    def panel(self) -> RemotePanel:
        return RemotePanel(self.link)

    def state(self, device: str) -> str:
        return next(str(d["state"]) for d in self.panel.snapshot()["devices"] if d["device"] == device)

    def seen(self, kind: str, action: str, device: str | None = None) -> list[Event]:
        return [e for e in list(self.events) if (e.kind, e.action) == (kind, action)
                and (device is None or e.device == device)]


@pytest.fixture
def rig(tmp_path: Path, mock_pins: Any) -> Iterator[LinkRig]:
    _gate.clear()
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=1,
                          socket_path=tmp_path / "control.sock", households=2, contacts=[RELAY_CONTACT])
        cfg = load_config(spec.write(tmp_path / "site.toml"))
        with simulated_detectors(modem.device_port, spec.detectors) as (bus, sims):
            daemon_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            spare = host_end.dup()
            host = AlarmHost(cfg, host_end)

            def run_host() -> None:
                try:
                    host.start()
                except Exception:
                    host.close()
                    return
                host.serve()

            heartbeats = Heartbeats()
            events: list[Event] = []
            annunciations: list[Annunciation] = []
            lost: list[str] = []
            link = AlarmLink(daemon_end, heartbeats=heartbeats, on_event=events.append,
                             on_annunciation=annunciations.append, on_lost=lost.append)
            rig = LinkRig(cfg, spec, link, host, heartbeats, sims, bus, spare, events, annunciations, lost)
            thread = threading.Thread(target=run_host, name="alarm-host", daemon=True)
            thread.start()
            try:
                assert rig.link.start(timeout_s=30) == os.getpid()
                wait_until(lambda: all(rig.state(d.id) == "normal" for d in spec.detectors), timeout=30,
                           message=lambda: f"detectors not normal: {rig.panel.snapshot()['devices']}")
                yield rig
            finally:
                _gate.set()
                spare.close()  # only the host's own descriptor is left: its close ends the link
                rig.link.stop(timeout_s=15)
                thread.join(timeout=30)
                assert not thread.is_alive(), "the alarm host did not stop"


def test_link_snapshot_commands_and_events_in_order(rig: LinkRig) -> None:
    panel = rig.panel
    snap = panel.snapshot()
    assert [d["device"] for d in snap["devices"]] == [d.id for d in rig.cfg.devices]
    assert [d.id for d in rig.cfg.devices] == [*(d.id for d in rig.spec.detectors), RELAY_CONTACT.id]
    assert snap["annunciation"] == Annunciation() and snap["active"] == []

    # A gas alarm read by the host's bus thread arrives as an event and an annunciation.
    leak, quiet = rig.spec.detectors
    rig.sims[leak.id].set_concentration(HIGH)
    raised = wait_until(lambda: rig.seen("alarm", "raised", leak.id), timeout=30)
    assert raised[0].value == HIGH and raised[0].household == leak.household
    wait_until(lambda: any(a.sound == Sound.GAS for a in rig.annunciations), timeout=10)
    annunciator = RemoteAnnunciator(rig.link)
    assert annunciator.current.sound == Sound.GAS and annunciator.sound_pattern == "temporal-4"
    panel.silence("op-silence")
    assert annunciator.current.sound == Sound.QUIET
    refused = panel.reset(leak.id, "op-early")
    assert refused == ResetResult(reset=(), still_active=(leak.id,))
    rig.sims[leak.id].set_concentration(0.0)
    wait_until(lambda: rig.seen("alarm", "cleared", leak.id), timeout=30)
    assert panel.reset(leak.id, "op-reset") == ResetResult(reset=(leak.id,), still_active=())

    # A burst of operator actions sent without waiting (so the host batches their events), while the bus
    # thread keeps reporting: the events come in the order made.
    sources = [f"op-{n}" for n in range(40)]
    for n, source in enumerate(sources):
        rig.link.cast("panel", "test" if n % 2 == 0 else "reset", quiet.id, source)
    wait_until(lambda: any(e.source == sources[-1] for e in list(rig.events)), timeout=10)
    made = [(e.kind, e.action, e.source) for e in list(rig.events) if e.kind != "telemetry"]
    assert made[:5] == [("alarm", "raised", None), ("silence", "silenced", "op-silence"),
                        ("reset", "refused", "op-early"), ("alarm", "cleared", None),
                        ("reset", "reset", "op-reset")], made
    assert [source for _, _, source in made[5:]] == sources, made
    assert [action for _, action, _ in made[5:]] == ["started", "ended"] * 20, made
    assert {kind for kind, _, _ in made[5:]} == {"test"}
    monos = [e.mono for e in list(rig.events)]
    assert monos == sorted(monos)


def test_link_unknown_device_and_private_names_rejected(rig: LinkRig) -> None:
    panel = rig.panel
    with pytest.raises(KeyError, match="nope"):
        panel.reset("nope", "cli")
    with pytest.raises(KeyError, match="nope"):
        panel.test("nope", "cli")
    with pytest.raises(AttributeError, match="not offered over the alarm link"):
        rig.link.call("panel", "_apply")
    with pytest.raises(KeyError, match="no 'pump:1' in the alarm process"):
        rig.link.get("pump:1", "state")
    with pytest.raises(KeyError):
        rig.link.submit("bus9", _bad_frame).result(timeout=10)
    # the link is still good after the refusals
    assert len(panel.snapshot()["devices"]) == len(rig.cfg.devices)
    assert rig.lost == []


def test_link_contact_edge_reaches_on_event(rig: LinkRig, mock_pins: Any) -> None:
    contact = RemoteContact(rig.link, RELAY_CONTACT.id, "NO")
    assert (contact.is_closed, contact.is_active, contact.is_plausible) == (False, False, True)
    mock_pins.pin(f"GPIO{RELAY_CONTACT.pin}").drive_low()  # the detector's alarm relay closes
    raised = wait_until(lambda: rig.seen("alarm", "raised", RELAY_CONTACT.id), timeout=10,
                        message=lambda: f"no alarm from the contact; events {rig.events}")
    assert raised[0].level == "high" and raised[0].household == RELAY_CONTACT.household
    assert (contact.is_closed, contact.is_active) == (True, True)
    assert rig.state(RELAY_CONTACT.id) == "high_alarm"
    wait_until(lambda: RemoteAnnunciator(rig.link).current.sound == Sound.GAS, timeout=10)
    mock_pins.pin(f"GPIO{RELAY_CONTACT.pin}").drive_high()
    wait_until(lambda: rig.seen("alarm", "cleared", RELAY_CONTACT.id), timeout=10)
    assert (contact.is_closed, contact.is_active) == (False, False)


def test_link_bus_errors_come_back_as_themselves(rig: LinkRig) -> None:
    quiet = rig.spec.detectors[1]
    driver = next(d for d in bus_drivers(rig.cfg, "bus1") if d.device_id == quiet.id)
    assert isinstance(driver, GasDetector)
    remote = RemoteBus(rig.link, rig.cfg.buses[0], bus_drivers(rig.cfg, "bus1"))

    rig.sims[quiet.id].set_concentration(4.2)
    reading = remote.submit(driver.poll).result(timeout=30)
    assert isinstance(reading, GasReading) and reading.value == 4.2

    rig.bus.responding(quiet.address, False)
    try:
        with pytest.raises(CommError) as timed_out:
            remote.submit(driver.poll).result(timeout=30)
    finally:
        rig.bus.responding(quiet.address, True)
    assert timed_out.value.reason == "timeout"

    with pytest.raises(CommError) as bad:
        rig.link.submit("bus1", _bad_frame).result(timeout=30)
    assert (bad.value.reason, bad.value.detail) == ("bad_response", "crc mismatch at byte 7")
    assert str(bad.value) == "bad_response: crc mismatch at byte 7"

    with pytest.raises(AlarmLinkError, match=r"StubbornError: left/right"):
        rig.link.submit("bus1", _stubborn).result(timeout=30)
    assert remote.submit(driver.poll).result(timeout=30).value == 4.2  # the bus thread goes on
    assert remote.paused is False and remote.polls > 0


def test_link_mirrors_heartbeats_and_unregisters_them_on_stop(rig: LinkRig) -> None:
    expected = {PART, "alarm-selfcheck", "annunciator", "alarm-ticker", "bus:bus1"}
    wait_until(lambda: set(rig.heartbeats.names()) == expected, timeout=10,
               message=lambda: f"mirrored parts: {rig.heartbeats.names()}")
    assert rig.heartbeats.stale() == []
    assert set(rig.host.heartbeats.names()) == expected - {PART, "alarm-selfcheck"} | {"selfcheck"}
    assert rig.heartbeats.deadlines()["bus:bus1"] == rig.host.heartbeats.deadlines()["bus:bus1"]
    rig.host_end.close()  # as in the alarm process, the host's own descriptor is the last one
    rig.link.stop(timeout_s=15)
    assert rig.heartbeats.names() == []
    assert rig.lost == []  # a planned stop is not a loss
    with pytest.raises(AlarmLinkError, match="alarm process lost"):
        rig.panel.snapshot()


def test_link_lost_calls_on_lost_once_and_fails_calls_at_once(rig: LinkRig) -> None:
    pending: Future[Any] = rig.link.submit("bus1", _hold_the_bus)  # parked on the host's bus thread
    rig.host_end.shutdown(socket.SHUT_RDWR)  # the host's end goes away, as when the alarm process dies
    wait_until(lambda: rig.lost, timeout=10, message="on_lost not called")
    assert rig.lost == ["the alarm process closed the link"]

    # the request in flight fails with the loss (it does not wait for its timeout) ...
    with pytest.raises(AlarmLinkError, match="alarm process lost: the alarm process closed the link"):
        pending.result(timeout=5)
    # ... and so does every later call, before anything is sent
    with pytest.raises(AlarmLinkError, match=r"^alarm process lost"):
        rig.panel.snapshot()
    with pytest.raises(AlarmLinkError, match=r"^alarm process lost"):
        rig.panel.reset("nope", "cli")
    with pytest.raises(AlarmLinkError, match=r"^alarm process lost"):
        RemoteAnnunciator(rig.link).current  # noqa: B018
    with pytest.raises(AlarmLinkError, match=r"^alarm process lost"):
        rig.link.submit("bus1", _bad_frame).result(timeout=5)
    rig.panel.gateway_fault("storage", True, "disk full")  # a cast is dropped, not raised
    _gate.set()
    assert rig.lost == ["the alarm process closed the link"]  # once


def _stubborn_value(client: ModbusClient) -> StubbornError:
    return StubbornError("left", "right")  # pickles in the alarm process, does not unpickle in the daemon


def test_a_stuck_part_goes_stale_in_the_daemon_when_it_does_in_the_alarm_process(rig: LinkRig) -> None:
    wait_until(lambda: "bus:bus1" in rig.heartbeats.names(), timeout=10, message="bus:bus1 not mirrored")
    rig.link.submit("bus1", _hold_the_bus)  # the bus thread stops beating
    wait_until(lambda: "bus:bus1" in rig.host.heartbeats.stale(), timeout=30, message="host: bus not stale")
    # the daemon's copy carries the time of the last beat over there, not of the report that brought it
    wait_until(lambda: "bus:bus1" in rig.heartbeats.stale(), timeout=3,
               message=lambda: f"daemon: bus:bus1 last beat {rig.heartbeats.snapshot()['bus:bus1']:.1f} s ago")
    assert PART not in rig.heartbeats.stale()  # the link itself is fine


def test_an_answer_that_cannot_be_pickled_fails_alone(rig: LinkRig) -> None:
    with pytest.raises(AlarmLinkError, match="the answer could not be sent") as caught:
        rig.link.get("side", "annunciator")  # locks and threads: does not pickle
    assert "did not answer" not in str(caught.value)
    assert rig.panel.snapshot()["devices"]  # the writer thread is alive: later answers come


def test_an_answer_that_cannot_be_unpickled_fails_alone(rig: LinkRig) -> None:
    with pytest.raises(AlarmLinkError, match="the answer could not be read"):
        rig.link.submit("bus1", _stubborn_value).result(timeout=10)
    assert rig.panel.snapshot()["devices"]  # the reader thread is alive
    assert rig.lost == []


def test_stop_when_sending_fails_still_reaps_and_unregisters(rig: LinkRig) -> None:
    wait_until(lambda: "bus:bus1" in rig.heartbeats.names(), timeout=10, message="bus:bus1 not mirrored")
    rig.link.submit("bus1", _hold_the_bus)
    rig.link.cast("side", "stop_inputs")  # the host's request thread is now blocked behind the bus
    rig.host_end.shutdown(socket.SHUT_RD)  # our sends fail (EPIPE); its reports still arrive
    try:
        rig.link.stop(timeout_s=5)  # must not raise
    finally:
        _gate.set()
    assert rig.heartbeats.names() == []


def test_a_request_that_cannot_be_sent_fails_and_is_not_kept(rig: LinkRig) -> None:
    with pytest.raises(AlarmLinkError, match="the request could not be sent"):
        rig.link.submit("bus1", lambda client: None).result(timeout=5)  # a lambda does not pickle
    assert rig.link._pending == {}
    assert rig.panel.snapshot()["devices"]


def test_a_request_the_alarm_process_cannot_take_does_not_stop_it(rig: LinkRig) -> None:
    with rig.link._send_lock:
        rig.link._conn.send_bytes(b"not a pickle")  # does not unpickle over there
    rig.link._send(("bogus",))  # unpickles, but is no request
    assert rig.panel.snapshot()["devices"]  # served after both: the alarm process goes on
    rig.sims[rig.spec.detectors[0].id].set_concentration(HIGH)
    wait_until(lambda: rig.seen("alarm", "raised"), timeout=30, message="no alarm after the bad requests")
    assert rig.lost == []
