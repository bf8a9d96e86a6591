"""Whether the system clock is synchronised (a Pi has no real-time clock until NTP syncs)."""

from __future__ import annotations

import ctypes
import os
import time

__all__ = ["ASSUME_ENV", "TIMESYNC_FLAG", "TIME_ERROR", "adjtimex_state", "clock_synchronised",
           "command_clock_synchronised"]

TIME_ERROR = 5  # adjtimex(2): clock not synchronised
#: Written by systemd-timesyncd once it has synchronised (readable inside the service sandbox, where
#: adjtimex is refused by ProtectClock=yes).
TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"
_cache: tuple[float, bool] | None = None
#: Test environments only: "1" makes :func:`command_clock_synchronised` take the clock as synchronised (a CI
#: machine or container usually is not, and its MQTT command tests must run), "0" as not. Never set it on a
#: gateway: remote commands would then be judged by a clock that may be wrong.
ASSUME_ENV = "GATEWAY_TEST_ASSUME_CLOCK_SYNCHRONISED"


def adjtimex_state() -> int | None:
    """The kernel's clock state from a read-only adjtimex(2) (``modes`` = 0); None if it is not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded: no ldconfig lookup
    buf = ctypes.create_string_buffer(512)  # struct timex with modes = 0: read only
    state = libc.adjtimex(buf)
    return None if state < 0 else int(state)  # -1 with EPERM under ProtectClock=yes


def clock_synchronised(max_age_s: float = 10.0) -> bool:
    """True when the kernel says the clock is synchronised (cached for ``max_age_s``)."""
    global _cache
    now = time.monotonic()
    if _cache is not None and now - _cache[0] < max_age_s:
        return _cache[1]
    state = adjtimex_state()
    synced = os.path.exists(TIMESYNC_FLAG) if state is None else state != TIME_ERROR
    _cache = (now, synced)
    return synced


def command_clock_synchronised() -> bool:
    """Whether an MQTT command's validity window may be judged by this clock (docs/mqtt.md, "Commands and
    the clock"): :func:`clock_synchronised`, unless a test environment sets :data:`ASSUME_ENV`."""
    assumed = os.environ.get(ASSUME_ENV)
    if assumed in ("0", "1"):
        return assumed == "1"
    return clock_synchronised()
