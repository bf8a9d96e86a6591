"""Multi-channel controllers: one `[[devices]]` entry binds the channels of a controller behind one Modbus
address, each channel a detector of its own (its household, thresholds, latch and events), and the bus reads
all channels in one transaction.

The controller on the bus is pymodbus's own server (a :class:`SimulatedIOStation`'s holding registers laid
out as a 4-channel map) on the paced bus (:class:`WireSpec`), beside an ordinary profile-A detector.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

from drivers.modbus import ChannelGroup, GasDetector, group_channels
from drivers.profiles import PROFILE_A, ProfileError, parse_detector_profile
from gateway.config import ConfigError, SiteConfig, load_config, parse_config
from gateway.panel.side import bus_drivers
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedIOStation
from gateway_sim.nullmodem import VirtualNullModem
from gateway_sim.wireline import WireSpec
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, read_events, running_gateway
from tests.support.site import build_site

CONTROLLER = 9  # the controller's Modbus address
STRIDE = 3  # level, status, unit code per channel
HOUSEHOLDS = {1: "u1-c1", 2: "u1-c2", 3: "u1-c3", 4: "u1-c4"}
QUAD = """
[profiles.quad]
kind = "gas_detector"
function = 3
start = 0
count = 3
channels = 4
stride = 3
value = { register = 0, decimals = 1 }
status = { register = 1, codes = { "0" = "normal", "1" = "low_alarm", "2" = "high_alarm", "3" = "sensor_fault" } }
measure = { register = 2, codes = { "2" = "%LEL", "0" = "ppm" } }
"""


def controller_toml(channels: str | None = None) -> str:
    """Four more households, the quad profile and a controller binding one channel to each household."""
    lines = [QUAD]
    for household in HOUSEHOLDS.values():
        lines += ["[[households]]", f'id = "{household}"', 'unit = "u1"', ""]
    lines += ["[[devices]]", 'id = "ctrl"', 'kind = "gas_detector"', 'unit = "u1"', 'bus = "bus1"',
              f"address = {CONTROLLER}", 'profile = "quad"', ""]
    if channels is None:
        for n, household in HOUSEHOLDS.items():
            lines += ["[[devices.channels]]", f'household = "{household}"', *(["low = 8.0"] if n == 2 else []), ""]
    else:
        lines.append(channels)
    return "\n".join(lines)


def site(tmp_path: Path, channels: str | None = None, *, bus_port: str = "/dev/ttyUSB0",
         broker_port: int = 1883) -> tuple[SiteConfig, str]:
    spec = build_site(bus_port=bus_port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", households=1)
    path = tmp_path / "site.toml"
    path.write_text(spec.toml + "\n" + controller_toml(channels), encoding="utf-8")
    return load_config(path), spec.detectors[0].id


# ------------------------------------------------------------------------------------------- config


def test_each_channel_is_a_detector_of_its_own(tmp_path: Path) -> None:
    cfg, _ = site(tmp_path)
    channels = [d for d in cfg.devices if d.controller == "ctrl"]
    assert [d.id for d in channels] == ["ctrl.ch1", "ctrl.ch2", "ctrl.ch3", "ctrl.ch4"]
    assert [d.household for d in channels] == list(HOUSEHOLDS.values())
    assert [d.channel for d in channels] == [1, 2, 3, 4]
    assert {d.address for d in channels} == {CONTROLLER}
    assert [d.low for d in channels] == [10.0, 8.0, 10.0, 10.0]  # a channel's own threshold
    profiles = [d.detector_profile for d in channels]
    assert [p.value_register for p in profiles if p is not None] == [0, 3, 6, 9]
    assert [p.status.register for p in profiles if p is not None and p.status is not None] == [1, 4, 7, 10]


def test_the_worked_example_in_the_docs_parses(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    block = next(b for b in text.split("```toml\n")[1:] if "[[devices.channels]]" in b).split("```")[0]
    example = tomllib.loads(block)
    doc = tomllib.loads(build_site(bus_port="/dev/ttyUSB0", db_path=tmp_path / "e.db", broker_port=1883,
                                   socket_path=tmp_path / "c.sock", households=1).toml)
    doc["units"] = [{"id": "u1"}]
    doc["households"] = [{"id": h, "unit": "u1"} for h in ("u1-101", "u1-102", "u1-104")]
    doc["buses"][0]["id"] = "rs485-1"
    doc["devices"] = example["devices"]
    doc["profiles"] = example["profiles"]
    cfg = parse_config(doc, base_dir=tmp_path)
    assert [(d.id, d.household, d.low) for d in cfg.devices] == [
        ("ctrl-u1.ch1", "u1-101", 10.0), ("ctrl-u1.ch2", "u1-102", 8.0), ("ctrl-u1.ch4", "u1-104", 10.0)]


@pytest.mark.parametrize(("channels", "path", "reason"), [
    ("[[devices.channels]]\nchannel = 5\nhousehold = \"u1-c1\"\n", "devices[1].channels[0].channel",
     "must be ≤ 4"),
    ("[[devices.channels]]\nhousehold = \"u1-c1\"\n[[devices.channels]]\nchannel = 1\nhousehold = \"u1-c2\"\n",
     "devices[1].channels[1].channel", "channel 1 is already bound at devices[1].channels[0]"),
    ("[[devices.channels]]\nhousehold = \"nowhere\"\n", "devices[1].channels[0].household",
     "unknown household 'nowhere'"),
    ("[[devices.channels]]\nhousehold = \"u1-c1\"\nhigh = 80.0\n", "devices[1].channels[0].high",
     "level 2 must be ≤ 50"),
    ("[[devices.channels]]\nhousehold = \"u1-c1\"\nvalve = 1\n", "devices[1].channels[0].valve", "unknown key"),
    ("", "devices[1].channels", "bind each one in use"),
])
def test_channel_errors_name_the_key(tmp_path: Path, channels: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, channels)
    assert info.value.path == path
    assert reason in info.value.reason


@pytest.mark.parametrize(("body", "key", "reason"), [
    ({"stride": None}, "stride", "is required"),
    ({"channels": None}, "stride", "only for a profile with channels > 1"),
    ({"channels": 65}, "channels", "must be 1–64"),
    ({"stride": 30000}, "stride", "run past register 65535"),
])
def test_multi_channel_profile_errors(body: dict[str, Any], key: str, reason: str) -> None:
    data = {**tomllib.loads(QUAD)["profiles"]["quad"], **body}
    data.pop("kind")
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ProfileError) as info:
        parse_detector_profile("quad", data)
    assert (info.value.key, reason in info.value.reason) == (key, True), info.value


def test_a_single_channel_profile_has_no_channels(tmp_path: Path) -> None:
    spec = build_site(bus_port="/dev/ttyUSB0", db_path=tmp_path / "e.db", broker_port=1883,
                      socket_path=tmp_path / "c.sock", households=1)
    path = tmp_path / "site.toml"
    path.write_text(spec.toml + '\n[[devices.channels]]\nhousehold = "u1-h001"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, "has one channel" in info.value.reason) == ("devices[0].channels", True)


# ------------------------------------------------------------------------------------------- reads


def test_the_channels_are_polled_as_one_group_in_as_few_reads_as_fit(tmp_path: Path) -> None:
    cfg, _ = site(tmp_path)
    polled = group_channels(bus_drivers(cfg, "bus1"))
    assert [type(d) for d in polled] == [GasDetector, ChannelGroup]
    group = polled[1]
    assert isinstance(group, ChannelGroup)
    assert group.device_ids == ("ctrl.ch1", "ctrl.ch2", "ctrl.ch3", "ctrl.ch4")
    assert [(start, count) for start, count, _ in group.reads] == [(0, 12)]
    quad = group.channels[0].profile
    assert quad.cycle_reads == ((3, 12),) and group.channels[1].profile.cycle_reads == ()
    # 60 channels of 3 registers: 41 fit one read of 125 registers, the other 19 a second one.
    wide = dataclasses.replace(quad, channels=60)
    many = ChannelGroup([GasDetector(f"w.ch{n}", 5, wide.for_channel(n)) for n in range(1, 61)])
    assert [(start, count) for start, count, _ in many.reads] == [(0, 123), (123, 57)]
    assert wide.cycle_reads == ((3, 123), (3, 57))
    assert group_channels([GasDetector("a", 1, PROFILE_A)])[0].device_id == "a"


# ------------------------------------------------------------------------------------------- on the bus


def set_channel(station: SimulatedIOStation, channel: int, level: float, status: int = 0) -> None:
    base = (channel - 1) * STRIDE
    station.set_holding_register(base, round(level * 10))
    station.set_holding_register(base + 1, status)
    station.set_holding_register(base + 2, 2)  # %LEL


@pytest.mark.timeout(240)
async def test_each_channel_raises_its_own_households_alarm_and_one_read_covers_all_four(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    requests: list[bytes] = []
    with VirtualNullModem(tmp_path / "line") as line:
        sim = SimulatedBus(line.device_port, wire=WireSpec(baud=9600),
                           on_request=lambda slave, frame, _t: requests.append(frame) if slave == CONTROLLER
                           else None)
        detector = sim.add_gas_detector(1, "A", unit="%LEL", decimals=1)
        detector.set_status("normal")
        station = sim.add_io_station(CONTROLLER)
        for n in HOUSEHOLDS:
            set_channel(station, n, 0.0)
        with sim:
            cfg, detector_id = site(tmp_path, bus_port=line.gateway_port, broker_port=broker.port)
            db = tmp_path / "events.db"
            async with running_gateway(cfg) as gateway:

                def state(device_id: str) -> str:
                    return str(next(d for d in gateway.panel.snapshot()["devices"]
                                    if d["device"] == device_id)["state"])

                channel_ids = [f"ctrl.ch{n}" for n in HOUSEHOLDS]
                await eventually(lambda: all(state(c) == "normal" for c in [detector_id, *channel_ids]),
                                 timeout=60, message=lambda: str({c: state(c) for c in channel_ids}))
                for n in HOUSEHOLDS:
                    set_channel(station, n, 30.0)  # channel n's household has gas: level 2
                    await eventually(lambda n=n: state(f"ctrl.ch{n}") == "high_alarm", timeout=60,
                                     message=f"channel {n} did not alarm")
                    assert [state(f"ctrl.ch{m}") for m in HOUSEHOLDS if m > n] == ["normal"] * (4 - n)
                assert state(detector_id) == "normal"

                def alarms() -> dict[str, str]:
                    rows = read_events(db, "kind = 'alarm' AND action = 'raised'")
                    return {r["device"]: r["household"] for r in rows}

                await eventually(lambda: len(alarms()) == 4, timeout=30, message=lambda: str(alarms()))
                assert alarms() == {f"ctrl.ch{n}": household for n, household in HOUSEHOLDS.items()}
                polls = gateway.buses["bus1"].polls

    # Every request to the controller read all four channels at once: registers 0–11, one transaction.
    framer = FramerRTU(DecodePDU(is_server=True))
    decoded = [framer.handleFrame(frame, 0, 0)[1] for frame in requests]
    assert decoded and all(r is not None for r in decoded)
    assert {(r.function_code, r.address, r.count) for r in decoded if r is not None} == {(3, 0, 12)}
    assert len(decoded) <= polls
