"""Register maps ("profiles") for Modbus gas detectors and extinguisher stations.

A profile is data, not code: the built-in profiles A and B are instances of the same
:class:`DetectorProfile` a site config can define for any other detector. Decoding is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BUILTIN_DETECTOR_PROFILES",
    "BUILTIN_STATION_PROFILES",
    "DETECTOR_STATUSES",
    "PROFILE_A",
    "PROFILE_B",
    "STATION_IO_4DI",
    "AnalogPoint",
    "BitField",
    "BitPoint",
    "DetectorProfile",
    "GasReading",
    "StationProfile",
    "StationReading",
    "WarmupField",
    "parse_detector_profile",
    "parse_station_profile",
]

#: Status names a detector profile may report.
DETECTOR_STATUSES = frozenset(
    {
        "warmup", "normal", "data_error", "sensor_fault", "pre_alarm", "low_alarm", "high_alarm",
        "over_range", "needs_calibration", "comms_fault", "stel", "twa",
    }
)
STATION_POINTS = ("presence", "pressure", "door", "obstruction")


@dataclass(frozen=True, slots=True)
class GasReading:
    """One decoded detector poll."""

    value: float
    measure: str | None
    status: frozenset[str]
    warmup_remaining_s: float | None = None
    gas: str | None = None
    raw: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StationReading:
    """One decoded extinguisher-station poll; ``None`` where the profile has no such point."""

    presence: bool | None = None
    pressure_ok: bool | None = None
    pressure: float | None = None
    door_open: bool | None = None
    obstructed: bool | None = None
    raw: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BitField:
    """``(registers[register] >> shift) & mask``, optionally mapped through a code table."""

    register: int
    shift: int = 0
    mask: int = 0xFFFF
    codes: Mapping[int, Any] = field(default_factory=dict)

    def extract(self, regs: Mapping[int, int]) -> int:
        return (regs[self.register] >> self.shift) & self.mask

    def lookup(self, regs: Mapping[int, int]) -> Any:
        return self.codes.get(self.extract(regs))


@dataclass(frozen=True, slots=True)
class WarmupField:
    """A register whose ``ready_bit`` says warm-up is over; otherwise ``remaining_mask`` × scale seconds."""

    register: int
    ready_bit: int = 15
    remaining_mask: int = 0x7FFF
    remaining_scale: float = 0.1


@dataclass(frozen=True, slots=True)
class DetectorProfile:
    """How to read one kind of gas detector."""

    name: str
    function: int
    start: int
    count: int
    value_register: int
    decimals: int | BitField = 0
    scale: float = 1.0
    signed: bool = False
    measure: str | BitField | None = None
    status: BitField | None = None
    flags: tuple[tuple[int, int, str], ...] = ()
    warmup: WarmupField | None = None
    gas: BitField | None = None
    default_gas: str = "CH4"

    def decode(self, registers: Sequence[int]) -> GasReading:
        """Registers (as read from ``start``) → reading. Raises ValueError on a register outside the block."""
        if len(registers) < self.count:
            raise ValueError(f"expected {self.count} registers, got {len(registers)}")
        regs = {self.start + i: int(v) & 0xFFFF for i, v in enumerate(registers)}
        raw = regs[self.value_register]
        if self.signed and raw >= 0x8000:
            raw -= 0x10000
        decimals = self.decimals if isinstance(self.decimals, int) else int(self.decimals.lookup(regs) or 0)
        value = raw * self.scale / (10**decimals)
        measure = self.measure if not isinstance(self.measure, BitField) else self.measure.lookup(regs)
        status: set[str] = set()
        if self.status is not None:
            code = self.status.extract(regs)
            status.add(self.status.codes.get(code, "data_error"))
        for register, bit, name in self.flags:
            if regs[register] >> bit & 1:
                status.add(name)
        remaining: float | None = None
        if self.warmup is not None:
            word = regs[self.warmup.register]
            if not word >> self.warmup.ready_bit & 1:
                remaining = (word & self.warmup.remaining_mask) * self.warmup.remaining_scale
                status.add("warmup")
        if not status:
            status.add("normal")
        gas = self.gas.lookup(regs) if self.gas is not None else None
        return GasReading(value=value, measure=measure, status=frozenset(status), warmup_remaining_s=remaining,
                          gas=gas, raw=tuple(registers))


#: Profile A — common detector module, function 03, holding registers 0–9.
PROFILE_A = DetectorProfile(
    name="A",
    function=3,
    start=0,
    count=10,
    value_register=1,
    decimals=BitField(register=0, shift=8, mask=0xF, codes={0x0: 0, 0x4: 1, 0x8: 2, 0xC: 3}),
    measure=BitField(register=0, shift=12, mask=0xF, codes={0: "ppm", 2: "%LEL", 4: "%VOL"}),
    status=BitField(
        register=5,
        mask=0xFF,
        codes={
            0x00: "warmup", 0x01: "normal", 0x02: "data_error", 0x03: "sensor_fault", 0x04: "pre_alarm",
            0x05: "low_alarm", 0x06: "high_alarm", 0x08: "over_range", 0x09: "needs_calibration",
            0x0F: "comms_fault",
        },
    ),
    gas=BitField(register=8, shift=8, mask=0xFF, codes={0x11: "CH4", 0x05: "CO"}),
)

#: Profile B — detector module with an alarm word at 0x6000, concentration at 0x6001 (1 decimal).
PROFILE_B = DetectorProfile(
    name="B",
    function=3,
    start=0x6000,
    count=7,
    value_register=0x6001,
    decimals=1,
    measure="%LEL",
    flags=(
        (0x6000, 0, "low_alarm"), (0x6000, 1, "high_alarm"), (0x6000, 2, "stel"), (0x6000, 3, "twa"),
        (0x6000, 4, "over_range"), (0x6000, 5, "sensor_fault"),
    ),
    warmup=WarmupField(register=0x6000, ready_bit=15, remaining_mask=0x7FFF, remaining_scale=0.1),
)

BUILTIN_DETECTOR_PROFILES: dict[str, DetectorProfile] = {"A": PROFILE_A, "B": PROFILE_B}


@dataclass(frozen=True, slots=True)
class BitPoint:
    """A contact read as a coil/discrete input (fc 1/2) or a bit of a register (fc 3/4)."""

    function: int
    address: int
    normal: bool = True
    bit: int = 0


@dataclass(frozen=True, slots=True)
class AnalogPoint:
    """An analog value in a register (fc 3/4) with its operable range."""

    function: int
    address: int
    minimum: float
    maximum: float
    scale: float = 1.0
    signed: bool = False


@dataclass(frozen=True, slots=True)
class StationProfile:
    """How to read an extinguisher cabinet wired to an RS-485 I/O module."""

    name: str
    points: Mapping[str, BitPoint | AnalogPoint]

    def spans(self) -> dict[int, tuple[int, int]]:
        """Per function code, (first address, count) covering every point."""
        spans: dict[int, tuple[int, int]] = {}
        for point in self.points.values():
            lo, hi = spans.get(point.function, (point.address, point.address))
            spans[point.function] = (min(lo, point.address), max(hi, point.address))
        return {fc: (lo, hi - lo + 1) for fc, (lo, hi) in spans.items()}

    def decode(self, tables: Mapping[int, Sequence[int | bool]]) -> StationReading:
        """Per-function-code values (as read from each span start) → reading."""
        spans = self.spans()
        values: dict[str, Any] = {}
        raw: list[int] = []
        for name, point in self.points.items():
            start, _ = spans[point.function]
            word = int(tables[point.function][point.address - start])
            raw.append(word)
            if isinstance(point, AnalogPoint):
                if point.signed and word >= 0x8000:
                    word -= 0x10000
                values[name] = word * point.scale
            else:
                bit = bool(word >> point.bit & 1) if point.function in (3, 4) else bool(word)
                values[name] = bit == point.normal  # True = in its normal state
        pressure_point = self.points.get("pressure")
        pressure: float | None = None
        pressure_ok: bool | None = None
        if isinstance(pressure_point, AnalogPoint):
            pressure = float(values["pressure"])
            pressure_ok = pressure_point.minimum <= pressure <= pressure_point.maximum
        elif pressure_point is not None:
            pressure_ok = bool(values["pressure"])
        return StationReading(
            presence=values.get("presence"),
            pressure_ok=pressure_ok,
            pressure=pressure,
            door_open=None if "door" not in values else not values["door"],
            obstructed=None if "obstruction" not in values else not values["obstruction"],
            raw=tuple(raw),
        )


#: Four discrete inputs: presence (closed = present), pressure switch (closed = ok), door (closed = shut),
#: obstruction sensor (open = clear).
STATION_IO_4DI = StationProfile(
    name="io-4di",
    points={
        "presence": BitPoint(function=2, address=0, normal=True),
        "pressure": BitPoint(function=2, address=1, normal=True),
        "door": BitPoint(function=2, address=2, normal=True),
        "obstruction": BitPoint(function=2, address=3, normal=False),
    },
)

BUILTIN_STATION_PROFILES: dict[str, StationProfile] = {"io-4di": STATION_IO_4DI}


# ------------------------------------------------------------------------------------ config parsing


def _int(data: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 0xFFFF, default: int | None = None) -> int:
    value = data.get(key, default)
    if value is None:
        raise ValueError(f"{key}: is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{key}: must be {lo}–{hi}, got {value}")
    return value


def _num(data: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if value is None:
        raise ValueError(f"{key}: is required")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number")
    return float(value)


def _only(data: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: must be a table")
    return value


def _codes(data: Mapping[str, Any], key: str, allowed: frozenset[str] | None) -> dict[int, Any]:
    table = _table(data, key) or {}
    codes: dict[int, Any] = {}
    for code, name in table.items():
        try:
            number = int(code, 0)
        except ValueError:
            raise ValueError(f"{key}.{code}: code must be an integer such as \"5\" or \"0x05\"") from None
        if allowed is not None and name not in allowed:
            raise ValueError(f"{key}.{code}: unknown status {name!r} (one of {', '.join(sorted(allowed))})")
        codes[number] = name
    return codes


def _bitfield(data: Mapping[str, Any], key: str, allowed: frozenset[str] | None) -> BitField | None:
    table = _table(data, key)
    if table is None:
        return None
    _only(table, {"register", "shift", "mask", "codes"}, f"{key}.")
    try:
        return BitField(register=_int(table, "register"), shift=_int(table, "shift", hi=15, default=0),
                        mask=_int(table, "mask", default=0xFFFF), codes=_codes(table, "codes", allowed))
    except ValueError as exc:
        raise ValueError(f"{key}.{exc}") from None


def parse_detector_profile(name: str, data: Mapping[str, Any]) -> DetectorProfile:
    """A custom detector register map from config. Raises ValueError("key: reason")."""
    _only(data, {"function", "start", "count", "value", "status", "flags", "warmup", "gas", "measure"})
    function = _int(data, "function", lo=3, hi=4, default=3)
    start = _int(data, "start")
    count = _int(data, "count", lo=1, hi=125)
    value = _table(data, "value")
    if value is None:
        raise ValueError("value: is required (register, decimals, scale, signed)")
    _only(value, {"register", "decimals", "scale", "signed"}, "value.")
    value_register = _int(value, "register")
    decimals: int | BitField = 0
    raw_decimals = value.get("decimals", 0)
    if isinstance(raw_decimals, Mapping):
        field_ = _bitfield(value, "decimals", None)
        assert field_ is not None
        decimals = field_
    else:
        decimals = _int(value, "decimals", hi=6, default=0)
    measure = data.get("measure", "%LEL")
    if measure not in ("%LEL", "ppm", "%VOL"):
        raise ValueError(f"measure: must be '%LEL', 'ppm' or '%VOL', got {measure!r}")
    flags: list[tuple[int, int, str]] = []
    raw_flags = data.get("flags", [])
    if not isinstance(raw_flags, list):
        raise ValueError("flags: must be an array of tables")
    for i, flag in enumerate(raw_flags):
        if not isinstance(flag, Mapping):
            raise ValueError(f"flags[{i}]: must be a table")
        _only(flag, {"register", "bit", "status"}, f"flags[{i}].")
        status_name = flag.get("status")
        if status_name not in DETECTOR_STATUSES:
            raise ValueError(f"flags[{i}].status: unknown status {status_name!r}")
        flags.append((_int(flag, "register"), _int(flag, "bit", hi=15), status_name))
    warm = _table(data, "warmup")
    warmup = None
    if warm is not None:
        _only(warm, {"register", "ready_bit", "remaining_mask", "remaining_scale"}, "warmup.")
        warmup = WarmupField(register=_int(warm, "register"), ready_bit=_int(warm, "ready_bit", hi=15, default=15),
                             remaining_mask=_int(warm, "remaining_mask", default=0x7FFF),
                             remaining_scale=_num(warm, "remaining_scale", 0.1))
    status = _bitfield(data, "status", DETECTOR_STATUSES)
    gas_name = data.get("gas", "CH4")
    if gas_name not in ("CH4", "LPG", "H2", "CO"):
        raise ValueError(f"gas: must be CH4, LPG, H2 or CO, got {gas_name!r}")
    profile = DetectorProfile(
        name=name, function=function, start=start, count=count, value_register=value_register,
        decimals=decimals, scale=_num(value, "scale", 1.0), signed=bool(value.get("signed", False)),
        measure=measure, status=status, flags=tuple(flags), warmup=warmup, default_gas=gas_name,
    )
    block = range(start, start + count)
    referenced = [("value.register", value_register)]
    if isinstance(decimals, BitField):
        referenced.append(("value.decimals.register", decimals.register))
    if status is not None:
        referenced.append(("status.register", status.register))
    referenced += [(f"flags[{i}].register", f[0]) for i, f in enumerate(flags)]
    if warmup is not None:
        referenced.append(("warmup.register", warmup.register))
    for key, register in referenced:
        if register not in block:
            raise ValueError(f"{key}: register {register} is outside the block read ({start}–{start + count - 1})")
    return profile


def parse_station_profile(name: str, data: Mapping[str, Any]) -> StationProfile:
    """A custom extinguisher-station map from config. Raises ValueError("key: reason")."""
    _only(data, set(STATION_POINTS))
    points: dict[str, BitPoint | AnalogPoint] = {}
    for point_name in STATION_POINTS:
        table = _table(data, point_name)
        if table is None:
            continue
        try:
            function = _int(table, "function", lo=1, hi=4)
            address = _int(table, "address")
            if "min" in table or "max" in table:
                if point_name != "pressure" or function not in (3, 4):
                    raise ValueError("min: an analog range is only for 'pressure' on function 3 or 4")
                _only(table, {"function", "address", "min", "max", "scale", "signed"})
                lo, hi = _num(table, "min"), _num(table, "max")
                if lo >= hi:
                    raise ValueError(f"min: must be below max ({hi:g})")
                points[point_name] = AnalogPoint(function=function, address=address, minimum=lo, maximum=hi,
                                                 scale=_num(table, "scale", 1.0),
                                                 signed=bool(table.get("signed", False)))
            else:
                _only(table, {"function", "address", "normal", "bit"})
                normal = table.get("normal", True)
                if not isinstance(normal, bool):
                    raise ValueError("normal: must be true or false")
                points[point_name] = BitPoint(function=function, address=address, normal=normal,
                                              bit=_int(table, "bit", hi=15, default=0))
        except ValueError as exc:
            raise ValueError(f"{point_name}.{exc}") from None
    if not points:
        raise ValueError("presence: a station profile needs at least one point")
    return StationProfile(name=name, points=points)
