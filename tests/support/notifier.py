"""The notifier's peers for tests: an HTTP receiver standing for people's phones (Apprise's ``json://`` posts to
it), a notifier file and a contacts file, the inbox's own routing writing events and notification rows, and the
notifier and duty desk as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import psycopg

from fleet.contacts import Contacts
from fleet.inbox import Inbox, InboxSettings
from tests.support.broker import free_port
from tests.support.fleet import _Lines

__all__ = ["GatewayThread", "Message", "NotifierRig", "Receiver", "event", "start_desk", "start_notifier",
           "store_events", "write_contacts", "write_notifier_config"]


@dataclass
class Message:
    """One POST the receiver got: the person's path, when, and what Apprise sent."""

    path: str
    at: float
    title: str
    body: str
    client_port: int

    @property
    def purpose(self) -> str:
        if self.title.startswith("Acknowledged:"):
            return "ack"
        if self.title.startswith("All clear:"):
            return "clear"
        return "alarm"

    @property
    def ref(self) -> str | None:
        m = re.search(r"^ref (\S+)$", self.body, re.M)
        return m.group(1) if m else None

    @property
    def step(self) -> int | None:
        m = re.search(r"\(step (\d+)\)", self.body)
        return int(m.group(1)) if m else None

    @property
    def link(self) -> str | None:
        m = re.search(r"Acknowledge: (\S+)", self.body)
        return m.group(1) if m else None


@dataclass
class Receiver:
    """A local HTTP server recording every POST; ``fail[path] = n`` answers the next n with 500, ``hold[path] =
    s`` answers after s seconds (``on_hold`` is called with the message first)."""

    messages: list[Message] = field(default_factory=list)
    keep_alive: bool = True
    """HTTP/1.1, connections kept open as a provider's API keeps them; False: HTTP/1.0, each closed after its
    answer."""
    fail: dict[str, int] = field(default_factory=dict)
    hold: dict[str, float] = field(default_factory=dict)
    on_hold: Callable[[Message], None] | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if self.keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                data = json.loads(self.rfile.read(length) or b"{}")
                msg = Message(self.path, time.time(), str(data.get("title", "")), str(data.get("message", "")),
                              self.client_address[1])
                with receiver._cond:
                    receiver.messages.append(msg)
                    receiver._cond.notify_all()
                    failing = receiver.fail.get(self.path, 0)
                    if failing:
                        receiver.fail[self.path] = failing - 1
                    holding = receiver.hold.get(self.path, 0.0)
                if holding:
                    if receiver.on_hold is not None:
                        receiver.on_hold(msg)
                    time.sleep(holding)
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, who: str) -> str:
        return f"json://127.0.0.1:{self.port}/to/{who}"

    def about(self, ref: str, purpose: str | None = None) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.ref == ref and (purpose is None or m.purpose == purpose)]

    def wait_for(self, match: Callable[[list[Message]], bool], timeout: float, what: str) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not match(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what}: not within {timeout:g} s; got "
                                         f"{[(m.path, m.purpose, m.ref) for m in self.messages[-10:]]}")
                self._cond.wait(min(left, 0.2))
            return list(self.messages)

    def pid_of_sender(self, msg: Message) -> int | None:
        """The process whose TCP connection sent ``msg`` (its local port is the message's client port)."""
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == msg.client_port and c.raddr and c.raddr.port == self.port:
                return c.pid
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_contacts(path: Path, receiver: Receiver, community: str, buildings: Mapping[str, Mapping[str, Any]],
                   *, sms_only: Sequence[str] = ()) -> None:
    """A contacts file whose every person is reached at ``receiver.url(<slug>)``; ``buildings`` maps a building
    to ``{"units": [...], "households": {household: {"relatives": n, "alone": bool}}}``. People named in
    ``sms_only`` have a phone and no URL (the community's SMS provider)."""

    def person(name: str, slug: str) -> str:
        if slug in sms_only:
            return f'{{ name = "{name}", phone = "+86 10 {zlib.crc32(slug.encode()) % 10**8:08d}" }}'
        return f'{{ name = "{name}", phone = "", urls = ["{receiver.url(slug)}"] }}'

    lines = [f'[communities."{community}"]',
             f'grid_worker = {person("Grid worker", "grid")}',
             f'duty_desk = {person("Duty desk", "desk")}']
    for b, spec in buildings.items():
        lines += [f'[buildings."{community}/{b}"]', f'head = {person(f"Head of {b}", f"head-{b}")}']
        for u in spec["units"]:
            lines += [f'[units."{community}/{b}/{u}"]', f'head = {person(f"Head of {b} {u}", f"head-{b}-{u}")}']
        for h, hs in spec["households"].items():
            rel = ", ".join(person(f"Relative {i} of {b} {h}", f"rel{i}-{b}-{h}") for i in range(hs["relatives"]))
            lines += [f'[households."{community}/{b}/{h}"]', f"relatives = [{rel}]"]
            if hs.get("alone"):
                lines.append("alone = true")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_notifier_config(path: Path, *, community: str, public_url: str, sms_url: str = "",
                          escalate_after_s: float = 120.0, alone_escalate_after_s: float = 60.0,
                          retry_base_s: float = 5.0, secret: str = "test-secret-0123456789abcdef",
                          in_flight: int | None = None) -> Path:
    secret_file = path.with_name("notifier.secret")
    secret_file.write_text(secret + "\n", encoding="utf-8")
    path.write_text(
        f'[notifier]\ncommunity = "{community}"\npublic_url = "{public_url}"\nsecret_file = "{secret_file.name}"\n'
        f'sms_url = "{sms_url}"\npoll_s = 0.05\n' + (f"in_flight = {in_flight}\n" if in_flight else "") +
        f"[ladder]\nescalate_after_s = {escalate_after_s}\nalone_escalate_after_s = {alone_escalate_after_s}\n"
        f"[retry]\nbase_s = {retry_base_s}\ncap_s = 10\nmax_attempts = 5\n", encoding="utf-8")
    return secret_file


