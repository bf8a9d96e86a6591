"""Modem failures end to end: the real panel and its two children, a real mosquitto, a pymodbus detector on a pty,
python-gammu against the simulated modem. Each failure the simulator offers for the modem's health gives the
``modem`` fault and a clear ``doctor`` line, and neither the buzzer's Temporal-4 timeline (to ±10 ms) nor the MQTT
path is disturbed.

The timeline is checked as tests/test_annunciator.py and tests/test_command_fuzz.py check theirs. What made it
fail at 10 ms was the test site's normal priority: the pattern threads waited for a CPU under a neighbour's load,
and changes came 17–59 ms late (3 runs of 6 failed at load 7–38). With them at SCHED_FIFO as deployed
(``realtime_priority``) it passed 15 runs of 15 at load 6–20, 5 of them without one or both of the two other rules
kept from those tests: this module's thread, and so the simulators' threads it starts, at SUPPORT_PRIORITY
(test_annunciator's ``support_priority``: a normal-priority thread preempted while it holds the interpreter lock
keeps the pattern threads waiting), and the test process's objects frozen before the alarm (a full collection of
them takes 75–110 ms).
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import pytest

import tests.test_sms_path
from gateway.ops.cli import ControlClient
from gateway.ops.doctor import Daemon, check_sms
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import TimedMockPin, eventually, read_events, running_gateway, simulated_detectors
from tests.support.modem import SimulatedModem
from tests.support.site import build_site
from tests.support.sms import sms_site
from tests.test_annunciator import TOLERANCE_S, support_priority  # noqa: F401 - module-wide: SCHED_FIFO
from tests.test_command_fuzz import REALTIME_PRIORITY, temporal4_problems
from tests.test_sms import MODEM_FAILURES, break_modem, mend_modem
from tests.test_sms_path import active, modem_ready

bus, modem = tests.test_sms_path.bus, tests.test_sms_path.modem  # the same fixtures
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.mark.solo  # the alarm's Temporal-4 timeline is checked to 10 ms: not beside the other tests' load
async def test_each_modem_failure_is_the_modem_fault_and_a_doctor_line_and_disturbs_neither_buzzer_nor_mqtt(
    tmp_path: Path, bus: VirtualNullModem, modem: SimulatedModem, broker: MosquittoBroker, mock_pins: Any,
) -> None:
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1, realtime_priority=REALTIME_PRIORITY)
    site = sms_site(tmp_path, spec, modem.port, after_s=30.0, check_interval_s=1.0)
    det = spec.detectors[0]

    def modem_events() -> list[dict[str, Any]]:
        return read_events(site.cfg.storage.path, "kind = 'fault' AND json_extract(payload, '$.code') = 'modem'")

    failures = [("missing", "SIM missing"), ("locked", "SIM locked"), ("unregistered", "not registered"),
                ("no_signal", "no signal"), ("unplugged", "no such device"), ("silent", "modem not answering")]
    assert sorted(f for f, _ in failures) == sorted(MODEM_FAILURES)
    phases: list[tuple[float, str]] = []  # when each failure began: where a late change falls
    try:
        with simulated_detectors(bus.device_port, spec.detectors) as (_, sims):
            async with running_gateway(site.cfg) as gateway:
                await eventually(lambda: gateway.uplink_connected, timeout=30)
                await modem_ready(gateway)
                # As tests/test_command_fuzz.py: the test process's objects frozen before the alarm, as the panel
                # freezes its own once it serves (runtime.gc_freeze, off in test sites, which share this process).
                gc.collect()
                gc.freeze()
                sims[det.id].set_concentration(30.0)
                await eventually(lambda: gateway.annunciator.sound_pattern == "temporal-4", timeout=20)
                start = time.monotonic() + 0.5
                reconnects = gateway.supervisor.beat.get("connections")
                for fail, problem in failures:
                    phases.append((round(time.monotonic(), 3), fail))
                    break_modem(modem, fail)
                    await eventually(lambda: active(gateway, "fault:modem"), timeout=60,
                                     message=f"no modem fault for {fail}")
                    daemon = Daemon(str(tmp_path / "control.sock"), ControlClient)
                    try:
                        line = (await asyncio.to_thread(lambda d=daemon: list(check_sms(site.cfg, d))))[-1]
                    finally:
                        daemon.close()
                    assert line.status == "FAIL" and problem in line.detail, (fail, line)
                    mend_modem(modem)
                    await eventually(lambda: not active(gateway, "fault:modem"), timeout=60,
                                     message=f"the modem fault of {fail} did not clear")
                end = time.monotonic()
                problems = temporal4_problems(list(buzzer.changes), start, end, tolerance=TOLERANCE_S)
                assert not problems, (problems, "failures from", phases)
                assert gateway.annunciator.sound_pattern == "temporal-4"
                assert not active(gateway, "fault:transmission")
                assert gateway.uplink_connected and gateway.supervisor.beat.get("connections") == reconnects
                await eventually(lambda: len(modem_events()) == 2 * len(failures)
                                 and all(r["delivered"] for r in modem_events()), timeout=30,
                                 message=lambda: f"modem fault events not all delivered: {modem_events()}")
    finally:
        gc.unfreeze()
