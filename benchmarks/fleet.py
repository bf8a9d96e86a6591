"""A community on the clustered broker: 1000 gateways, an alarm burst, a node lost in it, two inbox instances.

The scenario of tests/test_fleet.py (``tests.support.fleet.FleetScenario``): a 3-node NATS JetStream cluster
(fleet/cluster.py), the fleet simulator's gateways (their own outbox, writer and uplink; fleet/simulator.py),
two central inbox instances writing into a private PostgreSQL (fleet/inbox.py). A steady load, an alarm burst;
one node SIGKILLed in the middle of the burst and started again ``--restart-after`` s later; the first inbox
instance SIGKILLed after that. The node killed is the one leading ``$MQTT_msgs`` (``--kill events-leader``, the
default and the worst case: every QoS 1 publish and every delivery to the inbox waits for its successor's
election) or node 0 (``--kill first``, what tests/test_fleet.py does, which may lead no event stream).

Reported (one JSON line last): ``events_stored`` (in the gateways' outboxes), ``events_in_inbox``,
``duplicates_in_inbox`` (rows beyond one per event id), ``missing_in_inbox``; detection (``Event.wall``) → row
committed — the durable record: the stream's copy or the gateway's history — outside the failover window (kill →
10 s after the node is back): ``latency_p50_ms``, ``latency_p99_ms``, ``latency_max_ms``; inside it
``failover_p99_ms``; detection → first stored by either path (the inbox also hears alarms, supervisory signals
and faults on core NATS, before JetStream stores them) for those detected inside the window:
``first_notice_p50_ms``, ``first_notice_p99_ms``, ``first_notice_max_ms``; ``failover_gap_s``, the longest time no
event of the lost node's buildings reached the inbox; ``nodes``: each node's peak RSS and CPU seconds.
Targets: ``first_notice_p99_ms`` ≤ 1000; ``latency_p99_ms`` ≤ 1000; every event exactly once;
``failover_p99_ms`` ≤ 30 000 (NFPA 72 allows 90 s).

The notifier (fleet/notifier.py, ``--notifiers`` instances, one SIGKILLed 2 s after the node unless
``--keep-notifiers``) tells people through Apprise's ``json://`` to a local receiver: ``notified_p99_ms``
(detection → first-step message received, outside the failover window; target ≤ 2000), ``escalation_on_time``
(every later step received within 1 s of its due time; the ladder steps every ``--escalate-after`` s),
``notifier_duplicates`` (messages received more than once; target ≤ ``notifier_workers_killed``, the sending
lanes killed: each lane claims, sends and commits on its own, so each is a worker — ``in_flight`` per instance
killed, four by default, ``--notifier-in-flight`` sets it; ``notifier_instances_killed`` the instances).

``.venv/bin/python benchmarks/fleet.py [--gateways 1000] [--processes 4] [--burst-rate 250] [--kill first]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.fleet import FleetScenario, percentile  # noqa: E402


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def first_notice_figures(result: Any) -> dict[str, Any]:
    """Detection → first stored by the inbox (either path; the fast one is core NATS) of the alarms, supervisory
    signals and faults detected through the sudden loss of the node: ``first_notice_*_ms``."""
    first = result.first_notices()
    return {"first_notice_p50_ms": _ms(percentile(first, 0.5)), "first_notice_p99_ms": _ms(percentile(first, 0.99)),
            "first_notice_max_ms": _ms(max(first, default=None)), "first_notice_events": len(first),
            "first_notice_fast_rows": len(result.fast),
            "first_notice_lost_node_p99_ms": _ms(percentile(result.first_notices("lost"), 0.99)),
            "first_notice_other_nodes_p99_ms": _ms(percentile(result.first_notices("other"), 0.99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--telemetry-every", type=float, default=10.0)
    parser.add_argument("--burst-rate", type=float, default=250.0, help="alarms per second across the fleet")
    parser.add_argument("--burst-s", type=float, default=10.0)
    parser.add_argument("--restart-after", type=float, default=30.0)
    parser.add_argument("--kill", choices=("events-leader", "first"), default="events-leader",
                        help="the node SIGKILLed in the burst: the leader of $MQTT_msgs (the worst case) or node 0")
    parser.add_argument("--workdir", help="keep the run's files (logs, outboxes) here instead of a temp dir")
    parser.add_argument("--notifiers", type=int, default=2, help="notifier instances (fleet/notifier.py)")
    parser.add_argument("--escalate-after", type=float, default=20.0, help="the ladder's step, seconds")
    parser.add_argument("--notifier-in-flight", type=int,
                        help="each notifier instance's in_flight (messages sent at once; its default when not given)")
    parser.add_argument("--keep-notifiers", action="store_true",
                        help="do not SIGKILL a notifier instance 2 s after the node's kill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        scenario = FleetScenario(Path(args.workdir or tmp), gateways=args.gateways, processes=args.processes,
                                 steady_s=args.steady_s,
                                 telemetry_every_s=args.telemetry_every, burst_rate=args.burst_rate,
                                 burst_s=args.burst_s, restart_after_s=args.restart_after,
                                 after_s=args.restart_after + 2.0, kill=args.kill, notifiers=args.notifiers,
                                 escalate_after_s=args.escalate_after, notifier_in_flight=args.notifier_in_flight,
                                 kill_notifier=not args.keep_notifiers,
                                 log=lambda text: print(text, file=sys.stderr, flush=True))
        result = scenario.run()
    outside, inside = result.latencies()
    alarms_outside, alarms_inside = result.latencies("alarm")
    stored = set(result.stored)
    print(json.dumps({
        "gateways": result.gateways,
        "events_stored": len(stored),
        "events_in_inbox": len(stored & set(result.rows)),
        "duplicates_in_inbox": result.row_count - len(result.rows),
        "missing_in_inbox": len(stored - set(result.rows)),
        "latency_p50_ms": _ms(percentile(outside, 0.5)),
        "latency_p99_ms": _ms(percentile(outside, 0.99)),
        "latency_max_ms": _ms(max(outside, default=None)),
        "failover_p99_ms": _ms(percentile(inside, 0.99)),
        **first_notice_figures(result),
        "failover_gap_s": round(result.failover_gap_s(), 2),
        "failover_breakdown": result.failover_breakdown(),
        "nodes": result.nodes,
        "alarm_latency_p99_ms": _ms(percentile(alarms_outside, 0.99)),
        "alarm_failover_p99_ms": _ms(percentile(alarms_inside, 0.99)),
        "events_recovered_by_command": sum(1 for r in result.rows.values() if r[2]),
        "alarms_raised": result.notifications.get("alarms_raised"),
        "killed_node_led": result.killed_node_led,
        "inbox_takeover": result.takeover,
        "healed": result.healing,
        "simulator": [{k: d[k] for k in ("worker", "stored", "connections", "resent")} for d in result.simulator],
        **_notifier_keys(result.notifier),
    }))


def _default_in_flight() -> int:
    from dataclasses import fields

    from fleet.notifier import NotifierSettings

    return int(next(f.default for f in fields(NotifierSettings) if f.name == "in_flight"))  # type: ignore[call-overload]


def _notifier_keys(n: dict[str, object]) -> dict[str, object]:
    """The notifier's figures (tests.support.notifier.NotifierRig.result)."""
    outside, inside = n.get("notified_outside", []), n.get("notified_inside", [])
    assert isinstance(outside, list) and isinstance(inside, list)
    return {"notified_p50_ms": _ms(percentile(outside, 0.5)), "notified_p99_ms": _ms(percentile(outside, 0.99)),
            "notified_failover_p99_ms": _ms(percentile(inside, 0.99)),
            "escalation_on_time": n.get("escalation_on_time"), "notifier_duplicates": n.get("duplicates"),
            # a killed instance may send again each message it had in flight, one per lane (docs/fleet.md)
            "notifier_workers_killed": int(n.get("killed") or 0) * int(n.get("in_flight") or _default_in_flight()),
            "notifier_instances_killed": n.get("killed"),
            "notifier": {k: v for k, v in n.items() if not str(k).startswith("notified_")}}


if __name__ == "__main__":
    main()