_seq = iter(range(1, 10**9))


def event(community: str, building: str, kind: str, action: str, *, unit: str | None = None,
          household: str | None = None, device: str | None = None, **extra: Any) -> dict[str, Any]:
    """An event as a gateway sends it (the fields the inbox and the notifier read)."""
    seq = next(_seq)
    body: dict[str, Any] = {
        "version": 2, "event_id": f"{community}-{building}:00000000000000aa:1:{seq}",
        "gateway": f"{community}-{building}", "install": "00000000000000aa", "community": community,
        "building": building, "session": 1, "seq": seq,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}Z",
        "clock_synced": True, "historical": False, "kind": kind, "action": action, **extra}
    for key, value in (("unit", unit), ("household", household), ("device", device)):
        if value is not None:
            body[key] = value
    if kind == "alarm":
        body.setdefault("level", "high")
    return body


def store_events(dsn: str, contacts_file: Path, community: str, events: Sequence[Mapping[str, Any]]) -> int:
    """Store events as the central inbox does (fleet/inbox.py's store: the row and its routing in one
    transaction), without a broker."""

    async def run() -> int:
        inbox = Inbox(InboxSettings(nats_servers=(), dsn=dsn, community=community, name="test-inbox",
                                    contacts=Contacts.load(contacts_file)))
        inbox._db = await psycopg.AsyncConnection.connect(dsn, autocommit=False)
        try:
            await inbox._schema()
            return await inbox.store(events, recovered=False)
        finally:
            await inbox._db.close()

    return asyncio.run(run())


def start_notifier(workdir: Path, dsn: str, name: str) -> _Lines:
    proc = _Lines(name, [sys.executable, "-m", "fleet.notifier", "--dsn", f"{dsn} application_name={name}",
                         "--config", str(workdir / "notifier.toml"), "--contacts", str(workdir / "contacts.toml"),
                         "--name", name], workdir / f"{name}.log")
    proc.wait_for(lambda m: m.get("event") == "notifier", timeout=30)
    return proc


