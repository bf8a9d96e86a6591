"""MQTT topic layout: one subtree per community and building, so a broker ACL can give a gateway exactly its own.

Every topic of a building's gateway lies under ``<prefix>/<community>/<building>/``:

=========================  =========  ===========================================================
``availability``           out, kept  online / offline (the Will says offline too), retained
``birth``                  out, kept  full current state after every connect, retained
``status``                 out        uplink, backlog, device health and link quality, every 60 s
``event/<kind>``           out        alarm, fault, supervisory, telemetry, test, reset, ...
``command/<name>``         in         the remote commands (``gateway.uplink.contract.COMMANDS``)
``reply`` (``reply/...``)  out        one result per command (MQTT 5 response topics go below it)
=========================  =========  ===========================================================

Commands in and results out live in separate subtrees, so the gateway never receives its own results and the
ACL can say "write everything except ``command/``, read only ``command/``" (see docs/mqtt.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics", "valid_level"]


def valid_level(value: str) -> bool:
    """Whether ``value`` can be one topic level: non-empty, no ``/``, no wildcards, no NUL."""
    return bool(value) and not any(c in value for c in "/+#\x00")


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one building's gateway."""

    prefix: str
    community: str
    building: str

    def __post_init__(self) -> None:
        for name in ("community", "building"):
            if not valid_level(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} cannot be a topic level")
        if not self.prefix or any(not valid_level(level) for level in self.prefix.split("/")):
            raise ValueError(f"topic prefix {self.prefix!r} must be plain topic levels without wildcards")

    @property
    def base(self) -> str:
        """``<prefix>/<community>/<building>``: the gateway's own subtree."""
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

    def command(self, name: str) -> str:
        """The topic a server publishes command ``name`` to."""
        return f"{self.base}/command/{name}"

    @property
    def command_filter(self) -> str:
        """What the gateway subscribes to."""
        return f"{self.base}/command/+"

    def command_name(self, topic: str) -> str | None:
        """The command name of a topic under :attr:`command_filter`, else None."""
        head = f"{self.base}/command/"
        if not topic.startswith(head):
            return None
        name = topic[len(head):]
        return name if valid_level(name) else None

    @property
    def reply(self) -> str:
        """Where command results go when the command named no (acceptable) response topic."""
        return f"{self.base}/reply"

    def is_reply_topic(self, topic: str) -> bool:
        """Whether a requested MQTT 5 response topic lies in this gateway's reply subtree (no wildcards)."""
        if topic != self.reply and not topic.startswith(self.reply + "/"):
            return False
        return all(valid_level(level) for level in topic.split("/"))

    @property
    def community_filter(self) -> str:
        """Everything every gateway of the community publishes (for a central consumer)."""
        return f"{self.prefix}/{self.community}/+/#"
