"""The heap that start-up freed, handed back to the OS: each process calls it once it has started.

Imports and parsing the site file free a few MB that glibc keeps in its arenas; ``malloc_trim(0)`` returns them.
A memory measure, not a latency one: ``benchmarks/polling.py --modem`` gave a summed PSS of 58.0 MB with it in
the three processes and 67.5 MB without (2026-12-07, docs/performance.md). No structlog here: the SMS process
calls it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

__all__ = ["release_startup_heap"]


def release_startup_heap() -> bool:
    """Collect, then hand the freed heap back (glibc only); whether ``malloc_trim`` ran."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
        return True
    return False
