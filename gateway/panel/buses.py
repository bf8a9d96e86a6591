"""One thread per RS-485 bus: the only owner of its serial port.

The thread polls its devices in turn and, for every answer or failure, calls the alarm panel directly —
so a reading reaches the buzzer without waiting for the asyncio loop. Other work for the port (a fresh
reading for the CLI, an address scan) is queued to the same thread with :meth:`BusPoller.submit`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import structlog

from drivers.modbus import (
    ChannelGroup,
    CommError,
    ExtinguisherStation,
    GasDetector,
    ModbusClient,
    ModbusDevice,
    StrictFraming,
    group_channels,
)
from drivers.profiles import GasReading, StationReading
from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat, answer_bytes, bus_floor_s
from gateway.config import BusConfig
from gateway.failpoints import failpoint
from gateway.panel.alarm_panel import AlarmPanel
from gateway.realtime import raise_priority

__all__ = ["BusPoller", "line_format", "open_client", "poll_reads"]

log = structlog.get_logger()


def open_client(bus: BusConfig) -> Any:
    """A pymodbus synchronous RTU client for the bus (not yet connected), strict about frame length.

    Retries are ours, not pymodbus's.
    """
    from pymodbus import FramerType

    return _prompt_client_class()(
        port=bus.port,
        framer=FramerType.RTU,
        baudrate=bus.baudrate,
        bytesize=bus.bytesize,
        parity=bus.parity,
        stopbits=bus.stopbits,
        timeout=bus.timeout_s,
        retries=0,
    )


@functools.cache
def _libc_keeping_gil() -> Any:
    """libc through :class:`ctypes.PyDLL`: its calls keep the GIL, so they cost no hand-off.

    Only for calls that cannot block: ``read`` and ``write`` on a non-blocking descriptor and the
    ``FIONREAD`` ioctl.
    """
    import ctypes

    libc = ctypes.PyDLL(None, use_errno=True)
    libc.read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    libc.read.restype = ctypes.c_ssize_t
    libc.write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    libc.write.restype = ctypes.c_ssize_t
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
    libc.ioctl.restype = ctypes.c_int
    return libc


def bytes_waiting(fd: int) -> int:
    """Bytes readable on a serial descriptor now, without giving the GIL away (0 on error)."""
    import ctypes
    import termios

    count = ctypes.c_int()
    if _libc_keeping_gil().ioctl(fd, termios.FIONREAD, ctypes.byref(count)) != 0:
        return 0
    return count.value


@functools.cache
def _prompt_client_class() -> type[Any]:
    """pymodbus's serial client, except that a response is taken as soon as its bytes arrive.

    The stock client sleep-polls the port every four character times and waits until two polls see the
    same byte count (4–8 ms at 9600 baud after the last byte, and a GIL hand-off per poll). This one
    blocks in ``select`` until bytes are readable and hands over what is there at once; pymodbus's RTU
    framer already waits for the rest of a partial frame (by its length and CRC) and calls again.

    ``select`` is the only call between the answer's arrival and the buzzer that gives the GIL away: a
    thread that gives it away while another thread runs Python waits up to one switch interval to win it
    back. The read and
    the count of bytes waiting behind the frame (:class:`StrictFraming`) go through libc without releasing
    it, on a descriptor kept non-blocking. Measured in benchmarks/buzzer_latency.py (docs/performance.md).

    Sending works the same way: bytes left from an earlier answer are drained and the request written
    through libc, and ``select`` waits for the port only when its output buffer is full. pyserial's own
    ``write`` calls ``select`` after every write, one more system call and GIL hand-off per poll.

    On a real line an answer arrives a character or two at a time. Its length follows from the request
    and each character's time from the baud rate, so once its first bytes are in, the thread sleeps until
    the rest can have arrived instead of waking for every chunk (:meth:`PromptSerialClient.recv`). A
    request waits for the inter-frame silence after the last answer, and no longer (:mod:`drivers.wire`).
    """
    import ctypes
    import errno
    import select
    import termios

    from pymodbus.client import ModbusSerialClient
    from pymodbus.exceptions import ConnectionException
    from pymodbus.logging import Log

    libc = _libc_keeping_gil()

    class PromptSerialClient(ModbusSerialClient):
        _buffer: ctypes.Array[ctypes.c_char]  # set when the port opens, used only by the bus thread
        _count: ctypes.c_int
        _char_s = 0.0  # one character's time on the wire
        _silence_s = 0.0  # the inter-frame silence
        _quiet_at = 0.0  # monotonic time from which the line has been silent long enough to send
        _answer_len: int | None = None  # bytes of the normal answer to the request in flight
        _answer_head = b""  # its first two bytes as received (address, function or exception flag)
        _answer_got = 0  # its bytes received so far
        _answer_base = 0.0  # monotonic time its first bytes came, less their wire time: when it began

        def connect(self) -> bool:
            fresh = self.socket is None
            ok = bool(super().connect())
            if ok and fresh and self.socket is not None:
                os.set_blocking(self.socket.fileno(), False)  # libc read below must never block
                self._buffer = ctypes.create_string_buffer(1024)
                self._count = ctypes.c_int()
                params = self.comm_params
                line = LineFormat(baud=int(params.baudrate or 9600), bytesize=int(params.bytesize or 8),
                                  parity=str(params.parity or "N"), stopbits=int(params.stopbits or 1))
                self._char_s, self._silence_s = line.char_s, line.silence_s
            return ok

        def send(self, request: bytes, addr: tuple[Any, ...] | None = None) -> int:
            if not request or self.socket is None:
                return int(super().send(request, addr))
            if (quiet := self._quiet_at - time.monotonic()) > 0:
                time.sleep(quiet)  # the silence that ends the previous frame (a few ms at most)
            self._answer_len, self._answer_head, self._answer_got = answer_bytes(request), b"", 0
            self._quiet_at = time.monotonic() + len(request) * self._char_s + self._silence_s
            try:
                fd = self.socket.fileno()
                if self.bytes_waiting():
                    Log.warning("Cleanup recv buffer before send: {}", self._drain(fd), ":hex")  # type: ignore[no-untyped-call]
                deadline = time.monotonic() + self.comm_params.timeout_connect
                sent = 0
                while sent < len(request):
                    wrote = libc.write(fd, request[sent:], len(request) - sent)
                    if wrote > 0:
                        sent += wrote
                    elif (code := ctypes.get_errno()) not in (errno.EAGAIN, errno.EINTR):
                        raise OSError(code, os.strerror(code))
                    elif (left := deadline - time.monotonic()) <= 0 or not select.select([], [fd], [], left)[1]:
                        raise ConnectionException(f"{self}: write timed out")
                return sent
            except OSError:  # the adapter went away
                self.close()  # type: ignore[no-untyped-call]
                raise ConnectionException(str(self)) from None

        def _drain(self, fd: int) -> bytes:
            """Read and return what is waiting on the port (the descriptor is non-blocking)."""
            drained = b""
            while (got := libc.read(fd, self._buffer, len(self._buffer))) > 0:
                drained += self._buffer.raw[:got]
            return drained

        def _answer_expected(self) -> int | None:
            """Bytes of the answer in flight (None when not known). An exception answer (5 bytes) is known by
            its second byte; until that has come, the normal answer is expected — a failed poll may be taken
            a few characters late, a reading never is."""
            if self._answer_len is not None and self._answer_got >= 2 and self._answer_head[1] & 0x80:
                return 5
            return self._answer_len

        def recv(self, size: int | None) -> bytes:
            """What the port holds as soon as it holds anything — or, once an answer of known length has begun,
            its whole frame as soon as its last character can have come (timed from its first bytes, which
            ``select`` caught as they came), so the thread wakes about twice per answer, not per chunk."""
            if size is not None or self.socket is None:
                return super().recv(size)
            deadline = time.monotonic() + self.comm_params.timeout_connect
            data = b""
            try:
                fd = self.socket.fileno()
                while True:
                    left = deadline - time.monotonic()
                    # Past the deadline one more look, without waiting: a thread that the machine woke late
                    # takes what came in time instead of calling the device silent or its frame cut short.
                    if not select.select([fd], [], [], max(0.0, left))[0]:
                        if left <= 0:
                            return data
                        continue
                    got = libc.read(fd, self._buffer, len(self._buffer))
                    if got == 0:
                        raise OSError("the port hung up")
                    if got < 0:
                        if (code := ctypes.get_errno()) not in (errno.EAGAIN, errno.EINTR):
                            raise OSError(code, os.strerror(code))
                        continue
                    chunk = self._buffer.raw[:got]
                    now = time.monotonic()
                    self._quiet_at = now + self._silence_s
                    if self._answer_got == 0:
                        self._answer_base = now - got * self._char_s  # when its first character began
                    if len(self._answer_head) < 2:
                        self._answer_head += chunk[: 2 - len(self._answer_head)]
                    self._answer_got += got
                    data += chunk
                    expected = self._answer_expected()
                    if expected is None or self._answer_got >= expected:
                        return data
                    complete_at = self._answer_base + expected * self._char_s
                    if (rest := min(complete_at, deadline) - now) > 0:
                        time.sleep(rest)  # the frame cannot be complete sooner; select then takes it at once
            except OSError:  # the adapter went away
                self.close()  # type: ignore[no-untyped-call]
                raise ConnectionException(str(self)) from None

        def bytes_waiting(self) -> int:
            """Bytes readable on the port now (0 when it is closed or failing)."""
            if self.socket is None:
                return 0
            if libc.ioctl(self.socket.fileno(), termios.FIONREAD, ctypes.byref(self._count)) != 0:
                return 0
            return self._count.value

    class BusSerialClient(StrictFraming, PromptSerialClient):
        """Prompt receive, and an answer with extra bytes around its frame is refused."""

        def _trailing(self) -> int:
            return self.bytes_waiting()

    return BusSerialClient


def line_format(bus: BusConfig) -> LineFormat:
    """The bus's baud rate and character format."""
    return LineFormat(baud=bus.baudrate, bytesize=bus.bytesize, parity=bus.parity, stopbits=bus.stopbits)


