"""Simulated twins of the field: a null-modem cable, an RS-485 line in wire time, Modbus devices and the bus
that serves them, and the demo building built from them.

For the tests, the benchmarks and the demo, from a checkout: a building's install does not carry this package
(pyproject.toml names the wheel's packages exactly, ``gateway`` and ``drivers``; tests/test_lock.py lists the wheel).
Import from the module that owns a name (``from gateway_sim.bus import SimulatedBus``).

* :mod:`gateway_sim.nullmodem` — :class:`VirtualNullModem`, two ptys joined like a cable;
* :mod:`gateway_sim.wireline` — :class:`WireSpec` and :class:`WireLine`, bytes at the baud rate;
* :mod:`gateway_sim.devices` — the slaves' register maps (gas detectors, I/O station, controller);
* :mod:`gateway_sim.bus` — :class:`SimulatedBus`, pymodbus's RTU server serving those slaves;
* :mod:`gateway_sim.demo` — ``scripts/demo``: the example building on a simulated bus and mock pins.
"""
