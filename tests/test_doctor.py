"""``gatewayctl config check`` and ``gatewayctl doctor`` against real peers.

Each doctor check has a test that makes it pass and one that makes it fail: a real mosquitto (with TLS, a
password file and an ACL, tests/support/broker.py), a real pseudo-terminal with pymodbus's server behind it
(gateway_sim/), mock pins, real SQLite files and the real ``gatewayctl`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, SiteConfig, load_config, parse_config
from gateway.ops.cli import ControlClient
from gateway.ops.doctor import (
    Check,
    Daemon,
    check_broker,
    check_clock,
    check_config,
    check_gpio,
    check_group,
    check_platform,
    check_serial,
    check_service,
    check_storage,
    device_grant,
)
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker, free_port
from tests.support.building import simulated_detectors
from tests.support.other_user import SYSTEM_PYTHON, readable_copy, system_python_ok
from tests.support.site import DetectorSpec, build_site
from tests.test_tls import (
    GATEWAY_PASSWORD,
    GATEWAY_USER,
    NEIGHBOUR_PASSWORD,
    NEIGHBOUR_USER,
    Pki,
    client_tls,
    credentials,
    pki,
    tls_broker,
)
from tests.test_tls import site as tls_site

__all__ = ["pki"]  # the module-scoped certificate fixture, shared with tests/test_tls.py

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
GATEWAYCTL = str(Path(sys.executable).with_name("gatewayctl"))
GATEWAYD = str(Path(sys.executable).with_name("gatewayd"))


def gatewayctl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([GATEWAYCTL, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=environ)


# -- config check: ports named the way a Pi names them ---------------------------------------------------


def two_bus_site(tmp_path: Path, first: str, second: str) -> dict[str, Any]:
    site = tomllib.loads(build_site(bus_port=first, db_path=tmp_path / "events.db", broker_port=1883,
                                    socket_path=tmp_path / "control.sock").toml)
    site["buses"].append({**site["buses"][0], "id": "bus2", "port": second})
    return site


@pytest.fixture
def device_node(tmp_path: Path) -> Path:
    """A stand-in for a tty node (a regular file: only its name matters to the check)."""
    node = tmp_path / "ttyUSB0"
    node.touch()
    return node


def test_the_same_path_written_twice_is_refused(tmp_path: Path, device_node: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(two_bus_site(tmp_path, str(device_node), str(device_node)))
    assert err.value.path == "buses[1].port"
    assert err.value.reason == f"port {str(device_node)!r} is already used by buses[0]: one bus per port"


def test_a_dot_in_the_path_is_the_same_port(tmp_path: Path, device_node: Path) -> None:
    dotted = f"{tmp_path}/./{device_node.name}"
    with pytest.raises(ConfigError) as err:
        parse_config(two_bus_site(tmp_path, str(device_node), dotted))
    assert err.value.path == "buses[1].port"
    assert f"are both {device_node}" in err.value.reason


def test_a_symlink_to_the_same_device_is_the_same_port(tmp_path: Path, device_node: Path) -> None:
    """Like /dev/serial0 → ttyAMA0, or /dev/serial/by-id/usb-FTDI_... → ../../ttyUSB0."""
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    link = by_id / "usb-FTDI_FT232R_USB_UART_A10K5XYZ-if00-port0"
    link.symlink_to(Path("..") / device_node.name)
    with pytest.raises(ConfigError) as err:
        parse_config(two_bus_site(tmp_path, str(link), str(device_node)))
    assert err.value.path == "buses[1].port"
    assert f"{str(link)!r} are both {device_node}" in err.value.reason


def test_two_devices_are_two_ports(tmp_path: Path, device_node: Path) -> None:
    other = tmp_path / "ttyUSB1"
    other.touch()
    link = tmp_path / "serial0"
    link.symlink_to(other)
    cfg = parse_config(two_bus_site(tmp_path, str(device_node), str(link)))
    assert [b.port for b in cfg.buses] == [str(device_node), str(link)]  # kept as written: udev names stay


def test_config_check_names_the_key_path(tmp_path: Path, device_node: Path) -> None:
    spec = build_site(bus_port=device_node, db_path=tmp_path / "events.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock")
    site = tmp_path / "building.toml"
    site.write_text(spec.toml + f'\n[[buses]]\nid = "bus2"\nport = "{tmp_path}/./{device_node.name}"\n')
    result = gatewayctl("config", "check", str(site))
    assert result.returncode == 1
    line = site.read_text().splitlines().index(f'port = "{tmp_path}/./{device_node.name}"') + 1
    assert result.stderr.startswith(f"gatewayctl: config error: line {line}: buses[1].port (bus bus2): port ")
    checked = gatewayctl("config", "check", "--json", str(site))
    assert json.loads(checked.stdout)["data"]["path"] == "buses[1].port"


# -- doctor: helpers -------------------------------------------------------------------------------------


def statuses(checks: list[Check]) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.detail + (f" — fix: {c.fix}" if c.fix else "")) for c in checks}


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def plain_site(tmp_path: Path, port: str, broker_port: int = 1, **changes: str) -> SiteConfig:
    spec = build_site(bus_port=port, db_path=tmp_path / "events.db", broker_port=broker_port,
                      socket_path=tmp_path / "control.sock", timeout_s=0.3)
    text = spec.toml
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "site.toml"
    path.write_text(text)
    return load_config(path)


# -- config ----------------------------------------------------------------------------------------------


def test_doctor_config_fails_and_stops_there(tmp_path: Path) -> None:
    path = tmp_path / "building.toml"
    path.write_text('[site]\ncommunity = "c"\n')
    result = gatewayctl("--config", str(path), "doctor")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ok    platform ")
    assert lines[1].startswith("FAIL  config ")
    assert f"— fix: edit {path} at site.building" in lines[1]


def test_doctor_fails_on_the_unedited_example(tmp_path: Path) -> None:
    """The shipped example validates, but the service refuses it: the doctor says so instead of ``ok``."""
    example = ROOT / "examples/building.toml"
    site = tmp_path / "building.toml"
    shutil.copy(example, site)
    check, cfg = check_config(str(site), example)
    assert (check.status, cfg) == ("FAIL", None)
    assert check.detail == f"{site} is still the shipped example, unchanged: the service refuses to start it"
    assert check.fix == f"sudoedit {site} for this building (docs/config.md), then: gatewayctl config check {site}"
    site.write_text(example.read_text().replace("\n", "\n# edited for this building\n", 1))
    assert check_config(str(site), example)[0].status == "ok"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_doctor_on_an_unreadable_site_says_sudo_or_join_the_group(tmp_path: Path) -> None:
    site = tmp_path / "building.toml"
    shutil.copy(ROOT / "examples/building.toml", site)
    site.chmod(0o600)
    tmp_path.chmod(0o755)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", GATEWAYCTL,
                             "--config", str(site), "doctor"], capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1, result.stderr
    line = result.stdout.splitlines()[1]
    assert line == (f"FAIL  config         {site}: permission denied — fix: use sudo (sudo gatewayctl doctor), "
                    "or join group gateway: sudo usermod -aG gateway $USER, then log in again")


def test_doctor_platform_names_the_board(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    check = check_platform(model)
    assert check.status == "ok"
    assert check.detail.startswith("Raspberry Pi 4 Model B Rev 1.4; ")
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}." in check.detail
    assert check_platform(tmp_path / "absent").detail.startswith("not a Raspberry Pi")


def test_doctor_config_ok_and_json(tmp_path: Path, modem: VirtualNullModem) -> None:
    cfg = plain_site(tmp_path, modem.gateway_port)
    result = gatewayctl("--config", cfg.source, "doctor", "--json")
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["data"]["checks"]}
    assert checks["config"]["status"] == "ok"
    assert set(checks) >= {"config", "gpio", "serial bus1", "broker tcp", "clock", "disk", "database", "service",
                           "socket group"}
    assert all(c["status"] in ("ok", "warn", "FAIL") for c in checks.values())
    assert all(c["fix"] for c in checks.values() if c["status"] != "ok")
    # nothing listens on port 1 and no detector answers: it fails, and says so in its exit status
    assert checks["broker tcp"]["status"] == "FAIL"
    assert report["ok"] is False and result.returncode == 1


# -- gpio ------------------------------------------------------------------------------------------------


def test_doctor_gpio_ok_on_mock_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    cfg = plain_site(tmp_path, "/dev/null", **{"gc_freeze = false": 'gc_freeze = false\npin_factory = "mock"'})
    check = check_gpio(cfg, Daemon(cfg.control.socket))
    assert (check.status, check.detail) == ("ok", "mock: 1 pins, nothing to hold them")


def test_doctor_gpio_fails_on_mock_pins_on_a_pi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judged from the file even while a daemon runs: mock pins on a Pi mean a silent buzzer."""
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    cfg = plain_site(tmp_path, "/dev/null", **{"gc_freeze = false": 'gc_freeze = false\npin_factory = "mock"'})

    class Running(Daemon):
        running = True  # type: ignore[assignment]

    for daemon in (Daemon(cfg.control.socket), Running(cfg.control.socket)):
        check = check_gpio(cfg, daemon, model)
        assert check.status == "FAIL"
        assert check.detail.startswith("mock pins on a Raspberry Pi 5 Model B Rev 1.0, from 'mock' in the site file")
        assert check.fix == ('[runtime] pin_factory = "lgpio" in the site file (sudoedit it), '
                             "then: sudo systemctl restart gatewayd")
    assert check_gpio(cfg, Daemon(cfg.control.socket), tmp_path / "absent").status == "ok"


