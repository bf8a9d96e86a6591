"""Remote commands over a real mosquitto, MQTT 5 and 3.1.1: every accepted and every rejected case gets a result.

The gateway runs in-process against simulated detectors; a test-side paho client plays the central server.
On MQTT 5 the result goes to the command's response topic with its correlation data; on 3.1.1 (no
properties) to ``<base>/reply``, where the command id correlates it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import load_config
from gateway.panel.process import PanelProcess
from gateway.uplink.contract import command_message, validator
from gateway.uplink.topics import Topics
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway, simulated_detectors
from tests.support.mqtt import MqttRecorder, RecordedMessage
from tests.support.site import SiteSpec, build_site

pytestmark = pytest.mark.timeout(240)

HIGH = 35.0  # %LEL, above the default high threshold


@dataclass
class Server:
    """The central server's side: publishes commands and reads results."""

    recorder: MqttRecorder
    topics: Topics
    v5: bool

    def command(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return command_message(name, community=self.topics.community, building=self.topics.building, **kwargs)

    def ask(self, payload: bytes | dict[str, Any], *, name: str | None = None, topic: str | None = None,
            response_topic: str | None = None, correlation: bytes | None = None) -> RecordedMessage:
        """Publish one command and return the one result it got (validated against its schema)."""
        if isinstance(payload, dict):
            name = name or payload.get("command")
            payload = json.dumps(payload).encode()
        assert topic or name
        before = len(self.recorder.messages())
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic or f"{self.topics.reply}/server-1"
            props.CorrelationData = correlation or f"corr-{time.monotonic_ns()}".encode()
        self.recorder.publish(topic or self.topics.command(str(name)), payload, properties=props)
        result = self.recorder.wait_for(lambda m: m.index >= before and m.matches(f"{self.topics.reply}/#"),
                                        timeout=30)
        assert validator("command_result").is_valid(result.json), result.json
        if self.v5:
            assert props is not None
            expected_topic = response_topic if response_topic and self.topics.is_reply_topic(response_topic) \
                else self.topics.reply if response_topic else f"{self.topics.reply}/server-1"
            assert result.topic == expected_topic
            assert result.properties.get("CorrelationData") == props.CorrelationData.hex()
        else:
            assert result.topic == self.topics.reply
            assert result.properties == {}
        return result


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.fixture(params=[5, 311], ids=["mqtt5", "mqtt311"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@dataclass
class Rig:
    gateway: PanelProcess
    server: Server
    spec: SiteSpec
    sims: dict[str, SimulatedGasDetector]


@pytest.fixture
async def rig(tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
              protocol: int) -> AsyncIterator[Rig]:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=2, mqtt_protocol=protocol)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder = MqttRecorder(broker.host, broker.port, [f"{topics.reply}/#", topics.birth, f"{topics.base}/event/#"],
                            protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
    try:
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: gateway.uplink_connected and recorder.messages(topics.birth), timeout=30)
                yield Rig(gateway, Server(recorder, topics, protocol == 5), spec, sims)
    finally:
        recorder.close()


async def ask(rig: Rig, payload: bytes | dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Run Server.ask off the loop (it blocks) so the in-process gateway keeps running."""
    message = await asyncio.to_thread(rig.server.ask, payload, **kwargs)
    body: dict[str, Any] = message.json
    return body


async def wait_for(server: Server, predicate: Callable[[RecordedMessage], bool]) -> RecordedMessage:
    """recorder.wait_for off the loop."""
    return await asyncio.to_thread(server.recorder.wait_for, predicate, 30.0)


def state_of(gateway: PanelProcess, device: str) -> dict[str, Any]:
    return next(d for d in gateway.panel.snapshot()["devices"] if d["device"] == device)


async def test_accepted_commands(rig: Rig) -> None:
    gw, server = rig.gateway, rig.server
    leak, other = rig.spec.detectors
    rig.sims[leak.id].set_concentration(HIGH)
    await eventually(lambda: state_of(gw, leak.id)["state"] == "high_alarm", timeout=30)
    assert gw.panel.snapshot()["annunciation"].sound.name == "GAS"

    silence = server.command("silence")
    result = await ask(rig, silence)
    assert (result["status"], result["code"], result["id"], result["command"]) == (
        "accepted", "ok", silence["id"], "silence")
    assert gw.panel.snapshot()["annunciation"].sound.name == "QUIET"
    silenced = await wait_for(server, lambda m: m.topic.endswith("/event/silence"))
    assert silenced.json["source"] == f"mqtt:{silence['id']}"

    # the condition is still present: the handler refuses to reset that device (accepted envelope, refused)
    result = await ask(rig, server.command("reset", args={"device": leak.id}))
    assert (result["status"], result["code"]) == ("rejected", "refused")
    assert "still present" in result["reason"]

    rig.sims[leak.id].set_concentration(0.0)
    await eventually(lambda: not state_of(gw, leak.id)["condition_present"], timeout=30)
    reset = server.command("reset", args={"device": leak.id})
    result = await ask(rig, reset)
    assert (result["status"], result["code"]) == ("accepted", "ok")
    assert result["data"]["reset"] == [leak.id]
    assert state_of(gw, leak.id)["latched"] is None
    await wait_for(server, lambda m: m.topic.endswith("/event/reset") and m.json["source"] == f"mqtt:{reset['id']}")

    result = await ask(rig, server.command("reset", args={"all": True}))
    assert (result["status"], result["code"]) == ("accepted", "ok")

    result = await ask(rig, server.command("test", args={"device": other.id}))
    assert (result["status"], result["data"]["started"]) == ("accepted", [other.id])
    result = await ask(rig, server.command("test", args={"all": True}))
    assert result["status"] == "accepted" and set(result["data"]["started"]) == {leak.id, other.id}
    await eventually(lambda: state_of(gw, other.id)["state"] == "test", timeout=10)

    result = await ask(rig, server.command("status"))
    assert result["status"] == "accepted"
    assert result["data"]["gateway"]["session"] == gw.supervisor.beat["session"]

    births_index = server.recorder.messages(server.topics.birth)[-1].index
    result = await ask(rig, server.command("rebirth"))
    assert result["status"] == "accepted"
    birth = await wait_for(server, lambda m: m.topic == server.topics.birth and m.index > births_index)
    assert validator("birth").is_valid(birth.json)

    result = await ask(rig, server.command("events", args={"limit": 5, "kind": "alarm"}))
    assert result["status"] == "accepted"
    events = result["data"]["events"]
    assert 1 <= len(events) <= 5 and all(e["kind"] == "alarm" for e in events)


async def test_rejected_commands(rig: Rig) -> None:
    gw, server, topics = rig.gateway, rig.server, rig.server.topics
    leak = rig.spec.detectors[0]
    now = time.time()

    async def rejected(payload: bytes | dict[str, Any], code: str, **kwargs: Any) -> dict[str, Any]:
        result = await ask(rig, payload, **kwargs)
        assert (result["status"], result["code"]) == ("rejected", code), result
        assert result["reason"]
        return result

    # another building (same community) and another community: refused by the target check
    other_building = command_message("silence", community=topics.community, building="b99")
    result = await rejected(other_building, "wrong_target")
    assert result["id"] == other_building["id"] and "b99" in result["reason"]
    await rejected(command_message("silence", community="elsewhere", building=topics.building), "wrong_target")

    # expired, valid-for-too-long, issued in the future, issued before this gateway started
    await rejected(server.command("silence", issued_at=now - 120, ttl_s=60), "expired")
    await rejected(server.command("silence", issued_at=now, ttl_s=3600), "invalid")
    await rejected(server.command("silence", issued_at=now + 600, ttl_s=60), "not_yet_valid")
    await rejected(server.command("silence", issued_at=gw.started_at - 5, ttl_s=120), "stale")

    # replay: the same id a second time (even with fresh times)
    first = server.command("silence")
    assert (await ask(rig, first))["status"] == "accepted"
    again = server.command("silence", command_id=first["id"])
    result = await rejected(again, "replayed")
    assert result["id"] == first["id"]

    # malformed: not JSON, not UTF-8, not an object, NaN, duplicate keys
    result = await rejected(b"{not json", "malformed", name="silence")
    assert result["id"] is None
    await rejected(b"\xff\xfe\x00garbage", "malformed", name="silence")
    await rejected(b'["silence"]', "malformed", name="silence")
    nan = json.dumps(server.command("silence")).replace('"version": 1', '"version": NaN').encode()
    await rejected(nan, "malformed", name="silence")
    dup = json.dumps(server.command("silence"))[:-1] + ', "id": "twice"}'
    await rejected(dup.encode(), "malformed", name="silence")
    await rejected(b"x" * 20_000, "too_large", name="silence")

    # schema: missing field, wrong version, topic and payload disagree
    missing = server.command("silence")
    del missing["expires_at"]
    result = await rejected(missing, "invalid")
    assert result["id"] == missing["id"] and "expires_at" in result["reason"]
    await rejected({**server.command("silence"), "version": 2}, "invalid")
    await rejected(server.command("silence"), "invalid", topic=topics.command("status"))

    # unknown command (topic), and the CLI-only commands are not remote commands
    await rejected({**server.command("silence"), "command": "self_destruct"}, "unknown_command",
                   topic=topics.command("self_destruct"))
    await rejected({**server.command("silence"), "command": "read"}, "unknown_command", topic=topics.command("read"))

    # the remote operator actions check their arguments like the others
    await rejected(server.command("relay_test"), "invalid")  # which output is required
    await rejected(server.command("relay_test", args={"output": "valve", "seconds": 3600}), "bad_args")
    await rejected(server.command("buzzer_test", args={"seconds_per_pattern": 0}), "bad_args")
    await rejected(server.command("scan", args={"bus": "bus1", "to": 248}), "bad_args")
    refused = await ask(rig, server.command("relay_test", args={"output": "no-such-valve"}))
    assert (refused["status"], refused["code"]) == ("rejected", "refused") and "unknown relay" in refused["reason"]

    # bad arguments
    result = await rejected(server.command("reset", args={"device": 5}), "bad_args")
    assert result["reason"].startswith("args.device")
    await rejected(server.command("reset"), "invalid")  # args are required for reset
    await rejected(server.command("reset", args={"device": leak.id, "all": True}), "bad_args")
    await rejected(server.command("reset", args={"all": False}), "bad_args")
    await rejected(server.command("test", args={"devices": [leak.id]}), "bad_args")
    await rejected(server.command("silence", args={"now": True}), "bad_args")
    await rejected(server.command("events", args={"limit": 0}), "bad_args")
    await rejected(server.command("events", args={"limit": "ten"}), "bad_args")
    # well-formed, but the handler refuses: unknown device
    result = await rejected(server.command("reset", args={"device": "no-such-device"}), "refused")
    assert "unknown device" in result["reason"]

    # nothing of the above changed the alarm state
    assert gw.panel.snapshot()["annunciation"].sound.name == "QUIET"


async def test_command_for_another_building_topic_is_not_seen(rig: Rig) -> None:
    """The gateway subscribes to its own subtree only: a command for building b99 gets no answer from it."""
    server, topics = rig.server, rig.server.topics
    other = Topics(topics.prefix, topics.community, "b99")
    before = len(server.recorder.messages())
    props = None
    if server.v5:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{topics.reply}/x"
    server.recorder.publish(other.command("silence"),
                            command_message("silence", community=topics.community, building="b99"),
                            properties=props)
    # a command to our own topic afterwards is answered; nothing came for the b99 one
    mine = server.command("status")
    result = await ask(rig, mine)
    replies = [m for m in server.recorder.messages(f"{topics.reply}/#") if m.index >= before]
    assert [m.json["id"] for m in replies] == [mine["id"]]
    assert result["status"] == "accepted"


async def test_response_topic_outside_the_reply_subtree_is_refused(rig: Rig) -> None:
    if not rig.server.v5:
        pytest.skip("response topics are an MQTT 5 feature")
    topics = rig.server.topics
    command = rig.server.command("silence")
    result = await ask(rig, command, response_topic=f"{topics.prefix}/{topics.community}/b99/reply")
    assert (result["status"], result["code"], result["id"]) == ("rejected", "bad_response_topic", command["id"])
    # a response topic deeper in our own reply subtree is used as given
    other = rig.server.command("status")
    result = await ask(rig, other, response_topic=f"{topics.reply}/desk/7")
    assert result["status"] == "accepted"
