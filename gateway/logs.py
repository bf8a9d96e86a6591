"""structlog configuration, done once in the entry points: JSON lines off a terminal, a narrative on one, and
under systemd native journal entries whose fields are the event's keys (``journalctl GATEWAY_DEVICE=gas-u1-201``).
"""

from __future__ import annotations

import json as jsonlib
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

import structlog

__all__ = ["JournalRenderer", "NarrativeRenderer", "configure_logging", "journal_attached"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


#: Fields a person at a terminal does not need on every line (they stay in the JSON lines journald keeps).
_QUIET_KEYS = frozenset({"timestamp", "level", "event_id", "process", "boot", "gateway", "session", "logger"})
_LEVEL_MARKS = {"warning": ("WARN ", "33"), "error": ("ERROR", "1;31"), "critical": ("ERROR", "1;31")}


class NarrativeRenderer:
    """One short line per log event for a person at a terminal: the time, what happened, and the fields that say
    where and how much (``12:00:07  alarm raised  device=gas-u1-201 value=26.0 %LEL``). Warnings and errors are
    marked; identifiers and process bookkeeping are left to the JSON form."""

    def __init__(self, *, colors: bool) -> None:
        self.colors = colors

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colors else text

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> str:
        when = str(event_dict.get("timestamp", ""))[11:19]
        level = str(event_dict.get("level", "info"))
        event = str(event_dict.pop("event", ""))
        exc = event_dict.pop("exception", None)
        fields = {k: v for k, v in event_dict.items() if k not in _QUIET_KEYS and v is not None}
        if "value" in fields and "measure" in fields:
            fields["value"] = f"{fields.pop('value')} {fields.pop('measure')}"
        mark, code = _LEVEL_MARKS.get(level, ("", ""))
        head = f"{when}  " + (self._paint(mark, code) + " " if mark else "") + (
            self._paint(event, "1") if mark else event)
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{head}  {tail}" if tail else head
        return f"{line}\n{exc}" if exc else line


def _journal_field(name: str, value: str) -> bytes:
    """One field of journald's native protocol; a value with a newline goes length-prefixed."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalRenderer:
    """Sends each event to journald as a native entry: ``MESSAGE`` is the same JSON line as off a terminal (so
    ``journalctl -o cat | jq`` keeps working), ``PRIORITY`` follows the level, and every key of the event is a
    field of its own, ``GATEWAY_<KEY>``. If the journal refuses an entry it goes to stdout as a JSON line."""

    def __init__(self, *, identifier: str, path: str = JOURNAL_SOCKET) -> None:
        self.identifier = identifier
        self.path = path
        self.json = structlog.processors.JSONRenderer(sort_keys=False)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        fields = dict(event_dict)
        line = str(self.json(logger, name, event_dict))
        entry = [_journal_field("MESSAGE", line),
                 _journal_field("PRIORITY", str(_PRIORITY.get(str(fields.get("level")), 6))),
                 _journal_field("SYSLOG_IDENTIFIER", self.identifier)]
        for key, value in fields.items():
            field = "GATEWAY_" + re.sub(r"[^A-Z0-9_]", "_", str(key).upper())[:55]
            text = value if isinstance(value, str) else jsonlib.dumps(value, default=str, ensure_ascii=False)
            entry.append(_journal_field(field, text))
        try:
            self.sock.sendto(b"".join(entry), self.path)
        except OSError:
            return line  # too large or no journal: the JSON line on stdout, which journald keeps too
        raise structlog.DropEvent


def journal_attached() -> bool:
    """Whether stdout is systemd's journal stream (``$JOURNAL_STREAM`` names its device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """JSON lines to stdout when not on a TTY, a short narrative on a TTY, native journal entries under systemd."""
    use_json = not sys.stdout.isatty() if json is None else json
    renderer: Any
    if json is None and journal_attached():
        renderer = JournalRenderer(identifier="gatewayd")  # the panel and its storage process alike
    elif use_json:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = NarrativeRenderer(colors=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
