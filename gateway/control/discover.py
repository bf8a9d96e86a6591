"""What a scan learns about a device no known register map fits: is it a multi-channel controller?

Most devices refuse a read that touches a register they do not implement (exception 02), so the registers a
device does implement can be found one at a time. :func:`find_controller` looks near the registers where
controllers commonly start their channel table, grows the block it finds, then looks for the same block again
a channel stride above, and counts the channels. It only reads; ``read(start, count)`` gives the registers
or None when the device refused or did not answer. :func:`profile_sketch` turns what it found into a
``[profiles.*]`` table to paste into the site file (docs/config.md, "Multi-channel profile").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drivers.profiles import MAX_CHANNELS, MAX_READ_REGISTERS

__all__ = ["CONTROLLER_BASES", "ControllerLayout", "find_controller", "profile_sketch"]

#: Registers around which controllers commonly start their channel table (channel 1), each probed
#: :data:`_NEAR` registers either side: one register at a time, ≈ 20 ms a refused read at 9600 baud, so at
#: most ≈ 1.5 s for a device that implements none of them.
CONTROLLER_BASES = (0, 1000, 2000, 3000, 4000, 5000, 0x1000, 0x2000)
_NEAR = 4
#: The widest stride looked for between two channels' blocks, and the longest block grown one register a
#: time (a block longer than this is not one channel's).
MAX_STRIDE = 64
_MAX_BLOCK = 16

Read = Callable[[int, int], list[int] | None]


@dataclass(frozen=True, slots=True)
class ControllerLayout:
    """A block of ``count`` registers from ``start``, repeated ``channels`` times ``stride`` apart (``stride`` 0:
    found once); ``values`` are channel 1's registers as read."""

    start: int
    count: int
    stride: int
    channels: int
    values: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"start": self.start, "count": self.count, "stride": self.stride, "channels": self.channels,
                "values": list(self.values)}


def _readable(read: Read, register: int) -> bool:
    return 0 <= register <= 0xFFFF and read(register, 1) is not None


def _block_at(read: Read, start: int, count: int) -> list[int] | None:
    if start < 0 or start + count - 1 > 0xFFFF:
        return None
    return read(start, count)


def find_controller(read: Read, bases: tuple[int, ...] = CONTROLLER_BASES) -> ControllerLayout | None:
    """The block of registers the device implements near one of ``bases``, and how often it repeats at a
    stride; None when no register there reads."""
    seed = next((r for base in bases for r in range(base - _NEAR, base + _NEAR + 1) if _readable(read, r)), None)
    if seed is None:
        return None
    first = last = seed
    while seed - first < _MAX_BLOCK and _readable(read, first - 1):
        first -= 1
    while last - seed < _MAX_BLOCK and _readable(read, last + 1):
        last += 1
    count = last - first + 1
    values = read(first, count)
    if values is None or count > _MAX_BLOCK:
        return None if values is None else ControllerLayout(first, count, 0, 1, tuple(values))
    stride = next((s for s in range(count + 1, MAX_STRIDE + 1) if _readable(read, first + s)
                   and _block_at(read, first + s, count) is not None), 0)
    channels = 1
    if stride:
        while channels < MAX_CHANNELS and _block_at(read, first + channels * stride, count) is not None:
            channels += 1
        while channels < MAX_CHANNELS and _block_at(read, first - stride, count) is not None:  # seed past channel 1
            first -= stride
            channels += 1
        values = read(first, count) or values
    return ControllerLayout(first, count, stride, channels, tuple(values))


def profile_sketch(layout: ControllerLayout, address: int) -> str:
    """A ``[profiles.*]`` table for ``layout`` that parses as it is; the comments say what to check against
    the device's manual (which register holds the level, which the status, and their codes)."""
    name = f"controller-{address}"
    registers = ", ".join(f"{layout.start + i} = {v}" for i, v in enumerate(layout.values))
    value = layout.start + 1 if layout.count > 1 else layout.start
    lines = [f"[profiles.{name}]", 'kind = "gas_detector"', "function = 3", f"start = {layout.start}",
             f"count = {layout.count}"]
    if layout.channels > 1:
        span = (layout.channels - 1) * layout.stride + layout.count
        reads = "channel" if span > MAX_READ_REGISTERS or layout.stride > layout.count else "span"
        lines += [f"channels = {layout.channels}", f"stride = {layout.stride}",
                  f'reads = "{reads}"  # the registers between channels are not implemented' if reads == "channel"
                  else f'reads = "{reads}"']
    lines += [f"# channel 1 read {registers}: check in the manual which register is the level and which the status",
              f"value = {{ register = {value}, decimals = 0 }}",
              f"# status = {{ register = {layout.start + layout.count - 1}, codes = {{ \"0\" = \"normal\" }} }}"]
    return "\n".join(lines) + "\n"
