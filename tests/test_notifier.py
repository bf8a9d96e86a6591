"""The escalation test: two notifier instances (fleet/notifier.py, real subprocesses) on a private PostgreSQL, the
duty desk serving the acknowledgement links, people's phones a local HTTP receiver reached through Apprise's
``json://``. Time is scaled down: a step every 3 s instead of 120 s (1.5 s instead of 60 s for a person alone).

* nobody acknowledges: step 2, then step 3, each within 1 s of its due time; the clear sends the all-clear;
* an acknowledgement through a message's link stops the ladder, and everyone told is told who it was;
* a person living alone has the grid worker at step 1 and climbs sooner;
* a role the gateway reached by its own SMS is not sent the alarm again (told of the end all the same);
* a failed delivery is tried again with a growing backoff, each attempt a row;
* kill -9 of the instance sending step 2, with two running: no step skipped, the message held sent twice, and at
  most one duplicate per sending lane of the instance killed (each instance has two).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.broker import free_port
from tests.support.postgres import PostgresServer, find_pg_bin
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMMUNITY = "c1"
STEP_S = 3.0
ALONE_STEP_S = 1.5
#: The issue's "on time": every step within 1 s of its due time.
ON_TIME_S = 1.0
#: Sending lanes per instance: more than one, so that lanes sending side by side are what is tested.
IN_FLIGHT = 2
BUILDINGS = {
    "b1": {"units": ["u1", "u2"], "households": {
        "u1-101": {"relatives": 2}, "u1-102": {"relatives": 1, "alone": True}, "u1-103": {"relatives": 1},
        "u2-201": {"relatives": 1}, "u2-202": {"relatives": 1},
        "u1-104": {"relatives": 1}}},
    "b2": {"units": ["u1"], "households": {"u1-101": {"relatives": 2}}},
}


@dataclass
class Stack:
    workdir: Path
    pg: PostgresServer
    receiver: Any
    desk_port: int
    procs: dict[str, Any]

    def store(self, *events: dict[str, Any]) -> None:
        from tests.support.notifier import store_events

        assert store_events(self.pg.dsn, self.workdir / "contacts.toml", COMMUNITY, events) == len(events)

    def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.dsn, autocommit=True) as c:
            return c.execute(query, args).fetchall()

    def due(self, event_id: str) -> dict[int, float]:
        """Each step's due time (Unix s), as the notifier recorded it."""
        return {int(s): float(t) for s, t in self.rows(
            "SELECT step, extract(epoch FROM min(due_at)) FROM deliveries WHERE event_id = %s AND purpose = 'alarm' "
            "GROUP BY step", event_id)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if find_pg_bin() is None or (shutil.which("runuser") is None and os.geteuid() == 0):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are required: apt-get install postgresql")
    from tests.support.notifier import Receiver, start_desk, start_notifier, write_contacts, write_notifier_config

    workdir = tmp_path_factory.mktemp("notifier")
    receiver = Receiver()
    desk_port = free_port()
    write_contacts(workdir / "contacts.toml", receiver, COMMUNITY, BUILDINGS, sms_only=["rel0-b1-u2-202"])
    write_notifier_config(workdir / "notifier.toml", community=COMMUNITY, public_url=f"http://127.0.0.1:{desk_port}",
                          sms_url=f"json://127.0.0.1:{receiver.port}/sms/{{phone}}", escalate_after_s=STEP_S,
                          alone_escalate_after_s=ALONE_STEP_S, retry_base_s=0.3, in_flight=IN_FLIGHT)
    pg = PostgresServer(workdir / "pg").start()
    procs: dict[str, Any] = {}
    try:
        from tests.support.notifier import store_events

        store_events(pg.dsn, workdir / "contacts.toml", COMMUNITY, [])  # the inbox's tables, as the inbox makes them
        for name in ("notifier-1", "notifier-2"):
            procs[name] = start_notifier(workdir, pg.dsn, name)
        procs["desk"] = start_desk(workdir, pg.dsn, desk_port)
        yield Stack(workdir, pg, receiver, desk_port, procs)
    finally:
        for p in procs.values():
            p.stop(signal.SIGTERM, timeout=20)
        receiver.close()
        pg.stop()


def _first(stack: Stack, ref: str, path: str, purpose: str = "alarm") -> float:
    got = [m.at for m in stack.receiver.about(ref, purpose) if m.path == path]
    assert got, f"no {purpose} message for {path} about {ref}"
    return min(got)


def test_nobody_acknowledges_so_steps_two_and_three_come_on_time_then_the_clear_sends_the_all_clear(
        stack: Stack) -> None:
    from tests.support.notifier import event

    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u1", household="u1-101", device="gas-u1-101")
    stack.store(raised)
    ref = raised["event_id"]
    step1 = {"/to/rel0-b1-u1-101", "/to/rel1-b1-u1-101", "/to/head-b1-u1"}
    step2 = {"/to/head-b1", "/to/grid"}
    step3 = {"/to/desk"}
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "alarm")} >= step1 | step2 | step3,
                            timeout=3 * STEP_S + 10, what="steps 1, 2 and 3")
    due = stack.due(ref)
    assert sorted(due) == [1, 2, 3]
    assert due[2] - due[1] == pytest.approx(STEP_S, abs=0.01) and due[3] - due[2] == pytest.approx(STEP_S, abs=0.01)
    for step, paths in ((1, step1), (2, step2), (3, step3)):
        for path in paths:
            late = _first(stack, ref, path) - due[step]
            assert -0.05 <= late <= ON_TIME_S, f"step {step} to {path}: {late:+.2f} s from its due time"
    # Step 2's people were not told at step 1.
    assert all(_first(stack, ref, p) > due[2] - 0.05 for p in step2 | step3)

    stack.store(event(COMMUNITY, "b1", "alarm", "cleared", unit="u1", household="u1-101", device="gas-u1-101"))
    everyone = step1 | step2 | step3
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "clear")} >= everyone,
                            timeout=10, what="the all-clear to everyone told")
    clears = [m for m in stack.receiver.about(ref, "clear")]
    assert all("not acknowledged" in m.body for m in clears)
    assert stack.rows("SELECT step, next_step_at FROM episodes WHERE event_id = %s AND cleared_at IS NOT NULL",
                      ref) == [(3, None)]
    # No alarm message to anyone twice (both instances running, nobody killed).
    assert max(Counter(m.path for m in stack.receiver.about(ref, "alarm")).values()) == 1


