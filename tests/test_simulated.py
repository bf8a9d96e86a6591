"""The simulated bus, seen from a real pymodbus RTU client on the gateway end of the virtual cable."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import PROFILE_A_STATUS_CODES, SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem

pytestmark = pytest.mark.timeout(60)

CLIENT_TIMEOUT_S = 0.3


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, failing after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


@pytest.fixture
def bus(modem: VirtualNullModem) -> Iterator[SimulatedBus]:
    sim = SimulatedBus(modem.device_port)
    yield sim
    sim.stop()


@pytest.fixture
def client(modem: VirtualNullModem) -> Iterator[ModbusSerialClient]:
    cli = ModbusSerialClient(modem.gateway_port, baudrate=9600, timeout=CLIENT_TIMEOUT_S, retries=0)
    yield cli
    disconnect(cli)


def disconnect(client: ModbusSerialClient) -> None:
    """Close the client's port (pymodbus leaves ``close`` untyped)."""
    client.close()  # type: ignore[no-untyped-call]


def read(client: ModbusSerialClient, slave: int, address: int, count: int) -> list[int]:
    response = client.read_holding_registers(address, count=count, device_id=slave)
    assert not response.isError(), response
    return list(response.registers)


# -- profile A ----------------------------------------------------------------------------------------


def test_profile_a_encoding(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(1, "A", unit="%LEL", decimals=1, low_setpoint=10, high_setpoint=25)
    bus.start()
    det.set_concentration(12.5)
    regs = read(client, 1, 0, 10)
    assert regs[0] == 0x2400  # %LEL, 1 decimal
    assert regs[1] == 125
    assert regs[2:5] == [100, 250, 1000]
    assert regs[5] & 0xFF == 0x01
    assert regs[8] >> 8 == 0x11
    assert regs == det.registers()


@pytest.mark.parametrize(
    ("unit", "decimals", "gas", "reg0", "reg8"),
    [
        ("ppm", 0, "CO", 0x0000, 0x0500),
        ("%VOL", 3, "CH4", 0x4C00, 0x1100),
        ("%LEL", 2, "CH4", 0x2800, 0x1100),
    ],
)
def test_profile_a_unit_decimals_gas(
    bus: SimulatedBus, client: ModbusSerialClient, unit: str, decimals: int, gas: str, reg0: int, reg8: int
) -> None:
    det = bus.add_gas_detector(7, unit=unit, decimals=decimals, gas=gas, full_scale=1)
    bus.start()
    det.set_concentration(0.5)
    regs = read(client, 7, 0, 10)
    assert (regs[0], regs[8]) == (reg0, reg8)
    assert regs[1] == round(0.5 * 10**decimals)
    assert regs[4] == 10**decimals


def test_profile_a_status_codes(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(1)
    bus.start()
    seen = {}
    for name in PROFILE_A_STATUS_CODES:
        det.set_status(name)
        seen[name] = read(client, 1, 5, 1)[0] & 0xFF
    assert seen == {
        "warmup": 0x00,
        "normal": 0x01,
        "data_error": 0x02,
        "sensor_fault": 0x03,
        "pre_alarm": 0x04,
        "low_alarm": 0x05,
        "high_alarm": 0x06,
        "over_range": 0x08,
        "needs_calibration": 0x09,
        "comms_fault": 0x0F,
    }


def test_profile_a_warmup_timer(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(1)
    bus.start()
    det.set_status("low_alarm")
    det.set_warmup(300)
    assert read(client, 1, 5, 1)[0] == 0x00
    det.set_warmup(0)
    assert read(client, 1, 5, 1)[0] == 0x05


def test_value_change_visible_on_next_poll(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(1)
    bus.start()
    for value, raw in [(5.0, 50), (30.0, 300), (0.0, 0), (99.9, 999)]:
        det.set_concentration(value)
        assert read(client, 1, 1, 1) == [raw]


def test_detector_refuses_writes_and_coil_reads(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    bus.add_gas_detector(1)
    bus.start()
    assert client.write_register(1, 5, device_id=1).isError()
    assert client.read_coils(0, count=1, device_id=1).isError()
    assert client.read_holding_registers(0, count=11, device_id=1).isError()
    assert read(client, 1, 1, 1) == [0]


# -- profile B ----------------------------------------------------------------------------------------


def test_profile_b_alarm_word_and_decimals(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(2, "B", decimals=2)
    bus.start()
    det.set_concentration(3.25)
    det.set_run_status(3)
    regs = read(client, 2, 0x6000, 7)
    assert regs[0] == 0x8000  # warm-up finished, no alarm
    assert regs[1] == 325
    assert regs[6] == 3
    words = {}
    for name in ("low_alarm", "high_alarm", "stel", "twa", "over_range", "sensor_fault", "normal"):
        det.set_status(name)
        words[name] = read(client, 2, 0x6000, 1)[0]
    assert words == {
        "low_alarm": 0x8001,
        "high_alarm": 0x8002,
        "stel": 0x8004,
        "twa": 0x8008,
        "over_range": 0x8010,
        "sensor_fault": 0x8020,
        "normal": 0x8000,
    }
    det.set_alarm_bits(0b000011)
    assert read(client, 2, 0x6000, 1) == [0x8003]
    assert read(client, 2, 0x6000, 7) == det.registers()


def test_profile_b_warmup(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    det = bus.add_gas_detector(2, "B")
    bus.start()
    det.set_alarm_bits(0b1)
    det.set_warmup(60)
    word = read(client, 2, 0x6000, 1)[0]
    assert not word & 0x8000
    assert 0 < word <= 600  # remaining warm-up in 0.1 s, counting down
    det.set_warmup(0)
    assert read(client, 2, 0x6000, 1) == [0x8001]


def test_profile_names_are_checked() -> None:
    with pytest.raises(ValueError):
        SimulatedGasDetector(1, "B").set_status("warmup")
    with pytest.raises(ValueError):
        SimulatedGasDetector(1, "A").set_status("stel")
    with pytest.raises(ValueError):
        SimulatedGasDetector(1, "A", unit="mg/m3")


# -- bus behaviour ------------------------------------------------------------------------------------


def test_two_slaves_on_one_bus(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    a = bus.add_gas_detector(1, "A")
    b = bus.add_gas_detector(2, "B", decimals=0, unit="ppm", gas="CO")
    bus.start()
    a.set_concentration(12.5)
    b.set_concentration(40)
    assert read(client, 1, 1, 1) == [125]
    assert read(client, 2, 0x6001, 1) == [40]
    assert client.read_holding_registers(0x6001, count=1, device_id=1).isError()


def test_silent_slave_times_out_while_other_answers(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    bus.add_gas_detector(1)
    bus.add_gas_detector(2)
    bus.start()
    bus.responding(2, False)
    with pytest.raises(ModbusIOException):
        client.read_holding_registers(0, count=2, device_id=2)
    assert read(client, 1, 0, 1) == [0x2400]
    bus.responding(2, True)
    assert read(client, 2, 0, 1) == [0x2400]


def test_absent_address_is_silent(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    bus.add_gas_detector(1)
    bus.start()
    with pytest.raises(ModbusIOException):
        client.read_holding_registers(0, count=1, device_id=9)
    assert read(client, 1, 0, 1) == [0x2400]


def test_on_response_records_frames(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    frames: list[tuple[int, bytes, float]] = []
    bus.on_response = lambda slave, frame, at: frames.append((slave, frame, at))
    bus.add_gas_detector(1)
    bus.add_gas_detector(3)
    bus.start()
    bus.responding(3, False)
    read(client, 1, 0, 2)
    with pytest.raises(ModbusIOException):
        client.read_holding_registers(0, count=2, device_id=3)
    assert [(slave, frame[1]) for slave, frame, _ in frames] == [(1, 3)]
    assert len(frames[0][1]) == 3 + 2 * 2 + 2  # id, fc, byte count, 2 registers, crc


def test_bus_start_fails_without_port(tmp_path: Path) -> None:
    sim = SimulatedBus(str(tmp_path / "missing"))
    sim.add_gas_detector(1)
    with pytest.raises(RuntimeError):
        sim.start()
    assert not sim.running


def test_slaves_must_be_added_before_start(bus: SimulatedBus) -> None:
    bus.add_gas_detector(1)
    with pytest.raises(ValueError):
        bus.add_io_station(1)
    bus.start()
    with pytest.raises(RuntimeError):
        bus.add_io_station(2)


# -- I/O station --------------------------------------------------------------------------------------


def test_io_station_four_separate_tables(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    io = bus.add_io_station(5)
    bus.start()
    io.set_coil(3, True)
    io.set_discrete_input(4, True)
    io.set_holding_register(3, 1234)
    io.set_input_register(3, 4321)
    coils = client.read_coils(0, count=16, device_id=5).bits[:16]
    inputs = client.read_discrete_inputs(0, count=16, device_id=5).bits[:16]
    assert coils == [i == 3 for i in range(16)]
    assert inputs == [i == 4 for i in range(16)]
    assert read(client, 5, 0, 16) == [1234 if i == 3 else 0 for i in range(16)]
    ir = client.read_input_registers(0, count=16, device_id=5)
    assert list(ir.registers) == [4321 if i == 3 else 0 for i in range(16)]
    assert client.read_input_registers(15, count=2, device_id=5).isError()
    assert client.read_coils(16, count=1, device_id=5).isError()


def test_io_station_master_writes_are_visible(bus: SimulatedBus, client: ModbusSerialClient) -> None:
    io = bus.add_io_station(5)
    bus.start()
    assert not client.write_coil(7, True, device_id=5).isError()
    assert not client.write_registers(2, [11, 12], device_id=5).isError()
    assert io.coils()[7] is True
    assert io.holding_registers()[2:4] == [11, 12]
    assert io.discrete_inputs() == [False] * 16
    io.set_coil(7, False)
    assert client.read_coils(7, count=1, device_id=5).bits[0] is False


# -- cable faults -------------------------------------------------------------------------------------


def test_cut_and_mend(modem: VirtualNullModem, bus: SimulatedBus, client: ModbusSerialClient) -> None:
    bus.add_gas_detector(1)
    bus.start()
    assert read(client, 1, 0, 1) == [0x2400]
    modem.cut()
    with pytest.raises(ModbusIOException):
        client.read_holding_registers(0, count=1, device_id=1)
    modem.mend()
    assert read(client, 1, 0, 1) == [0x2400]


def test_unplug_and_replug(modem: VirtualNullModem, bus: SimulatedBus, client: ModbusSerialClient) -> None:
    bus.add_gas_detector(1)
    bus.start()
    assert read(client, 1, 0, 1) == [0x2400]
    modem.unplug()
    assert not os.path.lexists(modem.gateway_port)
    with pytest.raises((ConnectionException, ModbusIOException)):
        client.read_holding_registers(0, count=1, device_id=1)
    disconnect(client)
    assert not client.connect()
    with pytest.raises(serial.SerialException):
        serial.Serial(modem.gateway_port)
    modem.replug()
    assert client.connect()
    assert read(client, 1, 0, 1) == [0x2400]


def test_both_ends_may_reopen(modem: VirtualNullModem, client: ModbusSerialClient) -> None:
    first = SimulatedBus(modem.device_port)
    first.add_gas_detector(1)
    with first:
        assert read(client, 1, 0, 1) == [0x2400]
    disconnect(client)
    second = SimulatedBus(modem.device_port)
    second.add_gas_detector(2)
    with second:
        assert client.connect()
        assert read(client, 2, 0, 1) == [0x2400]
        disconnect(client)
        assert client.connect()
        assert read(client, 2, 0, 1) == [0x2400]


def test_on_device_write_sees_response_bytes(tmp_path: Path) -> None:
    chunks: list[bytes] = []
    frames: list[bytes] = []
    lock = threading.Lock()

    def hook(data: bytes, _at: float) -> None:
        with lock:
            chunks.append(data)

    def forwarded() -> bytes:
        with lock:
            return b"".join(chunks)

    with VirtualNullModem(tmp_path, on_device_write=hook) as nm:
        sim = SimulatedBus(nm.device_port, on_response=lambda _s, frame, _t: frames.append(frame))
        sim.add_gas_detector(1)
        with sim:
            cli = ModbusSerialClient(nm.gateway_port, timeout=CLIENT_TIMEOUT_S, retries=0)
            try:
                assert read(cli, 1, 0, 4)[0] == 0x2400
            finally:
                disconnect(cli)
            wait_for(lambda: forwarded() == frames[0])
