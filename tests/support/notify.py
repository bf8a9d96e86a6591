"""A systemd notification socket for tests of ``gatewayd`` under supervision (READY=1, WATCHDOG=1, STATUS=)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from tests.support.wait import wait_until

__all__ = ["NotifyListener"]


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: collects the datagrams the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(fields)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def index_of(self, key: str, predicate: Callable[[str], bool] = lambda v: True, start: int = 0) -> int | None:
        for i, message in enumerate(self.snapshot()[start:], start):
            if key in message and predicate(message[key]):
                return i
        return None

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)

    def expect_stale_part(
        self, part: str, hang: Path, *, context: Callable[[], str] = lambda: ""
    ) -> list[dict[str, str]]:
        """Walk a daemon started with this socket and a ``bus_hang`` fail point on ``hang`` through the watchdog
        contract: READY, WATCHDOG=1 and a healthy STATUS; then, once ``hang`` exists, a STATUS naming ``part``
        as stale and no WATCHDOG=1 from then on. Returns the messages from the first stale STATUS on."""
        wait_until(lambda: self.index_of("READY") is not None, timeout=60,
                   message=lambda: f"no READY=1; got {self.snapshot()}; {context()}")
        ready = self.index_of("READY")
        assert ready is not None
        wait_until(lambda: self.index_of("WATCHDOG", start=ready) is not None, timeout=30,
                   message="no WATCHDOG=1 while healthy")
        assert self.index_of("STATUS", lambda v: "devices ok" in v) is not None
        hang.write_text("")  # the poll thread stops making progress
        wait_until(lambda: self.index_of("STATUS", lambda v: "stale" in v and part in v) is not None, timeout=90,
                   message=lambda: f"no stale STATUS; got {self.snapshot()[-5:]}; {context()}")
        stale_at = self.index_of("STATUS", lambda v: "stale" in v)
        assert stale_at is not None
        wait_until(lambda: len(self.snapshot()) >= stale_at + 4, timeout=30)
        after = self.snapshot()[stale_at:]
        assert not any("WATCHDOG" in m for m in after), after
        assert all(part in m.get("STATUS", part) for m in after), after
        return after
