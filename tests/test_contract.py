"""The MQTT contract: schemas, topics, the command gate, and every message of a real scenario against its schema.

The scenario runs ``gatewayd --config`` as a real subprocess (GPIOZERO_PIN_FACTORY=mock) against a simulated
bus in this process and a private mosquitto; a recording subscriber collects everything the gateway publishes
(start, alarm, supervisory, reset by a remote command, fault, kill -9 → Will, restart, planned stop) and
every message is checked against its JSON Schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator

from gateway.config import load_config
from gateway.uplink.contract import (
    MAX_VALIDITY_S,
    SCHEMA_NAMES,
    CommandGate,
    Rejected,
    SeenIds,
    SeenStore,
    availability_message,
    command_message,
    command_result,
    iso_time,
    schema,
    schema_name,
    validator,
)
from gateway.uplink.topics import Topics
from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway, simulated_detectors
from tests.support.mqtt import MqttRecorder, RecordedMessage
from tests.support.site import SiteSpec, build_site

GATEWAYD = str(Path(sys.executable).with_name("gatewayd"))
TOPICS = Topics("safety", "c1", "b1")
INSTALL = "0123456789abcdef"


# ------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_schema_is_draft_2020_12_with_a_version(name: str) -> None:
    s = schema(name)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(s)
    expected = {"command": {"const": 1}, "event": {"enum": [1, 2]}}.get(name, {"const": 2})
    assert s["properties"]["version"] == expected
    assert "version" in s["required"]
    if name != "command":  # every message the gateway publishes names its installation
        assert "install" in s["properties"]


def test_availability_builder_and_schema() -> None:
    online = availability_message(gateway="g", community="c1", building="b1", state="online", session=3,
                                  install=INSTALL)
    will = availability_message(gateway="g", community="c1", building="b1", state="offline", session=3,
                                reason="connection lost", install=INSTALL)
    assert validator("availability").is_valid(online)
    assert validator("availability").is_valid(will)
    assert not validator("availability").is_valid({**will, "reason": None})
    assert not validator("availability").is_valid({k: v for k, v in will.items() if k != "reason"})
    assert not validator("availability").is_valid({**online, "session": 0})


def test_command_result_builder_and_schema() -> None:
    common: dict[str, Any] = {"gateway": "g", "community": "c1", "building": "b1", "session": 1, "command": "reset",
                              "install": INSTALL}
    ok = command_result(command_id="a1", code="ok", data={"reset": ["d"]}, **common)
    refused = command_result(command_id="a1", code="refused", reason="still present", **common)
    failed = command_result(command_id="a1", code="failed", reason="uplink down", **common)
    unreadable = command_result(command_id=None, code="malformed", reason="not JSON", **common)
    assert [m["status"] for m in (ok, refused, failed, unreadable)] == ["accepted", "rejected", "failed", "rejected"]
    for m in (ok, refused, failed, unreadable):
        assert validator("command_result").is_valid(m), m
    assert not validator("command_result").is_valid({**refused, "reason": None})
    assert not validator("command_result").is_valid({**ok, "status": "rejected"})
    long = command_result(command_id="a", code="invalid", reason="x" * 5000, **common)
    assert validator("command_result").is_valid(long) and len(long["reason"]) <= 300


def test_command_result_data_is_plain_json() -> None:
    result = command_result(gateway="g", community="c1", building="b1", session=1, command_id="a", command="status",
                            code="ok", data={"x": float("nan"), "y": [float("inf"), 1.5], "when": object.__name__})
    assert result["data"] == {"x": None, "y": [None, 1.5], "when": "object"}
    json.dumps(result, allow_nan=False)


def test_iso_time_matches_the_event_time_format() -> None:
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"
    assert validator("availability").is_valid(availability_message(
        gateway="g", community="c", building="b", state="online", session=1, wall=1_700_000_000.999,
        install=INSTALL))


# ------------------------------------------------------------------------------------------- topics


def test_topics_give_each_building_its_own_subtree() -> None:
    t = TOPICS
    assert t.base == "safety/c1/b1"
    mine = [t.availability, t.birth, t.status, t.event("alarm"), t.command("reset"), t.reply]
    assert all(topic.startswith(t.base + "/") for topic in mine)
    other = Topics("safety", "c1", "b10")
    assert not any(mqtt.topic_matches_sub(f"{t.base}/#", topic) for topic in
                   (other.availability, other.event("alarm"), other.command("reset"), other.reply))
    # commands in and results out never overlap: the gateway does not receive its own results
    assert not mqtt.topic_matches_sub(t.command_filter, t.reply)
    assert not mqtt.topic_matches_sub(t.command_filter, f"{t.reply}/x")
    assert t.command_name(t.command("silence")) == "silence"
    assert t.command_name(other.command("silence")) is None
    assert t.command_name(t.reply) is None


def test_topics_refuse_levels_that_would_widen_an_acl() -> None:
    for bad in ("", "a/b", "+", "#", "x#"):
        with pytest.raises(ValueError):
            Topics("safety", bad, "b1")
        with pytest.raises(ValueError):
            Topics("safety", "c1", bad)
    with pytest.raises(ValueError):
        Topics("safety/#", "c1", "b1")
    assert Topics("org/safety", "c1", "b1").base == "org/safety/c1/b1"


def test_reply_topics_must_stay_in_the_reply_subtree() -> None:
    t = TOPICS
    assert t.is_reply_topic(t.reply)
    assert t.is_reply_topic(f"{t.reply}/server-1/42")
    for bad in ("safety/c1/b1/replyx", "safety/c1/b2/reply", f"{t.reply}/+", f"{t.reply}/#", f"{t.reply}/",
                "safety/c1/b1/event/alarm"):
        assert not t.is_reply_topic(bad), bad


def test_schema_name_by_topic() -> None:
    t = TOPICS
    assert schema_name(t, t.availability) == "availability"
    assert schema_name(t, t.birth) == "birth"
    assert schema_name(t, t.status) == "status"
    assert schema_name(t, t.event("fault")) == "event"
    assert schema_name(t, t.command("reset")) == "command"
    assert schema_name(t, f"{t.reply}/x") == "command_result"
    assert schema_name(t, "safety/c1/b2/birth") is None


# ------------------------------------------------------------------------------------------- gate


def gate(now: float, *, started_at: float | None = None, seen: SeenIds | None = None) -> CommandGate:
    return CommandGate(TOPICS, started_at=now - 100 if started_at is None else started_at,
                       clock=lambda: now, seen=seen)


def payload(name: str = "silence", **kwargs: Any) -> bytes:
    return json.dumps(command_message(name, community="c1", building="b1", **kwargs)).encode()


def test_gate_admits_a_valid_command_once() -> None:
    now = time.time()
    g = gate(now)
    body = payload("reset", args={"device": "gas-1"}, command_id="cmd-1", issued_at=now)
    command = g.admit(TOPICS.command("reset"), body)
    assert (command.id, command.name, dict(command.args)) == ("cmd-1", "reset", {"device": "gas-1"})
    assert validator("command").is_valid(json.loads(body))
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("reset"), body)
    assert exc.value.code == "replayed"


def test_seen_ids_are_forgotten_after_expiry_and_bounded() -> None:
    seen = SeenIds(capacity=2)
    seen.add("a", expires_at=10.0, now=0.0)
    seen.add("b", expires_at=20.0, now=0.0)
    with pytest.raises(Rejected) as exc:
        seen.add("c", expires_at=30.0, now=5.0)
    assert exc.value.code == "busy"
    seen.add("c", expires_at=30.0, now=10.0)  # "a" expired at 10 s
    assert "a" not in seen and "b" in seen and len(seen) == 2
    # a replay of "a" after its expiry is refused by the gate as expired, never run twice
    now = 1_000.0
    g = gate(now, seen=SeenIds())
    old = payload(command_id="x", issued_at=now - 61, ttl_s=60)
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("silence"), old)
    assert exc.value.code == "expired"


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"issued_at_offset": -10, "ttl_s": 5}, "expired"),
    ({"issued_at_offset": 0, "ttl_s": MAX_VALIDITY_S + 1}, "invalid"),
    ({"issued_at_offset": 31, "ttl_s": 60}, "not_yet_valid"),
    ({"issued_at_offset": -150, "ttl_s": 200}, "stale"),  # issued before the gateway started (restart)
])
def test_gate_validity_window(kwargs: dict[str, float], code: str) -> None:
    now = 10_000.0
    g = gate(now, started_at=now - 100)
    body = payload(issued_at=now + kwargs["issued_at_offset"], ttl_s=kwargs["ttl_s"])
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("silence"), body)
    assert exc.value.code == code


def test_gate_accepts_offsets_and_rejects_a_trailing_newline_in_the_id() -> None:
    now = time.time()
    body = command_message("status", community="c1", building="b1", issued_at=now)
    body["issued_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(now + 8 * 3600))
    assert gate(now).admit(TOPICS.command("status"), json.dumps(body).encode()).name == "status"
    body["id"] = "abc\n"
    with pytest.raises(Rejected) as exc:
        gate(now).admit(TOPICS.command("status"), json.dumps(body).encode())
    assert exc.value.code == "invalid"


def test_gate_refuses_every_command_while_the_clock_is_not_synchronised() -> None:
    now = time.time()
    synced = {"now": False}
    g = CommandGate(TOPICS, started_at=now - 100, clock=lambda: now, synchronised=lambda: synced["now"])
    body = payload("reset", args={"all": True}, command_id="cmd-clock", issued_at=now)
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("reset"), body)
    assert exc.value.code == "clock_unsynchronised" and "not synchronised" in exc.value.reason
    assert len(g.seen) == 0, "a refused command is not remembered"
    # an expired command is refused for the clock too: its expiry cannot be judged either way
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("silence"), payload(issued_at=now - 200, ttl_s=60))
    assert exc.value.code == "clock_unsynchronised"
    synced["now"] = True
    assert g.admit(TOPICS.command("reset"), body).id == "cmd-clock"
    assert validator("command_result").is_valid(command_result(
        gateway="g", community="c1", building="b1", session=1, command_id="x", command="reset",
        code="clock_unsynchronised", reason="the gateway's clock is not synchronised", install=INSTALL))


def test_the_default_clock_check_follows_the_kernel_unless_a_test_environment_says(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import clock

    monkeypatch.setenv(clock.ASSUME_ENV, "0")
    g = CommandGate(TOPICS, started_at=time.time() - 100)
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("status"), payload("status"))
    assert exc.value.code == "clock_unsynchronised"
    monkeypatch.delenv(clock.ASSUME_ENV)
    monkeypatch.setattr(clock, "clock_synchronised", lambda: False)
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("status"), payload("status"))
    assert exc.value.code == "clock_unsynchronised"
    monkeypatch.setattr(clock, "clock_synchronised", lambda: True)
    assert g.admit(TOPICS.command("status"), payload("status")).name == "status"


def test_seen_ids_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.db.commands"
    now = 50_000.0
    first = gate(now, started_at=now - 100, seen=SeenIds(store=SeenStore(path)))
    body = payload("reset", args={"all": True}, command_id="cmd-once", issued_at=now, ttl_s=120)
    first.admit(TOPICS.command("reset"), body)
    first.admit(TOPICS.command("silence"), payload(command_id="short", issued_at=now, ttl_s=5))
    first.seen.store.close()  # type: ignore[union-attr]
    # a restart 10 s later: the same command again is a replay, not a new command (nor merely "stale")
    later = now + 10
    second = gate(later, started_at=later - 1, seen=SeenIds(store=SeenStore(path)))
    assert "cmd-once" in second.seen
    with pytest.raises(Rejected) as exc:
        second.admit(TOPICS.command("reset"), body)
    assert exc.value.code == "replayed"
    # a new command after the restart is remembered too; expired ids leave the file
    second.admit(TOPICS.command("silence"), payload(command_id="after", issued_at=later, ttl_s=60))
    assert set(dict(second.seen.store.load(10))) == {"cmd-once", "after"}  # type: ignore[union-attr]
    # without the file (memory only) a restart forgets: the replay is refused only as stale
    forgetful = gate(later, started_at=later - 1, seen=SeenIds())
    with pytest.raises(Rejected) as exc:
        forgetful.admit(TOPICS.command("reset"), body)
    assert exc.value.code == "stale"


def test_a_command_id_that_cannot_be_recorded_is_not_run(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "events.db.commands")
    now = 50_000.0
    g = gate(now, seen=SeenIds(store=store))
    store.close()  # the disk went away
    with pytest.raises(Rejected) as exc:
        g.admit(TOPICS.command("silence"), payload(command_id="lost", issued_at=now))
    assert exc.value.code == "error" and "not run" in exc.value.reason
    assert "lost" not in g.seen


# ------------------------------------------------------------------------------------------- scenario


STATION_ADDRESS = 9
STATION_TOML = f"""
[[devices]]
id = "u1-station"
kind = "extinguisher_station"
unit = "u1"
bus = "bus1"
address = {STATION_ADDRESS}
profile = "io-4di"
"""


def validate_all(topics: Topics, messages: list[RecordedMessage]) -> dict[str, int]:
    """Every message validates against the schema its topic names; returns counts per schema."""
    counts: dict[str, int] = {}
    problems = []
    for m in messages:
        name = schema_name(topics, m.topic)
        if name is None:
            problems.append(f"{m.topic}: not a contract topic")
            continue
        counts[name] = counts.get(name, 0) + 1
        if not m.is_json:
            problems.append(f"{m.topic}: not JSON: {m.payload[:100]!r}")
            continue
        for error in validator(name).iter_errors(m.json):
            problems.append(f"{m.topic}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
    assert not problems, "\n".join(problems)
    return counts


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


class Daemon:
    """``gatewayd --config`` as a subprocess on mock pins."""

    def __init__(self, config: Path, log: Path) -> None:
        env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([GATEWAYD, "--config", str(config)], env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=config.parent,
                                     start_new_session=True)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        """SIGKILL to every process of the daemon at once, as a power cut would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()


