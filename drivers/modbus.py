"""Modbus RTU devices polled through pymodbus's synchronous serial client.

A :class:`ModbusDevice` only turns one poll into a decoded reading; the bus thread that owns the port
(:mod:`gateway.bus`) calls :meth:`ModbusDevice.poll` for each device in turn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

from drivers.profiles import DetectorProfile, GasReading, StationProfile, StationReading

__all__ = ["CommError", "ExtinguisherStation", "GasDetector", "ModbusClient", "ModbusDevice", "read_block"]


class CommError(Exception):
    """A poll got no valid answer. ``reason`` is timeout, exception_response, bad_response or port."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ModbusClient(Protocol):
    """The part of ``pymodbus.client.ModbusSerialClient`` the drivers use."""

    def read_coils(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_discrete_inputs(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_holding_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...
    def read_input_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Any: ...


def read_block(client: ModbusClient, function: int, address: int, count: int, device_id: int) -> list[int]:
    """One read with function code 1–4; bits come back as 0/1. Raises :class:`CommError`."""
    from pymodbus.exceptions import ModbusException  # local: keep profile decoding importable alone

    readers = {
        1: client.read_coils,
        2: client.read_discrete_inputs,
        3: client.read_holding_registers,
        4: client.read_input_registers,
    }
    try:
        response = readers[function](address, count=count, device_id=device_id)
    except ModbusException as exc:
        raise CommError("timeout", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CommError("port", str(exc)) from None
    if response is None or response.isError():
        code = getattr(response, "exception_code", None)
        if code:
            raise CommError("exception_response", f"exception code {code}")
        raise CommError("timeout", str(response))
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
    """A gas-leak detector read through a :class:`DetectorProfile`."""

    def __init__(self, device_id: str, address: int, profile: DetectorProfile) -> None:
        super().__init__(device_id, address)
        self.profile = profile

    def poll(self, client: ModbusClient) -> GasReading:
        p = self.profile
        registers = read_block(client, p.function, p.start, p.count, self.address)
        try:
            return p.decode(registers)
        except (ValueError, KeyError) as exc:
            raise CommError("bad_response", str(exc)) from None


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
