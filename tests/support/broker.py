"""A real mosquitto broker on a private loopback port, for tests that stop and restart it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "MosquittoBroker", "find_mosquitto", "free_port"]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"
_PORT_IN_USE_MARKERS = ("Address already in use", "Error: Address in use")


class BrokerError(RuntimeError):
    """The broker could not be started."""


def find_mosquitto() -> str:
    """Return the path of the mosquitto binary or raise BrokerError."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise BrokerError("mosquitto is required: apt-get install mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


# MQTT 3.1.1 CONNECT, clean session, keepalive 60 s, client id "probe".
_CONNECT_PACKET = (
    bytes([0x10, 17, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x05]) + b"probe"
)
_DISCONNECT_PACKET = bytes([0xE0, 0x00])


def _mqtt_connack(host: str, port: int, timeout: float) -> bool:
    """Return True if an MQTT CONNACK (any return code) comes back from ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_CONNECT_PACKET)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            with contextlib.suppress(OSError):
                sock.sendall(_DISCONNECT_PACKET)
            return reply[0] == 0x20 and reply[1] == 0x02
    except OSError:
        return False


class MosquittoBroker:
    """A mosquitto subprocess listening on 127.0.0.1 on a port kept across restarts.

    A plain listener is always configured on ``port``. Passing ``certfile``/``keyfile``
    adds a TLS listener on ``tls_port`` (``cafile`` and ``require_certificate`` set up
    client-certificate checks). ``password_file``/``acl_file`` apply to all listeners.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        cafile: str | os.PathLike[str] | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        require_certificate: bool = False,
        tls_port: int | None = None,
        password_file: str | os.PathLike[str] | None = None,
        acl_file: str | os.PathLike[str] | None = None,
        allow_anonymous: bool = True,
        max_inflight_messages: int | None = None,
        autosave_interval: int | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile must be given together")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._port = port
        self._tls_port = tls_port
        self._fixed_ports = port is not None
        self.cafile = cafile
        self.certfile = certfile
        self.keyfile = keyfile
        self.require_certificate = require_certificate
        self.password_file = password_file
        self.acl_file = acl_file
        self.max_inflight_messages = max_inflight_messages
        """mosquitto's ``max_inflight_messages``, also the Receive Maximum it states to MQTT 5 clients
        (mosquitto's default: 20)."""
        self.autosave_interval = autosave_interval
        """With a value, mosquitto persists (``persistence true`` in ``workdir``) and saves its snapshot every
        that many seconds; without, it keeps everything in memory only."""
        self.allow_anonymous = allow_anonymous
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = find_mosquitto()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.output_path = self.workdir / "mosquitto.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._ready_log_offset = 0

    # -- properties ---------------------------------------------------------

    @property
    def tls_enabled(self) -> bool:
        return self.certfile is not None

    @property
    def port(self) -> int:
        """The plain MQTT port (assigned on first start unless given)."""
        if self._port is None:
            raise BrokerError("broker has no port yet: call start() first")
        return self._port

    @property
    def tls_port(self) -> int:
        """The TLS MQTT port (only when TLS is configured)."""
        if not self.tls_enabled:
            raise BrokerError("broker has no TLS listener")
        if self._tls_port is None:
            raise BrokerError("broker has no port yet: call start() first")
        return self._tls_port

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> MosquittoBroker:
        """Start mosquitto and wait until it answers an MQTT CONNECT."""
        if self.is_running:
            return self
        deadline = time.monotonic() + self.start_timeout
        keep_ports = self._started_once or self._fixed_ports
        if not keep_ports:
            self._port = free_port(self.host)
            if self.tls_enabled:
                self._tls_port = self._distinct_free_port()
        elif self.tls_enabled and self._tls_port is None:
            self._tls_port = self._distinct_free_port()
        last_error = ""
        while True:
            if keep_ports:
                self._wait_ports_bindable(deadline)
            self._write_config()
            self._spawn()
            outcome = self._wait_ready(deadline)
            if outcome == "ready":
                self._started_once = True
                return self
            last_error = self._tail()
            if outcome == "timeout" or time.monotonic() >= deadline:
                self._terminate(signal.SIGKILL)
                raise BrokerError(f"mosquitto did not become ready on port {self._port}:\n{last_error}")
            if not any(marker in last_error for marker in _PORT_IN_USE_MARKERS):
                raise BrokerError(f"mosquitto exited during start-up:\n{last_error}")
            # Port taken between probing and binding: pick new ports unless they are pinned.
            if not keep_ports:
                self._port = free_port(self.host)
                if self.tls_enabled:
                    self._tls_port = self._distinct_free_port()
            else:
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop with SIGTERM, escalating to SIGKILL after ``stop_timeout``."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Stop abruptly with SIGKILL."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> MosquittoBroker:
        """Stop and start again on the same port(s)."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """The broker's log file followed by anything it wrote to stdout/stderr."""
        parts = []
        for path in (self.log_path, self.output_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(parts)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<MosquittoBroker {self.host}:{self._port} {state}>"

    # -- internals ----------------------------------------------------------

    def _distinct_free_port(self) -> int:
        while True:
            candidate = free_port(self.host)
            if candidate != self._port:
                return candidate

    def _ports(self) -> list[int]:
        ports = [self.port]
        if self.tls_enabled:
            ports.append(self.tls_port)
        return ports

    def _wait_ports_bindable(self, deadline: float) -> None:
        for port in self._ports():
            while not _port_bindable(self.host, port):
                if time.monotonic() >= deadline:
                    raise BrokerError(f"port {self.host}:{port} did not become free")
                time.sleep(0.05)

    def _write_config(self) -> None:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            *(["persistence false"] if self.autosave_interval is None else [
                "persistence true", f"persistence_location {self.workdir.resolve()}/",
                f"autosave_interval {self.autosave_interval}"]),
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
            "connection_messages true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Keep root so the broker can write into the private test directory.
            lines.append("user root")
        if self.password_file is not None:
            lines.append(f"password_file {Path(self.password_file).resolve()}")
        if self.acl_file is not None:
            lines.append(f"acl_file {Path(self.acl_file).resolve()}")
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        lines.append(f"listener {self.port} {self.host}")
        if self.tls_enabled:
            lines.append(f"listener {self.tls_port} {self.host}")
            if self.cafile is not None:
                lines.append(f"cafile {Path(self.cafile).resolve()}")
            lines.append(f"certfile {Path(str(self.certfile)).resolve()}")
            lines.append(f"keyfile {Path(str(self.keyfile)).resolve()}")
            lines.append(f"require_certificate {'true' if self.require_certificate else 'false'}")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self) -> None:
        with open(self.output_path, "ab") as output:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_ready(self, deadline: float) -> str:
        """Return "ready", "exited" or "timeout"."""
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                return "exited"
            if _mqtt_connack(self.host, self.port, timeout=2.0):
                if self._proc.poll() is not None:
                    return "exited"
                if not self.tls_enabled or self._tls_accepting(deadline):
                    self._ready_log_offset = len(self._log_file_text())
                    return "ready"
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(0.02)

    def _tls_accepting(self, deadline: float) -> bool:
        """A bare TCP connection to the TLS port is accepted. mosquitto logs the aborted handshake (at times as
        an OpenSSL error) a moment later: wait for that, so it falls before :meth:`log_since_ready`."""
        logged = len(self._log_file_text())
        try:
            with socket.create_connection((self.host, self.tls_port), timeout=2.0) as probe:
                probe_port = probe.getsockname()[1]
        except OSError:
            return False
        # Either "New connection from <probe> on port <tls>" … "disconnected", or, when the handshake fails
        # while being accepted, "Client connection from <host> failed: …".
        opened = f"New connection from {self.host}:{probe_port} on port {self.tls_port}"
        until = min(deadline, time.monotonic() + 5.0)
        while time.monotonic() < until:
            log = self._log_file_text()[logged:]
            if f"Client connection from {self.host} failed" in log or (
                    opened in log and "disconnected" in log[log.index(opened):]):
                break
            time.sleep(0.01)
        return True

    def _log_file_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    def log_since_ready(self) -> str:
        """The broker's log since its last start was ready (the readiness probes left out)."""
        return self._log_file_text()[self._ready_log_offset:]

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=self.stop_timeout)
        self._proc = None

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def frozen(broker: MosquittoBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP): the kernel still accepts a connection, MQTT never answers it."""
    assert broker.pid is not None
    pid = broker.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
