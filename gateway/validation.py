"""Typed data from outside, refused with its path: msgspec structs, and the one reading of their errors.

The site file's tables (:mod:`gateway.config`), the operator commands from MQTT and the control socket
(:mod:`gateway.command_args`, :mod:`gateway.uplink.contract`, :mod:`gateway.control.server`) and the messages
between the processes (:mod:`gateway.link`) are msgspec structs. msgspec refuses with ``Expected `int` <= 247
- at `$.args.to```; :func:`problem` reads that into a :class:`Problem` (the key path, what is wrong, the value
found, the type expected with its bounds), from which each boundary words its reason as it always has
(:meth:`Problem.reason`, or its own wording from the same fields). Rules across fields live in the structs'
``__post_init__`` (a ``ValueError`` there is a ``rule`` problem, its text kept as written).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import inspect as mi

__all__ = ["Problem", "convert", "problem"]

_T = TypeVar("_T")
Kind = Literal["missing", "unknown", "type", "bound", "rule"]

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_TYPE = re.compile(r"^Expected `[^`]*`, got `[^`]*`$")
_BOUND = re.compile(r"^Expected `[^`]*` (?:[<>]=?|of length|matching regex)")
_CHOICE = re.compile(r"^Invalid (?:enum )?value ")
#: No value at a path (a dict key msgspec does not name, a missing key).
_NOWHERE = object()


@dataclass(frozen=True)
class Problem(Exception):
    """Why a value was refused: ``path`` (keys and indices from the top), ``kind``, the ``value`` found (None
    when missing), the type ``expected`` there (msgspec.inspect, with its bounds) and msgspec's own text."""

    path: tuple[str | int, ...]
    kind: Kind
    value: Any
    expected: mi.Type | None
    text: str

    @property
    def key(self) -> str:
        """The path as the project writes it: ``args.from``, ``devices[3].address``."""
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out

    def reason(self, typename: Callable[[Any], str]) -> str:
        """The reason in the project's words: ``is required``, ``must be an integer, got a string``,
        ``must be 1–247, got 300``, ``must be one of 'a', 'b', got 'c'``; a rule's own text. ``typename`` names
        the type of the value found."""
        if self.kind == "missing":
            return "is required"
        if self.kind == "unknown":
            return "unknown key"
        if self.kind == "rule":
            return self.text
        expected = _plain(self.expected)
        described = None
        if isinstance(expected, mi.Metadata):
            described = (expected.extra_json_schema or {}).get("description")
            expected = expected.type
        if isinstance(expected, mi.LiteralType):
            listed = ", ".join(_literal(v) for v in expected.values)
            return f"must be {listed}, got {_literal(self.value)}" if len(expected.values) == 1 else \
                f"must be one of {listed}, got {_literal(self.value)}"
        if self.kind == "bound" and isinstance(expected, mi.IntType | mi.FloatType):
            lo, hi = expected.ge, expected.le
            shown = f"{self.value:g}" if isinstance(expected, mi.FloatType) else f"{self.value}"
            if lo is not None and hi is not None:
                return f"must be {_g(lo)}–{_g(hi)}, got {shown}"
            if lo is not None:
                return f"must be ≥ {_g(lo)}, got {shown}"
            if hi is not None:
                return f"must be ≤ {_g(hi)}, got {shown}"
        if isinstance(expected, mi.StrType):
            if self.kind == "bound" and expected.max_length is not None and isinstance(self.value, str) \
                    and len(self.value) > expected.max_length:
                return f"is longer than {expected.max_length} characters"
            if described is not None and isinstance(self.value, str):
                return f"must be {described}, got {self.value[:40]!r}"
            if self.kind == "bound" and expected.pattern is not None and isinstance(self.value, str) and self.value:
                return f"{self.value[:40]!r} does not match {expected.pattern}"
            if expected.min_length:
                return f"must be a non-empty string, got {typename(self.value)}"
            return f"must be a string, got {typename(self.value)}"
        return f"must be {_noun(expected)}, got {typename(self.value)}"


def convert(data: Any, kind: type[_T]) -> _T:
    """``data`` (plain JSON/TOML values) as ``kind``, checked strictly (no "1" for 1); :class:`Problem` if not."""
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise problem(exc, data, kind) from None


def problem(exc: msgspec.ValidationError, data: Any, kind: Any) -> Problem:
    """Read msgspec's ``exc``, its refusal of the plain values ``data`` as ``kind``, into a :class:`Problem`."""
    text = str(exc)
    at = _AT.search(text)
    path: list[str | int] = []
    if at is not None:
        text = text[: at.start()]
        for name, index in _STEP.findall(at.group("path")):
            path.append(name if name else (int(index) if index.isdigit() else "..."))
    missing, unknown = _MISSING.match(text), _UNKNOWN.match(text)
    what: Kind
    if missing or unknown:
        path.append((missing or unknown).group("name"))  # type: ignore[union-attr]
        what = "missing" if missing else "unknown"
    elif _TYPE.match(text) or _CHOICE.match(text):
        what = "type"
    elif _BOUND.match(text):
        what = "bound"
    else:
        what = "rule"
    value = _value_at(data, path)
    expected = _type_at(mi.type_info(kind), path)
    return Problem(tuple(path), what, None if value is _NOWHERE else value, expected, text)


def _value_at(data: Any, path: list[str | int]) -> Any:
    for part in path:
        inside = (isinstance(part, int) and isinstance(data, list | tuple) and part < len(data)) or (
            isinstance(part, str) and isinstance(data, Mapping) and part in data)
        if not inside:
            return _NOWHERE
        data = data[part]
    return data


def _type_at(info: mi.Type, path: list[str | int]) -> mi.Type | None:
    current: mi.Type | None = info
    for part in path:
        current = _container(current)
        if isinstance(current, mi.StructType | mi.DataclassType):
            current = next((f.type for f in current.fields if f.encode_name == part), None)
        elif isinstance(current, mi.ListType | mi.TupleType | mi.VarTupleType):
            current = getattr(current, "item_type", None)
        elif isinstance(current, mi.DictType):
            current = current.value_type
        else:
            return None
    return current


def _container(info: mi.Type | None) -> mi.Type | None:
    """The struct, list or dict inside an optional or a union (the one a path can step into)."""
    if isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        return next((_container(t) for t in info.types
                     if isinstance(_container(t), mi.StructType | mi.DataclassType | mi.ListType | mi.DictType)),
                    None)
    return info


def _literal(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else repr(value)


def _plain(info: mi.Type | None) -> mi.Type | None:
    """An optional's type without its None."""
    if isinstance(info, mi.Metadata) and isinstance(info.type, mi.UnionType):
        info = info.type
    if isinstance(info, mi.UnionType):
        types = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if len(types) == 1:
            return types[0]
    return info


def _noun(info: mi.Type | None) -> str:
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.IntType):
        return "an integer"
    if isinstance(info, mi.FloatType):
        return "a number"
    if isinstance(info, mi.StructType | mi.DataclassType | mi.DictType | mi.TypedDictType):
        return "an object"
    if isinstance(info, mi.ListType | mi.TupleType | mi.VarTupleType):
        return "an array"
    if isinstance(info, mi.UnionType):
        return " or ".join(_noun(t) for t in info.types if not isinstance(t, mi.NoneType))
    return "something else"


def _g(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"
