"""Process tuning for the alarm path: SCHED_FIFO when permitted, the GIL switch interval, start-up heap."""

from __future__ import annotations

import contextlib
import gc
import os

import structlog

__all__ = ["SWITCH_INTERVAL_S", "raise_priority", "release_startup_heap", "settle_startup"]

log = structlog.get_logger()
_warned = False
#: How long a thread that wants the interpreter waits before the running one must hand it over (CPython's
#: default is 5 ms). Bus threads and GPIO callbacks wake from I/O and need it back at once. At 0.25 ms a
#: busy loop adds about 1 ms at p99 to the serial alarm path instead of 30; the price, about 7 % of
#: throughput, is paid only while two threads want the CPU at once (docs/performance.md).
SWITCH_INTERVAL_S = 0.00025



def raise_priority(priority: int, name: str) -> bool:
    """Put the calling thread in SCHED_FIFO at ``priority`` (0 = leave it). Logs once when not permitted."""
    global _warned
    if priority <= 0 or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError) as exc:
        if not _warned:
            _warned = True
            log.warning("realtime scheduling not permitted; running with normal priority",
                        thread=name, error=str(exc))
        return False
    return True


def release_startup_heap() -> None:
    """Hand the heap that start-up freed (imports, config parsing) back to the OS: about 1 MB of RSS (glibc)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def settle_startup(freeze: bool) -> int:
    """Once a process has started everything (``runtime.gc_freeze``): collect, move every object left to the
    permanent generation so that no collection walks the start-up objects again, and hand the freed heap back.
    Returns how many objects are frozen."""
    if freeze:
        gc.collect()
        gc.freeze()
        release_startup_heap()
    return gc.get_freeze_count()
