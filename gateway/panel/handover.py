"""The panel's side of the link to the storage/uplink process: it holds events until they are stored, and
keeps that process running.

* :class:`Hold` keeps every event the panel made, in order, under a hand-over number, until the storage side
  says it is committed to SQLite. It is bounded: over the bound it drops the oldest events of the lowest
  class present (telemetry first, alarms last) and counts them.
* :class:`Handover` is the one thread that owns the hold and writes to the link. The alarm path only puts
  events on its queue (never waits); acknowledgements, connections and requests arrive on the same queue.
  When a storage process connects it says the last number it committed, and everything after it is sent
  again, so none is lost and none is stored twice.
* :class:`UplinkSupervisor` starts ``python -m gateway.uplink.process`` with one end of a socket pair, reads
  its messages on a thread of its own, and starts it again when it exits, stops beating or breaks the
  protocol. The panel never stops because of it (docs/architecture.md).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import link
from gateway.events import Event, Priority
from gateway.panel.children import FirstChild, ForkedProcess

__all__ = ["Handover", "Hold", "UplinkSupervisor"]

log = structlog.get_logger()

#: Events the panel holds for the storage process at most (about 440 bytes each: a telemetry event's frame,
#: 240, and its entry).
HOLD_LIMIT = 20_000
#: Items the hand-over thread takes from its queue before it writes their frames in one call.
WRITE_BATCH = 256
#: The storage process is restarted when it has not beaten for this long (seconds).
UPLINK_DEADLINE_S = 15.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
#: A storage process that ran this long starts again from the shortest back-off after it ends.
STABLE_S = 60.0
REQUEST_TIMEOUT_S = 10.0
#: A storage process that has not said hello after this long is killed and started again.
START_TIMEOUT_S = 60.0


class Hold:
    """Events not yet committed by the storage side, by hand-over number; bounded, alarms dropped last.

    Each event is kept as the frame that carries it to the storage process, with its class: bytes and
    small numbers, which the garbage collector does not walk. Kept as objects, a full hold of 20 000 events
    made the collections that pause every thread (the alarm path's too) walk them again and again.
    """

    def __init__(self, limit: int = HOLD_LIMIT) -> None:
        self.limit = max(10, limit)
        self._frames: collections.OrderedDict[int, tuple[int, bytes]] = collections.OrderedDict()
        self.dropped: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._drops_lock = threading.Lock()  # counters only: read by the saver and the link reader

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, n: int, priority: Priority, frame: bytes) -> None:
        """Keep the frame of event number ``n`` (numbers rise); over the bound, shed the lowest class."""
        self._frames[n] = (int(priority), frame)  # a plain int: an enum member would keep the tuple tracked
        if len(self._frames) > self.limit:
            self._shed()

    def _shed(self) -> None:
        lowest = min(priority for priority, _ in self._frames.values())
        quota = max(len(self._frames) - self.limit, self.limit // 10)
        victims = [n for n, (priority, _) in self._frames.items() if priority == lowest][:quota]
        for n in victims:
            del self._frames[n]
        name = Priority(lowest).name.lower()
        with self._drops_lock:
            self.dropped[name] += len(victims)
            self._unreported[name] += len(victims)
        log.error("storage process away and the hold is full: events dropped", dropped=len(victims),
                  event_class=name, held=len(self._frames), limit=self.limit)

    def acknowledge(self, upto: int) -> int:
        """Forget every event numbered ``upto`` or lower (committed); how many were forgotten."""
        done = 0
        while self._frames:
            n = next(iter(self._frames))
            if n > upto:
                break
            del self._frames[n]
            done += 1
        return done

    def after(self, n: int) -> list[tuple[int, bytes]]:
        """The frames of the held events numbered above ``n``, in order."""
        return [(k, frame) for k, (_, frame) in self._frames.items() if k > n]

    def by_class(self) -> dict[str, int]:
        """How many events of each class are held."""
        return dict(Counter(Priority(priority).name.lower() for priority, _ in self._frames.values()))

    @property
    def unreported_drops(self) -> dict[str, int]:
        """Drops not yet handed to storage (kept in the saved state until they are)."""
        with self._drops_lock:
            return dict(self._unreported)

    def take_unreported_drops(self) -> dict[str, int]:
        """Drops not yet handed to storage (to be counted there); forgets them."""
        with self._drops_lock:
            drops, self._unreported = dict(self._unreported), Counter()
        return drops

    def return_drops(self, drops: dict[str, int]) -> None:
        """Drops that could not be handed over after all (or that a previous run saved)."""
        with self._drops_lock:
            self._unreported.update(drops)


@dataclass(frozen=True, slots=True)
class _Attach:
    sock: socket.socket
    committed: int


_DETACH = object()
_STOP = object()


class Handover:
    """The thread that owns the :class:`Hold` and writes the link; see the module docstring."""

    def __init__(self, hold: Hold | None = None) -> None:
        self.hold = hold or Hold()
        self.boot = os.urandom(6).hex()
        """This panel run's name in hand-over marks: numbers restart with every panel start."""
        self._numbers = itertools.count(1)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._out: list[bytes] = []  # frames of the current batch, written by _flush
        self._sent_upto = 0
        self._thread = threading.Thread(target=self._run, name="handover", daemon=True)
        self._idle = threading.Event()
        self.committed_upto = 0
        self.handed_over = 0

    # ------------------------------------------------------------------------------ any thread

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def put(self, event: Event) -> None:
        """Hand an event on (from the alarm path: never blocks). Its number is given on the writer thread, in
        queue order, so that numbers rise in the order the events are sent and committed."""
        self._queue.put(event)

    def attach(self, sock: socket.socket, committed: str | None) -> None:
        """A storage process connected; ``committed`` is its last committed mark (``boot:n``) or None."""
        boot, _, n = (committed or "").partition(":")
        self._queue.put(_Attach(sock, int(n) if boot == self.boot and n.isdigit() else 0))

    def detach(self) -> None:
        """The storage process is gone: keep holding."""
        self._queue.put(_DETACH)

    def acknowledge(self, boot: str, upto: int) -> None:
        """The storage process committed everything up to ``upto`` of run ``boot``."""
        if boot == self.boot:
            self._queue.put(("ack", upto))

    def send(self, frame: bytes) -> None:
        """Write a frame (a request or a reply) after what is queued; dropped when nothing is attached."""
        self._queue.put(("frame", frame))

    def wait_stored(self, timeout_s: float) -> bool:
        """Wait until every event handed on so far is committed (for a planned stop)."""
        target = self._mark()
        deadline = time.monotonic() + timeout_s
        while self.committed_upto < target and time.monotonic() < deadline:
            if not self.hold and self._queue.empty():
                return True
            time.sleep(0.02)
        return self.committed_upto >= target or not self.hold

    def _mark(self) -> int:
        marker = threading.Event()
        self._queue.put(("mark", marker))
        marker.wait(5.0)
        return self.handed_over

    def stop(self) -> None:
        """End the writer thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        """Take what is queued (at most :data:`WRITE_BATCH` items), then write its frames in one go: under a
        burst the thread wakes, takes the interpreter lock and writes once per batch, not once per event."""
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < WRITE_BATCH:
                    batch.append(self._queue.get_nowait())
            for item in batch:
                if item is _STOP:
                    self._flush()
                    return
                try:
                    self._handle(item)
                except Exception:  # this thread carries every event: a bug must not end it
                    log.exception("handover: an item could not be handled")
            self._flush()

    def _handle(self, item: Any) -> None:
        if isinstance(item, Event):
            n = next(self._numbers)
            event = item
            self.handed_over = n
            frame = link.encode("event", n=n, boot=self.boot, event=link.event_to_wire(event))
            self.hold.add(n, event.priority, frame)
            self._write(frame)
        elif isinstance(item, _Attach):
            self._flush()  # what was written for the storage process before: to it, not to the new one
            self._sock = item.sock
            self.committed_upto = max(self.committed_upto, item.committed)
            self.hold.acknowledge(item.committed)
            backlog = self.hold.after(item.committed)
            if backlog:
                log.info("handing held events to the storage process", events=len(backlog))
            for _, frame in backlog:
                self._write(frame)
        elif item is _DETACH:
            self._flush()
            self._sock = None
        elif item[0] == "ack":
            self.committed_upto = max(self.committed_upto, item[1])
            self.hold.acknowledge(item[1])
        elif item[0] == "frame":
            self._write(item[1])
        elif item[0] == "mark":
            item[1].set()

    def _write(self, frame: bytes) -> None:
        if self._sock is not None:
            self._out.append(frame)

    def _flush(self) -> None:
        """Write the frames gathered for the attached storage process (in order, in one call)."""
        frames, self._out = self._out, []
        sock = self._sock
        if sock is None or not frames:
            return
        try:
            sock.sendall(b"".join(frames))
        except OSError as exc:
            log.warning("link to the storage process broken while writing", error=str(exc))
            self._sock = None


class UplinkSupervisor:
    """Runs the storage/uplink process, restarts it, and serves its messages (see the module docstring)."""

    def __init__(
        self,
        config_path: str,
        handover: Handover,
        *,
        on_request: Callable[[str, dict[str, Any], Callable[[dict[str, Any], bool], None]], None],
        on_fault: Callable[[str, bool, str | None], None],
        on_state: Callable[[bool, str], None] | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        deadline_s: float = UPLINK_DEADLINE_S,
        on_delivered: Callable[[list[str]], None] | None = None,
        name: str = "uplink",
        first: FirstChild | None = None,
    ) -> None:
        """``log_path``: a file for the storage process's log (default: this process's stdout, journald).
        ``on_delivered``: told the delivery keys of urgent events the broker acknowledged. ``name`` names the
        child in thread names (the SMS process is supervised by this class too). ``first``: the child forked at
        start-up (:mod:`gateway.panel.children`), for the first run; every later one is started as ``command``."""
        self.config_path = config_path
        self.handover = handover
        self._on_request = on_request
        self._on_fault = on_fault
        self._on_state = on_state
        self._command = list(command) if command else [sys.executable, "-m", "gateway.uplink.process"]
        self._env = env
        self._first = first
        self._log_path = log_path
        self.deadline_s = deadline_s
        self._stop = threading.Event()
        self._on_delivered = on_delivered
        self.name = name
        self._thread = threading.Thread(target=self._run, name=f"{name}-supervisor", daemon=True)
        self._proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._last_beat = 0.0
        self.up = False
        self.beat: dict[str, Any] = {}
        """The storage process's last beat: ``session``, ``connected`` (to the broker), ``stored``."""
        self.starts = 0
        self.last_exit: str | None = None
        self.pid: int | None = None

    def start(self) -> None:
        """Start the storage process and keep it running."""
        self._thread.start()

    @property
    def silent_s(self) -> float:
        """Seconds since the child's last message."""
        return time.monotonic() - self._last_beat

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (the storage process is leaving on purpose)."""
        return self._stop.is_set()

    def request(self, name: str, args: dict[str, Any] | None = None) -> Future[dict[str, Any]]:
        """Ask the storage process (``events``, ``storage``, ``rebirth``); the future fails when it is away."""
        future: Future[dict[str, Any]] = Future()
        if not self.up:
            future.set_exception(ConnectionError("the storage/uplink process is down"))
            return future
        request_id = next(self._ids)
        with self._pending_lock:
            self._pending[request_id] = future
        self.handover.send(link.encode("request", id=request_id, name=name, args=args or {}))
        return future

    def stop(self, flush_timeout_s: float = 5.0, timeout_s: float = 20.0) -> None:
        """Ask the storage process to flush and exit; wait for it, kill it after ``timeout_s``."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.handover.send(link.encode("stop", flush_timeout_s=flush_timeout_s))
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.error("storage process did not stop; killing it", pid=proc.pid)
                proc.kill()
                proc.wait()
        self._thread.join(timeout=timeout_s)

    # ------------------------------------------------------------------------------ supervisor thread

    def _run(self) -> None:
        delay = RESTART_MIN_S
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._run_once()
            except Exception:
                log.exception("storage process could not be run")
            self._set_up(False, self.last_exit or "ended")
            if self._stop.is_set():
                return
            if time.monotonic() - started >= STABLE_S:
                delay = RESTART_MIN_S
            log.error("storage/uplink process ended; the panel goes on and starts it again",
                      reason=self.last_exit, restart_in_s=delay)
            self._stop.wait(delay)
            delay = min(RESTART_MAX_S, delay * 2)

    def _run_once(self) -> None:
        first, self._first = self._first, None
        proc: subprocess.Popen[bytes] | ForkedProcess
        if first is not None:
            proc, ours = first.proc, first.sock
            first.go()
        else:
            proc, ours = self._start_child()
        self._proc = proc
        self.pid = proc.pid
        self.starts += 1
        self._last_beat = time.monotonic()
        reader = threading.Thread(target=self._read, args=(ours, proc), name=f"{self.name}-reader", daemon=True)
        reader.start()
        killed_for: str | None = None
        while proc.poll() is None:
            if self._stop.is_set():
                break
            silent = time.monotonic() - self._last_beat
            if silent > (self.deadline_s if self.up else START_TIMEOUT_S):
                killed_for = f"no beat for {silent:.0f} s"
                log.error("storage process hangs; killing it", pid=proc.pid, silent_s=round(silent, 1))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
        if self._stop.is_set():
            reader.join(timeout=20)
            return
        code = proc.wait()
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=5)
        if killed_for is not None:
            self.last_exit = killed_for
        elif code != 0:
            self.last_exit = f"exit status {code}"

    def _start_child(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """A new interpreter running ``command``, and our end of its link."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out = open(self._log_path, "ab") if self._log_path else None  # noqa: SIM115 - closed below
        try:
            proc = subprocess.Popen(
                [*self._command, "--config", self.config_path, "--link-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=self._env, stdout=out,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if out is not None:
                out.close()
        return proc, ours

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes] | ForkedProcess) -> None:
        try:
            while True:
                try:
                    frame = link.read_frame(sock)
                except (OSError, ConnectionError) as exc:
                    self.last_exit = f"link: {exc}"
                    return
                except link.BadMessage as exc:
                    self.last_exit = f"protocol: {exc}"
                    log.error("storage process broke the link protocol; restarting it", reason=str(exc))
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    return
                if frame is None:
                    return
                try:
                    message = link.decode(frame)
                except link.BadMessage as exc:
                    log.error("message from the storage process rejected", reason=str(exc))
                    continue
                try:
                    self._dispatch(sock, message)
                except Exception:
                    log.exception("message from the storage process not handled", type=message.get("type"))
        finally:
            self.handover.detach()
            self._fail_pending("the storage/uplink process went away")
            self._set_up(False, self.last_exit or "link closed")
            with contextlib.suppress(OSError):
                sock.close()

    def _dispatch(self, sock: socket.socket, message: dict[str, Any]) -> None:
        kind = message["type"]
        self._last_beat = time.monotonic()
        if kind == "hello":
            self.last_exit = None
            self.beat = {}
            self.handover.attach(sock, message["handover"])
            drops = self.handover.hold.take_unreported_drops()
            if drops:
                self.handover.send(link.encode("request", id=0, name="count_dropped", args={"dropped": drops}))
            self._set_up(True, "connected")
        elif kind == "beat":
            self.beat = message
        elif kind == "stored":
            self.handover.acknowledge(message["boot"], message["upto"])
        elif kind == "fault":
            self._on_fault(message["code"], message["present"], message["detail"])
        elif kind == "delivered":
            if self._on_delivered is not None:
                self._on_delivered([str(key) for key in message["keys"]])
        elif kind == "reply":
            with self._pending_lock:
                future = self._pending.pop(message["id"], None)
            if future is not None and future.set_running_or_notify_cancel():
                if message["ok"]:
                    future.set_result(message["data"])
                else:
                    future.set_exception(RuntimeError(str(message["data"].get("error", "failed"))))
        elif kind == "request":
            request_id = message["id"]

            def answer(data: dict[str, Any], ok: bool) -> None:
                self.handover.send(link.encode("reply", id=request_id, ok=ok, data=data))

            self._on_request(message["name"], message["args"], answer)

    def _fail_pending(self, reason: str) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(ConnectionError(reason))

    def _set_up(self, up: bool, reason: str) -> None:
        if up == self.up:
            return
        self.up = up
        if self._on_state is not None:
            try:
                self._on_state(up, reason)
            except Exception:
                log.exception("storage state listener failed")
