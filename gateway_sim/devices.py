"""Simulated Modbus slaves: what their registers hold and how pymodbus's server serves them.

:class:`SimulatedGasDetector` (profiles A and B of the domain notes), :class:`SimulatedIOStation`
(extinguisher cabinet I/O module) and :class:`SimulatedController` (a multi-channel gas controller). Tests
change their state while the bus runs. Like real devices, each refuses a read that touches a register outside
its map (exception 02, by pymodbus's server).
"""

from __future__ import annotations

import threading
import time
from typing import Final, Literal

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = [
    "CONTROLLER_STATUS_CODES",
    "GAS_CODES",
    "PROFILE_A_STATUS_CODES",
    "PROFILE_B_ALARM_BITS",
    "UNIT_CODES",
    "Profile",
    "SimulatedController",
    "SimulatedGasDetector",
    "SimulatedIOStation",
    "SimulatedSlave",
]


#: Profile A unit codes (register 0, bits 15–12).
UNIT_CODES: Final[dict[str, int]] = {"ppm": 0x0, "%LEL": 0x2, "%VOL": 0x4}
#: Profile A gas type codes (register 8, high byte).
GAS_CODES: Final[dict[str, int]] = {"CH4": 0x11, "CO": 0x05}
#: Profile A status codes (register 5, low byte).
PROFILE_A_STATUS_CODES: Final[dict[str, int]] = {
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
#: Profile B alarm word bits (register 0x6000) by status name.
PROFILE_B_ALARM_BITS: Final[dict[str, int]] = {
    "normal": 0,
    "low_alarm": 1 << 0,
    "high_alarm": 1 << 1,
    "stel": 1 << 2,
    "twa": 1 << 3,
    "over_range": 1 << 4,
    "sensor_fault": 1 << 5,
    "sensor_lost": 1 << 5,
}
_PROFILE_B_BASE: Final = 0x6000
_PROFILE_B_COUNT: Final = 7  # 0x6000..0x6006
_PROFILE_A_COUNT: Final = 10
_WARMUP_DONE: Final = 0x8000

Profile = Literal["A", "B"]


def _raw(value: float, decimals: int) -> int:
    """Scale ``value`` to a 16-bit register (two's complement when negative)."""
    raw = round(value * float(10**decimals))
    if not -0x8000 <= raw <= 0xFFFF:
        raise ValueError(f"{value} does not fit a register with {decimals} decimals")
    return raw & 0xFFFF


def _check_register(value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} out of range 0..65535")
    return value


class SimulatedGasDetector:
    """An RS-485 gas detector (profile A or B); its registers are encoded when each request is served.

    Profile A (holding registers 0–9): reg0 unit/decimals code, reg1 concentration, reg2/reg3 own
    low/high set-points, reg4 full scale (all raw with the same decimals), reg5 status code, reg8 gas type.
    Profile B (holding registers 0x6000–0x6006): alarm word, concentration, run status at 0x6006.
    Function codes 3 and 4 read the same registers; writes are refused (illegal address).
    """

    def __init__(
        self,
        slave: int,
        profile: Profile = "A",
        *,
        unit: str = "%LEL",
        decimals: int = 1,
        full_scale: float = 100.0,
        low_setpoint: float = 10.0,
        high_setpoint: float = 25.0,
        gas: str = "CH4",
    ) -> None:
        if profile not in ("A", "B"):
            raise ValueError(f"unknown profile {profile!r}")
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        if gas not in GAS_CODES:
            raise ValueError(f"unknown gas {gas!r}; expected one of {sorted(GAS_CODES)}")
        if not 0 <= decimals <= 3:
            raise ValueError("decimals must be 0..3")
        self.slave = _check_slave(slave)
        self.profile: Profile = profile
        self.unit = unit
        self.decimals = decimals
        self.gas = gas
        self._lock = threading.Lock()
        self._full_scale = _raw(full_scale, decimals)
        self._low = _raw(low_setpoint, decimals)
        self._high = _raw(high_setpoint, decimals)
        self._concentration = 0
        self._status_code = PROFILE_A_STATUS_CODES["normal"]
        self._alarm_bits = 0
        self._run_status = 0
        self._warmup_end = 0.0

    @property
    def base_address(self) -> int:
        """First holding register of the map (0 for A, 0x6000 for B)."""
        return 0 if self.profile == "A" else _PROFILE_B_BASE

    @property
    def register_count(self) -> int:
        """Number of registers in the map."""
        return _PROFILE_A_COUNT if self.profile == "A" else _PROFILE_B_COUNT

    def set_concentration(self, value: float) -> None:
        """Set the measured concentration in the detector's unit."""
        raw = _raw(value, self.decimals)
        with self._lock:
            self._concentration = raw

    def set_unit(self, unit: str) -> None:
        """Change the unit the detector reports (profile A register 0), as a replaced sensor head would."""
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        with self._lock:
            self.unit = unit

    def set_status(self, name: str) -> None:
        """Set the status by name (profile A status code or profile B alarm bit)."""
        if self.profile == "A":
            if name not in PROFILE_A_STATUS_CODES:
                raise ValueError(f"unknown profile A status {name!r}")
            self.set_status_code(PROFILE_A_STATUS_CODES[name])
            return
        if name not in PROFILE_B_ALARM_BITS:
            hint = "; use set_warmup()" if name == "warmup" else ""
            raise ValueError(f"unknown profile B status {name!r}{hint}")
        self.set_alarm_bits(PROFILE_B_ALARM_BITS[name])

    def set_status_code(self, code: int) -> None:
        """Profile A: put a raw status code (0..255) into the low byte of register 5."""
        if self.profile != "A":
            raise ValueError("status codes exist only in profile A")
        if not 0 <= code <= 0xFF:
            raise ValueError("status code must be 0..255")
        with self._lock:
            self._status_code = code

    def set_alarm_bits(self, bits: int) -> None:
        """Profile B: set alarm word bits 0–5 (shown once warm-up has finished)."""
        if self.profile != "B":
            raise ValueError("alarm bits exist only in profile B")
        if not 0 <= bits <= 0x7FFF:
            raise ValueError("alarm bits must fit bits 14..0")
        with self._lock:
            self._alarm_bits = bits

    def set_run_status(self, value: int) -> None:
        """Profile B: raw run status register 0x6006."""
        if self.profile != "B":
            raise ValueError("run status exists only in profile B")
        with self._lock:
            self._run_status = _check_register(value)

    def set_warmup(self, remaining_s: float) -> None:
        """Start a warm-up that ends ``remaining_s`` seconds from now (0 ends it).

        Profile A reports status 0x00 meanwhile; profile B reports the remaining time in 0.1 s.
        """
        if remaining_s < 0:
            raise ValueError("remaining_s must be >= 0")
        with self._lock:
            self._warmup_end = time.monotonic() + remaining_s if remaining_s else 0.0

    def registers(self) -> list[int]:
        """The registers as they would be served now, starting at :attr:`base_address`."""
        now = time.monotonic()
        with self._lock:
            remaining = max(0.0, self._warmup_end - now)
            warming = remaining > 0
            if self.profile == "A":
                regs = [0] * _PROFILE_A_COUNT
                regs[0] = (UNIT_CODES[self.unit] << 12) | ((self.decimals * 4) << 8)
                regs[1] = self._concentration
                regs[2] = self._low
                regs[3] = self._high
                regs[4] = self._full_scale
                regs[5] = PROFILE_A_STATUS_CODES["warmup"] if warming else self._status_code
                regs[8] = GAS_CODES[self.gas] << 8
                return regs
            regs = [0] * _PROFILE_B_COUNT
            if warming:
                regs[0] = min(max(1, round(remaining * 10)), 0x7FFF)
            else:
                regs[0] = _WARMUP_DONE | self._alarm_bits
            regs[1] = self._concentration
            regs[6] = self._run_status
            return regs

    async def _action(
        self,
        function_code: int,
        _start_address: int,
        _address: int,
        _count: int,
        current_registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code not in (3, 4):
            return ExcCodes.ILLEGAL_FUNCTION
        regs = self.registers()
        current_registers[: len(regs)] = regs
        return None

    def _sim_device(self) -> SimDevice:
        block = SimData(
            self.base_address, values=self.registers(), datatype=DataType.REGISTERS, readonly=True
        )
        return SimDevice(id=self.slave, simdata=[block], action=self._action)


#: Channel status codes of a :class:`SimulatedController` (the register after the level).
CONTROLLER_STATUS_CODES: Final[dict[str, int]] = {"normal": 0, "low_alarm": 1, "high_alarm": 2, "sensor_fault": 3}


class SimulatedController:
    """A multi-channel gas controller at one address: per channel a unit code, the level and a status code
    in three registers, channel n's ``(n - 1) * stride`` above channel 1's (by default 2998/2999/3000, then
    3008–3010, ...). Like most real devices it implements only those registers: a read that touches any
    other one is refused with exception 02 (illegal data address), unless ``refuse_unmapped`` is False, when
    every register of the span between reads as 0 (the lenient kind some tests need).
    """

    def __init__(self, slave: int, *, channels: int = 4, start: int = 2998, stride: int = 10, decimals: int = 1,
                 unit: str = "%LEL", refuse_unmapped: bool = True) -> None:
        if not 1 <= channels <= 64:
            raise ValueError("channels must be 1..64")
        if stride < 3 and channels > 1:
            raise ValueError("stride must leave room for a channel's three registers")
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        self.slave = _check_slave(slave)
        self.channels = channels
        self.start = start
        self.stride = stride
        self.decimals = decimals
        self.refuse_unmapped = refuse_unmapped
        self._lock = threading.Lock()
        self._regs = {n: [UNIT_CODES[unit], 0, CONTROLLER_STATUS_CODES["normal"]] for n in range(1, channels + 1)}

    def channel_start(self, channel: int) -> int:
        """The first register (unit code) of ``channel`` (1-based)."""
        return self.start + (channel - 1) * self.stride

    def set_level(self, channel: int, value: float) -> None:
        """Set one channel's measured level."""
        with self._lock:
            self._regs[channel][1] = _raw(value, self.decimals)

    def set_status(self, channel: int, name: str) -> None:
        """Set one channel's status by name (:data:`CONTROLLER_STATUS_CODES`)."""
        with self._lock:
            self._regs[channel][2] = CONTROLLER_STATUS_CODES[name]

    def registers(self) -> dict[int, int]:
        """Every implemented register by its address."""
        with self._lock:
            return {self.channel_start(n) + i: v for n, regs in self._regs.items() for i, v in enumerate(regs)}

    async def _action(
        self,
        function_code: int,
        start_address: int,
        _address: int,
        _count: int,
        current_registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code not in (3, 4):
            return ExcCodes.ILLEGAL_FUNCTION
        for register, value in self.registers().items():
            current_registers[register - start_address] = value
        return None

    def _sim_device(self) -> SimDevice:
        if not self.refuse_unmapped:
            span = self.channel_start(self.channels) + 3 - self.start
            blocks = [SimData(self.start, count=span, values=0, datatype=DataType.REGISTERS)]
        else:  # pymodbus refuses a read touching an address no block defines (exception 02)
            blocks = [SimData(self.channel_start(n), count=3, values=0, datatype=DataType.REGISTERS)
                      for n in range(1, self.channels + 1)]
        return SimDevice(id=self.slave, simdata=blocks, action=self._action)


_TABLE_BY_FC: Final[dict[int, str]] = {
    1: "coils",
    5: "coils",
    15: "coils",
    2: "discrete_inputs",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}


class SimulatedIOStation:
    """RS-485 I/O module of an extinguisher cabinet: four separate tables of 16 entries each.

    Coils and holding registers written by the master are visible through :meth:`coils` and
    :meth:`holding_registers`.
    """

    SIZE: Final = 16

    def __init__(self, slave: int) -> None:
        self.slave = _check_slave(slave)
        self._lock = threading.Lock()
        self._coils = [False] * self.SIZE
        self._discrete = [False] * self.SIZE
        self._holding = [0] * self.SIZE
        self._input = [0] * self.SIZE

    def _index(self, address: int) -> int:
        if not 0 <= address < self.SIZE:
            raise ValueError(f"address {address} out of range 0..{self.SIZE - 1}")
        return address

    def set_discrete_input(self, address: int, value: bool) -> None:
        """Set discrete input ``address`` (function code 2)."""
        with self._lock:
            self._discrete[self._index(address)] = bool(value)

    def set_coil(self, address: int, value: bool) -> None:
        """Set coil ``address`` (function codes 1, 5, 15)."""
        with self._lock:
            self._coils[self._index(address)] = bool(value)

    def set_input_register(self, address: int, value: int) -> None:
        """Set input register ``address`` (function code 4)."""
        with self._lock:
            self._input[self._index(address)] = _check_register(value)

    def set_holding_register(self, address: int, value: int) -> None:
        """Set holding register ``address`` (function codes 3, 6, 16)."""
        with self._lock:
            self._holding[self._index(address)] = _check_register(value)

    def coils(self) -> list[bool]:
        """Current coils."""
        with self._lock:
            return list(self._coils)

    def discrete_inputs(self) -> list[bool]:
        """Current discrete inputs."""
        with self._lock:
            return list(self._discrete)

    def holding_registers(self) -> list[int]:
        """Current holding registers."""
        with self._lock:
            return list(self._holding)

    def input_registers(self) -> list[int]:
        """Current input registers."""
        with self._lock:
            return list(self._input)

    async def _action(
        self,
        function_code: int,
        _start_address: int,
        address: int,
        _count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        table = _TABLE_BY_FC.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        with self._lock:
            if set_values is not None:
                if table == "coils":
                    for i, bit in enumerate(set_values):
                        self._coils[address + i] = bool(bit)
                elif table == "holding":
                    for i, reg in enumerate(set_values):
                        self._holding[address + i] = int(reg)
            if table in ("coils", "discrete_inputs"):
                bits = self._coils if table == "coils" else self._discrete
                current_registers[0] = sum(1 << i for i, bit in enumerate(bits) if bit)
            else:
                regs = self._holding if table == "holding" else self._input
                current_registers[: self.SIZE] = regs
        return None

    def _sim_device(self) -> SimDevice:
        def bits() -> list[SimData]:
            return [SimData(0, values=[False] * self.SIZE, datatype=DataType.BITS)]

        def regs() -> list[SimData]:
            return [SimData(0, count=self.SIZE, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=self.slave, simdata=(bits(), bits(), regs(), regs()), action=self._action)


def _check_slave(slave: int) -> int:
    if not 1 <= slave <= 247:
        raise ValueError(f"slave address {slave} out of range 1..247")
    return slave


SimulatedSlave = SimulatedGasDetector | SimulatedIOStation | SimulatedController
