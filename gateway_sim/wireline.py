"""An RS-485 line in wire time between the cable's device end and the simulated devices' own pty.

:class:`WireSpec` names the line (baud rate, character format, turnaround, noise); :class:`WireLine` relays
bytes at that pace: frames separated by the protocol's silence, half duplex, each slave's own turnaround
(:mod:`drivers.wire` has the formulas).

Its thread waits with Linux's default timer slack (50 µs). A 1 µs slack set through ``prctl`` (ctypes) changed
the median transaction at 9600, 19200 and 38400 baud by less than the spread between runs (two interleaved runs
of 7 on a loaded machine: −0.6 to +2.4 % against spreads of 2–40 %), so it was dropped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import random
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat

__all__ = ["TURNAROUND_RANGE_S", "WireFrame", "WireLine", "WireSpec", "check_turnaround"]

_log = logging.getLogger(__name__)

_CHUNK: Final = 4096
_COMMAND_TIMEOUT_S: Final = 10.0


#: Shortest and longest turnaround a simulated slave may have (seconds).
TURNAROUND_RANGE_S: Final = (0.001, 0.100)
_IDLE_WAIT_S: Final = 0.5


def check_turnaround(seconds: float) -> float:
    lo, hi = TURNAROUND_RANGE_S
    if not lo <= seconds <= hi:
        raise ValueError(f"turnaround must be {lo * 1000:g}–{hi * 1000:g} ms, got {seconds * 1000:g} ms")
    return float(seconds)


@dataclass(frozen=True)
class WireSpec:
    """The RS-485 line in front of a :class:`SimulatedBus`.

    ``turnaround_s`` is every slave's default pause between the end of a request (after the silence that
    ends it) and the start of its answer; :meth:`SimulatedBus.set_turnaround` sets one slave's own.
    ``noise`` is the fraction of answer frames that get one corrupted byte; ``seed`` makes the noise
    repeatable. Requests are left whole: a real device drops a garbled request at the silence that ends
    it, but pymodbus's server keeps such bytes and would spoil the next request with them.
    """

    baud: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8
    turnaround_s: float = DEFAULT_TURNAROUND_S
    noise: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_turnaround(self.turnaround_s)
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise is a fraction of frames, 0–1, got {self.noise}")
        self.line  # noqa: B018 -- validates the format

    @property
    def line(self) -> LineFormat:
        """Baud rate and character format."""
        return LineFormat(baud=self.baud, bytesize=self.bytesize, parity=self.parity, stopbits=self.stopbits)


@dataclass
class WireFrame:
    """One frame as it occupies the line: who sent it, to or from which slave, and when (monotonic)."""

    sender: Literal["gateway", "device"]
    slave: int
    start: float
    end: float


class _Request:
    """A request frame on its way to the device: delivered whole once its last character has arrived."""

    __slots__ = ("data", "frame", "slave")

    def __init__(self, data: bytearray, frame: WireFrame) -> None:
        self.data = data
        self.frame = frame
        self.slave = data[0]

    @property
    def end(self) -> float:
        return self.frame.end


class WireLine:
    """The wire between the cable's device end and the device's own pty, in wire time.

    One thread relays both ways. A request from the gateway starts on the line once the line has been
    quiet for the inter-frame silence, occupies it for its characters' time, and is handed to the device
    when its last character has arrived. The device's answer starts no sooner than the silence plus the
    addressed slave's turnaround after that, and its bytes reach the gateway one character time apart —
    each when its last bit has arrived, as a UART would hand them over. Request and answer share one
    line (half duplex). Bytes that follow a frame still on the line continue it without a gap.
    """

    def __init__(
        self,
        outer_fd: int,
        inner_fd: int,
        spec: WireSpec,
        *,
        turnaround: Callable[[int], float],
        name: str = "wire",
    ) -> None:
        self._outer = outer_fd
        self._inner = inner_fd
        self._spec = spec
        line = spec.line
        self._char_s = line.char_s
        self._silence_s = line.silence_s
        self._turnaround = turnaround
        self._rng = random.Random(spec.seed)
        self._name = name
        self._line_end = -math.inf  # when the last frame on the line ends
        self._answer_from = -math.inf  # earliest start of the answer to the last request
        self._to_device: deque[_Request] = deque()
        self._to_gateway: deque[tuple[float, int]] = deque()  # (due, byte)
        self._answer: WireFrame | None = None
        #: The last frames on the line, as scheduled (for tests of the line's own timing).
        self.frames: deque[WireFrame] = deque(maxlen=256)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        #: Answer frames that got a corrupted byte.
        self.corrupted = 0

    def start(self) -> None:
        """Start relaying."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop relaying (bytes still on the line are dropped) and close the wake pipe. The fds stay open."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        if self._thread is not None:
            self._thread.join(_COMMAND_TIMEOUT_S)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        fds = [self._outer, self._inner, self._wake_r]
        while not self._stopping:
            now = time.monotonic()
            due = min(
                self._to_device[0].end if self._to_device else math.inf,
                self._to_gateway[0][0] if self._to_gateway else math.inf,
            )
            wait = _IDLE_WAIT_S if due == math.inf else max(0.0, due - now)
            readable = select.select(fds, [], [], wait)[0] if wait > 0 else []
            now = time.monotonic()
            if self._outer in readable:
                self._from_gateway(now)
            if self._inner in readable:
                self._from_device(now)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, _CHUNK)
            self._deliver(time.monotonic())

    def _read(self, fd: int) -> bytes:
        try:
            return os.read(fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:  # the cable's end closed under us: nothing more comes
            if exc.errno != errno.EIO:
                _log.warning("wire read failed: %s", exc)
            time.sleep(0.01)
            return b""

    def _noisy(self, chunk: bytearray) -> None:
        """Corrupt one byte of a new answer, for the configured fraction of answers."""
        if self._spec.noise and self._rng.random() < self._spec.noise:
            chunk[self._rng.randrange(len(chunk))] ^= self._rng.randrange(1, 256)
            self.corrupted += 1

    def _from_gateway(self, now: float) -> None:
        chunk = bytearray(self._read(self._outer))
        if not chunk:
            return
        if self._to_device:  # the request is still on the line: these bytes follow it
            request = self._to_device[-1]
            request.data += chunk
            request.frame.end += len(chunk) * self._char_s
        else:
            start = max(now, self._line_end + self._silence_s)
            request = _Request(chunk, WireFrame("gateway", chunk[0], start, start + len(chunk) * self._char_s))
            self._to_device.append(request)
            self.frames.append(request.frame)
        self._line_end = max(self._line_end, request.end)

    def _from_device(self, now: float) -> None:
        chunk = bytearray(self._read(self._inner))
        if not chunk:
            return
        if self._to_gateway and self._answer is not None:  # the answer is still on the line: these follow it
            at = self._to_gateway[-1][0]
        else:
            at = max(now, self._answer_from, self._line_end + self._silence_s)
            self._answer = WireFrame("device", chunk[0], at, at)
            self.frames.append(self._answer)
            self._noisy(chunk)
        for byte in chunk:
            at += self._char_s
            self._to_gateway.append((at, byte))
        self._answer.end = at
        self._line_end = max(self._line_end, at)

    def _deliver(self, now: float) -> None:
        while self._to_device and self._to_device[0].end <= now:
            request = self._to_device.popleft()
            self._answer_from = request.end + self._silence_s + self._turnaround(request.slave)
            self._write(self._inner, bytes(request.data))
        if self._to_gateway and self._to_gateway[0][0] <= now:
            out = bytearray()
            while self._to_gateway and self._to_gateway[0][0] <= now:
                out.append(self._to_gateway.popleft()[1])
            self._write(self._outer, bytes(out))

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # nobody reads that end and its buffer is full: the bytes are lost
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    _log.warning("wire write failed: %s", exc)
                return
