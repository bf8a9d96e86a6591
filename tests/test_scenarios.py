"""Scenarios through the real daemon components: simulated bus on a pty, mock pins, SQLite, mosquitto.

* 20 households alarming within one second → 20 distinct alarm events, none lost (SQLite and MQTT).
* An alarm during a bus fault (another detector offline; the whole port lost) is raised like any alarm.
* The bus adapter unplugged → fault within 3 poll cycles; plugged back → the faults clear by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import SiteConfig, load_config
from gateway.panel.process import PanelProcess
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import (
    CountingHeartbeats,
    TimedMockPin,
    eventually,
    read_events,
    running_gateway,
    simulated_detectors,
)
from tests.support.mqtt import RecordedMessage
from tests.support.site import ContactSpec, SiteSpec, build_site

pytestmark = pytest.mark.timeout(240)

HIGH = 30.0  # %LEL, above the default high threshold


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def make_site(tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker,
              **kwargs: Any) -> tuple[SiteSpec, SiteConfig, Path]:
    db = tmp_path / "events.db"
    spec = build_site(bus_port=modem.gateway_port, db_path=db, broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", **kwargs)
    return spec, load_config(spec.write(tmp_path / "site.toml")), db


def states(gateway: PanelProcess) -> dict[str, dict[str, Any]]:
    return {str(d["device"]): d for d in gateway.panel.snapshot()["devices"]}


def sound(gateway: PanelProcess) -> str:
    return str(gateway.panel.snapshot()["annunciation"].sound.name.lower())


async def all_normal(gateway: PanelProcess, device_ids: list[str]) -> None:
    await eventually(lambda: all(states(gateway)[d]["state"] == "normal" for d in device_ids), timeout=60,
                     message=lambda: f"not all normal: { {d: states(gateway)[d]['state'] for d in device_ids} }")


def raised_alarms(db: Path) -> list[dict[str, Any]]:
    return read_events(db, "kind = 'alarm' AND action = 'raised'")


def faults(db: Path, action: str) -> list[dict[str, Any]]:
    return read_events(db, "kind = 'fault' AND action = ?", [action])


# ----------------------------------------------------------------------------------------- 20 households


async def test_twenty_households_alarming_within_one_second_none_lost(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg, db = make_site(tmp_path, modem, broker, households=20, units=2)
    recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/alarm")
    ids = [d.id for d in spec.detectors]
    with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
        async with running_gateway(cfg) as gateway:
            await all_normal(gateway, ids)

            started = time.monotonic()
            for det in spec.detectors:  # 20 leaks spread over 0.95 s, so they span several poll cycles
                sims[det.id].set_concentration(HIGH)
                await asyncio.sleep(0.05)

            def is_raised(m: RecordedMessage) -> bool:
                return isinstance(m.json, dict) and m.json.get("action") == "raised"

            messages = await asyncio.to_thread(recorder.wait_for_count, is_raised, 20, 60.0)
            rows = await eventually(lambda: len(raised_alarms(db)) >= 20 and raised_alarms(db), timeout=60,
                                    message=lambda: f"{len(raised_alarms(db))} of 20 alarms stored")
            await eventually(lambda: all(r["delivered"] == 1 for r in raised_alarms(db)), timeout=60,
                             message="not every alarm acknowledged by the broker")
            rows = raised_alarms(db)
            messages = [m for m in recorder.messages() if is_raised(m)]

            assert sorted(r["device"] for r in rows) == sorted(ids)
            assert len({r["event_id"] for r in rows}) == 20
            assert sorted(m.json["device"] for m in messages) == sorted(ids)
            assert {m.json["event_id"] for m in messages} == {r["event_id"] for r in rows}
            by_device = {d.id: d for d in spec.detectors}
            for m in messages:
                det = by_device[m.json["device"]]
                assert (m.json["unit"], m.json["household"], m.json["level"]) == (det.unit, det.household, "high")
            assert all(states(gateway)[d]["state"] == "high_alarm" for d in ids)
            assert sound(gateway) == "gas"
            assert buzzer.first_high(after=started) is not None


# ----------------------------------------------------------------------------------------- during a fault


async def test_alarm_while_another_detector_is_offline(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec, cfg, db = make_site(tmp_path, modem, broker, households=3)
    recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/#")
    leak, quiet, silent = spec.detectors
    with simulated_detectors(modem.device_port, spec.detectors) as (bus, sims):
        async with running_gateway(cfg) as gateway:
            await all_normal(gateway, [d.id for d in spec.detectors])
            bus.responding(silent.address, False)
            await eventually(lambda: any(r["device"] == silent.id and r["body"].get("code") == "offline"
                                         for r in faults(db, "raised")), timeout=30,
                             message="the silent detector was never declared offline")
            assert "offline" in states(gateway)[silent.id]["faults"]

            leak_at = time.monotonic()
            sims[leak.id].set_concentration(HIGH)
            message = await asyncio.to_thread(
                recorder.wait_for,
                lambda m: m.topic.endswith("/event/alarm") and m.json.get("device") == leak.id
                and m.json.get("action") == "raised", 30.0)
            assert message.json["level"] == "high"
            await eventually(lambda: [r["device"] for r in raised_alarms(db)] == [leak.id],
                             message="alarm not stored (once)")
            assert states(gateway)[leak.id]["state"] == "high_alarm"
            assert states(gateway)[quiet.id]["state"] == "normal"
            assert "offline" in states(gateway)[silent.id]["faults"]
            assert sound(gateway) == "gas"  # the alarm wins the sounder over the trouble signal
            assert buzzer.first_high(after=leak_at) is not None


async def test_alarm_from_a_contact_while_the_bus_port_is_lost(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    relay_contact = ContactSpec("gas-relay-h001", "gas_relay", pin=17, contact="NO", household="u1-h001")
    spec, cfg, db = make_site(tmp_path, modem, broker, households=2, contacts=[relay_contact])
    recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/#")
    with simulated_detectors(modem.device_port, spec.detectors):
        async with running_gateway(cfg) as gateway:
            await all_normal(gateway, [d.id for d in spec.detectors])
            modem.unplug()
            await eventually(lambda: any(r["body"].get("code") == "port_lost" for r in faults(db, "raised")),
                             timeout=30, message="port loss never raised")

            await eventually(lambda: not buzzer.state, message="trouble chirp never ended")
            closed_at = time.monotonic()
            mock_pins.pin("GPIO17").drive_low()  # the detector's alarm relay closes (NO contact, pull-up)
            high = buzzer.first_high(after=closed_at)
            assert high is not None, "buzzer not on when the contact callback returned"
            message = await asyncio.to_thread(
                recorder.wait_for,
                lambda m: m.topic.endswith("/event/alarm") and m.json.get("device") == relay_contact.id
                and m.json.get("action") == "raised", 30.0)
            assert message.json["household"] == "u1-h001"
            assert sound(gateway) == "gas"
            await eventually(lambda: [r["device"] for r in raised_alarms(db)] == [relay_contact.id],
                             message="contact alarm not stored")


# ----------------------------------------------------------------------------------------- unplug / replug


async def test_bus_unplugged_faults_within_three_polls_and_recovers(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    spec, cfg, db = make_site(tmp_path, modem, broker, households=3)
    recorder = mqtt_recorder_factory(topics=f"{spec.topic_base}/event/fault")
    ids = [d.id for d in spec.detectors]
    heartbeats = CountingHeartbeats()
    with simulated_detectors(modem.device_port, spec.detectors):
        async with running_gateway(cfg, heartbeats=heartbeats) as gateway:
            await all_normal(gateway, ids)
            assert faults(db, "raised") == []

            unplugged_at = time.monotonic()
            modem.unplug()
            raised = await eventually(lambda: faults(db, "raised"), timeout=30, message="no fault after unplug")
            first_fault = min(r["mono"] for r in raised)
            cycles = heartbeats.count("bus:bus1", after=unplugged_at, before=first_fault)
            assert cycles <= 3, f"fault only after {cycles} poll cycles"
            # Every detector is shown in fault (offline) within 3 further cycles.
            await eventually(lambda: all("offline" in states(gateway)[d]["faults"] for d in ids), timeout=30,
                             message=lambda: f"faults: { {d: states(gateway)[d]['faults'] for d in ids} }")
            codes = {r["body"].get("code") for r in faults(db, "raised")}
            assert "port_lost" in codes
            assert gateway.buses["bus1"].port_lost
            assert sound(gateway) == "trouble"

            modem.replug()
            await eventually(lambda: not gateway.buses["bus1"].port_lost, timeout=30, message="port not reopened")
            await all_normal(gateway, ids)
            cleared = await eventually(
                lambda: {(r["device"], r["body"].get("code")) for r in faults(db, "cleared")}
                >= {(d, "offline") for d in ids} and faults(db, "cleared"),
                timeout=30, message="offline faults not cleared")
            assert any(r["body"].get("code") == "port_lost" for r in cleared)
            assert sound(gateway) == "quiet"
            assert gateway.buses["bus1"].thread.is_alive()

            def cleared_on_mqtt(m: RecordedMessage) -> bool:
                return isinstance(m.json, dict) and m.json.get("action") == "cleared"

            await asyncio.to_thread(recorder.wait_for_count, cleared_on_mqtt, len(ids) + 1, 30.0)
