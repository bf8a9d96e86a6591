"""Fleet simulator: many buildings' storage and uplink halves, with the gateway's own code, on one machine.

Each simulated gateway is what ``gateway.uplink.process`` runs on a real one, minus the panel: an
:class:`~gateway.uplink.outbox.Outbox` (its own SQLite file), an :class:`~gateway.uplink.writer.EventWriter`,
an :class:`~gateway.uplink.mqtt.Uplink` (its own paho client and socket, QoS 1, a row leaves only on its PUBACK)
and a :class:`~gateway.uplink.contract.CommandService` that answers ``events`` from the outbox, so a central
inbox can heal a seq gap. Events are made here (telemetry, alarm bursts) with ``Event.wall`` as their detection
time; status messages go out as on a gateway. Many gateways share one asyncio loop; several worker processes
share the fleet::

    python -m fleet.simulator --gateways 1000 --processes 4 --brokers 127.0.0.1:1883 \\
        --community fleet --workdir /tmp/fleet --go-file /tmp/fleet/go

Every process prints JSON lines: ``ready`` once its gateways are connected, ``drained`` once every stored
event has its PUBACK after the schedule, ``stopped`` (with peak RSS and CPU seconds) at the end. The schedule
starts at the epoch written in the go-file; the process keeps answering commands after ``drained`` until
SIGTERM. The outbox files stay in ``--workdir`` for whoever counts what was stored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway import __version__, link
from gateway.config import MqttConfig
from gateway.events import Event
from gateway.logs import configure_logging
from gateway.uplink.contract import (
    CommandGate,
    CommandService,
    StatusReporter,
    UplinkFigures,
    birth_message,
)
from gateway.uplink.mqtt import Uplink
from gateway.uplink.outbox import Outbox, StorageLimits
from gateway.uplink.process import CommandOutcome
from gateway.uplink.topics import Topics
from gateway.uplink.writer import EventWriter

__all__ = ["FleetPlan", "SimulatedGateway", "building_name", "gateway_id", "main"]

log = structlog.get_logger()

#: Threads aiosqlite starts (one per outbox) need far less than the default 8 MiB stack.
THREAD_STACK_BYTES = 512 * 1024
#: Longest range one ``events`` command returns over MQTT (docs/mqtt.md).
EVENTS_LIMIT_MAX = 200
UNITS = ("u1", "u2")
HOUSEHOLDS = tuple(f"{u}-{floor}0{n}" for u in UNITS for floor in (1, 2, 3) for n in (1, 2))
TICK_S = 0.05


def building_name(index: int) -> str:
    """The building id of simulated gateway ``index`` (``b0001`` …)."""
    return f"b{index + 1:04d}"


def gateway_id(community: str, building: str) -> str:
    """A gateway's id, as a site file would give it."""
    return f"{community}-{building}"


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """What the fleet does, in seconds from the start epoch."""

    steady_s: float = 20.0
    telemetry_every_s: float = 10.0
    status_every_s: float = 60.0
    burst_rate: float = 250.0
    """Alarms per second across the whole fleet during the burst."""
    burst_s: float = 10.0
    after_s: float = 5.0
    """Steady load after the burst, before each gateway's last event."""

    @property
    def total_s(self) -> float:
        return self.steady_s + self.burst_s + self.after_s


