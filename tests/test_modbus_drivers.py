"""Modbus drivers through a real pymodbus RTU client: why a poll failed (CommError.reason)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
from pymodbus.client import ModbusSerialClient

from drivers.modbus import CommError, ExtinguisherStation, GasDetector, read_block
from drivers.profiles import PROFILE_A, PROFILE_B, STATION_IO_4DI, BitPoint, DetectorProfile, StationProfile
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector, SimulatedIOStation
from gateway_sim.nullmodem import VirtualNullModem

pytestmark = pytest.mark.timeout(120)

DETECTOR, PROFILE_B_DETECTOR, STATION, ABSENT = 1, 2, 7, 99


@dataclasses.dataclass
class Line:
    bus: SimulatedBus
    client: ModbusSerialClient
    detector: SimulatedGasDetector
    station: SimulatedIOStation


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    with VirtualNullModem(tmp_path_factory.mktemp("line")) as modem:
        bus = SimulatedBus(modem.device_port)
        detector = bus.add_gas_detector(DETECTOR, "A")
        bus.add_gas_detector(PROFILE_B_DETECTOR, "B")
        station = bus.add_io_station(STATION)
        with bus:
            client = ModbusSerialClient(modem.gateway_port, baudrate=9600, timeout=0.3, retries=0)
            assert client.connect()
            try:
                yield Line(bus, client, detector, station)
            finally:
                client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def healthy(line: Line) -> Iterator[Line]:
    """Every slave answering before and after the test."""
    for slave in (DETECTOR, PROFILE_B_DETECTOR, STATION):
        line.bus.responding(slave, True)
    yield line
    for slave in (DETECTOR, PROFILE_B_DETECTOR, STATION):
        line.bus.responding(slave, True)


def poll_reason(poll: Callable[[], object]) -> CommError:
    with pytest.raises(CommError) as info:
        poll()
    return info.value


# -- timeout: nobody answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("slave", "profile"), [(DETECTOR, PROFILE_A), (PROFILE_B_DETECTOR, PROFILE_B)])
def test_silent_detector_times_out(healthy: Line, slave: int, profile: DetectorProfile) -> None:
    detector = GasDetector("gas", slave, profile)
    detector.poll(healthy.client)
    healthy.bus.responding(slave, False)
    error = poll_reason(lambda: detector.poll(healthy.client))
    assert error.reason == "timeout"
    healthy.bus.responding(slave, True)
    assert detector.poll(healthy.client).status == {"normal"}  # the line is clean again


def test_absent_address_times_out(healthy: Line) -> None:
    error = poll_reason(lambda: GasDetector("gas", ABSENT, PROFILE_A).poll(healthy.client))
    assert error.reason == "timeout"


def test_silent_station_times_out(healthy: Line) -> None:
    station = ExtinguisherStation("cab", STATION, STATION_IO_4DI)
    healthy.bus.responding(STATION, False)
    assert poll_reason(lambda: station.poll(healthy.client)).reason == "timeout"
    healthy.bus.responding(STATION, True)
    assert station.poll(healthy.client).presence is False


# -- exception response: the slave answers "no" -----------------------------------------------------------


def test_reading_past_the_register_map_is_an_exception_response(healthy: Line) -> None:
    too_long = dataclasses.replace(PROFILE_A, count=11)  # profile A has registers 0–9 only
    error = poll_reason(lambda: GasDetector("gas", DETECTOR, too_long).poll(healthy.client))
    assert error.reason == "exception_response"
    assert error.detail == "exception code 2"  # illegal data address
    assert GasDetector("gas", DETECTOR, PROFILE_A).poll(healthy.client).status == {"normal"}


def test_unsupported_function_is_an_exception_response(healthy: Line) -> None:
    error = poll_reason(lambda: read_block(healthy.client, 1, 0, 1, DETECTOR))  # a detector has no coils
    assert (error.reason, error.detail) == ("exception_response", "exception code 1")  # illegal function


@pytest.mark.parametrize("function", [1, 2, 3, 4])
def test_station_point_outside_the_module_is_an_exception_response(healthy: Line, function: int) -> None:
    profile = StationProfile(name="far", points={"presence": BitPoint(function=function, address=40)})
    error = poll_reason(lambda: ExtinguisherStation("cab", STATION, profile).poll(healthy.client))
    assert (error.reason, error.detail) == ("exception_response", "exception code 2")


# -- what a good read looks like ----------------------------------------------------------------------------


def test_read_block_bits_are_ints_of_the_requested_count(healthy: Line) -> None:
    healthy.station.set_discrete_input(1, True)
    healthy.station.set_coil(2, True)
    try:
        assert read_block(healthy.client, 2, 0, 3, STATION) == [0, 1, 0]
        assert read_block(healthy.client, 1, 1, 2, STATION) == [0, 1]
    finally:
        healthy.station.set_discrete_input(1, False)
        healthy.station.set_coil(2, False)


def test_read_block_registers(healthy: Line) -> None:
    healthy.detector.set_concentration(12.5)
    try:
        assert read_block(healthy.client, 3, 1, 1, DETECTOR) == [125]
        assert read_block(healthy.client, 4, 1, 1, DETECTOR) == [125]  # function 4 reads the same map
    finally:
        healthy.detector.set_concentration(0.0)


def test_comm_error_text() -> None:
    assert str(CommError("timeout")) == "timeout"
    assert str(CommError("exception_response", "exception code 2")) == "exception_response: exception code 2"
