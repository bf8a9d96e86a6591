"""How many messages the notifier sends per second, against Apprise alone on the same machine, side by side.

A private PostgreSQL holds ``--alarms`` alarms, each routed to a relative and a unit head (two messages each);
``--instances`` notifier processes (fleet/notifier.py) send them all through Apprise's ``json://`` to a local
HTTP receiver (its own process). Reported (one JSON line last): ``messages``, ``seconds`` (first message
received → last), ``messages_per_s`` with 1 and with ``--instances`` instances, ``apprise_alone_per_s`` (one
process sending the same number of messages through Apprise to the same receiver, one ``Apprise()`` each, no
database), and the notifier processes' CPU per message once started (``cpu_ms_per_message``, user and system;
the start, Apprise's plugins loading, is left out), PostgreSQL's and the receiver's CPU per message, and the
machine's load average; ``rows`` (the messages), ``instances``. ``--in-flight`` sets the notifier's
``in_flight`` (its sending lanes: messages one instance sends at once; its default when not given). The receiver
keeps connections open (HTTP/1.1, as a provider's API does); ``--close`` makes it close each after its answer
(HTTP/1.0). Without PostgreSQL, Apprise or another package it needs, the line says why in ``error`` (with what
was measured before).

With ``--rate R`` the alarms are stored at R a second (as the inbox stores them) while the notifiers run, and
``notified_p50_ms`` / ``notified_p99_ms`` are the times from each alarm's commit to its messages received.

``.venv/bin/python benchmarks/notifier.py [--alarms 1000] [--instances 2] [--in-flight N] [--rate R] [--close]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import psutil

    from tests.support.notifier import (
        Receiver,
        event,
        start_notifier,
        store_events,
        write_contacts,
        write_notifier_config,
    )
    from tests.support.postgres import PostgresServer
    MISSING: ImportError | None = None
except ImportError as exc:  # the JSON line all the same, naming what is missing
    MISSING = exc


def _serve(port_out: Any, count_out: Any, stop: Any, log: str, keep_alive: bool = True) -> None:
    """The receiver in a process of its own, so that it does not share the notifier's or Apprise's CPU time; each
    message's ref and arrival time appended to ``log``."""
    receiver = Receiver(keep_alive=keep_alive)
    port_out.value = receiver.port
    written = 0
    with open(log, "a", encoding="utf-8") as out:
        while not stop.is_set():
            messages = receiver.messages[written:]
            out.writelines(f"{m.ref}\t{m.at}\n" for m in messages)
            out.flush()
            written += len(messages)
            count_out.value = written
            time.sleep(0.01)
    receiver.close()