class SimulatedGateway:
    """One building's storage and uplink half: outbox → uplink → broker, commands answered from the outbox."""

    def __init__(self, *, community: str, building: str, prefix: str, mqtt_cfg: MqttConfig, db_path: str,
                 rng: random.Random) -> None:
        self.community = community
        self.building = building
        self.gateway_id = gateway_id(community, building)
        self.topics = Topics(prefix, community, building)
        self.mqtt_cfg = mqtt_cfg
        self.db_path = db_path
        self.rng = rng
        self.started_at = time.time()
        self.outbox: Outbox
        self.writer: EventWriter
        self.uplink: Uplink
        self.commands: CommandService
        self._status = StatusReporter(gateway=self.gateway_id, community=community, building=building,
                                      software=__version__)
        self._tasks: list[asyncio.Task[None]] = []
        self.alarmed: set[str] = set()

    async def open(self) -> None:
        """Open the outbox and build the writer, uplink and command service (nothing connects yet)."""
        self.outbox = await Outbox.open(self.db_path, gateway_id=self.gateway_id,
                                        identity={"community": self.community, "building": self.building},
                                        limits=StorageLimits())
        self.writer = EventWriter(self.outbox, batch_s=0.5)
        # Simulated gateways and the inbox read one clock, this host's: a command's validity window is judged
        # by the clock that wrote it, whether or not NTP has synchronised it.
        gate = CommandGate(self.topics, started_at=self.started_at, synchronised=lambda: True)
        self.commands = CommandService(
            gate, self, lambda topic, body, props: self.uplink.publish_json(topic, body, properties=props),
            gateway=self.gateway_id, session=lambda: self.outbox.session)
        self.uplink = Uplink(self.mqtt_cfg, self.outbox, self.topics, birth=self.birth,
                             on_command=self.commands.on_message)
        self._tasks.append(asyncio.create_task(self.writer.run(), name=f"writer-{self.building}"))

    def start_uplink(self) -> None:
        with structlog.contextvars.bound_contextvars(gateway=self.gateway_id):  # the task keeps a copy
            self._tasks.append(asyncio.create_task(self.uplink.run(), name=f"uplink-{self.building}"))

    async def handle(self, command: str, args: Mapping[str, Any], *, source: str) -> CommandOutcome:
        """The gateway's command door, reduced to what a central inbox needs: ``events`` from the outbox."""
        if command != "events":
            return CommandOutcome(False, f"{command}: not simulated")
        allowed = {"limit", "install", "session", "from_seq", "to_seq", "kind", "household", "device", "since"}
        query = {k: v for k, v in args.items() if k in allowed}
        query["limit"] = max(1, min(EVENTS_LIMIT_MAX, int(query.get("limit", 50))))
        rows = await self.outbox.recent(**query)
        return CommandOutcome(True, None, {"events": rows})

    def birth(self) -> dict[str, Any]:
        return birth_message(gateway=self.gateway_id, community=self.community, building=self.building,
                             session=self.outbox.session, last_seq=self.outbox.session_seq,
                             sessions=self.outbox.earlier_sessions, software=__version__,
                             snapshot=link.snapshot_from_wire(None),
                             config={"units": list(UNITS), "households": len(HOUSEHOLDS), "devices": len(HOUSEHOLDS),
                                     "buses": []})

    # ------------------------------------------------------------------------------ events

    def telemetry(self) -> None:
        household = self.rng.choice(HOUSEHOLDS)
        self.writer.put(Event("telemetry", "reading", time.monotonic(), device=f"gas-{household}",
                              unit=household.split("-")[0], household=household,
                              value=round(self.rng.uniform(0.0, 4.0), 1), measure="%LEL", quality="good",
                              wall=time.time()))

    def alarm(self) -> None:
        """An alarm raised in a household, or cleared when that household's alarm stands."""
        household = self.rng.choice(HOUSEHOLDS)
        action = "cleared" if household in self.alarmed else "raised"
        (self.alarmed.discard if action == "cleared" else self.alarmed.add)(household)
        self.writer.put(Event("alarm", action, time.monotonic(), device=f"gas-{household}",
                              unit=household.split("-")[0], household=household, level="high",
                              value=round(self.rng.uniform(25.0, 60.0), 1), measure="%LEL", wall=time.time()))

    async def publish_status(self) -> None:
        up = self.uplink
        if not up.connected:
            return
        body = self._status.build(
            session=self.outbox.session, last_seq=self.outbox.session_seq, backlog=await self.outbox.backlog(),
            snapshot=link.snapshot_from_wire(None),
            uplink=UplinkFigures(rtt_ms=up.rtt_ms, connections=up.connections, delivered=up.delivered_total,
                                 rejected=up.rejected_total, inflight=up.inflight),
            buses=[])
        up.publish_json(self.topics.status, body)

    async def drained(self) -> bool:
        """Whether everything put is stored and every stored event has its PUBACK."""
        if self.writer.held:
            return False
        waiting, _ = await self.outbox.backlog()
        return waiting == 0 and not self.uplink.inflight

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        await self.writer.flush(timeout_s=2.0)
        await self.uplink.stop(flush_timeout_s=flush_timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.outbox.close()


# ------------------------------------------------------------------------------------------- one worker


def _standbys_up(gateways: Sequence[SimulatedGateway]) -> int:
    """How many gateways' standby connections are up now."""
    return sum(1 for g in gateways if g.uplink.standby is not None and g.uplink.standby.connected)


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"event": kind, **fields}), flush=True)


