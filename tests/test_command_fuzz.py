"""Hostile remote commands: huge, deeply nested, wrong types, invalid UTF-8 — each rejected, nothing crashes.

Over 10 000 hypothesis-made payloads drive :class:`gateway.uplink.contract.CommandGate` directly. Then 10 000
more go through a real mosquitto into the real daemon (the panel in this process, its storage/uplink process
a real child) while a gas alarm sounds its buzzer: malformed JSON, wrong types, huge payloads, another
building, expired, replayed and unknown commands. Each gets exactly one result on its MQTT 5 response topic,
rejected with the code its kind calls for and a reason; neither process crashes; the buzzer keeps the
Temporal-4 timeline within its tolerance, and a second alarm raised during the flood is annunciated and
forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import load_config
from gateway.control.commands import COMMAND_ARGS
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
from gateway_sim.nullmodem import VirtualNullModem
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


#: Arguments that fit each command (what a valid command of that name carries).
VALID_ARGS: dict[str, dict[str, Any]] = {
    "reset": {"device": "gas-1"}, "test": {"device": "gas-1"}, "events": {"limit": 5},
    "buzzer_test": {"seconds_per_pattern": 0.1}, "relay_test": {"output": "valve-1", "seconds": 0.1},
    "scan": {"bus": "bus1", "from": 1, "to": 2},
}

#: Every argument name some command accepts.
ARG_NAMES = frozenset(k for args in COMMAND_ARGS.values() for k in args)


def base_command(name: str = "reset") -> dict[str, Any]:
    return command_message(name, community="c1", building="b1", args=VALID_ARGS.get(name, {}))


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
        extra = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in ARG_NAMES))
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


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hostile command: its kind, the command name in its topic, the payload and the codes it may get."""

    kind: str
    name: str
    payload: bytes
    codes: frozenset[str]


#: How many of each kind go through the broker (10 000 hostile commands in all).
LIVE_MIX = {"malformed": 1500, "wrong_types": 1500, "huge": 200, "wrong_building": 1500, "expired": 1500,
            "replayed": 1500, "unknown_command": 1500, "bad_args": 800}
#: Accepted originals whose ids the replays reuse (read-only ``status`` commands).
ORIGINALS = 15


