"""What the shipped systemd unit gives ``gatewayd``'s interpreter, for tests and benchmarks that start it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["UNIT", "interpreter_environment"]

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "gatewayd.service"
#: Variables of the unit's ``Environment=`` lines that change how Python and the C library run the daemon
#: (optimisation level, malloc arenas). Paths that exist only under systemd (``LG_WD``) are left out.
_INTERPRETER_PREFIXES = ("PYTHON", "MALLOC_")


def interpreter_environment(unit: Path = UNIT) -> dict[str, str]:
    """``NAME -> value`` of the unit's interpreter settings, e.g. ``{"PYTHONOPTIMIZE": "2", ...}``."""
    env: dict[str, str] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        key, sep, assignment = line.strip().partition("=")
        if key != "Environment" or not sep:
            continue
        name, sep, value = assignment.partition("=")
        if sep and name.startswith(_INTERPRETER_PREFIXES):
            env[name] = value
    return env