def test_an_acknowledgement_through_the_link_stops_the_ladder_and_tells_everyone_told(stack: Stack) -> None:
    from tests.support.notifier import event

    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u1", household="u1-103", device="gas-u1-103")
    stack.store(raised)
    ref = raised["event_id"]
    step1 = {"/to/rel0-b1-u1-103", "/to/head-b1-u1"}
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "alarm")} >= step1, timeout=10,
                            what="step 1")
    relative = next(m for m in stack.receiver.about(ref, "alarm") if m.path == "/to/rel0-b1-u1-103")
    assert relative.link and relative.link.startswith(f"http://127.0.0.1:{stack.desk_port}/ack/")
    # Opening the link only shows a page (a messenger's preview must not acknowledge); the POST acknowledges.
    with urllib.request.urlopen(relative.link, timeout=10) as r:
        assert b"I am dealing with it" in r.read()
    assert stack.rows("SELECT acked_by FROM episodes WHERE event_id = %s", ref) == [(None,)]
    # A forged token (right delivery id, wrong MAC) acknowledges nothing.
    forged = relative.link.rsplit(".", 1)[0] + ".0123456789abcdef0123456789abcdef"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(forged, method="POST", headers={"accept": "application/json"}),
                               timeout=10)
    assert refused.value.code == 404
    request = urllib.request.Request(relative.link, method="POST", headers={"accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "acknowledged" and answer["by"] == "Relative 0 of b1 u1-103 (relative)"

    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "ack")} >= step1, timeout=10,
                            what="the acknowledgement told to everyone told")
    assert all("acknowledged by Relative 0 of b1 u1-103 (relative)" in m.body for m in stack.receiver.about(ref, "ack"))
    # The ladder stopped: nothing reaches step 2 after its due time has long passed.
    due2 = stack.due(ref)[1] + STEP_S
    wait_until(lambda: stack.rows("SELECT extract(epoch FROM clock_timestamp())")[0][0] > due2 + 2 * ON_TIME_S,
               timeout=3 * STEP_S)
    assert {m.path for m in stack.receiver.about(ref, "alarm")} == step1
    assert stack.rows("SELECT max(step) FROM deliveries WHERE event_id = %s", ref) == [(1,)]
    # Acknowledged twice: the second is told who did it first.
    with urllib.request.urlopen(urllib.request.Request(relative.link, method="POST",
                                                       headers={"accept": "application/json"}), timeout=10) as r:
        assert json.loads(r.read())["status"] == "already"

    stack.store(event(COMMUNITY, "b1", "reset", "reset", unit="u1", device="gas-u1-103", source="button"))
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "clear")} >= step1, timeout=10,
                            what="the all-clear after a reset at the panel")
    assert all("acknowledged by Relative 0" in m.body for m in stack.receiver.about(ref, "clear"))


