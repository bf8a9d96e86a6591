"""``gatewayctl``: the technician's command line, a client of the daemon's control socket.

``--config FILE`` (default ``/etc/gateway/building.toml``) says where the socket and the database are.
Every command that prints data takes ``--json``. Colour on a terminal, plain text when piped.
With the daemon down, ``status`` and ``events`` read the database read-only and say so; the other commands
exit 3. Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unavailable, 4 rejected (see docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import errno
import grp
import json
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TextIO

from gateway import __version__
from gateway.config import DEFAULT_SOCKET, ConfigError, StorageConfig, bus_floor_warnings, load_config
from gateway.events import KIND_PRIORITY

__all__ = ["ControlClient", "DaemonUnavailable", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REJECTED = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/gateway/building.toml"
REPLY_TIMEOUT_S = 30.0


class CliError(Exception):
    """A failure to report with ``code`` (1 error, 3 daemon unavailable)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailable(CliError):
    """Nothing answers on the control socket."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_UNAVAILABLE)


# ------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    """Where the daemon of a site config listens and stores."""

    config: str
    socket: str
    database: str


def site_paths(config_path: str) -> Paths:
    """Socket and database paths from the site config, read without validating the rest.

    The technician may not be allowed to read the MQTT credentials file the full validation opens.
    """
    p = Path(config_path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"config file not found: {p} (use --config FILE)") from None
    except PermissionError:
        raise CliError(f"cannot read {p}: permission denied (add yourself to group gateway)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read {p}: {exc}") from None

    def setting(table: str, key: str, default: str) -> str:
        section = data.get(table)
        value = section.get(key) if isinstance(section, dict) else None
        if value is None:
            return default
        if not isinstance(value, str):
            raise CliError(f"{p}: {table}.{key}: must be a string")
        return value if Path(value).is_absolute() else str(p.parent / value)

    return Paths(str(p), setting("control", "socket", DEFAULT_SOCKET),
                 setting("storage", "path", StorageConfig().path))


# ------------------------------------------------------------------------------------------- client


def _group_of(path: str) -> str:
    """The group that owns the socket (the group that gives access to it); ``gateway`` when it cannot be seen."""
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "gateway"


class ControlClient:
    """One connection to the control socket; JSON lines as described in docs/cli.md."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonUnavailable(f"the daemon is not running (nothing listens on {path})") from None
        except PermissionError:
            self._sock.close()
            group = _group_of(path)
            raise CliError(f"permission denied on {path}: add yourself to group {group} "
                           f"(sudo usermod -aG {group} $USER, then log in again)") from None
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise DaemonUnavailable(f"the daemon is not running ({path} is not a socket)") from None
            raise CliError(f"cannot connect to {path}: {exc.strerror}") from None
        self._file = self._sock.makefile("rb")
        self._next_id = 0

    def close(self) -> None:
        """Hang up."""
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, command: str, args: dict[str, Any], *, timeout: float | None = REPLY_TIMEOUT_S,
                on_stream: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Send one request and return its final response; streamed lines go to ``on_stream``."""
        self._next_id += 1
        rid = self._next_id
        line = json.dumps({"id": rid, "command": command, "args": args}) + "\n"
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(line.encode())
            while True:
                raw = self._file.readline()
                if not raw:
                    raise CliError("the daemon closed the connection without an answer", EXIT_UNAVAILABLE)
                message = json.loads(raw)
                if not isinstance(message, dict) or message.get("id") not in (rid, None):
                    raise CliError(f"unexpected answer from the daemon: {raw[:200]!r}")
                if "stream" in message:
                    if on_stream is not None:
                        on_stream(message["stream"])
                    continue
                return message
        except TimeoutError:
            raise CliError(f"no answer from the daemon within {timeout:g} s") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CliError("the daemon sent a malformed answer") from None
        except (ConnectionResetError, BrokenPipeError):
            raise CliError("the daemon closed the connection", EXIT_UNAVAILABLE) from None


# ------------------------------------------------------------------------------------------- output


class Style:
    """ANSI colour on a terminal (unless NO_COLOR is set), nothing when piped."""

    CODES: ClassVar[dict[str, str]] = {
        "red": "1;31", "green": "32", "yellow": "33", "magenta": "35", "cyan": "36", "dim": "2", "bold": "1",
    }

    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"

    def __call__(self, text: str, colour: str | None) -> str:
        if not self.on or colour is None:
            return text
        return f"\033[{self.CODES[colour]}m{text}\033[0m"


STATE_COLOURS = {"normal": "green", "fault": "yellow", "supervisory": "magenta", "test": "cyan",
                 "warmup": "dim", "unknown": "dim"}


def _state_colour(state: str) -> str | None:
    if state.endswith("_alarm") or state == "fire":
        return "red"
    return STATE_COLOURS.get(state)


def _when(wall: float | None) -> str:
    if wall is None:
        return "—"
    return dt.datetime.fromtimestamp(wall).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}h {m:02d}m" if d else (f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s")


#: How a technician reads each error kind (drivers.modbus.FRAME_ERROR_KINDS); exceptions go by their name.
ERROR_KIND_LABELS = {
    "timeout": "timeout", "crc_error": "CRC error", "wrong_address": "wrong address",
    "truncated_frame": "truncated frame", "overlong_frame": "over-long frame", "wrong_function": "wrong function",
    "bad_response": "bad answer", "port": "port lost", "driver_error": "driver error",
}


def error_kind_label(kind: str) -> str:
    """``crc_error`` → "CRC error"; ``exception:illegal_data_address`` → "illegal data address"."""
    if kind.startswith("exception:"):
        return kind.removeprefix("exception:").replace("_", " ")
    return ERROR_KIND_LABELS.get(kind, kind.replace("_", " "))


def _kinds(by_kind: dict[str, int] | None, before: str = "", after: str = "") -> str:
    """Failed polls by kind, most first: "timeout 5, CRC error 2" ("" when there are none)."""
    if not by_kind:
        return ""
    ranked = sorted(by_kind.items(), key=lambda item: (-item[1], item[0]))
    return before + ", ".join(f"{error_kind_label(kind)} {count}" for kind, count in ranked) + after


def _cycle(bus: dict[str, Any]) -> str:
    """", cycle 2.71 s (floor 2.64 s)" when the bus reports them: the measured cycle beside the wire's floor."""
    cycle, floor = bus.get("cycle_s"), bus.get("floor_s")
    if floor is None:
        return ""
    return f", cycle {'—' if cycle is None else f'{cycle:.2f} s'} (floor {floor:.2f} s)"


