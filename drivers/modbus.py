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
from pymodbus.framer import FramerRTU
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from drivers.profiles import MAX_READ_REGISTERS, DetectorProfile, GasReading, StationProfile, StationReading

__all__ = [
    "EXCEPTION_NAMES",
    "FRAME_ERROR_KINDS",
    "GATEWAY_EXCEPTIONS",
    "SPAN_REFUSALS",
    "ChannelGroup",
    "CommError",
    "ExtinguisherStation",
    "FrameError",
    "GasDetector",
    "ModbusClient",
    "ModbusDevice",
    "StrictFraming",
    "StrictSerialClient",
    "exception_kind",
    "frame_error_kind",
    "group_channels",
    "read_block",
    "read_registers",
]


#: Names of the Modbus exception codes (Modbus Application Protocol Specification V1.1b3, §7).
EXCEPTION_NAMES: dict[int, str] = {
    0x01: "illegal_function",
    0x02: "illegal_data_address",
    0x03: "illegal_data_value",
    0x04: "server_device_failure",
    0x05: "acknowledge",
    0x06: "server_device_busy",
    0x08: "memory_parity_error",
    0x0A: "gateway_path_unavailable",
    0x0B: "gateway_target_failed_to_respond",
}
#: Exception codes a Modbus gateway sends in place of a device behind it: they say nothing answered.
GATEWAY_EXCEPTIONS = frozenset({0x0A, 0x0B})
#: What a failed poll looked like on the line, apart from exception answers (``exception:<name>``):
#: nothing came (``timeout``); a frame with a wrong CRC, from another address, cut short, with more
#: bytes than the answer holds, answering another function, or not the answer asked for; the port failed.
FRAME_ERROR_KINDS = (
    "timeout", "crc_error", "wrong_address", "truncated_frame", "overlong_frame", "wrong_function",
    "bad_response", "port",
)


def exception_kind(code: int) -> str:
    """The error kind of an exception answer: ``exception:illegal_data_address``, ``exception:code_9``."""
    return f"exception:{EXCEPTION_NAMES.get(code, f'code_{code}')}"


