"""Site config validation: every error class names its key path; the example building validates."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import EX_CONFIG, ConfigError, SiteConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "building.toml"

# A small valid site every error case below breaks in exactly one place.
BASE = """
[site]
community = "sunshine-garden"
building = "b07"

[[units]]
id = "u1"

[[units]]
id = "u2"

[[households]]
id = "u1-101"
unit = "u1"

[[households]]
id = "u2-101"
unit = "u2"

[[buses]]
id = "bus1"
port = "/dev/ttyUSB0"

[[buses]]
id = "bus2"
port = "/dev/ttyUSB1"

[[devices]]
id = "gas-u1-101"
kind = "gas_detector"
household = "u1-101"
bus = "bus1"
address = 1
profile = "A"

[[devices]]
id = "gas-u2-101"
kind = "gas_detector"
household = "u2-101"
bus = "bus1"
address = 2
profile = "A"

[[devices]]
id = "u1-door"
kind = "cabinet_door"
unit = "u1"
pin = 13
contact = "NC"

[outputs]
buzzer = 18

[outputs.leds]
alarm = 23

[[outputs.relays]]
id = "valve"
pin = 12

[[linkage]]
signal = "gas_high"
scope = "unit:u1"
output = "valve"
"""

Doc = dict[str, Any]
Edit = Callable[[Doc, Path], None]

_TOKEN = re.compile(r"[^.\[\]]+|\[\d+\]")


def _walk(doc: Any, path: str) -> tuple[Any, Any]:
    """The container holding the last element of ``path`` (``devices[0].address``), and that element's key."""
    tokens: list[Any] = [int(t[1:-1]) if t.startswith("[") else t for t in _TOKEN.findall(path)]
    node = doc
    for token in tokens[:-1]:
        node = node.setdefault(token, {}) if isinstance(token, str) else node[token]
    return node, tokens[-1]


def put(path: str, value: Any) -> Edit:
    def edit(doc: Doc, _tmp: Path) -> None:
        node, key = _walk(doc, path)
        node[key] = value

    return edit


def drop(path: str) -> Edit:
    def edit(doc: Doc, _tmp: Path) -> None:
        node, key = _walk(doc, path)
        del node[key]

    return edit


def add(path: str, item: Doc) -> Edit:
    def edit(doc: Doc, _tmp: Path) -> None:
        node, key = _walk(doc, path)
        node.setdefault(key, []).append(item)

    return edit


def both(*edits: Edit) -> Edit:
    def edit(doc: Doc, tmp: Path) -> None:
        for e in edits:
            e(doc, tmp)

    return edit


def secret(path: str, text: str, mode: int, *, key: str = "mqtt.credentials_file") -> Edit:
    """Write ``text`` to ``tmp/path`` with ``mode`` and point ``key`` at it."""

    def edit(doc: Doc, tmp: Path) -> None:
        file = tmp / path
        file.write_text(text, encoding="utf-8")
        file.chmod(mode)
        put(key, str(file))(doc, tmp)

    return edit


def gas(**fields: Any) -> Doc:
    return {"id": "gas-x", "kind": "gas_detector", "household": "u1-101", "bus": "bus2", "address": 9,
            "profile": "A", **fields}


def contact(**fields: Any) -> Doc:
    return {"id": "c-x", "kind": "obstruction", "unit": "u2", "pin": 16, **fields}


DETECTOR = {"kind": "gas_detector", "start": 0, "count": 4, "value": {"register": 1}}
STATION = {"kind": "extinguisher_station", "presence": {"function": 2, "address": 0}}


def detector_profile(**fields: Any) -> Doc:
    return {**copy.deepcopy(DETECTOR), **fields}


def station_profile(**fields: Any) -> Doc:
    return {**copy.deepcopy(STATION), **fields}


def base() -> Doc:
    return tomllib.loads(BASE)


