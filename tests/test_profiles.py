"""Register maps: pure decoding of the built-in and custom profiles, and the contract between each built-in
profile, the simulated device and the driver, read through a real pymodbus RTU client on a pty."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusSerialClient

from drivers.modbus import ExtinguisherStation, GasDetector
from drivers.profiles import (
    BUILTIN_DETECTOR_PROFILES,
    PROFILE_A,
    PROFILE_B,
    STATION_IO_4DI,
    AnalogPoint,
    BitField,
    BitPoint,
    DetectorProfile,
    StationProfile,
    parse_detector_profile,
    parse_station_profile,
)
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import PROFILE_A_STATUS_CODES, PROFILE_B_ALARM_BITS, SimulatedGasDetector, SimulatedIOStation
from gateway_sim.nullmodem import VirtualNullModem

pytestmark = pytest.mark.timeout(120)


def profile_a_registers(*, unit: int = 0x2, decimals_code: int = 0x4, value: int = 0, status: int = 0x01,
                        gas: int = 0x11) -> list[int]:
    regs = [0] * 10
    regs[0] = unit << 12 | decimals_code << 8
    regs[1] = value
    regs[5] = 0xAB00 | status  # the high byte of register 5 is not part of the status
    regs[8] = gas << 8 | 0x42
    return regs


# -- profile A ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unit_code", "measure"), [(0x0, "ppm"), (0x2, "%LEL"), (0x4, "%VOL")])
def test_profile_a_unit_codes(unit_code: int, measure: str) -> None:
    reading = PROFILE_A.decode(profile_a_registers(unit=unit_code))
    assert reading.measure == measure
    assert reading.status == {"normal"}


@pytest.mark.parametrize(("code", "decimals"), [(0x0, 0), (0x4, 1), (0x8, 2), (0xC, 3)])
def test_profile_a_decimals_codes(code: int, decimals: int) -> None:
    reading = PROFILE_A.decode(profile_a_registers(decimals_code=code, value=1234))
    assert reading.value == pytest.approx(1234 / 10**decimals)


def test_profile_a_unknown_unit_or_decimals_code_is_a_data_error() -> None:
    unknown_decimals = PROFILE_A.decode(profile_a_registers(decimals_code=0x1, value=120))
    assert unknown_decimals.status == {"data_error"}
    unknown_unit = PROFILE_A.decode(profile_a_registers(unit=0x7, value=120))
    assert unknown_unit.status == {"data_error"} and unknown_unit.measure is None


@pytest.mark.parametrize(("name", "code"), sorted(PROFILE_A_STATUS_CODES.items()))
def test_profile_a_status_codes(name: str, code: int) -> None:
    assert PROFILE_A.decode(profile_a_registers(status=code)).status == {name}


@pytest.mark.parametrize("code", [0x07, 0x0A, 0x10, 0xFF])
def test_profile_a_unknown_status_code_is_a_data_error(code: int) -> None:
    assert PROFILE_A.decode(profile_a_registers(status=code)).status == {"data_error"}


@pytest.mark.parametrize(("code", "gas"), [(0x11, "CH4"), (0x05, "CO"), (0x33, None)])
def test_profile_a_gas_type(code: int, gas: str | None) -> None:
    assert PROFILE_A.decode(profile_a_registers(gas=code)).gas == gas


def test_profile_a_needs_the_whole_block() -> None:
    with pytest.raises(ValueError, match="expected 10 registers"):
        PROFILE_A.decode([0] * 9)


# -- profile B ----------------------------------------------------------------------------------------


def profile_b_registers(word: int, value: int = 0) -> list[int]:
    return [word, value, 0, 0, 0, 0, 7]


@pytest.mark.parametrize(
    ("bit", "status"),
    [(0, "low_alarm"), (1, "high_alarm"), (2, "stel"), (3, "twa"), (4, "over_range"), (5, "sensor_fault")],
)
def test_profile_b_alarm_word_bits(bit: int, status: str) -> None:
    reading = PROFILE_B.decode(profile_b_registers(0x8000 | 1 << bit))
    assert reading.status == {status}
    assert reading.warmup_remaining_s is None


def test_profile_b_several_bits_and_normal() -> None:
    assert PROFILE_B.decode(profile_b_registers(0x8000)).status == {"normal"}
    assert PROFILE_B.decode(profile_b_registers(0x8003)).status == {"low_alarm", "high_alarm"}


@pytest.mark.parametrize(("word", "remaining"), [(0x0000, 0.0), (0x0001, 0.1), (600, 60.0), (0x7FFF, 3276.7)])
def test_profile_b_warmup_remaining(word: int, remaining: float) -> None:
    reading = PROFILE_B.decode(profile_b_registers(word))
    assert reading.status == {"warmup"}
    assert reading.warmup_remaining_s == pytest.approx(remaining)


def test_profile_b_decimals_and_measure() -> None:
    reading = PROFILE_B.decode(profile_b_registers(0x8000, value=355))
    assert reading.value == pytest.approx(35.5)
    assert reading.measure == "%LEL"


# -- custom detector profiles from TOML -----------------------------------------------------------------

CUSTOM_STATUS_TABLE = """
function = 4
start = 100
count = 6