@pytest.mark.timeout(180)
def test_every_message_of_a_scenario_follows_its_schema(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1, community="c1", building="b1")
    config = tmp_path / "site.toml"
    config.write_text(spec.toml + STATION_TOML, encoding="utf-8")
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder: MqttRecorder = mqtt_recorder_factory(topics=f"{topics.base}/#")
    log = tmp_path / "gatewayd.log"
    detector_spec = spec.detectors[0]

    def wait_topic(suffix: str, timeout: float = 30.0, **fields: Any) -> RecordedMessage:
        def match(m: RecordedMessage) -> bool:
            body = m.json
            return (m.topic == f"{topics.base}/{suffix}" and isinstance(body, dict)
                    and all(body.get(k) == v for k, v in fields.items()))
        try:
            return recorder.wait_for(match, timeout=timeout)
        except AssertionError:
            print(log.read_text(errors="replace")[-4000:])
            raise

    bus = SimulatedBus(modem.device_port)
    detector = bus.add_gas_detector(detector_spec.address, "A", unit="%LEL", decimals=1)
    detector.set_status("normal")
    station = bus.add_io_station(STATION_ADDRESS)
    for address, value in ((0, True), (1, True), (2, True), (3, False)):  # present, pressure ok, shut, clear
        station.set_discrete_input(address, value)
    with bus:
        first = Daemon(config, log)
        try:
            online = wait_topic("availability", state="online")
            session = online.json["session"]
            wait_topic("birth", session=session)
            wait_topic("status", session=session)

            detector.set_concentration(35.0)
            wait_topic("event/alarm", action="raised", device=detector_spec.id, level="high")
            station.set_discrete_input(0, False)  # the extinguisher is taken from its bracket
            wait_topic("event/supervisory", action="raised", device="u1-station", code="removed")
            detector.set_concentration(0.0)
            wait_topic("event/alarm", action="cleared", device=detector_spec.id)

            reset = command_message("reset", community="c1", building="b1", args={"all": True})
            recorder.publish(topics.command("reset"), reset)
            result = wait_topic("reply", id=reset["id"])
            assert result.json["status"] == "accepted", result.json
            wait_topic("event/reset", action="reset", device=detector_spec.id)

            bus.responding(detector_spec.address, False)
            wait_topic("event/fault", action="raised", device=detector_spec.id, code="offline")
        finally:
            first.kill()  # SIGKILL: no clean offline, the broker publishes the Will
        will = wait_topic("availability", state="offline", session=session)
        assert will.json["reason"] == "connection lost"

        bus.responding(detector_spec.address, True)
        second = Daemon(config, log)
        try:
            wait_topic("availability", state="online", session=session + 1)
            second_birth = wait_topic("birth", session=session + 1).json
            wait_topic("status", session=session + 1)
            second.proc.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        finally:
            second.kill()
        planned = wait_topic("availability", state="offline", session=session + 1)
        assert planned.json["reason"] == "planned stop"

    messages = recorder.messages()
    counts = validate_all(topics, messages)
    assert set(counts) == set(SCHEMA_NAMES), counts
    events = [m.json for m in messages if schema_name(topics, m.topic) == "event"]
    assert {"alarm", "supervisory", "reset", "fault", "telemetry"} <= {e["kind"] for e in events}
    for e in events:  # the topic names the kind; the body names the building and the device's place
        assert (e["community"], e["building"]) == ("c1", "b1")
        if e.get("device") == detector_spec.id:
            assert (e["unit"], e["household"]) == (detector_spec.unit, detector_spec.household)
    # sequence numbers within each session have no gaps and ids are <gateway>:<install>:<session>:<seq>
    for s in {e["session"] for e in events}:
        seqs = sorted({e["seq"] for e in events if e["session"] == s})
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert all(e["event_id"] == f"{e['gateway']}:{e['install']}:{e['session']}:{e['seq']}" for e in events)
    # where each session ended: the birth lists the sessions before it, birth and status the current one's end
    ended = max(e["seq"] for e in events if e["session"] == session)
    assert second_birth["sessions"][0]["session"] == session, second_birth["sessions"]
    assert second_birth["sessions"][0]["last_seq"] >= ended  # what the kill -9 left unsent is listed too
    ends: dict[int, int] = {}
    for m in messages:
        if schema_name(topics, m.topic) in ("birth", "status"):
            assert m.json["last_seq"] >= ends.get(m.json["session"], 0), "a session's announced end never goes back"
            ends[m.json["session"]] = m.json["last_seq"]
    assert ends[session] > 0 and second_birth["last_seq"] >= 0
    installs = {m.json["install"] for m in messages if isinstance(m.json, dict) and "install" in m.json}
    assert len(installs) == 1, "a restart keeps the installation; every message names it"
    # after the Will nothing from session 1; the planned stop is the last word of session 2
    availability = [m.json for m in messages if m.topic == topics.availability]
    assert [(a["state"], a["session"]) for a in availability] == [
        ("online", session), ("offline", session), ("online", session + 1), ("offline", session + 1)]