def test_a_person_alone_has_the_grid_worker_at_step_one_and_climbs_sooner(stack: Stack) -> None:
    from tests.support.notifier import event

    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u1", household="u1-102", device="gas-u1-102")
    stack.store(raised)
    ref = raised["event_id"]
    stack.receiver.wait_for(lambda _: "/to/head-b1" in {m.path for m in stack.receiver.about(ref, "alarm")},
                            timeout=10, what="step 2 for a person alone")
    due = stack.due(ref)
    assert due[2] - due[1] == pytest.approx(ALONE_STEP_S, abs=0.01)
    assert _first(stack, ref, "/to/grid") - due[1] <= ON_TIME_S  # at step 1, at the door
    assert stack.rows("SELECT step FROM deliveries WHERE event_id = %s AND role = 'grid worker'", ref) == [(1,)]
    assert 0 <= _first(stack, ref, "/to/head-b1") - due[2] <= ON_TIME_S
    stack.store(event(COMMUNITY, "b1", "alarm", "cleared", unit="u1", household="u1-102", device="gas-u1-102"))
    stack.receiver.wait_for(lambda _: "/to/grid" in {m.path for m in stack.receiver.about(ref, "clear")}, timeout=10,
                            what="the all-clear")


def test_a_role_the_gateway_reached_by_sms_is_not_sent_the_alarm_again(stack: Stack) -> None:
    from tests.support.notifier import event

    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u2", household="u2-201", device="gas-u2-201",
                   sms_sent_to=["relative"])
    stack.store(raised)
    ref = raised["event_id"]
    stack.receiver.wait_for(lambda _: "/to/head-b1-u2" in {m.path for m in stack.receiver.about(ref, "alarm")},
                            timeout=10, what="the unit head's alarm")
    assert stack.rows("SELECT status FROM deliveries WHERE event_id = %s AND role = 'relative'", ref) == [("skipped",)]
    stack.store(event(COMMUNITY, "b1", "alarm", "cleared", unit="u2", household="u2-201", device="gas-u2-201"))
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "clear")} >= {
        "/to/rel0-b1-u2-201", "/to/head-b1-u2"}, timeout=10, what="the all-clear, the SMS-reached relative too")
    assert "/to/rel0-b1-u2-201" not in {m.path for m in stack.receiver.about(ref, "alarm")}


