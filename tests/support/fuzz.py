"""A raw fake device on the device end of a virtual null modem that answers the gateway with bad frames.

:class:`FuzzingDevice` reads the gateway's requests with pymodbus's own RTU framer and, for the fuzzed
addresses, answers every request with exactly one bad answer of a random category:

``random``          random bytes that pymodbus's framer cannot decode as an answer
``truncated``       a valid answer cut short
``wrong_crc``       a valid answer with 1–3 bits flipped (checked not to decode)
``wrong_address``   a valid answer from another address
``wrong_function``  a valid frame answering another function code
``late``            a valid answer sent after the gateway gave up: held back until its next request
``over_long``       more registers than asked, junk before or after a valid frame, or a 300–600 byte blob

Two more categories are only drawn when asked for (:data:`EXCEPTIONS`): a Modbus gateway's exception
answers ``path_unavailable`` (0x0A) and ``target_no_answer`` (0x0B), built with pymodbus's ExceptionResponse.

Valid frames are built with pymodbus's framer and PDU classes (no hand-written CRC). Requests for the
``relayed`` addresses are forwarded to another port (a :class:`~gateway_sim.bus.SimulatedBus` on a second
null modem) and its answers copied back, so a healthy device shares the bus with the fuzzed ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

import serial
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

__all__ = ["CATEGORIES", "EXCEPTIONS", "FuzzingDevice", "bad_answer"]

CATEGORIES: tuple[str, ...] = (
    "random", "truncated", "wrong_crc", "wrong_address", "wrong_function", "late", "over_long",
)
#: Exception answers a Modbus gateway gives for a device behind it: category → exception code.
EXCEPTIONS: dict[str, int] = {"path_unavailable": 0x0A, "target_no_answer": 0x0B}

_CLIENT_FRAMER = FramerRTU(DecodePDU(is_server=False))


def _response_class(function: int) -> type[ModbusPDU]:
    return ReadInputRegistersResponse if function == 4 else ReadHoldingRegistersResponse


def valid_answer(rng: random.Random, request: ModbusPDU, *, dev_id: int | None = None,
                 function: int | None = None, count: int | None = None) -> bytes:
    """A well-formed answer to ``request`` (or, with the overrides, to a request it was not)."""
    registers = [rng.randrange(0x10000) for _ in range(count if count is not None else request.count)]
    pdu = _response_class(function or request.function_code)(registers=registers,
                                                              dev_id=request.dev_id if dev_id is None else dev_id)
    return bytes(_CLIENT_FRAMER.buildFrame(pdu))


def decodes(data: bytes, request: ModbusPDU) -> bool:
    """Whether pymodbus's client framer finds an answer from the request's address in ``data``."""
    framer = FramerRTU(DecodePDU(is_server=False))
    try:
        _used, pdu = framer.handleFrame(data, request.dev_id, 0)
    except Exception:  # pymodbus raises when a frame's CRC fits but its content does not decode
        return False
    return pdu is not None


def bad_answer(rng: random.Random, category: str, request: ModbusPDU) -> bytes:
    """One bad answer of ``category`` to ``request`` (for ``late``: the valid answer to hold back)."""
    if category == "random":
        while True:
            data = rng.randbytes(rng.randint(1, 64))
            if not decodes(data, request):
                return data
    if category == "truncated":
        frame = valid_answer(rng, request)
        return frame[: rng.randint(1, len(frame) - 1)]
    if category == "wrong_crc":
        while True:
            flipped = bytearray(valid_answer(rng, request))
            for _ in range(rng.randint(1, 3)):
                bit = rng.randrange(len(flipped) * 8)
                flipped[bit // 8] ^= 1 << (bit % 8)
            if not decodes(bytes(flipped), request):
                return bytes(flipped)
    if category == "wrong_address":
        other = rng.choice([a for a in range(1, 248) if a != request.dev_id])
        return valid_answer(rng, request, dev_id=other)
    if category == "wrong_function":
        return valid_answer(rng, request, function=4 if request.function_code == 3 else 3)
    if category == "late":
        return valid_answer(rng, request)
    if category in EXCEPTIONS:
        answer = ExceptionResponse(request.function_code, EXCEPTIONS[category], device_id=request.dev_id)
        return bytes(_CLIENT_FRAMER.buildFrame(answer))
    if category == "over_long":
        flavour = rng.randrange(4)
        if flavour == 0:  # a valid frame carrying more registers than asked
            return valid_answer(rng, request, count=min(125, request.count + rng.randint(1, 60)))
        if flavour == 1:  # trailing junk
            return valid_answer(rng, request) + rng.randbytes(rng.randint(1, 40))
        if flavour == 2:  # leading junk
            return rng.randbytes(rng.randint(1, 40)) + valid_answer(rng, request)
        return rng.randbytes(rng.randint(300, 600))  # longer than any RTU frame
    raise ValueError(f"unknown category {category!r}")


def _next_request(framer: FramerRTU, buffer: bytes) -> tuple[int, ModbusPDU | None]:
    """(bytes used, request or None) for the first request in ``buffer``; (0, None) to wait for more.

    One frame at a time: pymodbus's framer swallows the whole buffer with the first frame, and when this
    thread falls behind, two requests can sit in it.
    """
    if len(buffer) < FramerRTU.MIN_SIZE:
        return 0, None
    pdu_class = framer.decoder.lookupPduClass(buffer)
    if pdu_class is None:
        return 1, None  # not a request we know: skip a byte
    size = pdu_class.calculateRtuFrameSize(buffer)
    if not size or len(buffer) < size:
        return 0, None
    _used, request = framer.handleFrame(buffer[:size], 0, 0)
    return size, request


class FuzzingDevice:
    """Answers requests for ``fuzzed`` addresses with bad frames; relays ``relayed`` ones; ignores the rest.

    A late answer is held back until the gateway's next request and so lands in the next transaction
    (or is dropped, the gateway seeing silence, when this thread has fallen behind the gateway).
    ``late_allowed`` names the fuzzed addresses that may answer late: those whose successor in the poll
    order is another fuzzed address, so a late answer never spoils the healthy device's transaction.
    By default every fuzzed address may; one that may not, with ``late`` as its only category, gets
    ``random`` answers. ``plan`` gives some fuzzed addresses categories of their own (instead of
    ``categories``), so a test knows what each one sent.
    """

    def __init__(
        self,
        port: str,
        *,
        fuzzed: Iterable[int],
        relay_port: str | None = None,
        relayed: Iterable[int] = (),
        seed: int = 0,
        categories: Sequence[str] = CATEGORIES,
        late_allowed: Iterable[int] | None = None,
        relay_timeout: float = 1.0,
        plan: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        self.port = port
        self.fuzzed = frozenset(fuzzed)
        self.relayed = frozenset(relayed)
        self.relay_port = relay_port
        self.categories = tuple(categories)
        self.plan = {address: tuple(cats) for address, cats in (plan or {}).items()}
        self.late_allowed = self.fuzzed if late_allowed is None else frozenset(late_allowed)
        self.relay_timeout = relay_timeout
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sent: Counter[str] = Counter()
        self._answered: Counter[int] = Counter()
        self._by_address: Counter[tuple[int, str]] = Counter()
        self._requested: Counter[int] = Counter()
        self.relayed_answers = 0
        self.relay_misses = 0
        self.late_dropped = 0
        self.requests = 0
        self.errors: list[BaseException] = []
        self._late: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------------------ counters

    @property
    def sent(self) -> Counter[str]:
        """Bad answers by category (a held-back late answer counts when it is decided)."""
        with self._lock:
            return Counter(self._sent)

    @property
    def total(self) -> int:
        """Bad answers in all."""
        with self._lock:
            return sum(self._sent.values())

    def answered(self, address: int) -> int:
        """Bad answers given for ``address``."""
        with self._lock:
            return self._answered[address]

    def sent_to(self, address: int) -> Counter[str]:
        """Bad answers given for ``address``, by category."""
        with self._lock:
            return Counter({cat: n for (a, cat), n in self._by_address.items() if a == address})

    def requested(self, address: int) -> int:
        """Requests seen for ``address`` (answered, relayed or not)."""
        with self._lock:
            return self._requested[address]

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fuzzing-device", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("fuzzing device did not open its port")
        if self.errors:
            raise RuntimeError("fuzzing device failed to start") from self.errors[0]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ thread

    def _run(self) -> None:
        try:
            port = serial.Serial(self.port, baudrate=9600, timeout=0.005)
            relay = serial.Serial(self.relay_port, baudrate=9600, timeout=0.005) if self.relay_port else None
        except Exception as exc:
            self.errors.append(exc)
            self._ready.set()
            return
        self._ready.set()
        framer = FramerRTU(DecodePDU(is_server=True))
        buffer = b""
        try:
            while not self._stop.is_set():
                data = port.read(1)  # returns with the first byte: the answer must not wait for a read timeout
                if not data:
                    continue
                data += port.read(port.in_waiting)
                buffer += data
                while buffer:
                    used, request = _next_request(framer, buffer)
                    buffer = buffer[used:]
                    if request is not None:
                        self._answer(port, relay, request, caught_up=not buffer and not port.in_waiting)
                    elif not used:
                        break
        except Exception as exc:  # surfaced by the test through .errors / .alive
            self.errors.append(exc)
        finally:
            port.close()
            if relay is not None:
                relay.close()

    def _answer(self, port: serial.Serial, relay: serial.Serial | None, request: ModbusPDU, *,
                caught_up: bool) -> None:
        self.requests += 1
        with self._lock:
            self._requested[request.dev_id] += 1
        if self._late is not None:  # the gateway has sent its next request: it gave up on the last one
            if caught_up:  # else a later request of the same address may be waiting: the answer would fit it
                port.write(self._late)
            else:
                self.late_dropped += 1
            self._late = None
        address = request.dev_id
        if address in self.fuzzed:
            own = self.plan.get(address, self.categories)
            choices = [c for c in own if c != "late" or address in self.late_allowed]
            category = self._rng.choice(choices or ["random"])
            frame = bad_answer(self._rng, category, request)
            with self._lock:
                self._sent[category] += 1
                self._answered[address] += 1
                self._by_address[address, category] += 1
            if category == "late":
                self._late = frame
            else:
                port.write(frame)
        elif address in self.relayed and relay is not None:
            self._relay(port, relay, request)

    def _relay(self, port: serial.Serial, relay: serial.Serial, request: ModbusPDU) -> None:
        relay.reset_input_buffer()
        relay.write(_CLIENT_FRAMER.buildFrame(request))
        framer = FramerRTU(DecodePDU(is_server=False))
        received = b""
        deadline = time.monotonic() + self.relay_timeout
        while time.monotonic() < deadline:
            received += relay.read(max(1, relay.in_waiting))  # returns with the first byte, or after 5 ms
            if received:
                try:
                    _used, answer = framer.handleFrame(received, request.dev_id, 0)
                except Exception:
                    answer = None
                if answer is not None:
                    port.write(received)
                    self.relayed_answers += 1
                    return
        self.relay_misses += 1
