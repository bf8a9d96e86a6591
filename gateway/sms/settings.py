"""What the SMS process needs of the site, handed to it by the panel that validated the site file.

The panel loads and checks the whole site file (:mod:`gateway.config`) before it starts the SMS process, and
passes it the building's identity and the ``[sms]`` section as JSON in ``GATEWAY_SMS_SETTINGS``. So the SMS
process does not import the site file's parser and the register maps (about 4.5 MB of its memory, for a
section it only reads), and it runs with the settings the panel routes events by. The environment, not the
command line: the SIM PIN must not show in ``ps``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import SiteConfig

__all__ = ["ENV", "SettingsError", "SmsSettings"]

ENV = "GATEWAY_SMS_SETTINGS"


class SettingsError(ValueError):
    """The settings in the environment cannot be used (the SMS process exits 78)."""


@dataclass(frozen=True, slots=True)
class SmsSettings:
    """The building's identity and every field of :class:`gateway.config.SmsConfig` (docs/config.md, "SMS")."""

    community: str
    building: str
    device: str
    contacts: str
    mode: str
    after_s: float
    language: str
    max_per_hour: int
    pin: str | None
    queue: str
    connection: str
    check_interval_s: float
    smsc: str | None

    @classmethod
    def of(cls, cfg: SiteConfig) -> SmsSettings:
        """The settings of a validated site with an ``[sms]`` section (a new ``SmsConfig`` field fails here)."""
        if cfg.sms is None:
            raise SettingsError("sms: no [sms] section: nothing to do")
        return cls(community=cfg.community, building=cfg.building, **asdict(cfg.sms))

    def environment(self) -> dict[str, str]:
        """The environment variable that carries these settings to the SMS process."""
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SmsSettings | None:
        """The settings the panel passed; None when it passed none (the process was started by hand)."""
        text = environ.get(ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"{ENV}: not JSON ({exc})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = set(data) if isinstance(data, dict) else set()
            raise SettingsError(f"{ENV}: fields differ from this version's (missing {sorted(names - got)}, "
                                f"unknown {sorted(got - names)})")
        return cls(**data)
