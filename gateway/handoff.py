"""The main thread steps aside the moment a bus answer arrives (SIGIO), so the bus thread wins the GIL at once.

A bus thread blocked in ``select`` has given the GIL away. When the answer arrives while another thread is
running Python, the bus thread waits one switch interval before CPython asks that thread to let go. The
asyncio loop runs in the main thread, and a blocked loop (a bug, a long computation) is that other thread.

With the hand-off installed, each bus port is made ``O_ASYNC`` with the main thread as its signal owner
(``F_SETOWN_EX``, ``F_OWNER_TID``). When bytes arrive, the kernel signals the main thread; CPython's C
handler has it run :func:`_on_sigio` at its next instruction. If a bus thread is blocked waiting on a port
that now has bytes, the handler releases the GIL by waiting — at most :data:`PARK_S` — until that bus
thread has handled them (:func:`release`, or waiting for more bytes: :func:`arm`).

Safety rules, each kept here:

* A port becomes ``O_ASYNC`` only after the handler is installed (SIGIO's default action ends the
  process), and the handler stays installed for the life of the process.
* The handler never parks while the main thread holds a lock a bus thread needs before the buzzer (the
  alarm panel's: :class:`holding`), and never inside itself (a signal arriving while it waits returns at
  once: a nested wait would take the lock of the event it is already waiting on).
* It never parks for a port the main thread itself waits on, nor when the signal found the loop idle in
  its selector (the bus thread then has the GIL for the asking).
* Bus threads only set flags and an event; they never wait on the main thread.

Linux only. Measured in benchmarks/buzzer_latency.py (docs/performance.md).
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PARK_S", "arm", "disable", "disarm", "enabled", "forget", "holding", "install", "release", "stats", "watch"]

PARK_S = 0.002
"""The longest the main thread waits for a bus thread per signal."""

_F_SETOWN_EX = 15  # <linux/fcntl.h>; not exported by the fcntl module
_F_OWNER_TID = 0

_installed = False  # the handler, once installed, stays for the life of the process
_enabled = False  # whether ports opened from now on are watched
_main_ident = 0
_main_native_id = 0
_in_handler = False
_main_holds = 0  # how many alarm-path locks the main thread holds now
_armed: dict[int, int] = {}  # port → the thread blocked waiting for its bytes
_free = threading.Event()
_free.set()
_bytes_waiting: Callable[[int], int] | None = None  # gateway.bus.bytes_waiting, set by install()
_counts = {"signals": 0, "idle": 0, "ignored": 0, "parks": 0, "park_timeouts": 0}


def install() -> bool:
    """Install the SIGIO handler and watch ports opened from now on; returns whether the hand-off is on
    (main thread of a Linux process only)."""
    global _installed, _enabled, _main_ident, _main_native_id, _bytes_waiting
    if _installed:
        _enabled = True
        return True
    main = threading.main_thread()
    if threading.current_thread() is not main or not hasattr(signal, "SIGIO") or main.native_id is None:
        return False
    from gateway.panel.buses import bytes_waiting

    _bytes_waiting = bytes_waiting
    signal.signal(signal.SIGIO, _on_sigio)
    _main_ident, _main_native_id = main.ident or 0, main.native_id
    _installed = _enabled = True
    return True


def disable() -> None:
    """Ports opened from now on are not watched (the handler, if installed, stays)."""
    global _enabled
    _enabled = False


def enabled() -> bool:
    """Whether ports opened now are watched."""
    return _enabled


def watch(fd: int) -> bool:
    """Have the kernel signal the main thread when bytes arrive on ``fd``; False when the hand-off is off."""
    if not (_installed and _enabled):
        return False
    try:
        fcntl.fcntl(fd, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, _main_native_id))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError:
        return False
    return True


def forget(fd: int) -> None:
    """The port is about to close."""
    _armed.pop(fd, None)


def arm(fd: int) -> None:
    """A bus thread is about to wait for bytes on ``fd``; whatever it was handling is done."""
    _armed[fd] = threading.get_ident()
    _free.set()


def disarm(fd: int) -> None:
    """The bus thread is back from waiting on ``fd`` (and holds the GIL)."""
    _armed.pop(fd, None)


def release() -> None:
    """A bus thread finished handling an answer: a parked main thread may go on."""
    _free.set()


class holding:
    """Marks a lock on the alarm path held by the main thread: no parking meanwhile (a bus thread would
    wait for the lock, and the main thread for the bus thread)."""

    __slots__ = ("_main",)

    def __enter__(self) -> None:
        global _main_holds
        self._main = threading.get_ident() == _main_ident
        if self._main:
            _main_holds += 1

    def __exit__(self, *exc: object) -> None:
        global _main_holds
        if self._main:
            _main_holds -= 1


def stats() -> dict[str, int]:
    """Since start: signals taken, taken while the loop was idle, ignored (inside the handler, or while the
    main thread held an alarm-path lock), parks, and parks that ran out of time."""
    return dict(_counts)


_IDLE_WAIT = selectors.DefaultSelector.select.__code__  # the asyncio loop waiting for I/O, GIL released


def _on_sigio(signum: int, frame: Any) -> None:
    global _in_handler
    _counts["signals"] += 1
    if frame is not None and frame.f_code is _IDLE_WAIT:
        _counts["idle"] += 1  # the loop was waiting, not running: the bus thread had the GIL for the asking
        return
    if _in_handler or _main_holds or _bytes_waiting is None:
        _counts["ignored"] += 1
        return
    _in_handler = True
    try:
        waiting = _bytes_waiting
        # A port the main thread itself waits on (a tool polling from it) must not park it.
        if any(ident != _main_ident and waiting(fd) > 0 for fd, ident in tuple(_armed.items())):
            _counts["parks"] += 1
            _free.clear()
            if not _free.wait(PARK_S):
                _counts["park_timeouts"] += 1
    finally:
        _in_handler = False
