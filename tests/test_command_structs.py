"""The command structs and the published JSON Schema agree: fed the same sample commands, valid and invalid,
several per command, they accept and refuse the same ones.

The gate validates with the structs (gateway/uplink/contract.py, gateway/command_args.py); the schema stays the
contract the central server reads (gateway/uplink/schemas/command.json). The few places where the structs are
deliberately stricter are listed in :data:`STRICTER`, each checked to be refused by the structs.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from gateway.command_args import REMOTE
from gateway.uplink.contract import COMMANDS, Rejected, check_command, command_message, validator

#: A valid command of each name (its arguments).
VALID_ARGS: dict[str, dict[str, Any]] = {
    "silence": {}, "status": {}, "rebirth": {},
    "reset": {"device": "gas-1"}, "test": {"all": True},
    "events": {"limit": 5, "since": "2026-01-31T12:00:00Z", "kind": "alarm"},
    "buzzer_test": {"seconds_per_pattern": 0.5}, "relay_test": {"output": "valve-1", "seconds": 3},
    "scan": {"bus": "bus1", "from": 1, "to": 20, "pause_polling": True},
}
#: Argument names tried beside a command's own: one no command has, one only the local door has, and another
#: command's.
OTHER_ARGS = ("bogus", "until", "device", "bus")
#: Values tried for every argument and field: each type, each bound and a step past it.
VALUES: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 7, 200, 201, 247, 248, 2**53, 0.05, 0.1, 1.5, 5, 5.5, 60, 61, -0.5, "", "x",
    "gas-1", "a/b", "tab\there", "a" * 64, "a" * 65, "2026-01-31T12:00:00Z", "2026-01-31T12:00:00.5+08:00",
    "2026-01-31 12:00", "yesterday", "0123456789abcdef", "0123456789ABCDEF", "alarm", "party", [], ["x"], {},
    {"a": 1},
)
#: Envelope fields and what they are replaced with.
ENVELOPE = ("version", "id", "issued_at", "expires_at", "target")
ENVELOPE_VALUES: tuple[Any, ...] = (
    None, 1, 2, "1", True, "", "cmd-1", "-x", "a" * 64, "a" * 65, "abc def", "2026-01-31T12:00:00Z", "noon",
    {"community": "c1", "building": "b1"}, {"community": "", "building": "b1"}, {"community": "c1"},
    {"community": "c1", "building": "b1", "floor": 3}, {"community": "c" * 129, "building": "b1"}, [], {},
)


def body(name: str, **args: Any) -> dict[str, Any]:
    return command_message(name, community="c1", building="b1", args=args, issued_at=1_800_000_000.0)


def samples() -> Iterator[tuple[str, dict[str, Any]]]:
    """Sample commands: the valid one of each name, then one argument or field changed, added or removed."""
    for name in COMMANDS:
        valid = body(name, **VALID_ARGS[name])
        yield name, valid
        no_args = copy.deepcopy(valid)
        del no_args["args"]
        yield name, no_args
        names = {f.encode_name for f in msgspec.structs.fields(REMOTE[name][0])} | set(OTHER_ARGS)
        for key, value in itertools.product(sorted(names), VALUES):
            changed = copy.deepcopy(valid)
            changed["args"][key] = value
            yield name, changed
        for key in VALID_ARGS[name]:
            fewer = copy.deepcopy(valid)
            del fewer["args"][key]
            yield name, fewer
        for key, value in itertools.product(ENVELOPE, ENVELOPE_VALUES):
            changed = copy.deepcopy(valid)
            changed[key] = value
            yield name, changed
        for key in ENVELOPE:
            fewer = copy.deepcopy(valid)
            del fewer[key]
            yield name, fewer
        for args in ({"device": "gas-1", "all": True}, {}, {"all": False}, {"session": 3, "from_seq": 1,
                     "to_seq": 9, "install": "0123456789abcdef"}, {"install": "0123456789abcdef"}, {"to_seq": 4}):
            yield name, body(name, **args)
        yield name, {**valid, "extra": 1}
        yield name, {**valid, "args": None}


#: Commands the structs refuse and the schema accepts: JSON Schema counts 1.0 as an integer (and as equal to the
#: constant 1); the structs take an integer only as written. A sequence number is at most 2**53 (a JSON number
#: is exact up to there).
STRICTER: list[tuple[str, dict[str, Any]]] = [
    ("scan", body("scan", bus="bus1", **{"from": 1.0})),
    ("events", body("events", limit=5.0)),
    ("status", {**body("status"), "version": 1.0}),
    ("events", body("events", session=2**53 + 1)),
]


def accepted_by_structs(name: str, message: dict[str, Any]) -> bool:
    try:
        check_command(name, message)
    except Rejected as exc:
        assert exc.code in ("invalid", "bad_args") and exc.reason, exc
        return False
    return True


def test_structs_and_schema_accept_and_refuse_the_same_commands() -> None:
    schema = validator("command")
    disagree: list[str] = []
    counts = {True: 0, False: 0}
    for name, message in samples():
        by_schema = schema.is_valid(message)
        counts[by_schema] += 1
        if accepted_by_structs(name, message) != by_schema:
            disagree.append(f"{name}: schema {'accepts' if by_schema else 'refuses'} {message}")
    assert not disagree, f"{len(disagree)} disagreements, the first: {disagree[:5]}"
    assert counts[True] >= 150 and counts[False] >= 2000, counts  # both sides well sampled


@pytest.mark.parametrize(("name", "message"), STRICTER, ids=[m[0] for m in STRICTER])
def test_where_the_structs_are_stricter(name: str, message: dict[str, Any]) -> None:
    assert validator("command").is_valid(message)
    assert not accepted_by_structs(name, message)
