"""The uplink's retry policy (gateway/uplink/retry.py), pure: times passed in, jitter from a seeded generator.

Which node comes next and how long to wait: the next node at once after a lost connection, backoff that grows
to its cap within its jitter, the cap while something urgent waits, and the fresh start after a good
connection. The same rules against a real broker are in tests/test_uplink.py.
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway.uplink.retry as retry
from gateway.uplink.retry import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    STABLE_CONNECTION_S,
    URGENT_RETRY_MAX_S,
    RetryDelay,
    RetryPolicy,
    subscribe_retry_s,
)

TWO = ("10.0.0.1:8883", "10.0.0.2:8883")
THREE = (*TWO, "10.0.0.3:8883")
ONE = ("10.0.0.1:8883",)


def bounds(base: float) -> tuple[float, float]:
    """The range a backoff wait of this base may take: ×0.8–1.2, clamped to [1, 60]."""
    return (min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, base * 0.8)), min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, base * 1.2)))


def failures(policy: RetryPolicy, n: int, *, now: float = 100.0, urgent: bool = False) -> list[RetryDelay]:
    return [policy.attempt_failed(now=now + i, urgent=urgent) for i in range(n)]


# ------------------------------------------------------------------------------- a lost connection


def test_the_first_attempt_after_a_lost_connection_goes_to_the_next_node_at_once() -> None:
    policy = RetryPolicy(TWO, rng=random.Random(1))
    assert policy.node == 0 and policy.node_name == TWO[0]
    wait = policy.connection_lost(connected_at=100.0, now=101.0, urgent=False)
    assert wait == RetryDelay(101.0, 0.0, False, 0.0, TWO[1])
    assert policy.node == 1, "the attempt goes to the next node"


def test_with_one_node_a_lost_connection_waits_its_backoff() -> None:
    policy = RetryPolicy(ONE, rng=random.Random(1))
    wait = policy.connection_lost(connected_at=100.0, now=101.0, urgent=False)
    assert wait.node == ONE[0] and bounds(1.0)[0] <= wait.delay_s <= bounds(1.0)[1]


def test_at_once_only_once_per_stable_connection_time() -> None:
    """Nodes that drop every connection at once must not turn into a reconnect storm."""
    policy = RetryPolicy(THREE, rng=random.Random(2))
    first = policy.connection_lost(connected_at=100.0, now=100.5, urgent=False)
    second = policy.connection_lost(connected_at=101.0, now=101.5, urgent=False)
    assert first.delay_s == 0.0 and first.node == THREE[1]
    assert second.delay_s >= BACKOFF_MIN_S and second.node == THREE[2], "the node still moves on; the wait does not go"
    later = policy.connection_lost(connected_at=120.0, now=100.5 + STABLE_CONNECTION_S, urgent=False)
    assert later.delay_s == 0.0 and later.node == THREE[0], "at once again once the interval has passed"


def test_an_at_once_move_does_not_use_up_a_backoff_step() -> None:
    policy = RetryPolicy(TWO, rng=random.Random(3))
    policy.connection_lost(connected_at=100.0, now=101.0, urgent=False)
    [wait] = failures(policy, 1, now=102.0)
    assert bounds(1.0)[0] <= wait.delay_s <= bounds(1.0)[1], "the backoff starts at its first step"


# ------------------------------------------------------------------------------- backoff


def test_failed_attempts_move_through_the_nodes_in_turn() -> None:
    policy = RetryPolicy(THREE, rng=random.Random(4))
    assert [w.node for w in failures(policy, 5)] == [THREE[1], THREE[2], THREE[0], THREE[1], THREE[2]]


def test_backoff_doubles_within_its_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(ONE, rng=random.Random(5))
    waits = failures(policy, 12)
    bases = [min(BACKOFF_MAX_S, 2.0**i) for i in range(12)]  # 1, 2, 4, … 32, 60, 60 …
    for wait, base in zip(waits, bases, strict=True):
        lo, hi = bounds(base)
        assert lo <= wait.delay_s <= hi, (base, wait)
        assert wait.delay_s == wait.backoff_s and not wait.urgent
    assert max(w.delay_s for w in waits) <= BACKOFF_MAX_S
    assert waits[-1].delay_s >= 0.8 * BACKOFF_MAX_S, "the cap is reached and held"


@pytest.mark.parametrize("seed", range(20))
def test_jitter_stays_within_its_bounds_and_replays_from_its_seed(seed: int) -> None:
    waits = [w.delay_s for w in failures(RetryPolicy(ONE, rng=random.Random(seed)), 10)]
    again = [w.delay_s for w in failures(RetryPolicy(ONE, rng=random.Random(seed)), 10)]
    assert waits == again
    for i, delay in enumerate(waits):
        lo, hi = bounds(min(BACKOFF_MAX_S, 2.0**i))
        assert lo <= delay <= hi, (i, delay)


def test_jitter_spreads_a_fleet() -> None:
    """Gateways that lost the broker together do not all come back in the same instant."""
    fourth = {failures(RetryPolicy(ONE, rng=random.Random(seed)), 4)[-1].delay_s for seed in range(50)}
    assert len(fourth) == 50 and max(fourth) - min(fourth) > 2.0  # base 8 s: 6.4–9.6 s


def test_the_backoff_starts_over_after_a_good_connection() -> None:
    policy = RetryPolicy(ONE, rng=random.Random(6))
    failures(policy, 6)  # base now 60 s
    wait = policy.connection_lost(connected_at=1000.0, now=1000.0 + STABLE_CONNECTION_S, urgent=False)
    assert bounds(1.0)[0] <= wait.delay_s <= bounds(1.0)[1]
    [after] = failures(policy, 1, now=2000.0)
    assert bounds(2.0)[0] <= after.delay_s <= bounds(2.0)[1]


def test_a_connection_dropped_at_once_does_not_start_the_backoff_over() -> None:
    """A client id taken over or an ACL: the broker drops each connection at once; the waits keep growing."""
    policy = RetryPolicy(ONE, rng=random.Random(7))
    failures(policy, 5)  # base now 32 s
    wait = policy.connection_lost(connected_at=1000.0, now=1000.0 + STABLE_CONNECTION_S - 0.1, urgent=False)
    assert bounds(32.0)[0] <= wait.delay_s <= bounds(32.0)[1]


# ------------------------------------------------------------------------------- something urgent waits


def test_an_urgent_event_caps_the_wait_and_the_backoff_is_recorded() -> None:
    policy = RetryPolicy(TWO, rng=random.Random(8))
    waits = failures(policy, 8, urgent=True)
    assert all(w.urgent and w.delay_s <= URGENT_RETRY_MAX_S for w in waits), waits
    assert waits[-1].backoff_s > URGENT_RETRY_MAX_S and waits[-1].delay_s == URGENT_RETRY_MAX_S
    assert waits[0].delay_s == waits[0].backoff_s, "a short backoff is left as it is"


def test_an_urgent_event_stored_during_a_long_wait_cuts_it_from_its_start() -> None:
    policy = RetryPolicy(ONE, rng=random.Random(9))
    long = RetryDelay(500.0, 40.0, False, 40.0, ONE[0])
    assert policy.urgent_cut(long) == RetryDelay(500.0, URGENT_RETRY_MAX_S, True, 40.0, ONE[0])
    assert policy.urgent_cut(RetryDelay(500.0, 3.0, False, 3.0, ONE[0])) is None, "already short enough"
    assert policy.urgent_cut(RetryDelay(500.0, 5.0, True, 40.0, ONE[0])) is None, "already cut"


def test_a_connect_attempt_is_shortened_only_with_another_node_to_try() -> None:
    assert RetryPolicy(TWO).shortens_connect(10.0)
    assert not RetryPolicy(TWO).shortens_connect(URGENT_RETRY_MAX_S)
    assert not RetryPolicy(ONE).shortens_connect(30.0)


# ------------------------------------------------------------------------------- the rest


def test_a_refused_subscription_is_asked_for_again_doubling_to_a_minute() -> None:
    assert [subscribe_retry_s(n) for n in range(1, 8)] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_no_nodes_is_refused() -> None:
    with pytest.raises(ValueError, match="node"):
        RetryPolicy(())


def test_the_policy_reads_no_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the retry policy read the clock")

    for name in ("monotonic", "time", "perf_counter"):
        monkeypatch.setattr(time, name, no_clock)
    policy = RetryPolicy(THREE, rng=random.Random(10))
    failures(policy, 3, urgent=True)
    policy.connection_lost(connected_at=0.0, now=50.0, urgent=False)
    policy.urgent_cut(RetryDelay(0.0, 30.0, False, 30.0, THREE[0]))
    assert not {"time", "asyncio", "socket", "sqlite3"} & set(vars(retry)), "no I/O or clock in the module"


@given(
    nodes=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**32),
    steps=st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=120.0), st.booleans()), max_size=40),
)
def test_every_wait_is_within_its_bounds_whatever_happens(
    nodes: int, seed: int, steps: list[tuple[bool, float, bool]]
) -> None:
    """Any run of failed attempts and lost connections: 0 ≤ wait ≤ 60 s, ≤ 5 s when urgent, a wait of 0 only as
    the move to another node after a lost connection, and each step moves to the next node."""
    names = tuple(f"n{i}:1883" for i in range(nodes))
    policy = RetryPolicy(names, rng=random.Random(seed))
    now = 0.0
    for lost, held_s, urgent in steps:
        before = policy.node
        if lost:
            wait = policy.connection_lost(connected_at=now, now=now + held_s, urgent=urgent)
        else:
            wait = policy.attempt_failed(now=now + held_s, urgent=urgent)
        now += held_s + wait.delay_s
        assert 0.0 <= wait.delay_s <= BACKOFF_MAX_S
        assert wait.delay_s <= wait.backoff_s
        assert not urgent or wait.delay_s <= URGENT_RETRY_MAX_S
        assert wait.delay_s > 0.0 or (lost and nodes > 1)
        assert policy.node == (before + 1) % nodes and wait.node == names[policy.node]
