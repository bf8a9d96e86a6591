"""Register maps ("profiles") for Modbus gas detectors and extinguisher stations.

A profile is data, not code: the built-in profiles A and B are instances of the same
:class:`DetectorProfile` a site config can define for any other detector. Decoding is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

__all__ = [
    "BUILTIN_DETECTOR_PROFILES",
    "BUILTIN_STATION_PROFILES",
    "CHANNEL_READS",
    "DEFAULT_FULL_READ_EVERY",
    "DETECTOR_STATUSES",
    "GASES",
    "MAX_CHANNELS",
    "MAX_DECIMALS",
    "MAX_READ_GAP",
    "MAX_READ_REGISTERS",
    "MEASURES",
    "PROFILE_A",
    "PROFILE_B",
    "STATION_IO_4DI",
    "AnalogPoint",
    "BitField",
    "BitPoint",
    "DetectorProfile",
    "GasReading",
    "ProfileError",
    "StationProfile",
    "StationReading",
    "WarmupField",
    "parse_detector_profile",
    "parse_station_profile",
    "toml_type_name",
]

#: Status names a detector profile may report.
DETECTOR_STATUSES = frozenset(
    {
        "warmup", "normal", "data_error", "sensor_fault", "pre_alarm", "low_alarm", "high_alarm",
        "over_range", "needs_calibration", "comms_fault", "stel", "twa",
    }
)
STATION_POINTS = ("presence", "pressure", "door", "obstruction")
#: Measuring units a detector may report in.
MEASURES = ("%LEL", "ppm", "%VOL")
#: Gases a detector profile may name as its default.
GASES = ("CH4", "LPG", "H2", "CO")
#: Most decimals a concentration register may carry.
MAX_DECIMALS = 6
#: Polls between two whole reads of a detector's block (:attr:`DetectorProfile.full_read_every`): at 9600
#: baud and 64 detectors a cycle lasts about 3 s, so a changed unit or decimals code is seen within 3 min.
DEFAULT_FULL_READ_EVERY = 60
#: Decoded values are rounded to this many decimals, so 140 × 0.01 is 1.4 and not 1.4000000000000001.
_PRECISION = 9


def _lowest_bit(mask: int) -> int:
    """Position of the lowest set bit of ``mask`` (the shift that right-aligns a masked field)."""
    return (mask & -mask).bit_length() - 1


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
    #: Default alarm thresholds of devices using this profile (``low``, ``high``, ``hysteresis``), in the
    #: device's unit; a device's own keys override them, the unit's defaults fill the rest.
    thresholds: Mapping[str, float] = field(default_factory=dict)
    #: The whole block is read at start, after a failed poll and every this many polls; the polls between
    #: read only :attr:`fast_window` and take the other registers from the last whole read (1: always whole).
    full_read_every: int = DEFAULT_FULL_READ_EVERY
    #: A multi-channel controller serves ``channels`` detectors behind one address, channel n's registers
    #: at ``(n - 1) * stride`` above channel 1's (the registers above are channel 1's). A device reads one
    #: channel (:meth:`for_channel`); the bus thread reads a controller's channels together, as :attr:`reads` says.
    channels: int = 1
    stride: int = 0
    channel: int = 1
    #: How a controller's channels are read: ``"span"`` (as many channels per read as fit), ``"channel"`` (one
    #: read per channel) or None: the span first, one read per channel once the device refuses the span
    #: (:class:`drivers.modbus.ChannelGroup`).
    reads: str | None = None

    def for_channel(self, channel: int) -> DetectorProfile:
        """The profile of channel ``channel`` (1-based): every register moved up by its offset."""
        if not 1 <= channel <= self.channels:
            raise ValueError(f"profile {self.name!r} has channels 1–{self.channels}, not {channel}")
        shift = (channel - self.channel) * self.stride

        def moved(f: BitField | None) -> BitField | None:
            return None if f is None else replace(f, register=f.register + shift)

        decimals = self.decimals if isinstance(self.decimals, int) else moved(self.decimals)
        measure = moved(self.measure) if isinstance(self.measure, BitField) else self.measure
        warmup = None if self.warmup is None else replace(self.warmup, register=self.warmup.register + shift)
        assert decimals is not None
        return replace(self, start=self.start + shift, value_register=self.value_register + shift,
                       decimals=decimals, measure=measure, status=moved(self.status),
                       flags=tuple((r + shift, bit, name) for r, bit, name in self.flags), warmup=warmup,
                       gas=moved(self.gas), channel=channel)

    @property
    def fast_window(self) -> tuple[int, int]:
        """``(start, count)``: the smallest span holding every register the alarm decision reads at each poll.

        These are the value, status, flag and warm-up registers. Codes that only describe the device — the
        unit and decimals codes, set-points, full scale, gas type — change only when someone reconfigures
        it, and outside this span they come from the last whole read.
        """
        needed = [self.value_register, *(register for register, _bit, _name in self.flags)]
        if self.status is not None:
            needed.append(self.status.register)
        if self.warmup is not None:
            needed.append(self.warmup.register)
        first, last = min(needed), max(needed)
        return first, last - first + 1

    @property
    def registers_used(self) -> tuple[int, ...]:
        """Every register decoding reads, in order."""
        used = {self.value_register, *(register for register, _bit, _name in self.flags)}
        for field_ in (self.decimals, self.measure, self.status, self.gas):
            if isinstance(field_, BitField):
                used.add(field_.register)
        if self.warmup is not None:
            used.add(self.warmup.register)
        return tuple(sorted(used))

    @property
    def block_reads(self) -> tuple[tuple[int, int], ...]:
        """``(start, count)`` of the reads that fetch the whole block: the block in one read, unless the registers
        decoding uses lie more than :data:`MAX_READ_GAP` apart — then one read per cluster of them, not one
        span over registers the device may not implement."""
        return _clusters(self.registers_used, (self.start, self.count))

    @property
    def fast_reads(self) -> tuple[tuple[int, int], ...]:
        """``(start, count)`` of the reads of a usual poll: the fast window, split like :attr:`block_reads`."""
        first, count = self.fast_window
        fast = [r for r in self.registers_used if first <= r < first + count]
        return _clusters(tuple(fast), (first, count))

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        """``(function, count)`` of the reads of a usual poll (the fast window): what the bus floor counts.

        A multi-channel controller's channels are read together: channel 1 counts the reads of every
        channel (by its read setting; the span when none), the others none."""
        if self.channels > 1:
            return self.full_reads
        return tuple((self.function, count) for _start, count in self.fast_reads)

    @property
    def full_reads(self) -> tuple[tuple[int, int], ...]:
        """``(function, count)`` of the reads of a poll that reads the whole block."""
        if self.channels > 1:
            if self.channel != 1:
                return ()
            if self.reads == "channel":
                return tuple((self.function, count) for _start, count in self.block_reads) * self.channels
            return tuple((self.function, count) for count in _channel_read_counts(self))
        return tuple((self.function, count) for _start, count in self.block_reads)

    def decode(self, registers: Sequence[int]) -> GasReading:
        """Registers (as read from ``start``) → reading. Raises ValueError on a register outside the block."""
        if len(registers) < self.count:
            raise ValueError(f"expected {self.count} registers, got {len(registers)}")
        regs = {self.start + i: int(v) & 0xFFFF for i, v in enumerate(registers)}
        raw = regs[self.value_register]
        if self.signed and raw >= 0x8000:
            raw -= 0x10000
        # A code the map does not know makes the value untrustworthy: report data_error, never guess.
        status: set[str] = set()
        decimals = self.decimals if isinstance(self.decimals, int) else self._field_decimals(regs)
        if decimals is None:
            status.add("data_error")
            decimals = 0
        value = round(raw * self.scale / (10**decimals), _PRECISION)
        measure = self.measure if not isinstance(self.measure, BitField) else self.measure.lookup(regs)
        if isinstance(self.measure, BitField) and measure is None:
            status.add("data_error")
        if self.status is not None:
            code = self.status.extract(regs)
            status.add(self.status.codes.get(code, "data_error"))
        remaining: float | None = None
        warming = self.warmup is not None and not regs[self.warmup.register] >> self.warmup.ready_bit & 1
        if self.warmup is not None and warming:
            mask = self.warmup.remaining_mask
            field_ = (regs[self.warmup.register] & mask) >> _lowest_bit(mask)
            remaining = round(field_ * self.warmup.remaining_scale, _PRECISION)
            status.add("warmup")
        for register, bit, name in self.flags:
            # While warming up, the warm-up register's bits hold the remaining time, not flags.
            if warming and self.warmup is not None and register == self.warmup.register:
                continue
            if regs[register] >> bit & 1:
                status.add(name)
        if "data_error" in status:
            status.discard("normal")
        if not status:
            status.add("normal")
        gas = self.gas.lookup(regs) if self.gas is not None else None
        return GasReading(value=value, measure=measure, status=frozenset(status), warmup_remaining_s=remaining,
                          gas=gas, raw=tuple(registers))

    def _field_decimals(self, regs: Mapping[int, int]) -> int | None:
        """Decimals from a bit field: through its code table, or the field's value itself without one."""
        assert isinstance(self.decimals, BitField)
        code = self.decimals.extract(regs)
        decimals = self.decimals.codes.get(code) if self.decimals.codes else code
        return decimals if isinstance(decimals, int) and 0 <= decimals <= MAX_DECIMALS else None


