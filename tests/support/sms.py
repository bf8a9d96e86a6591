"""A site with the SMS path: its contacts file (mode 0600) and an ``[sms]`` section on a simulated modem."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import SiteConfig, load_config
from tests.support.modem import Submitted, reassemble
from tests.support.site import SiteSpec

__all__ = ["SmsSite", "by_number", "sms_site"]

RELATIVES = ("+8613900000101", "+8613900000102")
UNIT_HEAD = "+8613900000201"
TECHNICIAN = "+8613900000301"
BUILDING_HEAD = "+8613900000401"


@dataclass
class SmsSite:
    spec: SiteSpec
    cfg: SiteConfig
    contacts: Path
    queue: Path


def sms_site(tmp_path: Path, spec: SiteSpec, modem_port: str, *, after_s: float = 3.0, extra: str = "",
             mode: str = "fallback", max_per_hour: int = 10, check_interval_s: float = 5.0) -> SmsSite:
    """Write the contacts file for ``spec``'s first household and the site file with ``[sms]``."""
    det = spec.detectors[0]
    key = f"{spec.community}/{spec.building}"
    contacts = tmp_path / "sms-contacts.toml"
    contacts.write_text("\n".join([
        f'[buildings."{key}"]',
        f'head = {{ name = "Building head", phone = "{BUILDING_HEAD}" }}',
        f'technician = {{ name = "Technician", phone = "{TECHNICIAN}" }}',
        f'[units."{key}/{det.unit}"]',
        f'head = {{ name = "Unit head", phone = "{UNIT_HEAD}" }}',
        f'[households."{key}/{det.household}"]',
        "relatives = [" + ", ".join(f'{{ name = "Relative {n}", phone = "{p}" }}' for n, p in enumerate(RELATIVES))
        + "]",
        '[households."other/building/u1-h001"]',
        'relatives = [{ name = "Not ours", phone = "+8613999999999" }]',
        "",
    ]), encoding="utf-8")
    os.chmod(contacts, 0o600)
    queue = tmp_path / "sms.db"
    section = "\n".join([
        "[sms]",
        f'device = "{modem_port}"',
        f'contacts = "{contacts}"',
        f'queue = "{queue}"',
        f'mode = "{mode}"',
        f"after_s = {after_s}",
        f"max_per_hour = {max_per_hour}",
        f"check_interval_s = {check_interval_s}",
        "",
    ])
    path = tmp_path / "site.toml"
    path.write_text(spec.toml + "\n" + section + "\n" + extra + "\n", encoding="utf-8")
    return SmsSite(spec, load_config(path), contacts, queue)


def by_number(items: list[Submitted]) -> dict[str, list[dict[str, Any]]]:
    """The recorded submissions, joined by Gammu, per recipient number."""
    out: dict[str, list[dict[str, Any]]] = {}
    for message in reassemble(items):
        out.setdefault(str(message["Number"]), []).append(message)
    return out