# ------------------------------------------------------------------------------------------- status


@pytest.mark.timeout(120)
async def test_status_at_start_then_periodically_with_link_quality(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
    mqtt_recorder_factory: Any,
) -> None:
    spec: SiteSpec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db",
                                broker_port=broker.port, socket_path=tmp_path / "control.sock", households=2,
                                mqtt_protocol=311)
    path = spec.write(tmp_path / "site.toml")
    path.write_text(path.read_text().replace("[mqtt]\n", "[mqtt]\nstatus_interval_s = 0.5\n", 1))
    cfg = load_config(path)
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder: MqttRecorder = mqtt_recorder_factory(topics=[topics.status, topics.availability])
    silent = spec.detectors[1]

    def statuses() -> list[dict[str, Any]]:
        return [m.json for m in recorder.messages(topics.status)]

    with simulated_detectors(modem.device_port, spec.detectors) as (bus, _sims):
        async with running_gateway(cfg) as gateway:
            await eventually(lambda: len(statuses()) >= 1, timeout=30)
            first = statuses()[0]
            assert first["session"] == gateway.supervisor.beat["session"]
            bus.responding(silent.address, False)

            def degraded() -> dict[str, Any] | None:
                for s in statuses():
                    row = s["links"]["buses"][0]
                    if row["window_errors"] and row["success_ratio"] is not None and row["success_ratio"] < 1:
                        return s
                return None

            status = await eventually(degraded, timeout=30)
            await eventually(lambda: len(statuses()) >= 3, timeout=30)  # it keeps coming
            # once everything stored has its PUBACK the backlog is empty, and says so: no count, no age
            drained = await eventually(lambda: next((s for s in statuses() if s["backlog"]["events"] == 0
                                                     and s["uplink"]["inflight"] == 0), None), timeout=30,
                                       message="no status ever reported an empty backlog")
    assert all(validator("status").is_valid(s) for s in statuses())
    times = [s["time"] for s in statuses()]
    assert times == sorted(times)
    assert status["uplink"]["rtt_ms"] is not None and status["uplink"]["delivered"] >= 1
    assert status["devices"]["total"] == 2
    assert sum(status["devices"]["by_state"].values()) == 2
    assert [d["device"] for d in status["links"]["devices"]] == [silent.id]
    assert status["links"]["devices"][0]["comm_errors"] >= 1
    assert drained["backlog"] == {"events": 0, "oldest_age_s": None}, drained
    # a count and an age come together (both or neither) in every status
    assert all((s["backlog"]["events"] == 0) == (s["backlog"]["oldest_age_s"] is None) for s in statuses())
    assert status["storage"]["fault"] is None and status["storage"]["evicted_undelivered"]["alarm"] == 0
    assert status["storage"]["history"] >= 1  # delivered events kept for inspection


