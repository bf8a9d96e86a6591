"""The uplink's retry policy: which node the next connection attempt goes to, and how long to wait first.

Pure: no I/O and no clock reads. Every time is passed in and the jitter comes from a ``random.Random`` handed
in, so tests/test_retry_policy.py replays it exactly. The rules (docs/mqtt.md, "Lifecycle", "Several broker
nodes"):

1. Each failed attempt and each lost connection moves on to the next node of the cluster (``mqtt.hosts``).
2. The first attempt after a lost connection goes to the next node at once, with no wait: every node of the
   cluster serves the same. At most once per :data:`STABLE_CONNECTION_S`, so that nodes which drop each
   connection at once do not turn into a reconnect storm; with one node there is nowhere else to go.
3. Otherwise the wait is jittered exponential backoff: 1 s doubling to 60 s, each ×0.8–1.2, clamped to [1, 60].
4. The backoff starts over only after a connection that held :data:`STABLE_CONNECTION_S`: one the broker drops
   at once (a client id taken over, an ACL) must not bring the 1 s waits back.
5. While an alarm, supervisory signal or fault waits, no wait is longer than :data:`URGENT_RETRY_MAX_S`, so it
   reaches a returning broker well within the 10 s GB/T 45839 allows; with several nodes no connect attempt is
   given longer either (a cluster node can hold a CONNECT unanswered while it elects leaders).
6. A refused command subscription is asked for again after 2 s, doubling per refusal up to 60 s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "STABLE_CONNECTION_S",
    "URGENT_RETRY_MAX_S",
    "RetryDelay",
    "RetryPolicy",
    "subscribe_retry_s",
]

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
#: Each backoff wait is the current base times a factor drawn from this range (spreads a fleet's reconnects).
JITTER = (0.8, 1.2)
#: Longest wait between connection attempts while an alarm, supervisory signal or fault waits in the outbox.
URGENT_RETRY_MAX_S = 5.0
#: A connection that lasted this long was a good one: the backoff starts over after it.
STABLE_CONNECTION_S = 30.0
#: Pause before the command subscription is asked for again after the broker refused it (SUBACK 0x80),
#: doubling on each refusal of the same connection up to SUBSCRIBE_RETRY_MAX_S.
SUBSCRIBE_RETRY_S = 2.0
SUBSCRIBE_RETRY_MAX_S = 60.0


class RetryDelay(NamedTuple):
    """A wait before the next connection attempt, as the policy chose it (``Uplink.retry_delays``)."""

    chosen_at: float
    """Monotonic time the wait began."""
    delay_s: float
    urgent: bool
    """An alarm, supervisory signal or fault was waiting: the wait was capped at :data:`URGENT_RETRY_MAX_S`."""
    backoff_s: float
    """The wait the backoff alone would have chosen."""
    node: str = ""
    """``host:port`` of the node the attempt after this wait goes to."""


class RetryPolicy:
    """Node rotation and backoff for one uplink; :attr:`node` is the node connected to or tried next."""

    def __init__(self, nodes: Sequence[str], *, rng: random.Random | None = None) -> None:
        """``nodes``: the broker's nodes by name, in ``mqtt.hosts`` order. ``rng``: the jitter's source."""
        if not nodes:
            raise ValueError("at least one broker node is needed")
        self.nodes = tuple(nodes)
        self.node = 0
        """Index into :attr:`nodes`."""
        self._rng = rng or random.Random()
        self._base = BACKOFF_MIN_S
        self._moved_at_once: float | None = None  # when a lost connection last moved on without a wait

    @property
    def node_name(self) -> str:
        return self.nodes[self.node]

    def attempt_failed(self, *, now: float, urgent: bool) -> RetryDelay:
        """A connection attempt failed: the next node, after the next backoff wait."""
        self._move_on()
        return self._delay(now, self._draw(), urgent)

    def connection_lost(self, *, connected_at: float, now: float, urgent: bool) -> RetryDelay:
        """A connection that began at ``connected_at`` ended (not by a planned stop): the next node, at once
        if another node is there and none was tried at once in the last :data:`STABLE_CONNECTION_S`."""
        self._move_on()
        if now - connected_at >= STABLE_CONNECTION_S:
            self._base = BACKOFF_MIN_S
        at_once = len(self.nodes) > 1 and (
            self._moved_at_once is None or now - self._moved_at_once >= STABLE_CONNECTION_S)
        if at_once:
            self._moved_at_once = now
            return self._delay(now, 0.0, urgent)
        return self._delay(now, self._draw(), urgent)

    def urgent_cut(self, wait: RetryDelay) -> RetryDelay | None:
        """Something urgent was stored during ``wait``: the shorter wait (from the same start), or None when
        ``wait`` is already short enough."""
        if wait.urgent or wait.delay_s <= URGENT_RETRY_MAX_S:
            return None
        return RetryDelay(wait.chosen_at, URGENT_RETRY_MAX_S, True, wait.delay_s, self.node_name)

    def shortens_connect(self, timeout_s: float) -> bool:
        """Would an urgent event waiting cut a connect attempt of ``timeout_s``? Only with another node to try."""
        return len(self.nodes) > 1 and timeout_s > URGENT_RETRY_MAX_S

    def _move_on(self) -> None:
        self.node = (self.node + 1) % len(self.nodes)

    def _draw(self) -> float:
        lo, hi = JITTER
        delay = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._base * self._rng.uniform(lo, hi)))
        self._base = min(BACKOFF_MAX_S, self._base * 2)
        return delay

    def _delay(self, now: float, backoff: float, urgent: bool) -> RetryDelay:
        delay = min(backoff, URGENT_RETRY_MAX_S) if urgent else backoff
        return RetryDelay(now, delay, urgent, backoff, self.node_name)


def subscribe_retry_s(refusals: int) -> float:
    """The pause before asking again for a subscription the broker refused ``refusals`` times."""
    return min(SUBSCRIBE_RETRY_MAX_S, SUBSCRIBE_RETRY_S * 2.0 ** (refusals - 1))