def poll_reads(devices: list[ModbusDevice]) -> list[tuple[int, int]]:
    """``(function, count)`` of every read of one usual cycle over ``devices``, as each is read now (a
    controller's channels by the read plan it uses)."""
    reads: list[tuple[int, int]] = []
    for device in group_channels(devices):  # a list already grouped passes unchanged
        reads += device.cycle_reads
    return reads


class BusPoller:
    """Polls the devices of one bus forever, in its own thread.

    While a cycle takes longer than ``poll_interval_s`` the next starts at once: between two polls the
    line is idle only for the protocol's silence.
    """

    def __init__(
        self,
        bus: BusConfig,
        devices: list[ModbusDevice],
        panel: AlarmPanel,
        *,
        heartbeat: Callable[[], None] | None = None,
        client_factory: Callable[[BusConfig], Any] = open_client,
        realtime_priority: int = 0,
    ) -> None:
        self.bus = bus
        self.devices = devices
        #: What a cycle polls: the devices, a multi-channel controller's channels as one group.
        self.polled = group_channels(devices)
        self._panel = panel
        self._heartbeat = heartbeat
        self._client_factory = client_factory
        self._priority = realtime_priority
        self._requests: queue.Queue[tuple[Callable[[ModbusClient], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-{bus.id}", daemon=True)
        self._client: Any = None
        self.port_lost = False
        self.polls = 0
        self.errors = 0
        #: Failed polls by what the line showed (:data:`drivers.modbus.FRAME_ERROR_KINDS`, ``exception:<name>``).
        self.errors_by_kind: Counter[str] = Counter()
        self.last_cycle_s = 0.0
        #: Duration of the last cycle that polled every device (None before the first): next to
        #: :attr:`floor_s` it says how close polling runs to the wire's limit.
        self.cycle_s: float | None = None
        self._failing: set[str] = set()

    @property
    def floor_s(self) -> float:
        """The wire's floor for one cycle of this bus's usual polls (:func:`drivers.wire.bus_floor_s`),
        with the default device turnaround."""
        return bus_floor_s(line_format(self.bus), poll_reads(self.polled), turnaround_s=DEFAULT_TURNAROUND_S)

    def read_plans(self) -> dict[str, str]:
        """How each multi-channel controller on the bus is read now (``span`` or ``channel``), by its first
        channel's device id."""
        return {d.device_id: d.plan for d in self.polled if isinstance(d, ChannelGroup)}

    @property
    def deadline_s(self) -> float:
        """How long a healthy thread may go without a heartbeat."""
        per_cycle = len(self.devices) * (self.bus.timeout_s + 0.1) + self.bus.poll_interval_s
        return max(10.0, 3 * per_cycle)

    @property
    def thread(self) -> threading.Thread:
        """The bus thread."""
        return self._thread

    @property
    def paused(self) -> bool:
        """Whether polling is paused (for an address scan)."""
        return self._paused.is_set()

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and close the port."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def pause(self, paused: bool) -> None:
        """Pause or resume polling (queued requests still run)."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()
        self._wake.set()

    def submit(self, work: Callable[[ModbusClient], Any]) -> Future[Any]:
        """Run ``work(client)`` on the bus thread between polls."""
        future: Future[Any] = Future()
        self._requests.put((work, future))
        self._wake.set()
        return future

    # ------------------------------------------------------------------------------ thread

    def _run(self) -> None:
        raise_priority(self._priority, self._thread.name)
        while not self._stop.is_set():
            started = time.monotonic()
            while failpoint("bus_hang", self.bus.id) and not self._stop.is_set():
                self._stop.wait(0.2)  # fault injection: a hung poll thread (tests of the watchdog)
            try:
                self._cycle()
            except Exception:  # the thread outlives any bug: the other devices must still be polled
                self._log_once("cycle", "bus cycle failed; polling goes on")
            if self._heartbeat is not None:
                try:
                    self._heartbeat()
                except Exception:
                    self._log_once("heartbeat", "heartbeat failed")
            self.last_cycle_s = time.monotonic() - started
            self._sleep_until(started + self.bus.poll_interval_s)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def _cycle(self) -> None:
        if not self._ensure_port():
            return
        if self._paused.is_set():
            self._serve_requests()
            return
        started = time.monotonic()
        for device in self.polled:
            if self._stop.is_set():
                return
            self._poll(device)
            self._serve_requests()
        self.cycle_s = time.monotonic() - started

    def _tell(self, key: str, call: Callable[..., None], *args: Any) -> None:
        """Report to the alarm panel; a bug behind it is logged and never stops the bus thread."""
        try:
            call(*args)
        except Exception:
            self._log_once(key, "alarm panel raised", subject=str(args[0]) if args else None)
        else:
            self._failing.discard(key)

    def _log_once(self, key: str, message: str, **fields: Any) -> None:
        """Log an unexpected exception with its traceback once per failing place, not at every poll."""
        if key not in self._failing:
            self._failing.add(key)
            log.exception(message, bus=self.bus.id, **fields)

    def _sleep_until(self, deadline: float) -> None:
        while not self._stop.is_set():
            self._serve_requests()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)
            self._wake.clear()

    def _serve_requests(self) -> None:
        while True:
            try:
                work, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                ready = self._ensure_port()
            except Exception as exc:  # delivered to the waiting caller; the thread goes on
                future.set_exception(exc)
                continue
            if not ready:
                future.set_exception(CommError("port", f"{self.bus.port} is not available"))
                continue
            try:
                future.set_result(work(self._client))
            except BaseException as exc:  # delivered to the waiting caller
                future.set_exception(exc)

    def _ensure_port(self) -> bool:
        if self._client is not None and self._client.connected:
            return True
        if self._client is None:
            self._client = self._client_factory(self.bus)
        try:
            ok = bool(self._client.connect())
        except Exception as exc:  # pyserial raises several undocumented types
            ok = False
            detail = str(exc)
        else:
            detail = f"cannot open {self.bus.port}"
        if ok != (not self.port_lost):
            self.port_lost = not ok
            self._tell("port", self._panel.port_state, self.bus.id, self.port_lost,
                       f"{self.bus.id}: {detail}" if not ok else self.bus.id)
            log.warning("serial port lost", bus=self.bus.id, port=self.bus.port) if not ok else log.info(
                "serial port open", bus=self.bus.id, port=self.bus.port)
        if not ok:
            for device in self.devices:
                self._tell(device.device_id, self._panel.poll_failed, device.device_id, "port")
        return ok

    def _poll(self, device: ModbusDevice) -> None:
        if isinstance(device, ChannelGroup):
            self._poll_channels(device)
            return
        self.polls += 1
        key = device.device_id
        try:
            reading = device.poll(self._client)
        except CommError as exc:
            self.errors += 1
            self.errors_by_kind[exc.kind] += 1
            self._tell(key, self._panel.poll_failed, key, exc.kind)
            if exc.reason in ("port", "timeout") and not self._port_present():
                self._client.close()
            return
        except Exception:  # a driver bug must never stop the bus thread
            self.errors += 1
            self.errors_by_kind["driver_error"] += 1
            self._log_once(f"driver:{key}", "poll raised", device=key)
            self._tell(key, self._panel.poll_failed, key, "driver_error")
            return
        self._failing.discard(f"driver:{key}")
        if isinstance(device, GasDetector) and isinstance(reading, GasReading):
            self._tell(key, self._panel.reading, key, reading)
        elif isinstance(device, ExtinguisherStation) and isinstance(reading, StationReading):
            self._tell(key, self._panel.station, key, reading)

    def _poll_channels(self, group: ChannelGroup) -> None:
        """One poll of a controller: each channel's reading, or its read's failure, to the panel as its own
        device. A poll with a failed read counts once on the bus, under the kind of its first failed read (so
        the kinds add up to the total), and once for each channel it carried."""
        self.polls += 1
        plan = group.plan
        try:
            results = group.poll(self._client)
        except Exception:  # a driver bug must never stop the bus thread
            results = {}
            self._log_once(f"driver:{group.device_id}", "poll raised", device=group.device_id)
        first_failed = next((r for r in results.values() if isinstance(r, CommError)), None)
        if first_failed is not None or not results:
            self.errors += 1
            self.errors_by_kind["driver_error" if first_failed is None else first_failed.kind] += 1
        failed = {id(r): r for r in results.values() if isinstance(r, CommError)}
        for key in group.device_ids:
            result = results.get(key)
            if isinstance(result, GasReading):
                self._tell(key, self._panel.reading, key, result)
            else:
                self._tell(key, self._panel.poll_failed, key, "driver_error" if result is None else result.kind)
        if group.plan != plan and group.fallback is not None:  # once, and only after the panel has the readings
            log.warning("controller read one channel at a time", bus=self.bus.id, address=group.address,
                        channels=list(group.device_ids), reason=group.fallback)
        if any(e.reason in ("port", "timeout") for e in failed.values()) and not self._port_present():
            self._client.close()

    def _port_present(self) -> bool:
        return not self.bus.port.startswith("/") or os.path.exists(self.bus.port)
