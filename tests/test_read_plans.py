"""Reads that fit real register maps: a controller whose channels sit 10 registers apart and that refuses any
read touching a register it does not implement (exception 02), as most real devices do.

The controller is pymodbus's own server (:class:`SimulatedController`: units, level and status at
2998/2999/3000, then +10 per channel) on a pty, beside an ordinary profile-A detector; the broker is a real
mosquitto started by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import structlog
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

from drivers.modbus import ChannelGroup, CommError, GasDetector, group_channels, read_block
from drivers.profiles import PROFILE_A, PROFILE_B, ProfileError, parse_detector_profile
from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat, bus_floor_s
from gateway.config import BusConfig, SiteConfig, load_config
from gateway.control.discover import find_controller, profile_sketch
from gateway.panel.buses import BusPoller, open_client
from gateway.uplink.topics import Topics
from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, read_events, running_gateway
from tests.support.mqtt import MqttRecorder
from tests.support.site import build_site

CONTROLLER = 5
HOUSEHOLDS = {1: "u1-c1", 2: "u1-c2", 3: "u1-c3", 4: "u1-c4"}


def profile_toml(reads: str | None = None) -> str:
    return "\n".join([
        "[profiles.ctrl4]", 'kind = "gas_detector"', "function = 3", "start = 2998", "count = 3", "channels = 4",
        "stride = 10", *([f'reads = "{reads}"'] if reads else []),
        "value = { register = 2999, decimals = 1 }",
        'measure = { register = 2998, codes = { "0" = "ppm", "2" = "%LEL", "4" = "%VOL" } }',
        'status = { register = 3000, codes = { "0" = "normal", "1" = "low_alarm", "2" = "high_alarm", '
        '"3" = "sensor_fault" } }', ""])


def ctrl4(reads: str | None = None) -> Any:
    body = tomllib.loads(profile_toml(reads))["profiles"]["ctrl4"]
    body.pop("kind")
    return parse_detector_profile("ctrl4", body)


def site(tmp_path: Path, *, bus_port: str = "/dev/ttyUSB0", broker_port: int = 1883,
         reads: str | None = None) -> tuple[SiteConfig, str]:
    spec = build_site(bus_port=bus_port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", households=1)
    lines = [profile_toml(reads)]
    for household in HOUSEHOLDS.values():
        lines += ["[[households]]", f'id = "{household}"', 'unit = "u1"', ""]
    lines += ["[[devices]]", 'id = "ctrl"', 'kind = "gas_detector"', 'unit = "u1"', 'bus = "bus1"',
              f"address = {CONTROLLER}", 'profile = "ctrl4"', ""]
    for household in HOUSEHOLDS.values():
        lines += ["[[devices.channels]]", f'household = "{household}"', ""]
    path = tmp_path / "site.toml"
    path.write_text(spec.toml + "\n" + "\n".join(lines), encoding="utf-8")
    return load_config(path), spec.detectors[0].id


# ------------------------------------------------------------------------------------------- profiles


def test_a_profile_says_how_its_channels_are_read() -> None:
    assert ctrl4().reads is None and ctrl4("span").reads == "span" and ctrl4("channel").reads == "channel"
    # The plan starts with: one span of 33 registers, or four reads of 3.
    assert ctrl4().cycle_reads == ((3, 33),)
    assert ctrl4("channel").cycle_reads == ((3, 3),) * 4
    for body, reason in (({"reads": "each"}, "must be 'span' or 'channel'"),):
        data = {**tomllib.loads(profile_toml())["profiles"]["ctrl4"], **body}
        data.pop("kind")
        with pytest.raises(ProfileError) as info:
            parse_detector_profile("ctrl4", data)
        assert (info.value.key, reason in info.value.reason) == ("reads", True)
    single = {"start": 0, "count": 2, "value": {"register": 1}, "reads": "channel"}
    with pytest.raises(ProfileError) as info:
        parse_detector_profile("one", single)
    assert info.value.key == "reads" and "channels > 1" in info.value.reason


def test_registers_far_apart_are_read_as_several_reads_not_one_span() -> None:
    sparse = parse_detector_profile("sparse", {
        "start": 100, "count": 60, "value": {"register": 101, "decimals": 1},
        "status": {"register": 102, "codes": {"0": "normal", "1": "high_alarm"}},
        "measure": {"register": 158, "codes": {"2": "%LEL"}}, "full_read_every": 1})
    assert sparse.block_reads == ((101, 2), (158, 1))  # not 100–159
    assert sparse.full_reads == ((3, 2), (3, 1))
    assert sparse.fast_reads == ((101, 2),)
    # A short gap is read through: built-in maps keep their one read.
    assert PROFILE_A.block_reads == ((0, 10),) and PROFILE_A.fast_reads == ((1, 5),)
    assert PROFILE_B.block_reads == ((0x6000, 7),)


def test_a_detector_with_registers_far_apart_reads_a_device_that_refuses_the_gap(tmp_path: Path) -> None:
    """The controller implements only 2998–3000 and 3008–3010: a one-channel profile using 2999 and 3010 reads
    them in two reads, where one span would be refused."""
    sparse = parse_detector_profile("sparse", {
        "start": 2998, "count": 13, "value": {"register": 2999, "decimals": 1},
        "status": {"register": 3010, "codes": {"0": "normal", "2": "high_alarm"}}, "full_read_every": 1})
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port)
        controller = sim.add_controller(CONTROLLER)
        controller.set_level(1, 12.5)
        controller.set_status(2, "high_alarm")
        with sim:
            client = open_client(BusConfig(id="b", port=line.gateway_port, baudrate=9600, parity="N", stopbits=1,
                                           bytesize=8, timeout_s=0.5, poll_interval_s=1.0))
            assert client.connect()
            try:
                with pytest.raises(CommError) as refused:
                    read_block(client, 3, 2998, 13, CONTROLLER)  # the span is refused
                assert refused.value.kind == "exception:illegal_data_address"
                reading = GasDetector("sparse", CONTROLLER, sparse).poll(client)
            finally:
                client.close()
    assert (reading.value, reading.status) == (12.5, frozenset({"high_alarm"}))


# ------------------------------------------------------------------------------------------- on the bus


@pytest.mark.timeout(240)
async def test_a_controller_refusing_the_span_is_read_per_channel_and_its_alarms_reach_mqtt(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    requests: list[bytes] = []
    sent_at: list[float] = []  # wall clock, as the panel stamps events

    def seen(slave: int, frame: bytes, _t: float) -> None:
        if slave == CONTROLLER:
            requests.append(frame)
            sent_at.append(time.time())

    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port, on_request=seen)
        sim.add_gas_detector(1, "A", unit="%LEL", decimals=1).set_status("normal")
        controller = sim.add_controller(CONTROLLER)  # refuses unmapped registers: the simulator's default
        assert controller.refuse_unmapped
        with sim:
            cfg, detector_id = site(tmp_path, bus_port=line.gateway_port, broker_port=broker.port)
            topics = Topics("safety", "test-community", "b01")
            recorder = MqttRecorder(broker.host, broker.port, [f"{topics.base}/event/#"])
            channel_ids = [f"ctrl.ch{n}" for n in HOUSEHOLDS]
            try:
                with structlog.testing.capture_logs() as logs:
                    async with running_gateway(cfg) as gateway:

                        def states() -> dict[str, str]:
                            return {str(d["device"]): str(d["state"]) for d in gateway.panel.snapshot()["devices"]}

                        await eventually(lambda: all(states()[c] == "normal" for c in [detector_id, *channel_ids]),
                                         timeout=60, message=lambda: str(states()))
                        # Online within 3 polls of the controller after the fallback: the polls (each begins
                        # with channel 1's read) sent before every channel's first reading was stamped.
                        assert [_decoded(f) for f in requests[:1]] == [(3, 2998, 33)]
                        def telemetry() -> list[dict[str, Any]]:
                            rows = read_events(tmp_path / "events.db", "kind = 'telemetry'")
                            have = {r["body"]["device"] for r in rows}
                            return rows if have >= set(channel_ids) else []

                        rows = await eventually(telemetry, timeout=30, message="the channels' first readings stored")
                        online = max(min(r["body"]["wall"] for r in rows if r["body"]["device"] == c)
                                     for c in channel_ids)
                        polls = [t for f, t in zip(requests, sent_at, strict=True)
                                 if _decoded(f) == (3, 2998, 3) and t <= online]
                        assert 1 <= len(polls) <= 3, [_decoded(f) for f in requests]
                        poller = gateway.buses["bus1"]
                        assert poller.read_plans() == {"ctrl.ch1": "channel"}
                        line_format = LineFormat(baud=9600)
                        assert poller.floor_s == pytest.approx(bus_floor_s(
                            line_format, [(3, 5), *[(3, 3)] * 4], turnaround_s=DEFAULT_TURNAROUND_S))
                        for n in (2, 4):
                            controller.set_level(n, 30.0)
                        controller.set_status(3, "high_alarm")
                        await eventually(lambda: [states()[c] for c in channel_ids] == [
                            "normal", "high_alarm", "high_alarm", "high_alarm"], timeout=60,
                            message=lambda: str(states()))

                        def alarmed() -> dict[str, Any]:
                            return {m.json["device"]: m.json for m in recorder.messages(f"{topics.base}/event/alarm")
                                    if m.is_json and m.json.get("action") == "raised"}

                        await eventually(lambda: len(alarmed()) == 3, timeout=60, message=lambda: str(alarmed()))
                        got = alarmed()
                        assert {d: (a["household"], a["level"]) for d, a in got.items()} == {
                            "ctrl.ch2": ("u1-c2", "high"), "ctrl.ch3": ("u1-c3", "high"),
                            "ctrl.ch4": ("u1-c4", "high")}
                        assert got["ctrl.ch2"]["value"] == 30.0 and "value" not in got["ctrl.ch3"]
                        status = (await gateway.commands.status())["buses"][0]
                        assert status["read_plans"] == {"ctrl.ch1": "channel"}
                        assert sum(status["errors_by_kind"].values()) == status["errors"]
            finally:
                recorder.close()
    why = [e for e in logs if e["event"] == "controller read one channel at a time"]
    assert len(why) == 1, why
    assert "registers 2998–3030" in why[0]["reason"] and "illegal data address" in why[0]["reason"]
    assert why[0]["address"] == CONTROLLER
    # After the fallback no request spans channels again.
    assert {_decoded(f) for f in requests[1:]} <= {(3, 2998 + 10 * n, 3) for n in range(4)}


def _decoded(frame: bytes) -> tuple[int, int, int] | None:
    pdu = FramerRTU(DecodePDU(is_server=True)).handleFrame(frame, 0, 0)[1]
    return None if pdu is None else (pdu.function_code, pdu.address, pdu.count)


class _DeliveryRecorder:
    """Stands in for the alarm panel behind a bus thread: notes, for each channel's answer, whether the
    fallback's log line had already been written when the answer was handed over."""

    def __init__(self, logs: list[dict[str, Any]]) -> None:
        self.logs = logs
        self.delivered: list[tuple[str, bool]] = []

    def _note(self, device_id: str) -> None:
        self.delivered.append((device_id, any(e["event"] == "controller read one channel at a time"
                                              for e in self.logs)))

    def reading(self, device_id: str, _reading: Any) -> None:
        self._note(device_id)

    def poll_failed(self, device_id: str, _reason: str) -> None:
        self._note(device_id)

    def port_state(self, _bus_id: str, _lost: bool, _detail: str | None = None) -> None:
        pass


