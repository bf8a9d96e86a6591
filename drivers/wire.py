"""Time on an RS-485 line: how long Modbus RTU frames take at a given baud rate and character format.

Pure functions of the line settings, after the Modbus over serial line specification V1.02 (modbus.org,
2006), §2.5.1 and §2.5.1.1: a character is a start bit, 8 data bits, a parity bit if any and the stop
bits; frames are separated by at least 3.5 character times of silence, fixed at 1.75 ms above 19200 baud.
A device answers after a turnaround the specification does not bound (typically 5–50 ms).

The *floor* of a bus is the shortest cycle its devices allow: per transaction the request and answer
frames, the silence after each and the device's turnaround. No polling schedule can beat it; a
``poll_interval_s`` below it is not met (:func:`gateway.config.bus_floor_warnings`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TURNAROUND_S",
    "FIXED_SILENCE_S",
    "READ_REQUEST_BYTES",
    "LineFormat",
    "answer_bytes",
    "bus_floor_s",
    "read_answer_bytes",
    "transaction_s",
]

#: A device's turnaround assumed when none is known: between receiving a request and starting its answer.
DEFAULT_TURNAROUND_S = 0.010
#: Inter-frame silence above 19200 baud (the specification fixes it instead of 3.5 character times).
FIXED_SILENCE_S = 0.00175
#: Bytes of a read request (functions 1–4): address, function, start (2), count (2), CRC (2).
READ_REQUEST_BYTES = 8
_SILENCE_CHARS = 3.5
_FIXED_ABOVE_BAUD = 19200


@dataclass(frozen=True, slots=True)
class LineFormat:
    """Baud rate and character format of a serial line (8N1 by default)."""

    baud: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1

    def __post_init__(self) -> None:
        if self.baud <= 0:
            raise ValueError(f"baud must be positive, got {self.baud}")
        if self.parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be N, E or O, got {self.parity!r}")

    @property
    def bits_per_char(self) -> int:
        """Start bit + data bits + parity bit (if any) + stop bits: 10 for 8N1, 11 for 8E1 or 8N2."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def char_s(self) -> float:
        """Time of one character on the wire."""
        return self.bits_per_char / self.baud

    @property
    def silence_s(self) -> float:
        """The silence that ends a frame: 3.5 characters, or 1.75 ms above 19200 baud."""
        return FIXED_SILENCE_S if self.baud > _FIXED_ABOVE_BAUD else _SILENCE_CHARS * self.char_s

    def frame_s(self, nbytes: int) -> float:
        """Time of a frame of ``nbytes`` characters sent back to back."""
        return nbytes * self.char_s


def read_answer_bytes(function: int, count: int) -> int:
    """Bytes of the answer to a read of ``count`` registers (functions 3, 4) or bits (functions 1, 2).

    Address, function, byte count, the data and the CRC: 5 + 2 × count for registers.
    """
    if function in (3, 4):
        return 5 + 2 * count
    if function in (1, 2):
        return 5 + math.ceil(count / 8)
    raise ValueError(f"not a read function: {function}")


def answer_bytes(request: bytes) -> int | None:
    """Bytes of the normal answer to a Modbus RTU request frame; None when its length is not known.

    Reads (1–4) from their count; single and multiple writes (5, 6, 15, 16) echo 8 bytes. An exception
    answer is shorter (5 bytes).
    """
    if len(request) < 6:
        return None
    function = request[1]
    if function in (1, 2, 3, 4):
        return read_answer_bytes(function, int.from_bytes(request[4:6], "big"))
    if function in (5, 6, 15, 16):
        return 8
    return None


def transaction_s(
    line: LineFormat,
    answer: int,
    *,
    turnaround_s: float = DEFAULT_TURNAROUND_S,
    request: int = READ_REQUEST_BYTES,
) -> float:
    """From the first bit of a request to the last bit of its answer: request, silence, turnaround, answer."""
    return line.frame_s(request) + line.silence_s + turnaround_s + line.frame_s(answer)


def bus_floor_s(
    line: LineFormat,
    reads: Iterable[tuple[int, int]],
    *,
    turnaround_s: float = DEFAULT_TURNAROUND_S,
) -> float:
    """The shortest cycle of a bus whose cycle makes ``reads`` — one ``(function, count)`` per transaction.

    Each transaction costs its request and answer frames, two silences (after the request and after the
    answer) and the device's turnaround.
    """
    return sum(
        transaction_s(line, read_answer_bytes(function, count), turnaround_s=turnaround_s) + line.silence_s
        for function, count in reads
    )