@pytest.mark.skipif(Path("/dev/gpiochip0").exists(), reason="this machine has a real /dev/gpiochip0")
def test_doctor_gpio_fails_without_a_chip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    cfg = plain_site(tmp_path, "/dev/null")
    check = check_gpio(cfg, Daemon(cfg.control.socket))
    assert check.status == "FAIL"
    assert check.detail == "gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory"
    assert 'pin_factory = "mock"' in (check.fix or "")


# -- serial ----------------------------------------------------------------------------------------------


def test_doctor_serial_ok_when_a_configured_address_answers(tmp_path: Path, modem: VirtualNullModem) -> None:
    cfg = plain_site(tmp_path, modem.gateway_port)
    with simulated_detectors(modem.device_port, [DetectorSpec("gas-u1-h001", "u1-h001", "u1", 1)]):
        check = check_serial(cfg, cfg.buses[0], Daemon(cfg.control.socket))
    assert check.status == "ok", check
    assert check.detail.endswith("9600 8N1: gas-u1-h001@1 answers")
    assert f"{modem.gateway_port} → /dev/pts/" in check.detail  # the symlink is resolved and shown


def test_doctor_serial_fails_when_nobody_answers(tmp_path: Path, modem: VirtualNullModem) -> None:
    cfg = plain_site(tmp_path, modem.gateway_port)
    with simulated_detectors(modem.device_port, [DetectorSpec("elsewhere", "u1-h001", "u1", 7)]):
        check = check_serial(cfg, cfg.buses[0], Daemon(cfg.control.socket))
    assert check.status == "FAIL"
    assert "no configured address answers (gas-u1-h001@1: timeout)" in check.detail
    assert "A/B wiring" in (check.fix or "")


