"""The SMS process's log lines without structlog: the same lines the panel and the uplink write, for less memory.

structlog imports asyncio, ssl, logging and pickle (about 5 MB of the SMS process's 19 MB, measured with
``benchmarks/polling.py --modem``), and this process uses none of them. :func:`get_logger` gives the few calls the
SMS path makes (``log.info("sms sent", recipient=...)``) and writes what :func:`gateway.logs.configure_logging`
makes of them: a JSON line (the event's keys, ``event``, ``process``, ``level``, an ISO UTC ``timestamp``) off a
terminal, journald's native entry (``GATEWAY_<KEY>`` fields) under systemd, a short narrative on a terminal.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import threading
from datetime import UTC, datetime
from typing import Any

__all__ = ["Logger", "configure", "get_logger"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return False


class _Output:
    """Where lines go and from which level (:func:`configure`)."""

    def __init__(self) -> None:
        self.level = _LEVELS["info"]
        self.context: dict[str, Any] = {}
        self.journal: socket.socket | None = None
        self.journal_path = JOURNAL_SOCKET
        self.narrative = _tty()  # gatewayctl doctor's modem lines, unconfigured, read like a person's
        self.lock = threading.Lock()

    def write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        exception = fields.pop("exception", None)
        entry = {**fields, "event": event, **self.context, "level": level,
                 "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        if exception is not None:
            entry["exception"] = exception  # last, as structlog's format_exc_info puts it
        line = json.dumps(entry, default=repr)
        if self.journal is not None and self._to_journal(self.journal, line, entry):
            return
        text = _narrative(entry) if self.narrative else line
        with self.lock:
            try:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # a closed stdout loses the line, never the SMS

    def _to_journal(self, journal: socket.socket, line: str, entry: dict[str, Any]) -> bool:
        parts = [_journal_field("MESSAGE", line), _journal_field("PRIORITY", str(_PRIORITY.get(entry["level"], 6))),
                 _journal_field("SYSLOG_IDENTIFIER", "gatewayd")]
        for key, value in entry.items():
            name = "GATEWAY_" + re.sub(r"[^A-Z0-9_]", "_", str(key).upper())[:55]
            text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
            parts.append(_journal_field(name, text))
        try:
            journal.sendto(b"".join(parts), self.journal_path)
        except OSError:
            return False  # too large or no journal: the JSON line on stdout, which journald keeps too
        return True


_OUT = _Output()


class Logger:
    """``debug``/``info``/``warning``/``error``/``exception``, each ``(event, **fields)``, as structlog's."""

    def _log(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] >= _OUT.level:
            if fields.pop("exc_info", False):
                import traceback  # only when there is one to write

                fields["exception"] = traceback.format_exc().rstrip("\n")
            _OUT.write(level, event, fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._log("error", event, {**fields, "exc_info": True})


def get_logger() -> Logger:
    """The SMS modules' logger (one for all: configured by :func:`configure`)."""
    return _LOGGER


_LOGGER = Logger()


def configure(*, level: str = "info", **context: Any) -> None:
    """Once, in the SMS process's main: the lowest level written, and fields every line carries
    (``process="sms"``). Journald's native entries when stdout is its stream, a narrative on a terminal."""
    _OUT.level = _LEVELS.get(level.lower(), _LEVELS["info"])
    _OUT.context = dict(context)
    _OUT.narrative = _tty()
    if _journal_attached():
        _OUT.journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _journal_attached() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _journal_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def _narrative(entry: dict[str, Any]) -> str:
    quiet = {"timestamp", "level", "event", "process", "exception"}
    mark = {"warning": "WARN  ", "error": "ERROR ", "critical": "ERROR "}.get(entry["level"], "")
    tail = " ".join(f"{k}={v}" for k, v in entry.items() if k not in quiet and v is not None)
    line = f"{entry['timestamp'][11:19]}  {mark}{entry['event']}" + (f"  {tail}" if tail else "")
    return f"{line}\n{entry['exception']}" if "exception" in entry else line
