"""The panel's saved state: latched alarms, silence, walk tests and the relays they drive.

A restart, a crash or a power cut is not a reset. Whenever one of these changes, the alarm path only sets a
flag (the pins have already moved); :class:`StateSaver`'s thread takes a copy from the core and writes it
atomically (temporary file, fsync, rename, fsync of the directory). At start, :func:`load_state` gives it
back before the first poll. A file that is unreadable, corrupt or from another site is set aside (renamed,
never deleted) and the panel starts fresh with a fault event saying why (docs/alarms.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

__all__ = ["FORMAT", "LoadedState", "StateSaver", "load_state", "state_path"]

log = structlog.get_logger()

FORMAT = 1
#: Saves are at most this often (seconds); a change within it is saved at its end.
MIN_INTERVAL_S = 0.05


def state_path(db_path: str) -> Path:
    """The state file of a site: next to its database (the service's writable state directory)."""
    return Path(db_path).with_name(Path(db_path).stem + ".panel-state.json")


@dataclass(frozen=True, slots=True)
class LoadedState:
    """What :func:`load_state` found: the saved panel state, or why it was set aside."""

    state: dict[str, Any] | None
    problem: str | None = None
    set_aside_as: str | None = None


def load_state(path: Path, identity: dict[str, str]) -> LoadedState:
    """Read the saved state of the site ``identity`` (community, building, gateway); never raises."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadedState(None)
    except OSError as exc:
        return _set_aside(path, f"unreadable: {exc.strerror or exc}")
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        return _set_aside(path, f"corrupt: {exc}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("panel"), dict):
        return _set_aside(path, "corrupt: not a panel state of format 1")
    if doc.get("site") != identity:
        return _set_aside(path, f"from another site: {doc.get('site')!r}")
    panel = doc["panel"]
    for key in ("latches", "walk_tests", "relays"):
        if not isinstance(panel.get(key, []), list):
            return _set_aside(path, f"corrupt: {key} is not a list")
    return LoadedState(panel)


def _set_aside(path: Path, problem: str) -> LoadedState:
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.error("panel state could not be set aside", path=str(path), error=str(exc))
        return LoadedState(None, problem)
    log.error("panel state set aside; starting fresh", path=str(path), set_aside_as=str(aside), problem=problem)
    return LoadedState(None, problem, str(aside))


class StateSaver:
    """Writes the panel's state on its own thread whenever :meth:`changed` is called."""

    def __init__(self, path: Path, identity: dict[str, str], take: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.identity = identity
        self._take = take
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)
        self.saves = 0
        self.error: str | None = None

    def start(self) -> None:
        """Start the saving thread."""
        self._thread.start()

    def changed(self) -> None:
        """Something to save changed (called on the alarm path: sets a flag, nothing more)."""
        self._changed.set()

    def save_now(self) -> None:
        """Write the current state on the calling thread (at start and at stop)."""
        state = self._take()
        doc = {"format": FORMAT, "site": self.identity, "saved_at": time.time(), "panel": state}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(doc))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if self.error is None:
                log.error("panel state could not be saved; retried on the next change", error=str(exc))
            self.error = str(exc)
            return
        self.error = None
        self.saves += 1

    def stop(self) -> None:
        """Save what is pending and end the thread."""
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._changed.wait()
            if self._stop.is_set():
                if self._changed.is_set():
                    self._changed.clear()
                    self.save_now()
                return
            self._changed.clear()
            with contextlib.suppress(Exception):
                self.save_now()
            self._stop.wait(MIN_INTERVAL_S)