def test_the_fallbacks_log_line_is_written_after_the_readings_reach_the_panel(tmp_path: Path) -> None:
    """Rule 1: the bus thread writes the log line saying why a controller is read per channel only after
    the poll's readings are with the panel, and writes it once."""
    channels = [GasDetector(f"c.ch{n}", CONTROLLER, ctrl4().for_channel(n)) for n in range(1, 5)]
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port)
        sim.add_controller(CONTROLLER)
        with sim, structlog.testing.capture_logs() as logs:
            bus = BusConfig(id="b", port=line.gateway_port, baudrate=9600, parity="N", stopbits=1, bytesize=8,
                            timeout_s=0.5, poll_interval_s=0.2)
            panel = _DeliveryRecorder(logs)
            poller = BusPoller(bus, list(channels), panel)  # type: ignore[arg-type]
            poller.start()
            try:
                deadline = time.monotonic() + 60
                while len(panel.delivered) < 12 and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                poller.stop()
    assert len(panel.delivered) >= 12, panel.delivered
    # The poll that fell back handed its four channels over before the line was written.
    assert panel.delivered[:4] == [(f"c.ch{n}", False) for n in range(1, 5)], panel.delivered
    assert all(warned for _, warned in panel.delivered[4:]), panel.delivered
    assert len([e for e in logs if e["event"] == "controller read one channel at a time"]) == 1


