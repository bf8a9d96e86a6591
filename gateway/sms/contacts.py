"""Who to tell by SMS: the building's contacts, in the central server's format (fleet/contacts.py).

The file (``[sms] contacts``) holds phone numbers, personal information: it must be owned by the service and
readable by it alone (mode 0600), and only this building's entries are taken. Numbers never leave this module's
callers into events, logs, status or MQTT: :func:`mask` is what they show.

* a household's alarm → that household's relatives and its unit head;
* a unit's device (an extinguisher cabinet) → the unit head;
* a fault → the building's technician (the building head when the file names no technician).
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Contacts", "ContactsError", "Person", "mask"]


class ContactsError(ValueError):
    """The contacts file cannot be used; the text says why (never a number)."""


@dataclass(frozen=True, slots=True)
class Person:
    """One recipient: a name, a number and the role they have here."""

    name: str
    phone: str
    role: str  # relative | unit head | building head | technician


@dataclass
class Contacts:
    """This building's contacts."""

    technicians: list[Person] = field(default_factory=list)
    building_heads: list[Person] = field(default_factory=list)
    unit_heads: dict[str, list[Person]] = field(default_factory=dict)
    relatives: dict[str, list[Person]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str], community: str, building: str) -> Contacts:
        """Read the file; :class:`ContactsError` when it is missing, too open, or not in the expected shape."""
        p = os.fspath(path)  # not pathlib, which the SMS process does without (with urllib.parse and ipaddress)
        try:
            st = os.stat(p)
        except OSError as exc:
            raise ContactsError(f"contacts file {p}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ContactsError(f"contacts file {p} is accessible by group or others "
                                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        try:
            with open(p, encoding="utf-8") as f:
                data = tomllib.loads(f.read())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ContactsError(f"contacts file {p}: cannot parse: {type(exc).__name__}") from None
        prefix = f"{community}/{building}"
        out = cls()
        entry = _table(data.get("buildings", {}), "buildings").get(prefix, {})
        out.building_heads = _people(entry, "head", "building head", f'buildings."{prefix}"')
        out.technicians = _people(entry, "technician", "technician", f'buildings."{prefix}"')
        for place, unit in _table(data.get("units", {}), "units").items():
            if place.startswith(prefix + "/"):
                out.unit_heads[place[len(prefix) + 1:]] = _people(unit, "head", "unit head", f'units."{place}"')
        for place, home in _table(data.get("households", {}), "households").items():
            if place.startswith(prefix + "/"):
                out.relatives[place[len(prefix) + 1:]] = _people(home, "relatives", "relative",
                                                                 f'households."{place}"')
        return out

    def whom(self, kind: str, unit: str | None, household: str | None) -> list[Person]:
        """The people to tell about an event of ``kind`` in ``unit``/``household`` (each number once)."""
        if kind == "fault" or unit is None:
            people = self.technicians or self.building_heads
        elif household is None:
            people = self.unit_heads.get(unit, [])
        else:
            people = self.relatives.get(household, []) + self.unit_heads.get(unit, [])
        seen: set[str] = set()
        out = []
        for person in people:
            if person.phone not in seen:
                seen.add(person.phone)
                out.append(person)
        return out

    def counts(self) -> dict[str, int]:
        """How many people per role (what status shows instead of numbers)."""
        return {
            "technicians": len(self.technicians),
            "building_heads": len(self.building_heads),
            "unit_heads": sum(len(v) for v in self.unit_heads.values()),
            "relatives": sum(len(v) for v in self.relatives.values()),
        }


def mask(phone: str) -> str:
    """A number as status and logs may show it: its last four digits."""
    digits = [c for c in phone if c.isdigit()]
    return "*" * max(0, len(digits) - 4) + "".join(digits[-4:])


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ContactsError(f"contacts file: [{where}] must be a table")
    return value


def _people(entry: Any, key: str, role: str, where: str) -> list[Person]:
    if not isinstance(entry, dict):
        raise ContactsError(f"contacts file: {where} must be a table")
    raw = entry.get(key)
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    people = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("phone"), str):
            raise ContactsError(f"contacts file: {where}.{key}[{i}] needs a phone string")
        phone = "".join(item["phone"].split())
        if not phone.lstrip("+").isdigit() or not 3 <= len(phone.lstrip("+")) <= 20:
            raise ContactsError(f"contacts file: {where}.{key}[{i}].phone is not a phone number")
        people.append(Person(str(item.get("name", "")), phone, role))
    return people
