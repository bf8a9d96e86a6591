"""gatewayd under service supervision: sd_notify on a real AF_UNIX datagram socket, JSON logs for journald."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.site import build_site


@pytest.mark.slow  # waits out a watchdog period
def test_ready_watchdog_stale_bus_and_stopping(tmp_path: Path, broker: MosquittoBroker, listener) -> None:
    hang = tmp_path / "hang-bus1"
    with VirtualNullModem(tmp_path) as modem:
        bus = SimulatedBus(modem.device_port)
        bus.add_gas_detector(1, "A").set_status("normal")
        with bus:
            site = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=broker.port,
                              socket_path=tmp_path / "control.sock")
            config = site.write(tmp_path / "site.toml")
            config.write_text(config.read_text().replace("gc_freeze = false", "gc_freeze = true"))  # as deployed
            env = dict(os.environ, NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="1000000",
                       GPIOZERO_PIN_FACTORY="mock", GATEWAY_FAILPOINTS=f"bus_hang=bus1@{hang}")
            env.pop("WATCHDOG_PID", None)
            proc = subprocess.Popen([sys.executable, "-m", "gateway.daemon", "--config", str(config)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                listener.expect_stale_part("bus:bus1", hang)
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert listener.index_of("STOPPING") is not None
    # journald: one JSON object per line with level and event, so `journalctl -o cat | jq` works
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert records, "no log output"
    assert all("level" in r and "event" in r and "timestamp" in r for r in records)
    assert any(r["event"] == "panel started" for r in records)
    # runtime.gc_freeze (on by default): the storage process freezes its start-up objects once it is up; the panel
    # has no such setting of its own (it freezes what it loaded before it forks its first children,
    # docs/performance.md, "Memory")
    assert any(r["event"] == "panel serving" and "gc_frozen" not in r for r in records), [
        (r["event"], r.get("gc_frozen")) for r in records]
    assert any(r["event"] == "storage process started" and r["process"] == "uplink" and r["gc_frozen"] > 10_000
               and r["heap_trimmed"] is True for r in records)
    # each process hands the heap its start-up freed back to the OS (gateway/heap.py: 6 MB of PSS in all)
    assert any(r["event"] == "panel serving" and r.get("heap_trimmed") is True for r in records), [
        (r["event"], r.get("heap_trimmed")) for r in records]