def test_a_failed_delivery_is_tried_again_with_backoff_each_attempt_a_row(stack: Stack) -> None:
    from tests.support.notifier import event

    stack.receiver.fail.update({"/to/head-b1-u2": 2})
    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u2", household="u2-202", device="gas-u2-202")
    stack.store(raised)
    ref = raised["event_id"]
    stack.receiver.wait_for(lambda _: sum(m.path == "/to/head-b1-u2" for m in stack.receiver.about(ref)) >= 3,
                            timeout=15, what="three attempts to the unit head")
    query = ("SELECT a.attempt, a.outcome, extract(epoch FROM a.started_at) FROM attempts a JOIN deliveries d "
             "ON d.id = a.delivery_id WHERE d.event_id = %s AND d.role = 'unit head' ORDER BY a.attempt")
    rows = wait_until(lambda: (lambda r: r if len(r) >= 3 else None)(stack.rows(query, ref)), timeout=10)
    assert [(r[0], r[1]) for r in rows] == [(1, "failed"), (2, "failed"), (3, "delivered")]
    gaps = [rows[1][2] - rows[0][2], rows[2][2] - rows[1][2]]
    assert gaps[0] >= 0.3 - 0.05 and gaps[1] >= 0.6 - 0.05, gaps  # base 0.3 s, doubled
    # The relative with a phone and no URL went through the community's SMS provider URL.
    sms = [m for m in stack.receiver.about(ref, "alarm") if m.path.startswith("/sms/")]
    assert len(sms) == 1, [m.path for m in stack.receiver.about(ref)]
    # Only the outcome and the URL scheme are kept: no number (phone, port, account) from Apprise's messages.
    details = stack.rows("SELECT a.detail FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                         "WHERE d.event_id = %s UNION ALL SELECT detail FROM deliveries WHERE event_id = %s", ref, ref)
    assert ("Apprise reported a failure: json://",) in details, details
    assert not [d for (d,) in details if d and any(ch.isdigit() and ch != "1" for ch in d)], details
    stack.store(event(COMMUNITY, "b1", "alarm", "cleared", unit="u2", household="u2-202", device="gas-u2-202"))


def test_a_clear_ends_the_alarm_it_followed_not_one_raised_again_after_it(stack: Stack) -> None:
    from tests.support.notifier import event

    where = {"unit": "u1", "household": "u1-104", "device": "gas-u1-104"}
    first = event(COMMUNITY, "b1", "alarm", "raised", **where)
    stack.store(first)
    stack.receiver.wait_for(lambda _: stack.receiver.about(first["event_id"], "alarm"), timeout=10, what="the first")
    cleared = event(COMMUNITY, "b1", "alarm", "cleared", **where)
    again = event(COMMUNITY, "b1", "alarm", "raised", **where)
    stack.store(again)  # the alarm raised again reaches the centre before the clear of the first one
    stack.receiver.wait_for(lambda _: stack.receiver.about(again["event_id"], "alarm"), timeout=10, what="again")
    stack.store(cleared)
    stack.receiver.wait_for(lambda _: stack.receiver.about(first["event_id"], "clear"), timeout=10,
                            what="the all-clear of the first")
    assert stack.rows("SELECT cleared_at IS NULL FROM episodes WHERE event_id = %s", again["event_id"]) == [(True,)]
    assert not stack.receiver.about(again["event_id"], "clear")
    stack.store(event(COMMUNITY, "b1", "alarm", "cleared", **where))
    stack.receiver.wait_for(lambda _: stack.receiver.about(again["event_id"], "clear"), timeout=10,
                            what="the all-clear of the second")


def test_an_alarm_whose_clear_was_handled_first_opens_closed_and_tells_nobody(stack: Stack) -> None:
    """The healer brings an alarm back after its clear was stored and handled (the clear had no episode to
    end then): the alarm's episode opens already cleared, and no message goes out."""
    from tests.support.notifier import event

    where = {"unit": "u2", "household": "u2-201", "device": "gas-u2-201-late"}
    raised = event(COMMUNITY, "b1", "alarm", "raised", **where)
    cleared = event(COMMUNITY, "b1", "alarm", "cleared", **where)
    stack.store(cleared)
    wait_until(lambda: stack.rows("SELECT 1 FROM clears WHERE event_id = %s", cleared["event_id"]), timeout=10,
               message="the clear was not handled")
    stack.store(raised)  # detected before the clear, stored after it
    wait_until(lambda: stack.rows("SELECT 1 FROM episodes WHERE event_id = %s", raised["event_id"]), timeout=10,
               message="no episode for the late alarm")
    assert stack.rows("SELECT cleared_by, next_step_at FROM episodes WHERE event_id = %s",
                      raised["event_id"]) == [(cleared["event_id"], None)]
    assert stack.rows("SELECT count(*) FROM deliveries WHERE event_id = %s", raised["event_id"]) == [(0,)]


def _post(stack: Stack, path: str, form: dict[str, str], headers: dict[str, str]) -> tuple[int, str]:
    """A browser's form POST to the desk (no redirect followed): its status and the session cookie it set."""
    import http.client
    from urllib.parse import urlencode

    conn = http.client.HTTPConnection("127.0.0.1", stack.desk_port, timeout=30)
    try:
        conn.request("POST", path, urlencode(form), {"Content-Type": "application/x-www-form-urlencoded", **headers})
        response = conn.getresponse()
        response.read()
        cookie = (response.getheader("set-cookie") or "").split(";")[0]
        return response.status, cookie
    finally:
        conn.close()


def _officer(stack: Stack, login: str) -> None:
    import asyncio

    from fleet.desk.auth import add_officer

    async def add() -> None:
        async with await psycopg.AsyncConnection.connect(stack.pg.dsn, autocommit=True) as c:
            await add_officer(c, login=login, community=COMMUNITY, name=f"Officer {login}", password="a long password")

    asyncio.run(add())


def test_an_acknowledgement_posted_from_another_site_is_refused(stack: Stack) -> None:
    from tests.support.notifier import event

    _officer(stack, "csrf")
    own = {"Origin": f"http://127.0.0.1:{stack.desk_port}"}
    status, cookie = _post(stack, "/login", {"login": "csrf", "password": "a long password"}, own)
    assert status == 303 and cookie.startswith("desk_session=")
    raised = event(COMMUNITY, "b1", "alarm", "raised", unit="u1", household="u1-101", device="gas-csrf")
    stack.store(raised)
    wait_until(lambda: stack.rows("SELECT 1 FROM episodes WHERE event_id = %s", raised["event_id"]), timeout=10)
    ref = raised["event_id"]
    for forged in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        for path in (f"/episodes/{ref}/ack", f"/api/episodes/{ref}/ack"):
            assert _post(stack, path, {}, {"Cookie": cookie, **forged})[0] == 403, (path, forged)
    assert stack.rows("SELECT acked_at FROM episodes WHERE event_id = %s", ref) == [(None,)]
    assert _post(stack, f"/episodes/{ref}/ack", {}, {"Cookie": cookie, **own})[0] == 303
    assert stack.rows("SELECT acked_by FROM episodes WHERE event_id = %s", ref) == [("Officer csrf (duty desk)",)]


def test_wrong_passwords_make_a_login_wait_and_expired_sessions_are_deleted(stack: Stack) -> None:
    _officer(stack, "guessed")
    own = {"Origin": f"http://127.0.0.1:{stack.desk_port}"}
    stack.rows("INSERT INTO desk_sessions (token_sha256, login, expires_at)"
               " VALUES ('old', 'guessed', now() - '1 s'::interval) RETURNING 1")
    for _ in range(3):
        assert _post(stack, "/login", {"login": "guessed", "password": "wrong password"}, own)[0] == 401
    # the right password, at once: refused unchecked until the delay (5 s) is over
    assert _post(stack, "/login", {"login": "guessed", "password": "a long password"}, own)[0] == 429
    assert stack.rows("SELECT 1 FROM desk_sessions WHERE token_sha256 = 'old'") != []
    _officer(stack, "other")
    assert _post(stack, "/login", {"login": "other", "password": "a long password"}, own)[0] == 303
    assert stack.rows("SELECT 1 FROM desk_sessions WHERE token_sha256 = 'old'") == []


def test_kill_9_of_the_instance_sending_step_two_skips_no_step_and_duplicates_at_most_once(stack: Stack) -> None:
    from tests.support.notifier import event, start_notifier

    killed: list[int] = []
    names = {p.proc.pid: n for n, p in stack.procs.items() if n.startswith("notifier")}

    def kill_sender(msg: Any) -> None:
        pid = stack.receiver.pid_of_sender(msg)
        if pid in names and not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    stack.receiver.hold["/to/head-b2"] = 1.0
    stack.receiver.on_hold = kill_sender
    try:
        raised = event(COMMUNITY, "b2", "alarm", "raised", unit="u1", household="u1-101", device="gas-u1-101")
        stack.store(raised)
        ref = raised["event_id"]
        step1 = {"/to/rel0-b2-u1-101", "/to/rel1-b2-u1-101", "/to/head-b2-u1"}
        step2 = {"/to/head-b2", "/to/grid"}
        stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "alarm")} >= step1 | step2
                                | {"/to/desk"}, timeout=3 * STEP_S + 15, what="every step despite the kill")
    finally:
        stack.receiver.hold.clear()
        stack.receiver.on_hold = None
    assert killed, "the instance sending step 2 was not found"
    name = names[killed[0]]
    threading.Thread(target=stack.procs[name].stop, daemon=True).start()
    due = stack.due(ref)
    assert sorted(due) == [1, 2, 3]  # no step skipped
    counts = Counter(m.path for m in stack.receiver.about(ref, "alarm"))
    # The held message went out and its instance died before recording it: sent again once. Another message the
    # instance had in flight on its other lane may have left too: at most one duplicate per lane, none twice.
    assert counts["/to/head-b2"] == 2, counts
    assert max(counts.values()) == 2 and sum(n - 1 for n in counts.values()) <= IN_FLIGHT, counts
    assert _first(stack, ref, "/to/desk") - due[3] <= ON_TIME_S
    assert stack.rows("SELECT count(*) FROM deliveries WHERE event_id = %s AND purpose = 'alarm' AND status <> 'sent'",
                      ref) == [(0,)]
    stack.procs[name] = start_notifier(stack.workdir, stack.pg.dsn, name)
    stack.store(event(COMMUNITY, "b2", "alarm", "cleared", unit="u1", household="u1-101", device="gas-u1-101"))
    stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "clear")} >= step1 | step2,
                            timeout=10, what="the all-clear after the kill")


