"""The wire floor (drivers/wire.py) against the figures of the domain notes and the Modbus serial line spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from drivers.profiles import PROFILE_A, PROFILE_B, STATION_IO_4DI
from drivers.wire import (
    DEFAULT_TURNAROUND_S,
    READ_REQUEST_BYTES,
    LineFormat,
    answer_bytes,
    bus_floor_s,
    read_answer_bytes,
    transaction_s,
)
from gateway.annunciation import Annunciation
from gateway.config import bus_floor_s as config_bus_floor_s
from gateway.config import bus_floor_warnings, load_config
from gateway.uplink.contract import BusCounters, StatusReporter, UplinkFigures, schema, validator
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway, simulated_detectors
from tests.support.site import build_site

MS = 1e-3


def test_a_character_at_9600_8n1_takes_1_04_ms() -> None:
    line = LineFormat(baud=9600)
    assert line.bits_per_char == 10
    assert line.char_s == pytest.approx(1.0417 * MS, abs=1e-7)


@pytest.mark.parametrize(("parity", "stopbits", "bits"), [("N", 1, 10), ("E", 1, 11), ("O", 1, 11), ("N", 2, 11),
                                                          ("E", 2, 12)])
def test_a_character_is_start_data_parity_and_stop_bits(parity: str, stopbits: int, bits: int) -> None:
    assert LineFormat(baud=9600, parity=parity, stopbits=stopbits).bits_per_char == bits


@pytest.mark.parametrize(("baud", "silence_ms"), [(9600, 3.646), (19200, 1.823), (38400, 1.75), (115200, 1.75)])
def test_silence_is_3_5_characters_and_1_75_ms_above_19200(baud: int, silence_ms: float) -> None:
    assert LineFormat(baud=baud).silence_s == pytest.approx(silence_ms * MS, abs=1e-6)


def test_frame_sizes_of_a_read() -> None:
    assert READ_REQUEST_BYTES == 8
    assert read_answer_bytes(3, 10) == 25  # address, function, byte count, 20 data bytes, CRC
    assert read_answer_bytes(4, 1) == 7
    assert read_answer_bytes(2, 4) == 6  # four bits fit one data byte
    assert read_answer_bytes(1, 9) == 7
    with pytest.raises(ValueError, match="not a read"):
        read_answer_bytes(6, 1)


def test_answer_length_from_the_request_frame() -> None:
    assert answer_bytes(bytes([1, 3, 0, 0, 0, 10, 0xC5, 0xCD])) == 25
    assert answer_bytes(bytes([1, 2, 0, 0, 0, 4, 0, 0])) == 6
    assert answer_bytes(bytes([1, 6, 0, 1, 0, 3, 0, 0])) == 8
    assert answer_bytes(bytes([1, 0x2B, 0x0E, 1, 0, 0])) is None  # device identification: length unknown
    assert answer_bytes(b"\x01\x03") is None


def test_ten_registers_at_9600_take_42_ms_plus_turnaround() -> None:
    """domain.md: 8.3 ms + 3.6 ms silence + turnaround + 26.0 ms + 3.6 ms ≈ 42 ms + turnaround."""
    line = LineFormat(baud=9600)
    assert line.frame_s(8) == pytest.approx(8.33 * MS, abs=0.01 * MS)
    assert line.frame_s(25) == pytest.approx(26.04 * MS, abs=0.01 * MS)
    one = bus_floor_s(line, [(3, 10)], turnaround_s=0.0)
    assert one == pytest.approx(41.7 * MS, abs=0.1 * MS)
    assert bus_floor_s(line, [(3, 10)], turnaround_s=0.025) == pytest.approx(one + 0.025)
    assert transaction_s(line, 25, turnaround_s=0.0) == pytest.approx(one - line.silence_s)


def test_64_detectors_at_9600_need_3_3_s_with_a_10_ms_turnaround() -> None:
    floor = bus_floor_s(LineFormat(baud=9600), [(3, 10)] * 64, turnaround_s=DEFAULT_TURNAROUND_S)
    assert DEFAULT_TURNAROUND_S == 0.010
    assert floor == pytest.approx(3.31, abs=0.01)
    assert floor > 1.0  # a 1 s poll interval cannot be met


def test_the_floor_falls_with_the_baud_rate_until_the_turnaround_dominates() -> None:
    reads = [(3, 10)] * 64
    floors = [bus_floor_s(LineFormat(baud=b), reads) for b in (9600, 19200, 38400, 115200)]
    assert floors == sorted(floors, reverse=True)
    assert floors[-1] > 64 * DEFAULT_TURNAROUND_S  # never below the turnarounds themselves


def test_profiles_fast_windows_hold_what_the_decision_reads() -> None:
    assert PROFILE_A.fast_window == (1, 5)  # concentration (1) .. status (5)
    assert PROFILE_A.cycle_reads == ((3, 5),)
    assert PROFILE_A.full_reads == ((3, 10),)
    assert PROFILE_B.fast_window == (0x6000, 2)  # alarm word and concentration
    assert STATION_IO_4DI.cycle_reads == ((2, 4),)
    fast = bus_floor_s(LineFormat(baud=9600), list(PROFILE_A.cycle_reads) * 64)
    full = bus_floor_s(LineFormat(baud=9600), list(PROFILE_A.full_reads) * 64)
    assert full - fast == pytest.approx(64 * 10 * LineFormat(baud=9600).char_s)  # 2 characters a register less


def test_a_line_format_is_checked() -> None:
    with pytest.raises(ValueError, match="parity"):
        LineFormat(parity="X")
    with pytest.raises(ValueError, match="baud"):
        LineFormat(baud=0)


# -- the floor in the config check, the status message and the CLI -------------------------------------------


def _site(tmp_path: Path, households: int, poll_interval_s: float) -> Path:
    spec = build_site(bus_port="/dev/ttyUSB0", db_path=tmp_path / "gw.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock", households=households, poll_interval_s=poll_interval_s)
    return spec.write(tmp_path / f"site-{households}-{poll_interval_s}.toml")


def test_a_poll_interval_below_the_floor_is_a_warning_that_states_the_real_cycle(tmp_path: Path) -> None:
    cfg = load_config(_site(tmp_path, 64, 1.0))
    floor = bus_floor_s(LineFormat(baud=9600), list(PROFILE_A.cycle_reads) * 64)
    assert config_bus_floor_s(cfg.buses[0], cfg.devices) == pytest.approx(floor)
    assert bus_floor_warnings(cfg) == [f"buses[0].poll_interval_s: 64 detectors at 9600 baud need ≥ {floor:.1f} s "
                                       "per cycle; poll_interval_s = 1.0 cannot be met"]
    assert bus_floor_warnings(load_config(_site(tmp_path, 64, 3.0))) == []
    assert bus_floor_warnings(load_config(_site(tmp_path, 8, 1.0))) == []


def test_config_check_warns_without_failing(tmp_path: Path) -> None:
    slow = _site(tmp_path, 64, 1.0)
    text = _ctl("config", "check", str(slow))
    assert text.returncode == 0, text.stderr
    assert "ok" in text.stdout
    assert "warning: buses[0].poll_interval_s: 64 detectors at 9600 baud need ≥ 2.6 s per cycle; " \
           "poll_interval_s = 1.0 cannot be met" in text.stderr
    as_json = _ctl("config", "check", str(slow), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["warnings"] == bus_floor_warnings(load_config(slow))
    quiet = _ctl("config", "check", str(_site(tmp_path, 8, 1.0)))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("gatewayctl")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.ops.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "NO_COLOR": ""})


def test_the_status_message_carries_each_bus_floor_and_cycle() -> None:
    reporter = StatusReporter(gateway="g", community="c", building="b", software="1")
    message = reporter.build(
        session=1, uplink=UplinkFigures(rtt_ms=None, connections=0, delivered=0, rejected=0, inflight=0),
        backlog=(0, None), snapshot={"devices": [], "annunciation": Annunciation()},
        buses=[BusCounters("rs485-1", 640, 0, False, floor_s=2.6401, cycle_s=2.7123),
               BusCounters("rs485-2", 0, 0, True)],
    )
    rows = {row["bus"]: row for row in message["links"]["buses"]}
    assert (rows["rs485-1"]["floor_ms"], rows["rs485-1"]["cycle_ms"]) == (2640.1, 2712.3)
    assert (rows["rs485-2"]["floor_ms"], rows["rs485-2"]["cycle_ms"]) == (None, None)
    bus_row = schema("status")["properties"]["links"]["properties"]["buses"]["items"]
    jsonschema.Draft202012Validator(bus_row).validate(rows["rs485-1"])
    jsonschema.Draft202012Validator(bus_row).validate(rows["rs485-2"])
    assert {"floor_ms", "cycle_ms"} <= set(bus_row["required"])


async def test_birth_and_status_carry_each_bus_floor_and_measured_cycle(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any, mqtt_recorder_factory: Any
) -> None:
    """From the panel's bus thread, through the storage process, to the retained birth and the status message."""
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                          socket_path=tmp_path / "control.sock", households=2)
        cfg = load_config(spec.write(tmp_path / "site.toml"))
        floor_ms = round(config_bus_floor_s(cfg.buses[0], cfg.bus_devices("bus1")) * 1000, 1)
        recorder = mqtt_recorder_factory(broker, [f"{spec.topic_base}/birth", f"{spec.topic_base}/status"])
        with simulated_detectors(modem.device_port, spec.detectors):
            async with running_gateway(cfg) as panel:
                await eventually(lambda: panel.buses["bus1"].cycle_s is not None and panel.uplink_connected,
                                 timeout=30)
                result = await panel.commands.handle("rebirth", {}, source="test")
                assert result.ok, result.reason

                def timed_birth() -> dict[str, Any] | None:
                    for message in recorder.messages(f"{spec.topic_base}/birth"):
                        timing = message.json["config"].get("bus_timing") or []
                        if timing and timing[0]["cycle_ms"] is not None:
                            return dict(message.json)
                    return None

                birth = await eventually(timed_birth, timeout=30)
                await eventually(lambda: recorder.messages(f"{spec.topic_base}/status"), timeout=30)
    validator("birth").validate(birth)
    (timing,) = birth["config"]["bus_timing"]
    assert timing["bus"] == "bus1" and timing["floor_ms"] == floor_ms and timing["cycle_ms"] > 0
    (status, *_) = [m.json for m in recorder.messages(f"{spec.topic_base}/status")]
    validator("status").validate(status)