def test_a_controller_set_to_span_keeps_its_span_and_reports_the_refusal(tmp_path: Path) -> None:
    """With ``reads = "span"`` the gateway does not switch by itself: every channel gets the refusal."""
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port)
        sim.add_controller(CONTROLLER)
        with sim:
            client = open_client(BusConfig(id="b", port=line.gateway_port, baudrate=9600, parity="N", stopbits=1,
                                           bytesize=8, timeout_s=0.5, poll_interval_s=1.0))
            assert client.connect()
            try:
                fixed = ChannelGroup([GasDetector(f"c.ch{n}", CONTROLLER, ctrl4("span").for_channel(n))
                                      for n in range(1, 5)])
                results = fixed.poll(client)
                auto = group_channels([GasDetector(f"a.ch{n}", CONTROLLER, ctrl4().for_channel(n))
                                       for n in range(1, 5)])[0]
                assert isinstance(auto, ChannelGroup)
                answers = auto.poll(client)
            finally:
                client.close()
    assert {getattr(r, "kind", None) for r in results.values()} == {"exception:illegal_data_address"}
    assert fixed.plan == "span" and fixed.fallback is None
    assert auto.plan == "channel" and auto.fallback is not None
    assert all(not isinstance(r, Exception) for r in answers.values())
    assert auto.cycle_reads == ((3, 3),) * 4


