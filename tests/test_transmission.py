"""Transmission supervision (gateway/panel/transmission.py): the rule, and the fault end to end.

- The pure rule: an urgent event without its PUBACK past ``ack_deadline_s``, or the path down past
  ``path_down_s``, is the ``transmission`` fault; it clears once the path is up and nothing waits too long.
- End to end with a real mosquitto killed under a gas alarm: the fault, its fault LED and its trouble chirp
  come within ``ack_deadline_s`` + 2 s of the alarm; when the broker returns, the alarm reaches it and the
  fault clears by itself. A killed storage/uplink process is a path that is down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.annunciation import Sound
from gateway.config import ConfigError, TransmissionConfig, load_config, parse_config
from gateway.events import Event, delivery_key, event_delivery_key
from gateway.panel.process import PanelProcess
from gateway.panel.transmission import TransmissionWatch
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, read_events, running_gateway, simulated_detectors
from tests.support.site import build_site

# ------------------------------------------------------------------------------------------ the rule


def watch(ack: float = 20.0, down: float = 90.0) -> TransmissionWatch:
    return TransmissionWatch(TransmissionConfig(ack_deadline_s=ack, path_down_s=down), now=0.0)


def test_an_urgent_event_past_its_deadline_is_the_fault_until_it_is_acknowledged() -> None:
    w = watch()
    w.path(True, 0.0)
    w.made("alarm-1", "alarm", 10.0)
    assert w.fault(30.0) is None  # exactly the deadline: not yet
    detail = w.fault(30.1)
    assert detail is not None and "alarm event without PUBACK for 20 s" in detail
    assert w.delivered(["alarm-1", "unknown"]) == 1
    assert w.fault(30.2) is None


def test_the_oldest_waiting_event_decides_and_a_later_one_does_not_hide_it() -> None:
    w = watch(ack=5.0)
    w.path(True, 0.0)
    w.made("a", "fault", 1.0)
    w.made("b", "alarm", 4.0)
    assert w.fault(6.5) is not None
    w.delivered(["a"])
    assert w.fault(6.5) is None  # b has waited 2.5 s
    assert w.fault(9.5) is not None


def test_a_path_down_past_its_limit_is_the_fault_with_nothing_waiting_and_clears_when_up() -> None:
    w = watch(down=90.0)
    w.path(True, 0.0)
    w.path(False, 100.0, "broker unreachable (connection refused)")
    w.path(False, 150.0, "broker unreachable (timed out)")  # still the same outage
    assert w.fault(190.0) is None
    detail = w.fault(190.5)
    assert detail is not None and detail.startswith("broker unreachable (timed out) for 90 s")
    w.path(True, 191.0)
    assert w.fault(191.0) is None


def test_a_path_never_seen_up_counts_as_down_from_the_start() -> None:
    w = watch(down=90.0)
    assert w.fault(89.0) is None
    assert w.fault(91.0) is not None


def test_the_bound_keeps_the_oldest_events() -> None:
    w = TransmissionWatch(TransmissionConfig(ack_deadline_s=5.0), now=0.0, limit=3)
    w.path(True, 0.0)
    for n in range(5):
        w.made(f"k{n}", "alarm", float(n))
    assert w.untracked == 2
    assert w.oldest() == ("alarm", 0.0)


def test_the_delivery_key_is_the_same_from_the_event_and_from_its_stored_fields() -> None:
    event = Event("alarm", "raised", 1234.567890123, device="gas-1", level="high", code=None, wall=1.0)
    assert event_delivery_key(event) == delivery_key("alarm", "raised", "gas-1", None, 1234.567890123)
    other = Event("alarm", "raised", 1234.567890124, device="gas-1")
    assert event_delivery_key(other) != event_delivery_key(event)


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("ack_deadline_s = 101", "transmission.ack_deadline_s", "must be ≤ 100"),
    ("ack_deadline_s = 0", "transmission.ack_deadline_s", "must be ≥ 1"),
    ("path_down = 3", "transmission.path_down", "unknown key"),
])
def test_bad_transmission_settings_name_the_key(text: str, key: str, reason: str) -> None:
    site = tomllib.loads(build_site(bus_port="/dev/null-bus", db_path="/tmp/x.db", broker_port=1883,
                                    socket_path="/tmp/x.sock").toml)
    with pytest.raises(ConfigError) as err:
        parse_config({**site, "transmission": tomllib.loads(text)})
    assert err.value.path == key
    assert reason in err.value.reason


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def transmission_active(gateway: PanelProcess) -> bool:
    return any(c["what"] == "fault:transmission" for c in gateway.panel.snapshot()["active"])


def write_site(tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, extra: str) -> Any:
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=1)
    path = tmp_path / "site.toml"
    path.write_text(spec.toml + "\n" + extra + "\n", encoding="utf-8")
    return spec, load_config(path)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_broker_killed_under_an_alarm_gives_the_fault_in_time_and_it_clears_when_the_broker_returns(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
) -> None:
    deadline_s = 5.0
    spec, cfg = write_site(tmp_path, modem, broker, f"[transmission]\nack_deadline_s = {deadline_s}\n")
    detector = spec.detectors[0]
    with simulated_detectors(modem.device_port, spec.detectors) as (_, sims):
        async with running_gateway(cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30, message="uplink connected")
            await eventually(lambda: not transmission_active(gateway), timeout=10)
            await eventually(lambda: gateway.transmission.figures()["path"] == "up", timeout=5)
            broker.kill()
            await eventually(lambda: not gateway.uplink_connected, timeout=30, message="uplink saw the broker go")
            sims[detector.id].set_concentration(30.0)
            alarm = await eventually(lambda: next((r for r in read_events(cfg.storage.path, "kind = 'alarm'")), None),
                                     timeout=20, message="alarm stored")
            raised_at = float(alarm["mono"])
            gateway.panel.silence("test")  # the gas sound is muted: the fault raised later chirps
            await eventually(lambda: transmission_active(gateway), timeout=deadline_s + 10,
                             message="transmission fault")
            shown_at = time.monotonic()
            assert shown_at - raised_at <= deadline_s + 2.0, f"fault {shown_at - raised_at:.1f} s after the alarm"
            snap = gateway.panel.snapshot()
            assert snap["annunciation"].sound is Sound.TROUBLE
            assert "fault" in snap["annunciation"].leds
            assert gateway.annunciator.sound_pattern == "trouble"
            status = await gateway.commands.status()
            assert status["transmission"]["fault"] is not None and status["transmission"]["path"] == "down"
            assert any(c["what"] == "fault:transmission" for c in status["active"])

            broker.start()
            await eventually(lambda: not transmission_active(gateway), timeout=40, message="fault cleared")

            def fault_rows() -> list[dict[str, Any]] | None:  # the clear is stored after the panel shows it
                rows = read_events(cfg.storage.path,
                                   "kind = 'fault' AND json_extract(payload, '$.code') = 'transmission'")
                return rows if len(rows) >= 2 else None

            rows = await eventually(fault_rows, timeout=20, message="the fault's clear stored")
            assert [r["action"] for r in rows] == ["raised", "cleared"], rows
            assert read_events(cfg.storage.path, f"seq = {alarm['seq']} AND delivered = 1"), "alarm not delivered"


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_killed_uplink_process_is_a_path_down(
    tmp_path: Path, modem: VirtualNullModem, broker: MosquittoBroker, mock_pins: Any,
) -> None:
    spec, cfg = write_site(tmp_path, modem, broker, "[transmission]\npath_down_s = 1\n")
    with simulated_detectors(modem.device_port, spec.detectors):
        async with running_gateway(cfg) as gateway:
            await eventually(lambda: gateway.uplink_connected, timeout=30, message="uplink connected")
            await eventually(lambda: not transmission_active(gateway), timeout=10)
            pid = gateway.uplink_pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # hung: the panel kills and restarts it after 15 s of silence
            try:
                await eventually(lambda: transmission_active(gateway), timeout=30,
                                 message="no fault while the uplink process is hung")
            finally:
                os.kill(pid, signal.SIGCONT)
            detail = gateway.transmission.present
            assert detail is not None
            await eventually(lambda: not transmission_active(gateway), timeout=60,
                             message="fault not cleared after the uplink process came back")
            # kill -9, and again each process the panel starts instead, until the fault shows: a restart that
            # connects within path_down_s is rightly no fault, so the process is kept from ever coming back.
            killed: set[int] = set()

            def kill_each_uplink() -> bool:
                pid = gateway.uplink_pid
                if pid is not None and pid not in killed:
                    killed.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return transmission_active(gateway)

            await eventually(kill_each_uplink, timeout=20, message="no fault while the uplink process is dead")
            assert gateway.transmission.present is not None and "uplink process" in gateway.transmission.present
            # The path is down from the kill on, whatever the new process says meanwhile (starting, not connected).
            assert gateway.transmission.present is not None
            await eventually(lambda: not transmission_active(gateway), timeout=60)
