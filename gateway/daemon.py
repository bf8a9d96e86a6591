"""``gatewayd``: assembles the gateway and runs it.

Data flows one way: drivers → alarm panel (→ annunciator, at once) → bridge → outbox (SQLite) → uplink
(MQTT). Bus threads and GPIO callbacks never wait for the loop; the loop only gets copies of events. With
``runtime.alarm_process`` (the default) :func:`main` forks first and the part before the bridge runs in the
child (:mod:`gateway.alarm_link`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from drivers.gpio import ContactInput
from gateway import __version__
from gateway.alarm_link import PART as ALARM_PROCESS_PART
from gateway.alarm_link import (
    AlarmLink,
    AlarmLinkError,
    RemoteAlarmSide,
    RemoteAnnunciator,
    RemoteBus,
    RemoteContact,
    RemotePanel,
    fork_alarm_process,
)
from gateway.config import EX_CONFIG, ConfigError, SiteConfig, load_config
from gateway.events import Event
from gateway.health import Heartbeats
from gateway.logs import configure_logging
from gateway.notify import Notifier, Watchdog
from gateway.ops.commands import CommandHandler
from gateway.ops.control import ControlServer, ControlServerError
from gateway.panel.alarm_panel import AlarmPanel
from gateway.panel.annunciator import Annunciator
from gateway.panel.buses import BusPoller
from gateway.panel.core import Annunciation
from gateway.panel.selfcheck import SelfCheck, on_alarm_path
from gateway.panel.side import AlarmSide
from gateway.realtime import SWITCH_INTERVAL_S, raise_priority, release_startup_heap
from gateway.uplink.bridge import Bridge
from gateway.uplink.contract import (
    BusCounters,
    CommandGate,
    CommandService,
    StatusReporter,
    UplinkFigures,
    birth_message,
)
from gateway.uplink.mqtt import Uplink
from gateway.uplink.outbox import Outbox, StorageLimits
from gateway.uplink.topics import Topics
from gateway.uplink.writer import EventWriter

__all__ = ["Gateway", "main"]

log = structlog.get_logger()
STORAGE_MAINTENANCE_S = 60.0
#: A status message after every connect and then this often (seconds).
STATUS_INTERVAL_S = 60.0
STATUS_CHECK_S = 0.5


class Gateway:
    """One building's gateway: pins, buses, alarm panel, outbox and uplink."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        heartbeats: Heartbeats | None = None,
        on_pins_ready: Callable[[Gateway], None] | None = None,
        alarm_process: tuple[int | None, socket.socket] | None = None,
    ) -> None:
        """``alarm_process``: the pid and link socket of an alarm process already running the alarm path
        (:func:`gateway.alarm_link.fork_alarm_process`); without it the alarm path runs in this process."""
        self.cfg = cfg
        self._alarm_process = alarm_process
        self.failed = asyncio.Event()
        self._on_pins_ready = on_pins_ready
        self.heartbeats = heartbeats or Heartbeats()
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.community, cfg.building)
        self.started_at = time.time()
        self.outbox: Outbox
        self.uplink: Uplink
        self.alarm_side: AlarmSide | RemoteAlarmSide
        self._tasks: list[asyncio.Task[None]] = []
        self._followers: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._stored_watchers: set[asyncio.Event] = set()
        self.commands = CommandHandler(self)
        self.control: ControlServer | None = None
        self.events_seen = 0

    @property
    def panel(self) -> AlarmPanel | RemotePanel:
        """The alarm panel (:class:`gateway.panel.side.AlarmSide`), or its proxy in the alarm process."""
        return self.alarm_side.panel

    @property
    def annunciator(self) -> Annunciator | RemoteAnnunciator:
        """Buzzer, LEDs and relays."""
        return self.alarm_side.annunciator

    @property
    def buses(self) -> Mapping[str, BusPoller | RemoteBus]:
        """The bus threads by bus id."""
        return self.alarm_side.buses

    @property
    def contacts(self) -> Mapping[str, ContactInput | RemoteContact]:
        """The GPIO contacts by device id."""
        return self.alarm_side.contacts

    @property
    def alarm_pid(self) -> int | None:
        """The alarm process's pid, or None when the alarm path runs in this process."""
        side = self.alarm_side
        return side.link.pid if isinstance(side, RemoteAlarmSide) else None

    # ------------------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Open storage and pins, start the alarm threads and the loop tasks."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.outbox = await Outbox.open(
            cfg.storage.path, gateway_id=cfg.gateway_id,
            identity={"community": cfg.community, "building": cfg.building},
            limits=StorageLimits.from_config(cfg.storage),
        )
        self.writer = EventWriter(self.outbox, batch_s=cfg.storage.telemetry_batch_s,
                                  memory_limit=cfg.storage.memory_events, on_stored=self._stored,
                                  on_fault=self._storage_fault)
        bridge = Bridge(loop)
        self.bridge = bridge
        if self._alarm_process is not None:
            pid, sock = self._alarm_process
            link = AlarmLink(sock, heartbeats=self.heartbeats, pid=pid,
                             on_event=bridge.sink(self._event_arrived),
                             on_annunciation=bridge.sink(self._annunciation_changed),
                             on_lost=bridge.sink(self._alarm_process_lost))
            self.alarm_side = RemoteAlarmSide(cfg, link)
            await asyncio.to_thread(self.alarm_side.start)
        else:
            hook = self._on_pins_ready
            self.alarm_side = AlarmSide(cfg, on_event=bridge.sink(self._event_arrived),
                                        on_annunciation=bridge.sink(self._annunciation_changed),
                                        heartbeats=self.heartbeats,
                                        on_pins_ready=None if hook is None else lambda: hook(self))
            self.alarm_side.start()
        self.mqtt_commands = CommandService(
            CommandGate(self.topics, started_at=self.started_at), self.commands,
            lambda topic, body, properties: self.uplink.publish_json(topic, body, properties=properties),
            gateway=cfg.gateway_id, session=lambda: self.outbox.session,
        )
        self.uplink = Uplink(cfg.mqtt, self.outbox, self.topics, birth=self.birth,
                             on_command=self.mqtt_commands.on_message,
                             heartbeat=lambda: self.heartbeats.beat("uplink"))
        self._status = StatusReporter(gateway=cfg.gateway_id, community=cfg.community, building=cfg.building,
                                      software=__version__)
        self.heartbeats.register("uplink", 30.0)
        self.heartbeats.register("loop", 10.0)
        self._tasks = [
            asyncio.create_task(self._writer(), name="outbox-writer"),
            asyncio.create_task(self._maintain_storage(), name="storage-maintenance"),
            asyncio.create_task(self.uplink.run(), name="uplink"),
            asyncio.create_task(self._loop_heartbeat(), name="loop-heartbeat"),
            asyncio.create_task(self._publish_status(), name="status"),
        ]
        await self._start_control()
        # With an alarm process, its own self-check watches its threads; this one the loop and the link.
        watch = (lambda name: name in ("loop", ALARM_PROCESS_PART)) if self._alarm_process else on_alarm_path
        self.selfcheck = SelfCheck(self.heartbeats, self.panel, watch=watch)
        self.selfcheck.start()
        if cfg.runtime.gc_freeze:
            gc.collect()
            gc.freeze()
            release_startup_heap()
        log.info("gateway started", gateway=cfg.gateway_id, session=self.outbox.session, version=__version__,
                 devices=len(cfg.devices), buses=len(cfg.buses))

    async def _start_control(self) -> None:
        """Open the control socket for gatewayctl; without it the gateway still runs (logged)."""
        control = ControlServer(self.cfg.control, self.commands)
        try:
            await control.start()
        except ControlServerError as exc:
            log.error("control socket unavailable; gatewayctl cannot reach this daemon", error=str(exc))
            return
        self.control = control

    async def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Planned stop: flush the outbox to the broker within the bound, say offline, release everything."""
        self.selfcheck.stop()
        if self.control is not None:
            await self.control.stop()
        await self._drain_queue()
        await self.uplink.stop(flush_timeout_s=flush_timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.alarm_side.stop_inputs)
        await self._drain_queue()
        self.alarm_side.close()
        await self.outbox.close()
        log.info("gateway stopped", gateway=self.cfg.gateway_id)

    # ------------------------------------------------------------------------------ loop side

    def _event_arrived(self, event: Event) -> None:
        self.events_seen += 1
        self.writer.put(event)
        for q in self._followers:
            q.put_nowait(event)
        for listener in self._listeners:
            listener(event)

    def _alarm_process_lost(self, reason: str) -> None:
        log.critical("alarm process lost; the daemon stops so that it is restarted", reason=reason)
        self.failed.set()

    def _annunciation_changed(self, annunciation: Annunciation) -> None:
        log.info("annunciator", sound=annunciation.sound.name.lower(), pattern=self.annunciator.sound_pattern,
                 buzzer="on" if annunciation.sound else "off", leds=sorted(annunciation.leds),
                 relays=sorted(annunciation.relays))

    def follow(self) -> asyncio.Queue[Event]:
        """A queue receiving a copy of every new event (for ``--follow``); call :meth:`unfollow` after."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._followers.add(q)
        return q

    def unfollow(self, q: asyncio.Queue[Event]) -> None:
        """Stop feeding a follower queue."""
        self._followers.discard(q)

    def record(self, event: Event) -> None:
        """Store an event made on the loop (operator actions such as a relay test), like any other."""
        self._event_arrived(dataclasses.replace(event, wall=event.wall or time.time()))

    def watch_stored(self) -> asyncio.Event:
        """An asyncio.Event set after every commit of events to the outbox; :meth:`unwatch_stored` after."""
        stored = asyncio.Event()
        self._stored_watchers.add(stored)
        return stored

    def unwatch_stored(self, stored: asyncio.Event) -> None:
        """Stop setting a watcher from :meth:`watch_stored`."""
        self._stored_watchers.discard(stored)

    async def _drain_queue(self) -> None:
        await self.writer.flush()

    async def _writer(self) -> None:
        """Commit events (gateway.uplink.writer): alarms at once, telemetry batched, held in memory on trouble."""
        await self.writer.run()

    async def _maintain_storage(self) -> None:
        """History retention, size cap and free-disk watermark, every STORAGE_MAINTENANCE_S."""
        while True:
            await asyncio.sleep(STORAGE_MAINTENANCE_S)
            generation = self.outbox.generation
            try:
                await self.outbox.maintain()
            except sqlite3.Error as exc:
                log.warning("storage maintenance failed; retried later", error=str(exc))
                with contextlib.suppress(sqlite3.Error, OSError):
                    await self.outbox.recover(exc, generation=generation)

    def _storage_fault(self, code: str, present: bool, detail: str | None) -> None:
        """Storage faults go through the alarm panel: trouble signal and fault LED while present."""
        self.panel.gateway_fault(code, present, detail)

    async def storage_status(self) -> dict[str, Any]:
        """Outbox figures (backlog, oldest undelivered age, evictions by class, sizes) and the in-memory side."""
        return {**await self.outbox.stats(), **self.writer.stats()}

    def _stored(self, batch: Sequence[Event], ids: Sequence[str]) -> None:
        for watcher in self._stored_watchers:
            watcher.set()
        for event, event_id in zip(batch, ids, strict=True):
            if event.kind == "telemetry":
                log.info("reading", device=event.device, value=event.value, measure=event.measure,
                         event_id=event_id)
            else:
                log.info("event stored", kind=event.kind, action=event.action, device=event.device,
                         alarm_level=event.level, code=event.code, value=event.value, event_id=event_id)

    async def _loop_heartbeat(self) -> None:
        while True:
            self.heartbeats.beat("loop")
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------------------ state

    def birth(self) -> dict[str, Any]:
        """Full current state: every device, a config summary, software version, session counter."""
        cfg = self.cfg
        return birth_message(
            gateway=cfg.gateway_id, community=cfg.community, building=cfg.building, session=self.outbox.session,
            software=__version__, snapshot=self.panel.snapshot(),
            config={"units": [u.id for u in cfg.units], "households": len(cfg.households),
                    "devices": len(cfg.devices), "buses": [b.id for b in cfg.buses]},
        )

    async def status_message(self) -> dict[str, Any]:
        """The status message (schemas/status.json); its link-quality window restarts here."""
        up = self.uplink
        return self._status.build(
            session=self.outbox.session, backlog=await self.outbox.backlog(), snapshot=self.panel.snapshot(),
            uplink=UplinkFigures(rtt_ms=up.rtt_ms, connections=up.connections, delivered=up.delivered_total,
                                 rejected=up.rejected_total, inflight=up.inflight),
            buses=[BusCounters(bus_id, p.polls, p.errors, p.port_lost) for bus_id, p in self.buses.items()],
            storage=await self.storage_status(),
        )

    async def _publish_status(self) -> None:
        """Status after every connect and every STATUS_INTERVAL_S while connected."""
        published_for = 0
        due = 0.0
        while True:
            up = self.uplink
            fresh = up.connected and (up.connections != published_for or time.monotonic() >= due)
            if fresh and up.publish_json(self.topics.status, await self.status_message()):
                published_for = up.connections
                due = time.monotonic() + STATUS_INTERVAL_S
            await asyncio.sleep(STATUS_CHECK_S)