def test_a_claim_is_one_step_down_the_pending_index_whatever_the_statistics(stack: Stack) -> None:
    """The claim locks a delivery on its own (through its index) and only then joins by key: written as one join
    and planned on a fresh table's statistics, it walked every episode for every pending row (183 ms a claim
    with 1000 pending, 0.13 ms as it is)."""
    from fleet.notifier import CLAIM, DUE_EPISODES

    with psycopg.connect(stack.pg.dsn, autocommit=True) as c:
        for query, cte, args in ((CLAIM, "claimed", (COMMUNITY, 16)), (DUE_EPISODES, "due", (COMMUNITY,))):
            plan = "\n".join(r[0] for r in c.execute(f"EXPLAIN {query}", args).fetchall())
            assert f"CTE {cte}" in plan and "Join Filter" not in plan, plan


def test_a_step_due_while_first_step_messages_queue_goes_before_them(stack: Stack) -> None:
    """A burst queues first-step messages faster than they are sent; a later step of an older alarm comes due
    meanwhile: it is claimed before the queued first steps (they became due less than the head start before it),
    not after them. One instance of one lane, for another community, so the order of claims is the order
    received."""
    from tests.support.notifier import event, start_notifier, store_events, write_contacts, write_notifier_config

    workdir = stack.workdir / "queue"
    workdir.mkdir()
    buildings = {"q1": {"units": ["u1"], "households": {f"u1-{i:03d}": {"relatives": 1} for i in range(20)}}}
    write_contacts(workdir / "contacts.toml", stack.receiver, "cq", buildings)
    write_notifier_config(workdir / "notifier.toml", community="cq", public_url="http://127.0.0.1:9",
                          escalate_after_s=STEP_S, in_flight=1)
    proc = start_notifier(workdir, stack.pg.dsn, "notifier-queue")
    try:
        old = event("cq", "q1", "alarm", "raised", unit="u1", household="u1-000", device="gas-u1-000")
        store_events(stack.pg.dsn, workdir / "contacts.toml", "cq", [old])
        ref = old["event_id"]
        stack.receiver.wait_for(lambda _: len(stack.receiver.about(ref, "alarm")) == 2, timeout=10, what="step 1")
        burst = [event("cq", "q1", "alarm", "raised", unit="u1", household=f"u1-{i:03d}", device=f"gas-u1-{i:03d}")
                 for i in range(1, 20)]
        queued = "SELECT count(*) FROM deliveries WHERE event_id = ANY(%s) AND status = 'pending'"

        def held(_: Any) -> None:  # the lane sends the burst's first message: hold it until the step is due
            wait_until(lambda: stack.rows("SELECT 1 FROM deliveries WHERE event_id = %s AND step = 2", ref)
                       and stack.rows(queued, [e["event_id"] for e in burst]) == [(2 * len(burst) - 1,)],
                       timeout=3 * STEP_S, message="step 2 created with the burst queued")

        first = f"/to/rel0-q1-{burst[0]['household']}"
        stack.receiver.hold[first] = 0.01
        stack.receiver.on_hold = held
        try:
            store_events(stack.pg.dsn, workdir / "contacts.toml", "cq", burst[:1])
            stack.receiver.wait_for(lambda _: any(m.path == first for m in stack.receiver.messages), timeout=10,
                                    what="the burst's first message")
            store_events(stack.pg.dsn, workdir / "contacts.toml", "cq", burst[1:])
            step2 = {"/to/head-q1", "/to/grid"}
            stack.receiver.wait_for(lambda _: {m.path for m in stack.receiver.about(ref, "alarm")} >= step2,
                                    timeout=3 * STEP_S + 10, what="step 2")
        finally:
            stack.receiver.hold.clear()
            stack.receiver.on_hold = None
        refs = {e["event_id"] for e in burst}
        order = [(m.ref, m.path) for m in stack.receiver.messages if m.ref == ref or m.ref in refs]
        after_hold = order[order.index((burst[0]["event_id"], first)) + 1:]
        # Step 2's two messages next, before any of the 37 first-step messages queued before it was due.
        assert {p for _, p in after_hold[:2]} == step2 and {r for r, _ in after_hold[:2]} == {ref}, after_hold[:5]
        stack.receiver.wait_for(lambda _: sum(m.ref in refs for m in stack.receiver.messages) >= 2 * len(burst),
                                timeout=30, what="the burst's first-step messages after the step")
    finally:
        proc.stop(signal.SIGTERM, timeout=20)


