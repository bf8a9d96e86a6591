"""Security of the uplink against a real mosquitto: TLS with a CA made at test time, client certificates,
credentials from a private file, and the broker ACL from docs/mqtt.md.

Certificates are made with the ``cryptography`` package (EC P-256, valid for two days) in the test's directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import EX_CONFIG, ConfigError, SiteConfig, load_config
from gateway.panel.process import PanelProcess
from gateway.uplink.contract import command_message, validator
from gateway.uplink.topics import Topics
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import eventually, running_gateway, simulated_detectors, uplink_records
from tests.support.mqtt import MqttRecorder
from tests.support.site import SiteSpec, build_site

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
GATEWAYD = str(Path(sys.executable).with_name("gatewayd"))
GATEWAY_USER, GATEWAY_PASSWORD = "c1/b1", "gw-secret-1"
NEIGHBOUR_USER, NEIGHBOUR_PASSWORD = "c1/b2", "gw-secret-2"
SERVER_USER, SERVER_PASSWORD = "central-server", "srv-secret"


# ------------------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class Authority:
    """A throwaway certificate authority (EC P-256, valid for two days)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256()))
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key, self._key)
        self._cert = cert

    def issue(self, name: str, common_name: str, *, server_names: tuple[str, ...] = (), client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                         else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                  critical=False))
        if server_names:
            names: list[x509.GeneralName] = [
                x509.IPAddress(ipaddress.ip_address(n)) if re.fullmatch(r"[0-9.]+", n) else x509.DNSName(n)
                for n in server_names]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Issued(cert_path, key_path)


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority
    server: Issued
    misnamed_server: Issued
    gateway: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = Authority(base / "ca", "test-ca")
    return Pki(
        ca=ca,
        other_ca=Authority(base / "other", "other-ca"),
        server=ca.issue("broker", "localhost", server_names=("127.0.0.1", "localhost")),
        misnamed_server=ca.issue("misnamed", "broker.invalid", server_names=("broker.invalid",)),
        gateway=ca.issue("gateway", GATEWAY_USER, client=True),
    )


def documented_acl() -> str:
    """The mosquitto ACL exactly as docs/mqtt.md gives it."""
    text = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- acl:mosquitto -->\n```\n(.*?)```", text, re.S)
    assert match, "docs/mqtt.md has no mosquitto ACL block"
    return match.group(1)


