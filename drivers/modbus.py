"""Modbus RTU devices polled through pymodbus's synchronous serial client.

A :class:`ModbusDevice` only turns one poll into a decoded reading; the bus thread that owns the port
(:mod:`gateway.panel.buses`) calls :meth:`ModbusDevice.poll` for each device in turn. :class:`StrictSerialClient`
(:class:`StrictFraming`) is pymodbus's RTU client refusing answers with extra bytes around the frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.profiles import DetectorProfile, GasReading, StationProfile, StationReading

__all__ = [
    "CommError",
    "ExtinguisherStation",
    "FrameError",
    "GasDetector",
    "ModbusClient",
    "ModbusDevice",
    "StrictFraming",
    "StrictSerialClient",
    "read_block",
]


class CommError(Exception):
    """A poll got no valid answer. ``reason`` is timeout, exception_response, bad_response or port."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[CommError], tuple[str, str]]:
        return CommError, (self.reason, self.detail)


class FrameError(ModbusIOException):
    """An answer decoded, but more bytes came than its frame holds (noise, a collision, a second frame)."""


if TYPE_CHECKING:
    _SerialBase = ModbusSerialClient
else:
    _SerialBase = object


class StrictFraming(_SerialBase):
    """Mixin for pymodbus's synchronous serial client: refuse an answer that came with extra bytes.

    pymodbus finds a frame by its length and CRC and drops what surrounds it, so a valid frame with
    leading or trailing garbage passes. On a bus one answer is exactly one frame: anything more means the
    line is noisy or two devices talked, and the data is not trusted (:class:`FrameError`). Counted are the
    bytes read for the answer and those already waiting behind it when it decoded; bytes left over from an
    earlier answer are drained before each request (by pymodbus, or by the bus client) and are not
    counted. Put this class first among the bases, so it sees every byte whatever ``recv`` the others
    implement.
    """

    received = 0
    """Bytes read since the last request was sent."""

    def send(self, request: bytes, addr: tuple[Any, ...] | None = None) -> int:
        self.received = 0
        return int(super().send(request, addr))

    def recv(self, size: int | None) -> bytes:
        data = bytes(super().recv(size))
        self.received += len(data)
        return data

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:
        response = super().execute(no_response_expected, request)
        if response is not None and not no_response_expected:
            expected = 2 + len(response.encode()) + 2  # address, function code, data, CRC
            received = self.received + self._trailing()
            if received != expected:
                raise FrameError(f"{received} bytes received for a {expected}-byte frame",
                                 function_code=request.function_code, dev_id=request.dev_id)
        return response

    def _trailing(self) -> int:
        """Bytes already waiting behind the frame (drained before the next request)."""
        try:
            return int(self.socket.in_waiting) if self.socket is not None else 0
        except OSError:
            return 0


class StrictSerialClient(StrictFraming, ModbusSerialClient):
    """pymodbus's synchronous serial client with :class:`StrictFraming`."""


class ModbusClient(Protocol):
    """The part of ``pymodbus.client.ModbusSerialClient`` the drivers use."""

    def read_coils(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_discrete_inputs(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_holding_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_input_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...


def read_block(client: ModbusClient, function: int, address: int, count: int, device_id: int) -> list[int]:
    """One read with function code 1–4; bits come back as 0/1. Raises :class:`CommError`.

    Reasons: ``timeout`` (no valid frame for this device in time: silence, garbage, wrong CRC or
    address), ``bad_response`` (a frame that is not the answer asked for), ``exception_response``,
    ``port`` (the serial port failed).
    """
    readers = {
        1: client.read_coils,
        2: client.read_discrete_inputs,
        3: client.read_holding_registers,
        4: client.read_input_registers,
    }
    try:
        response = readers[function](address, count=count, device_id=device_id)
    except FrameError as exc:
        raise CommError("bad_response", str(exc)) from None
    except ConnectionException as exc:
        raise CommError("port", str(exc)) from None
    except ModbusException as exc:
        raise CommError("timeout", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CommError("port", str(exc)) from None
    if response is None or response.isError():
        code = getattr(response, "exception_code", None)
        if code:
            raise CommError("exception_response", f"exception code {code}")
        raise CommError("timeout", str(response))
    if response.function_code != function:  # pymodbus returns whatever function the device answered
        raise CommError("bad_response", f"function {response.function_code} answered a function {function} read")
    if function in (1, 2):
        bits = list(response.bits)[:count]
        if len(bits) < count:
            raise CommError("bad_response", f"{len(bits)} bits for {count}")
        return [int(b) for b in bits]
    registers: Sequence[int] = response.registers
    if len(registers) != count:
        raise CommError("bad_response", f"{len(registers)} registers for {count}")
    return list(registers)


class ModbusDevice(ABC):
    """A device on an RS-485 bus.

    Subclasses must override :meth:`poll`. They may override :meth:`raw_poll` to change how registers
    are fetched (a fresh reading with ``--raw`` uses it).
    """

    def __init__(self, device_id: str, address: int) -> None:
        self.device_id = device_id
        self.address = address

    @abstractmethod
    def poll(self, client: ModbusClient) -> GasReading | StationReading:
        """Read and decode the device once. Raises :class:`CommError`."""


class GasDetector(ModbusDevice):
    """A gas-leak detector read through a :class:`DetectorProfile`.

    A poll reads only the profile's fast window — what the alarm decision needs — and takes the other
    registers (unit and decimals codes, set-points, gas type) from the last whole read of the block. The
    whole block is read at the first poll, after a failed one (the device may have been replaced) and
    every ``profile.full_read_every`` polls; detectors at different addresses spread those whole reads
    over different cycles. On an RS-485 line every register costs two characters of wire time.
    """

    def __init__(self, device_id: str, address: int, profile: DetectorProfile) -> None:
        super().__init__(device_id, address)
        self.profile = profile
        self._block: list[int] | None = None  # the whole block as last read, fast window refreshed since
        self._fast_polls_left = 0  # polls before the next whole read

    def poll(self, client: ModbusClient) -> GasReading:
        p = self.profile
        first, count = p.fast_window
        whole = self._block is None or self._fast_polls_left <= 0 or count >= p.count
        try:
            if whole:
                registers = read_block(client, p.function, p.start, p.count, self.address)
            else:
                assert self._block is not None
                registers = list(self._block)
                offset = first - p.start
                registers[offset : offset + count] = read_block(client, p.function, first, count, self.address)
            reading = p.decode(registers)
        except CommError:
            self._block = None
            raise
        except (ValueError, KeyError) as exc:
            self._block = None
            raise CommError("bad_response", str(exc)) from None
        if whole:
            every = p.full_read_every
            # After a first read, stagger by address so that whole reads do not fall into the same cycle.
            self._fast_polls_left = every - 1 - (self.address % every if self._block is None else 0)
        else:
            self._fast_polls_left -= 1
        self._block = registers
        return reading


class ExtinguisherStation(ModbusDevice):
    """An extinguisher cabinet behind an RS-485 I/O module, read through a :class:`StationProfile`."""

    def __init__(self, device_id: str, address: int, profile: StationProfile) -> None:
        super().__init__(device_id, address)
        self.profile = profile

    def poll(self, client: ModbusClient) -> StationReading:
        tables = {
            fc: read_block(client, fc, start, count, self.address)
            for fc, (start, count) in sorted(self.profile.spans().items())
        }
        return self.profile.decode(tables)
