"""``gatewayctl config check`` and ``gatewayctl doctor`` against real peers.

Each doctor check has a test that makes it pass and one that makes it fail: a real mosquitto (with TLS, a
password file and an ACL, tests/support/broker.py), a real pseudo-terminal with pymodbus's server behind it
(drivers/simulated.py), mock pins, real SQLite files and the real ``gatewayctl`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from tests.support.site import build_site

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
GATEWAYCTL = str(Path(sys.executable).with_name("gatewayctl"))


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
    assert result.stderr.startswith("gatewayctl: config error: buses[1].port: port ")
    checked = gatewayctl("config", "check", "--json", str(site))
    assert json.loads(checked.stdout)["data"]["path"] == "buses[1].port"
