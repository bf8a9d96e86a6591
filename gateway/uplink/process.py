"""The storage/uplink process: outbox (SQLite), MQTT uplink, MQTT commands, status messages.

The panel process starts it (``python -m gateway.uplink.process --config SITE --link-fd N``) and restarts it
when it ends; it may die, hang or be restarted at any moment without the panel missing a beat. It receives
the panel's events over the link (:mod:`gateway.link`), commits them, and only then acknowledges them, with
the hand-over mark written in the same transaction: events sent again after a restart are recognised and
never stored twice. Operator commands that arrive by MQTT are passed to the panel, the one door for
commands. It ignores SIGINT and SIGTERM: the panel stops it over the link once everything it read is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from gateway import __version__, failpoints, link
from gateway.config import ConfigError, SiteConfig, load_config
from gateway.events import Event, delivery_key
from gateway.heap import release_startup_heap
from gateway.logs import configure_logging
from gateway.realtime import settle_startup
from gateway.uplink.contract import (
    BusCounters,
    CommandGate,
    CommandService,
    SeenIds,
    SeenStore,
    StatusReporter,
    UplinkFigures,
    birth_message,
)
from gateway.uplink.mqtt import Uplink
from gateway.uplink.outbox import Outbox, PendingEvent, StorageLimits
from gateway.uplink.topics import Topics
from gateway.uplink.writer import EventWriter

__all__ = ["StorageProcess", "main"]

log = structlog.get_logger()

BEAT_S = 0.5
STORAGE_MAINTENANCE_S = 60.0
STATUS_CHECK_S = 0.5
#: How often the panel's state is fetched for birth and status messages.
PANEL_VIEW_S = 1.0
PANEL_TIMEOUT_S = 10.0
#: Commands that run longer than :data:`PANEL_TIMEOUT_S` on the panel, and how long their answer may take:
#: a buzzer test plays five patterns of at most 5 s, a relay test lasts at most 60 s, and a scan of all 247
#: addresses probes each for up to 0.25 s with a polling cycle between its 30 s windows.
LONG_COMMAND_TIMEOUT_S = {"buzzer_test": 35.0, "relay_test": 70.0, "scan": 900.0}


@dataclass(slots=True)
class CommandOutcome:
    """The panel's answer to a command passed on from MQTT (what CommandService reads)."""

    ok: bool
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class StorageProcess:
    """One building's storage and uplink half, joined to its panel by ``sock``."""

    def __init__(self, cfg: SiteConfig, sock: socket.socket) -> None:
        self.cfg = cfg
        self._sock = sock
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.community, cfg.building)
        self.started_at = time.time()
        self.outbox: Outbox
        self.writer: EventWriter
        self.uplink: Uplink
        self._writer_stream: asyncio.StreamWriter | None = None
        self._marks: dict[int, tuple[str, int]] = {}
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_request = 1
        self._panel_view: dict[str, Any] | None = None
        self._stop = asyncio.Event()
        self._flush_timeout_s = 5.0
        self._tasks: list[asyncio.Task[None]] = []
        self._answering: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------ start / stop

    async def run(self) -> int:
        """Open storage, say hello, serve the link until told to stop (or the panel is gone); flush; exit code."""
        cfg = self.cfg
        self.outbox = await Outbox.open(
            cfg.storage.path, gateway_id=cfg.gateway_id,
            identity={"community": cfg.community, "building": cfg.building},
            limits=StorageLimits.from_config(cfg.storage),
        )
        self.writer = EventWriter(self.outbox, batch_s=cfg.storage.telemetry_batch_s,
                                  memory_limit=cfg.storage.memory_events, on_stored=self._stored,
                                  on_fault=self._storage_fault, mark=self._mark_of, on_shed=self._forget_marks)
        reader, self._writer_stream = await asyncio.open_unix_connection(sock=self._sock, limit=link.MAX_FRAME)
        gate = CommandGate(self.topics, started_at=self.started_at, seen=_seen_ids(cfg.storage.path))
        self.mqtt_commands = CommandService(
            gate, self, lambda topic, body, properties: self.uplink.publish_json(topic, body, properties=properties),
            gateway=cfg.gateway_id, session=lambda: self.outbox.session,
        )
        self.uplink = Uplink(cfg.mqtt, self.outbox, self.topics, birth=self.birth,
                             on_command=self.mqtt_commands.on_message, on_delivered=self._delivered)
        self._status = StatusReporter(gateway=cfg.gateway_id, community=cfg.community, building=cfg.building,
                                      software=__version__)
        self._send("hello", handover=await self.outbox.handover_mark(), pid=os.getpid())
        self._tasks = [
            asyncio.create_task(self.writer.run(), name="outbox-writer"),
            asyncio.create_task(self._maintain_storage(), name="storage-maintenance"),
            asyncio.create_task(self.uplink.run(), name="uplink"),
            asyncio.create_task(self._beat(), name="beat"),
            asyncio.create_task(self._publish_status(), name="status"),
            asyncio.create_task(self._follow_panel(), name="panel-view"),
        ]
        if failpoints.configured("loop_busy", "storage"):
            self._tasks.append(asyncio.create_task(_busy_loop_failpoint(), name="loop-busy-failpoint"))
        log.info("storage process started", session=self.outbox.session, pid=os.getpid(),
                 gc_frozen=settle_startup(cfg.runtime.gc_freeze), heap_trimmed=release_startup_heap())
        reading = asyncio.create_task(self._read(reader), name="link-reader")
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
        await self._shutdown()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading
        return 0

    async def _shutdown(self) -> None:
        """Store everything received, flush to the broker within the bound, close."""
        stored = await self.writer.flush(timeout_s=max(5.0, self._flush_timeout_s))
        if not stored:
            log.error("events not stored at stop", held=self.writer.held)
        await self.uplink.stop(flush_timeout_s=self._flush_timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.outbox.close()
        if self._writer_stream is not None:
            self._writer_stream.close()
        log.info("storage process stopped")

    # ------------------------------------------------------------------------------ link

    def _send(self, kind: str, **body: Any) -> None:
        if self._writer_stream is not None and not self._writer_stream.is_closing():
            self._writer_stream.write(link.encode(kind, **body))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                header = await reader.readexactly(4)
                size = int.from_bytes(header, "big")
                if size > link.MAX_FRAME:
                    log.error("link frame too long; the panel side is broken", size=size)
                    return
                frame = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("link to the panel closed; storing what arrived and stopping")
                return
            try:
                message = link.decode(frame)
                await self._dispatch(message)
            except link.BadMessage as exc:
                log.error("message from the panel rejected", reason=str(exc))
            except Exception:
                log.exception("message from the panel not handled")

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "event":
            event = link.event_from_wire(message["event"])
            self._marks[id(event)] = (message["boot"], message["n"])
            self.writer.put(event)
        elif kind == "request":
            task = asyncio.create_task(self._answer(message["id"], message["name"], message["args"]))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        elif kind == "reply":
            future = self._requests.pop(message["id"], None)
            if future is not None and not future.done():
                if message["ok"]:
                    future.set_result(message["data"])
                else:
                    future.set_exception(RuntimeError(str(message["data"].get("error", "failed"))))
        elif kind == "stop":
            self._flush_timeout_s = float(message["flush_timeout_s"])
            self._stop.set()

    async def _answer(self, request_id: int, name: str, args: dict[str, Any]) -> None:
        try:
            data = await self._serve_request(name, args)
        except Exception as exc:
            self._send("reply", id=request_id, ok=False, data={"error": f"{type(exc).__name__}: {exc}"})
        else:
            self._send("reply", id=request_id, ok=True, data=data)

    async def _serve_request(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "events":
            return {"rows": await self.outbox.recent(**args)}
        if name == "storage":
            return await self.storage_figures()
        if name == "rebirth":
            if not self.uplink.publish_json(self.topics.birth, self.birth(), retain=True):
                raise RuntimeError("uplink offline: birth not published")
            return {"topic": self.topics.birth}
        if name == "count_dropped":
            counts = {str(k): int(v) for k, v in args.get("dropped", {}).items()}
            await self.outbox.record_dropped(counts)
            return {}
        raise ValueError(f"unknown request {name!r}")

    async def request_panel(self, name: str, args: dict[str, Any], *,
                            timeout_s: float = PANEL_TIMEOUT_S) -> dict[str, Any]:
        """Ask the panel (``command``, ``panel``) and wait up to ``timeout_s`` for its answer."""
        request_id = self._next_request
        self._next_request += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self._send("request", id=request_id, name=name, args=args)
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._requests.pop(request_id, None)

    async def handle(self, command: str, args: Mapping[str, Any], *, source: str) -> CommandOutcome:
        """MQTT commands go to the panel's command handler, the one door."""
        try:
            answer = await self.request_panel("command", {"command": command, "args": dict(args), "source": source},
                                              timeout_s=LONG_COMMAND_TIMEOUT_S.get(command, PANEL_TIMEOUT_S))
        except (TimeoutError, RuntimeError) as exc:
            return CommandOutcome(False, f"the panel did not answer: {exc}", {"failed": True})
        return CommandOutcome(bool(answer.get("ok")), answer.get("reason"), dict(answer.get("data") or {}))

    # ------------------------------------------------------------------------------ storage

    def _mark_of(self, batch: Sequence[Event]) -> str | None:
        """The hand-over mark of the last panel event in ``batch`` (written in the batch's transaction)."""
        for event in reversed(batch):
            mark = self._marks.get(id(event))
            if mark is not None:
                return f"{mark[0]}:{mark[1]}"
        return None

    def _forget_marks(self, shed: Sequence[Event]) -> None:
        """Events the writer dropped leave no mark behind (marks are keyed by the object of a held event)."""
        for event in shed:
            self._marks.pop(id(event), None)

    def _stored(self, batch: Sequence[Event], ids: Sequence[str]) -> None:
        last: tuple[str, int] | None = None
        for event, event_id in zip(batch, ids, strict=True):
            mark = self._marks.pop(id(event), None)
            if mark is not None:
                last = mark
            if event.kind == "telemetry":
                log.info("reading", device=event.device, value=event.value, measure=event.measure,
                         event_id=event_id)
            else:
                log.info("event stored", kind=event.kind, action=event.action, device=event.device,
                         alarm_level=event.level, code=event.code, value=event.value, event_id=event_id)
        if last is not None:
            self._send("stored", boot=last[0], upto=last[1], dropped={})

    def _delivered(self, rows: Sequence[PendingEvent]) -> None:
        """The broker acknowledged these urgent rows: tell the panel (transmission supervision, the SMS path)."""
        keys = []
        for row in rows:
            try:
                body = msgspec.json.decode(row.payload)
                keys.append(delivery_key(body["kind"], body["action"], body.get("device"), body.get("code"),
                                         float(body["mono"])))
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                log.warning("acknowledged row without a delivery key", event_id=row.event_id)
        if keys:
            self._send("delivered", keys=keys)

    def _storage_fault(self, code: str, present: bool, detail: str | None) -> None:
        """Storage faults go to the panel: trouble signal and fault LED while present."""
        self._send("fault", code=code, present=present, detail=detail)

    async def _maintain_storage(self) -> None:
        while True:
            await asyncio.sleep(STORAGE_MAINTENANCE_S)
            generation = self.outbox.generation
            try:
                await self.outbox.maintain()
            except sqlite3.Error as exc:
                log.warning("storage maintenance failed; retried later", error=str(exc))
                with contextlib.suppress(sqlite3.Error, OSError):
                    await self.outbox.recover(exc, generation=generation)

    async def storage_figures(self) -> dict[str, Any]:
        """Session, backlog, uplink and storage figures for ``gatewayctl status``."""
        up = self.uplink
        backlog, oldest = await self.outbox.backlog()
        return {
            "session": self.outbox.session, "pid": os.getpid(), "backlog": backlog, "oldest_undelivered": oldest,
            "uplink": {"connected": up.connected, "broker": up.broker,
                       "rtt_ms": None if up.rtt_ms is None else round(up.rtt_ms, 1),
                       "inflight": up.inflight, "delivered_total": up.delivered_total,
                       "last_error": up.last_error},
            "storage": {**await self.outbox.stats(), **self.writer.stats()},
        }

    async def _beat(self) -> None:
        while True:
            up = self.uplink
            self._send("beat", session=self.outbox.session, connected=up.connected, connections=up.connections,
                       last_error=None if up.last_error is None else str(up.last_error),
                       stored=self.outbox.stored_total, held=self.writer.held)
            await asyncio.sleep(BEAT_S)

    # ------------------------------------------------------------------------------ panel state, birth, status

    async def _follow_panel(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError, RuntimeError):
                self._panel_view = await self.request_panel("panel", {})
            await asyncio.sleep(PANEL_VIEW_S)

    def birth(self) -> dict[str, Any]:
        """Full current state: every device, a config summary, software version, session counter."""
        cfg = self.cfg
        view = self._panel_view or {}
        return birth_message(
            gateway=cfg.gateway_id, community=cfg.community, building=cfg.building, session=self.outbox.session,
            last_seq=self.outbox.session_seq, sessions=self.outbox.earlier_sessions,
            software=__version__, snapshot=link.snapshot_from_wire(view.get("snapshot")),
            config={"units": [u.id for u in cfg.units], "households": len(cfg.households),
                    "devices": len(cfg.devices), "buses": [b.id for b in cfg.buses],
                    "bus_timing": [{"bus": b["id"], "floor_ms": _ms(b.get("floor_s")),
                                    "cycle_ms": _ms(b.get("cycle_s"))} for b in view.get("buses", [])]},
            sms=view.get("sms"),
        )

    async def status_message(self) -> dict[str, Any]:
        """The status message (schemas/status.json)."""
        up = self.uplink
        view = self._panel_view or {}
        return self._status.build(
            session=self.outbox.session, last_seq=self.outbox.session_seq, backlog=await self.outbox.backlog(),
            snapshot=link.snapshot_from_wire(view.get("snapshot")),
            uplink=UplinkFigures(rtt_ms=up.rtt_ms, connections=up.connections, delivered=up.delivered_total,
                                 rejected=up.rejected_total, inflight=up.inflight),
            buses=[BusCounters(b["id"], b["polls"], b["errors"], b["port_lost"], b.get("floor_s"), b.get("cycle_s"),
                               bool(b.get("paused", False)), b.get("errors_by_kind"))
                   for b in view.get("buses", [])],
            storage={**await self.outbox.stats(), **self.writer.stats(), **view.get("hold", {})},
            transmission=view.get("transmission"), sms=view.get("sms"),
        )

    async def _publish_status(self) -> None:
        published_for = 0
        due = 0.0
        while True:
            up = self.uplink
            fresh = up.connected and (up.connections != published_for or time.monotonic() >= due)
            if fresh and self._panel_view is not None and up.publish_json(self.topics.status,
                                                                          await self.status_message()):
                published_for = up.connections
                due = time.monotonic() + self.cfg.mqtt.status_interval_s
            await asyncio.sleep(STATUS_CHECK_S)


async def _busy_loop_failpoint() -> None:
    """Fail point ``loop_busy=storage``: while armed, the loop spends 2 s of every 3 in pure-Python work."""
    while True:
        await asyncio.sleep(1.0)
        if failpoints.failpoint("loop_busy", "storage"):
            end = time.perf_counter() + 2.0
            while time.perf_counter() < end:
                pass


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _seen_ids(database: str) -> SeenIds:
    """Seen command ids kept beside the outbox (``<database>.commands``); in memory only (and forgotten at a
    restart) if that file cannot be opened."""
    path = f"{database}.commands"
    try:
        return SeenIds(store=SeenStore(path))
    except sqlite3.Error as exc:
        log.error("seen command ids kept in memory only", path=path, error=str(exc))
        return SeenIds()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the storage/uplink process (started by the panel, never by hand)."""
    parser = argparse.ArgumentParser(prog="gatewayd-uplink")
    parser.add_argument("--config", required=True)
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # a realtime panel's child: storage runs at normal priority
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    configure_logging(level=args.log_level)
    structlog.contextvars.bind_contextvars(process="uplink")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        log.error("config error", key=exc.path, reason=exc.reason)
        return 78
    sock = socket.socket(fileno=args.link_fd)
    return asyncio.run(StorageProcess(cfg, sock).run())


if __name__ == "__main__":
    sys.exit(main())
