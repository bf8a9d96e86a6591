"""Serial fuzzing: a raw fake device answers the gateway with random, truncated, wrong-CRC, wrong-address,
wrong-function, late and over-long frames, while a healthy detector shares the bus.

The gateway end is the real thing (its RTU client, the detector driver, the bus thread, the alarm panel).
The device end is :class:`tests.support.fuzz.FuzzingDevice` on a virtual null modem; requests for the
healthy address are relayed to pymodbus's own server (a :class:`SimulatedBus`) on a second null modem.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import CommError, GasDetector
from drivers.profiles import BUILTIN_DETECTOR_PROFILES
from drivers.simulated import SimulatedBus, SimulatedGasDetector, VirtualNullModem
from gateway.config import BusConfig, load_config
from gateway.panel.buses import open_client
from tests.support.broker import MosquittoBroker
from tests.support.building import CountingHeartbeats, TimedMockPin, eventually, read_events, running_gateway
from tests.support.fuzz import CATEGORIES, FuzzingDevice
from tests.support.site import build_site

PROFILE_A = BUILTIN_DETECTOR_PROFILES["A"]
HEALTHY = 1  # the healthy detector's address; fuzzed devices follow it in the poll order
HIGH = 30.0
ALARM_BOUND_S = 30.0  # a detector's alarm reaches the collector within 30 s (GB/T 45839 §5.4.1)


@dataclasses.dataclass
class FuzzBench:
    """Gateway port, the fuzzing device's port, and a healthy simulated detector behind the relay."""

    gateway_port: str
    device_port: str
    relay_port: str
    healthy: SimulatedGasDetector


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[FuzzBench]:
    with VirtualNullModem(tmp_path / "line") as line, \
            VirtualNullModem(tmp_path / "relay", gateway_name="ttyRELAY", device_name="ttySIM") as relay:
        sim = SimulatedBus(relay.device_port)
        healthy = sim.add_gas_detector(HEALTHY, "A", unit="%LEL", decimals=1)
        healthy.set_status("normal")
        healthy.set_concentration(3.0)
        with sim:
            yield FuzzBench(line.gateway_port, line.device_port, relay.gateway_port, healthy)


def bus_config(port: str, *, timeout_s: float, poll_interval_s: float = 0.0) -> BusConfig:
    return BusConfig(id="bus1", port=port, baudrate=9600, parity="N", stopbits=1, bytesize=8,
                     timeout_s=timeout_s, poll_interval_s=poll_interval_s)


# ------------------------------------------------------------------------------------------- driver level


def poll_within_tries(detector: GasDetector, client: Any, tries: int = 3) -> Any:
    """A reading within ``tries`` polls: fewer failures in a row than put a device offline (default 3).

    The healthy answer goes through a relay thread and a second simulated bus; on a loaded machine one
    relayed answer may miss the short timeout, which must not be mistaken for the fuzzing reaching it.
    """
    for attempt in range(tries):
        try:
            return detector.poll(client)
        except CommError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("category", CATEGORIES)
def test_every_bad_frame_is_a_comm_error_and_the_healthy_device_reads_through(
    bench: FuzzBench, category: str
) -> None:
    """One category at a time through the real client and driver: every fuzzed poll fails, none passes."""
    fuzzed = [2, 3, 4]
    client = open_client(bus_config(bench.gateway_port, timeout_s=0.05))
    healthy = GasDetector("healthy", HEALTHY, PROFILE_A)
    victims = [GasDetector(f"fuzzed-{a}", a, PROFILE_A) for a in fuzzed]
    reasons: dict[str, int] = {}
    rounds = 20
    with FuzzingDevice(bench.device_port, fuzzed=fuzzed, relay_port=bench.relay_port, relayed=[HEALTHY],
                       seed=CATEGORIES.index(category), categories=[category], late_allowed=fuzzed[:-1]) as device:
        assert client.connect()
        try:
            for _ in range(rounds):
                assert poll_within_tries(healthy, client).value == pytest.approx(3.0)
                for victim in victims:
                    with pytest.raises(CommError) as excinfo:
                        victim.poll(client)
                    reasons[excinfo.value.reason] = reasons.get(excinfo.value.reason, 0) + 1
        finally:
            client.close()
        assert device.alive and not device.errors
        sent = device.sent
    polls = rounds * len(fuzzed)
    assert device.total == polls
    assert sent[category] == (polls - rounds if category == "late" else polls)  # the last may not be late
    assert sum(reasons.values()) == polls
    assert set(reasons) <= {"timeout", "bad_response"}
    if category == "wrong_function":
        assert reasons == {"bad_response": rounds * len(fuzzed)}


# ------------------------------------------------------------------------------------------- daemon level


