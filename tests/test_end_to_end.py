"""End to end: simulated detector on a pty → gateway → buzzer pin, SQLite file and a real mosquitto.

The gateway runs in-process (its threads and asyncio tasks), the detector is pymodbus's own RTU server
behind a virtual null modem, the buzzer a gpiozero MockFactory pin, the broker a private mosquitto.
Also: ``gatewayd --demo`` and ``gatewayd --config <bad file>`` as real subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import EX_CONFIG, SiteConfig, load_config
from gateway.panel.process import PanelProcess
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker, free_port
from tests.support.building import (
    TimedMockPin,
    eventually,
    read_events,
    running_gateway,
    simulated_detectors,
    uplink_records,
)
from tests.support.mqtt import RecordedMessage
from tests.support.site import SiteSpec, build_site

pytestmark = pytest.mark.timeout(180)

HIGH = 30.0  # %LEL, above the default high threshold (25 %LEL)


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def make_site(tmp_path: Path, modem: VirtualNullModem, broker_port: int, **kwargs: Any) -> tuple[SiteSpec, SiteConfig]:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", **kwargs)
    return spec, load_config(spec.write(tmp_path / "site.toml"))


def device_state(gateway: PanelProcess, device_id: str) -> str:
    return next(str(d["state"]) for d in gateway.panel.snapshot()["devices"] if d["device"] == device_id)


def alarm_raised(device_id: str) -> Callable[[RecordedMessage], bool]:
    def match(m: RecordedMessage) -> bool:
        body = m.json
        return (m.topic.endswith("/event/alarm") and isinstance(body, dict) and body.get("device") == device_id
                and body.get("action") == "raised")

    return match


def stored_alarms(db: Path, device_id: str) -> list[dict[str, Any]]:
    return read_events(db, "kind = 'alarm' AND action = 'raised' AND device = ?", [device_id])


async def wait_normal(gateway: PanelProcess, device_id: str) -> None:
    await eventually(lambda: device_state(gateway, device_id) == "normal", timeout=30,
                     message=lambda: f"{device_id} never read normal: {device_state(gateway, device_id)}")


async def test_high_reading_sounds_buzzer_stores_and_forwards(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = make_site(tmp_path, modem, broker.port, households=2)
    recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/#")
    quiet, leak = spec.detectors
    db = tmp_path / "events.db"
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await wait_normal(gateway, leak.id)
            assert buzzer.first_high() is None

            sims[leak.id].set_concentration(HIGH)
            await eventually(lambda: buzzer.first_high() is not None, message="buzzer never went high")

            message = await asyncio.to_thread(recorder.wait_for, alarm_raised(leak.id), 30.0)
            body = message.json
            assert body["community"] == spec.community
            assert body["building"] == spec.building
            assert (body["unit"], body["household"], body["device"]) == (leak.unit, leak.household, leak.id)
            assert body["level"] == "high"
            assert body["value"] == pytest.approx(HIGH)

            rows = await eventually(lambda: stored_alarms(db, leak.id), message="no alarm row in SQLite")
            assert len(rows) == 1
            row = rows[0]
            assert row["event_id"] == body["event_id"]
            assert (row["unit"], row["household"]) == (leak.unit, leak.household)
            assert row["body"]["level"] == "high"
            assert row["body"]["value"] == pytest.approx(HIGH)
            await eventually(lambda: stored_alarms(db, leak.id)[0]["delivered"] == 1,
                             message="alarm row never marked delivered")
            assert stored_alarms(db, quiet.id) == []
            assert buzzer.first_high() is not None


async def test_broker_down_at_first_buzzer_at_once_event_kept_then_delivered(
    tmp_path: Path, modem: VirtualNullModem, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", port=free_port())
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = make_site(tmp_path, modem, broker.port)
    (leak,) = spec.detectors
    db = tmp_path / "events.db"
    try:
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as gateway:
                await wait_normal(gateway, leak.id)
                sims[leak.id].set_concentration(HIGH)
                await eventually(lambda: buzzer.first_high() is not None, message="buzzer never went high")
                rows = await eventually(lambda: stored_alarms(db, leak.id), message="alarm not stored")
                assert rows[0]["delivered"] == 0
                assert not gateway.uplink_connected

                # Start the broker just after a failed attempt, while the uplink sleeps ≥ 1.6 s, so the
                # recorder is subscribed before the gateway can reconnect.
                def failures() -> list[dict[str, Any]]:
                    return [e for e in uplink_records(cfg) if e.get("event") == "uplink down; events buffered"]

                seen = len(failures())
                await eventually(lambda: any(e["retry_in_s"] >= 1.6 for e in failures()[seen:]), timeout=30,
                                 message="the uplink never retried")
                assert stored_alarms(db, leak.id)[0]["delivered"] == 0
                broker_started = time.monotonic()
                broker.start()
                recorder = mqtt_recorder_factory(broker, topics=f"{spec.topic_base}/event/#")

                message = await asyncio.to_thread(recorder.wait_for, alarm_raised(leak.id), 60.0)
                assert message.json["event_id"] == rows[0]["event_id"]
                assert message.json["household"] == leak.household
                await eventually(lambda: stored_alarms(db, leak.id)[0]["delivered"] == 1,
                                 message="alarm row never marked delivered")
        high = buzzer.first_high()
        assert high is not None and high < broker_started, "the buzzer waited for the broker"
    finally:
        broker.stop()


async def _block_loop(seconds: float) -> float:
    """Hold the event loop hostage: nothing else on it runs until this returns."""
    time.sleep(seconds)
    return time.monotonic()


async def test_buzzer_goes_high_while_the_loop_is_blocked(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg = make_site(tmp_path, modem, broker.port)
    (leak,) = spec.detectors
    db = tmp_path / "events.db"
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await wait_normal(gateway, leak.id)
            # The gas arrives from another thread 0.3 s into the block.
            leak_timer = threading.Timer(0.3, sims[leak.id].set_concentration, args=(HIGH,))
            blocked_at = time.monotonic()
            leak_timer.start()
            woke_at = await _block_loop(2.0)
            leak_timer.join()

            high = buzzer.first_high()
            assert high is not None, "the buzzer did not go high while the loop was blocked"
            assert blocked_at < high < woke_at
            rows = await eventually(lambda: stored_alarms(db, leak.id), message="alarm not stored after the loop woke")
            assert blocked_at < rows[0]["mono"] < woke_at  # detected during the block, stored after it


# ------------------------------------------------------------------------------------------- subprocess


def _gatewayd() -> list[str]:
    script = Path(sys.executable).with_name("gatewayd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.daemon"]


def _json_lines(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


@pytest.mark.slow  # a 20 s run of the demo
def test_demo_shows_the_alarm_flow_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.run([*_gatewayd(), "--demo", "--duration", "20"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    entries = _json_lines(output)
    assert entries, output[-3000:]

    readings = [e["value"] for e in entries if e.get("event") == "reading" and e.get("device") == "gas-u1-201"]
    assert readings, "no readings of the leaking household"
    peak = readings.index(max(readings))
    assert readings[0] < 10.0 <= 25.0 <= readings[peak], readings
    assert readings[: peak + 1] == sorted(readings[: peak + 1]), f"reading did not rise: {readings}"

    raised = [e for e in entries if e.get("event") == "event stored" and e.get("kind") == "alarm"
              and e.get("action") == "raised" and e.get("device") == "gas-u1-201"]
    assert raised, "alarm raised not shown"
    assert any(e.get("event") == "annunciator" and e.get("buzzer") == "on" for e in entries), "buzzer on not shown"

    alarm_id = raised[0]["event_id"]
    forwarded = any(e.get("event") == "event forwarded" and e.get("event_id") == alarm_id for e in entries)
    buffered = any(e.get("event") == "uplink down; events buffered" for e in entries)
    assert forwarded or buffered, "neither forwarded nor buffered shown"


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    spec = build_site(bus_port=tmp_path / "ttyX", db_path=tmp_path / "events.db", broker_port=1,
                      socket_path=tmp_path / "control.sock")
    bad = spec.toml.replace("timeout_s = 0.2", 'timeout_s = "fast"')
    assert bad != spec.toml
    path = tmp_path / "bad.toml"
    path.write_text(bad, encoding="utf-8")
    proc = subprocess.run([*_gatewayd(), "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
    assert "buses[0].timeout_s" in proc.stderr
    assert "must be a number" in proc.stderr
