"""Test support: a private mosquitto broker, an MQTT recorder and a polling wait helper."""

from tests.support.broker import BrokerError, MosquittoBroker
from tests.support.mqtt import MqttRecorder, RecordedMessage
from tests.support.wait import wait_until

__all__ = ["BrokerError", "MosquittoBroker", "MqttRecorder", "RecordedMessage", "wait_until"]
