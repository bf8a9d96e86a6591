"""The demo as a technician's sandbox: its site file and database in its directory, the exact gatewayctl line,
``--keep``, Ctrl-C as a clean stop, a narrative on a terminal and JSON lines off one. The demo runs as a real
subprocess (``python -m gateway_sim.demo``, what scripts/demo runs); Ctrl-C is SIGINT to its process group, as a
terminal sends it."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil
import pytest

from tests.support.broker import MosquittoBroker
from tests.support.mqtt import MqttRecorder
from tests.support.wait import kill_demo

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
GATEWAYCTL = str(Path(sys.executable).with_name("gatewayctl"))


def start_demo(*args: str, stdout: int | IO[bytes] = subprocess.PIPE) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "GPIOZERO_PIN_FACTORY")}
    return subprocess.Popen([sys.executable, "-m", "gateway_sim.demo", "--duration", "120", *args], cwd=ROOT, env=env,
                            stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)


def read_until(fd: int, found: Callable[[str], bool], timeout: float = 60.0) -> list[str]:
    """Lines from ``fd`` until one satisfies ``found`` (AssertionError after ``timeout``)."""
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").rstrip("\r")
            lines.append(line)
            if found(line):
                return lines
    raise AssertionError("not seen in time; got:\n" + "\n".join(lines[-30:]))


def wait_for(condition: Callable[[], bool], message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def ctrl_c(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode(errors="replace")


def test_json_off_a_terminal_gatewayctl_line_and_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = start_demo("--dir", str(workdir))
    try:
        assert proc.stdout is not None
        lines = read_until(proc.stdout.fileno(), lambda line: '"gatewayctl"' in line)
        assert all(json.loads(line) for line in lines if line)  # every line is JSON off a terminal
        command = json.loads(lines[-1])["gatewayctl"]
        # from the checkout, the wrapper: gatewayctl itself is in .venv/bin, not on a fresh clone's PATH
        assert command == f"scripts/gatewayctl --config {workdir}/building.toml status"
        argv = shlex.split(command)
        wait_for(lambda: (workdir / "events.db").exists(), "the storage process never made its database")
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "sunshine-garden-b07" in result.stdout
        code, err = ctrl_c(proc)
    finally:
        if proc.poll() is None:
            kill_demo(proc)
    assert code == 0, err[-2000:]
    assert "Traceback" not in err
    assert (workdir / "building.toml").exists() and (workdir / "events.db").exists()
    assert 'pin_factory = "mock"' in (workdir / "building.toml").read_text()


@pytest.mark.parametrize("keep", [True, False])
def test_keep_keeps_the_directory_and_database(keep: bool) -> None:
    proc = start_demo(*(["--keep"] if keep else []))
    try:
        assert proc.stdout is not None
        lines = read_until(proc.stdout.fileno(), lambda line: '"gatewayctl"' in line)
        directory = Path(shlex.split(json.loads(lines[-1])["gatewayctl"])[2]).parent
        wait_for(lambda: (directory / "events.db").exists(), "the storage process never made its database")
        code, err = ctrl_c(proc)
    finally:
        if proc.poll() is None:
            kill_demo(proc)
    assert code == 0, err[-2000:]
    try:
        assert (directory / "events.db").exists() == keep
        assert (directory / "building.toml").exists() == keep
    finally:
        if keep:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)


def test_a_narrative_on_a_terminal() -> None:
    master, slave = pty.openpty()
    proc = start_demo(stdout=slave)
    os.close(slave)
    try:
        lines = read_until(master, lambda line: "gas leak starts" in line)
        code, err = ctrl_c(proc)
    finally:
        if proc.poll() is None:
            kill_demo(proc)
        os.close(master)
    assert code == 0, err[-2000:]
    assert "Traceback" not in err
    text = [line for line in lines if line.strip()]
    assert not any(line.lstrip().startswith("{") for line in text), text[:5]
    assert any("In another terminal:  scripts/gatewayctl --config " in line for line in text)
    assert any(line[:8].count(":") == 2 and "panel started" in line for line in text)


def _tcp_peers(pid: int) -> set[tuple[str, int]]:
    """Remote TCP endpoints of ``pid`` and its descendants, but for the demo's own mosquitto's."""
    root = psutil.Process(pid)
    peers: set[tuple[str, int]] = set()
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.name() == "mosquitto":
                continue
            peers |= {(c.raddr.ip, c.raddr.port) for c in proc.net_connections(kind="tcp") if c.raddr}
    return peers


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
def test_the_demo_talks_only_to_its_own_broker_unless_given_one(tmp_path: Path) -> None:
    """A broker already on the machine (here one started by the test) hears nothing from the demo by default;
    with --broker it gets the demo's birth."""
    machine = MosquittoBroker(tmp_path / "machine-broker")
    machine.start()
    try:
        with MqttRecorder("127.0.0.1", machine.port) as heard:
            workdir = tmp_path / "demo"
            proc = start_demo("--dir", str(workdir))
            try:
                assert proc.stdout is not None
                read_until(proc.stdout.fileno(), lambda line: '"event forwarded"' in line)
                site = tomllib.loads((workdir / "building.toml").read_text())
                own = site["mqtt"]["port"]
                assert own not in (1883, machine.port) and site["mqtt"]["host"] == "127.0.0.1"
                peers = _tcp_peers(proc.pid)
                assert peers and all(port == own for _, port in peers), peers  # its own mosquitto, nothing else
                code, err = ctrl_c(proc)
            finally:
                if proc.poll() is None:
                    kill_demo(proc)
            assert code == 0, err[-2000:]
            assert heard.messages() == []
            with contextlib.suppress(OSError):  # its own broker stopped with it
                socket.create_connection(("127.0.0.1", own), 1).close()
                raise AssertionError(f"the demo's broker on port {own} outlived it")

            shared = start_demo("--dir", str(tmp_path / "shared"), "--broker", f"127.0.0.1:{machine.port}")
            try:
                heard.wait_for(lambda m: m.topic.endswith("/birth"), timeout=60)
                code, err = ctrl_c(shared)
            finally:
                if shared.poll() is None:
                    os.killpg(shared.pid, signal.SIGKILL)
                    shared.wait()
            assert code == 0, err[-2000:]
    finally:
        machine.stop()


def test_without_mosquitto_the_demo_has_no_broker_and_points_at_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway_sim import demo

    monkeypatch.setattr(demo, "_find_mosquitto", lambda: None)
    assert demo.DemoBroker(tmp_path).start() is False
    site = tomllib.loads(demo.write_demo_site(tmp_path, "/dev/null").read_text())
    host, port = site["mqtt"]["host"], site["mqtt"]["port"]
    assert host == "127.0.0.1" and port != 1883
    with pytest.raises(OSError):  # nothing listens there: events stay buffered
        socket.create_connection((host, port), 1).close()
