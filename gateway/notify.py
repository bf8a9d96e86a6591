"""systemd notification (sd_notify) and a watchdog that feeds only on real progress.

:class:`Notifier` sends ``KEY=value`` datagrams to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path,
or an abstract name starting with ``@``). Without ``NOTIFY_SOCKET`` every call is a no-op; send errors are
swallowed and the socket is non-blocking, so notification can never stall or crash the daemon.

:class:`Watchdog` sends ``WATCHDOG=1`` only while every part registered in a :class:`Heartbeats` is fresh.
When a part is stale it withholds the keep-alive and reports ``STATUS=stale: <names> | <summary>``, so a
wedged thread gets the service restarted by systemd instead of being hidden by a timer that always feeds.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

from gateway.health import Heartbeats

__all__ = ["DEFAULT_INTERVAL_S", "Notifier", "Watchdog", "watchdog_interval"]

DEFAULT_INTERVAL_S = 5.0


def _address(value: str) -> str | bytes | None:
    """Turn a ``NOTIFY_SOCKET`` value into a socket address; ``@name`` is the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd also allows vsock:..., which this daemon never runs under


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float:
    """Half of ``WATCHDOG_USEC`` in seconds if set and valid, else :data:`DEFAULT_INTERVAL_S`."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return usec / 2e6 if usec > 0 else DEFAULT_INTERVAL_S


def _watchdog_pid_ok(environ: Mapping[str, str]) -> bool:
    """True unless ``WATCHDOG_PID`` names a process other than this one."""
    pid = environ.get("WATCHDOG_PID")
    if not pid:
        return True
    try:
        return int(pid) == os.getpid()
    except ValueError:
        return False


class Notifier:
    """Sends sd_notify messages; a silent no-op when not started by systemd with ``Type=notify``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET`` from ``environ`` (default: the process environment)."""
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it was handed to the socket."""
        if self._address is None or not fields:
            return False
        # One field per line: a newline inside a value would start a bogus field, so flatten it.
        lines = (f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        payload = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(payload, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (storage and pins are open)."""
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def stopping(self) -> bool:
        """Tell systemd the daemon is shutting down."""
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        """Feed systemd's watchdog once."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """A daemon thread that feeds systemd's watchdog only while every heartbeat is fresh."""

    def __init__(
        self,
        heartbeats: Heartbeats,
        notifier: Notifier,
        interval_s: float | None = None,
        status_text: Callable[[], str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Configure the watchdog; call :meth:`start` to run it.

        Args:
            heartbeats: the parts that must make progress.
            notifier: where ``WATCHDOG=1`` and ``STATUS=`` go.
            status_text: a short summary, e.g. ``"12 devices ok, 0 fault, backlog 3"``; default counts
                the parts.
            interval_s: seconds between checks; default half of ``WATCHDOG_USEC``, else 5 s.
            environ: environment for ``WATCHDOG_USEC``/``WATCHDOG_PID`` (default: the process's).
        """
        env = os.environ if environ is None else environ
        self._heartbeats = heartbeats
        self._notifier = notifier
        self._status_text = status_text or self._default_status
        self.interval_s = watchdog_interval(env) if interval_s is None else interval_s
        if self.interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, got {self.interval_s}")
        self._feed_allowed = _watchdog_pid_ok(env)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _default_status(self) -> str:
        return f"{len(self._heartbeats.names())} parts watched"

    def check(self) -> list[str]:
        """Run one cycle now: feed or withhold, update STATUS; return the stale names."""
        stale = self._heartbeats.stale()
        try:
            summary = self._status_text()
        except Exception as exc:  # a broken summary must not stop the watchdog thread
            summary = f"status unavailable: {type(exc).__name__}"
        if stale:
            self._notifier.send(STATUS=f"stale: {', '.join(stale)} | {summary}")
        elif self._feed_allowed:
            self._notifier.send(WATCHDOG=1, STATUS=summary)
        else:
            self._notifier.send(STATUS=summary)
        return stale

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Start the watchdog thread (once)."""
        if self._thread is not None:
            raise RuntimeError("watchdog already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it to end."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
