"""The GIL hand-off (gateway.handoff): SIGIO on a bus port parks the main thread for the waiting bus thread.

Real pseudo-terminals and real signals; the main thread is pytest's. No timing assertions: each test waits
on the hand-off's own counters.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import handoff
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """(device end, gateway end) of a raw pty, the gateway end watched; parks wait until released."""
    assert handoff.install()
    monkeypatch.setattr(handoff, "PARK_S", 30.0)  # a park ends only by release(): no timing involved
    device, gateway = os.openpty()
    tty.setraw(gateway)
    assert handoff.watch(gateway)
    try:
        yield device, gateway
    finally:
        handoff.forget(gateway)
        handoff.release()
        handoff.disable()  # ports opened by later tests are left alone, as with the default config
        os.close(gateway)
        os.close(device)


def count(name: str) -> int:
    return handoff.stats()[name]


def arm_from_a_bus_thread(fd: int) -> None:
    """Mark ``fd`` as waited on by another thread (the main thread never parks for its own port)."""
    thread = threading.Thread(target=handoff.arm, args=(fd,))
    thread.start()
    thread.join(10)


def signalled_after(before: int) -> None:
    """Wait (sleeping, so the main thread takes its signals) until a SIGIO beyond ``before`` was handled."""
    wait_until(lambda: count("signals") > before, timeout=10, message="no SIGIO reached the main thread")


def test_a_port_is_signal_driven_only_once_the_handler_is_installed() -> None:
    """SIGIO's default action ends the process: before install() no port may be made O_ASYNC; after
    disable() new ports are not made O_ASYNC either."""
    script = textwrap.dedent("""
        import fcntl, os, threading
        from gateway import handoff
        device, gateway = os.openpty()
        before = handoff.watch(gateway), bool(fcntl.fcntl(gateway, fcntl.F_GETFL) & os.O_ASYNC)
        off_main = []
        t = threading.Thread(target=lambda: off_main.append(handoff.install()))
        t.start(); t.join()
        installed = handoff.install()
        after = handoff.watch(gateway), bool(fcntl.fcntl(gateway, fcntl.F_GETFL) & os.O_ASYNC)
        os.write(device, b"x")  # the signal arrives and is handled: the process lives on
        handoff.disable()  # runtime.gil_handoff = false: ports opened from now on are left alone
        device2, gateway2 = os.openpty()
        disabled = handoff.watch(gateway2), bool(fcntl.fcntl(gateway2, fcntl.F_GETFL) & os.O_ASYNC)
        print(before, off_main, installed, after, disabled, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "(False, False) [False] True (True, True) (False, False)"


def test_bytes_for_a_waiting_bus_thread_park_the_main_thread_until_it_is_done(port: tuple[int, int]) -> None:
    device, gateway = port
    seen_parked = threading.Event()

    def bus_thread() -> None:
        wait_until(lambda: count("parks") > parks, timeout=10, message="the main thread did not park")
        seen_parked.set()  # this thread ran while the main thread was inside the handler
        handoff.disarm(gateway)
        handoff.release()

    parks, timeouts, signals = count("parks"), count("park_timeouts"), count("signals")
    arm_from_a_bus_thread(gateway)  # a bus thread is blocked waiting for this port
    helper = threading.Thread(target=bus_thread)
    helper.start()
    os.write(device, b"\x01\x03")
    signalled_after(signals)
    helper.join(10)
    assert seen_parked.is_set()
    assert count("parks") == parks + 1
    assert count("park_timeouts") == timeouts


def test_bytes_nobody_waits_for_do_not_park(port: tuple[int, int]) -> None:
    device, gateway = port
    parks, signals = count("parks"), count("signals")
    os.write(device, b"\x01")  # watched but not armed: the bus thread is busy elsewhere
    signalled_after(signals)
    handoff.arm(gateway)
    handoff.disarm(gateway)
    os.read(gateway, 16)
    assert count("parks") == parks


def test_a_port_the_main_thread_itself_waits_on_does_not_park_it(port: tuple[int, int]) -> None:
    """It would wait for itself (a tool polling a bus from the main thread)."""
    device, gateway = port
    parks, signals = count("parks"), count("signals")
    handoff.arm(gateway)  # from the main thread
    os.write(device, b"\x01")
    signalled_after(signals)
    handoff.disarm(gateway)
    assert count("parks") == parks


def test_a_signal_that_finds_the_loop_idle_does_not_park_it(port: tuple[int, int]) -> None:
    """An idle loop waits in its selector with the GIL released: parking it would gain nothing."""
    device, gateway = port
    idle, parks = count("idle"), count("parks")

    def bus_thread() -> None:
        for _ in range(200):  # a signal may land while the loop runs a callback; one idle one is enough
            if count("idle") > idle:
                break
            handoff.arm(gateway)
            seen = count("signals")
            os.write(device, b"\x01")
            wait_until(lambda seen=seen: count("signals") > seen, timeout=10, message="no SIGIO reached the loop")
            handoff.disarm(gateway)
            handoff.release()  # ends a park, if the signal landed outside the selector
            os.read(gateway, 64)

    async def main() -> None:
        await asyncio.to_thread(bus_thread)  # the loop meanwhile waits in its selector

    asyncio.run(main())
    assert count("idle") > idle
    assert count("parks") - parks < 200


def test_no_park_while_the_main_thread_holds_an_alarm_path_lock(port: tuple[int, int]) -> None:
    """The bus thread would wait for that lock, and the main thread for the bus thread."""
    device, gateway = port
    parks, ignored, signals = count("parks"), count("ignored"), count("signals")
    arm_from_a_bus_thread(gateway)
    with handoff.holding():
        os.write(device, b"\x01")
        signalled_after(signals)
    handoff.disarm(gateway)
    assert count("parks") == parks
    assert count("ignored") == ignored + 1


def test_a_signal_while_parked_is_ignored_not_nested(port: tuple[int, int]) -> None:
    """A nested handler would take the lock of the event the outer one waits on (a deadlock seen once)."""
    device, gateway = port
    outcome: list[str] = []

    def bus_thread() -> None:
        wait_until(lambda: count("parks") > parks, timeout=10, message="the main thread did not park")
        seen = count("signals")
        os.write(device, b"\x02")  # more bytes: another SIGIO while the main thread is parked
        wait_until(lambda: count("signals") > seen, timeout=10, message="the second signal was not handled")
        outcome.append("nested signal handled")
        handoff.disarm(gateway)
        handoff.release()

    parks, ignored, signals = count("parks"), count("ignored"), count("signals")
    arm_from_a_bus_thread(gateway)
    helper = threading.Thread(target=bus_thread)
    helper.start()
    os.write(device, b"\x01")
    signalled_after(signals)
    helper.join(10)
    assert outcome == ["nested signal handled"]
    assert count("parks") == parks + 1
    assert count("ignored") == ignored + 1


def test_the_panel_marks_its_lock_for_the_hand_off() -> None:
    """The alarm panel's lock is an alarm-path lock: taken on the main thread, it blocks parking."""
    from gateway.panel.alarm_panel import AlarmPanel
    from gateway.panel.annunciator import Annunciator
    from gateway.panel.core import AlarmCore

    inside: list[int] = []

    class Core(AlarmCore):
        def device_ids(self) -> Any:
            inside.append(handoff._main_holds)
            return []

    class Quiet(Annunciator):
        def __init__(self) -> None:
            pass

    panel = AlarmPanel(Core(()), Quiet(), lambda event: None)
    panel.snapshot()
    assert inside == [1]
    assert handoff._main_holds == 0


def test_a_busy_main_thread_parks_for_a_real_bus_answer(tmp_path: Path) -> None:
    """The whole path: pymodbus's server answers on a pty, the gateway's bus client waits in select on a
    bus thread, and the main thread spinning in Python gives way when the answer arrives."""
    from drivers.modbus import GasDetector
    from drivers.profiles import PROFILE_A
    from drivers.simulated import SimulatedBus, VirtualNullModem
    from gateway.config import BusConfig
    from gateway.panel.buses import open_client

    assert handoff.install()
    with VirtualNullModem(tmp_path / "line") as modem:
        sim = SimulatedBus(modem.device_port)
        sim.add_gas_detector(1, "A", unit="%LEL", decimals=1).set_concentration(5.0)
        with sim:
            client = open_client(BusConfig("bus1", modem.gateway_port, 9600, "N", 1, 8, 1.0, 0.0))
            assert client.connect()
            assert fcntl.fcntl(client.socket.fileno(), fcntl.F_GETFL) & os.O_ASYNC
            detector = GasDetector("gas-1", 1, PROFILE_A)
            readings: list[float] = []
            stop = threading.Event()

            def bus_thread() -> None:
                while not stop.is_set():
                    try:
                        readings.append(detector.poll(client).value)
                    finally:
                        handoff.release()

            parks = count("parks")
            poller = threading.Thread(target=bus_thread)
            poller.start()
            try:
                deadline = time.monotonic() + 30
                while count("parks") == parks and time.monotonic() < deadline:
                    pass  # pure Python on the main thread, like a blocked loop
            finally:
                stop.set()
                poller.join(10)
                client.close()
                handoff.disable()
    assert count("parks") > parks, "the main thread never gave way to the bus thread"
    assert readings and all(value == pytest.approx(5.0) for value in readings)
