"""The wire floor (drivers/wire.py) against the figures of the domain notes and the Modbus serial line spec."""

from __future__ import annotations

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
