"""MQTT topic layout: one subtree per community and building, so a broker ACL can give a gateway exactly its own.

``<prefix>/<community>/<building>/`` then ``availability`` (retained), ``birth`` (retained), ``status``,
``event/<kind>``, ``command/<name>`` (in) and ``command/result`` (out).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics"]


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one building's gateway."""

    prefix: str
    community: str
    building: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.community}/{self.building}"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def birth(self) -> str:
        return f"{self.base}/birth"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def event(self, kind: str) -> str:
        return f"{self.base}/event/{kind}"

    @property
    def command_filter(self) -> str:
        return f"{self.base}/command/+"

    @property
    def command_result(self) -> str:
        return f"{self.base}/command/result"
