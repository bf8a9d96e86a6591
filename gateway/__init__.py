"""Building safety gateway: detectors → alarm core → buzzer, and → SQLite outbox → MQTT."""

__version__ = "0.1.0"
__all__ = ["__version__"]
