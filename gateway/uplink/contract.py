"""The MQTT contract with the central server: message builders, schemas and the remote-command door.

Every message the gateway publishes (availability, birth, status, event, command result) and every command it
accepts has a JSON Schema (Draft 2020-12) in ``gateway/uplink/schemas/``; docs/mqtt.md explains them.

Commands arrive on ``<base>/command/<name>``. :class:`CommandGate` decides, without I/O, whether one may run:
size, UTF-8, JSON, the command's struct (:class:`CommandMessage`: it accepts what ``command.json`` accepts,
tests/test_contract.py holds them to it), target building, validity window (``issued_at``/``expires_at``) and
replay (a seen id). :class:`CommandService` runs admitted commands through the one command handler shared with
the CLI and publishes exactly one result per command — on the MQTT 5 response topic with its correlation data
when one was given (and lies in the gateway's reply subtree), otherwise on ``<base>/reply``.

Replays across restarts: the id of every admitted command is kept until its command expires (at most
:data:`MAX_VALIDITY_S` after issue) in memory and, before the command runs, on disk (:class:`SeenStore`, a
small SQLite file beside the outbox), so a restart does not forget it and a replay is answered ``replayed``.
An unseen command issued before this process started is still refused as ``stale`` (allowing
:data:`STALE_GRACE_S` for times given in whole seconds). Both are judged by the wall clock, so while the clock
is not synchronised (a Pi has no real-time clock until NTP answers; its start time may be hours off) every
command is refused as ``clock_unsynchronised``.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import inspect
import json
import math
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import msgspec
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.clock import command_clock_synchronised
from gateway.command_args import REMOTE, RemoteTime, reason, typename
from gateway.uplink.topics import Topics
from gateway.validation import Problem, convert

__all__ = [
    "COMMANDS",
    "COMMAND_VERSION",
    "MAX_COMMAND_BYTES",
    "MAX_VALIDITY_S",
    "MESSAGE_VERSION",
    "SCHEMA_NAMES",
    "Command",
    "CommandGate",
    "CommandService",
    "Rejected",
    "SeenIds",
    "SeenStore",
    "StatusReporter",
    "availability_message",
    "birth_message",
    "command_message",
    "command_result",
    "iso_time",
    "schema",
    "schema_name",
    "validator",
]

log = structlog.get_logger()

#: ``version`` of every message the gateway publishes. 2 added ``install`` (the installation's identity) to
#: every message and to event ids, and ``sent``/``age_s`` to events (docs/mqtt.md, "Versions").
MESSAGE_VERSION = 2
#: ``version`` of the commands the gateway accepts (unchanged).
COMMAND_VERSION = 1
SCHEMA_DIR = Path(__file__).with_name("schemas")
SCHEMA_NAMES = ("availability", "birth", "status", "event", "command", "command_result")
#: The remote commands; ``read`` and ``config_show`` stay local (``gatewayctl`` on the gateway).
COMMANDS = ("silence", "reset", "test", "status", "rebirth", "events", "buzzer_test", "relay_test", "scan")
#: Larger command payloads are refused before they are decoded.
MAX_COMMAND_BYTES = 8192
#: Deepest JSON nesting a command may have (a valid one needs 3).
MAX_COMMAND_DEPTH = 8
#: Longest validity window (expires_at - issued_at) a command may ask for.
MAX_VALIDITY_S = 300.0
#: How far in the future issued_at may lie (clock difference between server and gateway).
MAX_CLOCK_SKEW_S = 30.0
#: A command issued up to this long before the gateway started is not yet stale (times in whole seconds).
STALE_GRACE_S = 1.0
#: Unexpired command ids remembered at most; beyond that new commands are refused as busy.
SEEN_CAPACITY = 4096
SEEN_CACHE_KIB = 128  # SQLite page cache of the seen-ids file (its default is 2 MiB)
MAX_REASON = 300
#: A command id, exactly (JSON Schema patterns are searched, so ``$`` would let a trailing newline through).
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
_ID = re.compile(ID_PATTERN)
STATES = ("unknown", "normal", "warmup", "fault", "supervisory", "test", "low_alarm", "high_alarm", "fire")


# ------------------------------------------------------------------------------------------- schemas


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """The JSON Schema of message ``name`` (one of :data:`SCHEMA_NAMES`)."""
    if name not in SCHEMA_NAMES:
        raise KeyError(name)
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return loaded


@functools.cache
def validator(name: str) -> Any:
    """A checked ``jsonschema`` Draft 2020-12 validator for message ``name``, for tests and tools that hold
    messages to the published contract. jsonschema is a test dependency: the gateway itself checks commands
    with :class:`CommandMessage` and never imports it.
    """
    from jsonschema import Draft202012Validator

    s = schema(name)
    Draft202012Validator.check_schema(s)
    return Draft202012Validator(s)


def iso_time(wall: float) -> str:
    """UTC ISO 8601 with milliseconds and ``Z`` (the same form as an event's ``time``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


# ------------------------------------------------------------------------------------------- builders


def availability_message(
    *, gateway: str, community: str, building: str, state: str, session: int, reason: str | None = None,
    wall: float | None = None, install: str | None = None,
) -> dict[str, Any]:
    """online / offline (``reason``: "connection lost" for the Will, "planned stop" before a planned stop)."""
    body: dict[str, Any] = {
        "version": MESSAGE_VERSION, "type": "availability", "gateway": gateway, "community": community,
        "building": building, **_install(install), "state": state, "session": session,
        "time": iso_time(time.time() if wall is None else wall),
    }
    if reason is not None:
        body["reason"] = reason
    return body


#: Fields of a device in the birth message, taken from the alarm core's snapshot (its monotonic times stay home).
DEVICE_FIELDS = ("device", "kind", "unit", "household", "state", "latched", "condition_present", "silenced",
                 "value", "quality", "measure", "faults", "supervisory", "comm_errors", "failures")


def device_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A device as published in the birth message (exactly :data:`DEVICE_FIELDS`); the value of a reading of
    ``bad`` quality is withheld, as in telemetry."""
    out = {k: state.get(k) for k in DEVICE_FIELDS}
    if out["quality"] == "bad":
        out["value"] = None
    return out


def birth_message(
    *, gateway: str, community: str, building: str, session: int, software: str, config: Mapping[str, Any],
    snapshot: Mapping[str, Any], wall: float | None = None, install: str | None = None,
    last_seq: int | None = None, sessions: Sequence[tuple[int, int]] = (),
    sms: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Full current state: every device (``snapshot`` from ``AlarmPanel.snapshot()``) and a config summary;
    where each session ended: ``last_seq`` of this one so far, ``sessions`` the (session, last seq) of earlier
    ones still held (docs/mqtt.md, "Filling a gap").

    ``sms``: the SMS path as the panel reports it (``gatewayctl status --json``); the birth keeps its modem
    (identity, operator, signal), never a phone number. ``install`` may be left out here: the uplink adds its
    outbox's identity to every message it publishes.
    """
    ends: dict[str, Any] = {} if last_seq is None else {
        "last_seq": last_seq, "sessions": [{"session": s, "last_seq": last} for s, last in sessions]}
    return {
        "version": MESSAGE_VERSION, "type": "birth", "gateway": gateway, "community": community,
        "building": building, **_install(install), "session": session, **ends, "software": software,
        "time": iso_time(time.time() if wall is None else wall),
        "config": dict(config),
        "devices": [device_state(d) for d in snapshot["devices"]],
        "annunciator": {"sound": snapshot["annunciation"].sound.name.lower()},
        **({} if sms is None else {"sms": {k: v for k, v in _sms_block(sms).items() if k in _SMS_BIRTH}}),
    }


#: The transmission path's figures a status message carries (gateway/panel/transmission.py).
_TRANSMISSION = ("path", "down_for_s", "down_reason", "waiting", "oldest_waiting_s", "fault")
#: What the modem said when last asked (gateway/sms/modem.py, ``ModemHealth``): no number, no IMSI.
_MODEM = ("problem", "sim", "registered", "network", "operator", "signal_percent", "manufacturer", "model")
_SMS_COUNTS = ("owed", "pending", "sent", "held_back")
_SMS_BIRTH = ("configured", "process", "reason", "modem")


def _transmission_block(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The transmission path for the status message: up or down, urgent events waiting for their PUBACK."""
    return {key: figures.get(key) for key in _TRANSMISSION}


def _sms_block(status: Mapping[str, Any]) -> dict[str, Any]:
    """The SMS path for status and birth: configured, process up or down, the modem's health and the queue's
    counts. Only named fields are copied, so a phone number never leaves the gateway."""
    if not status.get("configured"):
        return {"configured": False}
    out: dict[str, Any] = {"configured": True, "process": "up" if status.get("process") == "up" else "down"}
    if out["process"] == "down":
        return {**out, "reason": str(status.get("reason") or "the sms process is down")}
    modem = status.get("modem") or {}
    out["modem"] = {key: modem.get(key) for key in _MODEM}
    out.update({key: int(status.get(key) or 0) for key in _SMS_COUNTS})
    return out


@dataclass(frozen=True, slots=True)
class BusCounters:
    """A bus thread's poll counters at one moment, with its wire floor and last full cycle (seconds; None
    where not known), and whether its polling is paused (an address scan)."""

    bus: str
    polls: int
    errors: int
    port_lost: bool
    floor_s: float | None = None
    cycle_s: float | None = None
    paused: bool = False
    #: The bus's own failed polls by kind (they add up to ``errors``); None: summed from its devices'.
    errors_by_kind: Mapping[str, int] | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass(frozen=True, slots=True)
class UplinkFigures:
    """The uplink's health figures at one moment."""

    rtt_ms: float | None
    connections: int
    delivered: int
    rejected: int
    inflight: int


class StatusReporter:
    """Builds status messages; each bus's success ratio covers the time since the previous status."""

    def __init__(self, *, gateway: str, community: str, building: str, software: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._identity = {"gateway": gateway, "community": community, "building": building}
        self._software = software
        self._clock = clock
        self._started = clock()
        self._window_start = self._started
        self._previous: dict[str, BusCounters] = {}

    def build(
        self, *, session: int, uplink: UplinkFigures, backlog: tuple[int, float | None],
        snapshot: Mapping[str, Any], buses: Sequence[BusCounters], wall: float | None = None,
        storage: Mapping[str, Any] | None = None, last_seq: int | None = None,
        transmission: Mapping[str, Any] | None = None, sms: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One status message (advances the link-quality window); ``last_seq``: the last seq stored in
        this session; ``transmission`` and ``sms``: the second path as ``gatewayctl status --json`` has it."""
        now_wall = time.time() if wall is None else wall
        now = self._clock()
        waiting, oldest = backlog
        by_state = dict.fromkeys(STATES, 0)
        link_devices = []
        bus_kinds: dict[str, dict[str, int]] = {}
        for d in snapshot["devices"]:
            by_state[str(d["state"])] = by_state.get(str(d["state"]), 0) + 1
            kinds = {str(k): int(v) for k, v in (d.get("errors_by_kind") or {}).items()}
            if d.get("comm_errors") or d.get("failures"):
                link_devices.append({"device": d["device"], "comm_errors": int(d["comm_errors"]),
                                     "failures": int(d["failures"]), "errors_by_kind": kinds})
            if d.get("bus"):
                on_bus = bus_kinds.setdefault(str(d["bus"]), {})
                for kind, count in kinds.items():
                    on_bus[kind] = on_bus.get(kind, 0) + count
        bus_rows = []
        for b in buses:
            before = self._previous.get(b.bus, BusCounters(b.bus, 0, 0, False))
            polls, errors = max(0, b.polls - before.polls), max(0, b.errors - before.errors)
            bus_rows.append({"bus": b.bus, "port_lost": b.port_lost, "paused": b.paused, "polls": b.polls,
                             "errors": b.errors,
                             "window_polls": polls, "window_errors": errors,
                             "success_ratio": round((polls - min(errors, polls)) / polls, 4) if polls else None,
                             "floor_ms": _ms(b.floor_s), "cycle_ms": _ms(b.cycle_s),
                             "errors_by_kind": dict(sorted((b.errors_by_kind if b.errors_by_kind is not None
                                                            else bus_kinds.get(b.bus, {})).items()))})
            self._previous[b.bus] = b
        window = now - self._window_start
        self._window_start = now
        message = {
            "version": MESSAGE_VERSION, "type": "status", **self._identity, "session": session,
            **({} if last_seq is None else {"last_seq": last_seq}),
            "software": self._software, "time": iso_time(now_wall), "uptime_s": round(now - self._started, 3),
            "uplink": {"rtt_ms": None if uplink.rtt_ms is None else round(uplink.rtt_ms, 3),
                       "connections": uplink.connections, "delivered": uplink.delivered,
                       "rejected": uplink.rejected, "inflight": uplink.inflight},
            "backlog": {"events": waiting,
                        "oldest_age_s": None if oldest is None else round(max(0.0, now_wall - oldest), 3)},
            "devices": {"total": len(snapshot["devices"]), "by_state": by_state},
            "links": {"window_s": round(window, 3), "buses": bus_rows, "devices": link_devices},
            "annunciator": {"sound": snapshot["annunciation"].sound.name.lower()},
        }
        if storage is not None:
            message["storage"] = {
                "fault": storage.get("storage_fault"),
                "history": int(storage.get("history", 0)),
                "evicted_undelivered": dict(storage.get("evicted_undelivered", {})),
                "evicted_delivered": dict(storage.get("evicted_delivered", {})),
                "dropped_in_memory": dict(storage.get("dropped_in_memory", {})),
                "used_bytes": int(storage.get("used_bytes", 0)),
                "max_bytes": int(storage.get("max_bytes", 0)),
            }
        if transmission is not None:
            message["transmission"] = _transmission_block(transmission)
        if sms is not None:
            message["sms"] = _sms_block(sms)
        return message


def command_result(
    *, gateway: str, community: str, building: str, session: int, command_id: str | None, command: str | None,
    code: str, reason: str | None = None, data: Mapping[str, Any] | None = None, wall: float | None = None,
    install: str | None = None,
) -> dict[str, Any]:
    """The answer to one command: ``code`` "ok" = accepted, "failed" = accepted but not carried out,
    anything else says why it was rejected."""
    return {
        "version": MESSAGE_VERSION, "type": "command_result", "gateway": gateway, "community": community,
        "building": building, **_install(install), "session": session,
        "time": iso_time(time.time() if wall is None else wall),
        "id": command_id, "command": command,
        "status": "accepted" if code == "ok" else "failed" if code == "failed" else "rejected",
        "code": code, "reason": None if reason is None else _clip(reason), "data": _jsonable(data),
    }


def command_message(
    command: str, *, community: str, building: str, args: Mapping[str, Any] | None = None,
    command_id: str | None = None, issued_at: float | None = None, ttl_s: float = 60.0,
) -> dict[str, Any]:
    """A command as the central server sends it (schemas/command.json)."""
    issued = time.time() if issued_at is None else issued_at
    body: dict[str, Any] = {
        "version": COMMAND_VERSION, "id": command_id or uuid.uuid4().hex, "command": command,
        "issued_at": iso_time(issued), "expires_at": iso_time(issued + ttl_s),
        "target": {"community": community, "building": building},
    }
    if args is not None:
        body["args"] = dict(args)
    return body


def schema_name(topics: Topics, topic: str) -> str | None:
    """Which schema a message on ``topic`` (in this gateway's subtree) follows; None outside the contract."""
    base = topics.base + "/"
    if not topic.startswith(base):
        return None
    rest = topic[len(base):]
    if rest in ("availability", "birth", "status"):
        return rest
    if rest.startswith("event/"):
        return "event"
    if rest.startswith("command/"):
        return "command"
    if topics.is_reply_topic(topic):
        return "command_result"
    return None


# ------------------------------------------------------------------------------------------- commands


class Rejected(Exception):
    """A command that may not run: ``code`` (see command_result.json) and a reason for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = _clip(reason)


@dataclass(frozen=True, slots=True)
class Command:
    """An admitted command."""

    id: str
    name: str
    args: Mapping[str, Any]
    issued_at: float
    expires_at: float


class SeenStore:
    """Ids of admitted commands on disk until they expire: a SQLite file (WAL, synchronous=FULL) beside the
    outbox, written before the command runs, so a replay is recognised after a restart or a power cut."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA cache_size=-{SEEN_CACHE_KIB}")  # a few thousand short rows
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, expires_at REAL NOT NULL)")
        except sqlite3.Error:
            self._db.close()
            raise

    def load(self, limit: int) -> list[tuple[str, float]]:
        """The ids kept, latest expiry first, at most ``limit``."""
        rows = self._db.execute("SELECT id, expires_at FROM seen ORDER BY expires_at DESC LIMIT ?", (limit,))
        return [(str(cid), float(expires)) for cid, expires in rows]

    def add(self, command_id: str, expires_at: float, now: float) -> None:
        """Keep ``command_id`` until ``expires_at`` (committed when this returns); forget the expired ones."""
        with self._db:  # one transaction
            self._db.execute("DELETE FROM seen WHERE expires_at <= ?", (now,))
            self._db.execute("INSERT OR REPLACE INTO seen (id, expires_at) VALUES (?, ?)", (command_id, expires_at))

    def close(self) -> None:
        """Close the file."""
        self._db.close()


class SeenIds:
    """Ids of unexpired admitted commands, each forgotten once its command has expired; with a
    :class:`SeenStore`, also kept on disk and taken back at start (``persistent``)."""

    def __init__(self, capacity: int = SEEN_CAPACITY, store: SeenStore | None = None) -> None:
        self.capacity = capacity
        self.store = store
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        if store is not None:
            for cid, expires in store.load(capacity):
                self._expiry[cid] = expires
                heapq.heappush(self._heap, (expires, cid))

    @property
    def persistent(self) -> bool:
        """Whether the ids survive a restart."""
        return self.store is not None

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._expiry

    def purge(self, now: float) -> None:
        """Forget ids whose command has expired."""
        while self._heap and self._heap[0][0] <= now:
            _, cid = heapq.heappop(self._heap)
            self._expiry.pop(cid, None)

    def check(self, command_id: str, now: float) -> None:
        """:class:`Rejected` (replayed) when ``command_id`` is known and unexpired."""
        self.purge(now)
        if command_id in self._expiry:
            raise Rejected("replayed", f"command id {command_id!r} was already received")

    def add(self, command_id: str, expires_at: float, now: float) -> None:
        """Remember an id until ``expires_at``; :class:`Rejected` (busy) when full, (replayed) when known,
        (error) when it cannot be kept on disk — then the command must not run."""
        self.check(command_id, now)
        if len(self._expiry) >= self.capacity:
            raise Rejected("busy", f"{len(self._expiry)} unexpired commands remembered; retry later")
        if self.store is not None:
            try:
                self.store.add(command_id, expires_at, now)
            except sqlite3.Error as exc:
                log.error("command id not recorded", id=command_id, error=str(exc))
                raise Rejected("error", f"the command id could not be recorded ({exc}); "
                                        "it was not run, send it again later") from None
        self._expiry[command_id] = expires_at
        heapq.heappush(self._heap, (expires_at, command_id))


class CommandGate:
    """Decides whether a command message may run. Pure apart from the clocks and the seen ids; never raises
    but Rejected.

    ``clock`` gives wall time; ``synchronised`` says whether that clock may be trusted (default
    :func:`gateway.clock.command_clock_synchronised`): while it may not, every command is refused.
    """

    def __init__(self, topics: Topics, *, started_at: float, clock: Callable[[], float] = time.time,
                 seen: SeenIds | None = None,
                 synchronised: Callable[[], bool] = command_clock_synchronised) -> None:
        self.topics = topics
        self.started_at = started_at
        self._clock = clock
        self._synchronised = synchronised
        self.seen = seen if seen is not None else SeenIds()  # an empty SeenIds is falsy

    def admit(self, topic: str, payload: bytes) -> Command:
        """The command carried by ``payload`` on ``topic``, or :class:`Rejected` saying why not."""
        name = self.topics.command_name(topic)
        if name is None:
            raise Rejected("unknown_command", "not a command topic of this gateway")
        if len(payload) > MAX_COMMAND_BYTES:
            raise Rejected("too_large", f"{len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
        body = decode_json(payload)
        if not isinstance(body, dict):
            raise Rejected("malformed", f"payload must be a JSON object, got {_json_type(body)}")
        if name not in COMMANDS:
            raise Rejected("unknown_command", f"unknown command {_clip(name, 64)!r}; known: {', '.join(COMMANDS)}")
        if body.get("command") != name:
            raise Rejected("invalid", f"'command' must be {name!r}, the topic's last level")
        message = check_command(name, body)
        if not _ID.fullmatch(message.id):
            raise Rejected("invalid", "id: must be 1-64 letters, digits, '.', '_', ':' or '-'")
        target = message.target
        if (target.community, target.building) != (self.topics.community, self.topics.building):
            raise Rejected("wrong_target", f"addressed to {_clip(target.community, 64)}/"
                                           f"{_clip(target.building, 64)}, this is "
                                           f"{self.topics.community}/{self.topics.building}")
        issued, expires = _instant(message.issued_at, "issued_at"), _instant(message.expires_at, "expires_at")
        if expires <= issued:
            raise Rejected("invalid", "expires_at must be after issued_at")
        if expires - issued > MAX_VALIDITY_S:
            raise Rejected("invalid", f"valid for {expires - issued:.0f} s; at most {MAX_VALIDITY_S:.0f} s")
        if not self._synchronised():
            raise Rejected("clock_unsynchronised", "the gateway's clock is not synchronised (no NTP yet), so "
                                                   "the command's expiry cannot be judged; send it again once "
                                                   "the clock is synchronised")
        now = self._clock()
        if now >= expires:
            raise Rejected("expired", f"expired {now - expires:.1f} s ago")
        if issued > now + MAX_CLOCK_SKEW_S:
            raise Rejected("not_yet_valid", f"issued_at is {issued - now:.0f} s ahead of the gateway's clock")
        self.seen.check(body["id"], now)  # a replay is named as such, even one from before a restart
        if issued < self.started_at - STALE_GRACE_S:
            raise Rejected("stale", "issued before the gateway started; send a new command")
        self.seen.add(body["id"], expires, now)
        return Command(id=message.id, name=name, args=body.get("args", {}), issued_at=issued, expires_at=expires)


class CommandTarget(msgspec.Struct, forbid_unknown_fields=True):
    """The building a command is addressed to."""

    community: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    building: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class CommandMessage(msgspec.Struct, forbid_unknown_fields=True, tag_field="command"):
    """A command as the central server sends it (schemas/command.json); one subclass per command holds its
    ``args`` (:data:`gateway.command_args.REMOTE`)."""

    version: Literal[1]
    id: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$",
                                    description="1-64 letters, digits, '.', '_', ':' or '-'")]
    issued_at: RemoteTime
    expires_at: RemoteTime
    target: CommandTarget


#: The struct of each remote command: the envelope and that command's arguments.
COMMAND_MESSAGES: dict[str, type[CommandMessage]] = {
    name: msgspec.defstruct(
        f"{name}_command", [("args", kind) if required else ("args", kind, msgspec.field(default_factory=kind))],
        bases=(CommandMessage,), tag=name, forbid_unknown_fields=True)  # type: ignore[misc]
    for name, (kind, required) in REMOTE.items()
}


def check_command(name: str, body: Any) -> CommandMessage:
    """``body`` as remote command ``name``; :class:`Rejected` (``invalid``, or ``bad_args`` for its arguments)
    naming the key and the reason."""
    try:
        return convert(body, COMMAND_MESSAGES[name])
    except Problem as problem:
        if problem.path[:1] != ("args",) or (problem.path == ("args",) and problem.kind == "missing"):
            raise Rejected("invalid", f"{problem.key or 'command'}: {problem.reason(typename)}") from None
        inner = dataclasses.replace(problem, path=problem.path[1:])
        # the door's words ("reset: device: must be ..."), keyed from the message's top ("args.device: must be ...")
        said = reason(name, inner, REMOTE[name][0]).removeprefix(f"{name}: ")
        where = "args"
        if inner.path and inner.kind != "unknown":
            where = f"args.{inner.path[0]}"
            said = said.removeprefix(f"{inner.path[0]}: ")
        raise Rejected("bad_args", _clip(f"{where}: {said}", 200)) from None


def decode_json(payload: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth — else Rejected (malformed)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("malformed", f"payload is not UTF-8 (byte {exc.start})") from None
    if _depth(text) > MAX_COMMAND_DEPTH:
        raise Rejected("malformed", f"nested deeper than {MAX_COMMAND_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise Rejected("malformed", f"payload is not JSON: {_clip(str(exc), 120)}") from None


def peek_id(payload: bytes) -> str | None:
    """The command id of a payload, when one can be read and is well-formed (to label a rejection)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        body = decode_json(payload)
    except Rejected:
        return None
    cid = body.get("id") if isinstance(body, dict) else None
    return cid if isinstance(cid, str) and _ID.fullmatch(cid) else None


# ------------------------------------------------------------------------------------------- service


class Handler(Protocol):
    """The command handler shared by MQTT and the CLI (``gateway.control.commands.CommandHandler``).

    ``handle`` returns (or resolves to) an object with ``ok``, ``reason`` and ``data``.
    """

    def handle(self, command: str, args: Mapping[str, Any], *, source: str) -> Any: ...


#: ``publish(topic, body, properties)`` → False when it could not be sent (``Uplink.publish_json``).
Publish = Callable[[str, dict[str, Any], Properties | None], bool]


class CommandService:
    """MQTT commands → gate → handler → one result message each."""

    def __init__(
        self, gate: CommandGate, handler: Handler, publish: Publish, *, gateway: str, session: Callable[[], int],
    ) -> None:
        self.gate = gate
        self.handler = handler
        self._publish = publish
        self._gateway = gateway
        self._session = session
        self.accepted = 0
        self.rejected = 0

    async def on_message(self, msg: Any) -> None:
        """The uplink's command hook: one paho message."""
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        await self.process(msg.topic, bytes(msg.payload), response_topic=response_topic,
                           correlation=bytes(correlation) if correlation is not None else None)

    async def process(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                      correlation: bytes | None = None) -> dict[str, Any]:
        """Admit, run and answer one command; returns the result message it published."""
        topics = self.gate.topics
        reply = topics.reply
        name = topics.command_name(topic)
        command_id: str | None = None
        try:
            if response_topic is not None and not topics.is_reply_topic(response_topic):
                raise Rejected("bad_response_topic", f"response topic must be {reply} or below it")
            if response_topic is not None:
                reply = response_topic
            command = self.gate.admit(topic, payload)
            command_id = command.id
            code, reason, data = await self._run(command)
        except Rejected as exc:
            command_id = command_id or peek_id(payload)
            code, reason, data = exc.code, exc.reason, None
        body = command_result(
            gateway=self._gateway, community=topics.community, building=topics.building, session=self._session(),
            command_id=command_id, command=name if name is None or len(name) <= 64 else name[:64], code=code,
            reason=reason, data=data,
        )
        if code == "ok":
            self.accepted += 1
        else:
            self.rejected += 1
        log.info("command", id=command_id, command=body["command"], status=body["status"], code=code,
                 reason=body["reason"])
        props: Properties | None = None
        if correlation is not None:  # only MQTT 5 messages carry correlation data
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        if not self._publish(reply, body, props):
            log.warning("command result not published (uplink offline)", id=command_id)
        return body

    async def _run(self, command: Command) -> tuple[str, str | None, Mapping[str, Any] | None]:
        try:
            outcome: Any = self.handler.handle(command.name, dict(command.args), source=f"mqtt:{command.id}")
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except Exception as exc:  # a handler bug must not stay unanswered
            log.exception("command handler raised", id=command.id, command=command.name)
            return "error", f"internal error: {type(exc).__name__}", None
        if not outcome.ok:
            data = _as_mapping(outcome.data)
            failed = bool(data and data.get("failed"))  # accepted, but it could not be carried out
            return ("failed" if failed else "refused"), outcome.reason or "refused by the gateway", data or None
        return "ok", outcome.reason, _as_mapping(outcome.data) or None


# ------------------------------------------------------------------------------------------- helpers


def _install(install: str | None) -> dict[str, str]:
    return {} if install is None else {"install": install}


def _clip(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_clip(key, 40)!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _instant(text: str, key: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError) as exc:
        raise Rejected("invalid", f"{key}: {exc}") from None


def _as_mapping(data: Any) -> Mapping[str, Any] | None:
    if data is None:
        return None
    if isinstance(data, Mapping):
        return data
    return {"value": data}


def _jsonable(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Plain JSON data: unknown types as strings, NaN and infinities (not JSON) as null."""
    if data is None:
        return None
    loaded: dict[str, Any] = _finite(json.loads(json.dumps(dict(data), default=str)))
    return loaded


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

