"""Process tuning for the alarm path: SCHED_FIFO when permitted; the storage process's start-up objects frozen.

The panel applies only what ``benchmarks/buzzer_latency.py`` shows lowering its overhead above the platform's
floor under stress (docs/performance.md, "Tricks"): SCHED_FIFO did; a 0.25 ms GIL switch interval, ``gc.freeze``
and ``malloc_trim`` did not, and are gone from the panel (``malloc_trim`` stays for memory: gateway/heap.py).
"""

from __future__ import annotations

import gc
import os

import structlog

__all__ = ["raise_priority", "settle_startup"]

log = structlog.get_logger()
_warned = False


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


def settle_startup(freeze: bool) -> int:
    """Once the storage process has started everything (``runtime.gc_freeze``): collect, and move every object
    left to the permanent generation so that no collection walks the start-up objects again. Returns how many
    objects are frozen."""
    if freeze:
        gc.collect()
        gc.freeze()
    return gc.get_freeze_count()