async def _fuzz_through_the_gateway(
    tmp_path: Path, bench: FuzzBench, broker: MosquittoBroker, mock_pins: Any, *, frames: int,
    fuzzed_count: int = 4, timeout_s: float = 0.03,
) -> dict[str, Any]:
    """Run the gateway on the fuzzed bus until ``frames`` bad answers went out; check the invariants."""
    buzzer = mock_pins.pin("GPIO18", pin_class=TimedMockPin)
    db = tmp_path / "events.db"
    spec = build_site(bus_port=bench.gateway_port, db_path=db, broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1 + fuzzed_count)
    cfg = load_config(spec.write(tmp_path / "site.toml"))
    # Faster than the config allows (≥ 0.05 s timeout, ≥ 0.1 s interval), to reach many frames quickly.
    cfg = dataclasses.replace(cfg, buses=tuple(bus_config(b.port, timeout_s=timeout_s) for b in cfg.buses))
    healthy_id = spec.detectors[0].id
    assert spec.detectors[0].address == HEALTHY
    fuzzed = {d.address: d.id for d in spec.detectors[1:]}
    order = [d.address for d in spec.detectors[1:]]
    heartbeats = CountingHeartbeats()

    def device(device_id: str) -> dict[str, Any]:
        return next(d for d in gateway.panel.snapshot()["devices"] if d["device"] == device_id)

    with FuzzingDevice(bench.device_port, fuzzed=order, relay_port=bench.relay_port, relayed=[HEALTHY],
                       seed=frames, late_allowed=order[:-1]) as fuzzer:
        async with running_gateway(cfg, heartbeats=heartbeats) as gateway:
            poller = gateway.buses["bus1"]
            n = cfg.alarm.offline_after_failures
            await eventually(lambda: all("offline" in device(d)["faults"] for d in fuzzed.values()), timeout=60,
                             message="fuzzed devices not in fault")
            assert all(device(d)["comm_errors"] >= n for d in fuzzed.values())

            await eventually(lambda: fuzzer.total >= frames // 2, timeout=frames, interval=0.2,
                             message=lambda: f"only {fuzzer.total} bad frames sent")
            leak_at = time.monotonic()
            bench.healthy.set_concentration(HIGH)
            await eventually(lambda: device(healthy_id)["state"] == "high_alarm", timeout=ALARM_BOUND_S,
                             message="healthy detector did not alarm in time while the bus was fuzzed")
            alarm_after_s = time.monotonic() - leak_at
            assert buzzer.first_high(after=leak_at) is not None

            await eventually(lambda: fuzzer.total >= frames, timeout=frames, interval=0.2,
                             message=lambda: f"only {fuzzer.total} bad frames sent")
            # Quiesce: pause, then two cycle ends: the cycle in progress, and one with no polls.
            poller.pause(True)
            beats = heartbeats.count("bus:bus1")
            await eventually(lambda: heartbeats.count("bus:bus1") >= beats + 2, timeout=30)

            assert poller.thread.is_alive()
            assert fuzzer.alive and not fuzzer.errors
            assert gateway.heartbeats.stale() == []
            for address, device_id in fuzzed.items():
                state = device(device_id)
                assert state["comm_errors"] == fuzzer.answered(address), device_id
                assert "offline" in state["faults"]
                assert state["value"] is None  # no garbage was ever taken for a reading
            healthy = device(healthy_id)
            assert "offline" not in healthy["faults"]
            total_errors = sum(device(d)["comm_errors"] for d in [healthy_id, *fuzzed.values()])
            assert poller.errors == total_errors
            assert total_errors >= frames

            await eventually(lambda: read_events(db, "kind = 'alarm' AND device = ?", [healthy_id]),
                             message="healthy alarm not stored")
            offline = read_events(db, "kind = 'fault' AND json_extract(payload, '$.code') = 'offline'")
            raised = sorted(r["device"] for r in offline if r["action"] == "raised")
            assert raised == sorted(fuzzed.values())  # each fuzzed device faulted once, never flapped
            assert [r for r in offline if r["action"] == "cleared"] == []
            assert read_events(db, "kind IN ('alarm', 'telemetry') AND device != ?", [healthy_id]) == []
            return {"frames": fuzzer.total, "by_category": dict(fuzzer.sent), "errors": total_errors,
                    "healthy_errors": healthy["comm_errors"], "alarm_after_s": alarm_after_s}


@pytest.mark.timeout(300)
async def test_fuzzed_bus_through_the_gateway_quick(
    tmp_path: Path, bench: FuzzBench, broker: MosquittoBroker, mock_pins: Any
) -> None:
    result = await _fuzz_through_the_gateway(tmp_path, bench, broker, mock_pins, frames=400)
    assert result["frames"] >= 400
    assert set(result["by_category"]) == set(CATEGORIES)


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_ten_thousand_bad_frames_through_the_gateway(
    tmp_path: Path, bench: FuzzBench, broker: MosquittoBroker, mock_pins: Any
) -> None:
    started = time.monotonic()
    result = await _fuzz_through_the_gateway(tmp_path, bench, broker, mock_pins, frames=10_000)
    assert result["frames"] >= 10_000
    print(f"fuzz: {result} in {time.monotonic() - started:.0f} s")