def _clusters(registers: tuple[int, ...], span: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``span`` as one read, or — where ``registers`` (sorted) leave a gap of more than :data:`MAX_READ_GAP`
    unused registers — one ``(start, count)`` read per cluster of them."""
    if not registers or all(b - a - 1 <= MAX_READ_GAP for a, b in pairwise(registers)):
        return (span,)
    reads: list[tuple[int, int]] = []
    first = last = registers[0]
    for register in registers[1:]:
        if register - last - 1 > MAX_READ_GAP:
            reads.append((first, last - first + 1))
            first = register
        last = register
    reads.append((first, last - first + 1))
    return tuple(reads)


def _channel_read_counts(profile: DetectorProfile) -> list[int]:
    """Registers of each read that covers a controller's channels: as many whole channels per read as the
    125 registers of one read allow."""
    per_read = max(1, (MAX_READ_REGISTERS - profile.count) // max(profile.stride, 1) + 1)
    counts = []
    for first in range(0, profile.channels, per_read):
        n = min(per_read, profile.channels - first)
        counts.append((n - 1) * profile.stride + profile.count)
    return counts


#: The most registers one read (function 3 or 4) returns.
MAX_READ_REGISTERS = 125
#: The most unused registers one read carries between two that decoding needs. A second read costs a request,
#: three silences and a turnaround (≈ 34 ms at 9600 baud 8N1, about as much as 16 registers), so a short gap is
#: cheaper to read through; a longer one is more likely memory the device does not implement (and refuses).
MAX_READ_GAP = 8
#: Read settings of a multi-channel profile (:attr:`DetectorProfile.reads`).
CHANNEL_READS = ("span", "channel")
#: The most channels a multi-channel controller's profile may declare.
MAX_CHANNELS = 64

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

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        """``(function, count)`` of each read of a poll: one per function code."""
        return tuple((fc, count) for fc, (_start, count) in sorted(self.spans().items()))

    full_reads = cycle_reads

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
                values[name] = round(word * point.scale, _PRECISION)
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


class ProfileError(ValueError):
    """A custom profile is invalid. ``key`` is relative to the profile's table (``value.decimals.mask``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Prefix the key of a :class:`ProfileError` raised while reading a sub-table."""
    try:
        yield
    except ProfileError as exc:
        raise ProfileError(f"{prefix}.{exc.key}" if exc.key else prefix, exc.reason) from None


def toml_type_name(value: Any) -> str:
    """How a config error names the type of a TOML value ("an integer", "a table", ...)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _int(data: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 0xFFFF, default: int | None = None) -> int:
    value = data.get(key, default)
    if value is None:
        raise ProfileError(key, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(key, f"must be an integer, got {toml_type_name(value)}")
    if not lo <= value <= hi:
        raise ProfileError(key, f"must be {lo}–{hi}, got {value}")
    return value


def _num(data: Mapping[str, Any], key: str, default: float | None = None, *, nonzero: bool = False) -> float:
    value = data.get(key, default)
    if value is None:
        raise ProfileError(key, "is required")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(key, f"must be a number, got {toml_type_name(value)}")
    if not math.isfinite(value):
        raise ProfileError(key, "must be a finite number")
    if nonzero and value == 0:
        raise ProfileError(key, "must not be 0")
    return float(value)


def _flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ProfileError(key, f"must be true or false, got {toml_type_name(value)}")
    return value


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(unknown[0], f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ProfileError(key, f"must be a table, got {toml_type_name(value)}")
    return value


def _codes(table: Mapping[str, Any], mask: int, names: tuple[str, ...] | frozenset[str] | None) -> dict[int, Any]:
    """``codes = { "0x05" = "low_alarm", ... }`` (names) or ``{ "4" = 1, ... }`` (decimals, names=None)."""
    codes: dict[int, Any] = {}
    for code, value in table.items():
        try:
            number = int(code, 0)
        except ValueError:
            raise ProfileError(code, 'code must be an integer such as "5" or "0x05"') from None
        if not 0 <= number <= mask:
            raise ProfileError(code, f"code {number} can never occur in a field masked with 0x{mask:X}")
        if names is not None:
            if value not in names:
                raise ProfileError(code, f"unknown name {value!r} (one of {', '.join(sorted(names))})")
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DECIMALS:
            raise ProfileError(code, f"decimals must be an integer 0–{MAX_DECIMALS}, got {value!r}")
        codes[number] = value
    return codes


def _bitfield(
    data: Mapping[str, Any], key: str, *, names: tuple[str, ...] | frozenset[str] | None, require_codes: bool
) -> BitField | None:
    """``{ register, shift = 0, mask = 0xFFFF, codes = {...} }``; ``names=None`` reads decimals codes."""
    table = _table(data, key)
    if table is None:
        return None
    with _within(key):
        _only(table, {"register", "shift", "mask", "codes"})
        register = _int(table, "register")
        shift = _int(table, "shift", hi=15, default=0)
        mask = _int(table, "mask", lo=1, default=0xFFFF)
        if mask << shift > 0xFFFF:
            raise ProfileError("mask", f"0x{mask:X} shifted left by {shift} does not fit a 16-bit register")
        code_table = _table(table, "codes")
        if code_table is None and require_codes:
            raise ProfileError("codes", "is required: a table of code = name")
        with _within("codes"):
            codes = _codes(code_table or {}, mask, names)
    return BitField(register=register, shift=shift, mask=mask, codes=codes)


def parse_detector_profile(name: str, data: Mapping[str, Any]) -> DetectorProfile:
    """A custom detector register map from config. Raises :class:`ProfileError`."""
    _only(data, {"function", "start", "count", "value", "measure", "status", "flags", "warmup", "gas", "thresholds",
                 "full_read_every", "channels", "stride", "reads"})
    function = _int(data, "function", lo=3, hi=4, default=3)
    start = _int(data, "start")
    count = _int(data, "count", lo=1, hi=125)
    if start + count - 1 > 0xFFFF:
        raise ProfileError("count", f"{count} registers from {start} run past register 65535")
    value = _table(data, "value")
    if value is None:
        raise ProfileError("value", "is required: a table with register (and decimals, scale, signed)")
    with _within("value"):
        _only(value, {"register", "decimals", "scale", "signed"})
        value_register = _int(value, "register")
        decimals: int | BitField
        if isinstance(value.get("decimals"), Mapping):
            field_ = _bitfield(value, "decimals", names=None, require_codes=False)
            assert field_ is not None
            decimals = field_
        else:
            decimals = _int(value, "decimals", hi=MAX_DECIMALS, default=0)
        scale = _num(value, "scale", 1.0, nonzero=True)
        signed = _flag(value, "signed", False)
    measure: str | BitField
    if isinstance(data.get("measure"), Mapping):
        measure_field = _bitfield(data, "measure", names=MEASURES, require_codes=True)
        assert measure_field is not None
        measure = measure_field
    else:
        measure = data.get("measure", "%LEL")
        if measure not in MEASURES:
            raise ProfileError("measure", f"must be '%LEL', 'ppm', '%VOL' or a bit field, got {measure!r}")
    status = _bitfield(data, "status", names=DETECTOR_STATUSES, require_codes=True)
    flags: list[tuple[int, int, str]] = []
    raw_flags = data.get("flags", [])
    if not isinstance(raw_flags, list):
        raise ProfileError("flags", f"must be an array of tables, got {toml_type_name(raw_flags)}")
    for i, flag in enumerate(raw_flags):
        with _within(f"flags[{i}]"):
            if not isinstance(flag, Mapping):
                raise ProfileError("", f"must be a table, got {toml_type_name(flag)}")
            _only(flag, {"register", "bit", "status"})
            status_name = flag.get("status")
            if status_name not in DETECTOR_STATUSES:
                raise ProfileError("status", f"unknown status {status_name!r} (one of "
                                             f"{', '.join(sorted(DETECTOR_STATUSES))})")
            flags.append((_int(flag, "register"), _int(flag, "bit", hi=15), status_name))
    warm = _table(data, "warmup")
    warmup = None
    if warm is not None:
        with _within("warmup"):
            _only(warm, {"register", "ready_bit", "remaining_mask", "remaining_scale"})
            warmup = WarmupField(register=_int(warm, "register"),
                                 ready_bit=_int(warm, "ready_bit", hi=15, default=15),
                                 remaining_mask=_int(warm, "remaining_mask", lo=1, default=0x7FFF),
                                 remaining_scale=_num(warm, "remaining_scale", 0.1, nonzero=True))
            if warmup.remaining_mask >> warmup.ready_bit & 1:
                raise ProfileError("remaining_mask", f"must not include the ready bit {warmup.ready_bit}")
            if warmup.remaining_scale < 0:
                raise ProfileError("remaining_scale", f"must be > 0, got {warmup.remaining_scale:g}")
    gas_name = data.get("gas", "CH4")
    if gas_name not in GASES:
        raise ProfileError("gas", f"must be one of {', '.join(GASES)}, got {gas_name!r}")
    thresholds: dict[str, float] = {}
    limits = _table(data, "thresholds")
    if limits is not None:
        with _within("thresholds"):
            _only(limits, {"low", "high", "hysteresis"})
            for key in ("low", "high", "hysteresis"):
                if key in limits:
                    thresholds[key] = _num(limits, key)
                    if thresholds[key] < 0:
                        raise ProfileError(key, f"must be ≥ 0, got {thresholds[key]:g}")
    full_read_every = _int(data, "full_read_every", lo=1, hi=3600, default=DEFAULT_FULL_READ_EVERY)
    block = range(start, start + count)
    referenced = [("value.register", value_register)]
    if isinstance(decimals, BitField):
        referenced.append(("value.decimals.register", decimals.register))
    if isinstance(measure, BitField):
        referenced.append(("measure.register", measure.register))
    if status is not None:
        referenced.append(("status.register", status.register))
    referenced += [(f"flags[{i}].register", f[0]) for i, f in enumerate(flags)]
    if warmup is not None:
        referenced.append(("warmup.register", warmup.register))
    for key, register in referenced:
        if register not in block:
            raise ProfileError(key, f"register {register} is outside the block read ({start}–{start + count - 1})")
    channels = _int(data, "channels", lo=1, hi=MAX_CHANNELS, default=1)
    stride = 0
    if channels > 1:
        stride = _int(data, "stride", lo=1, hi=0xFFFF)
        last = start + (channels - 1) * stride + count - 1
        if last > 0xFFFF:
            raise ProfileError("stride", f"channel {channels}'s registers run past register 65535 (to {last})")
    elif "stride" in data:
        raise ProfileError("stride", "is only for a profile with channels > 1")
    reads = data.get("reads")
    if reads is not None:
        if channels == 1:
            raise ProfileError("reads", "is only for a profile with channels > 1 (a single detector's reads follow "
                                        "its registers by themselves)")
        if reads not in CHANNEL_READS:
            raise ProfileError("reads", f"must be 'span' or 'channel', got {reads!r}")
    return DetectorProfile(
        name=name, function=function, start=start, count=count, value_register=value_register,
        decimals=decimals, scale=scale, signed=signed, measure=measure, status=status, flags=tuple(flags),
        warmup=warmup, default_gas=gas_name, thresholds=thresholds, full_read_every=full_read_every,
        channels=channels, stride=stride, reads=reads,
    )


#: The most coils/discrete inputs (function 1/2) and registers (function 3/4) one Modbus read returns.
_MAX_SPAN = {1: 2000, 2: 2000, 3: 125, 4: 125}


def _station_point(point_name: str, table: Mapping[str, Any]) -> BitPoint | AnalogPoint:
    function = _int(table, "function", lo=1, hi=4)
    address = _int(table, "address")
    if "min" in table or "max" in table:
        if point_name != "pressure":
            raise ProfileError("min" if "min" in table else "max", "an analog range is only for 'pressure'")
        if function not in (3, 4):
            raise ProfileError("function", f"an analog pressure is read from registers (3 or 4), got {function}")
        _only(table, {"function", "address", "min", "max", "scale", "signed"})
        lo, hi = _num(table, "min"), _num(table, "max")
        if lo >= hi:
            raise ProfileError("min", f"must be below max ({hi:g}), got {lo:g}")
        return AnalogPoint(function=function, address=address, minimum=lo, maximum=hi,
                           scale=_num(table, "scale", 1.0, nonzero=True), signed=_flag(table, "signed", False))
    _only(table, {"function", "address", "normal", "bit"})
    if "bit" in table and function in (1, 2):
        raise ProfileError("bit", f"only for a register (function 3 or 4); function {function} reads one bit")
    return BitPoint(function=function, address=address, normal=_flag(table, "normal", True),
                    bit=_int(table, "bit", hi=15, default=0))


def parse_station_profile(name: str, data: Mapping[str, Any]) -> StationProfile:
    """A custom extinguisher-station map from config. Raises :class:`ProfileError`."""
    _only(data, set(STATION_POINTS))
    points: dict[str, BitPoint | AnalogPoint] = {}
    used: dict[tuple[int, int, int | None], str] = {}
    for point_name in STATION_POINTS:
        table = _table(data, point_name)
        if table is None:
            continue
        with _within(point_name):
            point = _station_point(point_name, table)
            bit = point.bit if isinstance(point, BitPoint) and point.function in (3, 4) else None
            for other_key, other in used.items():
                same_input = other_key[:2] == (point.function, point.address) and (
                    bit is None or other_key[2] is None or other_key[2] == bit
                )
                if same_input:
                    raise ProfileError("address", f"function {point.function} address {point.address}"
                                                  f"{'' if bit is None else f' bit {bit}'} is already '{other}'")
            used[point.function, point.address, bit] = point_name
        points[point_name] = point
    if not points:
        raise ProfileError("", f"needs at least one of {', '.join(STATION_POINTS)}")
    profile = StationProfile(name=name, points=points)
    for function, (first, count) in profile.spans().items():
        if count > _MAX_SPAN[function]:
            last = next(n for n, p in reversed(points.items()) if p.function == function)
            raise ProfileError(f"{last}.address", f"points read with function {function} span {count} addresses "
                                                  f"from {first}; one read covers at most {_MAX_SPAN[function]}")
    return profile
