"""Hostile remote commands: huge, deeply nested, wrong types, invalid UTF-8 — each rejected, nothing crashes.

The bulk (over 10 000 payloads) drives :class:`gateway.uplink.contract.CommandGate` directly. A few hundred more go
through a real mosquitto into a running gateway while a gas alarm sounds its buzzer: every one gets a
"rejected" result, the buzzer keeps its pattern, and a second alarm raised during the flood is annunciated
and forwarded.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from drivers.simulated import VirtualNullModem
from gateway.config import load_config
from gateway.uplink.contract import (
    COMMANDS,
    ID_PATTERN,
    MAX_COMMAND_BYTES,
    CommandGate,
    Rejected,
    command_message,
    validator,
)
from gateway.uplink.topics import Topics
from tests.support.broker import MosquittoBroker
from tests.support.building import TimedMockPin, eventually, running_gateway, simulated_detectors
from tests.support.mqtt import MqttRecorder
from tests.support.site import build_site

TOPICS = Topics("safety", "c1", "b1")
FIELDS = ("version", "id", "command", "issued_at", "expires_at", "target", "args")
#: JSON types a field must NOT be replaced with (a replacement of its own type could still be valid).
FIELD_TYPES = {"version": {"number", "boolean"}, "id": {"string"}, "command": {"string"}, "issued_at": {"string"},
               "expires_at": {"string"}, "target": {"object"}, "args": {"object"}}


def fuzz_settings(examples: int) -> settings:
    """No deadline (sizes vary a lot), no example database, every health check off (payloads are big on purpose)."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from([
    "", " ", "\x00", "abc\n", "../../etc", "+", "#", "safety/c1/b1", "\u202egnp.exe", "💥" * 30, "a" * 65,
    "'; DROP TABLE events; --", "${jndi:ldap://x}", "%s%s%n",
])


def base_command(name: str = "reset") -> dict[str, Any]:
    args = {"device": "gas-1"} if name in ("reset", "test") else {"limit": 5} if name == "events" else {}
    return command_message(name, community="c1", building="b1", args=args)


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "number": st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False),
    "string": st.text(max_size=40),
    "array": st.lists(json_scalars, max_size=4),
    "object": st.dictionaries(st.text(max_size=8), json_scalars, max_size=4),
}


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """A valid command with one to three fields replaced by values of another JSON type."""
    body = base_command(draw(st.sampled_from(COMMANDS)))
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        kind = draw(st.sampled_from([t for t in BY_TYPE if t not in FIELD_TYPES[field]]))
        body[field] = draw(BY_TYPE[kind])
    return encode(body)


