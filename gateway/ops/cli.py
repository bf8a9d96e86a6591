"""``gatewayctl``: the technician's command line, a client of the daemon's control socket.

``--config FILE`` (default ``/etc/gateway/building.toml``) says where the socket and the database are.
Every command that prints data takes ``--json``. Colour on a terminal, plain text when piped.
``status`` says what is wrong first (headline, active conditions, then units with their devices in trouble
first). With the daemon down, ``status`` and ``events`` read the database read-only (``status`` also the
panel's saved state) and say so; the other commands exit 3. ``events --format csv|jsonl`` streams history
straight from the database, daemon or not. Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unavailable,
4 rejected (see docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import errno
import grp
import json
import os
import re
import shutil
import socket
import sqlite3
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
from gateway.uplink import history

__all__ = ["ControlClient", "DaemonUnavailable", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REJECTED = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/gateway/building.toml"
REPLY_TIMEOUT_S = 30.0
#: Events ``events`` shows unless told (--limit; --format exports every match).
EVENTS_SHOWN = 50


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


def _when(wall: float | None, timespec: str = "seconds") -> str:
    """ISO 8601 local time with its offset: 2026-11-26T08:00:05+08:00."""
    if wall is None:
        return "—"
    return dt.datetime.fromtimestamp(wall).astimezone().isoformat(timespec=timespec)


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


def _scan_controllers(found: list[dict[str, Any]]) -> Iterator[str]:
    """Each multi-channel controller a scan recognised: its channels and stride, then a profile to paste."""
    for h in found:
        layout = h.get("controller")
        if not layout:
            continue
        yield ""
        yield (f"address {h['address']}: multi-channel controller, {layout['channels']} channels, stride "
               f"{layout['stride']} (channel 1: registers {layout['start']}–{layout['start'] + layout['count'] - 1})")
        yield "profile sketch to paste into the site file (check the marked lines against the manual):"
        yield from h["profile_sketch"].rstrip("\n").split("\n")


def _kinds(by_kind: dict[str, int] | None, before: str = "", after: str = "") -> str:
    """Failed polls by kind, most first: "timeout 5, CRC error 2" ("" when there are none)."""
    if not by_kind:
        return ""
    ranked = sorted(by_kind.items(), key=lambda item: (-item[1], item[0]))
    return before + ", ".join(f"{error_kind_label(kind)} {count}" for kind, count in ranked) + after


def _cycle(bus: dict[str, Any]) -> str:
    """" · cycle 2.71 s (wire floor 2.64 s)" when the bus reports them: the measured cycle beside the wire's
    floor (a cycle under the floor can only be a simulated line, and says so)."""
    cycle, floor = bus.get("cycle_s"), bus.get("floor_s")
    if floor is None:
        return ""
    if cycle is not None and cycle < floor:  # no real wire is faster than its floor: a pty or simulated line
        return f" · cycle {cycle:.2f} s (simulated: a wire needs {floor:.2f} s)"
    return f" · cycle {'—' if cycle is None else f'{cycle:.2f} s'} (wire floor {floor:.2f} s)"


def _value(value: Any, measure: Any) -> str:
    if value is None:
        return "—"
    text = f"{value:g}" if isinstance(value, float | int) else str(value)
    return f"{text} {measure}" if measure else text


def _table(headers: list[str], rows: list[list[str]], style: Callable[[str, str | None], str],
           colours: list[list[str | None]] | None = None, *, header: bool = True) -> Iterator[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if header:
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


#: How bad a device state is, worst first: devices in trouble are listed in this order.
_SEVERITY = {"fire": 0, "high_alarm": 0, "low_alarm": 1, "supervisory": 2, "fault": 3, "test": 4, "warmup": 5,
             "unknown": 6, "normal": 9}
#: Short names of the device kinds, so a device row fits 80 columns.
_KIND_SHORT = {"gas_detector": "gas", "extinguisher_station": "station", "extinguisher_presence": "presence",
               "pressure_switch": "pressure", "cabinet_door": "door", "obstruction": "obstruction",
               "gas_relay": "gas relay", "fire_contact": "fire"}
_CATEGORY = {"alarm": ("ALARM", "red"), "supervisory": ("SUPERVISORY", "magenta"), "trouble": ("FAULT", "yellow")}
_POLLED_KINDS = frozenset({"gas_detector", "extinguisher_station"})
#: Active conditions listed in the default view; the rest are counted (``--problems`` lists them all).
CONDITIONS_SHOWN = 8


def _since(wall: float | None, now: float) -> str:
    """"since 14:01:58 (13 s)"; a date too when it is not today."""
    if wall is None:
        return "since —"
    when = dt.datetime.fromtimestamp(wall)
    shown = when.strftime("%H:%M:%S") if when.date() == dt.date.today() else when.strftime("%Y-%m-%d %H:%M")
    return f"since {shown} ({_age(max(0.0, now - wall)).removesuffix(' ago')})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _offline(d: Mapping[str, Any]) -> bool:
    """A row from the database while the daemon is down: its last stored event, no live state."""
    return str(d["state"]).startswith(("last event", "no stored event"))


def _troubled(d: Mapping[str, Any]) -> bool:
    if _offline(d):
        return bool(d.get("latched"))
    return (d["state"] != "normal" or bool(d.get("faults")) or bool(d.get("supervisory"))
            or bool(d.get("latched")))


def _severity(d: Mapping[str, Any]) -> int:
    return _SEVERITY.get(d["state"], 7 if d["state"].startswith("last event") else 8)


def _condition_text(c: Mapping[str, Any]) -> str:
    if c["what"] == "alarm":
        return "fire" if c.get("level") == "fire" else f"{c.get('level') or ''} gas alarm".strip()
    return str(c["what"]).replace("_", " ")


def _places(devices: list[dict[str, Any]]) -> dict[str, str]:
    """Device id → "household u1-201, unit u1" (or "unit u1")."""
    return {d["device"]: (f"household {d['household']}, unit {d['unit']}" if d.get("household")
                          else f"unit {d['unit']}") for d in devices if d.get("unit")}


def status_headline(data: Mapping[str, Any], style: Callable[[str, str | None], str]) -> Iterator[str]:
    """What is wrong, first: the counts, then each active condition with its place and since when."""
    active = data.get("active") or []
    counts = {category: sum(1 for c in active if c["category"] == category) for category in _CATEGORY}
    word, colour = next(((_CATEGORY[c][0], _CATEGORY[c][1]) for c in _CATEGORY if counts[c]), ("ALL CLEAR", "green"))
    devices = data["devices"]
    plural = {"alarm": "alarms", "supervisory": "supervisory", "trouble": "faults"}
    figures = ", ".join(f"{counts[c]} {plural[c] if counts[c] != 1 else _CATEGORY[c][0].lower()}"
                        for c in _CATEGORY)
    gw = data["gateway"]
    total = data.get("devices_total", len(devices))
    yield f"{style(word, colour)}  {gw['id']}  {_count(total, 'device')}: {figures}"


def render_conditions(data: Mapping[str, Any], style: Callable[[str, str | None], str], *,
                      limit: int | None = CONDITIONS_SHOWN) -> Iterator[str]:
    """One aligned line per active condition: what, where, since when."""
    active = sorted(data.get("active") or [], key=lambda c: (list(_CATEGORY).index(c["category"])
                                                              if c["category"] in _CATEGORY else 9,
                                                              c.get("since") or 0))
    places = _places(data["devices"])
    now = time.time()
    shown = active if limit is None else active[:limit]
    rows = [[_CATEGORY.get(c["category"], (c["category"].upper(), None))[0], _condition_text(c), c["subject"],
             c.get("place") or places.get(c["subject"], ""),
             _since(c.get("since"), now) + (", silenced" if c.get("silenced") else "")
             + (f" ({c['note']})" if c.get("note") else "")] for c in shown]
    colours: list[list[str | None]] = [[_CATEGORY.get(c["category"], ("", None))[1], None, None, None, None]
                                       for c in shown]
    for line in _table(["", "", "", "", ""], rows, style, colours, header=False):
        yield "  " + line
    if len(active) > len(shown):
        yield f"  … and {len(active) - len(shown)} more (gatewayctl status --problems lists them all)"


def render_system(data: Mapping[str, Any], style: Style, *, daemon_down: str | None = None) -> Iterator[str]:
    """Sounder, uplink and storage, buses, the gateway process: one line each."""
    gw = data["gateway"]
    ann = data.get("annunciator")
    if ann is not None:
        loud = ann["sound"] != "quiet"
        sound = style(f"{ann['sound'].upper()} ({ann['pattern']})" if loud and ann.get("pattern")
                      else ann["sound"], "red" if ann["sound"] in ("gas", "fire") else ("yellow" if loud else None))
        relays = ", ".join(f"{k} {'ON' if v else 'off'}" for k, v in sorted(ann["relays"].items())) or "none"
        yield f"Sounder  {sound} · LEDs {', '.join(ann['leds']) or 'off'} · relays {relays}"
    elif data.get("saved_state"):
        saved = data["saved_state"]
        on = ", ".join(saved.get("relays", [])) or "none"
        yield (style("Relays   ", None) + f"ON in the saved state: {on} "
               f"(state file {saved['file']}, saved {_age(time.time() - saved['saved_at'])})")
    up = data["uplink"]
    oldest = up.get("oldest_undelivered_age_s")
    backlog = f"backlog {up.get('backlog', '?')}" + (f" (oldest {_age(oldest)})" if oldest is not None else "")
    storage = data.get("storage") or {}
    fault = storage.get("storage_fault")
    lost = {"evicted undelivered": sum(storage.get("evicted_undelivered", {}).values()),
            "dropped in memory": sum(storage.get("dropped_in_memory", {}).values())}
    store = (style(f"storage {fault.upper()}", "red") if fault else "storage ok") + "".join(
        style(f", {name} {count}", "red") for name, count in lost.items() if count)
    if daemon_down:
        store = f"{gw['database']} read-only"
    if daemon_down:
        yield f"Uplink   unknown (daemon down) · {backlog}"
    elif up.get("process") == "down":
        process = gw.get("uplink_process") or {}
        why = process.get("last_exit") or up.get("reason") or "starting"
        yield (style("STORAGE/UPLINK PROCESS DOWN", "red")
               + f" · the panel holds {storage.get('held_by_panel', 0)} events; restarted automatically ({why})")
    else:
        link = style("connected", "green") if up["connected"] else style("DISCONNECTED", "red")
        rtt = f", {up['rtt_ms']:.0f} ms" if up.get("rtt_ms") is not None else ""
        error = f" · last error: {up['last_error']}" if up.get("last_error") and not up["connected"] else ""
        yield f"Uplink   {link} to {up['broker']}{rtt}, {backlog}{error}"
    for bus in data.get("buses", []):
        if bus["port_lost"]:
            state = " " + style("PORT LOST", "red") + ","
        elif bus["paused"]:
            state = " " + style("POLLING PAUSED (no alarms read; trouble signal)", "yellow") + ","
        else:
            state = " address scan between pause windows," if bus.get("scanning") else ""
        line = f"Bus      {bus['id']}{state}{_cycle(bus)} · {bus['errors']}/{bus['polls']} polls failed"
        kinds = _kinds(bus.get("errors_by_kind"), " (", ")")
        yield line + kinds if len(line + kinds) <= 80 else line  # by kind: per device in --all and --json
    yield from _second_path_lines(data, style)
    if daemon_down:
        yield f"Gateway  DOWN · last session {gw.get('session') or '—'} · {store}"
    else:
        storage_pid = (gw.get("uplink_process") or {}).get("pid")
        yield (f"Gateway  v{gw['version']} session {gw['session'] or '—'} · up {_duration(gw['uptime_s'])} · "
               f"pid {gw['pid']}" + (f"/{storage_pid}" if storage_pid else "") + f" · {store}")


def _device_row(d: Mapping[str, Any], since: Mapping[str, float | None], now: float) -> list[str]:
    notes = [*d.get("faults", []), *d.get("supervisory", [])]
    if d.get("latched") and d["state"] not in ("low_alarm", "high_alarm", "fire"):
        notes.append(f"latched {d['latched']}")
    elif d.get("latched") and d.get("condition_present") is False:
        notes.append("condition gone, latched until reset")
    if d["device"] in since:
        notes.append(_since(since[d["device"]], now))
    failed = _kinds(d.get("errors_by_kind"))
    if failed:
        notes.append(f"failed polls: {failed}")
    return [d["device"], d.get("household") or "—", _KIND_SHORT.get(d["kind"], d["kind"]), d["state"],
            _value(d.get("value"), d.get("measure")), _age(d.get("last_seen_age_s")).removesuffix(" ago"),
            "; ".join(notes)]


def render_units(devices: list[dict[str, Any]], active: list[dict[str, Any]], style: Style, *,
                 every_device: bool = False, problems_only: bool = False) -> Iterator[str]:
    """Devices by unit, those in trouble first; the normal ones of a unit as one line unless ``every_device``."""
    now = time.time()
    since: dict[str, float | None] = {}
    for c in active:
        since.setdefault(c["subject"], c.get("since"))
    units: dict[str, list[dict[str, Any]]] = {}
    for d in devices:
        units.setdefault(d.get("unit") or "—", []).append(d)
    shown: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []
    for unit, members in units.items():
        listed = sorted((d for d in members if every_device or _troubled(d)), key=_severity)
        shown.append((unit, members, listed))
    rows = [_device_row(d, since, now) for _, _, listed in shown for d in listed]
    headers = ["DEVICE", "HOUSEHOLD", "KIND", "STATE", "VALUE", "SEEN", "NOTE"]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    header = "  " + style("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), "dim")
    yield ""
    for unit, members, listed in shown:
        rest = [d for d in members if d not in listed]
        if problems_only and not listed:
            continue
        troubled = sum(1 for d in members if _troubled(d))
        # a contact is seen at its last edge, not polled: only polled devices say how fresh the readings are
        seen = [d["last_seen_age_s"] for d in rest
                if d.get("last_seen_age_s") is not None and d.get("kind") in _POLLED_KINDS]
        summary = f"Unit {unit}" + ("" if problems_only else f" · {_count(len(members), 'device')}")
        if troubled:
            summary += f" · {style(f'{troubled} in trouble', 'yellow')}"
        elif not any(_offline(d) for d in members):
            summary += " · all normal"
        if rest and not problems_only and any(_offline(d) for d in rest):
            summary += f" · {len(rest)} {'more ' if listed else ''}without live state (daemon down)"
        elif rest and not problems_only:
            summary += f" · {len(rest)} more normal" if listed else ""
            summary += f", seen ≤ {_age(max(seen))}" if seen else ""
        yield style(summary, "bold") if not troubled else summary
        if listed and header:
            yield header
            header = ""
        for d in listed:
            row = _device_row(d, since, now)
            cells = []
            for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
                colour = _state_colour(d["state"]) if i == 3 else ("yellow" if i == 6 and cell else None)
                cells.append(style(cell.ljust(w) if i < len(row) - 1 else cell, colour))
            yield "  " + "  ".join(cells).rstrip()


def render_status(data: dict[str, Any], style: Style, *, daemon_down: str | None = None,
                  every_device: bool = False, problems_only: bool = False) -> Iterator[str]:
    """Human-readable status: what is wrong first (headline and active conditions), then the sounder, uplink,
    buses and gateway, then the units with their devices in trouble first."""
    if daemon_down:
        yield style(f"DAEMON DOWN: {daemon_down}", "red")
    yield from status_headline(data, style)
    yield from render_conditions(data, style, limit=None if problems_only else CONDITIONS_SHOWN)
    if not problems_only:
        yield from render_system(data, style, daemon_down=daemon_down)
    yield from render_units(data["devices"], data.get("active") or [], style, every_device=every_device,
                            problems_only=problems_only)


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


#: Column widths of ``events -f`` (rows come one by one, so the widths are fixed): time with offset,
#: the longest kind (supervisory) and action, then room for usual ids; a longer value pushes its row along.
FOLLOW_WIDTHS = (25, 11, 10, 22, 10, 12, 10, 4)


def render_follow_header() -> str:
    """The header of ``events -f``."""
    cells = [h.ljust(w) for h, w in zip(EVENT_HEADERS, FOLLOW_WIDTHS, strict=False)]
    return "  ".join([*cells, EVENT_HEADERS[-1]])


def render_event_line(e: dict[str, Any], style: Style) -> str:
    """One followed event on one line, in the columns of :func:`render_follow_header`."""
    cells = event_row(e)
    shown = [cell.ljust(w) for cell, w in zip(cells, FOLLOW_WIDTHS, strict=False)] + cells[len(FOLLOW_WIDTHS):]
    shown[1] = style(shown[1], EVENT_COLOURS.get(e.get("kind", "")))
    return "  ".join(shown).rstrip()


#: Columns of ``events --format csv``.
EXPORT_COLUMNS = ("time", "event_id", "kind", "action", "device", "unit", "household", "level", "code", "value",
                  "measure", "source", "detail", "delivered")


def export_record(e: Mapping[str, Any]) -> list[Any]:
    """One CSV row: local ISO 8601 time with its offset (milliseconds), then the event's fields."""
    return [_when(e.get("wall"), "milliseconds"), *("" if e.get(k) is None else e[k] for k in EXPORT_COLUMNS[1:-1]),
            "yes" if e.get("delivered") else "no"]