[value]
register = 101
decimals = 2
scale = 1.0
signed = true

[status]
register = 103
shift = 8
mask = 0xF
codes = { "0" = "normal", "0x1" = "low_alarm", "2" = "high_alarm", "0xE" = "sensor_fault" }

[[flags]]
register = 104
bit = 0
status = "needs_calibration"

[warmup]
register = 105
ready_bit = 0
remaining_mask = 0xFF00
remaining_scale = 1.0
"""


def custom(text: str, name: str = "X") -> DetectorProfile:
    return parse_detector_profile(name, tomllib.loads(text))


def test_custom_profile_shape() -> None:
    profile = custom(CUSTOM_STATUS_TABLE)
    assert (profile.function, profile.start, profile.count, profile.value_register) == (4, 100, 6, 101)
    assert profile.status == BitField(register=103, shift=8, mask=0xF,
                                      codes={0: "normal", 1: "low_alarm", 2: "high_alarm", 0xE: "sensor_fault"})
    assert profile.flags == ((104, 0, "needs_calibration"),)


@pytest.mark.parametrize(
    ("status_word", "flag_word", "expected"),
    [
        (0x0000, 0, {"normal"}),
        (0x0100, 0, {"low_alarm"}),
        (0xF200, 0, {"high_alarm"}),  # bits outside the mask are ignored
        (0x0E00, 1, {"sensor_fault", "needs_calibration"}),
        (0x0500, 0, {"data_error"}),  # a code the table does not know
    ],
)
def test_custom_status_table_and_flags(status_word: int, flag_word: int, expected: set[str]) -> None:
    profile = custom(CUSTOM_STATUS_TABLE)
    reading = profile.decode([0, 1234, 0, status_word, flag_word, 0x0001])
    assert reading.status == expected
    assert reading.value == pytest.approx(12.34)


def test_custom_signed_value_and_scale() -> None:
    profile = custom(CUSTOM_STATUS_TABLE.replace("scale = 1.0", "scale = 0.5"))
    assert profile.decode([0, 0xFFFE, 0, 0, 0, 1]).value == pytest.approx(-0.01)
    assert profile.decode([0, 400, 0, 0, 0, 1]).value == pytest.approx(2.0)


def test_custom_warmup_field() -> None:
    profile = custom(CUSTOM_STATUS_TABLE)
    warming = profile.decode([0, 0, 0, 0x0100, 0, 0x2D00])  # ready bit 0 clear, 0x2D = 45 s remaining
    assert "warmup" in warming.status and warming.warmup_remaining_s == pytest.approx(45.0)
    ready = profile.decode([0, 0, 0, 0x0100, 0, 0x2D01])
    assert ready.status == {"low_alarm"} and ready.warmup_remaining_s is None


DECIMALS_FIELD = """
start = 0
count = 2
measure = "ppm"
gas = "CO"
[value]
register = 1
decimals = { register = 0, shift = 4, mask = 0x7 }
"""


@pytest.mark.parametrize(("decimals", "value"), [(0, 1234.0), (1, 123.4), (3, 1.234), (6, 0.001234)])
def test_custom_decimals_from_a_bit_field(decimals: int, value: float) -> None:
    profile = custom(DECIMALS_FIELD)
    reading = profile.decode([decimals << 4 | 0x000F, 1234])
    assert reading.value == pytest.approx(value)
    assert reading.measure == "ppm" and profile.default_gas == "CO"


def test_custom_decimals_field_out_of_range_is_a_data_error() -> None:
    assert custom(DECIMALS_FIELD).decode([7 << 4, 1234]).status == {"data_error"}


def test_custom_decimals_field_with_codes_and_measure_field() -> None:
    profile = custom("""