def test_status_and_birth_carry_the_second_path_by_named_fields_only() -> None:
    from gateway.annunciation import Annunciation
    from gateway.uplink.contract import StatusReporter, UplinkFigures, birth_message

    snapshot = {"devices": [], "annunciation": Annunciation()}
    path = {"path": "down", "down_for_s": 95.2, "down_reason": "broker unreachable", "waiting": 2,
            "oldest_waiting_s": 21.5, "ack_deadline_s": 20.0, "path_down_s": 90.0,
            "fault": "2 urgent events without acknowledgement for 21 s"}
    modem = {"problem": "no signal", "sim": "ready", "registered": True, "network": "HomeNetwork",
             "operator": "CHINA MOBILE", "signal_percent": 0, "manufacturer": "Quectel", "model": "EC25",
             "device": "/dev/ttyUSB2", "imsi": "460001234567890"}
    sms = {"configured": True, "process": "up", "owed": 1, "pending": 3, "sent": 7, "held_back": 2,
           "last_sent": 1.0, "mode": "fallback", "contacts": {"relatives": 2}, "recipient": "+8613900000101",
           "modem": modem}
    status = StatusReporter(gateway="g", community="c1", building="b1", software="1").build(
        session=1, uplink=UplinkFigures(rtt_ms=None, connections=1, delivered=0, rejected=0, inflight=0),
        backlog=(0, None), snapshot=snapshot, buses=[], transmission=path, sms=sms)
    assert status["transmission"] == {k: path[k] for k in ("path", "down_for_s", "down_reason", "waiting",
                                                              "oldest_waiting_s", "fault")}
    assert status["sms"] == {"configured": True, "process": "up", "owed": 1, "pending": 3, "sent": 7,
                             "held_back": 2, "modem": {k: v for k, v in modem.items() if k not in ("device", "imsi")}}
    birth = birth_message(gateway="g", community="c1", building="b1", session=1, software="1",
                          config={"units": [], "households": 0, "devices": 0, "buses": []}, snapshot=snapshot,
                          install=INSTALL, sms=sms)
    assert birth["sms"] == {"configured": True, "process": "up", "modem": status["sms"]["modem"]}
    down = StatusReporter(gateway="g", community="c1", building="b1", software="1").build(
        session=1, uplink=UplinkFigures(rtt_ms=None, connections=1, delivered=0, rejected=0, inflight=0),
        backlog=(0, None), snapshot=snapshot, buses=[], sms={"configured": True, "process": "down",
                                                            "reason": "the sms process did not answer"})
    assert down["sms"] == {"configured": True, "process": "down", "reason": "the sms process did not answer"}
    assert "transmission" not in down  # an older panel without the figures: the field stays out
    for message in ({**status, "install": INSTALL}, {**down, "install": INSTALL}):
        assert validator("status").is_valid(message), list(validator("status").iter_errors(message))
    assert validator("birth").is_valid(birth), list(validator("birth").iter_errors(birth))
    assert "8613900000101" not in json.dumps([status, birth]) and "460001234567890" not in json.dumps(status)
    assert not validator("status").is_valid({**status, "install": INSTALL,
                                             "sms": {**status["sms"], "recipient": "+8613900000101"}})