# (id, edit, key path the message must start with, fragment of the reason)
CASES: list[tuple[str, Edit, str, str]] = [
    # unknown keys
    ("unknown-root", put("colour", "red"), "colour", "unknown key"),
    ("unknown-site", put("site.city", "x"), "site.city", "unknown key"),
    ("unknown-device", put("devices[0].colour", "x"), "devices[0].colour", "unknown key"),
    ("gpio-key-on-modbus", put("devices[0].contact", "NO"), "devices[0].contact", "unknown key"),
    ("unknown-led", put("outputs.leds.purple", 5), "outputs.leds.purple", "unknown key"),
    ("unknown-mqtt", put("mqtt.hots", "x"), "mqtt.hots", "unknown key"),
    ("unknown-storage", put("storage.max_gb", 1), "storage.max_gb", "unknown key"),
    ("unknown-alarm", put("alarm.loudness", 1), "alarm.loudness", "unknown key"),
    ("unknown-control", put("control.port", 1), "control.port", "unknown key"),
    ("unknown-runtime", put("runtime.nice", 1), "runtime.nice", "unknown key"),
    # wrong types
    ("type-string", put("site.building", 7), "site.building", "must be a string"),
    ("type-empty-string", put("site.community", " "), "site.community", "must not be empty"),
    ("type-ident", put("site.community", "sun garden"), "site.community", "may contain only"),
    ("type-gateway-id", put("site.gateway_id", "gw:1"), "site.gateway_id", "may contain only"),
    ("type-int", put("devices[0].address", "1"), "devices[0].address", "must be an integer"),
    ("type-int-float", put("devices[0].address", 1.0), "devices[0].address", "must be an integer"),
    ("type-bool-int", put("mqtt.port", True), "mqtt.port", "must be an integer"),
    ("type-number", put("storage.max_mb", "big"), "storage.max_mb", "must be a number"),
    ("type-nan", put("devices[0].low", float("nan")), "devices[0].low", "finite"),
    ("type-flag", put("runtime.gc_freeze", "yes"), "runtime.gc_freeze", "true or false"),
    ("removed-handoff", put("runtime.gil_handoff", False), "runtime.gil_handoff", "removed: the busy event loop"),
    ("removed-alarm-process", put("runtime.alarm_process", True), "runtime.alarm_process",
     "removed: the alarm panel always runs in a process of its own"),
    ("type-array", put("units", {"id": "u1"}), "units", "array of tables"),
    ("type-table", put("site", "b07"), "site", "must be a table"),
    ("type-choice", put("devices[2].contact", "closed"), "devices[2].contact", "must be one of"),
    ("type-choice-float", put("buses[0].baudrate", 9600.0), "buses[0].baudrate", "must be one of"),
    ("type-pin", put("outputs.buzzer", "banana"), "outputs.buzzer", "is not a pin"),
    ("type-pin-bool", put("outputs.buzzer", True), "outputs.buzzer", "pin number or pin name"),
    # required keys
    ("missing-site", drop("site"), "site", "is required"),
    ("missing-units", drop("units"), "units", "at least one unit"),
    ("missing-kind", drop("devices[0].kind"), "devices[0].kind", "is required"),
    ("missing-address", drop("devices[0].address"), "devices[0].address", "is required"),
    ("missing-profile", drop("devices[0].profile"), "devices[0].profile", "is required"),
    ("missing-pin", drop("devices[2].pin"), "devices[2].pin", "is required"),
    ("missing-bus-port", drop("buses[0].port"), "buses[0].port", "is required"),
    ("missing-outputs", drop("outputs"), "outputs", "is required"),
    ("missing-buzzer", drop("outputs.buzzer"), "outputs.buzzer", "is required"),
    ("missing-buzzer-pin", put("outputs.buzzer", {"active_high": True}), "outputs.buzzer.pin", "is required"),
    ("missing-relay-pin", drop("outputs.relays[0].pin"), "outputs.relays[0].pin", "is required"),
    # duplicate ids
    ("dup-unit", put("units[1].id", "u1"), "units[1].id", "duplicate id 'u1'"),
    ("dup-household", put("households[1].id", "u1-101"), "households[1].id", "duplicate id"),
    ("dup-bus", put("buses[1].id", "bus1"), "buses[1].id", "duplicate id"),
    ("dup-device", put("devices[1].id", "gas-u1-101"), "devices[1].id", "duplicate id"),
    ("dup-relay", add("outputs.relays", {"id": "valve", "pin": 17}), "outputs.relays[1].id", "duplicate id"),
    ("dup-port", put("buses[1].port", "/dev/ttyUSB0"), "buses[1].port", "already used"),
    # bindings to missing things
    ("missing-household", put("devices[0].household", "u9-999"), "devices[0].household", "unknown household"),
    ("missing-unit", put("devices[2].unit", "u9"), "devices[2].unit", "unknown unit"),
    ("household-unit", put("households[0].unit", "u9"), "households[0].unit", "unknown unit"),
    ("unit-disagrees", put("devices[0].unit", "u2"), "devices[0].unit", "is in unit 'u1'"),
    ("no-scope", drop("devices[2].unit"), "devices[2]", "needs a 'household' or a 'unit'"),
    ("missing-bus", put("devices[0].bus", "bus9"), "devices[0].bus", "unknown bus"),
    ("missing-profile-name", put("devices[0].profile", "Z"), "devices[0].profile", "unknown gas detector profile"),
    ("station-profile-on-detector", put("devices[0].profile", "io-4di"), "devices[0].profile", "unknown gas"),
    ("detector-profile-on-station",
     add("devices", {"id": "st", "kind": "extinguisher_station", "unit": "u1", "bus": "bus2", "address": 3,
                     "profile": "A"}),
     "devices[3].profile", "unknown extinguisher station profile"),
    ("modbus-with-pin", put("devices[0].pin", 4), "devices[0].pin", "polled on a bus"),
    ("contact-with-bus", put("devices[2].bus", "bus1"), "devices[2].bus", "GPIO contact"),
    # two devices on one address of one bus, or on one pin
    ("same-address", put("devices[1].address", 1), "devices[1].address", "address 1 on bus 'bus1' is already used"),
    ("address-range", put("devices[0].address", 248), "devices[0].address", "≤ 247"),
    ("address-zero", put("devices[0].address", 0), "devices[0].address", "≥ 1"),
    ("same-pin", add("devices", contact(pin=13)), "devices[3].pin", "pin GPIO13 is already used by devices[2].pin"),
    ("same-pin-alias", add("devices", contact(pin="BOARD33")), "devices[3].pin", "already used by devices[2].pin"),
    ("pin-is-buzzer", add("devices", contact(pin="GPIO18")), "devices[3].pin", "already used by outputs.buzzer"),
    ("pin-is-relay", put("outputs.leds.fault", 12), "outputs.relays[0].pin", "already used by outputs.leds.fault"),
    ("supervision-same", put("devices[2].supervision_pin", 13), "devices[2].supervision_pin", "already used"),
    ("pin-on-uart", both(put("buses[1].port", "/dev/serial0"), add("devices", contact(pin=14))),
     "devices[3].pin", "UART"),
    ("pin-range", put("devices[2].pin", 60), "devices[2].pin", "0–53"),
    ("pin-header-ground", put("devices[2].pin", "BOARD6"), "devices[2].pin", "not a GPIO"),
    # thresholds
    ("low-above-25-lel", put("devices[0].low", 26), "devices[0].low", "≤ 25 %LEL"),
    ("high-above-50-lel", put("devices[0].high", 55), "devices[0].high", "≤ 50 %LEL"),
    ("low-equals-high", both(put("devices[0].low", 20), put("devices[0].high", 20)), "devices[0].low",
     "below high"),
    ("low-above-high", both(put("devices[0].low", 20), put("devices[0].high", 15)), "devices[0].low",
     "below high"),
    ("low-zero", put("devices[0].low", 0), "devices[0].low", "must be > 0"),
    ("hysteresis-negative", put("devices[0].hysteresis", -1), "devices[0].hysteresis", "≥ 0"),
    ("hysteresis-vs-low", put("devices[0].hysteresis", 10), "devices[0].hysteresis", "below low"),
    ("hysteresis-vs-gap", both(put("devices[0].low", 20), put("devices[0].high", 25),
                               put("devices[0].hysteresis", 6)), "devices[0].hysteresis", "high − low"),
    ("ppm-high", add("devices", gas(gas="CO", high=20000)), "devices[3].high", "≤ 10000 ppm"),
    ("ppm-low-above-high", add("devices", gas(gas="CO", low=200, high=100)), "devices[3].low", "below high"),
    ("ppm-hysteresis", add("devices", gas(gas="CO", hysteresis=60)), "devices[3].hysteresis", "below low (50 ppm)"),
    ("co-on-lel-profile", add("devices", gas(gas="CO", profile="B")), "devices[3].gas", "CO is measured in ppm"),
    ("measure-vs-profile", add("devices", gas(profile="B", measure="%VOL")), "devices[3].measure",
     "reports in %LEL"),
    ("gas-unknown", put("devices[0].gas", "NH3"), "devices[0].gas", "must be one of"),
    # bus settings
    ("baudrate", put("buses[0].baudrate", 1234), "buses[0].baudrate", "must be one of"),
    ("parity", put("buses[0].parity", "X"), "buses[0].parity", "must be one of"),
    ("stopbits", put("buses[0].stopbits", 3), "buses[0].stopbits", "must be one of"),
    ("bytesize", put("buses[0].bytesize", 7), "buses[0].bytesize", "8 data bits"),
    ("timeout-low", put("buses[0].timeout_s", 0), "buses[0].timeout_s", "≥ 0.05"),
    ("poll-interval", put("buses[0].poll_interval_s", 45), "buses[0].poll_interval_s", "≤ 30"),
    ("bus-cycle-budget",
     both(put("buses[1].timeout_s", 8.0), *(add("devices", gas(id=f"g{i}", address=10 + i)) for i in range(4))),
     "buses[1].timeout_s", "within 30 s"),
    # custom detector profiles
    ("profile-kind-missing", put("profiles.X", {"start": 0}), "profiles.X.kind", "is required"),
    ("profile-kind-unknown", put("profiles.X", detector_profile(kind="smoke")), "profiles.X.kind", "must be one of"),
    ("profile-shadows-builtin", put("profiles.A", detector_profile()), "profiles.A", "already exists"),
    ("profile-name", put("profiles.a b", detector_profile()), "profiles.a b", "may contain only"),
    ("profile-unknown-key", put("profiles.X", detector_profile(offset=1)), "profiles.X.offset", "unknown key"),
    ("profile-function", put("profiles.X", detector_profile(function=5)), "profiles.X.function", "3–4"),
    ("profile-count", put("profiles.X", detector_profile(count=126)), "profiles.X.count", "1–125"),
    ("profile-past-end", put("profiles.X", detector_profile(start=65530, count=10, value={"register": 65531})),
     "profiles.X.count", "past register 65535"),
    ("profile-value-missing", put("profiles.X", {"kind": "gas_detector", "start": 0, "count": 4}),
     "profiles.X.value", "is required"),
    ("profile-value-register-missing", put("profiles.X", detector_profile(value={"decimals": 1})),
     "profiles.X.value.register", "is required"),
    ("profile-value-outside", put("profiles.X", detector_profile(value={"register": 4})),
     "profiles.X.value.register", "outside the block read (0–3)"),
    ("profile-value-unknown", put("profiles.X", detector_profile(value={"register": 1, "offset": 2})),
     "profiles.X.value.offset", "unknown key"),
    ("profile-decimals", put("profiles.X", detector_profile(value={"register": 1, "decimals": 7})),
     "profiles.X.value.decimals", "0–6"),
    ("profile-scale-zero", put("profiles.X", detector_profile(value={"register": 1, "scale": 0})),
     "profiles.X.value.scale", "must not be 0"),
    ("profile-signed-type", put("profiles.X", detector_profile(value={"register": 1, "signed": "yes"})),
     "profiles.X.value.signed", "true or false"),
    ("profile-decimals-field-mask",
     put("profiles.X", detector_profile(value={"register": 1, "decimals": {"register": 0, "shift": 12,
                                                                           "mask": 0xFF}})),
     "profiles.X.value.decimals.mask", "does not fit a 16-bit register"),
    ("profile-decimals-field-code",
     put("profiles.X", detector_profile(value={"register": 1, "decimals": {"register": 0, "mask": 0xF,
                                                                           "codes": {"4": 9}}})),
     "profiles.X.value.decimals.codes.4", "0–6"),
    ("profile-decimals-field-outside",
     put("profiles.X", detector_profile(value={"register": 1, "decimals": {"register": 7, "mask": 0xF}})),
     "profiles.X.value.decimals.register", "outside the block"),
    ("profile-measure", put("profiles.X", detector_profile(measure="mg/m3")), "profiles.X.measure", "%LEL"),
    ("profile-measure-field-code",
     put("profiles.X", detector_profile(measure={"register": 0, "mask": 0xF, "codes": {"2": "%lel"}})),
     "profiles.X.measure.codes.2", "unknown name"),
    ("profile-status-no-codes", put("profiles.X", detector_profile(status={"register": 2})),
     "profiles.X.status.codes", "is required"),
    ("profile-status-name",
     put("profiles.X", detector_profile(status={"register": 2, "codes": {"5": "burning"}})),
     "profiles.X.status.codes.5", "unknown name 'burning'"),
    ("profile-status-code-syntax",
     put("profiles.X", detector_profile(status={"register": 2, "codes": {"five": "low_alarm"}})),
     "profiles.X.status.codes.five", "must be an integer"),
    ("profile-status-code-vs-mask",
     put("profiles.X", detector_profile(status={"register": 2, "mask": 0xFF, "codes": {"0x100": "low_alarm"}})),
     "profiles.X.status.codes.0x100", "can never occur"),
    ("profile-status-mask-zero",
     put("profiles.X", detector_profile(status={"register": 2, "mask": 0, "codes": {"1": "normal"}})),
     "profiles.X.status.mask", "1–65535"),
    ("profile-status-outside",
     put("profiles.X", detector_profile(status={"register": 9, "codes": {"1": "normal"}})),
     "profiles.X.status.register", "outside the block"),
    ("profile-flags-type", put("profiles.X", detector_profile(flags={"register": 0})), "profiles.X.flags",
     "array of tables"),
    ("profile-flag-bit",
     put("profiles.X", detector_profile(flags=[{"register": 0, "bit": 16, "status": "low_alarm"}])),
     "profiles.X.flags[0].bit", "0–15"),
    ("profile-flag-status",
     put("profiles.X", detector_profile(flags=[{"register": 0, "bit": 1, "status": "burning"}])),
     "profiles.X.flags[0].status", "unknown status"),
    ("profile-flag-outside",
     put("profiles.X", detector_profile(flags=[{"register": 0, "bit": 0, "status": "low_alarm"},
                                               {"register": 5, "bit": 1, "status": "high_alarm"}])),
     "profiles.X.flags[1].register", "outside the block"),
    ("profile-warmup-outside", put("profiles.X", detector_profile(warmup={"register": 4})),
     "profiles.X.warmup.register", "outside the block"),
    ("profile-warmup-mask",
     put("profiles.X", detector_profile(warmup={"register": 0, "ready_bit": 15, "remaining_mask": 0xFFFF})),
     "profiles.X.warmup.remaining_mask", "ready bit"),
    ("profile-gas", put("profiles.X", detector_profile(gas="NH3")), "profiles.X.gas", "CH4"),
    # custom station profiles
    ("station-empty", put("profiles.S", {"kind": "extinguisher_station"}), "profiles.S", "at least one"),
    ("station-unknown-point", put("profiles.S", station_profile(smoke={"function": 2, "address": 1})),
     "profiles.S.smoke", "unknown key"),
    ("station-function", put("profiles.S", station_profile(door={"function": 5, "address": 1})),
     "profiles.S.door.function", "1–4"),
    ("station-function-missing", put("profiles.S", station_profile(door={"address": 1})),
     "profiles.S.door.function", "is required"),
    ("station-analog-not-pressure", put("profiles.S", station_profile(door={"function": 4, "address": 1,
                                                                            "min": 0, "max": 1})),
     "profiles.S.door.min", "only for 'pressure'"),
    ("station-analog-on-bits", put("profiles.S", station_profile(pressure={"function": 2, "address": 1,
                                                                           "min": 0.8, "max": 1.4})),
     "profiles.S.pressure.function", "registers (3 or 4)"),
    ("station-analog-range", put("profiles.S", station_profile(pressure={"function": 4, "address": 1,
                                                                         "min": 1.4, "max": 0.8})),
     "profiles.S.pressure.min", "below max"),
    ("station-analog-max-missing", put("profiles.S", station_profile(pressure={"function": 4, "address": 1,
                                                                               "min": 1.4})),
     "profiles.S.pressure.max", "is required"),
    ("station-bit-on-input", put("profiles.S", station_profile(door={"function": 2, "address": 1, "bit": 3})),
     "profiles.S.door.bit", "only for a register"),
    ("station-normal-type", put("profiles.S", station_profile(door={"function": 2, "address": 1, "normal": 1})),
     "profiles.S.door.normal", "true or false"),
    ("station-same-input", put("profiles.S", station_profile(door={"function": 2, "address": 0})),
     "profiles.S.door.address", "already 'presence'"),
    ("station-span", put("profiles.S", {"kind": "extinguisher_station",
                                        "presence": {"function": 3, "address": 0},
                                        "door": {"function": 3, "address": 300}}),
     "profiles.S.door.address", "at most 125"),
    # outputs, relays, linkage
    ("linkage-output", put("linkage[0].output", "fan"), "linkage[0].output", "unknown relay 'fan'"),
    ("linkage-scope-unit", put("linkage[0].scope", "unit:u9"), "linkage[0].scope", "unknown unit 'u9'"),
    ("linkage-scope-household", put("linkage[0].scope", "household:x"), "linkage[0].scope", "unknown household"),
    ("linkage-scope-form", put("linkage[0].scope", "floor:3"), "linkage[0].scope", "'unit:<id>'"),
    ("linkage-signal", put("linkage[0].signal", "smoke"), "linkage[0].signal", "must be one of"),
    ("relay-active-high", put("outputs.relays[0].active_high", "low"), "outputs.relays[0].active_high",
     "true or false"),
    # mqtt
    ("mqtt-port", put("mqtt.port", 70000), "mqtt.port", "≤ 65535"),
    ("mqtt-protocol", put("mqtt.protocol", 4), "mqtt.protocol", "must be one of"),
    ("mqtt-keepalive", put("mqtt.keepalive_s", 1), "mqtt.keepalive_s", "≥ 5"),
    ("mqtt-prefix", put("mqtt.topic_prefix", "safety/#"), "mqtt.topic_prefix", "wildcards"),
    ("mqtt-tls-ca", put("mqtt.tls", {"ca_file": "/nonexistent/ca.pem"}), "mqtt.tls.ca_file", "file not found"),
    ("mqtt-tls-cert-without-key", secret("client.pem", "cert", 0o644, key="mqtt.tls.cert_file"),
     "mqtt.tls.key_file", "given together"),
    ("mqtt-tls-key-readable",
     both(secret("client.pem", "cert", 0o644, key="mqtt.tls.cert_file"),
          secret("client.key", "key", 0o640, key="mqtt.tls.key_file")),
     "mqtt.tls.key_file", "chmod 600"),
    ("mqtt-credentials-group", secret("cred.toml", 'username = "gw"\npassword = "pw"\n', 0o640),
     "mqtt.credentials_file", "accessible by group or others (mode 0640)"),
    ("mqtt-credentials-world", secret("cred.toml", 'username = "gw"\npassword = "pw"\n', 0o604),
     "mqtt.credentials_file", "chmod 600"),
    ("mqtt-credentials-missing", put("mqtt.credentials_file", "/nonexistent/cred.toml"), "mqtt.credentials_file",
     "cannot read"),
    ("mqtt-credentials-keys", secret("cred.toml", 'user = "gw"\npassword = "pw"\n', 0o600),
     "mqtt.credentials_file", "'username' and 'password'"),
    ("mqtt-credentials-toml", secret("cred.toml", "username = gw\n", 0o600), "mqtt.credentials_file",
     "cannot parse"),
    # storage, alarm, runtime
    ("storage-max-mb", put("storage.max_mb", 0), "storage.max_mb", "≥ 1"),
    ("storage-history-days", put("storage.history_days", 7), "storage.history_days", "≥ 30"),
    ("storage-history-events", put("storage.history_min_events", 100), "storage.history_min_events", "≥ 999"),
    ("storage-path", put("storage.path", ""), "storage.path", "must not be empty"),
    ("alarm-offline-ceiling", put("alarm.offline_ceiling_s", 200), "alarm.offline_ceiling_s", "≤ 100"),
    ("alarm-chirp", put("alarm.trouble_chirp_interval_s", 10), "alarm.trouble_chirp_interval_s", "≥ 30"),
    ("runtime-priority", put("runtime.realtime_priority", 100), "runtime.realtime_priority", "≤ 99"),
]


