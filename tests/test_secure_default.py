"""Secure by default: plain MQTT to a broker that is not on this host is refused at load (docs/mqtt.md, Security)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import EX_CONFIG, ConfigError, is_loopback, load_config
from tests.support.site import build_site

GATEWAYD = str(Path(sys.executable).with_name("gatewayd"))


def site(tmp_path: Path, host: str, extra: str = "") -> Path:
    spec = build_site(bus_port=str(tmp_path / "tty"), db_path=tmp_path / "events.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock", community="c1", building="b1", broker_host=host)
    path = tmp_path / "site.toml"
    path.write_text(spec.toml.replace("[mqtt]\n", f"[mqtt]\n{extra}", 1), encoding="utf-8")
    return path


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.53", "::1", "[::1]", "LOCALHOST."])
def test_loopback_brokers_may_be_plain(tmp_path: Path, host: str) -> None:
    assert is_loopback(host)
    assert load_config(site(tmp_path, host)).mqtt.host == host


@pytest.mark.parametrize("host", ["broker.example", "10.0.0.5", "192.168.1.10", "::ffff:10.0.0.5", "localhost.example"])
def test_plain_mqtt_to_another_host_is_refused_naming_the_key(tmp_path: Path, host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError) as exc:
        load_config(site(tmp_path, host))
    assert exc.value.path == "mqtt.allow_plaintext"
    assert "[mqtt.tls]" in exc.value.reason
    allowed = load_config(site(tmp_path, host, "allow_plaintext = true\n"))
    assert allowed.mqtt.allow_plaintext and not allowed.mqtt.tls


def test_gatewayd_exits_78_with_one_line_naming_the_key(tmp_path: Path) -> None:
    done = subprocess.run([GATEWAYD, "--config", str(site(tmp_path, "broker.example"))], capture_output=True,
                          text=True, timeout=60, env={"GPIOZERO_PIN_FACTORY": "mock", "PATH": "/usr/bin:/bin"})
    assert done.returncode == EX_CONFIG, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(r"gatewayd: config error: line \d+: mqtt.allow_plaintext: ", lines[0]), done.stderr