# ------------------------------------------------------------------------------------------- scan


@pytest.mark.timeout(240)
async def test_scan_lists_the_controller_with_its_channels_and_stride(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    """``gatewayctl scan`` (a real subprocess) against the running gateway: the controller at 5 answers the
    profile probes only with exceptions, is listed as a responder and recognised as a 4-channel controller
    with stride 10; the profile sketch it prints parses and reads the controller."""
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port)
        sim.add_gas_detector(1, "A", unit="%LEL", decimals=1).set_status("normal")
        sim.add_controller(CONTROLLER)
        with sim:
            cfg, _ = site(tmp_path, bus_port=line.gateway_port, broker_port=broker.port)
            async with running_gateway(cfg):
                as_json = await _gatewayctl(cfg, "scan", "bus1", "--from", "1", "--to", "6", "--pause-polling",
                                            "--json")
                text = await _gatewayctl(cfg, "scan", "bus1", "--from", "5", "--to", "5", "--pause-polling")
    found = {r["address"]: r for r in json.loads(as_json)["data"]["responders"]}
    assert sorted(found) == [1, CONTROLLER]
    hit = found[CONTROLLER]
    assert (hit["profile"], hit["answer"], hit["configured_as"]) == ("controller", "exception", "ctrl")
    assert {k: hit["controller"][k] for k in ("start", "count", "stride", "channels")} == {
        "start": 2998, "count": 3, "stride": 10, "channels": 4}
    assert "1 responding address(es) in 5–5" in text
    assert f"address {CONTROLLER}: multi-channel controller, 4 channels, stride 10" in text
    sketch = text.split("check the marked lines against the manual):\n", 1)[1]
    profile = tomllib.loads(sketch)["profiles"][f"controller-{CONTROLLER}"]
    profile.pop("kind")
    parsed = parse_detector_profile("sketch", profile)
    assert (parsed.start, parsed.count, parsed.channels, parsed.stride, parsed.reads) == (
        2998, 3, 4, 10, "channel")