def test_doctor_serial_fails_when_the_port_is_missing(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, str(tmp_path / "ttyUSB9"))
    check = check_serial(cfg, cfg.buses[0], Daemon(cfg.control.socket))
    assert (check.status, check.detail) == ("FAIL", f"{tmp_path}/ttyUSB9: no such device")


def test_doctor_serial_fails_when_the_port_cannot_be_opened(tmp_path: Path) -> None:
    not_a_tty = tmp_path / "ttyUSB0"
    not_a_tty.write_text("")
    cfg = plain_site(tmp_path, str(not_a_tty))
    check = check_serial(cfg, cfg.buses[0], Daemon(cfg.control.socket))
    assert check.status == "FAIL"
    assert check.detail.startswith(f"{not_a_tty}: cannot open: ")


# -- broker ----------------------------------------------------------------------------------------------


def test_doctor_broker_tcp_fails_when_nothing_listens(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null", broker_port=free_port())
    checks = list(check_broker(cfg))
    assert [c.name for c in checks] == ["broker tcp"]
    assert checks[0].status == "FAIL" and "Connection refused" in checks[0].detail


def test_doctor_broker_plain_ok(tmp_path: Path, broker: MosquittoBroker) -> None:
    cfg = plain_site(tmp_path, "/dev/null", broker_port=broker.port)
    got = statuses(list(check_broker(cfg)))
    assert got["broker tcp"][0] == "ok"
    assert got["broker tls"][0] == "warn"  # plain MQTT is named, with the fix
    assert got["broker login"][0] == "ok"
    assert got["broker acl"][0] == "ok", got
    assert "safety/test-community/b01/status acknowledged" in got["broker acl"][1]


def test_doctor_checks_every_node_of_a_cluster(tmp_path: Path, broker: MosquittoBroker) -> None:
    """With mqtt.hosts every node is checked, each line naming its node: a node that is down is a FAIL of its
    own, even when the first node is fine."""
    down = free_port()
    cfg = plain_site(tmp_path, "/dev/null", broker_port=broker.port,
                     **{f'host = "127.0.0.1"\nport = {broker.port}\n':
                        f'hosts = ["127.0.0.1:{broker.port}", "127.0.0.1:{down}"]\n'})
    got = statuses(list(check_broker(cfg)))
    up_node, down_node = f"127.0.0.1:{broker.port}", f"127.0.0.1:{down}"
    assert got[f"broker login {up_node}"][0] == "ok" and got[f"broker acl {up_node}"][0] == "ok", got
    assert got[f"broker tcp {down_node}"][0] == "FAIL", got
    assert "check mqtt.hosts" in got[f"broker tcp {down_node}"][1], got
    assert f"broker login {down_node}" not in got


@pytest.fixture
def secured(tmp_path: Path, pki: Pki) -> Iterator[MosquittoBroker]:
    broker = tls_broker(tmp_path, pki.server, pki.ca, secured=True)
    try:
        yield broker
    finally:
        broker.stop()


def secured_site(tmp_path: Path, broker: MosquittoBroker, tls: dict[str, Any], user: str, password: str,
                 ) -> SiteConfig:
    base = tmp_path / "site"
    base.mkdir(exist_ok=True)
    with VirtualNullModem(base / "dev") as nm:  # only for a port name; the broker checks never open it
        _, path = tls_site(base, nm, broker.tls_port, tls=tls, credentials=credentials(base, user, password))
    return load_config(path)


def test_doctor_broker_all_ok_over_tls(tmp_path: Path, pki: Pki, secured: MosquittoBroker) -> None:
    cfg = secured_site(tmp_path, secured, client_tls(pki), GATEWAY_USER, GATEWAY_PASSWORD)
    got = statuses(list(check_broker(cfg)))
    assert {name: s for name, (s, _) in got.items()} == {
        "broker tcp": "ok", "broker tls": "ok", "broker login": "ok", "broker acl": "ok"}, got
    assert "certificate verified" in got["broker tls"][1]


def test_doctor_broker_tls_fails_with_another_ca(tmp_path: Path, pki: Pki, secured: MosquittoBroker) -> None:
    cfg = secured_site(tmp_path, secured, client_tls(pki, ca_file=str(pki.other_ca.cert)), GATEWAY_USER,
                       GATEWAY_PASSWORD)
    got = statuses(list(check_broker(cfg)))
    assert list(got) == ["broker tcp", "broker tls"]
    assert got["broker tls"][0] == "FAIL"
    assert "certificate verify failed" in got["broker tls"][1]


def test_doctor_broker_login_fails_with_a_wrong_password(tmp_path: Path, pki: Pki,
                                                         secured: MosquittoBroker) -> None:
    cfg = secured_site(tmp_path, secured, client_tls(pki), GATEWAY_USER, "not-the-password")
    got = statuses(list(check_broker(cfg)))
    assert got["broker tls"][0] == "ok"
    assert got["broker login"][0] == "FAIL", got
    assert "acl" not in " ".join(got)


def test_doctor_broker_acl_fails_for_another_buildings_user(tmp_path: Path, pki: Pki,
                                                            secured: MosquittoBroker) -> None:
    """The neighbour's credentials log in, but its ACL does not cover this building's status topic."""
    cfg = secured_site(tmp_path, secured, client_tls(pki), NEIGHBOUR_USER, NEIGHBOUR_PASSWORD)
    got = statuses(list(check_broker(cfg)))
    assert got["broker login"][0] == "ok"
    assert got["broker acl"][0] == "FAIL", got
    assert "safety/c1/b1/status refused: Not authorized" in got["broker acl"][1]


# -- clock -----------------------------------------------------------------------------------------------


def test_doctor_clock() -> None:
    """adjtimex's answer decides: the kernel's TIME_ERROR (5) fails, any other state passes. The kernel's state
    cannot be changed from a test, so its answer is given; the real call must give one of the two."""
    assert check_clock(lambda: 5).status == "FAIL"
    assert check_clock(lambda: 5, development=True).status == "warn"  # mock pins: not a gateway in service
    assert check_clock(lambda: 0).status == "ok"
    assert check_clock().status in ("ok", "FAIL")


# -- disk and database -----------------------------------------------------------------------------------


def test_doctor_disk_ok_and_database_integrity_ok(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null")
    with sqlite3.connect(cfg.storage.path) as db:
        db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, payload TEXT)")
        db.executemany("INSERT INTO events (payload) VALUES (?)", [(f"e{i}",) for i in range(100)])
    before = Path(cfg.storage.path).stat().st_mtime_ns
    got = statuses(list(check_storage(cfg)))
    assert got["disk"][0] == "ok"
    assert got["database"] == ("ok", f"{cfg.storage.path}: integrity_check ok")
    assert Path(cfg.storage.path).stat().st_mtime_ns == before  # opened read-only


def test_doctor_disk_fails_below_min_free(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null", **{"[storage]\n": "[storage]\nmin_free_mb = 1e12\n"})
    got = statuses(list(check_storage(cfg)))
    assert got["disk"][0] == "FAIL"
    assert "below storage.min_free_mb" in got["disk"][1]


def test_doctor_database_fails_when_corrupt(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null")
    Path(cfg.storage.path).write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    got = statuses(list(check_storage(cfg)))
    assert got["database"][0] == "FAIL", got


def test_doctor_database_warns_before_the_first_start(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null")
    assert statuses(list(check_storage(cfg)))["database"][0] == "warn"


# -- service (the passing case needs systemd as init: tests/test_install_rehearsal.py) ----------------------


def test_doctor_service_not_ok_without_systemd() -> None:
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd is init here; tests/test_install_rehearsal.py checks both outcomes")
    check = check_service()
    assert check.status == "warn" and check.fix


# -- device filter (the whole check against a running unit: tests/test_install_rehearsal.py) ---------------


def shipped_device_allow() -> list[str]:
    unit = Path(__file__).resolve().parent.parent / "systemd/gatewayd.service"
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("DeviceAllow=")]


@pytest.mark.parametrize(("major", "names", "grant"), [
    (188, ["ttyUSB"], "char-188 rw"),  # a USB adapter whose driver was loaded at the start
    (188, [], "char-188 rw"),  # ... or not: the number admits it all the same
    (166, [], "char-166 rw"),  # ttyACM
    (204, ["ttyAMA"], "char-204 rw"),  # the PL011 UART
    (4, ["tty", "ttyS"], "char-ttyS rw"),  # the mini UART, by name (built in)
    (240, ["ttySC"], "char-ttySC rw"),  # SC16IS7xx: a dynamic major, by name only
    (240, [], None),  # ... so not when its driver is not loaded
    (189, ["usb_device"], None),  # not a serial port
])
def test_device_grant_follows_systemds_rules_for_the_shipped_unit(major: int, names: list[str],
                                                                 grant: str | None) -> None:
    assert device_grant(major, 0, names, shipped_device_allow()) == grant


def test_device_grant_matches_globs_paths_and_access(tmp_path: Path) -> None:
    assert device_grant(188, 3, ["ttyUSB"], ["char-tty* rw"]) == "char-tty* rw"
    assert device_grant(188, 3, ["ttyUSB"], ["char-ttyUSB r"]) is None  # read-only does not do for a bus
    null = os.stat("/dev/null")
    major, minor = os.major(null.st_rdev), os.minor(null.st_rdev)
    assert device_grant(major, minor, [], ["/dev/null rw"]) == "/dev/null rw"
    assert device_grant(major, minor + 1, [], ["/dev/null rw"]) is None
    assert device_grant(major, minor, [], [f"{tmp_path}/nothing rw", "/dev/nothing rw"]) is None


# -- socket group ----------------------------------------------------------------------------------------


def test_doctor_socket_group_ok_for_root_or_member(tmp_path: Path) -> None:
    cfg = plain_site(tmp_path, "/dev/null")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(cfg.control.socket)
        os.chown(cfg.control.socket, -1, os.getegid())
        assert check_group(cfg).status == "ok"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not system_python_ok(),
                    reason="needs root, setpriv and a system Python 3.11")
def test_doctor_socket_group_fails_for_an_outsider() -> None:
    base = Path(tempfile.mkdtemp(prefix="gateway-doctor-"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o755)
        cfg = plain_site(base, "/dev/null")
        Path(cfg.source).chmod(0o644)
        code = ("import sys; from gateway.config import load_config; from gateway.ops.doctor import check_group; "
                "c = check_group(load_config(sys.argv[1])); print(c.status); print(c.fix)")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(cfg.control.socket)
            os.chown(cfg.control.socket, 0, 0)
            # as nobody, from a copy it can read: the checkout and its venv may be root's alone (a 0700 clone)
            with readable_copy("gateway", "drivers") as readable:
                result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                         SYSTEM_PYTHON, "-c", code, cfg.source], capture_output=True, text=True,
                                        timeout=60, check=False, cwd=readable,
                                        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(readable)})
    finally:
        shutil.rmtree(base)
    assert result.stdout.splitlines()[:1] == ["FAIL"], result.stderr
    assert "usermod -aG root" in result.stdout


