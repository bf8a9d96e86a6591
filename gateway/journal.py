"""journald's native protocol: whether stdout is the journal, and one log event as a native entry.

Free of structlog, so that the SMS process (gateway/sms/logger.py) writes the same entries as the others
(gateway/logs.py) without loading it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["JOURNAL_SOCKET", "journal_attached", "journal_entry"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def journal_attached() -> bool:
    """Whether stdout is systemd's journal stream (``$JOURNAL_STREAM`` names its device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_entry(line: str, fields: Mapping[str, Any], *, identifier: str) -> bytes:
    """One native entry: ``MESSAGE`` is the JSON line, ``PRIORITY`` follows the event's level, and every key of
    the event is a field of its own, ``GATEWAY_<KEY>``."""
    parts = [_field("MESSAGE", line), _field("PRIORITY", str(_PRIORITY.get(str(fields.get("level")), 6))),
             _field("SYSLOG_IDENTIFIER", identifier)]
    for key, value in fields.items():
        name = "GATEWAY_" + re.sub(r"[^A-Z0-9_]", "_", str(key).upper())[:55]
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        parts.append(_field(name, text))
    return b"".join(parts)


def _field(name: str, value: str) -> bytes:
    """One field; a value with a newline goes length-prefixed."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"
