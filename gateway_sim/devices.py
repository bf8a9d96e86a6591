"""Simulated twins of the RS-485 field bus: a null-modem cable, a Modbus RTU bus and its devices.

The device side is pymodbus's own RTU server; this module only models cabling and register contents.

* :class:`VirtualNullModem` joins two pseudo-terminals like ``socat pty,raw,echo=0 pty,raw,echo=0`` and can
  cut the cable or unplug the gateway's USB adapter.
* :class:`SimulatedBus` runs a ``ModbusSerialServer`` serving several slaves on the device end. Given a
  :class:`WireSpec` it puts a line with wire time between the cable and the server (:class:`WireLine`):
  bytes take their time at the baud rate, frames are separated by the protocol's silence, the line is
  half duplex and each slave has its own turnaround.
* :class:`SimulatedGasDetector` (profiles A and B of the domain notes), :class:`SimulatedIOStation`
  (extinguisher cabinet I/O module) and :class:`SimulatedController` (a multi-channel gas controller) are the
  slaves; tests change their state while the bus runs. Like real devices, each refuses a read that touches a
  register outside its map (exception 02, by pymodbus's server); :meth:`SimulatedBus.flaky` makes a slave
  fail a share of its polls at random.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import math
import os
import queue
import random
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat

__all__ = [
    "CONTROLLER_STATUS_CODES",
    "GAS_CODES",
    "PROFILE_A_STATUS_CODES",
    "PROFILE_B_ALARM_BITS",
    "UNIT_CODES",
    "SimulatedBus",
    "SimulatedController",
    "SimulatedGasDetector",
    "SimulatedIOStation",
    "VirtualNullModem",
    "WireFrame",
    "WireLine",
    "WireSpec",
]

_log = logging.getLogger(__name__)

_CHUNK: Final = 4096
_POLL_MS: Final = 500
_COMMAND_TIMEOUT_S: Final = 10.0


# --------------------------------------------------------------------------------------------------
# Null-modem cable
# --------------------------------------------------------------------------------------------------


@dataclass
class _PtyEnd:
    """One pseudo-terminal: the master the bridge uses and a slave fd kept open so reads never hit EIO."""

    master: int
    keeper: int
    slave_path: str

    @classmethod
    def open(cls) -> _PtyEnd:
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
        self._gw: _PtyEnd | None = None
        self._dev: _PtyEnd | None = None
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
            self._dev = _PtyEnd.open()
            self._gw = _PtyEnd.open()
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
            self._gw = _PtyEnd.open()
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


# --------------------------------------------------------------------------------------------------
# A line with wire time
# --------------------------------------------------------------------------------------------------

#: Shortest and longest turnaround a simulated slave may have (seconds).
TURNAROUND_RANGE_S: Final = (0.001, 0.100)
_IDLE_WAIT_S: Final = 0.5


def _check_turnaround(seconds: float) -> float:
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
        _check_turnaround(self.turnaround_s)
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


def _tight_timer_slack() -> None:
    """Let this thread's timed waits end within a microsecond instead of Linux's default 50 µs: characters
    at 38400 baud are 286 µs apart. Best effort (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_timerslack = 29
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, 1000, 0, 0, 0)


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
        _tight_timer_slack()
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


# --------------------------------------------------------------------------------------------------
# Simulated slaves
# --------------------------------------------------------------------------------------------------

#: Profile A unit codes (register 0, bits 15–12).
UNIT_CODES: Final[dict[str, int]] = {"ppm": 0x0, "%LEL": 0x2, "%VOL": 0x4}
#: Profile A gas type codes (register 8, high byte).
GAS_CODES: Final[dict[str, int]] = {"CH4": 0x11, "CO": 0x05}
#: Profile A status codes (register 5, low byte).
PROFILE_A_STATUS_CODES: Final[dict[str, int]] = {
    "warmup": 0x00,
    "normal": 0x01,
    "data_error": 0x02,
    "sensor_fault": 0x03,
    "pre_alarm": 0x04,
    "low_alarm": 0x05,
    "high_alarm": 0x06,
    "over_range": 0x08,
    "needs_calibration": 0x09,
    "comms_fault": 0x0F,
}
#: Profile B alarm word bits (register 0x6000) by status name.
PROFILE_B_ALARM_BITS: Final[dict[str, int]] = {
    "normal": 0,
    "low_alarm": 1 << 0,
    "high_alarm": 1 << 1,
    "stel": 1 << 2,
    "twa": 1 << 3,
    "over_range": 1 << 4,
    "sensor_fault": 1 << 5,
    "sensor_lost": 1 << 5,
}
_PROFILE_B_BASE: Final = 0x6000
_PROFILE_B_COUNT: Final = 7  # 0x6000..0x6006
_PROFILE_A_COUNT: Final = 10
_WARMUP_DONE: Final = 0x8000

