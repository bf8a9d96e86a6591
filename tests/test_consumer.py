"""examples/consumer.py as a subprocess against a running gateway and a real mosquitto.

It must tell the right people (from its own mapping file), ignore a redelivered event, notice a gap in the
sequence and get a fresh birth from the gateway by a real rebirth command.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.uplink.topics import Topics
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway, simulated_detectors
from tests.support.mqtt import MqttRecorder
from tests.support.site import build_site

ROOT = Path(__file__).resolve().parent.parent
CONSUMER = ROOT / "examples" / "consumer.py"

pytestmark = pytest.mark.timeout(120)


def load_consumer_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("consumer_example", CONSUMER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["consumer_example"] = module
    spec.loader.exec_module(module)
    return module


def test_example_mapping_file_routes_events() -> None:
    consumer = load_consumer_module()
    contacts = consumer.Contacts.load(ROOT / "examples" / "consumer-contacts.toml")
    base = {"community": "sunshine-garden", "building": "b07"}
    household = contacts.whom({**base, "kind": "alarm", "unit": "u1", "household": "u1-101"})
    assert [(p.name, p.role) for p in household] == [
        ("Li Wei", "relative"), ("Li Na", "relative"), ("Qian Lei (unit 1 head)", "unit head")]
    cabinet = contacts.whom({**base, "kind": "supervisory", "unit": "u2"})
    assert [p.role for p in cabinet] == ["unit head"] and "unit 2" in cabinet[0].name
    fault = contacts.whom({**base, "kind": "fault", "unit": "u1", "household": "u1-101"})
    assert [p.role for p in fault] == ["building head"]
    # the example's household ids are those of the example site
    site = load_config(ROOT / "examples" / "building.toml")
    known = {f"{site.community}/{site.building}/{h.id}" for h in site.households}
    assert set(contacts.relatives) <= known


class ConsumerProcess:
    """The consumer with --json, its output lines collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CONSUMER), "--json", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def seen(self, action: str, **fields: Any) -> list[dict[str, Any]]:
        return [x for x in list(self.lines)
                if x["action"] == action and all(x.get(k) == v for k, v in fields.items())]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


async def test_consumer_tells_dedups_and_asks_for_rebirth_on_a_gap(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=2, units=2, community="c1", building="b1")
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    first, second = spec.detectors
    contacts = tmp_path / "contacts.toml"
    contacts.write_text(f"""
[buildings."c1/b1"]
head = {{ name = "Head B1", phone = "100" }}
[units."c1/b1/{first.unit}"]
head = {{ name = "Head {first.unit}", phone = "101" }}
[households."c1/b1/{first.household}"]
relatives = [{{ name = "Relative A", phone = "201" }}, {{ name = "Relative B", phone = "202" }}]
""", encoding="utf-8")
    recorder = MqttRecorder(broker.host, broker.port, [f"{topics.base}/event/#", topics.birth])
    consumer = ConsumerProcess("--host", broker.host, "--port", str(broker.port), "--community", "c1",
                               "--contacts", str(contacts), "--client-id", "consumer-test")
    error = ""
    try:
        await eventually(lambda: consumer.seen("ready") or consumer.proc.poll() is not None, timeout=30)
        assert consumer.proc.poll() is None
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg):
                sims[first.id].set_concentration(35.0)
                notify = (await eventually(lambda: consumer.seen("notify", kind="alarm"), timeout=30))[0]
                assert [(w["name"], w["role"]) for w in notify["whom"]] == [
                    ("Relative A", "relative"), ("Relative B", "relative"), (f"Head {first.unit}", "unit head")]
                assert first.household in notify["text"]

                # the broker delivers the same alarm again (as after a reconnect): ignored
                alarm = await asyncio.to_thread(recorder.wait_for, lambda m: m.topic.endswith("/event/alarm"), 30.0)
                await asyncio.to_thread(recorder.publish, alarm.topic, alarm.payload)
                await eventually(lambda: consumer.seen("duplicate", event_id=alarm.json["event_id"]), timeout=30)
                assert len(consumer.seen("notify", kind="alarm")) == 1

                # a gap: an event five numbers ahead of the newest one of this session
                newest = max((m.json for m in recorder.messages(f"{topics.base}/event/#")), key=lambda e: e["seq"])
                seq = newest["seq"] + 5
                ahead = {**newest, "seq": seq,
                         "event_id": f"{newest['gateway']}:{newest['install']}:{newest['session']}:{seq}"}
                births = len(recorder.messages(topics.birth))
                await asyncio.to_thread(recorder.publish, f"{topics.base}/event/{ahead['kind']}", ahead)
                gap = (await eventually(lambda: consumer.seen("gap"), timeout=30))[0]
                assert gap["missing"] == [newest["seq"] + 1, seq - 1]
                asked_range = (await eventually(lambda: consumer.seen("range_requested"), timeout=30))[0]
                assert asked_range["range"] == [newest["seq"] + 1, seq - 1]
                asked = (await eventually(lambda: consumer.seen("rebirth_requested"), timeout=30))[0]
                result = await eventually(lambda: consumer.seen("command_result", id=asked["id"]), timeout=30)
                assert result[0]["status"] == "accepted"
                await eventually(lambda: len(recorder.messages(topics.birth)) > births, timeout=30)

                # an alarm where the mapping file knows nobody is still reported, and says so
                sims[second.id].set_concentration(35.0)
                other = (await eventually(lambda: [n for n in consumer.seen("notify", kind="alarm")
                                                   if second.household in n["text"]], timeout=30))[0]
                assert other["whom"] == []  # nobody on file for that household and unit: said so
                assert "nobody on file" in other["text"]
    finally:
        error = consumer.stop()
        recorder.close()
    assert consumer.proc.returncode == 0, error

