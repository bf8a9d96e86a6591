"""The first children forked at start-up (gateway/panel/children.py): ``gatewayd`` forks its first storage/uplink
process from itself, before any thread, port or pin; every later start is a new interpreter.

Shown with the real daemon on simulated detectors and a private mosquitto:

- the first storage process is the panel's fork (its command line, named ``gateway-storage``) and forwards a gas
  alarm to the broker;
- kill -9 of it: the next one is ``python -m gateway.uplink.process``, and a second alarm reaches the broker;
- a planned stop ends with exit status 0 and leaves none of the service's processes behind;
- with ``[sms]``, the SMS process is forked the same way (``gateway-sms``) and talks to its (simulated) modem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gateway.panel.children import process_name
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import simulated_detectors
from tests.support.modem import SimulatedModem
from tests.support.mqtt import MqttRecorder
from tests.support.site import build_site
from tests.support.sms import sms_site
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _comm(p: psutil.Process) -> str:
    return process_name(p.pid)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _storage(pid: int, exclude: int | None = None) -> psutil.Process | None:
    """The daemon's storage process, forked (by its name) or started as a new interpreter (by its command)."""
    for p in _tree(pid):
        try:
            started = "gateway.uplink.process" in p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if p.pid != exclude and (_comm(p) == "gateway-storage" or started) and p.status() != psutil.STATUS_ZOMBIE:
            return p
    return None


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    recorder: MqttRecorder
    sims: dict[str, SimulatedGasDetector]
    detectors: list[str]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def alarm(self, detector: str) -> None:
        """Raise a gas alarm on ``detector`` and wait for it at the broker."""
        self.sims[detector].set_concentration(30.0)
        got = self.recorder.wait_for(lambda m: m.json.get("kind") == "alarm" and m.json.get("action") == "raised"
                                     and m.json.get("device") == detector, timeout=60)
        assert got.json["event_id"]


@pytest.fixture
def service(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Service]:
    with VirtualNullModem(tmp_path / "dev") as modem:
        spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                          socket_path=tmp_path / "control.sock", households=2, poll_interval_s=0.1, timeout_s=0.2)
        config = spec.write(tmp_path / "site.toml")
        recorder = MqttRecorder("127.0.0.1", broker.port, f"{spec.topic_base}/event/#")
        log = tmp_path / "gatewayd.log"
        with simulated_detectors(modem.device_port, spec.detectors) as (_, sims), open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PYTHONPATH=str(ROOT)))
            left = []
            try:
                yield Service(proc, recorder, sims, [d.id for d in spec.detectors], log)
            finally:
                recorder.close()
                left = _tree(proc.pid)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
                for p in left:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()


def test_the_first_storage_process_is_forked_and_the_next_one_a_new_interpreter(service: Service) -> None:
    pid = service.proc.pid
    first = wait_until(lambda: _storage(pid), timeout=30, message=service.tail)
    assert _comm(first) == "gateway-storage" and first.ppid() == pid
    assert first.cmdline() == psutil.Process(pid).cmdline()  # a fork, not a new interpreter
    service.alarm(service.detectors[0])  # forwarded by the forked child

    first.kill()  # kill -9: the panel starts the next one as a new interpreter
    second = wait_until(lambda: (p := _storage(pid, exclude=first.pid)) and "gateway.uplink.process" in p.cmdline()
                        and p, timeout=60, message=service.tail)
    assert second.ppid() == pid
    assert service.proc.poll() is None
    service.alarm(service.detectors[1])  # forwarded by the new interpreter

    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=60) == 0, service.tail()
    wait_until(lambda: not _alive(second.pid), timeout=30, message="the storage process outlived the panel")


def test_a_planned_stop_ends_the_forked_child(service: Service) -> None:
    pid = service.proc.pid
    storage = wait_until(lambda: _storage(pid), timeout=30, message=service.tail)
    assert _comm(storage) == "gateway-storage"
    service.alarm(service.detectors[0])
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=60) == 0, service.tail()
    wait_until(lambda: not _alive(storage.pid), timeout=30, message="the forked child outlived the panel")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_sms_process_is_forked_too_and_talks_to_its_modem(tmp_path: Path, broker: MosquittoBroker) -> None:
    with VirtualNullModem(tmp_path / "dev") as bus, SimulatedModem(tmp_path / "modem") as modem:
        spec = build_site(bus_port=bus.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                          socket_path=tmp_path / "control.sock", households=1)
        site = sms_site(tmp_path, spec, modem.port)
        log = tmp_path / "gatewayd.log"
        with simulated_detectors(bus.device_port, spec.detectors), open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(site.cfg.source)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PYTHONPATH=str(ROOT)))
            try:
                sms = wait_until(lambda: next((p for p in _tree(proc.pid) if _comm(p) == "gateway-sms"), None),
                                 timeout=30, message=lambda: log.read_text(errors="replace")[-3000:])
                assert sms.ppid() == proc.pid and sms.cmdline() == psutil.Process(proc.pid).cmdline()
                wait_until(lambda: any(c.startswith("AT+CSQ") for c in modem.commands), timeout=60,
                           message="the forked SMS process never asked the modem")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
                wait_until(lambda: not _alive(sms.pid), timeout=30, message="the SMS process outlived the panel")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
