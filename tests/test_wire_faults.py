"""Fault timing on a bus that honours the baud rate: 64 profile-A detectors at 9600 8N1, 10 ms turnaround.

A cycle of that bus takes about 2.7 s (docs/performance.md, "Wire speed"), not the few hundred milliseconds
of a pseudo-terminal; the fault rules must hold on it all the same:

* a detector that goes silent is declared offline after at most ``offline_after_failures`` (3) polls, and
  well inside the 100 s ceiling (GB/T 45839 §5.5.1), while the other 63 keep being read;
* the config check still refuses a bus whose cycle, with every device timing out, would exceed 30 s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from gateway_sim.wireline import WireSpec
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway
from tests.support.site import build_site

pytestmark = pytest.mark.timeout(300)

DETECTORS = 64
#: GB/T 45839 §5.5.1: a detector that stops answering is reported within 100 s.
CEILING_S = 100.0


def _state(panel: Any, device: str) -> dict[str, Any]:
    return next(d for d in panel.panel.snapshot()["devices"] if d["device"] == device)


@pytest.mark.slow
async def test_a_silent_detector_on_a_64_device_9600_baud_bus_is_offline_within_3_polls(
    tmp_path: Path, broker: MosquittoBroker, mock_pins: Any
) -> None:
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                          socket_path=tmp_path / "control.sock", households=DETECTORS, units=4,
                          poll_interval_s=1.0, timeout_s=0.2)
        cfg = load_config(spec.write(tmp_path / "site.toml"))
        assert cfg.buses[0].baudrate == 9600 and cfg.alarm.offline_after_failures == 3
        bus = SimulatedBus(modem.device_port, wire=WireSpec(baud=9600, turnaround_s=0.010))
        for detector in spec.detectors:
            bus.add_gas_detector(detector.address, "A", unit="%LEL", decimals=1).set_status("normal")
        silent = spec.detectors[DETECTORS // 2]
        with bus:
            async with running_gateway(cfg) as panel:
                poller = panel.buses["bus1"]
                await eventually(lambda: all(_state(panel, d.id)["state"] == "normal" for d in spec.detectors),
                                 timeout=120, message="not every detector answered")
                await eventually(lambda: poller.cycle_s is not None, timeout=60)
                cycle_s = poller.cycle_s
                assert cycle_s is not None and cycle_s >= poller.floor_s * 0.99  # it really is a slow wire
                bus.responding(silent.address, False)
                went_silent = time.monotonic()
                row = await eventually(lambda: "offline" in _state(panel, silent.id)["faults"]
                                       and _state(panel, silent.id), timeout=120,
                                       message="the silent detector was never declared offline")
                declared_after = time.monotonic() - went_silent
                assert declared_after <= CEILING_S, (f"offline declared {declared_after:.1f} s after the detector "
                                                     f"went silent: over the {CEILING_S:.0f} s ceiling")
                # every poll that got no answer counts; offline comes at the third
                assert row["failures"] <= cfg.alarm.offline_after_failures, row
                others = [d for d in spec.detectors if d.id != silent.id]
                assert not any(_state(panel, d.id)["faults"] for d in others), "a healthy detector faulted"
    print(f"cycle {cycle_s:.2f} s (floor {poller.floor_s:.2f} s); offline declared {declared_after:.1f} s "
          f"after the detector went silent (ceiling {CEILING_S:.0f} s)")


def test_the_worst_case_cycle_rule_still_refuses_a_bus_whose_timeouts_exceed_30_s(tmp_path: Path) -> None:
    """64 silent devices × 0.5 s timeout = 32 s of timeouts a cycle: an alarm could wait longer than 30 s."""
    spec = build_site(bus_port=tmp_path / "tty", db_path=tmp_path / "events.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock", households=DETECTORS, units=4, timeout_s=0.5)
    with pytest.raises(ConfigError, match="30"):
        load_config(spec.write(tmp_path / "site.toml"))
    fits = build_site(bus_port=tmp_path / "tty", db_path=tmp_path / "events.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock", households=DETECTORS, units=4, timeout_s=0.4)
    assert load_config(fits.write(tmp_path / "fits.toml")).buses[0].timeout_s == 0.4
