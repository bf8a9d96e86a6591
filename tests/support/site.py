"""Small, valid site configs for tests: N households with one gas detector each on one bus.

``build_site(...)`` returns a :class:`SiteSpec` whose ``toml`` is a complete site file (parseable by
``gateway.config.load_config``) and whose ``detectors`` say which household, unit and bus address each
detector has, so a test can put matching simulated detectors on the bus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ContactSpec", "DetectorSpec", "SiteSpec", "build_site"]


@dataclass(frozen=True)
class DetectorSpec:
    """One gas detector of the generated site."""

    id: str
    household: str
    unit: str
    address: int


@dataclass(frozen=True)
class ContactSpec:
    """A GPIO dry contact to add to the site (``kind`` as in the config, e.g. ``cabinet_door``)."""

    id: str
    kind: str
    pin: int
    unit: str = "u1"
    contact: str = "NO"
    household: str | None = None


@dataclass(frozen=True)
class SiteSpec:
    """A generated site file and what is in it."""

    toml: str
    community: str
    building: str
    topic_prefix: str
    buzzer_pin: int
    detectors: list[DetectorSpec] = field(default_factory=list)
    contacts: list[ContactSpec] = field(default_factory=list)

    @property
    def topic_base(self) -> str:
        """``<prefix>/<community>/<building>``: the gateway's MQTT subtree."""
        return f"{self.topic_prefix}/{self.community}/{self.building}"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the TOML to ``path`` and return it."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.toml, encoding="utf-8")
        return p


def _q(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


def build_site(
    *,
    bus_port: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    broker_port: int,
    socket_path: str | os.PathLike[str],
    households: int = 1,
    units: int = 1,
    profile: str = "A",
    first_address: int = 1,
    contacts: Sequence[ContactSpec] = (),
    buzzer_pin: int = 18,
    broker_host: str = "127.0.0.1",
    community: str = "test-community",
    building: str = "b01",
    topic_prefix: str = "safety",
    timeout_s: float = 0.2,
    poll_interval_s: float = 0.2,
    offline_after_failures: int = 3,
    telemetry_interval_s: float = 60.0,
    telemetry_batch_s: float = 0.1,
    realtime_priority: int = 0,
    mqtt_protocol: int | None = None,
) -> SiteSpec:
    """A site with ``households`` households spread over ``units`` units, one gas detector each on one bus.

    Detector ``i`` (0-based) is ``gas-<household>`` at bus address ``first_address + i``. GPIO contacts
    in ``contacts`` are added as devices; the buzzer is on ``buzzer_pin``. Runtime tuning is set for a test
    process: no ``gc.freeze()`` and no real-time scheduling.
    """
    if households < 1 or units < 1:
        raise ValueError("need at least one household and one unit")
    if first_address + households - 1 > 247:
        raise ValueError("bus addresses run past 247")
    lines = [
        "[site]",
        f"community = {_q(community)}",
        f"building = {_q(building)}",
        "",
    ]
    unit_ids = [f"u{n + 1}" for n in range(units)]
    for uid in unit_ids:
        lines += ["[[units]]", f"id = {_q(uid)}", ""]
    detectors: list[DetectorSpec] = []
    for i in range(households):
        unit = unit_ids[i % units]
        household = f"{unit}-h{i + 1:03d}"
        lines += ["[[households]]", f"id = {_q(household)}", f"unit = {_q(unit)}", ""]
        detectors.append(DetectorSpec(f"gas-{household}", household, unit, first_address + i))
    lines += [
        "[[buses]]",
        'id = "bus1"',
        f"port = {_q(bus_port)}",
        "baudrate = 9600",
        f"timeout_s = {timeout_s}",
        f"poll_interval_s = {poll_interval_s}",
        "",
    ]
    for det in detectors:
        lines += [
            "[[devices]]",
            f"id = {_q(det.id)}",
            'kind = "gas_detector"',
            f"household = {_q(det.household)}",
            'bus = "bus1"',
            f"address = {det.address}",
            f"profile = {_q(profile)}",
            "",
        ]
    for c in contacts:
        lines += ["[[devices]]", f"id = {_q(c.id)}", f"kind = {_q(c.kind)}"]
        lines.append(f"household = {_q(c.household)}" if c.household else f"unit = {_q(c.unit)}")
        lines += [f"pin = {c.pin}", f"contact = {_q(c.contact)}", ""]
    lines += [
        "[outputs]",
        f"buzzer = {{ pin = {buzzer_pin}, active_high = true }}",
        "",
        "[alarm]",
        f"offline_after_failures = {offline_after_failures}",
        f"telemetry_interval_s = {telemetry_interval_s}",
        "",
        "[mqtt]",
        f"host = {_q(broker_host)}",
        f"port = {broker_port}",
        f"topic_prefix = {_q(topic_prefix)}",
        *([] if mqtt_protocol is None else [f"protocol = {mqtt_protocol}"]),
        "",
        "[storage]",
        f"path = {_q(db_path)}",
        f"telemetry_batch_s = {telemetry_batch_s}",
        "",
        "[control]",
        f"socket = {_q(socket_path)}",
        "",
        "[runtime]",
        f"realtime_priority = {realtime_priority}",
        "gc_freeze = false",
        "",
    ]
    return SiteSpec(
        toml="\n".join(lines),
        community=community,
        building=building,
        topic_prefix=topic_prefix,
        buzzer_pin=buzzer_pin,
        detectors=detectors,
        contacts=list(contacts),
    )