@pytest.mark.parametrize(("edit", "path", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_names_key_path(tmp_path: Path, edit: Edit, path: str, reason: str) -> None:
    doc = base()
    edit(doc, tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert reason in info.value.reason


def test_base_is_valid(tmp_path: Path) -> None:
    cfg = parse_config(base(), base_dir=tmp_path)
    assert [d.id for d in cfg.devices] == ["gas-u1-101", "gas-u2-101", "u1-door"]


def test_same_address_on_two_buses_is_fine(tmp_path: Path) -> None:
    doc = base()
    doc["devices"][1]["bus"] = "bus2"
    doc["devices"][1]["address"] = 1
    cfg = parse_config(doc, base_dir=tmp_path)
    assert [(d.bus, d.address) for d in cfg.devices if d.is_modbus] == [("bus1", 1), ("bus2", 1)]


@pytest.mark.parametrize("spelling", [13, "13", "GPIO13", "gpio13", "BCM13", "BOARD33", "J8:33"])
def test_pin_spellings_are_one_pin(tmp_path: Path, spelling: int | str) -> None:
    doc = base()
    doc["devices"][2]["pin"] = spelling
    assert parse_config(doc, base_dir=tmp_path).device("u1-door").pin == "GPIO13"


def test_defaults(tmp_path: Path) -> None:
    doc = base()
    doc["devices"].append(gas(gas="CO"))
    cfg = parse_config(doc, base_dir=tmp_path)
    ch4, co = cfg.device("gas-u1-101"), cfg.device("gas-x")
    assert (ch4.gas, ch4.measure, ch4.low, ch4.high, ch4.hysteresis) == ("CH4", "%LEL", 10.0, 25.0, 2.0)
    assert (co.gas, co.measure, co.low, co.high, co.hysteresis) == ("CO", "ppm", 50.0, 150.0, 10.0)
    assert cfg.gateway_id == "sunshine-garden-b07"
    assert cfg.mqtt.client_id == "sunshine-garden-b07"
    bus = cfg.buses[0]
    assert (bus.baudrate, bus.parity, bus.stopbits, bus.bytesize) == (9600, "N", 1, 8)
    assert cfg.device("u1-door").contact == "NC"
    assert cfg.device("gas-u1-101").unit == "u1"  # taken from the household


def test_profile_thresholds_are_the_devices_defaults(tmp_path: Path) -> None:
    doc = base()
    doc["profiles"] = {"quiet": detector_profile(thresholds={"low": 15.0, "high": 30.0, "hysteresis": 3.0})}
    doc["devices"].append(gas(profile="quiet"))
    doc["devices"].append(gas(id="gas-y", address=10, profile="quiet", high=40.0))
    cfg = parse_config(doc, base_dir=tmp_path)
    assert (cfg.device("gas-x").low, cfg.device("gas-x").high, cfg.device("gas-x").hysteresis) == (15.0, 30.0, 3.0)
    assert (cfg.device("gas-y").low, cfg.device("gas-y").high) == (15.0, 40.0)


@pytest.mark.parametrize(
    ("thresholds", "path", "reason"),
    [
        ({"low": 30.0, "high": 40.0}, "devices[3].low", "≤ 25"),
        ({"low": 20.0, "high": 15.0}, "devices[3].low", "below high"),
        ({"lo": 1.0}, "profiles.quiet.thresholds.lo", "unknown key"),
        ({"low": -1.0}, "profiles.quiet.thresholds.low", "≥ 0"),
    ],
)
def test_profile_thresholds_are_checked(tmp_path: Path, thresholds: Doc, path: str, reason: str) -> None:
    doc = base()
    doc["profiles"] = {"quiet": detector_profile(thresholds=thresholds)}
    doc["devices"].append(gas(profile="quiet"))
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path)
    assert info.value.path == path
    assert reason in info.value.reason


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    doc = base()
    doc["storage"] = {"path": "data/events.db"}
    doc["control"] = {"socket": "run/control.sock"}
    cfg = parse_config(doc, base_dir=tmp_path)
    assert cfg.storage.path == str(tmp_path / "data" / "events.db")
    assert cfg.control.socket == str(tmp_path / "run" / "control.sock")


def test_credentials_and_tls(tmp_path: Path) -> None:
    cred = tmp_path / "mqtt.toml"
    cred.write_text('username = "gw-b07"\npassword = "s3cret"\n', encoding="utf-8")
    cred.chmod(0o600)
    for name, mode in (("ca.pem", 0o644), ("client.pem", 0o644), ("client.key", 0o600)):
        (tmp_path / name).write_text("x", encoding="utf-8")
        (tmp_path / name).chmod(mode)
    doc = base()
    doc["mqtt"] = {"host": "mqtt.example.org", "credentials_file": "mqtt.toml",
                   "tls": {"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "client.key"}}
    m = parse_config(doc, base_dir=tmp_path).mqtt
    assert (m.username, m.password) == ("gw-b07", "s3cret")
    assert m.port == 8883  # TLS default
    assert m.tls_key_file == str(tmp_path / "client.key")


def test_example_building() -> None:
    cfg = load_config(EXAMPLE)
    assert len(cfg.units) == 2
    assert len(cfg.households) == 12
    detectors = [d for d in cfg.devices if d.kind == "gas_detector"]
    assert len(detectors) == 12
    assert len({d.bus for d in detectors}) == 1 and len(cfg.buses) == 1
    assert sorted(d.household or "" for d in detectors) == sorted(h.id for h in cfg.households)
    assert len({d.address for d in detectors}) == 12
    cabinets = [d for d in cfg.devices if d.kind == "extinguisher_presence"]
    assert sorted(d.unit for d in cabinets) == ["u1", "u2"]
    assert all(d.pin is not None and d.household is None for d in cabinets)
    for unit in ("u1", "u2"):
        kinds = {d.kind for d in cfg.devices if d.unit == unit and d.pin is not None}
        assert {"extinguisher_presence", "pressure_switch", "cabinet_door"} <= kinds
    assert cfg.outputs.buzzer.pin.startswith("GPIO")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.path == str(bad) and "invalid TOML" in info.value.reason


# -- the two programs --------------------------------------------------------------------------------


def _program(name: str, module: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False)


def _config_errors(stderr: str) -> list[str]:
    return [line.split("config error: ", 1)[1] for line in stderr.splitlines() if "config error: " in line]


def _config_error(stderr: str) -> str:
    lines = _config_errors(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace("address = 2", "address = 1"), encoding="utf-8")
    return path


def test_daemon_and_cli_refuse_bad_config_with_the_same_message(bad_config: Path) -> None:
    daemon = _run([*_program("gatewayd", "gateway.daemon"), "--config", str(bad_config)])
    cli = _run([*_program("gatewayctl", "gateway.ops.cli"), "config", "check", str(bad_config)])
    assert daemon.returncode == EX_CONFIG == 78, daemon.stderr
    assert cli.returncode == 1, cli.stderr
    message = _config_error(daemon.stderr)
    line = BASE.splitlines().index("address = 2") + 1  # the second detector's, made "address = 1"
    assert message.startswith(f"line {line}: devices[1].address (device gas-u2-101): address 1 on bus 'bus1' "
                              "is already used")
    assert _config_error(cli.stderr) == message


FIVE_MISTAKES = [  # (line as written in BASE, the mistake, what its error says)
    ('unit = "u2"', 'unit = "u3"', "households[1].unit (household u2-101): unknown unit 'u3'"),
    ('port = "/dev/ttyUSB1"', 'port = "/dev/ttyUSB1"\nbaudrate = 9601', "buses[1].baudrate (bus bus2): must be one of"),
    ("address = 2", "adress = 2", "devices[1].adress (device gas-u2-101): unknown key; did you mean `address`?"),
    ("pin = 13", "pin = 99", "devices[2].pin (device u1-door): BCM pin must be 0–53, got 99"),
    ('output = "valve"', 'output = "valve"\n\n[storage]\nmax_mb = 0', "storage.max_mb: must be ≥ 1, got 0"),
]


def test_every_mistake_in_one_pass_with_its_line_and_id(tmp_path: Path) -> None:
    text = BASE
    for written, mistake, _ in FIVE_MISTAKES:
        assert text.count(written) == 1, written
        text = text.replace(written, mistake)
    path = tmp_path / "five.toml"
    path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    expected = []
    for _, mistake, error in FIVE_MISTAKES:
        key = mistake.splitlines()[-1]
        expected.append(f"line {lines.index(key) + 1}: {error}")

    cli = _run([*_program("gatewayctl", "gateway.ops.cli"), "--config", str(path), "config", "check"])
    daemon = _run([*_program("gatewayd", "gateway.daemon"), "--config", str(path)])
    assert cli.returncode == 1 and daemon.returncode == EX_CONFIG, (cli.stderr, daemon.stderr)
    for stderr in (cli.stderr, daemon.stderr):
        errors = _config_errors(stderr)
        assert len(errors) == 5, stderr
        for got, want in zip(errors, expected, strict=True):
            assert got.startswith(want), (got, want)


def test_errors_past_the_limit_are_counted(tmp_path: Path) -> None:
    doc = base()
    doc["households"] += [{"id": f"h{n}", "unit": "nowhere"} for n in range(30)]
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path)
    shown = info.value.lines()
    assert len(shown) == 21 and shown[-1].startswith("… and 10 more errors")
    assert all("unknown unit 'nowhere'" in line for line in shown[:20])


def test_cli_accepts_good_config(tmp_path: Path) -> None:
    ok = _run([*_program("gatewayctl", "gateway.ops.cli"), "config", "check", str(EXAMPLE)])
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "12 households" in ok.stdout


def test_loaded_config_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(BASE, encoding="utf-8")
    cfg = load_config(path)
    assert isinstance(cfg, SiteConfig) and cfg.source == str(path)


# -- docs/config.md stays in step with the code ---------------------------------------------------------------

DOCS = ROOT / "docs" / "config.md"


def test_every_config_field_is_documented() -> None:
    import dataclasses as dc

    from gateway import config as c

    text = DOCS.read_text(encoding="utf-8")
    not_keys = {"detector_profile", "station_profile", "tls", "username", "password",  # derived or in other files
                "controller"}
    renamed = {"tls_ca_file": "ca_file", "tls_cert_file": "cert_file", "tls_key_file": "key_file",
               "tls_insecure": "insecure"}
    classes = (c.BusConfig, c.DeviceConfig, c.RelayConfig, c.AlarmSettings, c.MqttConfig, c.StorageConfig,
               c.ControlConfig, c.RuntimeConfig, c.UnitConfig, c.HouseholdConfig)
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dc.fields(cls)
               if f.name not in not_keys and f"`{renamed.get(f.name, f.name)}`" not in text]
    assert not missing, f"keys missing from docs/config.md: {missing}"


def test_profile_examples_in_the_docs_validate(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    profiles = [tomllib.loads(block)["profiles"] for block in blocks if "[profiles." in block]
    assert len(profiles) == 4  # quad, co-meter, ctrl4 (reads), a station
    doc = base()
    doc["profiles"] = {name: body for p in profiles for name, body in p.items()}
    cfg = parse_config(doc, base_dir=tmp_path)
    assert cfg.devices  # the profiles parsed along with the site


def test_an_unknown_array_of_tables_is_named_with_its_line(tmp_path: Path) -> None:
    """``[[buses_x]]`` (a mistyped ``[[buses]]``) at the top level: the error names the key and its line."""
    text = BASE + '\n[[buses_x]]\nid = "bus9"\nport = "/dev/ttyUSB9"\n'
    path = tmp_path / "typo.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = getattr(info.value, "errors", [info.value])
    assert [(e.path, e.line) for e in errors] == [("buses_x", text.splitlines().index("[[buses_x]]") + 1)]
    assert "unknown key" in errors[0].reason
