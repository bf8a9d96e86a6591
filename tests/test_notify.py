"""sd_notify over a real AF_UNIX datagram socket, and the progress-fed watchdog."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.health import Heartbeats
from gateway.notify import DEFAULT_INTERVAL_S, Notifier, Watchdog, watchdog_interval

TIMEOUT_S = 20.0


class Receiver:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def _pull(self) -> None:
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(fields)

    def next(self, timeout: float = TIMEOUT_S) -> dict[str, str]:
        """The next datagram, parsed into fields."""
        before = len(self.messages)
        deadline = time.monotonic() + timeout
        while len(self.messages) == before:
            if time.monotonic() > deadline:
                raise AssertionError("no datagram received")
            self._pull()
        return self.messages[before]

    def wait_for(self, pred: Callable[[dict[str, str]], bool], timeout: float = TIMEOUT_S) -> dict[str, str]:
        """The first new datagram matching ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching datagram; got {self.messages[-5:]}")
            msg = self.next(remaining)
            if pred(msg):
                return msg


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Receiver(sock)
    finally:
        sock.close()


def test_ready_status_stopping_watchdog(receiver: Receiver) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready()
    assert receiver.next() == {"READY": "1"}
    assert n.status("12 devices ok, 0 fault, backlog 3")
    assert receiver.next() == {"STATUS": "12 devices ok, 0 fault, backlog 3"}
    assert n.watchdog()
    assert receiver.next() == {"WATCHDOG": "1"}
    assert n.stopping()
    assert receiver.next() == {"STOPPING": "1"}
    n.close()


def test_send_several_fields_in_one_datagram(receiver: Receiver) -> None:
    n = Notifier()
    n.ready(status="storage and pins open")
    assert receiver.next() == {"READY": "1", "STATUS": "storage and pins open"}
    n.send(STATUS="line one\nline two", ERRNO=5)
    assert receiver.next() == {"STATUS": "line one line two", "ERRNO": "5"}


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert not n.status("x")
    assert not n.stopping()


def test_send_errors_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    n = Notifier()
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    n.close()


@pytest.mark.timeout(60)  # a blocking send would hang here rather than fail
def test_send_never_blocks_when_receiver_is_full(receiver: Receiver) -> None:
    n = Notifier()
    # Nobody reads: the receive queue fills and sendto would block on a blocking socket.
    results = [n.status("x" * 1024) for _ in range(5000)]
    assert results[0] is True
    assert False in results


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"gateway-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier()
        assert n.ready()
        assert Receiver(sock).next() == {"READY": "1"}
    finally:
        sock.close()


def test_watchdog_interval_from_environment() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({}) == DEFAULT_INTERVAL_S
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) == DEFAULT_INTERVAL_S
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) == DEFAULT_INTERVAL_S


def test_watchdog_default_interval_reads_env(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert Watchdog(Heartbeats(), Notifier()).interval_s == 1.5
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Watchdog(Heartbeats(), Notifier()).interval_s == DEFAULT_INTERVAL_S


def test_watchdog_feeds_while_fresh_and_withholds_when_stale(receiver: Receiver) -> None:
    hb = Heartbeats()
    hb.register("bus0", 0.2)
    hb.register("annunciator", 0.2)
    beating = {"bus0", "annunciator"}
    stop = threading.Event()

    def parts() -> None:
        while not stop.is_set():
            for name in list(beating):
                hb.beat(name)
            stop.wait(0.02)

    beater = threading.Thread(target=parts, daemon=True)
    beater.start()
    wd = Watchdog(hb, Notifier(), 0.05, lambda: "2 devices ok, 0 fault, backlog 0")
    wd.start()
    try:
        for _ in range(3):
            msg = receiver.wait_for(lambda m: "WATCHDOG" in m)
            assert msg == {"WATCHDOG": "1", "STATUS": "2 devices ok, 0 fault, backlog 0"}

        beating.discard("bus0")  # bus0 wedges: the watchdog must notice and stop feeding
        stale = receiver.wait_for(lambda m: m.get("STATUS", "").startswith("stale:"))
        assert stale == {"STATUS": "stale: bus0 | 2 devices ok, 0 fault, backlog 0"}
        # From here on, as long as bus0 stays silent, not one keep-alive goes out.
        for _ in range(5):
            msg = receiver.next()
            assert "WATCHDOG" not in msg
            assert msg["STATUS"].startswith("stale: bus0 |")

        beating.add("bus0")  # it recovers: feeding resumes
        receiver.wait_for(lambda m: m.get("WATCHDOG") == "1")
    finally:
        wd.stop()
        stop.set()
        beater.join(timeout=TIMEOUT_S)


def test_watchdog_names_every_stale_part(receiver: Receiver) -> None:
    hb = Heartbeats()
    hb.register("uplink", 0.2, now=0.0)
    hb.register("bus1", 0.2, now=0.0)
    wd = Watchdog(hb, Notifier(), 60.0, lambda: "summary")
    assert wd.check() == ["bus1", "uplink"]
    assert receiver.next() == {"STATUS": "stale: bus1, uplink | summary"}


def test_watchdog_pid_mismatch_withholds_feed(receiver: Receiver) -> None:
    hb = Heartbeats()
    hb.register("bus0", 3600.0)
    other = Watchdog(hb, Notifier(), 60.0, lambda: "ok", environ={"WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.check() == []
    assert receiver.next() == {"STATUS": "ok"}
    mine = Watchdog(hb, Notifier(), 60.0, lambda: "ok", environ={"WATCHDOG_PID": str(os.getpid())})
    mine.check()
    assert receiver.next() == {"WATCHDOG": "1", "STATUS": "ok"}


def test_watchdog_survives_broken_status(receiver: Receiver) -> None:
    hb = Heartbeats()

    def broken() -> str:
        raise RuntimeError("boom")

    Watchdog(hb, Notifier(), 60.0, broken).check()
    assert receiver.next() == {"WATCHDOG": "1", "STATUS": "status unavailable: RuntimeError"}


def test_watchdog_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    hb = Heartbeats()
    hb.register("bus0", 0.2)
    calls = threading.Event()

    def summary() -> str:
        calls.set()
        return "ok"

    wd = Watchdog(hb, Notifier(), 0.05, summary)
    wd.start()
    try:
        assert calls.wait(TIMEOUT_S)
    finally:
        wd.stop()


def test_watchdog_stop_joins_thread(receiver: Receiver) -> None:
    wd = Watchdog(Heartbeats(), Notifier(), 3600.0, lambda: "ok")
    wd.start()
    receiver.next()
    wd.stop()
    assert not any(t.name == "sd-watchdog" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError):
        Watchdog(Heartbeats(), Notifier(), 0.0, lambda: "ok")