def export_rows(database: str, *, limit: int | None = None, since: float | None = None, until: float | None = None,
                device: str | None = None, household: str | None = None, kind: str | None = None
                ) -> Iterator[dict[str, Any]]:
    """Stored events matching the filters, oldest first, streamed from the database file opened read-only
    (:func:`gateway.uplink.history.export_rows`); a file that cannot be read is a :class:`CliError`."""
    if not Path(database).exists():
        raise CliError(f"there is no database at {database}")
    try:
        yield from history.export_rows(database, limit=limit, since=since, until=until, device=device,
                                       household=household, kind=kind)
    except sqlite3.Error as exc:
        raise CliError(f"cannot read {database}: {exc}") from None


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
    if not Path(database).exists():
        raise CliError(f"the daemon is not running and there is no database at {database}", EXIT_UNAVAILABLE)
    try:
        view = await history.read_offline(database, query)
    except Exception as exc:  # sqlite3.Error and friends: report, never a traceback
        raise CliError(f"the daemon is not running and {database} cannot be read: {exc}", EXIT_UNAVAILABLE) from None
    meta, backlog, oldest, latest, events = view.meta, view.backlog, view.oldest_undelivered, view.latest, view.events
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


def _with_saved_state(data: dict[str, Any], database: str) -> None:
    """Add the panel's saved latches (as active alarms) and relays from its state file, marked as saved."""
    from gateway.panel.state import state_path

    path = state_path(database)
    try:
        doc = json.loads(path.read_bytes())
        panel = doc["panel"]
        saved_at = float(doc["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    latches = [item for item in panel.get("latches", []) if isinstance(item, dict) and "device" in item]
    data["saved_state"] = {"file": str(path), "saved_at": saved_at, "latches": latches,
                           "relays": list(panel.get("relays", [])), "walk_tests": panel.get("walk_tests", [])}
    data["active"] = [{"subject": item["device"], "what": "alarm", "category": "alarm",
                       "level": item.get("level"), "since": saved_at - float(item.get("age_s", 0.0)),
                       "silenced": bool(item.get("silenced")), "note": "saved latch"} for item in latches]
    latched = {item["device"]: item.get("level") for item in latches}
    for d in data["devices"]:
        if d["device"] in latched:
            level = latched[d["device"]]
            d["state"] = "fire" if level == "fire" else f"{level}_alarm"
            d["latched"] = level


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
        if self.args.watch is not None:
            return self.watch(self.args.watch)
        data, down = self.status_data()
        if down is not None:
            if self.json:
                self.emit({"ok": True, "reason": down, "data": data, "daemon": "down"})
            else:
                for line in self.status_lines(data, down):
                    self.print(line)
            print(f"gatewayctl: {down.split(';')[0]}", file=self.err)
            return EXIT_UNAVAILABLE
        return self.finish({"ok": True, "data": data}, lambda d: self.status_lines(d, None))

    def status_data(self) -> tuple[dict[str, Any], str | None]:
        """The daemon's status, filtered by --unit and --problems; with the daemon down, what the database and
        the panel's state file hold, and why (the second item)."""
        down = None
        try:
            response = self.call("status", {})
            if not response["ok"]:
                raise CliError(str(response.get("reason")))
            data: dict[str, Any] = response["data"]
        except DaemonUnavailable as exc:
            paths = self.paths()
            data = asyncio.run(_offline_query(paths.database, {}))
            data.pop("events")
            data["devices"] = _with_configured_devices(data["devices"], self.args.config)
            _with_saved_state(data, paths.database)
            down = f"{exc}; showing what {paths.database} and the panel's saved state hold"
        data["devices_total"] = len(data["devices"])
        places = _places(data["devices"])
        for condition in data.get("active") or []:
            condition.setdefault("place", places.get(condition["subject"]))
        unit = self.args.unit
        if unit is not None:
            units = sorted({d["unit"] for d in data["devices"] if d.get("unit")})
            if unit not in units:
                raise CliError(f"unknown unit {unit!r} (units: {', '.join(units) or 'none'})")
            data["devices"] = [d for d in data["devices"] if d.get("unit") == unit]
        if self.args.problems:
            data["devices"] = [d for d in data["devices"] if _troubled(d)]
        return data, down

    def status_lines(self, data: dict[str, Any], down: str | None) -> Iterator[str]:
        a = self.args
        return render_status(data, self.style, daemon_down=down, every_device=a.all or a.unit is not None,
                             problems_only=a.problems)

    def watch(self, interval: float) -> int:
        """Redraw the status in place every ``interval`` seconds until Ctrl-C (on a terminal; else a frame per
        interval, separated by a blank line; with ``--json`` one object a line)."""
        terminal = self.out.isatty() and not self.json
        first = True
        try:
            while True:
                try:
                    data, down = self.status_data()
                    if self.json:  # one JSON object a line, a frame each interval
                        self.emit({"ok": True, "reason": down, "data": data,
                                   "daemon": "down" if down else "running"})
                        time.sleep(interval)
                        continue
                    lines = list(self.status_lines(data, down))
                except CliError as exc:
                    lines = [self.style(f"gatewayctl: {exc}", "red")]
                stamp = dt.datetime.now().astimezone().strftime("%H:%M:%S")
                lines.append(self.style(f"every {interval:g} s · {stamp} · Ctrl-C to stop", "dim"))
                if terminal:
                    size = shutil.get_terminal_size()
                    lines = lines[: max(1, size.lines - 1)]
                    frame = ("\033[H\033[2J" if first else "\033[H") + "".join(
                        f"{line}\033[K\n" for line in lines) + "\033[J"
                    self.out.write(frame)
                    self.out.flush()
                else:
                    for line in lines:
                        self.print(line)
                    self.print()
                first = False
                time.sleep(interval)
        except KeyboardInterrupt:
            return EXIT_OK

    def _event_args(self) -> dict[str, Any]:
        a = self.args
        args: dict[str, Any] = {"limit": a.limit or EVENTS_SHOWN}
        for key in ("device", "household", "kind", "since", "until"):
            if getattr(a, key) is not None:
                args[key] = getattr(a, key)
        return args

    def events(self) -> int:
        if self.args.format != "text":
            return self.export()
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

    def export(self) -> int:
        """Every matching event from the database (read-only, whether the daemon runs or not), oldest first,
        streamed as CSV or JSON lines; ``--limit`` caps it only when given."""
        a = self.args
        filters = {key: getattr(a, key) for key in ("since", "until", "device", "household", "kind")}
        count = 0
        if a.format == "csv":
            writer = csv.writer(self.out, lineterminator="\n")
            writer.writerow(EXPORT_COLUMNS)
            for row in export_rows(self.paths().database, limit=a.limit, **filters):
                writer.writerow(export_record(row))
                count += 1
        else:
            for row in export_rows(self.paths().database, limit=a.limit, **filters):
                self.out.write(json.dumps({**row, "local_time": _when(row.get("wall"), "milliseconds")},
                                          ensure_ascii=False) + "\n")
                count += 1
        self.out.flush()
        print(f"gatewayctl: {_count(count, 'event')}", file=self.err)
        return EXIT_OK

    def follow(self, args: dict[str, Any]) -> int:
        header = [False]

        def show(event: Any) -> None:
            if self.json:
                self.emit(event)
                return
            if not header[0]:
                self.print(self.style(render_follow_header(), "bold"))
                header[0] = True
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
                panel = d.get("panel_state")
                limits = (f" (alarm at {d['low']:g} / {d['high']:g} {d['measure'] or ''})".replace(" )", ")")
                          if d.get("low") is not None and d.get("high") is not None else "")
                yield (f"{d['device']} ({d['kind']}) at {where}: {_value(d['value'], d['measure'])}"
                       + (f", gas {d['gas']}" if d.get("gas") else "") + f"  ({d['took_ms']:g} ms)")
                if panel is not None:
                    yield "  panel: " + self.style(panel, _state_colour(panel)) + limits
                yield f"  the detector's own status word: {', '.join(d['status']) or '—'}"
            else:
                points = ", ".join(f"{k} {d[k]}" for k in ("presence", "pressure_ok", "pressure", "door_open",
                                                           "obstructed") if d.get(k) is not None)
                yield f"{d['device']} ({d['kind']}) at {where}: {points}  ({d['took_ms']:g} ms)"
            raw = d.get("raw")
            if raw and "registers" in raw:
                yield f"raw fc{raw['function']} from register {raw['start']} (0x{raw['start']:04X}):"
                for i, reg in enumerate(raw["registers"]):
                    yield (f"  {raw['start'] + i:>5}  {reg:>5}  0x{reg:04X}" if reg is not None
                           else f"  {raw['start'] + i:>5}      —  (not read)")
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
            yield from _scan_controllers(found)
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
        path = self.args.file or self.args.config
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            if self.json:
                errors = [{"path": e.path, "error": e.reason, "line": e.line, "where": e.where}
                          for e in getattr(exc, "errors", [exc])]
                self.emit({"ok": False, "reason": str(exc), "data": {"path": exc.path, "error": exc.reason,
                                                                      "line": exc.line, "errors": errors}})
            for line in exc.lines():
                print(f"gatewayctl: config error: {line}", file=self.err)
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


#: shtab's file completion (its ``shtab.FILE``), set on an argument as ``.complete``: nothing is imported here.
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: usage error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _second_path_lines(data: Mapping[str, Any], style: Any) -> Iterator[str]:
    """The transmission path's supervision and the SMS path (counts and masked numbers only)."""
    path = data.get("transmission")
    if path:
        state = style(f"TRANSMISSION FAULT: {path['fault']}", "red") if path.get("fault") else "ok"
        down = "" if path.get("path") == "up" else f" · down {path.get('down_for_s')} s ({path.get('down_reason')})"
        oldest = path.get("oldest_waiting_s")
        yield (f"Path     {state} · {path.get('waiting', 0)} urgent without PUBACK"
               + (f", oldest {oldest} s" if oldest is not None else "") + down)
    sms = data.get("sms")
    if sms and sms.get("configured"):
        if sms.get("process") != "up":
            yield "SMS      " + style(f"SMS PROCESS DOWN: {sms.get('reason')}", "red")
            return
        modem = sms.get("modem") or {}
        problem = modem.get("problem")
        signal = modem.get("signal_percent")
        head = style(f"MODEM FAULT: {problem}", "red") if problem else (
            f"modem ok, {modem.get('operator') or '—'}, signal {signal if signal is not None else '—'} %")
        yield (f"SMS      {head} · owed {sms.get('owed', 0)}, pending {sms.get('pending', 0)}, "
               f"sent {sms.get('sent', 0)}, held back {sms.get('held_back', 0)} · mode {sms.get('mode')}")


def build_parser() -> argparse.ArgumentParser:
    """The ``gatewayctl`` argument parser."""
    parser = _Parser(prog="gatewayctl", description="Building safety gateway: technician command line. "
                     "Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unavailable, 4 rejected.")
    parser.add_argument("--version", action="version", version=f"gatewayctl {__version__}")
    config_file = parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                                      help=f"site config: where the socket and database are (default {DEFAULT_CONFIG})")
    config_file.complete = FILE_COMPLETION  # type: ignore[attr-defined]
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    st = sub.add_parser("status", parents=[json_flag], help="what is wrong first, then the sounder, uplink, buses "
                        "and the units with their devices in trouble first")
    st.add_argument("--watch", "-w", nargs="?", type=_positive(float), const=1.0, default=None, metavar="SECONDS",
                    help="redraw in place every SECONDS (default 1) until Ctrl-C")
    st.add_argument("--unit", metavar="UNIT", help="only this unit, every device listed")
    st.add_argument("--problems", action="store_true", help="only what is wrong: conditions and devices in trouble")
    st.add_argument("--all", action="store_true", help="list every device, not only those in trouble")
    ev = sub.add_parser("events", parents=[json_flag], help="event history; --follow for new events; "
                        "--format csv|jsonl exports every match")
    ev.add_argument("--since", type=parse_since, help="30s, 10m, 2h, 7d, 2026-11-26T08:00 or epoch seconds")
    ev.add_argument("--until", type=parse_since, help="before this time (same forms as --since)")
    ev.add_argument("--format", choices=("text", "csv", "jsonl"), default="text",
                    help="csv or jsonl: every matching event, oldest first, streamed from the database")
    ev.add_argument("--device")
    ev.add_argument("--household")
    ev.add_argument("--kind", choices=sorted(KIND_PRIORITY))
    ev.add_argument("--limit", type=int, default=None, help=f"newest N events (default {EVENTS_SHOWN}; "
                    "with --format the first N, default all)")
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
    check = config_sub.add_parser("check", parents=[json_flag], help="validate a config file (default: --config)")
    check.add_argument("file", metavar="FILE", nargs="?", help="the file to check (default: the --config file)"
                       ).complete = FILE_COMPLETION  # type: ignore[attr-defined]
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
    if args.command == "events" and args.limit is not None and not 1 <= args.limit <= (
            10_000 if args.format == "text" else 2**62):
        parser.error("events: --limit must be 1–10000 (--format csv|jsonl has no cap)")
    if args.command == "events" and args.format != "text" and (args.follow or args.json):
        parser.error("events: --format exports stored events; it does not go with --follow or --json")
    if args.command == "events" and None not in (args.since, args.until) and args.until <= args.since:
        parser.error("events: --until must be after --since")
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