async def _gatewayctl(cfg: SiteConfig, *args: str) -> str:
    """Run ``gatewayctl`` without blocking the loop the gateway's control server runs on; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "gatewayctl"), "--config", str(cfg.source), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "NO_COLOR": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (proc.returncode, out, err)
    return out.decode()


# ------------------------------------------------------------------------------------------- counting


@pytest.mark.timeout(240)
async def test_a_silent_controller_counts_once_per_poll_on_the_bus_and_kinds_add_up(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    asked: list[int] = []  # requests to the controller
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port, on_request=lambda slave, _f, _t: asked.append(slave)
                           if slave == CONTROLLER else None)
        sim.add_gas_detector(1, "A", unit="%LEL", decimals=1).set_status("normal")
        sim.add_controller(CONTROLLER)
        with sim:
            cfg, _ = site(tmp_path, bus_port=line.gateway_port, broker_port=broker.port, reads="channel")
            async with running_gateway(cfg) as gateway:
                poller = gateway.buses["bus1"]

                def devices() -> dict[str, dict[str, Any]]:
                    return {str(d["device"]): d for d in gateway.panel.snapshot()["devices"]}

                await eventually(lambda: devices()["ctrl.ch4"]["state"] == "normal", timeout=60)
                sim.responding(CONTROLLER, False)
                asked_before = len(asked)
                await eventually(lambda: all("offline" in devices()[f"ctrl.ch{n}"]["faults"] for n in HOUSEHOLDS),
                                 timeout=60)
                poller.pause(True)  # then the counters stand still: read them at rest
                while True:
                    before = poller.polls
                    await asyncio.sleep(0.5)
                    if poller.polls == before:
                        break
                status = (await gateway.commands.status())["buses"][0]
                channels = [devices()[f"ctrl.ch{n}"] for n in HOUSEHOLDS]
                errors = poller.errors
                unanswered = len(asked) - asked_before
    assert status["errors"] == sum(status["errors_by_kind"].values()) == errors
    # Each failed poll of the controller: once on the bus (its first read's kind), once on each channel.
    # (The poll under way when it fell silent may have read a channel or two before the first timeout.)
    failed_polls = channels[-1]["comm_errors"]
    assert status["errors_by_kind"] == {"timeout": failed_polls}
    assert all(failed_polls - 1 <= c["comm_errors"] <= failed_polls for c in channels), channels
    # A silent controller costs one timeout a cycle, not one per channel.
    assert failed_polls <= unanswered <= failed_polls + 3, unanswered
    assert status["read_plans"] == {"ctrl.ch1": "channel"}


def test_the_status_message_takes_a_buss_kinds_from_the_bus() -> None:
    """Four channels failing one poll each count four times among the devices, once on the bus."""
    from gateway.annunciation import Annunciation
    from gateway.uplink.contract import BusCounters, StatusReporter, UplinkFigures

    devices = [{"device": f"ctrl.ch{n}", "bus": "bus1", "state": "fault", "comm_errors": 1, "failures": 1,
                "errors_by_kind": {"timeout": 1}} for n in range(1, 5)]
    message = StatusReporter(gateway="g", community="c", building="b", software="1").build(
        session=1, uplink=UplinkFigures(rtt_ms=None, connections=0, delivered=0, rejected=0, inflight=0),
        backlog=(0, None), snapshot={"devices": devices, "annunciation": Annunciation()},
        buses=[BusCounters("bus1", 10, 1, False, errors_by_kind={"timeout": 1})])
    (row,) = message["links"]["buses"]
    assert (row["errors"], row["errors_by_kind"]) == (1, {"timeout": 1})


@pytest.mark.parametrize(("implemented", "expected"), [
    # the controller of the field report
    ({r for n in range(4) for r in range(2998 + 10 * n, 3001 + 10 * n)}, (2998, 3, 10, 4)),
    # channel 1 below the registers probed: found by looking down a stride
    ({r for n in range(6) for r in range(3000 - 20 + 8 * n, 3000 - 20 + 8 * n + 2)}, (2980, 2, 8, 6)),
    # one block, no repeat: a device, not a controller
    (set(range(1000, 1005)), (1000, 5, 0, 1)),
])
def test_find_controller_over_register_maps(implemented: set[int], expected: tuple[int, int, int, int]) -> None:
    reads: list[tuple[int, int]] = []

    def read(start: int, count: int) -> list[int] | None:
        reads.append((start, count))
        block = range(start, start + count)
        return [r % 7 for r in block] if set(block) <= implemented else None

    layout = find_controller(read)
    assert layout is not None
    assert (layout.start, layout.count, layout.stride, layout.channels) == expected
    assert len(reads) <= 120  # about a second of refused reads at 9600 baud
    sketch = tomllib.loads(profile_sketch(layout, 7))["profiles"]["controller-7"]
    sketch.pop("kind")
    parsed = parse_detector_profile("sketch", sketch)
    assert (parsed.start, parsed.count, parsed.channels) == (expected[0], expected[1], expected[3])


def test_find_controller_finds_nothing_where_nothing_reads() -> None:
    assert find_controller(lambda _start, _count: None) is None