def _load_credentials(path: str | None) -> dict[str, tuple[str, str]]:
    """``{building: (username, password)}`` from a JSON file ``{building: {"username", "password"}}``."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(b): (str(c["username"]), str(c["password"])) for b, c in data.items()}


def mqtt_config(args: argparse.Namespace, index: int, client_id: str,
                credentials: tuple[str, str] | None) -> MqttConfig:
    """The uplink configuration of gateway ``index``: its own first node, the others after it."""
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    first = index % len(brokers)
    ordered = brokers[first:] + brokers[:first]
    host, port = ordered[0].rsplit(":", 1)
    fields: dict[str, Any] = {"host": host, "port": int(port), "client_id": client_id, "topic_prefix": args.prefix,
                              "protocol": args.protocol, "keepalive_s": args.keepalive, "allow_plaintext": True}
    if "hosts" in {f.name for f in dataclasses.fields(MqttConfig)}:
        fields["hosts"] = tuple(ordered)
    if credentials is not None:
        fields["username"], fields["password"] = credentials
    return MqttConfig(**fields)


async def _wait_go(path: Path, stop: asyncio.Event) -> float | None:
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            return float(path.read_text(encoding="utf-8").strip())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return None


async def _sleep_until(wall: float, stop: asyncio.Event) -> bool:
    """Sleep until wall-clock ``wall``; False when stopped first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, wall - time.time()))
    return not stop.is_set()


