"""Bus diagnostics a technician can act on: failed polls counted by what the line showed, per device and per
bus, in `gatewayctl status`; and an address scan that does not take a Modbus gateway's "nothing answered
behind me" (exceptions 0x0A/0x0B) for a device.

The misbehaving device is :class:`tests.support.fuzz.FuzzingDevice` on a virtual null modem, each of its
addresses answering with one kind of bad frame; the healthy detector beside it is pymodbus's own server
(a :class:`SimulatedBus`) behind the fuzzing device's relay. The gateway end is the real layout.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import CommError, GasDetector, exception_kind, frame_error_kind, read_block
from drivers.profiles import PROFILE_A
from gateway.config import BusConfig, load_config
from gateway.control.commands import _probe
from gateway.ops.cli import Style, error_kind_label, render_status
from gateway.panel.buses import open_client
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import CountingHeartbeats, TimedMockPin, eventually, read_events, running_gateway
from tests.support.fuzz import FuzzingDevice, valid_answer
from tests.support.site import build_site

HEALTHY = 1
HIGH = 30.0
RANDOM_KINDS = {"truncated_frame", "overlong_frame", "crc_error", "wrong_address", "bad_response"}
#: The misbehaving addresses in poll order, each with the one category it answers with. The late answer of
#: address 8 arrives while address 9 (which never answers) has its turn.
PLAN: dict[int, str] = {
    2: "truncated", 3: "wrong_crc", 4: "wrong_address", 5: "over_long", 6: "path_unavailable", 7: "random",
    8: "late",
}
SILENT = 9
#: The error kind each category must be counted as, all of its answers.
KIND_OF = {
    "truncated": "truncated_frame", "wrong_crc": "crc_error", "wrong_address": "wrong_address",
    "over_long": "overlong_frame", "path_unavailable": "exception:gateway_path_unavailable", "late": "timeout",
}
POLLS = 15  # failed polls of each misbehaving device before the counters are compared


@dataclasses.dataclass
class Bench:
    gateway_port: str
    device_port: str
    relay_port: str
    healthy: SimulatedGasDetector
    sim: SimulatedBus


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with VirtualNullModem(tmp_path / "line") as line, \
            VirtualNullModem(tmp_path / "relay", gateway_name="ttyRELAY", device_name="ttySIM") as relay:
        sim = SimulatedBus(relay.device_port)
        healthy = sim.add_gas_detector(HEALTHY, "A", unit="%LEL", decimals=1)
        healthy.set_status("normal")
        healthy.set_concentration(3.0)
        sim.add_gas_detector(2, "B")
        with sim:
            yield Bench(line.gateway_port, line.device_port, relay.gateway_port, healthy, sim)


def bus_config(port: str, timeout_s: float) -> BusConfig:
    return BusConfig(id="bus1", port=port, baudrate=9600, parity="N", stopbits=1, bytesize=8,
                     timeout_s=timeout_s, poll_interval_s=0.0)


# ------------------------------------------------------------------------------------------- classification


def test_what_the_line_showed_is_told_apart_from_the_bytes() -> None:
    """The classification of an answer pymodbus could not take, frame by frame (frames built by pymodbus)."""
    import random

    from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

    request = ReadHoldingRegistersRequest(address=0, count=10, dev_id=7)
    good = valid_answer(random.Random(1), request)
    flipped = bytearray(good)
    flipped[5] ^= 0x10
    assert frame_error_kind(b"", request) == "timeout"
    assert frame_error_kind(good[:9], request) == "truncated_frame"
    assert frame_error_kind(bytes(flipped), request) == "crc_error"
    assert frame_error_kind(valid_answer(random.Random(1), request, dev_id=8), request) == "wrong_address"
    assert frame_error_kind(good + b"\x00\x01", request) == "overlong_frame"
    assert exception_kind(2) == "exception:illegal_data_address"
    assert error_kind_label(exception_kind(2)) == "illegal data address"
    assert error_kind_label("crc_error") == "CRC error"


@pytest.mark.timeout(60)
def test_an_exception_answer_is_named(bench: Bench) -> None:
    """A detector asked for registers it does not have answers "illegal data address", counted by that name."""
    client = open_client(bus_config(bench.relay_port, timeout_s=0.5))
    assert client.connect()
    try:
        with pytest.raises(CommError) as excinfo:
            read_block(client, 3, 0x6000, 2, HEALTHY)  # profile A has no alarm word at 0x6000
        assert excinfo.value.reason == "exception_response"
        assert excinfo.value.kind == "exception:illegal_data_address"
        assert GasDetector("ok", HEALTHY, PROFILE_A).poll(client).value == pytest.approx(3.0)
    finally:
        client.close()


# ------------------------------------------------------------------------------------------- scan


@pytest.mark.timeout(60)
def test_scan_does_not_take_a_gateway_exception_for_a_device(bench: Bench) -> None:
    client = open_client(bus_config(bench.gateway_port, timeout_s=0.3))
    plan = {5: ["target_no_answer"], 6: ["path_unavailable"]}
    with FuzzingDevice(bench.device_port, fuzzed=plan, plan=plan, relay_port=bench.relay_port,
                       relayed=[HEALTHY, 2]) as device:
        assert client.connect()
        try:
            hits = {address: _probe(client, address, timeout_s=0.3) for address in (HEALTHY, 2, 5, 6, 7)}
        finally:
            client.close()
        assert device.alive and not device.errors
    assert hits[7] is None  # silence
    assert hits[5] == {"address": 5, "responding": False, "exception": "gateway_target_failed_to_respond"}
    assert hits[6] == {"address": 6, "responding": False, "exception": "gateway_path_unavailable"}
    a, b = hits[HEALTHY], hits[2]
    assert a is not None and b is not None
    assert (a["responding"], a["profile"], a["confidence"]) == (True, "A", "high")
    assert (b["responding"], b["profile"], b["confidence"]) == (True, "B", "high")


# ------------------------------------------------------------------------------------------- through the gateway


@pytest.mark.slow  # a misbehaving device through every kind of bad frame, about 11 s
@pytest.mark.timeout(300)
async def test_counters_by_kind_match_what_a_misbehaving_device_sent(
    tmp_path: Path, bench: Bench, broker: MosquittoBroker, mock_pins: Any
) -> None:
    """Beside a healthy detector, one address per kind of bad answer: each device's counters by kind are
    exactly what it sent, the bus's add up, `gatewayctl status` names them, and the healthy alarm arrives."""
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    db = tmp_path / "events.db"
    spec = build_site(bus_port=bench.gateway_port, db_path=db, broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=SILENT)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    # Room for the fuzzing thread to answer within its own device's turn on a loaded machine.
    cfg = dataclasses.replace(cfg, buses=(bus_config(bench.gateway_port, timeout_s=0.1),))
    ids = {d.address: d.id for d in spec.detectors}
    assert sorted(ids) == list(range(1, SILENT + 1))
    plan = {address: [category] for address, category in PLAN.items()}

    with FuzzingDevice(bench.device_port, fuzzed=plan, plan=plan, relay_port=bench.relay_port,
                       relayed=[HEALTHY], late_allowed=[8]) as fuzzer:
        heartbeats = CountingHeartbeats()
        async with running_gateway(cfg, heartbeats=heartbeats) as gateway:

            def device(address: int) -> dict[str, Any]:
                return next(d for d in gateway.panel.snapshot()["devices"] if d["device"] == ids[address])

            await eventually(lambda: all(device(a)["comm_errors"] >= POLLS for a in [*PLAN, SILENT]), timeout=120,
                             message=lambda: str({a: device(a)["comm_errors"] for a in [*PLAN, SILENT]}))
            leak_at = time.monotonic()
            bench.healthy.set_concentration(HIGH)
            await eventually(lambda: device(HEALTHY)["state"] == "high_alarm", timeout=60,
                             message="the healthy detector's alarm did not arrive")
            assert buzzer.first_high(after=leak_at) is not None

            poller = gateway.buses["bus1"]
            poller.pause(True)  # then two cycle ends: the cycle in progress, and one with no polls
            beats = heartbeats.count("bus:bus1")
            await eventually(lambda: heartbeats.count("bus:bus1") >= beats + 2, timeout=30)
            await eventually(lambda: all(device(a)["comm_errors"] == fuzzer.answered(a) for a in PLAN),
                             timeout=10, message="failed polls and bad answers differ")
            await eventually(lambda: device(SILENT)["comm_errors"] == fuzzer.requested(SILENT), timeout=10)
            assert fuzzer.alive and not fuzzer.errors

            for address, category in PLAN.items():
                sent = fuzzer.sent_to(address)
                assert set(sent) == {category}
                kinds = device(address)["errors_by_kind"]
                if category == "random":
                    assert set(kinds) <= RANDOM_KINDS, kinds
                    assert sum(kinds.values()) == sent[category]
                else:
                    assert kinds == {KIND_OF[category]: sent[category]}, (category, kinds)
            # The late answers of address 8 arrive during address 9's turn: from another address.
            silent = device(SILENT)["errors_by_kind"]
            assert set(silent) <= {"timeout", "wrong_address"}, silent
            assert silent.get("wrong_address", 0) <= fuzzer.sent_to(8)["late"]
            assert sum(silent.values()) == fuzzer.requested(SILENT)
            healthy = device(HEALTHY)
            assert "offline" not in healthy["faults"]

            bus_kinds: dict[str, int] = {}
            for address in ids:
                for kind, count in device(address)["errors_by_kind"].items():
                    bus_kinds[kind] = bus_kinds.get(kind, 0) + count
            assert dict(poller.errors_by_kind) == bus_kinds
            assert poller.errors == sum(bus_kinds.values())

            status = await gateway.commands.status()
            bus_row = next(b for b in status["buses"] if b["id"] == "bus1")
            assert bus_row["errors_by_kind"] == dict(sorted(bus_kinds.items()))
            shown = "\n".join(render_status(status, Style(io.StringIO()), every_device=True))
            assert "gateway path unavailable" in shown and "CRC error" in shown and "truncated frame" in shown
            assert f"truncated frame {device(2)['errors_by_kind']['truncated_frame']}" in shown

            def offline() -> list[dict[str, Any]]:
                return read_events(db, "kind = 'fault' AND json_extract(payload, '$.code') = 'offline'")

            misbehaving = sorted(ids[a] for a in [*PLAN, SILENT])
            await eventually(lambda: sorted(r["device"] for r in offline()) == misbehaving, timeout=30,
                             message=lambda: f"offline faults stored: {offline()}")
            assert {r["action"] for r in offline()} == {"raised"}  # raised once each, never flapping