start = 0
count = 2
measure = { register = 0, shift = 12, mask = 0xF, codes = { "0" = "ppm", "2" = "%LEL" } }
[value]
register = 1
decimals = { register = 0, shift = 8, mask = 0xF, codes = { "0" = 0, "4" = 1, "8" = 2 } }
""")
    reading = profile.decode([0x2800, 2550])
    assert reading.measure == "%LEL"
    assert reading.value == pytest.approx(25.5)
    assert profile.decode([0x2100, 5]).status == {"data_error"}


def test_custom_profile_used_by_a_device(tmp_path: Path) -> None:
    from gateway.config import parse_config

    doc = tomllib.loads("""
[site]
community = "c"
building = "b"
[[units]]
id = "u1"
[[buses]]
id = "bus1"
port = "/dev/ttyUSB0"
[[devices]]
id = "co-1"
kind = "gas_detector"
unit = "u1"
bus = "bus1"
address = 3
profile = "co-meter"
[outputs]
buzzer = 18
""")
    doc["profiles"] = {"co-meter": {"kind": "gas_detector", **tomllib.loads(DECIMALS_FIELD)}}
    dev = parse_config(doc, base_dir=tmp_path).device("co-1")
    assert dev.detector_profile is not None and dev.detector_profile.name == "co-meter"
    assert (dev.gas, dev.measure, dev.low, dev.high) == ("CO", "ppm", 50.0, 150.0)


# -- station profiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ((1, 1, 1, 0), (True, True, False, False)),  # all well
        ((0, 1, 1, 0), (False, True, False, False)),  # extinguisher taken
        ((1, 0, 1, 0), (True, False, False, False)),  # pressure switch open
        ((1, 1, 0, 0), (True, True, True, False)),  # door open
        ((1, 1, 1, 1), (True, True, False, True)),  # something blocks the cabinet
    ],
)
def test_io_4di_bits(inputs: tuple[int, ...], expected: tuple[bool, ...]) -> None:
    reading = STATION_IO_4DI.decode({2: list(inputs)})
    assert (reading.presence, reading.pressure_ok, reading.door_open, reading.obstructed) == expected
    assert reading.pressure is None


ANALOG_STATION = """
[presence]
function = 1
address = 0

[pressure]
function = 4
address = 2
min = 0.8
max = 1.4
scale = 0.01

