"""Raising alarm threads to SCHED_FIFO when the system permits it."""

from __future__ import annotations

import os

import structlog

__all__ = ["raise_priority"]

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