def _arrivals(log: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        ref, at = line.split("\t")
        found.setdefault(ref, []).append(float(at))
    return found


def _paced(pg: Any, contacts: Path, events: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """Store ``events`` as the inbox does, ``rate`` a second in tenth-of-a-second batches; each one's commit time."""
    import asyncio

    import psycopg

    from fleet.contacts import Contacts
    from fleet.inbox import Inbox, InboxSettings

    async def run() -> dict[str, float]:
        inbox = Inbox(InboxSettings(nats_servers=(), dsn=pg.dsn, community="c1", name="bench-inbox",
                                    contacts=Contacts.load(contacts)))
        inbox._db = await psycopg.AsyncConnection.connect(pg.dsn, autocommit=False)
        stored: dict[str, float] = {}
        per = max(1, round(rate / 10))
        start = time.monotonic()
        try:
            for i in range(0, len(events), per):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await inbox.store(events[i:i + per], recovered=False)
                now = time.time()
                stored.update((e["event_id"], now) for e in events[i:i + per])
        finally:
            await inbox._db.close()
        return stored

    return asyncio.run(run())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _apprise_alone(port: int, n: int) -> float:
    import apprise

    apprise.Apprise().add("json://localhost")  # plugins loaded before the clock starts, as the notifier does
    t0 = time.perf_counter()
    for i in range(n):
        sender = apprise.Apprise()
        sender.add(f"json://127.0.0.1:{port}/to/p{i % 500}")
        sender.notify(body=f"alarm {i}\nref x", title="GAS ALARM")
    return n / (time.perf_counter() - t0)


def _cpu(procs: list[Any]) -> tuple[float, float]:
    times = [p.cpu_times() for p in procs]
    return sum(t.user for t in times), sum(t.system for t in times)


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its children (PostgreSQL's server and backends), by pid."""
    root = psutil.Process(pid)
    found = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            found[p.pid] = sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return found


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _run(workdir: Path, alarms: int, instances: int, port: int, count: Any, in_flight: int | None,
         receiver_pid: int, rate: float | None = None, log: Path | None = None) -> dict[str, Any]:
    """Every alarm stored before the notifiers start (the backlog they clear), or stored at ``rate`` a second
    once they run (then the latency from the commit to each message received, too)."""
    households = {f"u1-{i:03d}": {"relatives": 1} for i in range(100)}
    buildings = {f"b{j}": {"units": ["u1"], "households": households} for j in range((alarms + 99) // 100)}

    class At:  # the receiver runs elsewhere: only its URL is needed here
        def url(self, who: str) -> str:
            return f"json://127.0.0.1:{port}/to/{who}"

    write_contacts(workdir / "contacts.toml", At(), "c1", buildings)  # type: ignore[arg-type]
    write_notifier_config(workdir / "notifier.toml", community="c1", public_url="http://127.0.0.1:9",
                          escalate_after_s=3600, in_flight=in_flight)
    with PostgresServer() as pg:
        events = [event("c1", b, "alarm", "raised", unit="u1", household=h, device=f"gas-{b}-{h}")
                  for b in buildings for h in households][:alarms]
        if rate is None:
            store_events(pg.dsn, workdir / "contacts.toml", "c1", events)
        else:
            store_events(pg.dsn, workdir / "contacts.toml", "c1", [])  # the inbox's tables
        before = count.value
        procs: list[Any] = []
        try:  # every instance started is stopped, whatever fails
            for i in range(instances):
                procs.append(start_notifier(workdir, pg.dsn, f"notifier-{i + 1}"))
            watched = [psutil.Process(p.proc.pid) for p in procs]
            server_pid = int((pg.data / "postmaster.pid").read_text().split()[0])
            user0, system0 = _cpu(watched)
            server0, receiver0 = _tree_cpu(server_pid), _tree_cpu(receiver_pid)
            t0 = time.perf_counter()
            stored = _paced(pg, workdir / "contacts.toml", events, rate) if rate is not None else {}
            first = None if rate is None else t0  # paced: from the first alarm stored
            while count.value - before < 2 * alarms and time.perf_counter() - t0 < 600:
                if first is None and count.value > before:
                    first = time.perf_counter()
                time.sleep(0.01)
            seconds = time.perf_counter() - (first or t0)
            user, system = _cpu(watched)
            server, receiver = _spent(server0, _tree_cpu(server_pid)), _spent(receiver0, _tree_cpu(receiver_pid))
        finally:
            for p in procs:
                p.stop(signal.SIGTERM, timeout=20)
    sent = count.value - before
    per = 1000 / max(1, sent)
    latency: dict[str, Any] = {}
    if rate is not None and log is not None:
        waits = [at - stored[ref] for ref, ats in _arrivals(log).items() if ref in stored for at in ats]
        latency = {"alarms_per_s": rate, "notified_p50_ms": round(1000 * (_percentile(waits, 0.5) or 0), 1),
                   "notified_p99_ms": round(1000 * (_percentile(waits, 0.99) or 0), 1)}
    return {**latency, "messages": sent, "seconds": round(seconds, 2), "messages_per_s": round(sent / seconds, 1),
            "cpu_ms_per_message": round(per * (user - user0 + system - system0), 2),
            "user_ms_per_message": round(per * (user - user0), 2),
            "system_ms_per_message": round(per * (system - system0), 2),
            "postgres_cpu_ms_per_message": round(per * server, 2),
            "receiver_cpu_ms_per_message": round(per * receiver, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alarms", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--in-flight", type=int, help="the notifier's in_flight (its default when not given)")
    parser.add_argument("--rate", type=float, help="store the alarms at this rate a second while the notifiers run "
                        "(and report the latency to each message) instead of all before they start")
    parser.add_argument("--close", action="store_true", help="the receiver closes each connection after its "
                        "answer (HTTP/1.0) instead of keeping it open (HTTP/1.1, as a provider's API)")
    args = parser.parse_args()
    result: dict[str, Any] = {"alarms": args.alarms, "rows": 2 * args.alarms, "instances": args.instances,
                              "in_flight": args.in_flight, "receiver_keeps_connections": not args.close}
    try:
        if MISSING is not None:
            raise MISSING
        _measure(args, result)
    except Exception as exc:  # no PostgreSQL, no Apprise...: still one JSON line, saying why
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))


def _measure(args: argparse.Namespace, result: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as tmp:
        log = Path(tmp) / "received.tsv"
        port, count, stop = multiprocessing.Value("i", 0), multiprocessing.Value("i", 0), multiprocessing.Event()
        server = multiprocessing.Process(target=_serve, args=(port, count, stop, str(log), not args.close),
                                         daemon=True)
        server.start()
        while port.value == 0:
            time.sleep(0.01)
        try:
            for name in ("one", "many"):
                (Path(tmp) / name).mkdir()
            result["one_instance"] = _run(Path(tmp) / "one", args.alarms, 1, port.value, count, args.in_flight,
                                          server.pid, args.rate, log)
            result[f"{args.instances}_instances"] = _run(Path(tmp) / "many", args.alarms, args.instances, port.value,
                                                         count, args.in_flight, server.pid, args.rate, log)
            result["apprise_alone_per_s"] = round(_apprise_alone(port.value, 2 * args.alarms), 1)
            result["load_average"] = psutil.getloadavg()
        finally:
            stop.set()
            server.join(10)


if __name__ == "__main__":
    main()