# ------------------------------------------------------------------------------------------- entry


async def _serve(cfg: SiteConfig, *, duration: float | None,
                 alarm_process: tuple[int | None, socket.socket] | None = None) -> int:
    notifier = Notifier()
    gateway = Gateway(cfg, alarm_process=alarm_process)
    try:
        await gateway.start()
    except AlarmLinkError as exc:
        log.critical("the alarm path could not start", error=str(exc))
        return 1
    watchdog = Watchdog(gateway.heartbeats, notifier, status_text=lambda: _summary(gateway))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready()
    notifier.status(_summary(gateway))
    watchdog.start()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(gateway.failed.wait())]
    try:
        await asyncio.wait(waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        notifier.stopping()
        watchdog.stop()
        await gateway.stop()
    return 1 if gateway.failed.is_set() else 0


def _summary(gateway: Gateway) -> str:
    snap = gateway.panel.snapshot()
    faults = sum(1 for d in snap["devices"] if d["faults"])
    return (f"{len(snap['devices']) - faults} devices ok, {faults} fault, "
            f"uplink {'up' if gateway.uplink.connected else 'down'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gatewayd``."""
    parser = argparse.ArgumentParser(prog="gatewayd", description="Building safety gateway daemon")
    parser.add_argument("--config", default="/etc/gateway/building.toml", help="site config (TOML)")
    parser.add_argument("--demo", action="store_true", help="run a simulated building and play a gas leak")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    if args.demo:
        from gateway.demo import run_demo

        return run_demo(duration=args.duration or 30.0)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"gatewayd: config error: {exc}", file=sys.stderr)
        log.error("config error", key=exc.path, reason=exc.reason)
        return EX_CONFIG
    raise_priority(0, "main")
    alarm_process = fork_alarm_process(cfg)
    return asyncio.run(_serve(cfg, duration=args.duration, alarm_process=alarm_process))


if __name__ == "__main__":
    sys.exit(main())