def _value(value: Any, measure: Any) -> str:
    if value is None:
        return "—"
    text = f"{value:g}" if isinstance(value, float | int) else str(value)
    return f"{text} {measure}" if measure else text


def _table(headers: list[str], rows: list[list[str]], style: Style, colours: list[list[str | None]] | None = None
           ) -> Iterator[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    yield style("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), "bold")
    for n, row in enumerate(rows):
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
            colour = colours[n][i] if colours else None
            cells.append(style(cell.ljust(w) if i < len(row) - 1 else cell, colour))
        yield "  ".join(cells).rstrip()


def render_reset(d: Mapping[str, Any], style: Callable[[str, str], str]) -> Iterator[str]:
    """What a reset did: latches cleared, walk tests ended, alarms still present."""
    reset, ended = d.get("reset", []), d.get("tests_ended", [])
    if reset:
        yield f"reset: latch cleared for {', '.join(reset)}"
    if ended:
        yield f"walk test ended for {', '.join(ended)}"
    if d.get("still_active"):
        yield style(f"still in alarm (condition present, latch kept): {', '.join(d['still_active'])}", "red")
    if not reset and not ended and not d.get("still_active"):
        yield "reset: nothing was latched and no walk test was running"


def render_walk_test(d: Mapping[str, Any], style: Callable[[str, str], str]) -> Iterator[str]:
    """Which devices a walk test started on, and which it skipped and why."""
    started = d.get("started", [])
    if started:
        yield (f"walk test started for {len(started)} device(s): {', '.join(started)}; "
               "detections are recorded as tests, not alarms")
    else:
        yield "walk test started for no device"
    for item in d.get("skipped", []):
        yield style(f"skipped {item['device']}: {item['reason']}", "yellow")


def render_status(data: dict[str, Any], style: Style, *, daemon_down: str | None = None) -> Iterator[str]:
    """Human-readable status."""
    gw = data["gateway"]
    if daemon_down:
        yield style(f"DAEMON DOWN: {daemon_down}", "red")
        yield f"Gateway   {gw['id']}  (last session {gw.get('session') or '—'}; from {gw['database']}, read-only)"
    else:
        storage_pid = (gw.get("uplink_process") or {}).get("pid")
        yield (f"Gateway   {gw['id']}  v{gw['version']}  session {gw['session'] or '—'}"
               f"  up {_duration(gw['uptime_s'])}  pid {gw['pid']}"
               + (f" (storage {storage_pid})" if storage_pid else ""))
    up = data["uplink"]
    oldest = up.get("oldest_undelivered_age_s")
    backlog = f"backlog {up.get('backlog', '?')}" + (f" (oldest {_age(oldest)})" if oldest is not None else "")
    if daemon_down:
        yield f"Uplink    unknown (daemon down)  {backlog}"
    elif up.get("process") == "down":
        process = gw.get("uplink_process") or {}
        held = data["storage"].get("held_by_panel", 0)
        why = process.get("last_exit") or up.get("reason") or "starting"
        yield (style("STORAGE/UPLINK PROCESS DOWN", "red")
               + f"  the panel holds {held} events; it is started again automatically ({why})")
    else:
        link = style("connected", "green") if up["connected"] else style("DISCONNECTED", "red")
        rtt = f"{up['rtt_ms']:g} ms" if up["rtt_ms"] is not None else "—"
        error = f"  last error: {up['last_error']}" if up.get("last_error") and not up["connected"] else ""
        yield f"Uplink    {link} to {up['broker']}  round-trip {rtt}  {backlog}{error}"
    ann = data.get("annunciator")
    if ann is not None:
        loud = ann["sound"] not in ("quiet",)
        sound = style(ann["sound"].upper() if loud else ann["sound"], "red" if ann["sound"] in ("gas", "fire")
                      else ("yellow" if loud else None))
        relays = ", ".join(f"{k} {'ON' if v else 'off'}" for k, v in sorted(ann["relays"].items())) or "—"
        yield (f"Sounder   {sound}  pattern {ann['pattern'] or '—'}  buzzer {'on' if ann['buzzer_on'] else 'off'}"
               f"  LEDs {', '.join(ann['leds']) or '—'}  relays {relays}")
    storage = data.get("storage")
    if storage is not None:
        evicted = sum(storage.get("evicted_undelivered", {}).values())
        dropped = sum(storage.get("dropped_in_memory", {}).values())
        fault = storage.get("storage_fault")
        yield (f"Storage   {style(fault.upper(), 'red') if fault else 'ok'}  history {storage.get('history', 0)}"
               f"  evicted undelivered {evicted}, delivered {sum(storage.get('evicted_delivered', {}).values())}"
               f"  dropped in memory {dropped}")
    for bus in data.get("buses", []):
        if bus["port_lost"]:
            state = style("PORT LOST", "red")
        elif bus["paused"]:
            state = style("POLLING PAUSED (no alarms read; trouble signal)", "yellow")
        else:
            state = "polling" + (" (address scan between pause windows)" if bus.get("scanning") else "")
        yield (f"Bus       {bus['id']} {bus['port']}: {state}, "
               f"{bus['polls']} polls, {bus['errors']} errors{_kinds(bus.get('errors_by_kind'), ' (', ')')}"
               f"{_cycle(bus)}")
    yield from _second_path_lines(data, style)
    yield ""
    rows, colours = [], []
    for d in data["devices"]:
        where = f"{d['household']} / {d['unit']}" if d.get("household") else f"— / {d['unit']}"
        problems = [*d.get("faults", []), *d.get("supervisory", [])]
        if d.get("latched") and d["state"] not in ("low_alarm", "high_alarm", "fire"):
            problems.append(f"latched {d['latched']}")
        link = _kinds(d.get("errors_by_kind")) or "—"
        rows.append([where, d["device"], d["kind"], d["state"], _value(d["value"], d.get("measure")),
                     _age(d.get("last_seen_age_s")), ", ".join(problems) or "—", link])
        colours.append([None, None, None, _state_colour(d["state"]), None, None,
                        "yellow" if problems else None, "yellow" if link != "—" else None])
    yield from _table(["HOUSEHOLD / UNIT", "DEVICE", "KIND", "STATE", "LAST VALUE", "LAST SEEN", "FAULT",
                       "FAILED POLLS"], rows, style, colours)


EVENT_COLOURS = {"alarm": "red", "fault": "yellow", "supervisory": "magenta", "test": "cyan",
                 "telemetry": "dim"}


def event_row(e: dict[str, Any]) -> list[str]:
    what = e.get("level") or e.get("code") or ""
    detail = e.get("detail") or ""
    source = e.get("source") or ""
    return [_when(e.get("wall")), e.get("kind", ""), e.get("action", ""), e.get("device") or "—",
            e.get("household") or e.get("unit") or "—", what, _value(e.get("value"), e.get("measure")),
            "yes" if e.get("delivered") else "no", "; ".join(x for x in (source, detail) if x)]


EVENT_HEADERS = ["TIME", "KIND", "ACTION", "DEVICE", "WHERE", "LEVEL/CODE", "VALUE", "SENT", "SOURCE / DETAIL"]


def render_events(events: list[dict[str, Any]], style: Style) -> Iterator[str]:
    """Human-readable history table."""
    if not events:
        yield "no events"
        return
    rows = [event_row(e) for e in events]
    colours: list[list[str | None]] = [[None, EVENT_COLOURS.get(e.get("kind", ""))] + [None] * 7 for e in events]
    yield from _table(EVENT_HEADERS, rows, style, colours)


def render_event_line(e: dict[str, Any], style: Style) -> str:
    """One followed event on one line."""
    cells = event_row(e)
    cells[1] = style(cells[1], EVENT_COLOURS.get(e.get("kind", "")))
    return "  ".join(c for c in cells if c)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


# ------------------------------------------------------------------------------------------- offline


async def _offline_query(database: str, query: dict[str, Any]) -> dict[str, Any]:
    """History and a summary from the database file, opened read-only (the daemon is down)."""
    import aiosqlite

    from gateway.uplink.outbox import query_history

    if not Path(database).exists():
        raise CliError(f"the daemon is not running and there is no database at {database}", EXIT_UNAVAILABLE)
    uri = f"file:{Path(database).resolve()}?mode=ro"
    try:
        async with aiosqlite.connect(uri, uri=True) as db:
            await db.execute("PRAGMA busy_timeout = 2000")
            meta = {k: v for k, v in await (await db.execute("SELECT key, value FROM meta")).fetchall()}
            backlog, oldest = await (await db.execute(
                "SELECT COUNT(*), MIN(wall) FROM events WHERE delivered = 0")).fetchone() or (0, None)
            events = await query_history(db, **query) if query else []
            latest = await (await db.execute(
                "SELECT e.device, e.unit, e.household, e.kind, e.action, e.wall, e.payload FROM events e"
                " JOIN (SELECT device, MAX(seq) AS seq FROM events WHERE device IS NOT NULL GROUP BY device) m"
                " ON e.seq = m.seq ORDER BY e.device")).fetchall()
    except Exception as exc:  # sqlite3.Error and friends: report, never a traceback
        raise CliError(f"the daemon is not running and {database} cannot be read: {exc}", EXIT_UNAVAILABLE) from None
    now = time.time()
    devices = []
    for device, unit, household, kind, action, wall, payload in latest:
        body = json.loads(payload)
        devices.append({"device": device, "unit": unit, "household": household, "kind": "—",
                        "state": f"last event: {kind} {action}", "value": body.get("value"),
                        "measure": body.get("measure"), "last_seen": wall,
                        "last_seen_age_s": round(now - wall, 1), "faults": [], "supervisory": []})
    return {
        "gateway": {"id": meta.get("gateway_id", "?"), "session": int(meta.get("session", 0)) or None,
                    "database": database},
        "uplink": {"connected": False, "backlog": backlog, "oldest_undelivered": oldest,
                   "oldest_undelivered_age_s": None if oldest is None else round(now - oldest, 1)},
        "devices": devices,
        "events": events,
    }


def _with_configured_devices(seen: list[dict[str, Any]], config: str) -> list[dict[str, Any]]:
    """Stored device rows in config order with their kinds, plus configured devices with no stored event.

    Without a fully readable config the stored rows are returned as they are.
    """
    try:
        cfg = load_config(config)
    except ConfigError:
        return seen
    by_id = {d["device"]: d for d in seen}
    rows = []
    for dev in cfg.devices:
        row = by_id.pop(dev.id, None) or {"device": dev.id, "unit": dev.unit, "household": dev.household,
                                          "state": "no stored event", "value": None, "measure": None,
                                          "last_seen": None, "last_seen_age_s": None, "faults": [],
                                          "supervisory": []}
        rows.append({**row, "kind": dev.kind})
    return rows + list(by_id.values())


# ------------------------------------------------------------------------------------------- commands


class Cli:
    """Runs one parsed command line."""

    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.json = bool(getattr(args, "json", False))
        self.style = Style(out)

    def print(self, line: str = "") -> None:
        print(line, file=self.out, flush=True)

    def emit(self, message: dict[str, Any]) -> None:
        self.print(json.dumps(message, ensure_ascii=False, default=str))

    def paths(self) -> Paths:
        return site_paths(self.args.config)

    def call(self, command: str, args: dict[str, Any], *, timeout: float | None = REPLY_TIMEOUT_S,
             on_stream: Callable[[Any], None] | None = None) -> dict[str, Any]:
        with ControlClient(self.paths().socket) as client:
            return client.request(command, args, timeout=timeout, on_stream=on_stream)

    def finish(self, response: dict[str, Any], render: Callable[[dict[str, Any]], Iterator[str]] | None) -> int:
        """Print a final response; its exit code."""
        if self.json:
            self.emit({"ok": response["ok"], "reason": response.get("reason"), "data": response.get("data", {}),
                       "daemon": "running"})
        if not response["ok"]:
            print(f"gatewayctl: {response.get('reason')}", file=self.err)
            return EXIT_ERROR if response.get("data", {}).get("failed") else EXIT_REJECTED
        if not self.json and render is not None:
            for line in render(response.get("data", {})):
                self.print(line)
        return EXIT_OK

    # -- commands ---------------------------------------------------------------------------

    def status(self) -> int:
        try:
            response = self.call("status", {})
        except DaemonUnavailable as exc:
            paths = self.paths()
            data = asyncio.run(_offline_query(paths.database, {}))
            data.pop("events")
            data["devices"] = _with_configured_devices(data["devices"], self.args.config)
            note = f"{exc}; showing what {paths.database} holds"
            if self.json:
                self.emit({"ok": True, "reason": note, "data": data, "daemon": "down"})
            else:
                for line in render_status(data, self.style, daemon_down=note):
                    self.print(line)
            print(f"gatewayctl: {exc}", file=self.err)
            return EXIT_UNAVAILABLE
        return self.finish(response, lambda d: render_status(d, self.style))

    def _event_args(self) -> dict[str, Any]:
        a = self.args
        args: dict[str, Any] = {"limit": a.limit}
        for key in ("device", "household", "kind"):
            if getattr(a, key) is not None:
                args[key] = getattr(a, key)
        if a.since is not None:
            args["since"] = a.since
        return args

    def events(self) -> int:
        args = self._event_args()
        if self.args.follow:
            return self.follow(args)
        try:
            response = self.call("events", args)
        except DaemonUnavailable as exc:
            return self._offline_events(args, exc)
        return self.finish(response, lambda d: render_events(d["events"], self.style))

    def _offline_events(self, args: dict[str, Any], exc: DaemonUnavailable) -> int:
        paths = self.paths()
        data = asyncio.run(_offline_query(paths.database, args))
        note = f"{exc}; showing what {paths.database} holds"
        if self.json:
            self.emit({"ok": True, "reason": note, "data": {"events": data["events"]}, "daemon": "down"})
        else:
            self.print(self.style(f"DAEMON DOWN: {note}", "red"))
            for line in render_events(data["events"], self.style):
                self.print(line)
        print(f"gatewayctl: {exc}" + ("; cannot follow new events" if self.args.follow else ""), file=self.err)
        return EXIT_UNAVAILABLE

    def follow(self, args: dict[str, Any]) -> int:
        def show(event: Any) -> None:
            if self.json:
                self.emit(event)
            else:
                self.print(render_event_line(event, self.style))

        try:
            response = self.call("events", {**args, "follow": True}, timeout=None, on_stream=show)
        except DaemonUnavailable as exc:
            return self._offline_events(args, exc)
        except KeyboardInterrupt:
            return EXIT_OK
        if response["ok"]:
            print(f"gatewayctl: {response.get('reason') or 'stream ended'}", file=self.err)
            return EXIT_UNAVAILABLE  # the daemon stopped while we followed
        return self.finish(response, None)

    def simple(self, command: str, args: dict[str, Any], render: Callable[[dict[str, Any]], Iterator[str]],
               timeout: float = REPLY_TIMEOUT_S) -> int:
        return self.finish(self.call(command, args, timeout=timeout), render)

    def silence(self) -> int:
        return self.simple("silence", {}, lambda d: iter([f"silenced; the sounder now signals: {d['sound']}"]))

    def _target(self) -> dict[str, Any]:
        return {"all": True} if self.args.all else {"device": self.args.device}

    def reset(self) -> int:
        return self.simple("reset", self._target(), lambda d: render_reset(d, self.style))

    def test(self) -> int:
        return self.simple("test", self._target(), lambda d: render_walk_test(d, self.style))

    def buzzer_test(self) -> int:
        seconds = self.args.seconds
        return self.simple("buzzer_test", {"seconds_per_pattern": seconds},
                           lambda d: iter([f"played {', '.join(d['patterns'])} ({d['seconds_per_pattern']:g} s each)"]),
                           timeout=10 * seconds + REPLY_TIMEOUT_S)

    def relay_test(self) -> int:
        def render(d: dict[str, Any]) -> Iterator[str]:
            after = "left ON (its linkage rule is active)" if d["left_on_by_linkage"] else "off again"
            yield f"relay {d['output']} was on for {d['seconds']:g} s; {after}"

        return self.simple("relay_test", {"output": self.args.output, "seconds": self.args.seconds}, render,
                           timeout=self.args.seconds + REPLY_TIMEOUT_S)

    def sms_test(self) -> int:
        """``gatewayctl sms test NUMBER``: the SMS process sends a message that says it is a test."""
        def render(d: dict[str, Any]) -> Iterator[str]:
            state = d.get("state")
            if state == "sent":
                yield "test SMS sent (the modem took it)"
            else:
                yield f"test SMS {state}" + (f": {d['error']}" if d.get("error") else "; see gatewayctl status")

        return self.simple("sms_test", {"number": self.args.number}, render, timeout=REPLY_TIMEOUT_S + 15)

    def read(self) -> int:
        def render(d: dict[str, Any]) -> Iterator[str]:
            if "closed" in d:
                yield (f"{d['device']} ({d['kind']}) on {d['pin']}: contact {'closed' if d['closed'] else 'open'}"
                       f" ({d['contact']}), {'ACTIVE' if d['active'] else 'normal'}"
                       + ("" if d["plausible"] else ", IMPLAUSIBLE"))
                return
            where = f"{d['bus']} address {d['address']}"
            if "value" in d:
                yield (f"{d['device']} ({d['kind']}) at {where}: {_value(d['value'], d['measure'])}, "
                       f"status {', '.join(d['status'])}" + (f", gas {d['gas']}" if d.get("gas") else "")
                       + f"  ({d['took_ms']:g} ms)")
            else:
                points = ", ".join(f"{k} {d[k]}" for k in ("presence", "pressure_ok", "pressure", "door_open",
                                                           "obstructed") if d.get(k) is not None)
                yield f"{d['device']} ({d['kind']}) at {where}: {points}  ({d['took_ms']:g} ms)"
            raw = d.get("raw")
            if raw and "registers" in raw:
                yield f"raw fc{raw['function']} from register {raw['start']} (0x{raw['start']:04X}):"
                for i, reg in enumerate(raw["registers"]):
                    yield f"  {raw['start'] + i:>5}  {reg:>5}  0x{reg:04X}"
            elif raw:
                for name, word in raw.get("points", {}).items():
                    yield f"  {name:<12} {word}"

        return self.simple("read", {"device": self.args.device, "raw": self.args.raw}, render)

    def scan(self) -> int:
        a = self.args
        bar = ProgressBar(self.err, f"scanning {a.bus}") if self.err.isatty() else None

        def progress(update: Any) -> None:
            if bar is not None and isinstance(update, dict):
                bar.show(int(update.get("done", 0)), int(update.get("total", 1)), int(update.get("found", 0)))

        args = {"bus": a.bus, "from": a.first, "to": a.last, "pause_polling": a.pause_polling}
        try:
            response = self.call("scan", args, on_stream=progress)
        finally:
            if bar is not None:
                bar.end()

        def render(d: dict[str, Any]) -> Iterator[str]:
            found = d["responders"]
            yield f"{d['bus']}: {len(found)} responding address(es) in {d['from']}–{d['to']}"
            if found:
                yield from _table(["ADDRESS", "PROFILE", "CONFIDENCE", "CANDIDATES", "CONFIGURED AS"], [
                    [str(h["address"]), h["profile"], h.get("confidence", "—"), ", ".join(h["candidates"]) or "—",
                     h["configured_as"] or "—"]
                    for h in found], self.style)
            for h in d.get("gateway_answers", []):
                said = error_kind_label(f"exception:{h['exception']}")
                yield f"address {h['address']}: a Modbus gateway answered {said} — no device answered behind it"

        return self.finish(response, render)

    def config_show(self) -> int:
        def render(d: dict[str, Any]) -> Iterator[str]:
            for key, value in _flatten(d["config"]):
                yield f"{key} = {json.dumps(value, ensure_ascii=False)}"

        return self.simple("config_show", {}, render)

    def doctor(self) -> int:
        """One line per check (gateway/ops/doctor.py); exit 1 when any check failed."""
        from gateway.ops.doctor import run_doctor

        checks = run_doctor(self.args.config, connect=ControlClient, unit=self.args.unit)
        failed = any(c.status == "FAIL" for c in checks)
        if self.json:
            self.emit({"ok": not failed, "reason": None, "data": {"checks": [c.as_dict() for c in checks]}})
        else:
            colours = {"ok": "green", "warn": "yellow", "FAIL": "red"}
            for check in checks:
                line = check.line()
                self.print(self.style(line[:4], colours[check.status]) + line[4:])
        return EXIT_ERROR if failed else EXIT_OK

    def config_check(self) -> int:
        path = self.args.file
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            if self.json:
                self.emit({"ok": False, "reason": str(exc), "data": {"path": exc.path, "error": exc.reason}})
            print(f"gatewayctl: config error: {exc}", file=self.err)
            return EXIT_ERROR
        summary = {"file": path, "gateway": cfg.gateway_id, "units": len(cfg.units),
                   "households": len(cfg.households), "devices": len(cfg.devices), "buses": len(cfg.buses)}
        warnings = bus_floor_warnings(cfg)  # the site still loads: such a bus polls back to back
        if self.json:
            self.emit({"ok": True, "reason": None, "data": summary, "warnings": warnings})
        else:
            self.print(f"{path}: ok — {cfg.gateway_id}: {len(cfg.units)} units, {len(cfg.households)} households, "
                       f"{len(cfg.devices)} devices, {len(cfg.buses)} buses")
            for warning in warnings:
                print(f"gatewayctl: warning: {warning}", file=self.err)
        return EXIT_OK


class ProgressBar:
    """A one-line progress bar on a terminal."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.shown = False

    def show(self, done: int, total: int, found: int) -> None:
        filled = self.width * done // max(total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}  "
                          f"found {found}")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------------- parsing


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d`` ago, an ISO 8601 date/time (local time unless it has an offset), or
    epoch seconds."""
    match = _RELATIVE.match(text.strip())
    if match:
        return time.time() - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a duration (30s, 10m, 2h, 7d), a date/time (2026-11-26T08:00) or epoch seconds") from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: usage error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _second_path_lines(data: dict[str, Any], style: Any) -> Iterator[str]:
    """The transmission path's supervision and the SMS path (counts and masked numbers only)."""
    path = data.get("transmission")
    if path:
        state = style(f"TRANSMISSION FAULT: {path['fault']}", "red") if path.get("fault") else "ok"
        down = "" if path.get("path") == "up" else f"  path down {path.get('down_for_s')} s ({path.get('down_reason')})"
        oldest = path.get("oldest_waiting_s")
        yield (f"Path      {state}  {path.get('waiting', 0)} urgent event(s) without PUBACK"
               + (f", oldest {oldest} s" if oldest is not None else "") + down)
    sms = data.get("sms")
    if sms and sms.get("configured"):
        if sms.get("process") != "up":
            yield "SMS       " + style(f"SMS PROCESS DOWN: {sms.get('reason')}", "red")
            return
        modem = sms.get("modem") or {}
        problem = modem.get("problem")
        signal = modem.get("signal_percent")
        head = style(f"MODEM FAULT: {problem}", "red") if problem else (
            f"modem ok  {modem.get('operator') or '—'}  signal {signal if signal is not None else '—'} %")
        yield (f"SMS       {head}  owed {sms.get('owed', 0)}  pending {sms.get('pending', 0)}"
               f"  sent {sms.get('sent', 0)}  held back {sms.get('held_back', 0)}  mode {sms.get('mode')}")


def build_parser() -> argparse.ArgumentParser:
    """The ``gatewayctl`` argument parser."""
    parser = _Parser(prog="gatewayctl", description="Building safety gateway: technician command line. "
                     "Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unavailable, 4 rejected.")
    parser.add_argument("--version", action="version", version=f"gatewayctl {__version__}")
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"site config: where the socket and database are (default {DEFAULT_CONFIG})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("status", parents=[json_flag], help="gateway, uplink, sounder and every device")
    ev = sub.add_parser("events", parents=[json_flag], help="event history; --follow for new events")
    ev.add_argument("--since", type=parse_since, help="30s, 10m, 2h, 7d, 2026-11-26T08:00 or epoch seconds")
    ev.add_argument("--device")
    ev.add_argument("--household")
    ev.add_argument("--kind", choices=sorted(KIND_PRIORITY))
    ev.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events (Ctrl-C to stop)")

    sub.add_parser("silence", parents=[json_flag], help="mute the sounder for what is active now")
    for name, text in (("reset", "reset latched alarms"), ("test", "walk test: detections recorded as tests")):
        p = sub.add_parser(name, parents=[json_flag], help=text)
        p.add_argument("device", nargs="?", metavar="DEVICE")
        p.add_argument("--all", action="store_true", help="every device")
    bt = sub.add_parser("buzzer-test", parents=[json_flag], help="play each sounder pattern briefly")
    bt.add_argument("--seconds", type=_positive(float), default=1.0, help="seconds per pattern (default 1)")
    rt = sub.add_parser("relay-test", parents=[json_flag], help="switch a relay on briefly")
    rt.add_argument("output", metavar="OUTPUT", help="relay id from [[outputs.relays]]")
    rt.add_argument("--seconds", type=_positive(float), default=2.0, help="seconds on (default 2)")
    rd = sub.add_parser("read", parents=[json_flag], help="a fresh reading from one device now")
    rd.add_argument("device", metavar="DEVICE")
    rd.add_argument("--raw", action="store_true", help="also show the raw registers")
    sc = sub.add_parser("scan", parents=[json_flag], help="find responding Modbus addresses on a bus")
    sc.add_argument("bus", metavar="BUS")
    sc.add_argument("--from", dest="first", type=int, default=1, metavar="N", help="first address (default 1)")
    sc.add_argument("--to", dest="last", type=int, default=247, metavar="N", help="last address (default 247)")
    sc.add_argument("--pause-polling", action="store_true", help="pause polling of the bus during the scan")

    sms = sub.add_parser("sms", help="the SMS path: send a test message")
    sms_sub = sms.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    sms_test = sms_sub.add_parser("test", parents=[json_flag], help="send a test SMS to NUMBER (operator role)")
    sms_test.add_argument("number", metavar="NUMBER", help="any phone number; it need not be in the contacts file")

    config = sub.add_parser("config", help="check a config file or show the running one")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    check = config_sub.add_parser("check", parents=[json_flag], help="validate a config file")
    check.add_argument("file", metavar="FILE")
    config_sub.add_parser("show", parents=[json_flag], help="the daemon's effective config, secrets masked")
    doctor = sub.add_parser("doctor", parents=[json_flag], help="check the site, pins, ports, broker, clock, "
                            "storage and service; works with the daemon stopped (exit 1 if a check failed)")
    doctor.add_argument("--unit", default="gatewayd.service", help="systemd unit to check (default gatewayd.service)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gatewayctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("reset", "test") and (args.device is None) == (not args.all):
        parser.error(f"{args.command}: give a DEVICE or --all (not both)")
    if args.command == "events" and not 1 <= args.limit <= 10_000:
        parser.error("events: --limit must be 1–10000")
    if args.command == "scan" and not 1 <= args.first <= args.last <= 247:
        parser.error("scan: need 1 ≤ --from ≤ --to ≤ 247")
    cli = Cli(args)
    handlers: dict[str, Callable[[], int]] = {
        "status": cli.status, "events": cli.events, "silence": cli.silence, "reset": cli.reset, "test": cli.test,
        "buzzer-test": cli.buzzer_test, "relay-test": cli.relay_test, "read": cli.read, "scan": cli.scan,
    }
    try:
        if args.command == "config":
            return cli.config_check() if args.action == "check" else cli.config_show()
        if args.command == "doctor":
            return cli.doctor()
        if args.command == "sms":
            return cli.sms_test()
        return handlers[args.command]()
    except CliError as exc:
        if cli.json:
            cli.emit({"ok": False, "reason": str(exc), "data": {},
                      "daemon": "down" if exc.code == EXIT_UNAVAILABLE else "unknown"})
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader (e.g. head) went away: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
