"""Who to tell about an event: the routing rule of the reference consumer (examples/consumer.py) and the central
inbox (fleet/inbox.py), from a mapping file of the server's own (examples/consumer-contacts.toml).

* an event in a household → that household's relatives and the head of its unit;
* an event in a unit without a household (an extinguisher cabinet) → the unit head;
* a fault, or anything without a unit → the building head.

Standard library only, so the reference consumer needs nothing but paho-mqtt besides it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Contacts", "Person", "write_contacts"]


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    phone: str
    role: str


@dataclass
class Contacts:
    """Who to tell, keyed by "<community>/<building>[/<unit or household>]" (examples/consumer-contacts.toml)."""

    building_heads: dict[str, list[Person]] = field(default_factory=dict)
    unit_heads: dict[str, list[Person]] = field(default_factory=dict)
    relatives: dict[str, list[Person]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Contacts:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))

        def people(section: str, key: str, role: str, many: bool) -> dict[str, list[Person]]:
            out: dict[str, list[Person]] = {}
            for place, entry in data.get(section, {}).items():
                raw = entry.get(key, [] if many else None)
                items = raw if many else [raw] if raw else []
                out[place] = [Person(p["name"], p["phone"], role) for p in items]
            return out

        return cls(building_heads=people("buildings", "head", "building head", many=False),
                   unit_heads=people("units", "head", "unit head", many=False),
                   relatives=people("households", "relatives", "relative", many=True))

    def whom(self, event: Mapping[str, Any]) -> list[Person]:
        """The people to tell about ``event``."""
        building = f"{event['community']}/{event['building']}"
        unit, household = event.get("unit"), event.get("household")
        if event["kind"] == "fault" or unit is None:
            return self.building_heads.get(building, [])
        unit_head = self.unit_heads.get(f"{building}/{unit}", [])
        if household is None:
            return unit_head
        return self.relatives.get(f"{building}/{household}", []) + unit_head


def write_contacts(path: str | Path, community: str, buildings: Iterable[str], units: Sequence[str],
                   households: Sequence[str]) -> None:
    """A made-up contacts file for simulated buildings (one head each, one relative per household)."""
    lines = ["# Made-up people for simulated buildings (format of examples/consumer-contacts.toml)."]
    for n, building in enumerate(buildings):
        key = f"{community}/{building}"
        lines += [f'[buildings."{key}"]', f'head = {{ name = "Head of {building}", phone = "+0 {n:06d} 00" }}']
        for unit in units:
            lines += [f'[units."{key}/{unit}"]', f'head = {{ name = "Head of {building} {unit}", '
                                                  f'phone = "+0 {n:06d} {unit}" }}']
        for household in households:
            person = f'{{ name = "Relative of {building} {household}", phone = "+0 {n:06d} {household}" }}'
            lines += [f'[households."{key}/{household}"]', f"relatives = [{person}]"]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
