"""The SMS path end to end: the real panel, its storage/uplink child and its SMS child, a real mosquitto that
is killed, a pymodbus detector on a pty, and the real python-gammu against the simulated modem on a pty.
Every message is checked from the PDUs the modem recorded, decoded and joined by Gammu itself.

- Broker killed, gas alarm: the household's relatives and the unit head get one Chinese SMS each within
  ``after_s`` + 10 s; the technician gets the transmission fault; when the broker returns the alarm reaches
  it, the fault clears, and no second SMS goes for the alarm.
- kill -9 of the storage/uplink process while the alarm's SMS is pending: it still goes.
- kill -9 of gatewayd with the SMS pending: after the restart it goes exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.panel.process import PanelProcess
from gateway.uplink.contract import validator
from gateway.uplink.topics import Topics
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, read_events, running_gateway, simulated_detectors
from tests.support.modem import SimulatedModem
from tests.support.site import build_site
from tests.support.sms import BUILDING_HEAD, RELATIVES, TECHNICIAN, UNIT_HEAD, by_number, sms_site

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # each runs the whole service for 30–90 s


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[SimulatedModem]:
    with SimulatedModem(tmp_path / "modem") as sim:
        yield sim


def active(gateway: PanelProcess, what: str) -> bool:
    return any(c["what"] == what for c in gateway.panel.snapshot()["active"])


def alarm_recipients() -> set[str]:
    return {*RELATIVES, UNIT_HEAD}


async def modem_ready(gateway: PanelProcess) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        status = await gateway.sms_status()
        modem = status.get("modem") or {}
        return status if modem.get("problem", "x") is None else None

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await ready()
        if status is not None:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"modem never ready: {await gateway.sms_status()}")


async def test_broker_killed_an_alarm_goes_by_sms_once_in_chinese_and_the_fault_clears_when_it_returns(
    tmp_path: Path, bus: VirtualNullModem, modem: SimulatedModem, broker: MosquittoBroker, mock_pins: Any,
) -> None:
    after_s = 3.0
    spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    site = sms_site(tmp_path, spec, modem.port, after_s=after_s, extra="[transmission]\nack_deadline_s = 5\n")
    det = spec.detectors[0]
    with simulated_detectors(bus.device_port, spec.detectors) as (_, sims):
        async with running_gateway(site.cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30)
            status = await modem_ready(gateway)
            assert status["contacts"] == {"technicians": 1, "building_heads": 1, "unit_heads": 1, "relatives": 2}
            assert "+86" not in repr(status), "a number in status"
            # gatewayctl sms test NUMBER: any number, the message says it is a test; an operator's command.
            from gateway.control.server import READ_COMMANDS

            assert "sms_test" not in READ_COMMANDS
            result = await gateway.commands.handle("sms_test", {"number": "+8613700000009"}, source="cli")
            assert result.ok and result.data["state"] == "sent", result
            test_sms = by_number(modem.submitted_pdus())["+8613700000009"]
            assert len(test_sms) == 1 and test_sms[0]["Text"].startswith("【测试】"), test_sms
            refused = await gateway.commands.handle("sms_test", {"number": "call me"}, source="cli")
            assert not refused.ok and "not a phone number" in (refused.reason or "")
            broker.kill()
            await eventually(lambda: not gateway.uplink_connected, timeout=30)
            sims[det.id].set_concentration(30.0)
            alarm = await eventually(lambda: next(iter(read_events(site.cfg.storage.path, "kind = 'alarm'")), None),
                                     timeout=20, message="alarm stored")
            raised_at = float(alarm["mono"])

            def alarm_sms() -> dict[str, list[dict[str, Any]]]:
                got = by_number(modem.submitted_pdus())
                return {n: m for n, m in got.items() if n in alarm_recipients()}

            await eventually(lambda: set(alarm_sms()) == alarm_recipients(), timeout=after_s + 15,
                             message=lambda: f"alarm SMS: {alarm_sms()}")
            last = max(s.at for s in modem.submitted_pdus())
            assert last - raised_at <= after_s + 10, f"SMS {last - raised_at:.1f} s after the alarm"
            for number, messages in alarm_sms().items():
                assert len(messages) == 1, (number, messages)
                text = messages[0]["Text"]
                assert text.startswith("【报警】"), text
                assert det.household in text and "单元" in text and "燃气浓度" in text, text
                assert messages[0]["Parts"] == 1, "an alarm fits in one part"
            await eventually(lambda: active(gateway, "fault:transmission"), timeout=15)
            await eventually(lambda: TECHNICIAN in by_number(modem.submitted_pdus()), timeout=20,
                             message="the technician was not told of the transmission fault")
            fault_text = by_number(modem.submitted_pdus())[TECHNICIAN][0]["Text"]
            assert fault_text.startswith("【故障】") and "transmission" in fault_text, fault_text

            broker.start()
            await eventually(lambda: not active(gateway, "fault:transmission"), timeout=40, message="fault cleared")
            assert read_events(site.cfg.storage.path, f"seq = {alarm['seq']} AND delivered = 1")
            await asyncio.sleep(after_s + 2)  # anything still owed would now fall due
            again = alarm_sms()
            assert all(len(m) == 1 for m in again.values()), f"a second SMS for the alarm: {again}"
            # Numbers never reach events, logs or status.
            log_text = (Path(site.cfg.storage.path).with_name("sms.log")).read_text()
            assert "sms sent" in log_text
            for number in (*RELATIVES, UNIT_HEAD, TECHNICIAN):
                assert number not in log_text and number[1:] not in log_text
            assert not any(n in repr(r["body"]) for r in read_events(site.cfg.storage.path)
                           for n in (*RELATIVES, UNIT_HEAD))


async def test_a_killed_uplink_process_does_not_hold_back_the_sms(
    tmp_path: Path, bus: VirtualNullModem, modem: SimulatedModem, broker: MosquittoBroker, mock_pins: Any,
) -> None:
    spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    site = sms_site(tmp_path, spec, modem.port, after_s=4.0)
    det = spec.detectors[0]
    with simulated_detectors(bus.device_port, spec.detectors) as (_, sims):
        async with running_gateway(site.cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30)
            await modem_ready(gateway)
            broker.kill()
            await eventually(lambda: not gateway.uplink_connected, timeout=30)
            sims[det.id].set_concentration(30.0)
            await eventually(lambda: read_events(site.cfg.storage.path, "kind = 'alarm'"), timeout=20)
            pid = gateway.uplink_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # and keep killing it while the SMS is owed
            started = time.monotonic()
            kills = 1
            while time.monotonic() - started < 8:
                new = gateway.uplink_pid
                if new not in (None, pid):
                    os.kill(new, signal.SIGKILL)
                    pid, kills = new, kills + 1
                await asyncio.sleep(0.1)
            await eventually(lambda: alarm_recipients() <= set(by_number(modem.submitted_pdus())), timeout=30,
                             message="no SMS while the uplink process was being killed")
            got = by_number(modem.submitted_pdus())
            assert all(len(got[n]) == 1 for n in alarm_recipients()), got


async def test_status_and_birth_carry_the_sms_path_and_the_transmission_path_never_a_number(
    tmp_path: Path, bus: VirtualNullModem, modem: SimulatedModem, broker: MosquittoBroker, mock_pins: Any,
    mqtt_recorder_factory: Any,
) -> None:
    spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    # 10 s: an uplink process slower than path_down_s to start (2 s was, on a loaded machine) is the transmission
    # fault from the start, and its SMS to the technician makes the counts below 1 instead of 0.
    site = sms_site(tmp_path, spec, modem.port, extra="[transmission]\npath_down_s = 10\n")
    config = Path(site.cfg.source)
    config.write_text(config.read_text().replace("[mqtt]\n", "[mqtt]\nstatus_interval_s = 0.5\n", 1))
    cfg = load_config(config)
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder = mqtt_recorder_factory(topics=[topics.status, topics.birth])
    numbers = (*RELATIVES, UNIT_HEAD, TECHNICIAN, BUILDING_HEAD)

    def last(topic: str, check: Any) -> dict[str, Any] | None:
        return next((m.json for m in reversed(recorder.messages(topic)) if check(m.json)), None)

    def modem_known(message: dict[str, Any]) -> bool:
        sms = message.get("sms") or {}
        return sms.get("process") == "up" and (sms.get("modem") or {}).get("operator") is not None

    with simulated_detectors(bus.device_port, spec.detectors):
        async with running_gateway(cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30)
            await modem_ready(gateway)
            status = await eventually(lambda: last(topics.status, modem_known), timeout=30,
                                      message="no status with the modem's operator")
            await gateway.storage("rebirth")
            birth = await eventually(lambda: last(topics.birth, modem_known), timeout=30,
                                     message="no birth with the modem's operator")
            broker.kill()
            await eventually(lambda: active(gateway, "fault:transmission"), timeout=30)
            killed_at = len(recorder.messages(topics.status))
            broker.start()
            await eventually(lambda: not active(gateway, "fault:transmission"), timeout=40, message="fault cleared")

            def path_up_again() -> dict[str, Any] | None:
                after = [m.json for m in recorder.messages(topics.status)[killed_at:]]
                return next((s for s in after if s["transmission"]["path"] == "up"
                             and s["transmission"]["fault"] is None), None)

            again = await eventually(path_up_again, timeout=30, message="no status with the path up again")
    sms = status["sms"]
    assert sms["modem"]["problem"] is None and 0 <= sms["modem"]["signal_percent"] <= 100, sms
    assert {k: sms[k] for k in ("owed", "pending", "sent", "held_back")} == dict.fromkeys(
        ("owed", "pending", "sent", "held_back"), 0), sms
    assert status["transmission"]["path"] == "up" and status["transmission"]["waiting"] == 0, status
    assert birth["sms"]["modem"]["operator"] == sms["modem"]["operator"] and "owed" not in birth["sms"], birth
    assert again["transmission"]["waiting"] == 0 and again["transmission"]["down_for_s"] is None, again
    published = recorder.messages(topics.status) + recorder.messages(topics.birth)
    assert all(validator(m.topic.rsplit("/", 1)[1]).is_valid(m.json) for m in published)
    assert all("transmission" in m.json and "sms" in m.json for m in recorder.messages(topics.status))
    for number in numbers:
        assert not any(number[1:] in m.text for m in published), f"a phone number in {number}"


def _daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PYTHONPATH=str(ROOT))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _owed_keys(queue: Path) -> list[tuple[str, str]]:
    if not queue.exists():
        return []
    con = sqlite3.connect(queue, timeout=10)
    try:
        return [(str(k), str(s)) for k, s in con.execute("SELECT key, state FROM owed")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _wait(predicate: Any, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(message)


def test_gatewayd_killed_with_an_sms_owed_sends_it_exactly_once_after_the_restart(
    tmp_path: Path, bus: VirtualNullModem, modem: SimulatedModem, broker: MosquittoBroker,
) -> None:
    spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    after_s = 8.0
    site = sms_site(tmp_path, spec, modem.port, after_s=after_s)
    det = spec.detectors[0]
    log = tmp_path / "gatewayd.log"
    with simulated_detectors(bus.device_port, spec.detectors) as (_, sims):
        daemon = _daemon(Path(site.cfg.source), log)
        try:
            _wait(lambda: any("SMS" not in c and c.startswith("AT+CSQ") for c in modem.commands), 60,
                  "the SMS process never asked the modem")
            broker.kill()
            sims[det.id].set_concentration(30.0)
            owed = _wait(lambda: [k for k, s in _owed_keys(site.queue) if k.startswith("alarm|raised")], 30,
                         "the alarm was never owed an SMS")
            assert not modem.submitted_pdus()
            daemon.send_signal(signal.SIGKILL)  # well before after_s: the SMS is owed, not sent
            daemon.wait(timeout=30)
            daemon = _daemon(Path(site.cfg.source), log)
            _wait(lambda: alarm_recipients() <= set(by_number(modem.submitted_pdus())), after_s + 60,
                  "the owed SMS was not sent after the restart")
            time.sleep(3)
            got = by_number(modem.submitted_pdus())
            counts = {n: len(got.get(n, [])) for n in alarm_recipients()}
            assert counts == dict.fromkeys(alarm_recipients(), 1), counts
            assert [s for k, s in _owed_keys(site.queue) if k == owed[0]] == ["due"]
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