def live_payloads(rng: random.Random, community: str, building: str, originals: list[bytes]) -> list[Hostile]:
    """The hostile mix of :data:`LIVE_MIX`, shuffled (deterministic for a seed)."""

    def body(name: str, **kwargs: Any) -> dict[str, Any]:
        args = {"all": True} if name in ("reset", "test") else VALID_ARGS.get(name)
        return command_message(name, community=community, building=building, args=kwargs.pop("args", args),
                               command_id=uuid.UUID(int=rng.getrandbits(128)).hex, **kwargs)

    def valid(name: str | None = None) -> dict[str, Any]:
        return body(name or rng.choice(COMMANDS))

    out: list[Hostile] = []

    def add(kind: str, name: str, payload: bytes, *codes: str) -> None:
        out.append(Hostile(kind, name, payload, frozenset(codes)))

    for _ in range(LIVE_MIX["malformed"]):
        name = rng.choice(COMMANDS)
        text = encode(valid(name))
        how = rng.randrange(6)
        if how == 0:
            payload = rng.randbytes(rng.randrange(1, 400))
            if rng.random() < 0.5:
                payload = b"\xff" + payload  # never valid UTF-8
        elif how == 1:
            payload = text[: rng.randrange(1, len(text) - 1)]  # truncated
        elif how == 2:
            payload = text.replace(b'"version": 1', b'"version": NaN', 1)
        elif how == 3:
            payload = text.replace(b'"version": 1', b'"version": 1, "version": 1', 1)
        elif how == 4:
            depth = rng.randrange(9, 3000)
            payload = b"[" * depth + b"1" + b"]" * depth
        else:
            payload = rng.choice([b"null", b"[]", b"42", b'"silence"', b"true", b"", b"{", b"}{"])
        if payload and payload[:1] == b"{" and payload == text:  # a cut that happens to leave it whole
            payload = payload[:-1]
        add("malformed", name, payload, "malformed")
    for _ in range(LIVE_MIX["wrong_types"]):
        name = rng.choice(COMMANDS)
        command = valid(name)
        field = rng.choice(["version", "id", "issued_at", "expires_at", "target", "args"])
        command[field] = rng.choice([None, True, 7, 2.5, [], ["x"], {"a": 1}] if field != "args" else
                                    [None, True, 7, "x", ["x"]])
        if field == "version" and command[field] == 1:
            command[field] = "1"
        add("wrong_types", name, encode(command), "invalid", "bad_args")
    for _ in range(LIVE_MIX["huge"]):
        name = rng.choice(COMMANDS)
        command = valid(name)
        size = rng.randrange(MAX_COMMAND_BYTES + 1, 200_000)
        if rng.random() < 0.5:
            command["id"] = "a" * size
            payload = encode(command)
        else:
            payload = encode(command) + b" " * size
        add("huge", name, payload, "too_large")
    for _ in range(LIVE_MIX["wrong_building"]):
        name = rng.choice(COMMANDS)
        command = valid(name)
        command["target"] = rng.choice([{"community": community, "building": f"b{rng.randrange(100, 999)}"},
                                        {"community": f"elsewhere-{rng.randrange(99)}", "building": building}])
        add("wrong_building", name, encode(command), "wrong_target")
    for _ in range(LIVE_MIX["expired"]):
        name = rng.choice(COMMANDS)
        ttl = rng.uniform(1, 300)
        command = body(name, issued_at=time.time() - ttl - rng.uniform(1, 86_400), ttl_s=ttl)
        add("expired", name, encode(command), "expired")
    for i in range(LIVE_MIX["replayed"]):
        add("replayed", "status", originals[i % len(originals)], "replayed")
    unknown = ["read", "config_show", "format_disk", "reboot", "STATUS", "scan_all", "relay-test",
               "silence2", "ｓｉｌｅｎｃｅ"]
    for _ in range(LIVE_MIX["unknown_command"]):
        name = rng.choice(unknown) if rng.random() < 0.7 else f"x{rng.getrandbits(32):08x}"
        command = valid("status")
        command["command"] = name
        add("unknown_command", name, encode(command), "unknown_command")
    for _ in range(LIVE_MIX["bad_args"]):
        name = rng.choice(["reset", "test", "events", "silence", "status", "buzzer_test", "relay_test", "scan"])
        args = {"reset": [{"device": 5}, {"devices": ["gas-1"]}, {"all": False}, {"device": "a", "all": True}],
                "buzzer_test": [{"seconds_per_pattern": 60}, {"seconds_per_pattern": "1"}],
                "relay_test": [{}, {"output": 5}, {"output": "valve-1", "seconds": 3600}],
                "scan": [{}, {"bus": "bus1", "from": 0}, {"bus": "bus1", "pause_polling": "yes"}],
                "test": [{}, {"device": ""}, {"all": "yes"}],
                "events": [{"limit": 5000}, {"kind": "everything"}, {"since": -1}, {"from_seq": 3}],
                "silence": [{"now": True}], "status": [{"verbose": 1}]}[name]
        add("bad_args", name, encode(body(name, args=rng.choice(args))), "bad_args")
    rng.shuffle(out)
    return out


def temporal4_problems(changes: list[tuple[float, bool]], start: float, end: float,
                       tolerance: float = 0.010) -> list[str]:
    """Where the buzzer's changes between ``start`` and ``end`` leave Temporal-4 (0.1 s on, 0.1 s off, four
    pulses, then 5 s off), each interval within ``tolerance`` seconds (the annunciator tests' tolerance)."""
    inside = [(t, on) for t, on in changes if start <= t <= end]
    problems = []
    pulses = 0
    paused = False  # the window may open in the middle of a cycle: count pulses from the first pause on
    for (t, on), (t_next, _) in itertools.pairwise(inside):
        lasted = t_next - t
        if on:
            pulses += 1
            if abs(lasted - 0.1) > tolerance:
                problems.append(f"pulse of {lasted:.3f} s at {t:.3f}")
        elif abs(lasted - 5.0) <= tolerance:
            if paused and pulses != 4:
                problems.append(f"{pulses} pulses before the pause at {t:.3f}")
            pulses, paused = 0, True
        elif abs(lasted - 0.1) > tolerance:
            problems.append(f"gap of {lasted:.3f} s at {t:.3f}")
    return problems


