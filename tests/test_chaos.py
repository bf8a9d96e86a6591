"""Chaos: the whole gateway killed with SIGKILL at random, and its broker too, while detectors alarm and clear.

The real daemon (``gatewayd``, panel and storage/uplink processes) on simulated detectors; mosquitto persisting
with ``autosave_interval 1`` — it acknowledges a QoS 1 PUBLISH before its next snapshot, so a SIGKILL loses what
it acknowledged since (docs/mqtt.md, "What an acknowledgement means"); the reference consumer
(examples/consumer.py) listening throughout. 20 rounds: the daemon starts, detectors raise and clear alarms,
then every process of the daemon is killed at once (kill -9 of the whole service) at a random moment; in about a
third of the rounds mosquitto is SIGKILLed as well, in some of them right after a burst was acknowledged. At the
end every event the gateway stored, of every session, is at the consumer exactly once, and the test prints how
many it healed from the gateway, by kind of gap (head, middle, tail, whole session).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.site import build_site

ROOT = Path(__file__).resolve().parent.parent
CONSUMER = ROOT / "examples" / "consumer.py"
GATEWAYD = str(Path(sys.executable).with_name("gatewayd"))
ROUNDS = 20
SEED = int(os.environ.get("CHAOS_SEED", "28"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


class Lines:
    """A subprocess printing JSON lines (the consumer with ``--json``), collected by a reader thread."""

    def __init__(self, argv: list[str], log: Path) -> None:
        import json

        self._json = json
        self.lines: list[dict[str, Any]] = []
        self._log = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            with contextlib.suppress(ValueError):
                self.lines.append(self._json.loads(line))

    def seen(self, action: str, **fields: Any) -> list[dict[str, Any]]:
        return [x for x in list(self.lines)
                if x.get("action") == action and all(x.get(k) == v for k, v in fields.items())]

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._thread.join(5)
        self._log.close()


class Daemon:
    """``gatewayd --config`` in its own process group (the whole service, as systemd would run it)."""

    def __init__(self, config: Path, log: Path) -> None:
        self._out = log.open("ab")
        self.proc = subprocess.Popen([GATEWAYD, "--config", str(config)],
                                     env={**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=config.parent,
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to every process of the daemon at once, as kill -9 of the service (or a power cut) would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()


def stored(db: Path) -> dict[str, tuple[int, int]]:
    """Every event the gateway stored: event_id → (session, delivered)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        return {r[0]: (int(r[1]), int(r[2])) for r in c.execute("SELECT event_id, session, delivered FROM events")}


def wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(sqlite3.Error):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {timeout:g} s)")
        time.sleep(0.1)


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def test_every_stored_event_of_every_session_reaches_the_consumer_exactly_once_through_chaos(
    tmp_path: Path, modem: VirtualNullModem
) -> None:
    rng = random.Random(SEED)
    broker = MosquittoBroker(tmp_path / "broker", autosave_interval=1).start()
    db = tmp_path / "events.db"
    spec = build_site(bus_port=modem.gateway_port, db_path=db, broker_port=broker.port,
                      socket_path=tmp_path / "control.sock", households=3, community="c1", building="b1")
    config = spec.write(tmp_path / "site.toml")
    contacts = tmp_path / "contacts.toml"
    contacts.write_text('[buildings."c1/b1"]\nhead = { name = "Head", phone = "100" }\n', encoding="utf-8")
    consumer = Lines([sys.executable, str(CONSUMER), "--json", "--all-events", "--backfill", "--host", broker.host,
                      "--port", str(broker.port), "--community", "c1", "--contacts", str(contacts),
                      "--client-id", "chaos-consumer"], tmp_path / "consumer.log")
    bus = SimulatedBus(modem.device_port)
    detectors = [bus.add_gas_detector(d.address, "A", unit="%LEL", decimals=1) for d in spec.detectors]
    for d in detectors:
        d.set_status("normal")
    log = tmp_path / "gatewayd.log"
    broker_rounds = set(rng.sample(range(ROUNDS), ROUNDS // 3 + 1))  # 7 of 20
    burst_rounds = set(rng.sample(sorted(broker_rounds), len(broker_rounds) // 2 + 1))
    broker_kills = burst_kills = 0
    started = time.monotonic()
    daemon: Daemon | None = None
    try:
        wait(lambda: consumer.seen("ready"), 30, "the consumer did not subscribe")
        with bus:
            for round_no in range(ROUNDS):
                daemon = Daemon(config, log)
                session = round_no + 1
                # the panel is up and storing once the session's first event is there
                wait(lambda s=session: any(v[0] == s for v in stored(db).values()), 60,  # type: ignore[misc]
                     f"round {round_no}: the daemon stored nothing")
                for _ in range(rng.randint(1, 4)):
                    detectors[rng.randrange(len(detectors))].set_concentration(rng.choice((0.0, 12.0, 35.0)))
                    time.sleep(rng.uniform(0.05, 0.6))
                if round_no in broker_rounds:
                    # The consumer falls behind (it is stopped) and its broker dies: what the broker had
                    # acknowledged and not yet handed on is gone, and what comes while the consumer is away is
                    # never queued for it (a clean session).
                    consumer.pause()
                    if round_no in burst_rounds:  # right after a burst was acknowledged
                        for d in detectors:
                            d.set_concentration(rng.choice((0.0, 12.0, 35.0)))
                        with contextlib.suppress(AssertionError):  # not connected this round: killed all the same
                            wait(lambda: all(v[1] for v in stored(db).values()), 5, "burst not acknowledged")
                            burst_kills += 1
                    broker.kill()
                    broker_kills += 1
                    broker.start()
                    for _ in range(rng.randint(1, 3)):  # the gateway reconnects and goes on sending
                        detectors[rng.randrange(len(detectors))].set_concentration(rng.choice((0.0, 12.0, 35.0)))
                        time.sleep(rng.uniform(0.3, 1.2))
                    away = rng.random() < 0.4  # and stays away through the next run of the gateway too
                else:
                    time.sleep(rng.uniform(0.0, 1.5))
                    away = False
                daemon.kill()
                daemon = None
                if not away:
                    consumer.resume()
            consumer.resume()
            for d in detectors:
                d.set_concentration(0.0)
            daemon = Daemon(config, log)  # the last run stays up: it sends, and answers the consumer's requests
            wait(lambda: any(v[0] == ROUNDS + 1 for v in stored(db).values()), 60, "the last run stored nothing")
            wait(lambda: set(stored(db)) <= {e["event_id"] for e in consumer.seen("event")}, 150,
                 "the consumer did not get every stored event")
            final = stored(db)
            daemon.kill()
            daemon = None
    finally:
        if daemon is not None:
            daemon.kill()
        consumer.stop()
        broker.stop()
    taken = Counter(e["event_id"] for e in consumer.seen("event"))
    sessions = {v[0] for v in final.values()}
    healed = Counter(r.get("gap") for r in consumer.seen("recovered"))
    print(f"\n{len(final)} events stored in {len(sessions)} sessions ({ROUNDS} kill -9 of the gateway, "
          f"{broker_kills} of mosquitto, {burst_kills} right after an acknowledged burst; seed {SEED}); "
          f"healed from the gateway by kind of gap: {dict(healed)}; "
          f"{len(consumer.seen('range_requested'))} range requests; {time.monotonic() - started:.0f} s")
    assert sessions == set(range(1, ROUNDS + 2)), sessions
    assert set(final) <= set(taken), "every stored event reached the consumer"
    assert set(taken.values()) == {1}, [e for e, n in taken.items() if n > 1][:5]
    alarms = [e for e in consumer.seen("event") if e.get("kind") == "alarm"]
    assert alarms, "no alarm was raised or cleared: the test did not test alarms"
    assert not consumer.seen("unrecoverable"), consumer.seen("unrecoverable")[:3]
