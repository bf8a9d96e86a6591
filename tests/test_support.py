"""Tests of the test support: broker lifecycle, MQTT recorder, wait helper, fixtures."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import broker as broker_module
from tests.support.broker import BrokerError, MosquittoBroker
from tests.support.mqtt import MqttRecorder
from tests.support.wait import wait_until


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def test_broker_restart_keeps_port_and_recorder_reconnects(broker, mqtt_recorder_factory):
    subscriber = mqtt_recorder_factory(broker, "site/+/events")
    publisher = mqtt_recorder_factory(broker, "unused/topic")
    port = broker.port

    publisher.publish("site/a/events", {"seq": 1})
    first = subscriber.wait_for(lambda m: m.json == {"seq": 1})
    assert first.topic == "site/a/events"

    connections = subscriber.connect_count
    broker.restart()
    assert broker.is_running
    assert broker.port == port
    subscriber.wait_connected(min_connections=connections + 1)

    publisher.publish("site/a/events", {"seq": 2})
    second = subscriber.wait_for(lambda m: m.json == {"seq": 2})
    assert second.index > first.index
    assert [m.json["seq"] for m in subscriber.messages("site/#")] == [1, 2]
    assert broker.log_text().count("starting") >= 2


def test_stop_kill_and_start_again_on_same_port(broker):
    port = broker.port
    broker.stop()
    assert not broker.is_running
    assert not _accepts_tcp(broker.host, port)

    broker.start()
    assert broker.is_running and broker.port == port
    assert _accepts_tcp(broker.host, port)

    broker.kill()
    assert not broker.is_running
    broker.start()
    assert broker.port == port
    with MqttRecorder(broker.host, broker.port, "x") as recorder:
        recorder.publish("x", b"after kill")
        assert recorder.wait_for(lambda m: m.topic == "x").payload == b"after kill"


def test_start_retries_when_probed_port_is_taken(tmp_path, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = broker_module.free_port
        offered: list[int] = []

        def first_taken(host: str = "127.0.0.1") -> int:
            port = taken if not offered else real_free_port(host)
            offered.append(port)
            return port

        monkeypatch.setattr(broker_module, "free_port", first_taken)
        with MosquittoBroker(tmp_path) as instance:
            assert offered[0] == taken
            assert instance.port != taken
            assert _accepts_tcp(instance.host, instance.port)


def test_pinned_port_in_use_fails_with_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        instance = MosquittoBroker(tmp_path, port=squatter.getsockname()[1], start_timeout=0.5)
        with pytest.raises(BrokerError, match="did not become free"):
            instance.start()
        assert not instance.is_running


def test_wait_for_raises_on_timeout(broker, mqtt_recorder_factory):
    recorder = mqtt_recorder_factory(broker, "a/#")
    recorder.publish("a/1", b"one")
    recorder.wait_for(lambda m: m.topic == "a/1")
    with pytest.raises(AssertionError, match="timed out"):
        recorder.wait_for(lambda m: m.topic == "a/never", timeout=0.2)
    with pytest.raises(AssertionError, match="got 1"):
        recorder.wait_for_count(lambda m: m.topic.startswith("a/"), 2, timeout=0.2)


def test_recorder_records_payload_details(broker, mqtt_recorder_factory):
    recorder = mqtt_recorder_factory(broker, ["json/#", "raw/#"])
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("site", "b12")
    props.ContentType = "application/json"
    recorder.publish("json/alarm", {"level": "fire"}, properties=props)
    recorder.publish("raw/blob", b"\xff\x00", retain=True)
    recorder.publish("ignored/topic", b"x")

    messages = recorder.wait_for_count(None, 2)
    alarm = recorder.wait_for(lambda m: m.topic == "json/alarm")
    assert alarm.json == {"level": "fire"} and alarm.is_json
    assert alarm.user_properties == {"site": "b12"}
    assert alarm.properties["ContentType"] == "application/json"
    assert alarm.qos == 1 and not alarm.retain
    blob = recorder.wait_for(lambda m: m.topic == "raw/blob")
    assert blob.payload == b"\xff\x00" and blob.json is None and not blob.is_json
    assert [m.topic for m in recorder.messages("raw/+")] == ["raw/blob"]
    assert {m.topic for m in messages} <= {"json/alarm", "raw/blob"}

    # A late subscriber gets the retained message with the retain flag set.
    late = mqtt_recorder_factory(broker, "raw/#", protocol=mqtt.MQTTv311)
    retained = late.wait_for(lambda m: m.topic == "raw/blob")
    assert retained.retain and retained.payload == b"\xff\x00"
    late.clear()
    assert late.messages() == []


def test_recorder_fails_clearly_without_broker(tmp_path):
    port = broker_module.free_port()
    with pytest.raises(AssertionError, match="not connected"):
        MqttRecorder("127.0.0.1", port, "#", connect_timeout=0.5)


def test_wait_until_returns_value_and_raises_with_message():
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=5) == 7
    with pytest.raises(AssertionError, match="row never appeared"):
        wait_until(lambda: False, timeout=0.1, message="row never appeared")
    with pytest.raises(AssertionError, match="pin is 0"):
        wait_until(lambda: None, timeout=0.1, message=lambda: "pin is 0")


def test_mock_pins_fixture_installs_fresh_factory(mock_pins):
    from gpiozero import LED, Device

    assert Device.pin_factory is mock_pins
    led = LED(17)
    try:
        led.on()
        assert mock_pins.pin(17).state
    finally:
        led.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(directory: Path) -> None:
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=directory)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=directory)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_listener_with_client_certificates(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certificates(certs)
    with MosquittoBroker(
        tmp_path / "broker",
        cafile=certs / "ca.crt",
        certfile=certs / "server.crt",
        keyfile=certs / "server.key",
        require_certificate=True,
    ) as instance:
        assert instance.tls_port != instance.port
        with MqttRecorder(
            instance.host,
            instance.tls_port,
            "secure/#",
            ca_certs=str(certs / "ca.crt"),
            certfile=str(certs / "client.crt"),
            keyfile=str(certs / "client.key"),
        ) as recorder:
            recorder.publish("secure/ping", b"tls")
            assert recorder.wait_for(lambda m: m.topic == "secure/ping").payload == b"tls"
        with pytest.raises(AssertionError, match="not connected"):
            MqttRecorder(instance.host, instance.tls_port, "#", ca_certs=str(certs / "ca.crt"),
                         connect_timeout=1.0)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_password_and_acl_files(tmp_path):
    passwords = tmp_path / "passwd"
    passwords.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "gw", "secret"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("user gw\ntopic readwrite gw/#\n")
    with MosquittoBroker(
        tmp_path / "broker", password_file=passwords, acl_file=acl, allow_anonymous=False
    ) as instance:
        with MqttRecorder(instance.host, instance.port, "gw/#", username="gw", password="secret") as rec:
            rec.publish("gw/state", b"ok")
            assert rec.wait_for(lambda m: m.topic == "gw/state").payload == b"ok"
        with pytest.raises(AssertionError, match="not connected"):
            MqttRecorder(instance.host, instance.port, "#", username="gw", password="wrong",
                         connect_timeout=1.0)