# ------------------------------------------------------------------------------------------- operator actions


GATEWAYCTL = str(Path(sys.executable).with_name("gatewayctl"))


@pytest.mark.timeout(180)
def test_operator_tests_follow_the_schema(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    """A buzzer test (gatewayctl), a walk test and a range of events (MQTT commands): every message follows its
    schema.

    A buzzer test exercises the gateway's own sounder: its events name no device or unit (there is none), and
    event.json allows exactly that for ``test`` events with ``code: buzzer``."""
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1, community="c1", building="b1")
    config = tmp_path / "site.toml"
    config.write_text(spec.toml, encoding="utf-8")
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder: MqttRecorder = mqtt_recorder_factory(topics=f"{topics.base}/#")
    log = tmp_path / "gatewayd.log"
    detector_spec = spec.detectors[0]

    def wait_topic(suffix: str, timeout: float = 30.0, **fields: Any) -> RecordedMessage:
        def match(m: RecordedMessage) -> bool:
            body = m.json
            return (m.topic == f"{topics.base}/{suffix}" and isinstance(body, dict)
                    and all(body.get(k) == v for k, v in fields.items()))
        try:
            return recorder.wait_for(match, timeout=timeout)
        except AssertionError:
            print(log.read_text(errors="replace")[-4000:])
            raise

    bus = SimulatedBus(modem.device_port)
    detector = bus.add_gas_detector(detector_spec.address, "A", unit="%LEL", decimals=1)
    detector.set_status("normal")
    started = time.monotonic()
    with bus:
        daemon = Daemon(config, log)
        try:
            wait_topic("availability", state="online")
            wait_topic("status")
            played = subprocess.run([GATEWAYCTL, "--config", str(config), "buzzer-test", "--seconds", "0.1", "--json"],
                                    capture_output=True, text=True, timeout=60)
            assert played.returncode == 0, (played.stdout, played.stderr)
            wait_topic("event/test", action="started", code="buzzer")
            wait_topic("event/test", action="ended", code="buzzer")

            walk = command_message("test", community="c1", building="b1", args={"device": detector_spec.id})
            recorder.publish(topics.command("test"), walk)
            assert wait_topic("reply", id=walk["id"]).json["status"] == "accepted"
            wait_topic("event/test", action="started", device=detector_spec.id)
            detector.set_concentration(35.0)
            detected = wait_topic("event/test", action="detected", device=detector_spec.id).json

            # a range of this session by seq, as a consumer filling a gap asks for it
            ask = command_message("events", community="c1", building="b1", args={
                "install": detected["install"], "session": detected["session"], "from_seq": 1, "to_seq": 3})
            recorder.publish(topics.command("events"), ask)
            answer = wait_topic("reply", id=ask["id"]).json
            assert answer["status"] == "accepted", answer
            assert [e["seq"] for e in answer["data"]["events"]] == [1, 2, 3]
            assert {e["session"] for e in answer["data"]["events"]} == {detected["session"]}
            other = command_message("events", community="c1", building="b1", args={
                "install": "0123456789abcdef", "session": detected["session"], "from_seq": 1, "to_seq": 3})
            recorder.publish(topics.command("events"), other)
            assert wait_topic("reply", id=other["id"]).json["data"]["events"] == [], "another installation's"
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
        finally:
            daemon.kill()
        wait_topic("availability", state="offline")
    messages = recorder.messages()
    counts = validate_all(topics, messages)
    tests = [m.json for m in messages if m.topic == topics.event("test")]
    buzzer = [t for t in tests if t.get("code") == "buzzer"]
    assert [t["action"] for t in buzzer] == ["started", "ended"]
    assert all("device" not in t and "unit" not in t for t in buzzer), "the sounder belongs to no unit"
    print(f"operator-test contract: {len(messages)} messages ({counts}) valid in {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(180)
def test_a_reinstall_is_a_new_installation_whose_ids_never_repeat_the_old_ones(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mqtt_recorder_factory: Any
) -> None:
    """gatewayd, then the same site with its database purged (as ``install --purge`` or a new SD card leave it):
    session 1 again, a new ``install``, no event id in common, every message valid."""
    db = tmp_path / "events.db"
    spec = build_site(bus_port=modem.gateway_port, db_path=db, broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1, community="c1", building="b1")
    config = tmp_path / "site.toml"
    config.write_text(spec.toml, encoding="utf-8")
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder: MqttRecorder = mqtt_recorder_factory(topics=f"{topics.base}/#")
    log = tmp_path / "gatewayd.log"
    detector_spec = spec.detectors[0]
    bus = SimulatedBus(modem.device_port)
    detector = bus.add_gas_detector(detector_spec.address, "A", unit="%LEL", decimals=1)
    detector.set_status("normal")

    def events_of(install: str) -> list[dict[str, Any]]:
        return [m.json for m in recorder.messages(f"{topics.base}/event/#") if m.json.get("install") == install]

    installs: list[str] = []

    def online_anew(m: RecordedMessage, seen: tuple[str, ...]) -> bool:
        return (m.topic == topics.availability and m.json.get("state") == "online"
                and m.json.get("install") not in seen)

    with bus:
        for run in range(2):
            if run:
                for path in tmp_path.glob("events.db*"):
                    path.unlink()
            daemon = Daemon(config, log)
            try:
                seen = tuple(installs)
                online = recorder.wait_for(functools.partial(online_anew, seen=seen), timeout=30)
                installs.append(online.json["install"])
                assert online.json["session"] == 1
                detector.set_concentration(35.0 if run else 12.0)
                topic, install = topics.event("alarm" if run else "telemetry"), installs[-1]
                recorder.wait_for(lambda m: m.topic == topic and m.json.get("install") == install,  # noqa: B023
                                  timeout=30)
                daemon.proc.send_signal(signal.SIGTERM)
                assert daemon.wait(timeout=60) == 0
            finally:
                daemon.kill()
    first, second = (events_of(i) for i in installs)
    assert installs[0] != installs[1]
    assert first and second and {e["session"] for e in first} == {e["session"] for e in second} == {1}
    assert not {e["event_id"] for e in first} & {e["event_id"] for e in second}
    validate_all(topics, recorder.messages())


# ------------------------------------------------------------------------------------------- every action, every fault

RELAY = "u1-gas-valve"
ACTIONS_TOML = f"""
[[devices]]
id = "u1-station"
kind = "extinguisher_station"
unit = "u1"
bus = "bus1"
address = {STATION_ADDRESS}
profile = "io-4di"

[[devices]]
id = "u1-cabinet-door"
kind = "cabinet_door"
unit = "u1"
pin = 23
supervision_pin = 24
contact = "NC"
"""
#: Every fault kind the gateway raises (docs/alarms.md), and how this test causes it.
FAULT_KINDS = ("sensor_fault", "data_error", "needs_calibration", "comms_fault", "unit_mismatch", "offline",
               "contact_unplausible", "port_lost", "stale_thread", "storage_full")


@pytest.mark.slow  # about 30 s: every operator action and every fault kind, one after another
@pytest.mark.timeout(300)
async def test_every_operator_action_and_every_fault_kind_follow_the_schema(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
    mqtt_recorder_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The panel in this process (its pins MockFactory's), its storage/uplink process a real child, a recording
    subscriber on the gateway's whole subtree. Operator actions by ``gatewayctl`` (buzzer test, relay test,
    walk test, reset, scan) and by MQTT (the same, and silence, status, rebirth, events), a walk test that
    skips the devices in alarm or fault, and every fault kind raised and cleared: every message recorded follows
    its schema."""
    from gateway import failpoints

    full, hang = tmp_path / "disk-full", tmp_path / "bus-hang"
    monkeypatch.setenv("GATEWAY_FAILPOINTS", f"storage_full=outbox@{full}")  # read by the storage process
    monkeypatch.setitem(failpoints._POINTS, ("bus_hang", "bus1"), str(hang))  # this process: the bus thread
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=3)
    relay = f'\n[[outputs.relays]]\nid = "{RELAY}"\npin = 12\nname = "Unit 1 gas valve"\n'
    toml = spec.toml.replace("\n[alarm]", relay + "\n[alarm]", 1)
    toml = toml.replace("[mqtt]\n", "[mqtt]\nstatus_interval_s = 0.5\n", 1)
    config = tmp_path / "site.toml"
    config.write_text(toml + ACTIONS_TOML, encoding="utf-8")
    cfg = load_config(config)
    topics = Topics(spec.topic_prefix, spec.community, spec.building)
    recorder: MqttRecorder = mqtt_recorder_factory(topics=f"{topics.base}/#")
    det1, det2, det3 = spec.detectors

    async def seen(suffix: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        def match(m: RecordedMessage) -> bool:
            body = m.json
            return (m.topic == f"{topics.base}/{suffix}" and isinstance(body, dict)
                    and all(body.get(k) == v for k, v in fields.items()))
        message = await asyncio.to_thread(recorder.wait_for, match, timeout)
        return dict(message.json)

    async def ctl(*args: str) -> dict[str, Any]:
        done = await asyncio.to_thread(subprocess.run, [GATEWAYCTL, "--config", str(config), "--json", *args],
                                       capture_output=True, text=True, timeout=120)
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    async def mqtt_command(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        body = command_message(name, community=spec.community, building=spec.building, args=args)
        recorder.publish(topics.command(name), body)
        return await seen("reply", id=body["id"])

    def reading_of(device: str) -> Any:
        return next(d["value"] for d in gateway.panel.snapshot()["devices"] if d["device"] == device)

    bus = SimulatedBus(modem.device_port)
    sims = {d.id: bus.add_gas_detector(d.address, "A", unit="ppm" if d is det3 else "%LEL", decimals=1)
            for d in spec.detectors}
    for sim in sims.values():
        sim.set_status("normal")
    station = bus.add_io_station(STATION_ADDRESS)
    for address, value in ((0, True), (1, True), (2, True), (3, False)):
        station.set_discrete_input(address, value)
    started = time.monotonic()
    with bus:
        async with running_gateway(cfg) as gateway:
            await seen("availability", state="online")
            await seen("birth")
            await seen("status")
            # a supervised door contact with both sides open is a wiring fault; closing its main side clears it
            await seen("event/fault", action="raised", device="u1-cabinet-door", code="contact_unplausible")
            mock_pins.pin("GPIO23").drive_low()
            await seen("event/fault", action="cleared", device="u1-cabinet-door", code="contact_unplausible")
            await seen("event/fault", action="raised", device=det3.id, code="unit_mismatch")  # ppm, not %LEL

            # --- operator actions by gatewayctl
            assert (await ctl("buzzer-test", "--seconds", "0.1"))["ok"]
            await seen("event/test", action="ended", code="buzzer")
            assert (await ctl("relay-test", RELAY, "--seconds", "0.2"))["ok"]
            await seen("event/relay", action="off", code=RELAY)
            walk = await ctl("test", det1.id)
            assert walk["data"] == {"started": [det1.id], "skipped": []}, walk
            sims[det1.id].set_concentration(35.0)
            await seen("event/test", action="detected", device=det1.id)
            sims[det1.id].set_concentration(0.0)
            # gas still there when the test ends would count for real
            await eventually(lambda: reading_of(det1.id) == 0.0, message="the gas did not go")
            reset = await ctl("reset", "--all")
            assert reset["data"]["tests_ended"] == [det1.id] and reset["data"]["reset"] == [], reset
            scan = await ctl("scan", "bus1", "--from", "10", "--to", "20", "--pause-polling")
            assert scan["ok"] and scan["data"]["pause_windows"] == 1, scan
            await seen("event/system", action="resumed", code="polling_resumed")

            # --- operator actions by MQTT
            assert (await mqtt_command("test", {"device": det2.id}))["data"]["started"] == [det2.id]
            assert (await mqtt_command("reset", {"all": True}))["data"]["tests_ended"] == [det2.id]
            for name in ("silence", "status", "rebirth", "events"):
                assert (await mqtt_command(name))["status"] == "accepted", name
            buzzer = await mqtt_command("buzzer_test", {"seconds_per_pattern": 0.1})
            assert buzzer["status"] == "accepted" and len(buzzer["data"]["patterns"]) == 5, buzzer
            await seen("event/test", action="ended", code="buzzer", source=f"mqtt:{buzzer['id']}")
            relay_test = await mqtt_command("relay_test", {"output": RELAY, "seconds": 0.2})
            assert relay_test["data"]["left_on_by_linkage"] is False, relay_test
            await seen("event/relay", action="off", code=RELAY, source=f"mqtt:{relay_test['id']}")
            refused_scan = await mqtt_command("scan", {"bus": "bus1", "from": 10, "to": 12})
            assert (refused_scan["code"], "pause_polling" in refused_scan["reason"]) == ("refused", True), refused_scan
            scan = await mqtt_command("scan", {"bus": "bus1", "from": 10, "to": 20, "pause_polling": True})
            assert scan["status"] == "accepted" and scan["data"]["pause_windows"] == 1, scan
            await seen("event/system", action="resumed", code="polling_resumed", source=f"mqtt:{scan['id']}")

            # --- a walk test never hides an alarm or a fault
            sims[det2.id].set_concentration(35.0)
            await seen("event/alarm", action="raised", device=det2.id)
            skipped = {s["device"] for s in (await mqtt_command("test", {"all": True}))["data"]["skipped"]}
            assert skipped == {det2.id, det3.id}, skipped
            assert {s["device"] for s in (await ctl("test", "--all"))["data"]["skipped"]} == {det2.id, det3.id}
            refused = await mqtt_command("test", {"device": det2.id})
            assert (refused["status"], refused["code"]) == ("rejected", "refused") and "would hide" in refused["reason"]
            assert (await mqtt_command("reset", {"all": True}))["data"]["still_active"] == [det2.id]
            sims[det2.id].set_concentration(0.0)
            await seen("event/alarm", action="cleared", device=det2.id)
            assert (await mqtt_command("reset", {"device": det2.id}))["data"]["reset"] == [det2.id]

            # --- every fault kind, raised and cleared
            for status in ("sensor_fault", "data_error", "needs_calibration", "comms_fault"):
                sims[det1.id].set_status(status)
                await seen("event/fault", action="raised", device=det1.id, code=status)
                sims[det1.id].set_status("normal")
                await seen("event/fault", action="cleared", device=det1.id, code=status)
            sims[det3.id].set_unit("%LEL")  # a sensor head of the right unit: read at the next whole poll
            for det in (det1, det3):
                bus.responding(det.address, False)
                await seen("event/fault", action="raised", device=det.id, code="offline")
                bus.responding(det.address, True)
                await seen("event/fault", action="cleared", device=det.id, code="offline")
            await seen("event/fault", action="cleared", device=det3.id, code="unit_mismatch")
            station.set_discrete_input(0, False)
            await seen("event/supervisory", action="raised", device="u1-station", code="removed")
            station.set_discrete_input(0, True)
            await seen("event/supervisory", action="cleared", device="u1-station", code="removed")
            modem.unplug()
            await seen("event/fault", action="raised", code="port_lost")
            modem.replug()
            await seen("event/fault", action="cleared", code="port_lost")
            hang.touch()
            await seen("event/fault", action="raised", code="stale_thread", timeout=60)
            hang.unlink()
            await seen("event/fault", action="cleared", code="stale_thread", timeout=60)
            full.touch()
            sims[det1.id].set_concentration(5.0)  # a reading to store on the full disk
            await eventually(lambda: any(c["what"] == "fault:storage_full" for c in gateway.panel.snapshot()["active"]),
                             timeout=60, message="storage_full never shown by the panel")
            full.unlink()
            await seen("event/fault", action="cleared", code="storage_full", timeout=60)
            await seen("event/fault", action="raised", code="storage_full")
    await asyncio.to_thread(recorder.wait_for, lambda m: m.topic == topics.availability
                            and m.json.get("state") == "offline", 30)
    took = time.monotonic() - started
    messages = recorder.messages()
    counts = validate_all(topics, messages)
    assert set(counts) == set(SCHEMA_NAMES), counts
    events = [m.json for m in messages if schema_name(topics, m.topic) == "event"]
    faults = {(e["code"], e["action"]) for e in events if e["kind"] == "fault"}
    assert {(code, "raised") for code in FAULT_KINDS} <= faults, sorted(faults)
    assert {(code, "cleared") for code in FAULT_KINDS} <= faults, sorted(faults)
    paused = [b for m in messages if m.topic == topics.status for b in m.json["links"]["buses"] if b.get("paused")]
    assert paused, "no status message said polling was paused"
    kinds = {(e["kind"], e["action"]) for e in events}
    assert {("test", "started"), ("test", "detected"), ("test", "ended"), ("relay", "on"), ("relay", "off"),
            ("system", "paused"), ("system", "resumed"), ("reset", "reset"), ("reset", "refused"),
            ("silence", "silenced"), ("supervisory", "raised"), ("alarm", "raised")} <= kinds, sorted(kinds)
    results = [m.json for m in messages if schema_name(topics, m.topic) == "command_result"]
    print(f"actions-and-faults contract: {len(messages)} messages ({counts}), {len(results)} command results, "
          f"all valid, in {took:.1f} s")