def test_the_temporal4_check_can_fail() -> None:
    good = [(0.0, True), (0.1, False), (0.2, True), (0.3, False), (0.4, True), (0.5, False), (0.6, True),
            (0.7, False), (5.7, True), (5.8, False)]
    assert temporal4_problems(good, 0, 10) == []
    assert temporal4_problems([(0.0, True), (0.3, False), (0.4, True)], 0, 10) == ["pulse of 0.300 s at 0.000"]
    assert temporal4_problems([(0.0, True), (0.1, False), (2.1, True)], 0, 10) == ["gap of 2.000 s at 0.100"]
    three = [(5.7, True), (5.8, False), (5.9, True), (6.0, False), (6.1, True), (6.2, False), (11.2, True)]
    assert temporal4_problems([*good[:-2], *three], 0, 20) == ["3 pulses before the pause at 6.200"]


class Flood:
    """The central server gone rogue: publishes every payload with QoS 1 (MQTT 5, a response topic and a
    correlation datum each: the payload's index) from its own thread, as fast as the answers come back, and
    collects the answers by correlation.

    At most :data:`WINDOW` commands are unanswered at a time: mosquitto queues at most 1000 QoS 1 messages for
    a subscriber (``max_queued_messages``) and drops the rest, so a faster sender would measure the broker's
    drops, not the gateway."""

    WINDOW = 500

    def __init__(self, host: str, port: int, reply: str) -> None:
        self.reply = reply
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flood-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.acked = 0
        self.results: dict[int, Any] = {}
        self.extra: list[Any] = []  # answers without a known correlation (there must be none)
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_connect = lambda client, *_: client.subscribe(reply, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(30):
            raise AssertionError("the flood client did not subscribe to its reply topic")

    def _on_publish(self, _c: Any, _u: Any, _mid: int, _reason: Any, _props: Any) -> None:
        with self._cond:
            self.acked += 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        body = json.loads(msg.payload)
        with self._cond:
            try:
                index = int(bytes(correlation)) if correlation is not None else -1
            except ValueError:
                index = -1
            if index in self.results or index < 0:
                self.extra.append(body)
            else:
                self.results[index] = body
            self._cond.notify_all()

    @property
    def answered(self) -> int:
        with self._cond:
            return len(self.results)

    def send(self, topic_of: Callable[[str], str], items: list[Hostile]) -> None:
        for i, item in enumerate(items):
            with self._cond:
                if not self._cond.wait_for(lambda: i - len(self.results) < self.WINDOW, timeout=120):  # noqa: B023
                    raise AssertionError(f"{i - len(self.results)} commands unanswered for 120 s")
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply
            props.CorrelationData = str(i).encode()
            self.client.publish(topic_of(item.name), item.payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


#: The alarm threads at SCHED_FIFO as deployed (docs/deploy.md): at normal priority, under the flood, a pulse of
#: the Temporal-4 timeline came 16 ms late (the pattern thread waited for a CPU or for a preempted GIL holder).
REALTIME_PRIORITY = 50


@pytest.mark.solo  # the alarm's Temporal-4 timeline is checked to 10 ms: not beside the other tests' load
@pytest.mark.slow  # 10 000 commands through a real broker and daemon
@pytest.mark.timeout(900)
async def test_ten_thousand_hostile_commands_through_the_broker_and_the_daemon(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any
) -> None:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=2, realtime_priority=REALTIME_PRIORITY)
    buzzer = mock_pins.pin(f"GPIO{spec.buzzer_pin}", pin_class=TimedMockPin)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    first, second = spec.detectors
    fuzz_reply = f"{topics.reply}/fuzz"
    server = MqttRecorder(broker.host, broker.port, [topics.reply, f"{topics.base}/event/alarm"],
                          protocol=mqtt.MQTTv5)
    rng = random.Random(20_261_204)

    def state(device: str) -> str:
        return next(str(d["state"]) for d in gateway.panel.snapshot()["devices"] if d["device"] == device)

    flood: Flood | None = None
    try:
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: gateway.uplink_connected, timeout=30)
                storage_pid = gateway.uplink_pid
                # issued once the gateway is up: one issued before its start (a slow start on a loaded machine)
                # would be refused as stale
                originals = [command_message("status", community=spec.community, building=spec.building,
                                             ttl_s=300, command_id=f"original-{i}") for i in range(ORIGINALS)]
                hostile = live_payloads(rng, spec.community, spec.building, [encode(o) for o in originals])
                assert len(hostile) == 10_000
                for original in originals:  # accepted once: their ids are the replays' ids
                    server.publish(topics.command("status"), original)
                await eventually(lambda: sum(1 for m in server.messages(topics.reply)
                                             if m.json.get("status") == "accepted") == ORIGINALS, timeout=60)
                # Freeze what is alive, as the panel does once it serves (runtime.gc_freeze; off in test sites,
                # which share the test's process). Full collections then walk only what is new, not the whole
                # test process with the panel in it: about 100 000 objects, 75–110 ms a collection, over the
                # timeline's 10 ms tolerance. Before the alarm, so that this collection stalls no pattern.
                gc.collect()
                gc.freeze()
                sims[first.id].set_concentration(35.0)
                await eventually(lambda: state(first.id) == "high_alarm", timeout=30)
                await eventually(lambda: buzzer.first_high() is not None, timeout=10)

                flood = Flood(broker.host, broker.port, fuzz_reply)
                started = time.monotonic()
                sending = asyncio.ensure_future(asyncio.to_thread(flood.send, topics.command, hostile))
                await eventually(lambda: flood.answered >= len(hostile) // 2, timeout=600,  # type: ignore[union-attr]
                                 message=lambda: f"{flood.answered} results so far")  # type: ignore[union-attr]
                sims[second.id].set_concentration(35.0)  # a new alarm in the middle of the flood
                await eventually(lambda: state(second.id) == "high_alarm", timeout=30)
                await sending
                await eventually(lambda: flood.answered >= len(hostile), timeout=600,  # type: ignore[union-attr]
                                 message=lambda: f"{flood.answered} results for {len(hostile)} commands")  # type: ignore[union-attr]
                # watch at least one whole Temporal-4 cycle (5.7 s), however fast the flood was answered
                await eventually(lambda: time.monotonic() >= started + 6.0, timeout=30)
                ended = time.monotonic()
                annunciation = gateway.panel.snapshot()["annunciation"]
                stale = gateway.heartbeats.stale()
                process = gateway.uplink_process()
                await asyncio.to_thread(server.wait_for, lambda m: m.topic.endswith("/event/alarm")
                                        and m.json.get("device") == second.id, 30)
                assert flood.acked == len(hostile)
    finally:
        gc.unfreeze()
        # the panel put this thread at SCHED_FIFO SUPPORT_PRIORITY, as it does its own; the next tests run without
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if flood is not None:
            flood.close()
        server.close()

    took = ended - started
    by_index = flood.results
    assert len(by_index) == len(hostile) and flood.extra == [], "exactly one result per command"
    wrong = []
    codes: Counter[tuple[str, str]] = Counter()
    for i, item in enumerate(hostile):
        result = by_index[i]
        codes[item.kind, result["code"]] += 1
        if not (validator("command_result").is_valid(result) and result["status"] == "rejected"
                and result["code"] in item.codes and result["reason"]):
            wrong.append((item.kind, item.payload[:120], result))
    print(f"{len(hostile)} hostile commands through mosquitto and the daemon in {took:.1f} s "
          f"({len(hostile) / took:.0f}/s); codes by kind: {dict(sorted(codes.items()))}")
    assert not wrong, wrong[:5]
    assert process["pid"] == storage_pid and process["starts"] == 1, ("the storage process restarted", process)
    assert stale == [] and annunciation.sound.name == "GAS"
    problems = temporal4_problems(list(buzzer.changes), started, ended)
    assert not problems, problems[:10]
    assert sum(1 for t, on in buzzer.changes if on and started <= t <= ended) >= 4