async def run_worker(args: argparse.Namespace) -> int:
    """Run this process's share of the fleet; exit code."""
    threading.stack_size(THREAD_STACK_BYTES)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    plan = FleetPlan(steady_s=args.steady_s, telemetry_every_s=args.telemetry_every, status_every_s=args.status_every,
                     burst_rate=args.burst_rate, burst_s=args.burst_s, after_s=args.after_s)
    credentials = _load_credentials(args.credentials)
    mine = [i for i in range(args.gateways) if i % args.processes == args.worker]
    rng = random.Random(args.seed * 1000 + args.worker)
    workdir = Path(args.workdir)
    gateways: list[SimulatedGateway] = []
    for i in mine:
        building = building_name(i)
        gid = gateway_id(args.community, building)
        gw = SimulatedGateway(community=args.community, building=building, prefix=args.prefix,
                              mqtt_cfg=mqtt_config(args, i, gid, credentials.get(building)),
                              db_path=str(workdir / f"{gid}.db"), rng=random.Random(rng.random()))
        await gw.open()
        gateways.append(gw)
    # Stagger the connects: a broker node takes a thousand sessions better spread over a few seconds.
    step = args.connect_spread_s / max(1, len(gateways))
    for gw in gateways:
        gw.start_uplink()
        await asyncio.sleep(step)
    while not stop.is_set() and sum(g.uplink.connected for g in gateways) < len(gateways):
        await asyncio.sleep(0.2)
    _emit("ready", worker=args.worker, gateways=len(gateways),
          connected=sum(g.uplink.connected for g in gateways), standby_connected=_standbys_up(gateways))
    start = await _wait_go(Path(args.go_file), stop)
    if start is not None:
        await _run_plan(gateways, plan, start, args.processes, rng, stop)
        for gw in gateways:  # a last event each: a loss at the very end would otherwise show no gap
            gw.telemetry()
        deadline = time.monotonic() + args.drain_timeout
        drained = False
        while not stop.is_set() and time.monotonic() < deadline:
            flags = await asyncio.gather(*(g.drained() for g in gateways))
            if all(flags):
                drained = True
                break
            await asyncio.sleep(0.5)
        stored = sum(g.outbox.stored_total for g in gateways)
        waiting = sum([(await g.outbox.backlog())[0] for g in gateways])
        _emit("drained", worker=args.worker, ok=drained, stored=stored, undelivered=waiting,
              connections=sum(g.uplink.connections for g in gateways),
              resent=sum(g.uplink.resent_total for g in gateways),
              standby_copies=sum(g.uplink.standby.copies for g in gateways if g.uplink.standby is not None),
              standby_missed=sum(g.uplink.standby.missed for g in gateways if g.uplink.standby is not None),
              standby_connected=_standbys_up(gateways),
              answered=sum(g.commands.accepted for g in gateways))
        await stop.wait()
    await asyncio.gather(*(g.close() for g in gateways), return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _emit("stopped", worker=args.worker, maxrss_kb=usage.ru_maxrss, cpu_s=round(usage.ru_utime + usage.ru_stime, 2))
    return 0


async def _run_plan(gateways: Sequence[SimulatedGateway], plan: FleetPlan, start: float, processes: int,
                    rng: random.Random, stop: asyncio.Event) -> None:
    """Telemetry and status on each gateway's own period (phases spread), the alarm burst at its rate."""
    if not gateways:
        return
    if not await _sleep_until(start, stop):
        return
    n = len(gateways)
    next_telemetry = [start + rng.uniform(0, plan.telemetry_every_s) for _ in range(n)]
    next_status = [start + rng.uniform(0, plan.status_every_s) for _ in range(n)]
    burst_from, burst_to = start + plan.steady_s, start + plan.steady_s + plan.burst_s
    rate = plan.burst_rate / max(1, processes)
    alarms = 0
    end = start + plan.total_s
    status_tasks: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        now = time.time()
        if now >= end:
            break
        for i in range(n):
            if now >= next_telemetry[i]:
                gateways[i].telemetry()
                next_telemetry[i] += plan.telemetry_every_s
            if now >= next_status[i]:
                next_status[i] += plan.status_every_s
                task = asyncio.create_task(gateways[i].publish_status())
                status_tasks.add(task)
                task.add_done_callback(status_tasks.discard)
        if burst_from <= now:
            due = int((min(now, burst_to) - burst_from) * rate)
            while alarms < due:
                gateways[rng.randrange(n)].alarm()
                alarms += 1
        await asyncio.sleep(TICK_S)
    _emit("schedule_done", alarms=alarms)


# ------------------------------------------------------------------------------------------- parent


def _worker_argv(args: argparse.Namespace, worker: int) -> list[str]:
    argv = [sys.executable, "-m", "fleet.simulator", "--worker", str(worker)]
    for key, value in vars(args).items():
        if key == "worker" or value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_parent(args: argparse.Namespace) -> int:
    """Start the worker processes and pass their lines on; SIGTERM stops them all."""
    procs = [subprocess.Popen(_worker_argv(args, w), stdout=subprocess.PIPE, text=True)
             for w in range(args.processes)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def pump(p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with contextlib.suppress(BrokenPipeError):
                print(line, end="", flush=True)
            with contextlib.suppress(ValueError):
                kind = json.loads(line).get("event")
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1
                    if counts[kind] == len(procs) and kind in ("ready", "drained"):
                        _emit(f"all_{kind}", processes=len(procs))

    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    return max(codes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fleet.simulator", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateways", type=int, required=True)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--brokers", required=True, help="host:port of each MQTT node, comma-separated")
    p.add_argument("--community", default="fleet")
    p.add_argument("--prefix", default="safety")
    p.add_argument("--protocol", type=int, choices=(5, 311), default=311)
    p.add_argument("--credentials", help="JSON {building: {username, password}}")
    p.add_argument("--workdir", required=True, help="where the outbox files go (one per gateway)")
    p.add_argument("--go-file", required=True, help="the schedule starts at the epoch written here")
    p.add_argument("--keepalive", type=int, default=60)
    p.add_argument("--connect-spread-s", type=float, default=10.0, help="connects spread over this many seconds")
    p.add_argument("--steady-s", type=float, default=20.0)
    p.add_argument("--telemetry-every", type=float, default=10.0, help="seconds between a gateway's readings")
    p.add_argument("--status-every", type=float, default=60.0)
    p.add_argument("--burst-rate", type=float, default=250.0, help="alarms per second across the fleet")
    p.add_argument("--burst-s", type=float, default=10.0)
    p.add_argument("--after-s", type=float, default=5.0)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is None:
        return run_parent(args)
    configure_logging(level=args.log_level, json=True)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=sys.stderr))  # stdout carries the lines
    structlog.contextvars.bind_contextvars(process=f"fleet-{args.worker}")
    return asyncio.run(run_worker(args))


if __name__ == "__main__":
    sys.exit(main())
