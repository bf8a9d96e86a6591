"""A systemd notification socket for tests of ``gatewayd`` under supervision (READY=1, WATCHDOG=1, STATUS=)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

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