def start_desk(workdir: Path, dsn: str, port: int, *, name: str = "desk", extra: Sequence[str] = ()) -> _Lines:
    proc = _Lines(name, [sys.executable, "-m", "fleet.desk", "serve", "--dsn", dsn, "--secret-file",
                         str(workdir / "notifier.secret"), "--listen", f"127.0.0.1:{port}", *extra],
                  workdir / f"{name}.log")
    proc.wait_for(lambda m: m.get("event") == "desk", timeout=30)
    return proc


class GatewayThread:
    """Simulated gateways (fleet/simulator.py's: the gateway's own outbox, writer and MQTT uplink) on an asyncio
    loop of their own in a thread, so a test can raise an alarm in a household when it chooses."""

    def __init__(self, workdir: Path, community: str, buildings: Sequence[str], mqtt_host: str,
                 credentials: Mapping[str, tuple[str, str]], prefix: str = "safety") -> None:
        import random

        from gateway.config import MqttConfig

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        from fleet.simulator import SimulatedGateway

        host, port = mqtt_host.rsplit(":", 1)
        self.gateways: dict[str, SimulatedGateway] = {}
        for b in buildings:
            user, password = credentials[b]
            cfg = MqttConfig(host=host, port=int(port), client_id=f"{community}-{b}", topic_prefix=prefix,
                             username=user, password=password, allow_plaintext=True, keepalive_s=5,
                             protocol=311)
            self.gateways[b] = SimulatedGateway(community=community, building=b, prefix=prefix, mqtt_cfg=cfg,
                                                db_path=str(workdir / f"{b}.db"), rng=random.Random(1))
        for gw in self.gateways.values():
            self._call(gw.open())
            self.loop.call_soon_threadsafe(gw.start_uplink)

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connected(self, building: str) -> bool:
        return bool(self.gateways[building].uplink.connected)

    def put(self, building: str, kind: str, action: str, household: str, **fields: Any) -> float:
        """An event of ``household``'s detector, stored and sent as the gateway does; its detection time."""
        from gateway.events import Event

        wall = time.time()
        event = Event(kind, action, time.monotonic(), device=f"gas-{household}", unit=household.split("-")[0],
                      household=household, wall=wall, **fields)
        self.loop.call_soon_threadsafe(self.gateways[building].writer.put, event)
        return wall

    def stop(self, building: str) -> None:
        """A planned stop: the gateway says it goes offline."""
        gw = self.gateways.pop(building)
        self._call(gw.close())

    def close(self) -> None:
        for b in list(self.gateways):
            with contextlib.suppress(Exception):
                self.stop(b)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class NotifierRig:
    """Notifier instances for the fleet scenario (tests/support/fleet.py): every person on file has a phone, so
    every message goes through the community's SMS provider URL, here Apprise's ``json://`` to a receiver."""

    def __init__(self, workdir: Path, community: str, *, instances: int = 2, escalate_after_s: float = 20.0,
                 in_flight: int | None = None) -> None:
        self.workdir = workdir
        self.instances = instances
        self.in_flight = in_flight
        self.receiver = Receiver()
        self.procs: list[_Lines] = []
        self.killed = 0
        write_notifier_config(workdir / "notifier.toml", community=community, public_url="http://127.0.0.1:9",
                              sms_url=f"json://127.0.0.1:{self.receiver.port}/sms/{{phone}}",
                              escalate_after_s=escalate_after_s, alone_escalate_after_s=escalate_after_s / 2,
                              retry_base_s=1.0, in_flight=in_flight)

    def start(self, dsn: str) -> None:
        for i in range(self.instances):
            self.procs.append(start_notifier(self.workdir, dsn, f"notifier-{i + 1}"))

    def kill_one(self) -> None:
        """SIGKILL the first instance still running."""
        import signal

        for p in self.procs:
            if p.proc.poll() is None:
                p.stop(signal.SIGKILL)
                self.killed += 1
                return

    def settle(self, dsn: str, timeout: float) -> None:
        """Wait until nothing is pending and no step is overdue."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(dsn, autocommit=True) as c:
            while time.monotonic() < deadline:
                row = c.execute("SELECT (SELECT count(*) FROM deliveries WHERE status = 'pending') + (SELECT count(*) "
                                "FROM episodes WHERE next_step_at < clock_timestamp())").fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.5)

    def result(self, dsn: str, detected: Mapping[str, float], in_window: Callable[[float], bool]) -> dict[str, Any]:
        """What the receiver got against what the notifier recorded: first-step latency (detection → received)
        outside and inside the failover window, whether every later step came within 1 s of its due time,
        duplicates (a message received more than once), and whether each first-step message sent arrived."""
        with psycopg.connect(dsn, autocommit=True) as c:
            rows = c.execute("SELECT event_id, step, status, extract(epoch FROM due_at) FROM deliveries "
                             "WHERE purpose = 'alarm'").fetchall()
            failed = c.execute("SELECT count(*) FROM attempts WHERE outcome = 'failed'").fetchone()
            # alarms whose clear was handled before their episode opened: opened closed, nobody told
            opened_closed = c.execute(
                "SELECT count(*) FROM episodes e WHERE e.kind = 'alarm' AND e.cleared_by IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.event_id = e.event_id AND d.purpose = 'alarm')").fetchone()
        due = {(e, int(s)): float(d) for e, s, _, d in rows}
        sent_first = Counter(e for e, s, st, _ in rows if s == 1 and st == "sent")
        cancelled_first = sum(1 for _, s, st, _ in rows if s == 1 and st == "cancelled")
        statuses = Counter(str(st) for _, _, st, _ in rows)
        got: dict[tuple[str, str, str, int], list[float]] = {}
        for m in list(self.receiver.messages):
            if m.ref is not None:
                got.setdefault((m.ref, m.path, m.purpose, m.step or 0), []).append(m.at)
        duplicates = sum(len(v) - 1 for v in got.values())
        twice = [(k, v) for k, v in got.items() if len(v) > 1][:5]
        examples = []
        with psycopg.connect(dsn, autocommit=True) as c:
            for (ref, path, purpose, step), times in twice:
                examples.append({"ref": ref, "path": path, "purpose": purpose, "step": step, "received": times,
                                 "deliveries": [list(map(str, r)) for r in c.execute(
                                     "SELECT d.id, d.purpose, d.step, d.role, d.name, d.status, d.attempts, "
                                     "a.attempt, a.worker, a.outcome, a.started_at, a.finished_at FROM deliveries d "
                                     "LEFT JOIN attempts a ON a.delivery_id = d.id WHERE d.event_id = %s "
                                     "ORDER BY d.id", (ref,)).fetchall()]})
        outside: list[float] = []
        inside: list[float] = []
        first_paths: Counter[str] = Counter()
        lateness: list[float] = []
        for (ref, _path, purpose, step), times in got.items():
            if purpose != "alarm":
                continue
            if step == 1:
                first_paths[ref] += 1
                wall = detected.get(ref)
                if wall is not None:
                    (inside if in_window(wall) else outside).append(min(times) - wall)
            elif (ref, step) in due:
                lateness.append(min(times) - due[(ref, step)])
        missing = sum(max(0, n - first_paths.get(ref, 0)) for ref, n in sent_first.items())
        on_time = all(-0.05 <= x <= 1.0 for x in lateness)
        return {"first_step_sent": sum(sent_first.values()), "first_step_cancelled": cancelled_first,
                "opened_closed": int(opened_closed[0]) if opened_closed else 0,
                "first_step_missing": missing,
                "notified_outside": outside, "notified_inside": inside, "duplicates": duplicates,
                "escalation_on_time": on_time, "escalated_messages": len(lateness),
                "escalation_late_max_s": round(max(lateness), 3) if lateness else None,
                "statuses": dict(statuses), "failed_attempts": int(failed[0]) if failed else 0,
                "duplicate_examples": examples,
                "instances": self.instances, "in_flight": self.in_flight, "killed": self.killed}

    def stop(self) -> None:
        import signal

        for p in self.procs:
            p.stop(signal.SIGTERM, timeout=20)
        self.receiver.close()
