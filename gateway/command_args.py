"""The arguments of every operator command, as msgspec structs: what the command door accepts, and the narrower
set the MQTT contract accepts (``schemas/command.json``), side by side.

:data:`LOCAL` is what :class:`gateway.control.commands.CommandHandler` reads for every source (``gatewayctl``, the
duty desk, MQTT commands passed on by the storage process): a null is the same as an absent argument.
:data:`REMOTE` is what :class:`gateway.uplink.contract.CommandGate` admits from the network, exactly as the
published JSON Schema does (tests/test_contract.py feeds both the same samples). Rules across arguments are the
structs' ``__post_init__``; rules that need the site (a known device, a relay) stay in the handler.
:func:`reason` words a refusal as the command door always has (``scan: from: must be 1–247, got 300``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct, UnsetType

from drivers.profiles import toml_type_name
from gateway.validation import Problem

__all__ = ["EVENTS_MAX", "LOCAL", "REMOTE", "Args", "EventsArgs", "ReadArgs", "RelayTestArgs", "ScanArgs", "reason",
           "typename"]

#: Events returned at most by one ``events`` call (over MQTT: :data:`REMOTE_EVENTS_MAX`).
EVENTS_MAX = 10_000
REMOTE_EVENTS_MAX = 200
#: The event kinds a query may name (gateway.events.KIND_PRIORITY; the schema's enum).
EVENT_KINDS = ("alarm", "fault", "supervisory", "telemetry", "test", "reset", "silence", "relay", "system")
#: Arguments given as epoch seconds or an ISO 8601 time.
TIME_KEYS = frozenset({"since", "until"})

_V = TypeVar("_V")
Text = Annotated[str, Meta(min_length=1, max_length=200)]
Seq = Annotated[int, Meta(ge=1, le=2**53)]
Instant = Annotated[float, Meta(ge=0)] | str
#: An id in the MQTT contract (a device, household, bus or relay).
RemoteId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\u0000-\u001f/+#]+$",
                               description="an id of 1-64 characters without control characters, '/', '+' or '#'")]
#: A time in the MQTT contract: RFC 3339 with seconds.
TIME_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$")
RemoteTime = Annotated[str, Meta(pattern=TIME_PATTERN, description="an RFC 3339 time (2026-01-31T12:00:00Z)")]
#: Longest pattern of a buzzer test, longest relay test.
BUZZER_TEST_MAX_S = 5.0
RELAY_TEST_MAX_S = 60.0
Seconds = Annotated[float, Meta(ge=0.1, le=BUZZER_TEST_MAX_S)]
RelaySeconds = Annotated[float, Meta(ge=0.1, le=RELAY_TEST_MAX_S)]
Address = Annotated[int, Meta(ge=1, le=247)]


class Args(Struct, kw_only=True, forbid_unknown_fields=True):
    """A command without arguments (and the base of those with some)."""


def _one_target(device: str | None, everything: bool | None) -> None:
    if device is not None and everything:
        raise ValueError("give either 'device' or 'all', not both")
    if device is None and not everything:
        raise ValueError("give 'device' or 'all': true")


def _session_rules(install: str | None, session: int | None, from_seq: int | None, to_seq: int | None) -> None:
    if install is not None and not (len(install) == 16 and all(c in "0123456789abcdef" for c in install)):
        raise ValueError("install: must be 16 lower-case hex digits")
    if session is None and (install, from_seq, to_seq) != (None, None, None):
        raise ValueError("install, from_seq and to_seq need a session")


class TargetArgs(Args):
    """``reset`` and ``test``: one device, or all."""

    device: Text | None = None
    all: bool | None = None

    def __post_init__(self) -> None:
        _one_target(self.device, self.all)


class EventsArgs(Args):
    """``events``: a history query (the handler checks the ids against the site)."""

    limit: Annotated[int, Meta(ge=1, le=EVENTS_MAX)] | None = None
    since: Instant | None = None
    until: Instant | None = None
    device: Text | None = None
    household: Text | None = None
    kind: Text | None = None
    install: Text | None = None
    session: Seq | None = None
    from_seq: Seq | None = None
    to_seq: Seq | None = None

    def __post_init__(self) -> None:
        _session_rules(self.install, self.session, self.from_seq, self.to_seq)


class ReadArgs(Args):
    device: Text
    raw: bool | None = None


class ScanArgs(Args):
    bus: Text
    first: Address | None = msgspec.field(default=None, name="from")
    last: Address | None = msgspec.field(default=None, name="to")
    pause_polling: bool | None = None


class BuzzerTestArgs(Args):
    seconds_per_pattern: Seconds | None = None


class RelayTestArgs(Args):
    output: Text
    seconds: RelaySeconds | None = None


class SmsTestArgs(Args):
    number: Annotated[str, Meta(min_length=1, max_length=32)]


#: Every command the door knows and its arguments.
LOCAL: dict[str, type[Args]] = {
    "silence": Args, "reset": TargetArgs, "test": TargetArgs, "status": Args, "rebirth": Args,
    "events": EventsArgs, "read": ReadArgs, "scan": ScanArgs, "buzzer_test": BuzzerTestArgs,
    "relay_test": RelayTestArgs, "config_show": Args, "sms_test": SmsTestArgs,
}


# ------------------------------------------------------------------------------------------- MQTT


class RemoteTargetArgs(Args):
    device: RemoteId | UnsetType = msgspec.UNSET
    all: Literal[True] | UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        _one_target(self.device or None, self.all or None)


class RemoteEventsArgs(Args):
    limit: Annotated[int, Meta(ge=1, le=REMOTE_EVENTS_MAX)] | UnsetType = msgspec.UNSET
    since: Annotated[float, Meta(ge=0)] | RemoteTime | UnsetType = msgspec.UNSET
    device: RemoteId | UnsetType = msgspec.UNSET
    household: RemoteId | UnsetType = msgspec.UNSET
    kind: Literal["alarm", "fault", "supervisory", "telemetry", "test", "reset", "silence", "relay",
                  "system"] | UnsetType = msgspec.UNSET
    install: Annotated[str, Meta(pattern="^[0-9a-f]{16}$")] | UnsetType = msgspec.UNSET
    session: Seq | UnsetType = msgspec.UNSET
    from_seq: Seq | UnsetType = msgspec.UNSET
    to_seq: Seq | UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        _session_rules(_given(self.install), _given(self.session), _given(self.from_seq), _given(self.to_seq))


def _given(value: _V | UnsetType) -> _V | None:
    return None if isinstance(value, UnsetType) else value


class RemoteScanArgs(Args):
    bus: RemoteId
    first: Address | UnsetType = msgspec.field(default=msgspec.UNSET, name="from")
    last: Address | UnsetType = msgspec.field(default=msgspec.UNSET, name="to")
    pause_polling: bool | UnsetType = msgspec.UNSET


class RemoteBuzzerTestArgs(Args):
    seconds_per_pattern: Seconds | UnsetType = msgspec.UNSET


class RemoteRelayTestArgs(Args):
    output: RemoteId
    seconds: RelaySeconds | UnsetType = msgspec.UNSET


#: The arguments of every remote command (``gateway.uplink.contract.COMMANDS``) and whether they are required.
REMOTE: dict[str, tuple[type[Args], bool]] = {
    "silence": (Args, False), "status": (Args, False), "rebirth": (Args, False),
    "reset": (RemoteTargetArgs, True), "test": (RemoteTargetArgs, True), "events": (RemoteEventsArgs, False),
    "buzzer_test": (RemoteBuzzerTestArgs, False), "relay_test": (RemoteRelayTestArgs, True),
    "scan": (RemoteScanArgs, True),
}


# ------------------------------------------------------------------------------------------- words


def reason(command: str, problem: Problem, kind: type[Args] | None = None) -> str:
    """The refusal of ``command``'s arguments (as ``kind``, by default :data:`LOCAL`'s) as the door words it;
    ``problem``'s path starts at the args."""
    if not problem.path:
        if problem.kind == "rule":
            return f"{command}: {problem.text}"
        return f"{command}: args must be an object, got {typename(problem.value)}"
    key = str(problem.path[0])
    if problem.kind == "unknown":
        allowed = sorted((kind or LOCAL.get(command, Args)).__struct_encode_fields__)
        return f"{command}: unknown argument {key[:40]!r} (allowed: {', '.join(allowed) or 'none'})"
    if problem.kind == "rule":
        return f"{command}: {problem.text}"
    if key in TIME_KEYS and problem.kind in ("type", "bound") and not isinstance(problem.value, str):
        return f"{command}: {key}: must be epoch seconds or an ISO 8601 time, got {typename(problem.value)}"
    return f"{command}: {key}: {problem.reason(typename)}"


def typename(value: Any) -> str:
    """A value's JSON type as a person says it (``an integer``, ``null``, ``an object``)."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    return toml_type_name(value)
