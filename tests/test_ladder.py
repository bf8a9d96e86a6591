"""fleet/ladder.py: who is due to be told when, and when a failed delivery is tried again (pure, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.ladder import DEFAULT_STEPS, Ladder, LadderError, RetryPolicy, gateway_sms_roles


def test_the_default_ladder_is_relatives_and_unit_head_then_building_head_and_grid_worker_then_the_desk() -> None:
    ladder = Ladder()
    assert ladder.steps == DEFAULT_STEPS
    assert ladder.roles(1, alone=False) == ("relative", "unit head")
    assert ladder.roles(2, alone=False) == ("building head", "grid worker")
    assert ladder.roles(3, alone=False) == ("duty desk",)
    assert ladder.escalate_after_s == 120.0


def test_steps_fall_due_from_the_opening_one_interval_apart() -> None:
    ladder = Ladder()
    assert ladder.due_steps(kind="alarm", opened_at=1000.0, started=1, now=1119.9, alone=False, closed=False) == []
    assert ladder.due_steps(kind="alarm", opened_at=1000.0, started=1, now=1120.0, alone=False, closed=False) == [2]
    assert ladder.next_due(kind="alarm", opened_at=1000.0, started=2, alone=False, closed=False) == 1240.0
    assert ladder.next_due(kind="alarm", opened_at=1000.0, started=3, alone=False, closed=False) is None


def test_overdue_steps_are_all_due_none_skipped() -> None:
    ladder = Ladder()
    assert ladder.due_steps(kind="alarm", opened_at=0.0, started=1, now=10_000.0, alone=False, closed=False) == [2, 3]


def test_an_acknowledged_or_cleared_episode_has_nothing_due() -> None:
    ladder = Ladder()
    assert ladder.due_steps(kind="alarm", opened_at=0.0, started=1, now=10_000.0, alone=False, closed=True) == []
    assert ladder.next_due(kind="alarm", opened_at=0.0, started=1, alone=False, closed=True) is None


def test_faults_and_supervisory_signals_stay_at_step_one() -> None:
    ladder = Ladder()
    assert ladder.due_steps(kind="fault", opened_at=0.0, started=1, now=10_000.0, alone=False, closed=False) == []
    assert ladder.next_due(kind="supervisory", opened_at=0.0, started=1, alone=False, closed=False) is None


def test_a_person_alone_has_the_grid_worker_at_step_one_and_climbs_sooner() -> None:
    ladder = Ladder()
    assert ladder.roles(1, alone=True) == ("relative", "unit head", "grid worker")
    assert ladder.roles(2, alone=True) == ("building head", "grid worker")
    assert ladder.due_at(2, 0.0, alone=True) == 60.0
    assert ladder.due_at(3, 0.0, alone=True) == 120.0


def test_a_configured_ladder_and_its_errors_name_the_key() -> None:
    ladder = Ladder.from_mapping({"steps": [{"roles": ["relative"]}, {"roles": ["duty desk"]}],
                                  "escalate_after_s": 30, "escalate_kinds": ["alarm", "supervisory"]})
    assert ladder.steps == (("relative",), ("duty desk",))
    assert ladder.last_step("supervisory") == 2
    with pytest.raises(LadderError, match=r"ladder\.escalate_after_s"):
        Ladder.from_mapping({"escalate_after_s": 0})
    with pytest.raises(LadderError, match=r"ladder\.escalate_after_s"):
        Ladder.from_mapping({"escalate_after_s": "soon"})
    with pytest.raises(LadderError, match=r"ladder\.steps"):
        Ladder.from_mapping({"steps": [{"roles": []}]})
    with pytest.raises(LadderError, match=r"ladder\.escalate_after"):
        Ladder.from_mapping({"escalate_after": 10})


def test_retries_back_off_doubling_to_a_cap_then_give_up() -> None:
    policy = RetryPolicy(base_s=5.0, cap_s=30.0, max_attempts=5)
    assert [policy.delay_s(a) for a in range(1, 6)] == [5.0, 10.0, 20.0, 30.0, None]


def test_the_gateway_sms_marker_is_an_optional_list_of_roles() -> None:
    assert gateway_sms_roles({"sms_sent_to": ["relative", "unit head"]}) == {"relative", "unit head"}
    assert gateway_sms_roles({}) == frozenset()
    assert gateway_sms_roles({"sms_sent_to": "relative"}) == frozenset()
    assert gateway_sms_roles({"sms_sent_to": ["relative", 3]}) == {"relative"}


@given(opened=st.floats(0, 1e9), after=st.floats(0.1, 1e4), started=st.integers(1, 3), elapsed=st.floats(0, 1e5),
       alone=st.booleans())
def test_each_step_is_due_once_in_order_and_never_before_its_time(opened: float, after: float, started: int,
                                                                  elapsed: float, alone: bool) -> None:
    ladder = Ladder(escalate_after_s=after, alone_escalate_after_s=after / 2)
    now = opened + elapsed
    due = ladder.due_steps(kind="alarm", opened_at=opened, started=started, now=now, alone=alone, closed=False)
    assert due == list(range(started + 1, started + 1 + len(due)))
    assert all(ladder.due_at(s, opened, alone) <= now for s in due)
    following = ladder.next_due(kind="alarm", opened_at=opened, started=due[-1] if due else started, alone=alone,
                                closed=False)
    assert following is None or following > now
