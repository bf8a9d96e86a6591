"""Site configuration: TOML → a typed, validated site model.

Everything is checked before anything starts. Each table of the file is a msgspec struct (its keys, types,
bounds and defaults; rules across keys in its ``__post_init__``), read by :func:`_read`; rules that need other
tables (a known unit, a free pin, a bus's cycle) are checked in code beside them. Every error names the key
path (``devices[3].address``) and the reason; :class:`ConfigError` carries both, and from a file also the
line and the id of the device, household, unit, bus or relay it is in. One check reports every error it finds
(:class:`ConfigErrors`, at most :data:`MAX_ERRORS` shown): a table with an error is left out and the next one
is read. An unknown key close to a known one gets a hint (``did you mean `address`?``). ``gatewayd`` exits 78
(EX_CONFIG) on it and ``gatewayctl config check`` exits 1 with the same lines.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import msgspec
from msgspec import inspect as mi

from drivers.profiles import (
    BUILTIN_DETECTOR_PROFILES,
    BUILTIN_STATION_PROFILES,
    DetectorProfile,
    ProfileError,
    StationProfile,
    parse_detector_profile,
    parse_station_profile,
)
from drivers.profiles import toml_type_name as _typename
from drivers.wire import DEFAULT_TURNAROUND_S, LineFormat
from drivers.wire import bus_floor_s as wire_floor_s
from gateway.validation import Problem, convert

__all__ = [
    "CONTACT_KINDS",
    "EX_CONFIG",
    "MODBUS_KINDS",
    "AlarmSettings",
    "BusConfig",
    "ConfigError",
    "ConfigErrors",
    "ControlConfig",
    "DeviceConfig",
    "HouseholdConfig",
    "LinkageRule",
    "MqttConfig",
    "OutputPin",
    "OutputsConfig",
    "RelayConfig",
    "RuntimeConfig",
    "SiteConfig",
    "SmsConfig",
    "StorageConfig",
    "TransmissionConfig",
    "UnitConfig",
    "bus_floor_s",
    "bus_floor_warnings",
    "is_loopback",
    "load_config",
    "parse_config",
    "parse_endpoint",
    "real_port",
]

EX_CONFIG = 78
#: Longest poll cycle of a bus: a detector's alarm reaches the gateway within 30 s (GB/T 45839 §5.4.1).
MAX_POLL_CYCLE_S = 30.0

#: Device kinds polled over a Modbus RTU bus.
MODBUS_KINDS = frozenset({"gas_detector", "extinguisher_station"})
#: Device kinds wired as a dry contact to a GPIO pin.
CONTACT_KINDS = frozenset(
    {"gas_relay", "fire_contact", "extinguisher_presence", "pressure_switch", "cabinet_door", "obstruction"}
)
DeviceKind = Literal["cabinet_door", "extinguisher_presence", "extinguisher_station", "fire_contact", "gas_detector",
                     "gas_relay", "obstruction", "pressure_switch"]
ALL_KINDS = frozenset(get_args(DeviceKind))
assert ALL_KINDS == MODBUS_KINDS | CONTACT_KINDS

#: Signals a linkage rule may react to.
LinkageSignal = Literal["any_alarm", "fault", "fire", "gas_high", "gas_low", "supervisory"]
LINKAGE_SIGNALS = frozenset(get_args(LinkageSignal))

#: Default gas alarm thresholds per measuring unit (low, high, clearing hysteresis).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "%LEL": (10.0, 25.0, 2.0),
    "ppm": (50.0, 150.0, 10.0),
    "%VOL": (0.5, 1.25, 0.1),
}
GAS_UNITS: dict[str, str] = {"CH4": "%LEL", "LPG": "%LEL", "H2": "%LEL", "CO": "ppm"}
#: Upper limits of the set-points per measuring unit: (level 1, level 2, why).
THRESHOLD_CAPS: dict[str, tuple[float | None, float, str]] = {
    "%LEL": (25.0, 50.0, "GB/T 50493-2019"),
    "%VOL": (None, 100.0, "a volume fraction"),
    "ppm": (None, 10_000.0, "1 %VOL; use %VOL above it"),
}


#: Most errors one check shows; the rest are counted.
MAX_ERRORS = 20


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``line`` (in the file) and ``where`` (``device gas-u1-101``) are set when it came from :func:`load_config`.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.line: int | None = None
        self.where: str | None = None

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        text = f"{self.path}{where}: {self.reason}"
        return f"line {self.line}: {text}" if self.line is not None else text

    def lines(self) -> list[str]:
        """One line per error, as a person reads them."""
        return [str(self)]


class ConfigErrors(ConfigError):
    """Several configuration errors found in one pass; ``path`` and ``reason`` are the first one's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].path, errors[0].reason)
        self.errors = errors

    def __str__(self) -> str:
        """The first error and how many more (one line, for a summary); :meth:`lines` has them all."""
        more = len(self.errors) - 1
        return f"{self.errors[0]} (and {more} more error{'s' if more > 1 else ''})"

    def lines(self) -> list[str]:
        shown = [str(e) for e in self.errors[:MAX_ERRORS]]
        if len(self.errors) > MAX_ERRORS:
            shown.append(f"… and {len(self.errors) - MAX_ERRORS} more errors (the first {MAX_ERRORS} are shown)")
        return shown


#: The errors of the check running in this context (None: raise the first one at once).
_collected: ContextVar[list[ConfigError] | None] = ContextVar("config_errors", default=None)
_T = TypeVar("_T")


def _record(errors: list[ConfigError]) -> None:
    """Keep ``errors`` for the report of the check running now; without one, raise the first."""
    collected = _collected.get()
    if collected is None:
        raise errors[0]
    collected.extend(errors)


def _part(parse: Callable[[], _T], fallback: _T) -> _T:
    """``parse()``; on an error, record it and go on with ``fallback`` so later parts are checked too."""
    try:
        return parse()
    except ConfigError as exc:
        _record([exc])
        return fallback


def _hint(key: str, known: Iterable[str]) -> str:
    """"; did you mean `address`?" for a key one or two letters off a known one ("" when none is close)."""
    import difflib  # only for a refused site: not loaded into every process, for memory

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return f"; did you mean `{close[0]}`?" if close else ""


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class UnitConfig:
    """A unit (one stairwell) of the building."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class HouseholdConfig:
    """A household in a unit."""

    id: str
    unit: str
    name: str


@dataclass(frozen=True, slots=True)
class BusConfig:
    """One RS-485 serial bus, owned by one thread."""

    id: str
    port: str
    baudrate: int
    parity: Literal["N", "E", "O"]
    stopbits: int
    bytesize: int
    timeout_s: float
    poll_interval_s: float


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A detector or station: on a bus (``bus``/``address``/``profile``) or on a GPIO pin."""

    id: str
    kind: str
    name: str
    unit: str
    household: str | None
    bus: str | None = None
    address: int | None = None
    detector_profile: DetectorProfile | None = None
    station_profile: StationProfile | None = None
    gas: str | None = None
    measure: str | None = None
    low: float | None = None
    high: float | None = None
    hysteresis: float | None = None
    pin: str | None = None
    contact: Literal["NO", "NC"] = "NO"
    pull_up: bool = True
    bounce_ms: int = 50
    supervision_pin: str | None = None
    door_open_s: float | None = None  # cabinet door / station: overrides [alarm] door_open_s
    #: A channel of a multi-channel controller: the controller's ``[[devices]]`` id and the channel number
    #: (the device's id is ``<controller>.ch<channel>``, its profile that channel's registers).
    controller: str | None = None
    channel: int | None = None

    @property
    def is_modbus(self) -> bool:
        """Whether the device is polled over a bus."""
        return self.bus is not None

    @property
    def scope(self) -> tuple[str, str | None]:
        """(unit, household) the device belongs to."""
        return self.unit, self.household