Profile = Literal["A", "B"]


def _raw(value: float, decimals: int) -> int:
    """Scale ``value`` to a 16-bit register (two's complement when negative)."""
    raw = round(value * float(10**decimals))
    if not -0x8000 <= raw <= 0xFFFF:
        raise ValueError(f"{value} does not fit a register with {decimals} decimals")
    return raw & 0xFFFF


def _check_register(value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} out of range 0..65535")
    return value


class SimulatedGasDetector:
    """An RS-485 gas detector (profile A or B); its registers are encoded when each request is served.

    Profile A (holding registers 0–9): reg0 unit/decimals code, reg1 concentration, reg2/reg3 own
    low/high set-points, reg4 full scale (all raw with the same decimals), reg5 status code, reg8 gas type.
    Profile B (holding registers 0x6000–0x6006): alarm word, concentration, run status at 0x6006.
    Function codes 3 and 4 read the same registers; writes are refused (illegal address).
    """

    def __init__(
        self,
        slave: int,
        profile: Profile = "A",
        *,
        unit: str = "%LEL",
        decimals: int = 1,
        full_scale: float = 100.0,
        low_setpoint: float = 10.0,
        high_setpoint: float = 25.0,
        gas: str = "CH4",
    ) -> None:
        if profile not in ("A", "B"):
            raise ValueError(f"unknown profile {profile!r}")
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        if gas not in GAS_CODES:
            raise ValueError(f"unknown gas {gas!r}; expected one of {sorted(GAS_CODES)}")
        if not 0 <= decimals <= 3:
            raise ValueError("decimals must be 0..3")
        self.slave = _check_slave(slave)
        self.profile: Profile = profile
        self.unit = unit
        self.decimals = decimals
        self.gas = gas
        self._lock = threading.Lock()
        self._full_scale = _raw(full_scale, decimals)
        self._low = _raw(low_setpoint, decimals)
        self._high = _raw(high_setpoint, decimals)
        self._concentration = 0
        self._status_code = PROFILE_A_STATUS_CODES["normal"]
        self._alarm_bits = 0
        self._run_status = 0
        self._warmup_end = 0.0

    @property
    def base_address(self) -> int:
        """First holding register of the map (0 for A, 0x6000 for B)."""
        return 0 if self.profile == "A" else _PROFILE_B_BASE

    @property
    def register_count(self) -> int:
        """Number of registers in the map."""
        return _PROFILE_A_COUNT if self.profile == "A" else _PROFILE_B_COUNT

    def set_concentration(self, value: float) -> None:
        """Set the measured concentration in the detector's unit."""
        raw = _raw(value, self.decimals)
        with self._lock:
            self._concentration = raw

    def set_unit(self, unit: str) -> None:
        """Change the unit the detector reports (profile A register 0), as a replaced sensor head would."""
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        with self._lock:
            self.unit = unit

    def set_status(self, name: str) -> None:
        """Set the status by name (profile A status code or profile B alarm bit)."""
        if self.profile == "A":
            if name not in PROFILE_A_STATUS_CODES:
                raise ValueError(f"unknown profile A status {name!r}")
            self.set_status_code(PROFILE_A_STATUS_CODES[name])
            return
        if name not in PROFILE_B_ALARM_BITS:
            hint = "; use set_warmup()" if name == "warmup" else ""
            raise ValueError(f"unknown profile B status {name!r}{hint}")
        self.set_alarm_bits(PROFILE_B_ALARM_BITS[name])

    def set_status_code(self, code: int) -> None:
        """Profile A: put a raw status code (0..255) into the low byte of register 5."""
        if self.profile != "A":
            raise ValueError("status codes exist only in profile A")
        if not 0 <= code <= 0xFF:
            raise ValueError("status code must be 0..255")
        with self._lock:
            self._status_code = code

    def set_alarm_bits(self, bits: int) -> None:
        """Profile B: set alarm word bits 0–5 (shown once warm-up has finished)."""
        if self.profile != "B":
            raise ValueError("alarm bits exist only in profile B")
        if not 0 <= bits <= 0x7FFF:
            raise ValueError("alarm bits must fit bits 14..0")
        with self._lock:
            self._alarm_bits = bits

    def set_run_status(self, value: int) -> None:
        """Profile B: raw run status register 0x6006."""
        if self.profile != "B":
            raise ValueError("run status exists only in profile B")
        with self._lock:
            self._run_status = _check_register(value)

    def set_warmup(self, remaining_s: float) -> None:
        """Start a warm-up that ends ``remaining_s`` seconds from now (0 ends it).

        Profile A reports status 0x00 meanwhile; profile B reports the remaining time in 0.1 s.
        """
        if remaining_s < 0:
            raise ValueError("remaining_s must be >= 0")
        with self._lock:
            self._warmup_end = time.monotonic() + remaining_s if remaining_s else 0.0

    def registers(self) -> list[int]:
        """The registers as they would be served now, starting at :attr:`base_address`."""
        now = time.monotonic()
        with self._lock:
            remaining = max(0.0, self._warmup_end - now)
            warming = remaining > 0
            if self.profile == "A":
                regs = [0] * _PROFILE_A_COUNT
                regs[0] = (UNIT_CODES[self.unit] << 12) | ((self.decimals * 4) << 8)
                regs[1] = self._concentration
                regs[2] = self._low
                regs[3] = self._high
                regs[4] = self._full_scale
                regs[5] = PROFILE_A_STATUS_CODES["warmup"] if warming else self._status_code
                regs[8] = GAS_CODES[self.gas] << 8
                return regs
            regs = [0] * _PROFILE_B_COUNT
            if warming:
                regs[0] = min(max(1, round(remaining * 10)), 0x7FFF)
            else:
                regs[0] = _WARMUP_DONE | self._alarm_bits
            regs[1] = self._concentration
            regs[6] = self._run_status
            return regs

    async def _action(
        self,
        function_code: int,
        _start_address: int,
        _address: int,
        _count: int,
        current_registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code not in (3, 4):
            return ExcCodes.ILLEGAL_FUNCTION
        regs = self.registers()
        current_registers[: len(regs)] = regs
        return None

    def _sim_device(self) -> SimDevice:
        block = SimData(
            self.base_address, values=self.registers(), datatype=DataType.REGISTERS, readonly=True
        )
        return SimDevice(id=self.slave, simdata=[block], action=self._action)


#: Channel status codes of a :class:`SimulatedController` (the register after the level).
CONTROLLER_STATUS_CODES: Final[dict[str, int]] = {"normal": 0, "low_alarm": 1, "high_alarm": 2, "sensor_fault": 3}


class SimulatedController:
    """A multi-channel gas controller at one address: per channel a unit code, the level and a status code
    in three registers, channel n's ``(n - 1) * stride`` above channel 1's (by default 2998/2999/3000, then
    3008–3010, ...). Like most real devices it implements only those registers: a read that touches any
    other one is refused with exception 02 (illegal data address), unless ``refuse_unmapped`` is False, when
    every register of the span between reads as 0 (the lenient kind some tests need).
    """

    def __init__(self, slave: int, *, channels: int = 4, start: int = 2998, stride: int = 10, decimals: int = 1,
                 unit: str = "%LEL", refuse_unmapped: bool = True) -> None:
        if not 1 <= channels <= 64:
            raise ValueError("channels must be 1..64")
        if stride < 3 and channels > 1:
            raise ValueError("stride must leave room for a channel's three registers")
        if unit not in UNIT_CODES:
            raise ValueError(f"unknown unit {unit!r}; expected one of {sorted(UNIT_CODES)}")
        self.slave = _check_slave(slave)
        self.channels = channels
        self.start = start
        self.stride = stride
        self.decimals = decimals
        self.refuse_unmapped = refuse_unmapped
        self._lock = threading.Lock()
        self._regs = {n: [UNIT_CODES[unit], 0, CONTROLLER_STATUS_CODES["normal"]] for n in range(1, channels + 1)}

    def channel_start(self, channel: int) -> int:
        """The first register (unit code) of ``channel`` (1-based)."""
        return self.start + (channel - 1) * self.stride

    def set_level(self, channel: int, value: float) -> None:
        """Set one channel's measured level."""
        with self._lock:
            self._regs[channel][1] = _raw(value, self.decimals)

    def set_status(self, channel: int, name: str) -> None:
        """Set one channel's status by name (:data:`CONTROLLER_STATUS_CODES`)."""
        with self._lock:
            self._regs[channel][2] = CONTROLLER_STATUS_CODES[name]

    def registers(self) -> dict[int, int]:
        """Every implemented register by its address."""
        with self._lock:
            return {self.channel_start(n) + i: v for n, regs in self._regs.items() for i, v in enumerate(regs)}

    async def _action(
        self,
        function_code: int,
        start_address: int,
        _address: int,
        _count: int,
        current_registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code not in (3, 4):
            return ExcCodes.ILLEGAL_FUNCTION
        for register, value in self.registers().items():
            current_registers[register - start_address] = value
        return None

    def _sim_device(self) -> SimDevice:
        if not self.refuse_unmapped:
            span = self.channel_start(self.channels) + 3 - self.start
            blocks = [SimData(self.start, count=span, values=0, datatype=DataType.REGISTERS)]
        else:  # pymodbus refuses a read touching an address no block defines (exception 02)
            blocks = [SimData(self.channel_start(n), count=3, values=0, datatype=DataType.REGISTERS)
                      for n in range(1, self.channels + 1)]
        return SimDevice(id=self.slave, simdata=blocks, action=self._action)


_TABLE_BY_FC: Final[dict[int, str]] = {
    1: "coils",
    5: "coils",
    15: "coils",
    2: "discrete_inputs",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}


class SimulatedIOStation:
    """RS-485 I/O module of an extinguisher cabinet: four separate tables of 16 entries each.

    Coils and holding registers written by the master are visible through :meth:`coils` and
    :meth:`holding_registers`.
    """

    SIZE: Final = 16

    def __init__(self, slave: int) -> None:
        self.slave = _check_slave(slave)
        self._lock = threading.Lock()
        self._coils = [False] * self.SIZE
        self._discrete = [False] * self.SIZE
        self._holding = [0] * self.SIZE
        self._input = [0] * self.SIZE

    def _index(self, address: int) -> int:
        if not 0 <= address < self.SIZE:
            raise ValueError(f"address {address} out of range 0..{self.SIZE - 1}")
        return address

    def set_discrete_input(self, address: int, value: bool) -> None:
        """Set discrete input ``address`` (function code 2)."""
        with self._lock:
            self._discrete[self._index(address)] = bool(value)

    def set_coil(self, address: int, value: bool) -> None:
        """Set coil ``address`` (function codes 1, 5, 15)."""
        with self._lock:
            self._coils[self._index(address)] = bool(value)

    def set_input_register(self, address: int, value: int) -> None:
        """Set input register ``address`` (function code 4)."""
        with self._lock:
            self._input[self._index(address)] = _check_register(value)

    def set_holding_register(self, address: int, value: int) -> None:
        """Set holding register ``address`` (function codes 3, 6, 16)."""
        with self._lock:
            self._holding[self._index(address)] = _check_register(value)

    def coils(self) -> list[bool]:
        """Current coils."""
        with self._lock:
            return list(self._coils)

    def discrete_inputs(self) -> list[bool]:
        """Current discrete inputs."""
        with self._lock:
            return list(self._discrete)

    def holding_registers(self) -> list[int]:
        """Current holding registers."""
        with self._lock:
            return list(self._holding)

    def input_registers(self) -> list[int]:
        """Current input registers."""
        with self._lock:
            return list(self._input)

    async def _action(
        self,
        function_code: int,
        _start_address: int,
        address: int,
        _count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        table = _TABLE_BY_FC.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        with self._lock:
            if set_values is not None:
                if table == "coils":
                    for i, bit in enumerate(set_values):
                        self._coils[address + i] = bool(bit)
                elif table == "holding":
                    for i, reg in enumerate(set_values):
                        self._holding[address + i] = int(reg)
            if table in ("coils", "discrete_inputs"):
                bits = self._coils if table == "coils" else self._discrete
                current_registers[0] = sum(1 << i for i, bit in enumerate(bits) if bit)
            else:
                regs = self._holding if table == "holding" else self._input
                current_registers[: self.SIZE] = regs
        return None

    def _sim_device(self) -> SimDevice:
        def bits() -> list[SimData]:
            return [SimData(0, values=[False] * self.SIZE, datatype=DataType.BITS)]

        def regs() -> list[SimData]:
            return [SimData(0, count=self.SIZE, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=self.slave, simdata=(bits(), bits(), regs(), regs()), action=self._action)


def _check_slave(slave: int) -> int:
    if not 1 <= slave <= 247:
        raise ValueError(f"slave address {slave} out of range 1..247")
    return slave


SimulatedSlave = SimulatedGasDetector | SimulatedIOStation | SimulatedController


# --------------------------------------------------------------------------------------------------
# Bus
# --------------------------------------------------------------------------------------------------


class SimulatedBus:
    """A pymodbus RTU server serving several slaves on one serial port, in its own thread and loop.

    Addresses with no slave (and slaves switched off with :meth:`responding`) stay silent, as on a
    real bus, so the master times out.

    Without ``wire`` bytes move at memory speed, as on any pseudo-terminal. With a :class:`WireSpec`
    the server listens on a pty of its own and a :class:`WireLine` relays between ``port`` and it in wire
    time; the line format then comes from the spec.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        on_response: Callable[[int, bytes, float], None] | None = None,
        on_request: Callable[[int, bytes, float], None] | None = None,
        wire: WireSpec | None = None,
    ) -> None:
        self.port = port
        self.wire = wire
        if wire is not None:
            baudrate, parity, stopbits, bytesize = wire.baud, wire.parity, wire.stopbits, wire.bytesize
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        #: Called in the server thread with (slave, frame, ``time.perf_counter()``) as each response
        #: frame is handed to the serial port.
        self.on_response = on_response
        #: Called in the server thread with (slave, frame, ``time.perf_counter()``) as each request frame
        #: reaches the server (with a wire: once its last character has arrived).
        self.on_request = on_request
        self._lock = threading.Lock()
        self._slaves: dict[int, SimulatedSlave] = {}
        self._answering: set[int] = set()
        self._turnarounds: dict[int, float] = {}
        self._flaky: dict[int, tuple[float, random.Random]] = {}
        self._dropped: dict[int, int] = {}
        self._wire_line: WireLine | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def slaves(self) -> dict[int, SimulatedSlave]:
        """The slaves on the bus by address."""
        return dict(self._slaves)

    def add_gas_detector(
        self,
        slave: int,
        profile: Profile = "A",
        *,
        unit: str = "%LEL",
        decimals: int = 1,
        full_scale: float = 100.0,
        low_setpoint: float = 10.0,
        high_setpoint: float = 25.0,
        gas: str = "CH4",
    ) -> SimulatedGasDetector:
        """Add a gas detector (before :meth:`start`)."""
        detector = SimulatedGasDetector(
            slave,
            profile,
            unit=unit,
            decimals=decimals,
            full_scale=full_scale,
            low_setpoint=low_setpoint,
            high_setpoint=high_setpoint,
            gas=gas,
        )
        self._add(detector)
        return detector

    def add_io_station(self, slave: int) -> SimulatedIOStation:
        """Add an extinguisher-cabinet I/O module (before :meth:`start`)."""
        station = SimulatedIOStation(slave)
        self._add(station)
        return station

    def add_controller(self, slave: int, **options: Any) -> SimulatedController:
        """Add a multi-channel controller (before :meth:`start`); options as for :class:`SimulatedController`."""
        controller = SimulatedController(slave, **options)
        self._add(controller)
        return controller

    def flaky(self, slave: int, fraction: float, *, seed: int | None = None) -> None:
        """Let ``slave`` leave ``fraction`` of its answers unsent, at random (``seed`` makes it repeatable):
        a device that fails that share of its polls. 0 makes it reliable again."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be 0–1, got {fraction}")
        with self._lock:
            if fraction:
                self._flaky[slave] = (fraction, random.Random(seed))
            else:
                self._flaky.pop(slave, None)

    def dropped(self, slave: int) -> int:
        """Answers of ``slave`` left unsent by :meth:`flaky` so far."""
        with self._lock:
            return self._dropped.get(slave, 0)

    def set_turnaround(self, slave: int, seconds: float) -> None:
        """Give ``slave`` its own turnaround (1–100 ms) on a bus with a wire; any time, also while running."""
        _check_turnaround(seconds)
        with self._lock:
            self._turnarounds[slave] = float(seconds)

    def turnaround(self, slave: int) -> float:
        """The turnaround of ``slave`` (its own, else the wire's default; 0 without a wire)."""
        if self.wire is None:
            return 0.0
        with self._lock:
            return self._turnarounds.get(slave, self.wire.turnaround_s)

    def wire_frames(self) -> list[WireFrame]:
        """The last frames on the wire as it scheduled them (empty without a wire)."""
        return list(self._wire_line.frames) if self._wire_line is not None else []

    @property
    def corrupted_frames(self) -> int:
        """Frames the wire's noise has corrupted so far (0 without a wire)."""
        return self._wire_line.corrupted if self._wire_line is not None else 0

    def _add(self, sim: SimulatedSlave) -> None:
        if self._thread is not None:
            raise RuntimeError("slaves must be added before the bus starts")
        if sim.slave in self._slaves:
            raise ValueError(f"slave {sim.slave} already on the bus")
        with self._lock:
            self._slaves[sim.slave] = sim
            self._answering.add(sim.slave)

    def responding(self, slave: int, on: bool = True) -> None:
        """Let ``slave`` answer (True) or go silent like an offline device (False)."""
        if slave not in self._slaves:
            raise ValueError(f"no slave {slave} on the bus")
        with self._lock:
            if on:
                self._answering.add(slave)
            else:
                self._answering.discard(slave)

    def start(self, timeout: float = 10.0) -> None:
        """Start the server thread; returns once the serial port is open."""
        if self._thread is not None:
            raise RuntimeError("bus already started")
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._thread_main, name=f"modbus-sim {self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"simulated bus on {self.port} did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(f"simulated bus could not open {self.port}") from self._start_error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and close the port. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"simulated bus on {self.port} did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                _log.exception("simulated bus crashed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        devices = [sim._sim_device() for sim in self._slaves.values()]
        # Address 0 catches every other address; its (illegal address) answers are never sent.
        devices.append(SimDevice(id=0, simdata=[SimData(0, datatype=DataType.INVALID)]))
        with contextlib.ExitStack() as wire:
            port = self.port if self.wire is None else self._open_wire(wire, self.wire)
            await self._serve_on(devices, port, self._stop_event)

    def _open_wire(self, stack: contextlib.ExitStack, spec: WireSpec) -> str:
        """Put a :class:`WireLine` between :attr:`port` and a new pty; return the pty the server opens."""
        outer = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        stack.callback(os.close, outer)
        with contextlib.suppress(OSError):  # a pty or serial port; anything else is used as it is
            tty.setraw(outer)
        inner = _PtyEnd.open()
        stack.callback(inner.close)
        line = WireLine(outer, inner.master, spec, turnaround=self.turnaround, name=f"wire {self.port}")
        line.start()
        stack.callback(line.stop)
        self._wire_line = line
        return inner.slave_path

    async def _serve_on(self, devices: list[SimDevice], port: str, stop: asyncio.Event) -> None:
        server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
            trace_packet=self._trace_packet,
        )
        await server.serve_forever(background=True)
        self._started.set()
        try:
            await stop.wait()
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not data:
            return data
        if not sending:
            request_hook = self.on_request
            if request_hook is not None:
                try:
                    request_hook(data[0], data, time.perf_counter())
                except Exception:
                    _log.exception("on_request hook failed")
            return data
        slave = data[0]
        with self._lock:
            answering = slave in self._answering
            flaky = self._flaky.get(slave)
            if answering and flaky is not None and flaky[1].random() < flaky[0]:
                answering = False
                self._dropped[slave] = self._dropped.get(slave, 0) + 1
        if not answering:
            return b""
        hook = self.on_response
        if hook is not None:
            try:
                hook(slave, data, time.perf_counter())
            except Exception:
                _log.exception("on_response hook failed")
        return data