# -- beside a running daemon: ask it, never open its port --------------------------------------------------


@pytest.mark.parametrize("address", [1, 7], ids=["answers", "silent"])
def test_doctor_asks_a_running_daemon_for_the_bus(tmp_path: Path, modem: VirtualNullModem,
                                                  broker: MosquittoBroker, address: int) -> None:
    """The simulated detector sits at ``address``; the site polls address 1."""
    cfg = plain_site(tmp_path, modem.gateway_port, broker_port=broker.port)
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
    with simulated_detectors(modem.device_port, [DetectorSpec("gas-u1-h001", "u1-h001", "u1", address)]):
        daemon = subprocess.Popen([GATEWAYD, "--config", cfg.source], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not Daemon(cfg.control.socket, ControlClient).running:
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                assert time.monotonic() < deadline, "the daemon's control socket never answered"
                time.sleep(0.1)
            result = gatewayctl("--config", cfg.source, "doctor", "--json")
        finally:
            daemon.terminate()
            daemon.wait(30)
    checks = {c["name"]: c for c in json.loads(result.stdout)["data"]["checks"]}
    assert checks["gpio"]["detail"] == "mock: 1 pins held by the running daemon"
    serial = checks["serial bus1"]
    if address == 1:
        assert serial["status"] == "ok", serial
        assert serial["detail"] == f"{modem.gateway_port} (asked the running daemon): gas-u1-h001 answers"
    else:
        assert serial["status"] == "FAIL", serial
        assert serial["detail"].startswith(f"{modem.gateway_port} (asked the running daemon): no configured address")
        assert "gatewayctl scan bus1" in serial["fix"]
