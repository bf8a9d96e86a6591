"""Clock synchronisation check: adjtimex, with systemd-timesyncd's flag file when adjtimex is refused."""

from __future__ import annotations

import pytest

from gateway import clock


@pytest.mark.parametrize(
    ("state", "flag_exists", "expected"),
    [(0, False, True), (5, True, False), (None, True, True), (None, False, False)],
)
def test_clock_synchronised(monkeypatch: pytest.MonkeyPatch, tmp_path, state, flag_exists, expected) -> None:
    flag = tmp_path / "synchronized"
    if flag_exists:
        flag.write_text("")
    monkeypatch.setattr(clock, "TIMESYNC_FLAG", str(flag))
    monkeypatch.setattr(clock, "adjtimex_state", lambda: state)
    monkeypatch.setattr(clock, "_cache", None)
    assert clock.clock_synchronised() is expected


def test_real_adjtimex_answers() -> None:
    assert clock.adjtimex_state() in {None, 0, 1, 2, 3, 4, 5}
