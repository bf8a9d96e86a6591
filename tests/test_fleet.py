"""A whole community on the clustered broker (issue 21, Must show).

1000 simulated gateways (the gateway's own outbox, writer and uplink; fleet/simulator.py) connect across the
3 NATS nodes of fleet/cluster.py; a steady load runs, then an alarm burst of 250 alarms/s across the fleet;
one node is SIGKILLed in the middle of the burst and started again 30 s later; the first of two central
inbox instances (fleet/inbox.py) is SIGKILLed after that. Then every event the gateways stored is in
PostgreSQL exactly once, the second inbox took over, a gateway's publish under another building's topic went
nowhere, and rows deleted from PostgreSQL are healed from the gateways' outboxes by the ``events`` command. Two
notifier instances told each alarm's first step once, through Apprise's ``json://`` to a receiver the test starts.
Latency is printed and guarded by generous bounds only — the first notice (core NATS) of the alarms,
supervisory signals and faults within 5 s at p99 through the node's loss, for the buildings on the lost node
(their standby connections) as for the others, every first notice and every durable row within 60 s;
benchmarks/fleet.py reports the figures against their targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.postgres import find_pg_bin

pytestmark = [pytest.mark.slow, pytest.mark.solo, pytest.mark.timeout(900)]


def _skip_without_servers() -> None:
    from fleet.cluster import ClusterError, find_nats_server

    try:
        find_nats_server()
    except ClusterError as exc:
        pytest.skip(str(exc))
    if find_pg_bin() is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are required")


def test_a_thousand_gateways_through_a_node_loss_reach_the_inbox_exactly_once(tmp_path: Path) -> None:
    _skip_without_servers()
    from tests.support.fleet import FleetScenario, percentile

    result = FleetScenario(tmp_path / "fleet").run()

    outside, inside = result.latencies()
    first = result.first_notices()
    stayed, moved = result.first_notices("other"), result.first_notices("lost")
    durable = result.durable_latencies()
    print(f"\nfirst notice through the loss p50 {percentile(first, 0.5)}, p99 {percentile(first, 0.99)}, "
          f"max {max(first, default=None)} s ({len(first)} alarms, supervisory signals and faults; "
          f"{len(result.fast)} rows stored first by the fast path); the lost node's buildings p99 "
          f"{percentile(moved, 0.99)}, max {max(moved, default=None)} s; the others' p99 {percentile(stayed, 0.99)}, "
          f"max {max(stayed, default=None)} s; durable record max {max(durable, default=None)} s")
    print(f"\nstored {len(result.stored)} events, {result.row_count} rows; latency outside the failover window "
          f"p50 {percentile(outside, 0.5)}, p99 {percentile(outside, 0.99)}, max {max(outside, default=None)} s; "
          f"through it p99 {percentile(inside, 0.99)} s; failover gap {result.failover_gap_s():.2f} s; "
          f"takeover {result.takeover}; healing {result.healing}; notifications {result.notifications}; "
          f"nodes {result.nodes}")
    n = result.notifier
    print(f"notifier: {({k: v for k, v in n.items() if not k.startswith('notified_')})}; first step received "
          f"p50 {percentile(n['notified_outside'], 0.5)}, p99 {percentile(n['notified_outside'], 0.99)} s outside "
          f"the failover window, p99 {percentile(n['notified_inside'], 0.99)} s through it")

    assert len(result.simulator) == 4 and all(d["ok"] for d in result.simulator), result.simulator
    assert sum(d["stored"] for d in result.simulator) == len(result.stored)
    # Every stored event is in PostgreSQL, and once: the table holds nothing else. The rows the heal probe
    # deleted on purpose are the probe's own doing; whether they came back is reported below.
    deleted = set(result.healing["ids"])
    missing = set(result.stored) - set(result.rows) - deleted
    assert not missing, f"{len(missing)} stored events not in the inbox, e.g. {sorted(missing)[:5]}"
    assert set(result.rows) <= set(result.stored)
    assert result.row_count == len(result.rows) == len(result.stored) - len(deleted - set(result.rows))
    # The burst was there, and each alarm raised was routed once: the household's relative and its unit head.
    assert result.notifications["alarms_raised"] >= 1000
    assert result.notifications.get("relative") == result.notifications["alarms_raised"]
    assert result.notifications.get("unit head") == result.notifications["alarms_raised"]
    assert "unrouted" not in result.notifications
    # The second inbox instance took over: the healer role, and rows stored after the first was killed.
    assert result.takeover["rows_after_kill"] > 0
    assert result.takeover["rows_by_inbox"]["inbox-1"] > 0
    # A gateway publishing under another building's topic is refused: delivered to nobody, stored nowhere.
    assert result.acl["delivered"] is False and result.acl["stored"] is False, result.acl
    # Rows lost at the centre come back from the gateways' own history: the healer asks each gateway with the
    # events command (the cluster's 1000-consumer cap once left gateways deaf to it; docs/fleet.md).
    assert result.healing["deleted"] > 0
    assert result.healing["recovered"] == result.healing["deleted"], result.healing
    # Regression guards (benchmarks/fleet.py holds the targets: 1 s first notice, 30 s failover). Through the
    # node's loss the lost node's buildings are heard through their standby connections (docs/mqtt.md, "Several
    # broker nodes") while their main connections wait for the session stream's leader: as soon as the others,
    # which core NATS carries at once. How soon the others are heard is this machine's capacity under the burst
    # (the inbox shares two cores with the cluster, 1000 gateways and the notifier): 1-2 s at p99 on one machine,
    # 14.7 s on one whose plain Python ran 1.6 times slower. So the lost node's p99 is held to the others' (half
    # as much again), or 10 s: without the standby connections it was 15.8-16.6 s against the others' 1-2 s.
    # Every durable row, and every first notice, gets 60 s.
    lost_p99, others_p99 = percentile(moved, 0.99), percentile(stayed, 0.99)
    assert lost_p99 is not None and others_p99 is not None
    assert lost_p99 <= max(10.0, 1.5 * others_p99), \
        f"first notice of the lost node's buildings: p99 {lost_p99} s, the others' {others_p99} s"
    assert max(first) <= 60.0, f"first notice through the loss: max {max(first)} s"
    assert durable and max(durable) <= 60.0, f"durable record: max {max(durable)} s"
    # Each alarm's first-step notifications (the relative and the unit head), sent through Apprise's json:// to
    # the test's receiver, arrived once: none missing, none twice (no notifier instance was killed here). An
    # alarm cleared before its message went out has that message cancelled instead. The one way to a second copy
    # left is an attempt the receiver took but answered too late for Apprise (a failed attempt, tried again).
    assert n["first_step_sent"] > 0 and n["first_step_missing"] == 0, n
    # An alarm whose clear was handled before its episode opened (fleet/notifier.py) opens closed: nobody is told.
    assert n["first_step_sent"] + n["first_step_cancelled"] + 2 * n["opened_closed"] == \
        2 * result.notifications["alarms_raised"], n
    assert n["duplicates"] <= n["failed_attempts"], n
    assert n["statuses"].get("failed", 0) == 0 and n["statuses"].get("pending", 0) == 0, n
