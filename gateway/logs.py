"""structlog configuration, done once in the entry points: JSON lines off a terminal, a narrative on one, and
under systemd native journal entries whose fields are the event's keys (``journalctl GATEWAY_DEVICE=gas-u1-201``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import structlog

from gateway.journal import JOURNAL_SOCKET, journal_attached, journal_entry

__all__ = ["JournalRenderer", "NarrativeRenderer", "configure_logging", "journal_attached"]



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
        try:
            self.sock.sendto(journal_entry(line, fields, identifier=self.identifier), self.path)
        except OSError:
            return line  # too large or no journal: the JSON line on stdout, which journald keeps too
        raise structlog.DropEvent


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
