"""Whether the system clock is synchronised (a Pi has no real-time clock until NTP syncs)."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

__all__ = ["ASSUME_ENV", "SUITE_ENV", "TIMESYNC_FLAG", "TIME_ERROR", "adjtimex_state", "clock_synchronised",
           "command_clock_synchronised", "started_by_test_suite"]

TIME_ERROR = 5  # adjtimex(2): clock not synchronised
#: Written by systemd-timesyncd once it has synchronised (readable inside the service sandbox, where
#: adjtimex is refused by ProtectClock=yes).
TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"
_cache: tuple[float, bool] | None = None
#: Test environments only: "1" makes :func:`command_clock_synchronised` take the clock as synchronised (a CI
#: machine or container usually is not, and its MQTT command tests must run), "0" as not. Obeyed only in a
#: process the test suite started (:func:`started_by_test_suite`); on a gateway it is ignored with a warning,
#: and ``gatewayctl doctor`` flags it: remote commands would otherwise be judged by a clock that may be wrong.
ASSUME_ENV = "GATEWAY_TEST_ASSUME_CLOCK_SYNCHRONISED"
#: Set by the test suite (tests/conftest.py) to the pid of its pytest process.
SUITE_ENV = "GATEWAY_TEST_SUITE_PID"
_ignored_logged = False


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


def _parent_pid(pid: int) -> int:
    """The parent of ``pid`` from /proc (0 when it is gone); the name in ``stat`` may hold spaces and ")"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def started_by_test_suite() -> bool:
    """True when :data:`SUITE_ENV` names a running pytest process (not init) that is this process or one of its
    ancestors: the test suite started it."""
    raw = os.environ.get(SUITE_ENV, "")
    if not raw.isdigit() or int(raw) <= 1:
        return False
    suite = int(raw)
    try:
        if b"pytest" not in Path(f"/proc/{suite}/cmdline").read_bytes():
            return False
    except OSError:
        return False
    pid = os.getpid()
    for _ in range(64):  # a process tree is never this deep; a loop in a racing /proc read ends here
        if pid == suite:
            return True
        if pid <= 1:
            return False
        pid = _parent_pid(pid)
    return False


def command_clock_synchronised() -> bool:
    """Whether an MQTT command's validity window may be judged by this clock (docs/mqtt.md, "Commands and
    the clock"): :func:`clock_synchronised`, unless the test suite started this process and set
    :data:`ASSUME_ENV`; set anywhere else, it is ignored with a warning (once)."""
    global _ignored_logged
    assumed = os.environ.get(ASSUME_ENV)
    if assumed is not None:
        if assumed in ("0", "1") and started_by_test_suite():
            return assumed == "1"
        if not _ignored_logged:
            import structlog  # here: gatewayctl, which imports this module, runs on the standard library alone

            _ignored_logged = True
            structlog.get_logger().warning(
                "test-only clock override ignored: this process was not started by the test suite",
                variable=ASSUME_ENV, value=assumed)
    return clock_synchronised()
