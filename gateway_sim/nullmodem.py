"""A null-modem cable between two pseudo-terminals: the gateway's serial port and the simulated device's.

:class:`VirtualNullModem` joins two ptys like ``socat pty,raw,echo=0 pty,raw,echo=0``, behind stable symlinks,
and can cut the cable or unplug the gateway's USB adapter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import queue
import select
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["PtyEnd", "VirtualNullModem"]

_log = logging.getLogger(__name__)

_CHUNK: Final = 4096
_POLL_MS: Final = 500
_COMMAND_TIMEOUT_S: Final = 10.0


@dataclass
class PtyEnd:
    """One pseudo-terminal: the master the bridge uses and a slave fd kept open so reads never hit EIO."""

    master: int
    keeper: int
    slave_path: str

    @classmethod
    def open(cls) -> PtyEnd:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        return cls(master, slave, os.ttyname(slave))

    def close(self) -> None:
        for fd in (self.master, self.keeper):
            with contextlib.suppress(OSError):
                os.close(fd)


def _point_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (like a udev rule)."""
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


class VirtualNullModem:
    """Two pseudo-terminals joined like a null-modem cable, with stable symlinks in ``directory``.

    The daemon opens :attr:`gateway_port`, the simulated device opens :attr:`device_port`. A daemon thread
    copies bytes between the two pty masters. Either side may close and reopen its end at any time.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        gateway_name: str = "ttyGW0",
        device_name: str = "ttyDEV0",
        on_device_write: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self._dir = Path(directory)
        self._gw_link = self._dir / gateway_name
        self._dev_link = self._dir / device_name
        #: Called in the bridge thread with each chunk from the device side, once written to the gateway side,
        #: and the ``time.perf_counter()`` at which its writing began (the gateway cannot have seen it earlier).
        self.on_device_write = on_device_write
        self._lock = threading.Lock()
        self._cut = False
        self._gw: PtyEnd | None = None
        self._dev: PtyEnd | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], concurrent.futures.Future[None]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def gateway_port(self) -> str:
        """Path the gateway daemon opens."""
        return str(self._gw_link)

    @property
    def device_port(self) -> str:
        """Path the simulated device opens."""
        return str(self._dev_link)

    @property
    def is_cut(self) -> bool:
        """True while the cable is cut."""
        with self._lock:
            return self._cut

    @property
    def is_plugged(self) -> bool:
        """True while the gateway-side adapter exists."""
        with self._lock:
            return self._gw is not None

    def start(self) -> None:
        """Create both ptys and their symlinks and start the bridge thread."""
        if self._thread is not None:
            raise RuntimeError("null modem already started")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        with self._lock:
            self._dev = PtyEnd.open()
            self._gw = PtyEnd.open()
            _point_symlink(self._dev_link, self._dev.slave_path)
            _point_symlink(self._gw_link, self._gw.slave_path)
        self._thread = threading.Thread(target=self._run, name="null-modem", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the bridge, close every fd and remove the symlinks. Idempotent."""
        thread = self._thread
        if thread is not None:
            self._call(self._request_stop)
            thread.join(_COMMAND_TIMEOUT_S)
            self._thread = None
        with self._lock:
            for end in (self._gw, self._dev):
                if end is not None:
                    end.close()
            self._gw = self._dev = None
        for link in (self._gw_link, self._dev_link):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def cut(self) -> None:
        """Cut the cable: bytes are dropped in both directions."""
        with self._lock:
            self._cut = True

    def mend(self) -> None:
        """Repair the cable."""
        with self._lock:
            self._cut = False

    def unplug(self) -> None:
        """Remove the gateway-side adapter: its pty is destroyed and the symlink removed."""
        self._call(self._do_unplug)

    def replug(self) -> None:
        """Plug the adapter back in: a new gateway-side pty behind the same symlink."""
        self._call(self._do_replug)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- fd changes happen in the bridge thread, so it never polls a closed (or reused) fd ------------

    def _call(self, fn: Callable[[], None]) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            fn()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put((fn, done))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        done.result(_COMMAND_TIMEOUT_S)

    def _request_stop(self) -> None:
        self._stopping = True

    def _do_unplug(self) -> None:
        with self._lock:
            end, self._gw = self._gw, None
        if end is not None:
            end.close()
        with contextlib.suppress(FileNotFoundError):
            self._gw_link.unlink()

    def _do_replug(self) -> None:
        with self._lock:
            if self._gw is not None:
                return
            self._gw = PtyEnd.open()
            _point_symlink(self._gw_link, self._gw.slave_path)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _run(self) -> None:
        while True:
            self._run_commands()
            if self._stopping:
                return
            with self._lock:
                gw = self._gw.master if self._gw is not None else -1
                dev = self._dev.master if self._dev is not None else -1
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in (gw, dev):
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
            for fd, _events in poller.poll(_POLL_MS):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, _CHUNK)
                elif fd == gw:
                    self._pump(gw, dev, from_device=False)
                elif fd == dev:
                    self._pump(dev, gw, from_device=True)

    def _pump(self, src: int, dst: int, *, from_device: bool) -> None:
        try:
            data = os.read(src, _CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # not expected while the keeper fd is open
            _log.warning("null modem read failed: %s", exc)
            return
        with self._lock:
            cut = self._cut
        if cut or dst < 0 or not data:
            return
        view = memoryview(data)
        writing_at = time.perf_counter()  # before the gateway side can have any of it
        while view:
            try:
                view = view[os.write(dst, view) :]
            except BlockingIOError:  # nobody reads the other end and its buffer is full: the bytes are lost
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    _log.warning("null modem write failed: %s", exc)
                return
        hook = self.on_device_write
        if from_device and hook is not None:
            try:
                hook(data, writing_at)
            except Exception:
                _log.exception("on_device_write hook failed")
