"""Simulated twins of the field: a null-modem cable, an RS-485 line in wire time, Modbus devices and the bus
that serves them, and the demo building built from them.

For the tests, the benchmarks and the demo, from a checkout: a building's install does not carry this package
(pyproject.toml includes ``gateway*`` and ``drivers*`` only, and ``gateway_sim`` is excluded by name).

* :mod:`gateway_sim.nullmodem` — :class:`VirtualNullModem`, two ptys joined like a cable;
* :mod:`gateway_sim.wireline` — :class:`WireSpec` and :class:`WireLine`, bytes at the baud rate;
* :mod:`gateway_sim.devices` — the slaves' register maps (gas detectors, I/O station, controller);
* :mod:`gateway_sim.bus` — :class:`SimulatedBus`, pymodbus's RTU server serving those slaves;
* :mod:`gateway_sim.demo` — ``scripts/demo``: the example building on a simulated bus and mock pins.
"""

from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import (
    CONTROLLER_STATUS_CODES,
    GAS_CODES,
    PROFILE_A_STATUS_CODES,
    PROFILE_B_ALARM_BITS,
    UNIT_CODES,
    SimulatedController,
    SimulatedGasDetector,
    SimulatedIOStation,
)
from gateway_sim.nullmodem import VirtualNullModem
from gateway_sim.wireline import WireFrame, WireLine, WireSpec

__all__ = [
    "CONTROLLER_STATUS_CODES",
    "GAS_CODES",
    "PROFILE_A_STATUS_CODES",
    "PROFILE_B_ALARM_BITS",
    "UNIT_CODES",
    "SimulatedBus",
    "SimulatedController",
    "SimulatedGasDetector",
    "SimulatedIOStation",
    "VirtualNullModem",
    "WireFrame",
    "WireLine",
    "WireSpec",
]