@st.composite
def hostile_fields(draw: st.DrawFn) -> bytes:
    """Right types, hostile contents: bad ids/times, other targets, unknown or ill-typed arguments, missing keys."""
    name = draw(st.sampled_from(COMMANDS))
    body = base_command(name)
    how = draw(st.sampled_from(["id", "time", "target", "args", "missing", "extra", "command"]))
    if how == "id":
        body["id"] = draw(hostile_text.filter(lambda s: re.fullmatch(ID_PATTERN, s) is None))
    elif how == "time":
        body[draw(st.sampled_from(["issued_at", "expires_at"]))] = draw(hostile_text | st.sampled_from([
            "2024-13-01T00:00:00Z", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "1970-01-01T00:00:00Z",
            "2024-01-01T00:00:00", "2024-01-01 00:00:00Z", "2999-01-01T00:00:00.0000001Z"]))
    elif how == "target":
        body["target"] = {"community": draw(hostile_text), "building": draw(hostile_text.filter(lambda s: s != "b1"))}
    elif how == "args":
        extra = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in ("device", "all", "limit")))
        body["args"] = {**body.get("args", {}), extra: draw(json_values)}
    elif how == "missing":
        del body[draw(st.sampled_from([f for f in FIELDS if f != "args"]))]
    elif how == "extra":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS))] = draw(json_values)
    else:
        body["command"] = draw(hostile_text.filter(lambda s: s not in COMMANDS))
    return encode(body)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """A command with a field nested 9 to 20 000 levels deep (or the whole payload)."""
    depth = draw(st.integers(min_value=9, max_value=20_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opener * depth + "1" + closer * depth
    where = draw(st.sampled_from(["root", *FIELDS]))
    if where == "root":
        return inner.encode()
    text = json.dumps(base_command()).replace('"version": 1', '"version": 1, "x": 0')
    return text.replace('"x": 0', f'"{where}": {inner}', 1).encode()


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    """Just over the size limit, up to 1 MB: long strings, many keys, or padding."""
    size = draw(st.integers(min_value=MAX_COMMAND_BYTES + 1, max_value=1_000_000))
    kind = draw(st.sampled_from(["id", "args", "pad"]))
    body = base_command()
    if kind == "id":
        body["id"] = "a" * size
    elif kind == "args":
        body["args"] = {f"k{i}": i for i in range(min(size, 100_000) // 8)}
    else:
        return encode(body) + b" " * size
    return encode(body)


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A (mostly) valid command with undecodable bytes spliced in."""
    text = encode(base_command(draw(st.sampled_from(COMMANDS))))
    bad = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80",
                                b"\x80", b"\xf4\x90\x80\x80"]))
    at = draw(st.integers(min_value=0, max_value=len(text)))
    return text[:at] + bad + text[at:]


not_json = st.binary(max_size=3000) | st.text(max_size=200).map(str.encode) | \
    json_values.map(encode) | st.sampled_from([b"", b"null", b"NaN", b"[]", b'{"version": Infinity}',
                                               b'{"a": 1, "a": 2}', b"\x00" * 64])

CATEGORIES: dict[str, tuple[st.SearchStrategy[bytes], int]] = {
    "wrong_types": (wrong_types(), 2500),
    "hostile_fields": (hostile_fields(), 2500),
    "deeply_nested": (deeply_nested(), 1500),
    "huge": (huge(), 600),
    "invalid_utf8": (invalid_utf8(), 1500),
    "not_json": (not_json, 1500),
}


# ------------------------------------------------------------------------------------------- bulk


@pytest.mark.slow
def test_ten_thousand_hostile_payloads_are_each_rejected() -> None:
    gate = CommandGate(TOPICS, started_at=time.time() - 60)
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()

    def checker(category: str, strategy: st.SearchStrategy[bytes], examples: int) -> Callable[[], None]:
        @fuzz_settings(examples)
        @given(payload=strategy, name=st.sampled_from(COMMANDS))
        def check(payload: bytes, name: str) -> None:
            counts[category] += 1
            with pytest.raises(Rejected) as exc:
                gate.admit(TOPICS.command(name), payload)
            codes[exc.value.code] += 1
            assert exc.value.reason and len(exc.value.reason) <= 300

        return check  # type: ignore[no-any-return]

    for category, (strategy, examples) in CATEGORIES.items():
        checker(category, strategy, examples)()

    print(f"payloads by category: {dict(counts)}; rejection codes: {dict(codes)}")
    assert sum(counts.values()) >= 10_000, counts
    assert {"malformed", "too_large", "invalid", "bad_args", "wrong_target"} <= set(codes), codes
    # the gate is not wedged: nothing was remembered, a valid command still passes
    assert len(gate.seen) == 0
    assert gate.admit(TOPICS.command("status"), encode(base_command("status"))).name == "status"


@fuzz_settings(500)
@given(name=st.text(max_size=80), payload=st.sampled_from(COMMANDS).map(lambda c: encode(base_command(c))))
def test_any_command_topic_name_is_handled(name: str, payload: bytes) -> None:
    gate = CommandGate(TOPICS, started_at=time.time() - 60)
    topic = f"{TOPICS.base}/command/{name}"
    try:
        command = gate.admit(topic, payload)
    except Rejected as exc:
        assert exc.code in ("unknown_command", "invalid")
    else:
        assert command.name == name and json.loads(payload)["command"] == name


# ------------------------------------------------------------------------------------------- live


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.mark.timeout(300)
async def test_hostile_commands_over_mqtt_while_an_alarm_sounds(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=2)
    buzzer = mock_pins.pin(f"GPIO{spec.buzzer_pin}", pin_class=TimedMockPin)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    first, second = spec.detectors
    server = MqttRecorder(broker.host, broker.port, [f"{topics.reply}/#", f"{topics.base}/event/alarm"],
                          protocol=mqtt.MQTTv5)
    sent: list[bytes] = []
    halfway = threading.Event()
    target = 300

    # no shrinking against a live gateway: a failure is reported as found. Topic names stay valid MQTT
    # (the broker drops a client that publishes to a topic with control characters).
    @settings(fuzz_settings(target), phases=[Phase.generate])
    @given(payload=st.one_of(*(s for s, _ in CATEGORIES.values())), name=st.sampled_from(COMMANDS) | st.text(
        alphabet=st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="/+#"),
        min_size=1, max_size=20),
        correlation=st.none() | st.binary(min_size=1, max_size=64))
    def flood(payload: bytes, name: str, correlation: bytes | None) -> None:
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{topics.reply}/fuzz"
            props.CorrelationData = correlation
        server.publish(topics.command(name), payload[:300_000], properties=props, timeout=30)
        sent.append(payload)
        if len(sent) >= target // 2:
            halfway.set()

    def state(device: str) -> str:
        return next(str(d["state"]) for d in gateway.panel.snapshot()["devices"] if d["device"] == device)

    def results() -> list[Any]:
        return server.messages(f"{topics.reply}/#")

    try:
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: gateway.uplink_connected, timeout=30)
                sims[first.id].set_concentration(35.0)
                await eventually(lambda: state(first.id) == "high_alarm", timeout=30)
                await eventually(lambda: buzzer.first_high() is not None, timeout=10)
                started = time.monotonic()

                fuzzing = asyncio.ensure_future(asyncio.to_thread(flood))
                await eventually(lambda: halfway.is_set() or fuzzing.done(), timeout=120)
                sims[second.id].set_concentration(35.0)  # a new alarm in the middle of the flood
                await eventually(lambda: state(second.id) == "high_alarm", timeout=30)
                await fuzzing
                await eventually(lambda: len(results()) >= len(sent), timeout=120,
                                 message=lambda: f"{len(results())} results for {len(sent)} commands")
                annunciation = gateway.panel.snapshot()["annunciation"]
                stale = gateway.heartbeats.stale()
                ended = time.monotonic()
                await asyncio.to_thread(server.wait_for, lambda m: m.topic.endswith("/event/alarm")
                                        and m.json.get("device") == second.id, 30)
    finally:
        server.close()

    bodies = [m.json for m in results()]
    assert len(bodies) == len(sent) >= 200
    assert all(validator("command_result").is_valid(b) for b in bodies)
    assert {b["status"] for b in bodies} == {"rejected"}
    with_correlation = [m for m in results() if m.topic == f"{topics.reply}/fuzz"]
    assert all("CorrelationData" in m.properties for m in with_correlation)
    assert annunciation.sound.name == "GAS"
    assert stale == []
    # the buzzer kept playing its pattern all through the flood
    toggles = [t for t, _ in buzzer.changes if started <= t <= ended]
    assert len(toggles) >= 4, buzzer.changes[-10:]