class CommError(Exception):
    """A poll got no valid answer.

    ``reason`` says what to do about it: timeout (nothing usable came for this device), exception_response,
    bad_response or port. ``kind`` says what the line showed, for a technician's counters
    (:data:`FRAME_ERROR_KINDS` or ``exception:<name>``); it defaults to the reason.
    """

    def __init__(self, reason: str, detail: str = "", kind: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.kind = kind or reason

    def __reduce__(self) -> tuple[type[CommError], tuple[str, str, str]]:
        return CommError, (self.reason, self.detail, self.kind)


class FrameError(ModbusIOException):
    """No answer could be taken, and ``kind`` says what came instead (:data:`FRAME_ERROR_KINDS`)."""

    def __init__(self, string: str, *, kind: str, function_code: int | None = None, dev_id: int = 0) -> None:
        super().__init__(string, function_code, dev_id=dev_id)
        self.kind = kind


def _answer_size(request: ModbusPDU) -> int | None:
    """Bytes of the normal RTU answer to a read request (functions 1–4), from pymodbus's own encoding."""
    count = int(request.count)
    answer: ModbusPDU
    if request.function_code in (1, 2):
        answer = ReadCoilsResponse(bits=[False] * count)
    elif request.function_code in (3, 4):
        answer = ReadHoldingRegistersResponse(registers=[0] * count)
    else:
        return None
    return 2 + len(answer.encode()) + 2  # address, function code, data, CRC


def frame_error_kind(data: bytes, request: ModbusPDU) -> str:
    """What the bytes received for ``request`` were, when pymodbus took no answer from them.

    pymodbus's RTU framer drops a frame with a wrong CRC or from another address and waits on, so every
    such answer ends as a timeout; the bytes tell them apart. One frame of the right length whose CRC
    (pymodbus's check) fails is a CRC error; a valid frame from another address a wrong address; fewer
    bytes than the answer holds a truncated frame, more an over-long one.
    """
    if not data:
        return "timeout"
    if len(data) >= 4 and FramerRTU.check_CRC(data[:-2], int.from_bytes(data[-2:], "big")):
        return "wrong_address" if data[0] != request.dev_id else "bad_response"
    size = _answer_size(request)
    if len(data) == ExceptionResponse.rtu_frame_size and data[1] == request.function_code | 0x80:
        size = ExceptionResponse.rtu_frame_size
    if size is None:
        return "bad_response"
    if len(data) > size:
        return "overlong_frame"
    if len(data) < size:
        return "truncated_frame"
    return "crc_error"


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
    _answer = b""  # the first of those bytes, kept to tell why no answer could be taken
    _KEEP = 1024

    def send(self, request: bytes, addr: tuple[Any, ...] | None = None) -> int:
        self.received = 0
        self._answer = b""
        return int(super().send(request, addr))

    def recv(self, size: int | None) -> bytes:
        data = bytes(super().recv(size))
        self.received += len(data)
        if len(self._answer) < self._KEEP:
            self._answer += data[: self._KEEP - len(self._answer)]
        return data

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:
        try:
            response = super().execute(no_response_expected, request)
        except FrameError:
            raise
        except ModbusIOException as exc:  # no answer pymodbus could take: say what came instead
            kind = "overlong_frame" if self.received > self._KEEP else frame_error_kind(self._answer, request)
            raise FrameError(exc.string, kind=kind, function_code=request.function_code,
                             dev_id=request.dev_id) from None
        if response is not None and not no_response_expected:
            expected = 2 + len(response.encode()) + 2  # address, function code, data, CRC
            received = self.received + self._trailing()
            if received != expected:
                raise FrameError(f"{received} bytes received for a {expected}-byte frame", kind="overlong_frame",
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
    ``port`` (the serial port failed). The error's ``kind`` tells the first two apart further
    (:func:`frame_error_kind`) and names an exception (``exception:illegal_data_address``).
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
        reason = "timeout" if exc.kind in ("timeout", "crc_error", "wrong_address", "truncated_frame") else (
            "bad_response")
        raise CommError(reason, str(exc), exc.kind) from None
    except ConnectionException as exc:
        raise CommError("port", str(exc)) from None
    except ModbusException as exc:
        raise CommError("timeout", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CommError("port", str(exc)) from None
    if response is None or response.isError():
        code = getattr(response, "exception_code", None)
        if code:
            raise CommError("exception_response", f"exception code {code}", exception_kind(int(code)))
        raise CommError("timeout", str(response))
    if response.function_code != function:  # pymodbus returns whatever function the device answered
        raise CommError("bad_response", f"function {response.function_code} answered a function {function} read",
                        "wrong_function")
    if function in (1, 2):
        bits = list(response.bits)[:count]
        if len(bits) < count:
            raise CommError("bad_response", f"{len(bits)} bits for {count}")
        return [int(b) for b in bits]
    registers: Sequence[int] = response.registers
    if len(registers) != count:
        raise CommError("bad_response", f"{len(registers)} registers for {count}",
                        "overlong_frame" if len(registers) > count else "bad_response")
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

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        """``(function, count)`` of the reads of a usual poll, as the device is read now (the bus floor)."""
        return ()


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

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        return self.profile.cycle_reads

    def poll(self, client: ModbusClient) -> GasReading:
        p = self.profile
        _first, count = p.fast_window
        whole = self._block is None or self._fast_polls_left <= 0 or count >= p.count
        try:
            if whole:
                registers = read_registers(client, p, p.block_reads, None, self.address)
            else:
                assert self._block is not None
                registers = read_registers(client, p, p.fast_reads, self._block, self.address)
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


def read_registers(client: ModbusClient, profile: DetectorProfile, reads: Sequence[tuple[int, int]],
                   block: Sequence[int] | None, address: int) -> list[int]:
    """The profile's block (from ``profile.start``) with ``reads`` — ``(start, count)`` each — read into it:
    into a copy of ``block``, or into zeros (registers no read covers are ones decoding does not use)."""
    registers = list(block) if block is not None else [0] * profile.count
    for start, count in reads:
        offset = start - profile.start
        registers[offset : offset + count] = read_block(client, profile.function, start, count, address)
    return registers


class ExtinguisherStation(ModbusDevice):
    """An extinguisher cabinet behind an RS-485 I/O module, read through a :class:`StationProfile`."""

    def __init__(self, device_id: str, address: int, profile: StationProfile) -> None:
        super().__init__(device_id, address)
        self.profile = profile

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        return self.profile.cycle_reads

    def poll(self, client: ModbusClient) -> StationReading:
        tables = {
            fc: read_block(client, fc, start, count, self.address)
            for fc, (start, count) in sorted(self.profile.spans().items())
        }
        return self.profile.decode(tables)


#: Exceptions by which a device refuses a read of registers it does not implement (02, illegal data address)
#: or of more registers than it serves at once (03, illegal data value): a controller's span read refused
#: so is read one channel at a time.
SPAN_REFUSALS = frozenset({exception_kind(0x02), exception_kind(0x03)})


class ChannelGroup(ModbusDevice):
    """The channels of a multi-channel controller behind one address, read by the profile's read plan.

    Each channel is a :class:`GasDetector` of its own (its own device id, profile and alarm state: see
    :meth:`DetectorProfile.for_channel`); the bus thread polls the group instead of them. :attr:`plan` is
    ``"span"`` — one read covers as many channels as its 125 registers hold, so a 4-channel unit costs one
    transaction a cycle — or ``"channel"``, one read per channel (split like :attr:`DetectorProfile.block_reads`),
    for devices that implement only each channel's registers (after a read that timed out, the rest of the poll's
    channels share its error: one timeout a cycle, as the bus's cycle budget counts). Without a read setting the
    group starts with the span and, when the device refuses a span read with exception 02 or 03
    (:data:`SPAN_REFUSALS`), switches to one read per channel for good and reads the channels at once;
    :attr:`fallback` then says why (the bus thread logs it once). :meth:`poll` gives each channel its reading,
    or the error of the read that should have carried it.
    """

    def __init__(self, channels: Sequence[GasDetector]) -> None:
        first = channels[0]
        super().__init__(first.device_id, first.address)
        self.channels = tuple(channels)
        self.setting = first.profile.reads
        self.plan = "channel" if self.setting == "channel" else "span"
        #: Why the group left the span for one read per channel (None while it has not).
        self.fallback: str | None = None
        self.reads: list[tuple[int, int, tuple[GasDetector, ...]]] = []  # (start, count, channels read)
        ordered = sorted(self.channels, key=lambda d: d.profile.start)
        batch: list[GasDetector] = []
        for detector in ordered:
            trial = [*batch, detector]
            start = trial[0].profile.start
            end = max(d.profile.start + d.profile.count for d in trial)
            if batch and end - start > MAX_READ_REGISTERS:
                self._add_read(batch)
                trial = [detector]
            batch = trial
        self._add_read(batch)

    def _add_read(self, batch: list[GasDetector]) -> None:
        start = batch[0].profile.start
        end = max(d.profile.start + d.profile.count for d in batch)
        self.reads.append((start, end - start, tuple(batch)))

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The alarm core's device id of each channel."""
        return tuple(d.device_id for d in self.channels)

    @property
    def cycle_reads(self) -> tuple[tuple[int, int], ...]:
        function = self.channels[0].profile.function
        if self.plan == "channel":
            return tuple((function, count) for d in self.channels for _start, count in d.profile.block_reads)
        return tuple((function, count) for _start, count, _batch in self.reads)

    def poll(self, client: ModbusClient) -> dict[str, GasReading | CommError]:  # type: ignore[override]
        results: dict[str, GasReading | CommError] = {}
        if self.plan == "channel":
            silent: CommError | None = None
            for detector in self.channels:
                # A controller that let one read time out is not asked again this poll: its other channels get
                # the same error, so a silent controller costs one timeout a cycle, not one per channel.
                result = silent or self._read_channel(client, detector)
                if isinstance(result, CommError) and result.kind == "timeout":
                    silent = result
                results[detector.device_id] = result
            return results
        function = self.channels[0].profile.function
        for start, count, batch in self.reads:
            try:
                block = read_block(client, function, start, count, self.address)
            except CommError as exc:
                if self.setting is None and len(batch) > 1 and exc.kind in SPAN_REFUSALS:
                    self._fall_back(start, count, exc)
                    return self.poll(client)
                results.update(dict.fromkeys((d.device_id for d in batch), exc))
                continue
            for detector in batch:
                p = detector.profile
                offset = p.start - start
                try:
                    results[detector.device_id] = p.decode(block[offset : offset + p.count])
                except (ValueError, KeyError) as exc:
                    results[detector.device_id] = CommError("bad_response", str(exc))
        return results

    def _fall_back(self, start: int, count: int, exc: CommError) -> None:
        self.plan = "channel"
        name = exc.kind.removeprefix("exception:").replace("_", " ")
        self.fallback = (f"the device refused a read of registers {start}–{start + count - 1} spanning several "
                         f"channels ({name}); its {len(self.channels)} channels are read one read each from now "
                         f"on (set reads = \"channel\" in profile {self.channels[0].profile.name!r} to start so)")

    def _read_channel(self, client: ModbusClient, detector: GasDetector) -> GasReading | CommError:
        p = detector.profile
        try:
            return p.decode(read_registers(client, p, p.block_reads, None, self.address))
        except CommError as exc:
            return exc
        except (ValueError, KeyError) as exc:
            return CommError("bad_response", str(exc))


def group_channels(devices: Sequence[ModbusDevice]) -> list[ModbusDevice]:
    """What a bus polls: each device, except that the channels of one controller (gas detectors at one
    address with a multi-channel profile) become one :class:`ChannelGroup`, polled where the first was."""
    grouped: list[ModbusDevice] = []
    groups: dict[tuple[int, int], list[GasDetector]] = {}
    for device in devices:
        if isinstance(device, GasDetector) and device.profile.channels > 1:
            key = (device.address, device.profile.function)
            if key not in groups:
                groups[key] = []
                grouped.append(device)  # a placeholder, replaced below
            groups[key].append(device)
        else:
            grouped.append(device)
    return [ChannelGroup(groups[d.address, d.profile.function])
            if isinstance(d, GasDetector) and d.profile.channels > 1 else d for d in grouped]
