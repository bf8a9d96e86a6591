"""MQTT commands and the clock, end to end: the real storage process (a child of an in-process panel) and a
real mosquitto.

- On a clock that is not synchronised every command is refused with that reason, and nothing runs.
- A command's id survives a restart of the storage process: the same command sent again after the restart
  is answered ``replayed`` and is not run a second time.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ASSUME_ENV
from gateway.config import load_config
from gateway.panel.process import PanelProcess
from gateway.uplink.contract import command_message, validator
from gateway.uplink.topics import Topics
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, read_events, running_gateway, simulated_detectors
from tests.support.mqtt import MqttRecorder
from tests.support.site import build_site

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


async def restart_storage(gateway: PanelProcess) -> None:
    """kill -9 the storage process; wait until the panel has started a new one and it is on the broker."""
    pid = gateway.uplink_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: gateway.uplink_pid not in (None, pid) and gateway.supervisor.up, timeout=60,
                     message="the storage process was not started again")
    await eventually(lambda: gateway.uplink_connected, timeout=30, message="the new storage process connected")


async def test_commands_are_refused_on_an_unsynchronised_clock_and_replays_are_known_after_a_restart(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
    mqtt_recorder_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    server: MqttRecorder = mqtt_recorder_factory(topics=f"{topics.reply}/#")

    async def ask(body: dict[str, Any]) -> dict[str, Any]:
        server.publish(topics.command(body["command"]), body)
        reply = await eventually(lambda: next((m.json for m in server.messages() if m.json.get("id") == body["id"]),
                                              None), timeout=30, message=f"no result for {body['id']}")
        assert isinstance(reply, dict) and validator("command_result").is_valid(reply), reply
        return reply

    def silences() -> int:
        return len(read_events(cfg.storage.path, "kind = 'silence'"))

    monkeypatch.setenv(ASSUME_ENV, "0")  # the storage process starts on a clock that is not synchronised
    with simulated_detectors(modem.device_port, spec.detectors):
        async with running_gateway(cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30)
            refused = await ask(command_message("silence", community=spec.community, building=spec.building))
            assert (refused["status"], refused["code"]) == ("rejected", "clock_unsynchronised"), refused
            assert "not synchronised" in refused["reason"]

            monkeypatch.setenv(ASSUME_ENV, "1")  # NTP answered; the next storage process sees it
            await restart_storage(gateway)
            once = command_message("silence", community=spec.community, building=spec.building, ttl_s=120)
            assert (await ask(once))["status"] == "accepted"
            await eventually(lambda: silences() == 1, timeout=30, message="the silence was not stored")
            server.clear()

            await restart_storage(gateway)
            again = await ask(once)
            assert (again["status"], again["code"]) == ("rejected", "replayed"), again
            assert silences() == 1, "the replay did not run"
    assert Path(f"{cfg.storage.path}.commands").exists()
