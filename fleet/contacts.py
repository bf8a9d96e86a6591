"""Who to tell about an event: the routing rule of the reference consumer (examples/consumer.py) and the central
inbox (fleet/inbox.py), from a mapping file of the server's own (examples/consumer-contacts.toml).

* an event in a household → that household's relatives and the head of its unit;
* an event in a unit without a household (an extinguisher cabinet) → the unit head;
* a fault, or anything without a unit → the building head.

The notifier (fleet/notifier.py) reads more from the same file: each person's Apprise ``urls``, households
marked ``alone = true``, and each community's ``grid_worker`` and ``duty_desk`` (``[communities."<id>"]``).

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
    urls: tuple[str, ...] = ()
    """Apprise URLs of this person's channels (the notifier's; empty: the community's SMS provider, by phone)."""


@dataclass
class Contacts:
    """Who to tell, keyed by "<community>/<building>[/<unit or household>]" (examples/consumer-contacts.toml)."""

    building_heads: dict[str, list[Person]] = field(default_factory=dict)
    unit_heads: dict[str, list[Person]] = field(default_factory=dict)
    relatives: dict[str, list[Person]] = field(default_factory=dict)
    alone: set[str] = field(default_factory=set)
    """Households ("<community>/<building>/<household>") of an elderly person living alone."""
    grid_workers: dict[str, list[Person]] = field(default_factory=dict)
    """The community's grid worker(s), by community id."""
    duty_desks: dict[str, list[Person]] = field(default_factory=dict)
    """The community's duty desk (the last step of the ladder), by community id."""

    @classmethod
    def load(cls, path: str | Path) -> Contacts:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))

        def people(section: str, key: str, role: str, many: bool) -> dict[str, list[Person]]:
            out: dict[str, list[Person]] = {}
            for place, entry in data.get(section, {}).items():
                raw = entry.get(key, [] if many else None)
                items = raw if many else [raw] if raw else []
                out[place] = [Person(p["name"], p.get("phone", ""), role, tuple(p.get("urls", ()))) for p in items]
            return out

        return cls(building_heads=people("buildings", "head", "building head", many=False),
                   unit_heads=people("units", "head", "unit head", many=False),
                   relatives=people("households", "relatives", "relative", many=True),
                   alone={k for k, v in data.get("households", {}).items() if v.get("alone") is True},
                   grid_workers=people("communities", "grid_worker", "grid worker", many=False),
                   duty_desks=people("communities", "duty_desk", "duty desk", many=False))

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

    def is_alone(self, event: Mapping[str, Any]) -> bool:
        """Whether the event's household is marked ``alone``."""
        household = event.get("household")
        return household is not None and f"{event['community']}/{event['building']}/{household}" in self.alone

    def with_role(self, role: str, event: Mapping[str, Any]) -> list[Person]:
        """The people holding ``role`` for ``event``'s place (empty when the place has none, or the role is unknown)."""
        building = f"{event['community']}/{event['building']}"
        unit, household = event.get("unit"), event.get("household")
        if role == "building head":
            return self.building_heads.get(building, [])
        if role == "unit head":
            return self.unit_heads.get(f"{building}/{unit}", []) if unit is not None else []
        if role == "relative":
            return self.relatives.get(f"{building}/{household}", []) if household is not None else []
        if role == "grid worker":
            return self.grid_workers.get(str(event["community"]), [])
        if role == "duty desk":
            return self.duty_desks.get(str(event["community"]), [])
        return []


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
