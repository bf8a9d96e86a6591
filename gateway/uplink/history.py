"""The history's filters as SQL, shared by the daemon's history query (outbox.py) and the CLI's read-only
export (gatewayctl events --format): one place says what ``device``, ``household``, ``kind``, ``since`` and
``until`` mean. No imports beyond the standard library, so the CLI stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["history_filters"]


def history_filters(*, device: str | None = None, household: str | None = None, kind: str | None = None,
                    since: float | None = None, until: float | None = None) -> tuple[list[str], list[Any]]:
    """``WHERE`` terms (to join with AND) and their arguments: equal ``device``, ``household`` and ``kind``;
    ``since`` ≤ wall < ``until``. A filter left at None matches everything."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("device", device), ("household", household), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("wall >= ?")
        args.append(since)
    if until is not None:
        where.append("wall < ?")
        args.append(until)
    return where, args