def password_file(directory: Path) -> Path:
    path = directory / "passwords"
    for i, (user, password) in enumerate(((GATEWAY_USER, GATEWAY_PASSWORD), (NEIGHBOUR_USER, NEIGHBOUR_PASSWORD),
                                          (SERVER_USER, SERVER_PASSWORD))):
        args = ["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(path), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    return path


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[VirtualNullModem]:
    with VirtualNullModem(tmp_path / "dev") as nm:
        yield nm


def tls_broker(tmp_path: Path, server: Issued, ca: Authority, *, secured: bool = False) -> MosquittoBroker:
    """A broker with a TLS listener that requires a client certificate from ``ca``; with ``secured`` also
    passwords and the documented ACL on every listener."""
    extra: dict[str, Any] = {}
    if secured:
        acl = tmp_path / "acl"
        acl.write_text(documented_acl(), encoding="utf-8")
        extra = {"password_file": password_file(tmp_path), "acl_file": acl, "allow_anonymous": False}
    return MosquittoBroker(tmp_path / "broker", cafile=ca.cert, certfile=server.cert, keyfile=server.key,
                           require_certificate=True, **extra).start()


def site(tmp_path: Path, modem: VirtualNullModem, port: int, *, tls: dict[str, Any] | None,
         credentials: Path | None = None, host: str = "127.0.0.1") -> tuple[SiteSpec, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = build_site(bus_port=modem.gateway_port, db_path=tmp_path / "events.db", broker_port=port,
                      socket_path=tmp_path / "control.sock", community="c1", building="b1", broker_host=host)
    text = spec.toml
    if credentials is not None:
        text = text.replace("[mqtt]\n", f"[mqtt]\ncredentials_file = {json.dumps(str(credentials))}\n", 1)
    if tls is not None:
        text += "\n[mqtt.tls]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls.items())
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return spec, path


def credentials(tmp_path: Path, user: str, password: str, mode: int = 0o600) -> Path:
    path = tmp_path / "mqtt-credentials.toml"
    path.write_text(f"username = {json.dumps(user)}\npassword = {json.dumps(password)}\n", encoding="utf-8")
    path.chmod(mode)
    return path


def client_tls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {"ca_file": str(pki.ca.cert), "cert_file": str(pki.gateway.cert), "key_file": str(pki.gateway.key),
            **overrides}


async def refused(cfg: SiteConfig, broker: MosquittoBroker, mock_pins: Any) -> tuple[PanelProcess, str]:
    """Run a gateway that must not get through: returns it (stopped) and the broker's log of the attempts."""
    before = broker.log_text()
    async with running_gateway(cfg) as gateway:
        await eventually(lambda: gateway.supervisor.beat.get("last_error") is not None
                         and len(broker.log_text()) > len(before), timeout=30)
        await asyncio.sleep(1.5)  # at least one more attempt after the first backoff
        assert not gateway.uplink_connected and gateway.supervisor.beat.get("connections") == 0
    return gateway, broker.log_text()[len(before):]


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol", [5, 311], ids=["mqtt5", "mqtt311"])
async def test_tls_client_certificate_password_and_documented_acl(
    tmp_path: Path, pki: Pki, modem: VirtualNullModem, mock_pins: Any, protocol: int
) -> None:
    broker = tls_broker(tmp_path, pki.server, pki.ca, secured=True)
    server: MqttRecorder | None = None
    try:
        creds = credentials(tmp_path, GATEWAY_USER, GATEWAY_PASSWORD)
        spec, path = site(tmp_path, modem, broker.tls_port, tls=client_tls(pki), credentials=creds)
        path.write_text(path.read_text().replace("[mqtt]\n", f"[mqtt]\nprotocol = {protocol}\n", 1))
        cfg = load_config(path)
        assert cfg.mqtt.protocol == protocol
        assert (cfg.mqtt.tls, cfg.mqtt.username, cfg.mqtt.port) == (True, GATEWAY_USER, broker.tls_port)
        topics = Topics(spec.topic_prefix, spec.community, spec.building)
        server = MqttRecorder(broker.host, broker.port, "safety/#", username=SERVER_USER, password=SERVER_PASSWORD,
                              protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
        detector = spec.detectors[0]
        with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
            async with running_gateway(cfg) as gateway:
                await eventually(lambda: server.messages(topics.birth), timeout=30)
                sims[detector.id].set_concentration(35.0)
                await eventually(lambda: server.messages(topics.event("alarm")), timeout=30)
                silence = command_message("silence", community="c1", building="b1")
                await asyncio.to_thread(server.publish, topics.command("silence"), silence)
                result = await asyncio.to_thread(server.wait_for, lambda m: m.matches(f"{topics.reply}/#"), 30.0)
                assert (result.json["id"], result.json["status"]) == (silence["id"], "accepted")
                await eventually(lambda: gateway.uplink_connected, timeout=10)
        assert validator("availability").is_valid(server.messages(topics.availability)[-1].json)
        assert server.messages(topics.availability)[-1].json["reason"] == "planned stop"
        assert "OpenSSL Error" not in broker.log_since_ready()

        # the documented ACL: a gateway identity reaches only its own subtree
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
        intruder.username_pw_set(GATEWAY_USER, GATEWAY_PASSWORD)
        outcomes: dict[int, str] = {}
        received: list[str] = []
        intruder.on_publish = lambda c, u, mid, rc, p: outcomes.__setitem__(mid, str(rc))
        intruder.on_message = lambda c, u, msg: received.append(msg.topic)
        intruder.connect(broker.host, broker.port)
        intruder.loop_start()
        try:
            intruder.subscribe([("safety/c1/b2/command/#", 1), ("safety/c1/b1/event/#", 1)])
            allowed = intruder.publish("safety/c1/b1/event/test", b"{}", qos=1).mid
            denied = [intruder.publish(t, b"{}", qos=1).mid for t in (
                "safety/c1/b2/event/alarm", "safety/c1/b1/command/silence", "safety/c2/b1/availability",
                "safety/c1/b1/other")]
            await eventually(lambda: len(outcomes) == 5, timeout=10)
            await asyncio.to_thread(server.publish, "safety/c1/b2/command/silence",
                                    command_message("silence", community="c1", building="b2"))
            await asyncio.to_thread(server.wait_for, lambda m: m.topic == "safety/c1/b2/command/silence", 10.0)
            await asyncio.sleep(0.3)
        finally:
            intruder.disconnect()
            intruder.loop_stop()
        assert outcomes[allowed] == "Success"
        assert all(outcomes[mid] == "Not authorized" for mid in denied), outcomes
        assert "safety/c1/b2/command/silence" not in received and "safety/c1/b1/event/test" not in received
        forbidden = {"safety/c1/b2/event/alarm", "safety/c1/b1/command/silence", "safety/c2/b1/availability",
                     "safety/c1/b1/other"}
        assert [m.topic for m in server.messages() if m.topic in forbidden and m.payload == b"{}"] == []
    finally:
        if server is not None:
            server.close()
        broker.stop()


async def test_a_broker_certificate_from_another_ca_is_rejected(
    tmp_path: Path, pki: Pki, modem: VirtualNullModem, mock_pins: Any
) -> None:
    broker = tls_broker(tmp_path, pki.server, pki.ca)
    try:
        recorder = MqttRecorder(broker.host, broker.port, "safety/#")
        _spec, path = site(tmp_path, modem, broker.tls_port, tls=client_tls(pki, ca_file=str(pki.other_ca.cert)))
        gateway, log = await refused(load_config(path), broker, mock_pins)
        assert "CERTIFICATE_VERIFY_FAILED" in str(gateway.supervisor.beat.get("last_error"))
        # the broker saw the handshake fail: "OpenSSL Error[0]: …" and "Client connection … failed: …" both carry
        # the reason (the log may be taken in the middle of the first line)
        assert "alert unknown ca" in log, log
        recorder.close()
        assert recorder.messages() == []  # nothing reached the broker
    finally:
        broker.stop()


async def test_tls_without_ca_file_verifies_against_the_system_cas(
    tmp_path: Path, pki: Pki, modem: VirtualNullModem, mock_pins: Any
) -> None:
    """An [mqtt.tls] table alone still means TLS with verification (here: our test CA is not a system CA)."""
    broker = tls_broker(tmp_path, pki.server, pki.ca)
    try:
        recorder = MqttRecorder(broker.host, broker.port, "safety/#")
        _spec, path = site(tmp_path, modem, broker.tls_port,
                           tls={"cert_file": str(pki.gateway.cert), "key_file": str(pki.gateway.key)})
        cfg = load_config(path)
        assert cfg.mqtt.tls and cfg.mqtt.tls_ca_file is None
        gateway, _log = await refused(cfg, broker, mock_pins)
        # TLS was tried, not plain MQTT
        assert "CERTIFICATE_VERIFY_FAILED" in str(gateway.supervisor.beat.get("last_error"))
        recorder.close()
        assert recorder.messages() == []
    finally:
        broker.stop()


@pytest.mark.slow  # waits out the refused uplink's retries
async def test_a_missing_client_certificate_is_refused_by_the_broker(
    tmp_path: Path, pki: Pki, modem: VirtualNullModem, mock_pins: Any
) -> None:
    broker = tls_broker(tmp_path, pki.server, pki.ca)
    try:
        recorder = MqttRecorder(broker.host, broker.port, "safety/#")
        _spec, path = site(tmp_path, modem, broker.tls_port, tls={"ca_file": str(pki.ca.cert)})
        _gateway, log = await refused(load_config(path), broker, mock_pins)
        assert re.search(r"OpenSSL Error|certificate", log, re.I), log
        recorder.close()
        assert recorder.messages() == []
    finally:
        broker.stop()


async def test_host_name_is_checked_unless_insecure_which_warns_loudly(
    tmp_path: Path, pki: Pki, modem: VirtualNullModem, mock_pins: Any
) -> None:
    broker = tls_broker(tmp_path, pki.misnamed_server, pki.ca)
    try:
        recorder = MqttRecorder(broker.host, broker.port, "safety/#")
        spec, path = site(tmp_path / "strict", modem, broker.tls_port, tls=client_tls(pki))
        strict = load_config(path)
        gateway, _log = await refused(strict, broker, mock_pins)
        last_error = gateway.supervisor.beat.get("last_error")
        assert "mismatch" in str(last_error), last_error
        assert not [e for e in uplink_records(strict) if "INSECURE" in e["event"]]
        assert recorder.messages() == []

        _spec, path = site(tmp_path / "insecure", modem, broker.tls_port, tls=client_tls(pki, insecure=True))
        topics = Topics(spec.topic_prefix, spec.community, spec.building)
        insecure = load_config(path)
        async with running_gateway(insecure):
            await eventually(lambda: recorder.messages(topics.birth), timeout=30)
        logs = uplink_records(insecure)
        warnings = [e for e in logs if e["level"] == "warning" and "INSECURE MQTT TLS" in e["event"]]
        assert len(warnings) == 1, logs
        assert "NOT verified" in warnings[0]["event"]
        recorder.close()
    finally:
        broker.stop()


async def test_plain_mqtt_to_a_remote_broker_is_refused_unless_allowed_and_then_warns(
    tmp_path: Path, modem: VirtualNullModem
) -> None:
    from gateway.config import ConfigError
    from gateway.uplink.mqtt import Uplink
    from gateway.uplink.outbox import Outbox

    _spec, path = site(tmp_path, modem, 1883, tls=None, host="broker.example")
    with pytest.raises(ConfigError) as refusal:
        load_config(path)
    assert refusal.value.path == "mqtt.allow_plaintext", refusal.value
    path.write_text(path.read_text(encoding="utf-8").replace("[mqtt]\n", "[mqtt]\nallow_plaintext = true\n", 1),
                    encoding="utf-8")
    cfg = load_config(path)
    outbox = await Outbox.open(str(tmp_path / "events.db"), gateway_id="c1-b1")
    try:
        with structlog.testing.capture_logs() as logs:
            Uplink(cfg.mqtt, outbox, Topics("safety", "c1", "b1"))  # never run: no traffic leaves the host
        assert any(e["log_level"] == "warning" and "MQTT WITHOUT TLS" in e["event"] for e in logs), logs
        with structlog.testing.capture_logs() as logs:
            Uplink(dataclasses.replace(cfg.mqtt, host="127.0.0.1"), outbox, Topics("safety", "c1", "b1"))
        assert not any("WITHOUT TLS" in e["event"] for e in logs), logs
    finally:
        await outbox.close()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_credentials_readable_by_others_are_refused_with_exit_78(tmp_path: Path, modem: VirtualNullModem,
                                                                  mode: int) -> None:
    creds = credentials(tmp_path, GATEWAY_USER, GATEWAY_PASSWORD, mode=mode)
    _spec, path = site(tmp_path, modem, 1883, tls=None, credentials=creds)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.path == "mqtt.credentials_file"
    assert f"{mode:04o}" in exc.value.reason and "chmod 600" in exc.value.reason
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
    run = subprocess.run([GATEWAYD, "--config", str(path), "--duration", "5"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == EX_CONFIG, run.stderr
    assert "mqtt.credentials_file" in run.stderr
    assert GATEWAY_PASSWORD not in run.stderr + run.stdout


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_credentials_are_read(tmp_path: Path, modem: VirtualNullModem, mode: int) -> None:
    creds = credentials(tmp_path, GATEWAY_USER, GATEWAY_PASSWORD, mode=mode)
    _spec, path = site(tmp_path, modem, 1883, tls=None, credentials=creds)
    cfg = load_config(path)
    assert (cfg.mqtt.username, cfg.mqtt.password) == (GATEWAY_USER, GATEWAY_PASSWORD)
    assert stat.S_IMODE(creds.stat().st_mode) == mode