[door]
function = 3
address = 1
bit = 3
normal = true
"""


def test_custom_station_profile_shape() -> None:
    profile = parse_station_profile("cab", tomllib.loads(ANALOG_STATION))
    assert profile.points["pressure"] == AnalogPoint(function=4, address=2, minimum=0.8, maximum=1.4, scale=0.01)
    assert profile.points["door"] == BitPoint(function=3, address=1, normal=True, bit=3)
    assert profile.spans() == {1: (0, 1), 3: (1, 1), 4: (2, 1)}


@pytest.mark.parametrize(
    ("raw", "pressure", "ok"),
    [(120, 1.2, True), (80, 0.8, True), (140, 1.4, True), (79, 0.79, False), (141, 1.41, False), (0, 0.0, False)],
)
def test_analog_pressure_range(raw: int, pressure: float, ok: bool) -> None:
    profile = parse_station_profile("cab", tomllib.loads(ANALOG_STATION))
    reading = profile.decode({1: [1], 3: [0b1000], 4: [raw]})
    assert reading.pressure == pytest.approx(pressure)
    assert reading.pressure_ok is ok
    assert reading.presence is True and reading.door_open is False and reading.obstructed is None


def test_register_bit_point() -> None:
    profile = parse_station_profile("cab", tomllib.loads(ANALOG_STATION))
    assert profile.decode({1: [1], 3: [0b0111], 4: [100]}).door_open is True
    assert profile.decode({1: [1], 3: [0xFFFF], 4: [100]}).door_open is False


def test_signed_analog_pressure() -> None:
    profile = parse_station_profile("cab", {"pressure": {"function": 3, "address": 0, "min": -1.0, "max": 1.0,
                                                         "signed": True, "scale": 0.1}})
    reading = profile.decode({3: [0xFFFB]})
    assert reading.pressure == pytest.approx(-0.5) and reading.pressure_ok is True


# -- contract: simulated device → real pymodbus client → driver ---------------------------------------

CLIENT_TIMEOUT_S = 0.5

# slave: (profile, unit, decimals, gas, full scale)
DETECTORS: dict[int, tuple[str, str, int, str, float]] = {
    1: ("A", "%LEL", 1, "CH4", 100.0),
    2: ("A", "ppm", 0, "CO", 1000.0),
    3: ("A", "%VOL", 3, "CH4", 5.0),
    4: ("A", "%LEL", 2, "CH4", 100.0),
    5: ("A", "%LEL", 0, "CH4", 100.0),
    6: ("B", "%LEL", 1, "CH4", 100.0),
}
STATION_SLAVE = 20


class Line:
    """One simulated bus and a real client on the other end of the virtual cable."""

    def __init__(self, bus: SimulatedBus, client: ModbusSerialClient) -> None:
        self.bus = bus
        self.client = client

    def detector(self, slave: int) -> SimulatedGasDetector:
        sim = self.bus.slaves[slave]
        assert isinstance(sim, SimulatedGasDetector)
        return sim

    def station(self) -> SimulatedIOStation:
        sim = self.bus.slaves[STATION_SLAVE]
        assert isinstance(sim, SimulatedIOStation)
        return sim


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    with VirtualNullModem(tmp_path_factory.mktemp("line")) as modem:
        bus = SimulatedBus(modem.device_port)
        for slave, (profile, unit, decimals, gas, full_scale) in DETECTORS.items():
            bus.add_gas_detector(slave, profile, unit=unit, decimals=decimals, gas=gas,  # type: ignore[arg-type]
                                 full_scale=full_scale, low_setpoint=full_scale / 10, high_setpoint=full_scale / 4)
        bus.add_io_station(STATION_SLAVE)
        with bus:
            client = ModbusSerialClient(modem.gateway_port, baudrate=9600, timeout=CLIENT_TIMEOUT_S, retries=0)
            assert client.connect()
            try:
                yield Line(bus, client)
            finally:
                client.close()  # type: ignore[no-untyped-call]


def test_every_builtin_detector_profile_is_covered() -> None:
    assert {profile for profile, *_ in DETECTORS.values()} == set(BUILTIN_DETECTOR_PROFILES)


@pytest.mark.parametrize(
    ("slave", "value"),
    [(1, 0.0), (1, 12.5), (1, 99.9), (2, 150.0), (2, 0.0), (3, 1.234), (4, 49.99), (5, 26.0), (6, 0.0), (6, 35.5)],
)
def test_detector_value_round_trip(line: Line, slave: int, value: float) -> None:
    profile_name, unit, _decimals, gas, _full_scale = DETECTORS[slave]
    sim = line.detector(slave)
    sim.set_warmup(0)
    sim.set_status("normal")
    sim.set_concentration(value)
    reading = GasDetector(f"gas-{slave}", slave, BUILTIN_DETECTOR_PROFILES[profile_name]).poll(line.client)
    assert reading.value == pytest.approx(value)
    assert reading.status == {"normal"}
    assert reading.measure == unit
    if profile_name == "A":
        assert reading.gas == gas


@pytest.mark.parametrize("status", sorted(PROFILE_A_STATUS_CODES))
def test_profile_a_status_round_trip(line: Line, status: str) -> None:
    sim = line.detector(1)
    sim.set_warmup(0)
    sim.set_concentration(5.0)
    sim.set_status(status)
    reading = GasDetector("gas-1", 1, PROFILE_A).poll(line.client)
    assert reading.status == {status}


def test_profile_a_unknown_status_round_trip(line: Line) -> None:
    sim = line.detector(1)
    sim.set_warmup(0)
    sim.set_status_code(0x07)
    assert GasDetector("gas-1", 1, PROFILE_A).poll(line.client).status == {"data_error"}


@pytest.mark.parametrize("status", sorted(set(PROFILE_B_ALARM_BITS) - {"sensor_lost"}))
def test_profile_b_status_round_trip(line: Line, status: str) -> None:
    sim = line.detector(6)
    sim.set_warmup(0)
    sim.set_status(status)
    assert GasDetector("gas-6", 6, PROFILE_B).poll(line.client).status == {status}


def test_profile_b_alarm_bits_and_warmup_round_trip(line: Line) -> None:
    sim = line.detector(6)
    sim.set_alarm_bits(0b11)
    sim.set_warmup(0)
    assert GasDetector("gas-6", 6, PROFILE_B).poll(line.client).status == {"low_alarm", "high_alarm"}
    sim.set_warmup(60)
    try:
        reading = GasDetector("gas-6", 6, PROFILE_B).poll(line.client)
    finally:
        sim.set_warmup(0)
        sim.set_alarm_bits(0)
    assert reading.status == {"warmup"}
    assert reading.warmup_remaining_s is not None and 0 < reading.warmup_remaining_s <= 60


def test_profile_a_warmup_round_trip(line: Line) -> None:
    sim = line.detector(4)
    sim.set_status("normal")
    sim.set_warmup(60)
    try:
        assert GasDetector("gas-4", 4, PROFILE_A).poll(line.client).status == {"warmup"}
    finally:
        sim.set_warmup(0)


@pytest.mark.parametrize(
    "inputs",
    [(True, True, True, False), (False, True, True, False), (True, False, True, False), (True, True, False, False),
     (True, True, True, True), (False, False, False, True)],
)
def test_io_4di_round_trip(line: Line, inputs: tuple[bool, bool, bool, bool]) -> None:
    sim = line.station()
    for address, state in enumerate(inputs):
        sim.set_discrete_input(address, state)
    reading = ExtinguisherStation("cab", STATION_SLAVE, STATION_IO_4DI).poll(line.client)
    presence, pressure, door_closed, blocked = inputs
    assert reading.presence is presence
    assert reading.pressure_ok is pressure
    assert reading.door_open is (not door_closed)
    assert reading.obstructed is blocked


@pytest.mark.parametrize(("raw", "ok"), [(120, True), (79, False), (141, False)])
def test_analog_pressure_round_trip(line: Line, raw: int, ok: bool) -> None:
    profile: StationProfile = parse_station_profile("cab", tomllib.loads(ANALOG_STATION))
    sim = line.station()
    sim.set_coil(0, True)
    sim.set_holding_register(1, 0b1000)
    sim.set_input_register(2, raw)
    reading = ExtinguisherStation("cab", STATION_SLAVE, profile).poll(line.client)
    assert reading.pressure == pytest.approx(raw / 100)
    assert reading.pressure_ok is ok
    assert reading.presence is True and reading.door_open is False


def test_simulator_registers_decode_to_what_was_set() -> None:
    """The simulated device's own register image, decoded without a bus."""
    sims: list[tuple[SimulatedGasDetector, DetectorProfile]] = [
        (SimulatedGasDetector(1, "A", unit="ppm", decimals=0, gas="CO"), PROFILE_A),
        (SimulatedGasDetector(2, "B", decimals=1), PROFILE_B),
    ]
    for sim, profile in sims:
        sim.set_concentration(42.0)
        sim.set_status("high_alarm")
        reading = profile.decode(sim.registers())
        assert reading.value == pytest.approx(42.0)
        assert reading.status == {"high_alarm"}