def test_the_status_message_counts_failed_polls_by_kind_per_device_and_bus() -> None:
    import jsonschema

    from gateway.annunciation import Annunciation
    from gateway.uplink.contract import BusCounters, StatusReporter, UplinkFigures, schema

    devices = [
        {"device": "gas-1", "bus": "rs485-1", "state": "fault", "comm_errors": 5, "failures": 3,
         "errors_by_kind": {"crc_error": 2, "timeout": 3}},
        {"device": "gas-2", "bus": "rs485-1", "state": "normal", "comm_errors": 1, "failures": 0,
         "errors_by_kind": {"exception:illegal_data_address": 1}},
        {"device": "gas-3", "bus": "rs485-2", "state": "normal", "comm_errors": 0, "failures": 0,
         "errors_by_kind": {}},
    ]
    message = StatusReporter(gateway="g", community="c", building="b", software="1").build(
        session=1, uplink=UplinkFigures(rtt_ms=None, connections=0, delivered=0, rejected=0, inflight=0),
        backlog=(0, None), snapshot={"devices": devices, "annunciation": Annunciation()},
        buses=[BusCounters("rs485-1", 100, 6, False), BusCounters("rs485-2", 50, 0, False)])
    rows = {row["bus"]: row for row in message["links"]["buses"]}
    assert rows["rs485-1"]["errors_by_kind"] == {"crc_error": 2, "exception:illegal_data_address": 1, "timeout": 3}
    assert rows["rs485-2"]["errors_by_kind"] == {}
    assert {d["device"]: d["errors_by_kind"] for d in message["links"]["devices"]} == {
        "gas-1": {"crc_error": 2, "timeout": 3}, "gas-2": {"exception:illegal_data_address": 1}}
    links = schema("status")["properties"]["links"]
    jsonschema.Draft202012Validator(links).validate(message["links"])
    bad = {**message["links"], "devices": [{**message["links"]["devices"][0], "errors_by_kind": {"exception 2": 1}}]}
    assert not jsonschema.Draft202012Validator(links).is_valid(bad)  # kinds are names, not codes