def test_an_outcome_logged_by_a_lane_killed_before_its_commit_is_taken_not_sent_again(stack: Stack) -> None:
    """A lane commits each attempt's outcome (an ``attempts`` row) before its next message and the deliveries'
    statuses once a batch is sent: killed in between, its batch rolls back, and the next claim takes the logged
    outcome instead of sending the message again."""
    from tests.support.notifier import event, start_notifier, store_events, write_contacts, write_notifier_config

    workdir = stack.workdir / "logged"
    workdir.mkdir()
    write_contacts(workdir / "contacts.toml", stack.receiver, "cl",
                   {"l1": {"units": ["u1"], "households": {"u1-101": {"relatives": 1}}}})
    write_notifier_config(workdir / "notifier.toml", community="cl", public_url="http://127.0.0.1:9",
                          escalate_after_s=3600, in_flight=1)
    raised = event("cl", "l1", "alarm", "raised", unit="u1", household="u1-101", device="gas-l1")
    ref, path = raised["event_id"], "/to/rel0-l1-u1-101"
    first = start_notifier(workdir, stack.pg.dsn, "notifier-logged-1")
    killed: list[int] = []

    def log_then_kill(msg: Any) -> None:  # the message is out: its outcome logged as the lane does, then kill -9
        if msg.ref != ref or killed:
            return
        delivery = stack.rows("SELECT id FROM deliveries WHERE event_id = %s AND role = 'relative'", ref)[0][0]
        stack.rows("INSERT INTO attempts (delivery_id, attempt, worker, started_at, outcome, detail) VALUES "
                   "(%s, 1, 'notifier-logged-1', clock_timestamp(), 'delivered', 'logged') RETURNING 1", delivery)
        killed.append(first.proc.pid)
        os.kill(first.proc.pid, signal.SIGKILL)

    stack.receiver.hold[path] = 0.01
    stack.receiver.on_hold = log_then_kill
    try:
        store_events(stack.pg.dsn, workdir / "contacts.toml", "cl", [raised])
        stack.receiver.wait_for(lambda _: bool(killed), timeout=10, what="the relative's message")
        first.proc.wait(10)
    finally:
        stack.receiver.hold.clear()
        stack.receiver.on_hold = None
    status = "SELECT status, attempts FROM deliveries WHERE event_id = %s AND role = 'relative'"
    assert stack.rows(status, ref) == [("pending", 0)]  # the batch rolled back with the kill
    second = start_notifier(workdir, stack.pg.dsn, "notifier-logged-2")
    try:
        wait_until(lambda: stack.rows(status, ref) == [("sent", 1)], timeout=10, message="the logged outcome taken")
        stack.receiver.wait_for(lambda _: any(m.path == "/to/head-l1-u1" for m in stack.receiver.about(ref)),
                                timeout=10, what="the unit head's message")
        assert [m.path for m in stack.receiver.about(ref)].count(path) == 1
        assert stack.rows("SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                          "WHERE d.event_id = %s AND d.role = 'relative'", ref) == [(1,)]
    finally:
        second.stop(signal.SIGTERM, timeout=20)
        first.stop(signal.SIGTERM, timeout=5)