@dataclass(frozen=True, slots=True)
class OutputPin:
    """A GPIO output."""

    pin: str
    active_high: bool = True


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A relay output (gas valve, exhaust fan, ...)."""

    id: str
    pin: str
    active_high: bool = True
    name: str = ""


@dataclass(frozen=True, slots=True)
class OutputsConfig:
    """Buzzer, optional LEDs and relays."""

    buzzer: OutputPin
    leds: dict[str, OutputPin] = field(default_factory=dict)
    relays: tuple[RelayConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkageRule:
    """Drive ``output`` while ``signal`` is active anywhere in ``scope`` (``building``, ``unit:ID``, ...)."""

    signal: str
    scope: str
    output: str


@dataclass(frozen=True, slots=True)
class AlarmSettings:
    """Alarm rules: fault detection, supervisory timing, telemetry."""

    offline_after_failures: int = 3
    offline_ceiling_s: float = 100.0
    #: Good polls in a row before an offline fault clears: a flaky device must not flap its fault.
    offline_clear_polls: int = 3
    #: ``comms_degraded``: raised when more than ``degraded_percent`` of a device's last
    #: ``degraded_window_polls`` polls failed; cleared after a whole window with at most
    #: ``degraded_clear_percent`` failed (docs/alarms.md, "Communication faults").
    degraded_window_polls: int = 50
    degraded_percent: float = 20.0
    degraded_clear_percent: float = 5.0
    door_open_s: float = 120.0
    trouble_chirp_interval_s: float = 45.0
    telemetry_interval_s: float = 60.0
    telemetry_deadband: float = 1.0
    walk_test_s: float = 300.0


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Uplink to the central server's broker."""

    host: str = "localhost"
    port: int = 1883
    client_id: str = ""
    topic_prefix: str = "safety"
    protocol: Literal[5, 311] = 5
    keepalive_s: int = 30
    max_inflight: int = 32
    status_interval_s: float = 60.0
    tls: bool = False  # an [mqtt.tls] table is present: TLS with the broker's certificate verified
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False
    credentials_file: str | None = None
    username: str | None = None
    password: str | None = None
    allow_plaintext: bool = False
    """Plain MQTT to a broker that is not on this host: refused at load unless the site sets this."""
    hosts: tuple[str, ...] = ()
    """Nodes of one broker cluster, ``"host:port"`` each, tried in turn (docs/config.md, ``[mqtt]``). When set,
    it is the list of nodes and ``host``/``port`` are its first; empty: the one node ``host:port``."""

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` of every node, in the order they are tried first."""
        if not self.hosts:
            return ((self.host, self.port),)
        return tuple(parse_endpoint(h, 8883 if self.tls else 1883) for h in self.hosts)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """SQLite outbox and history."""

    path: str = "/var/lib/gateway/events.db"
    max_mb: float = 64.0
    min_free_mb: float = 50.0
    history_days: float = 30.0
    history_min_events: int = 999
    telemetry_batch_s: float = 0.5
    memory_events: int = 10_000


DEFAULT_SOCKET = "/run/gateway/control.sock"
#: The shipped example as scripts/install.sh copies it, beside the virtualenv (/opt/gateway/share/...): the unit
#: passes it to ``gatewayd --unedited-example``, and an installed gateway has no checkout's examples/ to read.
INSTALLED_EXAMPLE = Path(sys.prefix).parent / "share" / "building.example.toml"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Local control socket for ``gatewayctl``: ``group`` may connect and read (status, events, read,
    config_show); ``operator_group`` may also act (silence, reset, test, buzzer_test, relay_test, scan,
    rebirth). Root and the daemon's own user are always operators (docs/cli.md, "Permissions")."""

    socket: str = DEFAULT_SOCKET
    group: str | None = None
    operator_group: str | None = None


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Process tuning for the real-time path."""

    realtime_priority: int = 0
    gc_freeze: bool = True
    #: gpiozero backend: "lgpio" on a Pi (/dev/gpiochip*), "mock" off one (drivers/gpio.py, docs/config.md).
    pin_factory: str = "lgpio"


@dataclass(frozen=True, slots=True)
class TransmissionConfig:
    """Supervision of the path to the central server (``[transmission]``, docs/alarms.md "Transmission")."""

    #: An alarm, supervisory or fault event without its PUBACK for this long raises the ``transmission`` fault
    #: (EN 54-21 allows at most 100 s).
    ack_deadline_s: float = 20.0
    #: The broker unreachable (or the uplink process away) for this long raises it with nothing waiting.
    path_down_s: float = 90.0


#: Longest ``transmission.ack_deadline_s``: EN 54-21's limit for the receiving end's acknowledgement.
MAX_ACK_DEADLINE_S = 100.0
SmsMode = Literal["fallback", "always"]
SmsLanguage = Literal["zh", "en"]
SMS_MODES, SMS_LANGUAGES = get_args(SmsMode), get_args(SmsLanguage)


@dataclass(frozen=True, slots=True)
class SmsConfig:
    """The second path: SMS through a cellular modem (``[sms]``, docs/config.md "SMS")."""

    device: str
    contacts: str
    #: ``fallback``: an alarm goes by SMS when it has no PUBACK after ``after_s`` or the transmission fault is
    #: present; ``always``: every alarm also goes by SMS at once.
    mode: str = "fallback"
    after_s: float = 30.0
    language: str = "zh"
    #: SMS per recipient per hour beyond which later messages are held back (never an alarm's first).
    max_per_hour: int = 10
    pin: str | None = None
    queue: str = "/var/lib/gateway/sms.db"
    #: Gammu's connection name (``at`` plus an optional speed, e.g. ``at115200``).
    connection: str = "at115200"
    #: How often the modem's health (SIM, registration, signal) is read.
    check_interval_s: float = 30.0
    #: The SMS centre's number when the SIM does not hold one.
    smsc: str | None = None


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """The whole validated site: building → units → households → devices, and how to reach the server."""

    community: str
    building: str
    gateway_id: str
    units: tuple[UnitConfig, ...]
    households: tuple[HouseholdConfig, ...]
    buses: tuple[BusConfig, ...]
    devices: tuple[DeviceConfig, ...]
    outputs: OutputsConfig
    linkage: tuple[LinkageRule, ...]
    alarm: AlarmSettings
    mqtt: MqttConfig
    storage: StorageConfig
    control: ControlConfig
    runtime: RuntimeConfig
    source: str = ""
    transmission: TransmissionConfig = field(default_factory=TransmissionConfig)
    sms: SmsConfig | None = None
    """The second path (``[sms]``); None when no modem is configured."""

    def device(self, device_id: str) -> DeviceConfig:
        """The device with this id (KeyError if none)."""
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise KeyError(device_id)

    def bus_devices(self, bus_id: str) -> list[DeviceConfig]:
        """Devices polled on one bus, in config order."""
        return [d for d in self.devices if d.bus == bus_id]


# --------------------------------------------------------------------------------------------- reader


#: A table of the file as a msgspec struct: unknown keys are read by :func:`_read` (all of them, with hints).
class _Shape(msgspec.Struct, kw_only=True):
    pass


_S = TypeVar("_S", bound=_Shape)
#: Text: not empty, not only blanks. Id: letters, digits, '-', '_' and '.'.
Text = Annotated[str, msgspec.Meta(pattern=r"\S")]
Ident = Annotated[str, msgspec.Meta(pattern=r"^[\w.-]+$")]


def _read(data: Any, path: str, kind: type[_S], *, known_only: bool = False) -> _S:
    """The table ``data`` at ``path`` as struct ``kind`` (its types, bounds and defaults); a wrong value raises
    its :class:`ConfigError`, an unknown key is recorded (with a hint when it is close to a key the table lacks).
    ``known_only``: read the keys ``kind`` has and leave the others to a later read."""
    if not isinstance(data, Mapping):
        raise ConfigError(path or "<root>", f"must be a table, got {_typename(data)}")
    known = set(kind.__struct_encode_fields__)
    for name, value in data.items():  # inf and nan would pass a one-sided bound
        if isinstance(value, float) and not math.isfinite(value) and name in known:
            raise ConfigError(_key(path, name), "must be a finite number")
    try:
        table = convert(data, kind)
    except Problem as problem:
        raise _config_error(problem, path, data, known) from None
    if not known_only:
        _record_unknown(data, path, kind)
    return table


def _record_unknown(data: Mapping[str, Any], path: str, kind: type[_Shape]) -> None:
    """Record every key of ``data`` that ``kind`` lacks, with a hint when it is close to one ``data`` lacks."""
    known = set(kind.__struct_encode_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        absent = known - set(data)
        _record([ConfigError(_key(path, k), f"unknown key{_hint(k, absent)}") for k in unknown])


def _key(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _config_error(problem: Problem, path: str, data: Mapping[str, Any], known: set[str]) -> ConfigError:
    """msgspec's refusal in the site file's words: the key path and the reason."""
    where = path
    for part in problem.path:
        where = _key(where, part)
    name = problem.path[-1] if problem.path else ""
    value = problem.value
    expected = problem.expected
    if isinstance(expected, mi.UnionType):
        expected = next((t for t in expected.types if not isinstance(t, mi.NoneType)), expected)
    if problem.kind == "missing":
        import difflib

        typo = difflib.get_close_matches(str(name), sorted(set(data) - known), n=1, cutoff=0.8)
        if typo and len(problem.path) == 1:  # `adress = 5`: the typo is the error, not the missing key
            return ConfigError(_key(path, typo[0]), f"unknown key{_hint(typo[0], [str(name)])}")
        return ConfigError(where, "is required")
    if problem.kind == "rule":  # a struct's own rule: "key: reason" or the table's reason
        key, _, reason = problem.text.partition(": ")
        if key in known and reason:
            return ConfigError(_key(where, key), reason)
        return ConfigError(where, problem.text)
    if isinstance(expected, mi.LiteralType):
        listed = ", ".join(repr(c) for c in expected.values)
        return ConfigError(where, f"must be one of {listed}, got {value!r}")
    if isinstance(expected, mi.StrType):
        if problem.kind == "type":
            return ConfigError(where, f"must be a string, got {_typename(value)}")
        if not str(value).strip():
            return ConfigError(where, "must not be empty")
        return ConfigError(where, f"{value!r} may contain only letters, digits, '-', '_' and '.'")
    if problem.kind == "bound" and isinstance(expected, mi.IntType | mi.FloatType):
        lo = expected.ge if expected.ge is not None else expected.gt
        if lo is not None and value < lo:
            return ConfigError(where, f"must be ≥ {lo:g}, got {value:g}")
        return ConfigError(where, f"must be ≤ {expected.le:g}, got {value:g}")
    nouns: dict[type[mi.Type], str] = {mi.IntType: "an integer", mi.FloatType: "a number", mi.BoolType: "true or false"}
    noun = None if expected is None else nouns.get(type(expected))
    if noun is not None:
        return ConfigError(where, f"must be {noun}, got {_typename(value)}")
    return ConfigError(where, f"must be a table, got {_typename(value)}")


#: Physical pin of the 40-pin header (BOARDn, J8:n) → BCM GPIO number; the others are power and ground.
_HEADER_TO_BCM: dict[int, int] = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10, 21: 9, 22: 25,
    23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19, 36: 16, 37: 26, 38: 20, 40: 21,
}
#: Serial ports on the SoC's primary UART, which takes GPIO14 (TXD) and GPIO15 (RXD).
_UART_PORTS = frozenset({"/dev/serial0", "/dev/ttyAMA0", "/dev/ttyS0"})


def _pin(value: Any, key: str) -> str | None:
    """A GPIO pin (None: not given) at ``key``, normalised to ``GPIOn`` so two spellings of one pin are seen as one.

    Accepted: a BCM number (``17``), ``"GPIO17"``, ``"BCM17"``, ``"17"``, or a header pin ``"BOARD11"``/``"J8:11"``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().upper()
        for prefix in ("GPIO", "BCM", ""):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                value = int(text[len(prefix):])
                break
        else:
            for prefix in ("BOARD", "J8:"):
                if text.startswith(prefix) and text[len(prefix):].isdigit():
                    header = int(text[len(prefix):])
                    if header not in _HEADER_TO_BCM:
                        raise ConfigError(key, f"header pin {header} is not a GPIO (power, ground or out of 1–40)")
                    value = _HEADER_TO_BCM[header]
                    break
            else:
                raise ConfigError(key, f"{value!r} is not a pin: use a BCM number (17) or 'GPIO17', 'BOARD11'")
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 53:
            raise ConfigError(key, f"BCM pin must be 0–53, got {value}")
        return f"GPIO{value}"
    raise ConfigError(key, f"must be a BCM pin number or pin name, got {_typename(value)}")


# --------------------------------------------------------------------------------------------- parse


def load_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a site config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), f"cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"invalid TOML: {exc}") from None
    try:
        return parse_config(data, source=str(p), base_dir=p.parent)
    except ConfigError as exc:
        lines = key_lines(text)
        for error in getattr(exc, "errors", [exc]):
            error.line = _line_of(error.path, lines)
            error.where = _owner(error.path, data)
        raise


#: ``[table]`` / ``[[array.of.tables]]`` and ``key = value`` lines (bare or quoted keys, dotted).
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _key_parts(text: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)]


def key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each table and key in a TOML text, by key path as errors name them
    (``devices[3].address``, ``mqtt.tls``; an array of tables also by its own path, at its first entry). Lines
    inside multi-line strings are skipped."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}  # array of tables (by its path) → tables so far
    table = ""
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header:
            parts = _key_parts(header.group(2))
            path = ""
            for i, part in enumerate(parts):
                path = f"{path}.{part}" if path else part
                if i == len(parts) - 1 and header.group(1) == "[[":  # a new entry of this array
                    lines.setdefault(path, number)  # the array itself, as an unknown array is named
                    counts[path] = counts.get(path, 0) + 1
                    path = f"{path}[{counts[path] - 1}]"
                elif path in counts:  # within the array's latest entry
                    path = f"{path}[{counts[path] - 1}]"
            table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = ".".join([table, *_key_parts(key.group(1))] if table else _key_parts(key.group(1)))
            lines.setdefault(path, number)
            rest = line[key.end():]
            for quotes in ('"""', "'''"):
                if rest.count(quotes) % 2 == 1:
                    in_string = quotes
    return lines


def _line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``path``, else of the nearest table or key above it that the file has."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


#: Arrays of tables whose entries have an ``id``, and what a person calls one.
_OWNERS = {"devices": "device", "households": "household", "units": "unit", "buses": "bus",
           "outputs.relays": "relay"}


def _owner(path: str, data: Mapping[str, Any]) -> str | None:
    """``device gas-u1-101`` for a path in ``devices[n]`` that has an id; None elsewhere."""
    for array, noun in _OWNERS.items():
        match = re.match(re.escape(array) + r"\[(\d+)\]", path)
        if match is None:
            continue
        items: Any = data
        for part in array.split("."):
            items = items.get(part) if isinstance(items, Mapping) else None
        index = int(match.group(1))
        if isinstance(items, list) and index < len(items) and isinstance(items[index], Mapping):
            ident = items[index].get("id")
            if isinstance(ident, str) and ident:
                return f"{noun} {ident}"
    return None


def parse_config(data: Mapping[str, Any], *, source: str = "", base_dir: Path | None = None) -> SiteConfig:
    """Validate a parsed TOML document into a :class:`SiteConfig`; raises the one :class:`ConfigError` or
    :class:`ConfigErrors` with every error found."""
    errors: list[ConfigError] = []
    token = _collected.set(errors)
    try:
        cfg = _part(lambda: _parse_site(data, source, base_dir or Path.cwd()), None)
    finally:
        _collected.reset(token)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    assert cfg is not None
    return cfg


class _SiteFile(_Shape, kw_only=True):
    """The file's top-level tables, each read by its own part."""

    site: Any = None
    units: Any = None
    households: Any = None
    buses: Any = None
    profiles: Any = None
    alarm: Any = None
    devices: Any = None
    outputs: Any = None
    linkage: Any = None
    mqtt: Any = None
    storage: Any = None
    control: Any = None
    runtime: Any = None
    transmission: Any = None
    sms: Any = None


class _SiteTable(_Shape, kw_only=True):
    community: Ident
    building: Ident
    gateway_id: Ident | None = None


def _parse_site(data: Mapping[str, Any], source: str, base: Path) -> SiteConfig | None:
    """Every part of the site, each checked even when an earlier one had errors (None then)."""
    top = _read(data, "", _SiteFile, known_only=True)  # its unknown keys are reported last
    root = data

    def ids() -> tuple[str, str, str]:
        if top.site is None:
            raise ConfigError("site", "is required")
        site = _read(top.site, "site", _SiteTable)
        return site.community, site.building, site.gateway_id or f"{site.community}-{site.building}"

    community, building, gateway_id = _part(ids, ("", "", ""))
    units: tuple[UnitConfig, ...] = _part(lambda: _parse_units(root), ())
    households: tuple[HouseholdConfig, ...] = _part(
        lambda: _parse_households(root, {u.id for u in units} | _written_ids(data, "units")), ())
    buses: tuple[BusConfig, ...] = _part(lambda: _parse_buses(root), ())
    detector_profiles, station_profiles = _part(
        lambda: _parse_profiles(root), (dict(BUILTIN_DETECTOR_PROFILES), dict(BUILTIN_STATION_PROFILES)))
    alarm = _part(lambda: _parse_alarm(root), AlarmSettings())
    devices: tuple[DeviceConfig, ...] = _part(
        lambda: _parse_devices(root, units, households, buses, detector_profiles, station_profiles), ())
    outputs = _part(lambda: _parse_outputs(root), None)
    paths = {kind: _id_paths(data, kind) for kind in ("devices", "buses")}
    if outputs is not None:
        _part(lambda: _check_pins(devices, outputs, buses, paths), None)
    _part(lambda: _check_bus_cycles(buses, devices, paths["buses"]), None)
    linkage: tuple[LinkageRule, ...] = ()
    if outputs is not None:
        linkage = _part(lambda: _parse_linkage(root, units, households, outputs), ())
    mqtt = _part(lambda: _parse_mqtt(root, base, default_client_id=gateway_id), MqttConfig())
    storage = _part(lambda: _parse_storage(root, base), StorageConfig())
    control = _part(lambda: _parse_control(root, base), ControlConfig())
    runtime = _part(lambda: _parse_runtime(root), RuntimeConfig())
    transmission = _part(lambda: _parse_transmission(root), TransmissionConfig())
    sms = _part(lambda: _parse_sms(root, base), None)
    _record_unknown(data, "", _SiteFile)
    if _collected.get():
        return None
    assert outputs is not None
    return SiteConfig(
        community=community,
        building=building,
        gateway_id=gateway_id,
        units=units,
        households=households,
        buses=buses,
        devices=devices,
        outputs=outputs,
        linkage=linkage,
        alarm=alarm,
        mqtt=mqtt,
        storage=storage,
        control=control,
        runtime=runtime,
        source=source,
        transmission=transmission,
        sms=sms,
    )


def _id_paths(data: Mapping[str, Any], array: str) -> dict[str, str]:
    """Id → key path of each entry of an array of tables (``gas-u1-101`` → ``devices[3]``), as written."""
    items: Any = data
    for part in array.split("."):
        items = items.get(part) if isinstance(items, Mapping) else None
    if not isinstance(items, list):
        return {}
    return {item["id"]: f"{array}[{i}]" for i, item in enumerate(items)
            if isinstance(item, Mapping) and isinstance(item.get("id"), str)}


def _written_ids(data: Mapping[str, Any], array: str, value: str = "") -> Any:
    """The ids the file gives the entries of ``array`` (parsed or not); with ``value``, id → that key's text."""
    paths = _id_paths(data, array)
    if not value:
        return set(paths)
    items: Any = data
    for part in array.split("."):
        items = items.get(part) if isinstance(items, Mapping) else None
    return {item["id"]: item[value] for item in items or ()
            if isinstance(item, Mapping) and item.get("id") in paths and isinstance(item.get(value), str)}


def _unique(path: str, ids: dict[str, str], value: str) -> None:
    if value in ids:
        raise ConfigError(path, f"duplicate id {value!r} (first used at {ids[value]})")
    ids[value] = path


def _entries(value: Any, path: str) -> list[tuple[str, Any]]:
    """The tables of the array of tables ``value`` at ``path``, each with its key path (``devices[3]``)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be an array of tables ([[{path}]]), got {_typename(value)}")
    return [(f"{path}[{i}]", item) for i, item in enumerate(value)]


def _each_entry(entries: list[tuple[str, Any]], parse: Callable[[str, Any], None]) -> None:
    """``parse(path, table)`` for every entry; one with an error is recorded and left out, the next one read."""
    for path, item in entries:
        _part(functools.partial(parse, path, item), None)


class _UnitTable(_Shape, kw_only=True):
    id: Ident
    name: Text | None = None


def _parse_units(root: Mapping[str, Any]) -> tuple[UnitConfig, ...]:
    units: list[UnitConfig] = []
    seen: dict[str, str] = {}

    def unit(path: str, data: Any) -> None:
        t = _read(data, path, _UnitTable)
        _unique(f"{path}.id", seen, t.id)
        units.append(UnitConfig(id=t.id, name=t.name or t.id))

    entries = _entries(root.get("units"), "units")
    _each_entry(entries, unit)
    if not units and not entries:
        raise ConfigError("units", "at least one unit is required")
    return tuple(units)


class _HouseholdTable(_Shape, kw_only=True):
    id: Ident
    unit: Text
    name: Text | None = None


def _parse_households(root: Mapping[str, Any], unit_ids: set[str]) -> tuple[HouseholdConfig, ...]:
    households: list[HouseholdConfig] = []
    seen: dict[str, str] = {}

    def household(path: str, data: Any) -> None:
        t = _read(data, path, _HouseholdTable)
        _unique(f"{path}.id", seen, t.id)
        if t.unit not in unit_ids:
            raise ConfigError(f"{path}.unit", f"unknown unit {t.unit!r}")
        households.append(HouseholdConfig(id=t.id, unit=t.unit, name=t.name or t.id))

    _each_entry(_entries(root.get("households"), "households"), household)
    return tuple(households)


class _BusTable(_Shape, kw_only=True):
    id: Ident
    port: Text
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: int = 8
    timeout_s: Annotated[float, msgspec.Meta(ge=0.05, le=10.0)] = 0.5
    #: A detector's alarm must reach the gateway within 30 s (GB/T 45839 §5.4.1).
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=MAX_POLL_CYCLE_S)] = 1.0

    def __post_init__(self) -> None:
        if self.bytesize != 8:
            raise ValueError(f"bytesize: Modbus RTU frames carry 8 data bits, got {self.bytesize}")


def _parse_buses(root: Mapping[str, Any]) -> tuple[BusConfig, ...]:
    buses: list[BusConfig] = []
    seen: dict[str, str] = {}
    ports: dict[str, tuple[str, str]] = {}  # real path → (first bus's key path, its port as written)

    def bus(path: str, data: Any) -> None:
        t = _read(data, path, _BusTable)
        _unique(f"{path}.id", seen, t.id)
        real = real_port(t.port)
        if real in ports:
            first, written = ports[real]
            both = "" if t.port == written == real else f" ({t.port!r} and {written!r} are both {real})"
            raise ConfigError(f"{path}.port", f"port {t.port!r} is already used by {first}{both}: one bus per port")
        ports[real] = (path, t.port)
        buses.append(BusConfig(id=t.id, port=t.port, baudrate=t.baudrate, parity=t.parity, stopbits=t.stopbits,
                               bytesize=t.bytesize, timeout_s=t.timeout_s, poll_interval_s=t.poll_interval_s))

    _each_entry(_entries(root.get("buses"), "buses"), bus)
    return tuple(buses)


def real_port(port: str) -> str:
    """The device a port name reaches: symlinks followed (``/dev/serial0``, udev ``by-id`` and rule names) and
    ``.``/``..`` removed. A Pi names one port several ways; two buses on one device would fight for it."""
    return os.path.realpath(port)


def _check_bus_cycles(buses: tuple[BusConfig, ...], devices: tuple[DeviceConfig, ...],
                      paths: Mapping[str, str]) -> None:
    """Even with every device silent, one cycle of each bus must fit the 30 s alarm budget."""
    for i, bus in enumerate(buses):
        polled = len({d.address for d in devices if d.bus == bus.id})  # a controller's channels: one read
        worst = polled * bus.timeout_s
        if worst > MAX_POLL_CYCLE_S:
            raise ConfigError(
                f"{paths.get(bus.id, f'buses[{i}]')}.timeout_s",
                f"{polled} devices × {bus.timeout_s:g} s = {worst:g} s per cycle when none answers; an alarm must "
                f"reach the gateway within {MAX_POLL_CYCLE_S:g} s: lower the timeout or split the bus",
            )


def bus_floor_s(bus: BusConfig, devices: Iterable[DeviceConfig]) -> float:
    """The wire's floor for one cycle of ``bus`` (:func:`drivers.wire.bus_floor_s`): the usual reads of its
    devices (a detector's fast window, a station's spans), with the default 10 ms device turnaround."""
    reads: list[tuple[int, int]] = []
    for device in devices:
        if device.bus != bus.id:
            continue
        profile = device.detector_profile or device.station_profile
        if profile is not None:
            reads += profile.cycle_reads
    line = LineFormat(baud=bus.baudrate, bytesize=bus.bytesize, parity=bus.parity, stopbits=bus.stopbits)
    return wire_floor_s(line, reads, turnaround_s=DEFAULT_TURNAROUND_S)


def bus_floor_warnings(cfg: SiteConfig) -> list[str]:
    """One line per bus whose ``poll_interval_s`` is below its wire floor, stating the cycle it will really
    have. Not an error: such a bus polls back to back, at the floor."""
    warnings = []
    for i, bus in enumerate(cfg.buses):
        devices = [d for d in cfg.devices if d.bus == bus.id]
        floor = bus_floor_s(bus, devices)
        if bus.poll_interval_s < floor:
            kinds = "detectors" if all(d.kind == "gas_detector" for d in devices) else "devices"
            warnings.append(f"buses[{i}].poll_interval_s: {len(devices)} {kinds} at {bus.baudrate} baud need "
                            f"≥ {floor:.{1 if floor >= 1 else 2}f} s per cycle; poll_interval_s = "
                            f"{bus.poll_interval_s!r} cannot be met")
    return warnings


class _ProfileHead(_Shape, kw_only=True):
    """A profile's kind; the rest of its table is read by drivers.profiles."""

    kind: Literal["gas_detector", "extinguisher_station"]


def _parse_profiles(root: Mapping[str, Any]) -> tuple[dict[str, DetectorProfile], dict[str, StationProfile]]:
    detectors = dict(BUILTIN_DETECTOR_PROFILES)
    stations = dict(BUILTIN_STATION_PROFILES)
    profiles = root.get("profiles")
    if profiles is None:
        return detectors, stations
    if not isinstance(profiles, Mapping):
        raise ConfigError("profiles", f"must be a table, got {_typename(profiles)}")
    for name, data in profiles.items():
        path = f"profiles.{name}"
        head = _read(data, path, _ProfileHead, known_only=True)
        if name in detectors or name in stations:
            raise ConfigError(path, f"profile {name!r} already exists (built-in or defined twice)")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(path, f"profile name {name!r} may contain only letters, digits, '-', '_' and '.'")
        body = {k: v for k, v in data.items() if k != "kind"}
        try:
            if head.kind == "gas_detector":
                detectors[name] = parse_detector_profile(name, body)
            else:
                stations[name] = parse_station_profile(name, body)
        except ProfileError as exc:
            raise ConfigError(f"{path}.{exc.key}" if exc.key else path, exc.reason) from None
    return detectors, stations


_ALARM = AlarmSettings()


class _AlarmTable(_Shape, kw_only=True):
    offline_after_failures: Annotated[int, msgspec.Meta(ge=1, le=10)] = _ALARM.offline_after_failures
    offline_ceiling_s: Annotated[float, msgspec.Meta(ge=1.0, le=100.0)] = _ALARM.offline_ceiling_s
    offline_clear_polls: Annotated[int, msgspec.Meta(ge=1, le=100)] = _ALARM.offline_clear_polls
    degraded_window_polls: Annotated[int, msgspec.Meta(ge=10, le=1000)] = _ALARM.degraded_window_polls
    degraded_percent: Annotated[float, msgspec.Meta(ge=1.0, le=90.0)] = _ALARM.degraded_percent
    degraded_clear_percent: Annotated[float, msgspec.Meta(ge=0.0, le=90.0)] = _ALARM.degraded_clear_percent
    door_open_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = _ALARM.door_open_s
    trouble_chirp_interval_s: Annotated[float, msgspec.Meta(ge=30.0, le=60.0)] = _ALARM.trouble_chirp_interval_s
    telemetry_interval_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = _ALARM.telemetry_interval_s
    telemetry_deadband: Annotated[float, msgspec.Meta(ge=0.0)] = _ALARM.telemetry_deadband
    walk_test_s: Annotated[float, msgspec.Meta(ge=30.0, le=3600.0)] = _ALARM.walk_test_s

    def __post_init__(self) -> None:
        """``comms_degraded`` clears below the share that raises it."""
        if self.degraded_clear_percent >= self.degraded_percent:
            raise ValueError(f"degraded_clear_percent: must be below degraded_percent ({self.degraded_percent:g}), "
                             f"got {self.degraded_clear_percent:g}: the fault would clear as it rose")


def _parse_alarm(root: Mapping[str, Any]) -> AlarmSettings:
    data = root.get("alarm")
    if data is None:
        return AlarmSettings()
    t = _read(data, "alarm", _AlarmTable)
    return AlarmSettings(**msgspec.structs.asdict(t))


class _DeviceHead(_Shape, kw_only=True):
    """What every device has; the rest depends on its kind (:class:`_ModbusDevice`, :class:`_ContactDevice`)."""

    id: Ident
    kind: DeviceKind
    household: Text | None = None
    unit: Text | None = None
    name: Text | None = None


#: A gas detector's keys (a controller's entry sets them for all of its channels; a channel for itself).
Gas = Literal["CH4", "LPG", "H2", "CO"] | None
Measure = Literal["%LEL", "ppm", "%VOL"] | None
Threshold = Annotated[float, msgspec.Meta(ge=0.0)] | None


class _ModbusDevice(_DeviceHead, kw_only=True):
    gas: Gas = None
    measure: Measure = None
    low: Threshold = None
    high: Threshold = None
    hysteresis: Threshold = None
    bus: Text
    address: Annotated[int, msgspec.Meta(ge=1, le=247)]
    profile: Text
    channels: Any = None  # [[devices.channels]]: _Channel each
    door_open_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] | None = None


class _ContactDevice(_DeviceHead, kw_only=True):
    pin: Any  # _pin reads its spellings
    contact: Literal["NO", "NC"] | None = None
    pull_up: bool = True
    bounce_ms: Annotated[int, msgspec.Meta(ge=0, le=5000)] = 50
    supervision_pin: Any = None
    door_open_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] | None = None


class _Channel(_Shape, kw_only=True):
    gas: Gas = None
    measure: Measure = None
    low: Threshold = None
    high: Threshold = None
    hysteresis: Threshold = None
    channel: Annotated[int, msgspec.Meta(ge=1)] | None = None
    household: Text | None = None
    unit: Text | None = None
    name: Text | None = None


def _parse_devices(
    root: Mapping[str, Any],
    units: tuple[UnitConfig, ...],
    households: tuple[HouseholdConfig, ...],
    buses: tuple[BusConfig, ...],
    detector_profiles: dict[str, DetectorProfile],
    station_profiles: dict[str, StationProfile],
) -> tuple[DeviceConfig, ...]:
    # an entry the file has but that has errors of its own counts as known: its errors are reported, not these
    unit_ids = {u.id for u in units} | _written_ids(root, "units")
    household_unit = {**_written_ids(root, "households", "unit"), **{h.id: h.unit for h in households}}
    bus_ids = {b.id for b in buses} | _written_ids(root, "buses")
    devices: list[DeviceConfig] = []
    seen: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}

    def device(path: str, data: Any) -> None:
        head = _read(data, path, _DeviceHead, known_only=True)
        did, kind = head.id, head.kind
        _unique(f"{path}.id", seen, did)
        modbus = kind in MODBUS_KINDS
        for key in ("pin",) if modbus else ("bus", "address", "profile"):
            if key in data:
                raise ConfigError(f"{path}.{key}", f"a {kind} is polled on a bus; use 'bus' and 'address'" if modbus
                                  else f"a {kind} is a GPIO contact; use 'pin' and 'contact'")
        t: _ModbusDevice | _ContactDevice = (_read(data, path, _ModbusDevice) if modbus
                                             else _read(data, path, _ContactDevice))
        household, unit = t.household, t.unit
        if household is not None:
            if household not in household_unit:
                raise ConfigError(f"{path}.household", f"unknown household {household!r}")
            if unit is not None and unit != household_unit[household]:
                raise ConfigError(
                    f"{path}.unit", f"household {household!r} is in unit {household_unit[household]!r}, not {unit!r}"
                )
            unit = household_unit[household]
        elif unit is None:
            raise ConfigError(path, "needs a 'household' or a 'unit'")
        elif unit not in unit_ids:
            raise ConfigError(f"{path}.unit", f"unknown unit {unit!r}")
        name = t.name or did
        if kind in ("cabinet_door", "extinguisher_station") or t.door_open_s is None:
            door_open_s = t.door_open_s
        else:
            raise ConfigError(f"{path}.door_open_s", f"only a cabinet_door or an extinguisher_station has a door, "
                                                     f"not a {kind}")
        if isinstance(t, _ModbusDevice):
            bus, address = t.bus, t.address
            if bus not in bus_ids:
                raise ConfigError(f"{path}.bus", f"unknown bus {bus!r}")
            if (bus, address) in addresses:
                raise ConfigError(
                    f"{path}.address", f"address {address} on bus {bus!r} is already used by {addresses[bus, address]}"
                )
            addresses[bus, address] = did
            if kind == "gas_detector":
                if t.profile not in detector_profiles:
                    raise ConfigError(f"{path}.profile", f"unknown gas detector profile {t.profile!r}")
                profile = detector_profiles[t.profile]
                if t.channels is not None or profile.channels > 1:
                    devices.extend(_channels(path, data, t, name, (unit, household), profile, household_unit,
                                             unit_ids, seen))
                else:
                    devices.append(_gas_detector(path, t, did, name, unit, household, bus, address, profile))
            else:
                if t.profile not in station_profiles:
                    raise ConfigError(f"{path}.profile", f"unknown extinguisher station profile {t.profile!r}")
                devices.append(DeviceConfig(id=did, kind=kind, name=name, unit=unit, household=household,
                                            bus=bus, address=address, station_profile=station_profiles[t.profile],
                                            door_open_s=door_open_s))
        else:
            pin = _pin(t.pin, f"{path}.pin")
            if pin is None:
                raise ConfigError(f"{path}.pin", "is required")
            contact: Literal["NO", "NC"] = "NC" if kind == "extinguisher_presence" else "NO"
            if t.contact is not None:
                contact = t.contact
            devices.append(DeviceConfig(id=did, kind=kind, name=name, unit=unit, household=household, pin=pin,
                                        contact=contact, pull_up=t.pull_up, bounce_ms=t.bounce_ms,
                                        supervision_pin=_pin(t.supervision_pin, f"{path}.supervision_pin"),
                                        door_open_s=door_open_s))

    _each_entry(_entries(root.get("devices"), "devices"), device)
    return tuple(devices)


#: Keys a multi-channel controller's entry may set for all of its channels (a channel's own key wins).
_CHANNEL_SHARED = ("gas", "measure", "low", "high", "hysteresis")


def _channels(
    path: str, data: Mapping[str, Any], t: _ModbusDevice, name: str, place: tuple[str, str | None],
    profile: DetectorProfile, household_unit: dict[str, str], unit_ids: set[str], seen: dict[str, str],
) -> list[DeviceConfig]:
    """The channels of a multi-channel controller (``[[devices.channels]]``), each a detector of its own:
    id ``<id>.ch<n>``, its own household (or unit), thresholds and alarm state, the controller's address."""
    if profile.channels < 2:
        raise ConfigError(f"{path}.channels", f"profile {profile.name!r} has one channel; a multi-channel "
                                              "profile sets channels and stride ([profiles.<name>])")
    tables = _entries(t.channels, f"{path}.channels")
    if not tables:
        raise ConfigError(f"{path}.channels", f"profile {profile.name!r} has {profile.channels} channels: "
                                              "bind each one in use with a [[devices.channels]] table")
    shared = {k: data[k] for k in _CHANNEL_SHARED if k in data}
    used: dict[int, str] = {}
    out: list[DeviceConfig] = []
    for i, (where, raw) in enumerate(tables):
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a table, got {_typename(raw)}")
        c = _read({**shared, **raw}, where, _Channel)
        number = i + 1 if c.channel is None else c.channel
        if number > profile.channels:
            raise ConfigError(f"{where}.channel", f"must be ≤ {profile.channels}, got {number}")
        if number in used:
            raise ConfigError(f"{where}.channel", f"channel {number} is already bound at {used[number]}")
        used[number] = where
        cid = f"{t.id}.ch{number}"
        _unique(f"{where}.channel", seen, cid)
        unit, household = place
        if c.household is not None:
            if c.household not in household_unit:
                raise ConfigError(f"{where}.household", f"unknown household {c.household!r}")
            if c.unit is not None and c.unit != household_unit[c.household]:
                raise ConfigError(f"{where}.unit", f"household {c.household!r} is in unit "
                                                   f"{household_unit[c.household]!r}, not {c.unit!r}")
            unit, household = household_unit[c.household], c.household
        elif c.unit is not None:
            if c.unit not in unit_ids:
                raise ConfigError(f"{where}.unit", f"unknown unit {c.unit!r}")
            unit, household = c.unit, None
        channel_name = c.name or f"{name} channel {number}"
        device = _gas_detector(where, c, cid, channel_name, unit, household, t.bus, t.address,
                               profile.for_channel(number))
        out.append(replace(device, controller=t.id, channel=number))
    return out


def _gas_detector(
    path: str, t: _ModbusDevice | _Channel, did: str, name: str, unit: str, household: str | None, bus: str,
    address: int, profile: DetectorProfile,
) -> DeviceConfig:
    gas = t.gas or profile.default_gas
    fixed = profile.measure if isinstance(profile.measure, str) else None
    measure = t.measure or fixed or GAS_UNITS[gas]
    if fixed is not None and measure != fixed:
        raise ConfigError(f"{path}.measure", f"profile {profile.name!r} reports in {fixed}, not {measure}")
    if gas == "CO" and measure != "ppm":
        raise ConfigError(f"{path}.{'measure' if t.measure is not None else 'gas'}",
                          f"CO is measured in ppm, but profile {profile.name!r} reports in {measure}")
    d_low, d_high, d_hyst = DEFAULT_THRESHOLDS[measure]
    from_profile = profile.thresholds
    low = from_profile.get("low", d_low) if t.low is None else t.low
    high = from_profile.get("high", d_high) if t.high is None else t.high
    hysteresis = from_profile.get("hysteresis", d_hyst) if t.hysteresis is None else t.hysteresis
    low_cap, high_cap, why = THRESHOLD_CAPS[measure]
    if low <= 0.0:
        raise ConfigError(f"{path}.low", f"must be > 0, got {low:g}")
    if low_cap is not None and low > low_cap:
        raise ConfigError(f"{path}.low", f"level 1 must be ≤ {low_cap:g} {measure} ({why}), got {low:g}")
    if high > high_cap:
        raise ConfigError(f"{path}.high", f"level 2 must be ≤ {high_cap:g} {measure} ({why}), got {high:g}")
    if low >= high:
        raise ConfigError(f"{path}.low", f"must be below high ({high:g} {measure}), got {low:g}")
    if hysteresis >= low:
        raise ConfigError(f"{path}.hysteresis", f"must be below low ({low:g} {measure}), got {hysteresis:g}")
    if hysteresis >= high - low:
        raise ConfigError(f"{path}.hysteresis",
                          f"must be below high − low ({high - low:g} {measure}) so the two levels stay apart, "
                          f"got {hysteresis:g}")
    return DeviceConfig(id=did, kind="gas_detector", name=name, unit=unit, household=household, bus=bus,
                        address=address, detector_profile=profile, gas=gas, measure=measure, low=low, high=high,
                        hysteresis=hysteresis)


class _PinTable(_Shape, kw_only=True):
    pin: Any  # _pin reads its spellings
    active_high: bool = True


class _LedsTable(_Shape, kw_only=True):
    alarm: Any = None
    supervisory: Any = None
    fault: Any = None
    power: Any = None


class _RelayTable(_Shape, kw_only=True):
    id: Ident
    pin: Any
    active_high: bool = True
    name: Text | None = None


class _OutputsTable(_Shape, kw_only=True):
    buzzer: Any = None
    leds: Any = None
    relays: Any = None


def _output_pin(value: Any, key: str) -> OutputPin | None:
    """An output: a pin, or a table with ``pin`` and ``active_high``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        t = _read(value, key, _PinTable)
        pin = _pin(t.pin, f"{key}.pin")
        if pin is None:
            raise ConfigError(f"{key}.pin", "is required")
        return OutputPin(pin=pin, active_high=t.active_high)
    pin = _pin(value, key)
    assert pin is not None
    return OutputPin(pin=pin)


def _parse_outputs(root: Mapping[str, Any]) -> OutputsConfig:
    data = root.get("outputs")
    if data is None:
        raise ConfigError("outputs", "is required")
    t = _read(data, "outputs", _OutputsTable)
    buzzer = _output_pin(t.buzzer, "outputs.buzzer")
    if buzzer is None:
        raise ConfigError("outputs.buzzer", "is required (the local sounder)")
    leds: dict[str, OutputPin] = {}
    if t.leds is not None:
        led_table = _read(t.leds, "outputs.leds", _LedsTable)
        for colour in ("alarm", "supervisory", "fault", "power"):
            led = _output_pin(getattr(led_table, colour), f"outputs.leds.{colour}")
            if led is not None:
                leds[colour] = led
    relays: list[RelayConfig] = []
    seen: dict[str, str] = {}

    def relay(path: str, data: Any) -> None:
        r = _read(data, path, _RelayTable)
        _unique(f"{path}.id", seen, r.id)
        pin = _pin(r.pin, f"{path}.pin")
        if pin is None:
            raise ConfigError(f"{path}.pin", "is required")
        relays.append(RelayConfig(id=r.id, pin=pin, active_high=r.active_high, name=r.name or r.id))

    _each_entry(_entries(t.relays, "outputs.relays"), relay)
    return OutputsConfig(buzzer=buzzer, leds=leds, relays=tuple(relays))


def _check_pins(devices: tuple[DeviceConfig, ...], outputs: OutputsConfig, buses: tuple[BusConfig, ...],
                paths: Mapping[str, Mapping[str, str]]) -> None:
    """No pin serves two things (pins are already normalised to ``GPIOn``). ``paths``: the key path of each
    device and bus by id (``devices[3]``)."""
    used: dict[str, str] = {}

    def claim(pin: str, path: str) -> None:
        key = pin.upper()
        if key in used:
            raise ConfigError(path, f"pin {pin} is already used by {used[key]}")
        used[key] = path

    for i, bus in enumerate(buses):
        if bus.port in _UART_PORTS or real_port(bus.port) in _UART_PORTS:
            where = paths["buses"].get(bus.id, f"buses[{i}]")
            claim("GPIO14", f"{where}.port (UART TXD)")
            claim("GPIO15", f"{where}.port (UART RXD)")
    claim(outputs.buzzer.pin, "outputs.buzzer")
    for colour, led in outputs.leds.items():
        claim(led.pin, f"outputs.leds.{colour}")
    for i, relay in enumerate(outputs.relays):
        claim(relay.pin, f"outputs.relays[{i}].pin")
    for i, dev in enumerate(devices):
        where = paths["devices"].get(dev.controller or dev.id, f"devices[{i}]")
        if dev.pin is not None:
            claim(dev.pin, f"{where}.pin")
        if dev.supervision_pin is not None:
            claim(dev.supervision_pin, f"{where}.supervision_pin")


def _parse_linkage(
    root: Mapping[str, Any], units: tuple[UnitConfig, ...], households: tuple[HouseholdConfig, ...],
    outputs: OutputsConfig,
) -> tuple[LinkageRule, ...]:
    unit_ids = {u.id for u in units} | _written_ids(root, "units")
    household_ids = {h.id for h in households} | _written_ids(root, "households")
    relay_ids = {r.id for r in outputs.relays} | _written_ids(root, "outputs.relays")
    rules: list[LinkageRule] = []

    def rule(path: str, data: Any) -> None:
        t = _read(data, path, _LinkageTable)
        kind, _, ref = t.scope.partition(":")
        if t.scope != "building":
            if kind not in ("unit", "household") or not ref:
                raise ConfigError(f"{path}.scope",
                                  f"must be 'building', 'unit:<id>' or 'household:<id>', got {t.scope!r}")
            if ref not in (unit_ids if kind == "unit" else household_ids):
                raise ConfigError(f"{path}.scope", f"unknown {kind} {ref!r}")
        if t.output not in relay_ids:
            raise ConfigError(f"{path}.output", f"unknown relay {t.output!r}")
        rules.append(LinkageRule(signal=t.signal, scope=t.scope, output=t.output))

    _each_entry(_entries(root.get("linkage"), "linkage"), rule)
    return tuple(rules)


class _LinkageTable(_Shape, kw_only=True):
    signal: LinkageSignal
    output: Text
    scope: Text = "building"



def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    return str(p if p.is_absolute() else (base / p))


_MQTT = MqttConfig()


class _TlsTable(_Shape, kw_only=True):
    ca_file: Text | None = None
    cert_file: Text | None = None
    key_file: Text | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"{'cert_file' if self.cert_file is None else 'key_file'}: client certificate and key "
                             "must be given together")


class _MqttTable(_Shape, kw_only=True):
    host: Text | None = None
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    hosts: Any = None  # "host:port" strings, each checked by _parse_hosts
    client_id: Text | None = None
    topic_prefix: Text = _MQTT.topic_prefix
    protocol: Literal[5, 311] = 5
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = _MQTT.keepalive_s
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = _MQTT.max_inflight
    status_interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=86_400)] = _MQTT.status_interval_s
    tls: Any = None  # a table: _TlsTable
    credentials_file: Text | None = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        prefix = self.topic_prefix
        if any(c in prefix for c in "#+\0") or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ValueError(f"topic_prefix: must be a plain topic path without wildcards, got {prefix!r}")
        if self.hosts is not None:
            for other in ("host", "port"):
                if getattr(self, other) is not None:
                    raise ValueError(f"{other}: give either mqtt.hosts (the nodes of one cluster) or mqtt.host and "
                                     "mqtt.port (one node), not both; list every node in mqtt.hosts")


def _parse_mqtt(root: Mapping[str, Any], base: Path, *, default_client_id: str) -> MqttConfig:
    data = root.get("mqtt")
    if data is None:
        return MqttConfig(client_id=default_client_id)
    t = _read(data, "mqtt", _MqttTable)
    ca = cert = key = None
    insecure = False
    if t.tls is not None:
        tls = _read(t.tls, "mqtt.tls", _TlsTable)
        ca, cert, key = (_resolve(base, tls.ca_file), _resolve(base, tls.cert_file), _resolve(base, tls.key_file))
        insecure = tls.insecure
        for name, value in (("ca_file", ca), ("cert_file", cert), ("key_file", key)):
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"mqtt.tls.{name}", f"file not found: {value}")
        if key is not None:
            _check_private(key, "mqtt.tls.key_file")
    credentials = _resolve(base, t.credentials_file)
    username = password = None
    if credentials is not None:
        username, password = read_credentials(credentials, "mqtt.credentials_file")
    default_port = 8883 if t.tls is not None else _MQTT.port
    hosts = _parse_hosts(t.hosts, default_port)
    if hosts:
        host, port = parse_endpoint(hosts[0], default_port)
    else:
        host = t.host or _MQTT.host
        port = default_port if t.port is None else t.port
    # mqtt.hosts holds "host:port" strings; mqtt.host is a bare host name or address (an IPv6 one unbracketed)
    nodes = [parse_endpoint(name, default_port)[0] for name in hosts] if hosts else [host]
    for node in nodes:
        if t.tls is None and not t.allow_plaintext and not is_loopback(node):
            raise ConfigError("mqtt.allow_plaintext",
                              f"plain MQTT to {node!r} (not this host) would send events, commands and credentials "
                              "in clear: add an [mqtt.tls] table, or set mqtt.allow_plaintext = true to accept that")
    return MqttConfig(
        host=host,
        port=port,
        hosts=hosts,
        client_id=t.client_id or default_client_id,
        topic_prefix=t.topic_prefix,
        protocol=t.protocol,
        keepalive_s=t.keepalive_s,
        max_inflight=t.max_inflight,
        status_interval_s=t.status_interval_s,
        tls=t.tls is not None,
        tls_ca_file=ca,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_insecure=insecure,
        credentials_file=credentials,
        username=username,
        password=password,
        allow_plaintext=t.allow_plaintext,
    )


def _parse_hosts(value: Any, default_port: int) -> tuple[str, ...]:
    """``mqtt.hosts``: the nodes of one cluster; it replaces ``host`` and ``port`` (the struct refuses both)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("mqtt.hosts", f'must be an array of "host:port" strings, got {_typename(value)}')
    if not value:
        raise ConfigError("mqtt.hosts", 'must list at least one "host:port"')
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(value):
        key = f"mqtt.hosts[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key, f'must be a "host:port" string, got {_typename(item)}')
        try:
            endpoint = parse_endpoint(item, default_port)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        if endpoint in seen:
            raise ConfigError(key, f"{item!r} is the same node as mqtt.hosts[{seen[endpoint]}]")
        seen[endpoint] = i
    return tuple(value)


def parse_endpoint(text: str, default_port: int = 1883) -> tuple[str, int]:
    """``"host:port"``, ``"host"``, ``"[::1]:port"`` → ``(host, port)``; ValueError says what is wrong."""
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):  # [IPv6]:port
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            raise ValueError(f'{text!r}: write an IPv6 address as "[addr]:port"')
        host, port_text = value[1:end], value[end + 2:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif value.count(":") > 1:
        raise ValueError(f'{text!r}: write an IPv6 address as "[addr]:port"')
    if not host or any(c.isspace() or c in "/#?@" for c in host):
        raise ValueError(f'{text!r}: expected "host:port"')
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine without a lookup: ``localhost`` or a loopback address."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def read_credentials(path: str, key: str) -> tuple[str, str]:
    """Read ``username`` and ``password`` from a TOML file that only its owner may read."""
    _check_private(path, key)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(key, f"cannot parse {path}: {exc}") from None
    user, password = data.get("username"), data.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or set(data) - {"username", "password"}:
        raise ConfigError(key, f"{path} must hold exactly the string keys 'username' and 'password'")
    if not user:
        raise ConfigError(key, f"{path}: username must not be empty")
    return user, password


def _check_private(path: str, key: str) -> None:
    """A secret (password, private key) must be neither group- nor world-accessible."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(key, f"{path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            key, f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )


_STORAGE, _TRANSMISSION = StorageConfig(), TransmissionConfig()


class _StorageTable(_Shape, kw_only=True):
    path: Text = _STORAGE.path
    max_mb: Annotated[float, msgspec.Meta(ge=1.0, le=100_000.0)] = _STORAGE.max_mb
    min_free_mb: Annotated[float, msgspec.Meta(ge=0.0)] = _STORAGE.min_free_mb
    history_days: Annotated[float, msgspec.Meta(ge=30.0)] = _STORAGE.history_days
    history_min_events: Annotated[int, msgspec.Meta(ge=999)] = _STORAGE.history_min_events
    telemetry_batch_s: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = _STORAGE.telemetry_batch_s
    memory_events: Annotated[int, msgspec.Meta(ge=100, le=1_000_000)] = _STORAGE.memory_events


def _parse_storage(root: Mapping[str, Any], base: Path) -> StorageConfig:
    data = root.get("storage")
    if data is None:
        return StorageConfig()
    t = _read(data, "storage", _StorageTable)
    return StorageConfig(path=_resolve(base, t.path) or t.path, max_mb=t.max_mb, min_free_mb=t.min_free_mb,
                         history_days=t.history_days, history_min_events=t.history_min_events,
                         telemetry_batch_s=t.telemetry_batch_s, memory_events=t.memory_events)


class _ControlTable(_Shape, kw_only=True):
    socket: Text = DEFAULT_SOCKET
    group: Text | None = None
    operator_group: Text | None = None


def _parse_control(root: Mapping[str, Any], base: Path) -> ControlConfig:
    data = root.get("control")
    if data is None:
        return ControlConfig()
    t = _read(data, "control", _ControlTable)
    return ControlConfig(socket=_resolve(base, t.socket) or DEFAULT_SOCKET, group=t.group,
                         operator_group=t.operator_group)


#: Values of ``[runtime] pin_factory``; the same list as drivers.gpio.PIN_FACTORIES (gpiozero's ``native`` is
#: left out: it needs /dev/gpiomem, which a Pi 5 lacks and the unit's device policy does not allow).
PinFactory = Literal["lgpio", "mock"]
PIN_FACTORIES = get_args(PinFactory)


#: Keys that once existed, and what replaced them: a site file that still sets one is told so.
REMOVED_RUNTIME_KEYS = {
    "alarm_process": "removed: the alarm panel always runs in a process of its own (docs/architecture.md); "
                     "delete this key",
    "gil_handoff": "removed: the busy event loop it stepped aside for now runs in the storage process, which "
                   "has an interpreter lock of its own (docs/architecture.md); delete this key",
}


class _RuntimeTable(_Shape, kw_only=True):
    realtime_priority: Annotated[int, msgspec.Meta(ge=0, le=99)] = 0
    gc_freeze: bool = True
    pin_factory: PinFactory = "lgpio"


def _parse_runtime(root: Mapping[str, Any]) -> RuntimeConfig:
    data = root.get("runtime")
    if data is None:
        return RuntimeConfig()
    for key, reason in REMOVED_RUNTIME_KEYS.items():
        if isinstance(data, Mapping) and key in data:
            raise ConfigError(f"runtime.{key}", reason)
    t = _read(data, "runtime", _RuntimeTable)
    return RuntimeConfig(realtime_priority=t.realtime_priority, gc_freeze=t.gc_freeze, pin_factory=t.pin_factory)


class _TransmissionTable(_Shape, kw_only=True):
    ack_deadline_s: Annotated[float, msgspec.Meta(ge=1.0, le=MAX_ACK_DEADLINE_S)] = _TRANSMISSION.ack_deadline_s
    path_down_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = _TRANSMISSION.path_down_s


def _parse_transmission(root: Mapping[str, Any]) -> TransmissionConfig:
    data = root.get("transmission")
    if data is None:
        return TransmissionConfig()
    t = _read(data, "transmission", _TransmissionTable)
    return TransmissionConfig(ack_deadline_s=t.ack_deadline_s, path_down_s=t.path_down_s)


class _SmsTable(_Shape, kw_only=True):
    device: Text
    contacts: Text
    mode: SmsMode = "fallback"
    after_s: Annotated[float, msgspec.Meta(ge=0.0, le=600.0)] = 30.0
    language: SmsLanguage = "zh"
    max_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    pin: Any = None
    queue: Text = "/var/lib/gateway/sms.db"
    connection: Text = "at115200"
    check_interval_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 30.0
    smsc: Text | None = None

    def __post_init__(self) -> None:
        pin = self.pin
        if pin is not None and (not isinstance(pin, str) or not pin.isdigit() or not 4 <= len(pin) <= 8):
            raise ValueError("pin: must be the SIM PIN as a string of 4 to 8 digits")
        if not self.connection.startswith("at"):
            raise ValueError(f"connection: {self.connection!r} is not one of Gammu's AT connections "
                             "(at, at115200, ...)")


def _parse_sms(root: Mapping[str, Any], base: Path) -> SmsConfig | None:
    data = root.get("sms")
    if data is None:
        return None
    t = _read(data, "sms", _SmsTable)
    contacts = _resolve(base, t.contacts)
    assert contacts is not None
    return SmsConfig(device=t.device, contacts=contacts, mode=t.mode, after_s=t.after_s, language=t.language,
                     max_per_hour=t.max_per_hour, pin=t.pin, queue=_resolve(base, t.queue) or t.queue,
                     connection=t.connection, check_interval_s=t.check_interval_s, smsc=t.smsc)
