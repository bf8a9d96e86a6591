#!/usr/bin/env python3
"""A small reference consumer of the building safety gateways of one community (docs/mqtt.md).

It subscribes to every building of a community, deduplicates events by ``event_id``, tracks ``seq`` per
gateway session (``gateway``, ``install``, ``session``) and, on a gap, asks that gateway for the missing range
with the ``events`` command (page by page) and merges the answer — so events a broker acknowledged and then
lost are still told — and asks for a ``rebirth``. Every kind of gap counts (docs/mqtt.md, "Filling a gap"):

* ``middle`` — an event's ``seq`` more than one above the highest seen;
* ``head`` — a session first seen at a ``seq`` above 1;
* ``tail`` — a session's end announced (``last_seq`` in ``status`` and ``birth``, ``sessions`` in ``birth``)
  beyond what was received;
* ``session`` — a session announced in ``birth`` and never seen: asked for whole. Sessions older than the first
  one heard of a gateway are the past before this consumer started; ``--backfill`` asks for those too.

It prints who must be told about each alarm, supervisory signal and fault — from a mapping file of its own
(the gateways never hold people's contact details):

* an event in a household → that household's relatives and the head of its unit;
* an event in a unit without a household (an extinguisher cabinet) → the unit head;
* a fault, or anything without a unit → the building head.

The routing rule lives in ``fleet/contacts.py`` (standard library only), shared with the central inbox; with
this repository installed (``pip install -e .``) only paho-mqtt (2.x) is needed besides::

    python examples/consumer.py --host broker.example --port 8883 --cafile ca.pem \\
        --community sunshine-garden --contacts examples/consumer-contacts.toml

``--json`` prints one JSON object per line (``notify``, ``duplicate``, ``gap`` (its kind in ``gap``),
``range_requested``, ``recovered`` (the kind of gap it healed in ``gap``), ``unrecoverable``, ``rebirth_requested``,
``command_result``, ``availability``, ``birth``, and with ``--all-events`` ``event`` for every event taken)
instead of text.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Run from a checkout (``python examples/consumer.py``): fleet/ is the central side's reference code, used from the
# checkout and never installed on a gateway (pyproject.toml), so its root is put on the path here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fleet.contacts import Contacts

SEEN_IDS_KEPT = 100_000
REBIRTH_EVERY_S = 30.0
#: Events asked for in one ``events`` command (the gateway's limit over MQTT).
RANGE_PAGE = 200
COMMAND_TTL_S = 60.0
#: An announced session end is compared with what was received this long after it came: the events before it
#: may still be on their way (a status can overtake events in flight; a backlog follows the birth).
ANNOUNCED_GRACE_S = 3.0
#: A range request without an answer (the gateway or the broker was away) is asked again after this long.
ASK_AGAIN_S = 15.0
#: Rejections that say "not now" rather than "never": the range is asked again.
RETRY_CODES = {"stale", "expired", "not_yet_valid", "clock_unsynchronised", "busy", "error", "failed"}
NOTIFY = {("alarm", "raised"), ("alarm", "escalated"), ("supervisory", "raised"), ("fault", "raised")}


# ------------------------------------------------------------------------------------------- consumer


def describe(event: dict[str, Any]) -> str:
    place = f"{event['community']}/{event['building']}"
    if event.get("household"):
        place += f", household {event['household']}"
    elif event.get("unit"):
        place += f", unit {event['unit']}"
    what = {"alarm": f"GAS ALARM (level {event.get('level')})", "supervisory": "SUPERVISORY SIGNAL",
            "fault": "FAULT"}.get(event["kind"], event["kind"])
    if event["kind"] == "alarm" and event.get("level") == "fire":
        what = "FIRE ALARM"
    detail = event.get("code") or ""
    if event.get("value") is not None:
        detail = f"{detail} {event['value']} {event.get('measure') or ''}".strip()
    device = f" at {event['device']}" if event.get("device") else ""
    return f"{what} {event['action']} in {place}{device}" + (f" ({detail})" if detail else "")


class Session(NamedTuple):
    """One run of one gateway: ``seq`` counts 1, 2, 3 … within it. ``install`` is None for version 1 events."""

    gateway: str
    install: str | None
    session: int


@dataclass(frozen=True)
class RangeRequest:
    """An ``events`` command asking for ``first``..``last`` of a session, sent at ``asked_at`` (monotonic)."""

    key: Session
    first: int
    last: int
    community: str
    building: str
    asked_at: float = 0.0


@dataclass(frozen=True)
class AnnouncedEnd:
    """A session's last ``seq`` as a ``status`` or ``birth`` said, to be compared after the grace period."""

    key: Session
    last: int
    community: str
    building: str
    due: float


class Consumer:
    """The message handling, independent of the network (paho calls :meth:`on_message`)."""

    def __init__(self, client: mqtt.Client, *, prefix: str, community: str, contacts: Contacts,
                 client_id: str, v5: bool, as_json: bool, out: Any = sys.stdout, all_events: bool = False,
                 backfill: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = prefix
        self.community = community
        self.contacts = contacts
        self.client_id = client_id
        self.v5 = v5
        self.as_json = as_json
        self.all_events = all_events
        self.out = out
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.backfill = backfill
        self.clock = clock
        self.last_seq: dict[Session, int] = {}  # the highest seq known to exist (seen, or announced)
        self.missing: dict[Session, dict[int, str]] = {}  # seqs known to exist, not seen yet → the kind of gap
        self.first_session: dict[tuple[str, str | None], int] = {}  # (gateway, install) → first session heard of
        self.announced: list[AnnouncedEnd] = []
        self.healed: Counter[str] = Counter()  # events recovered from the gateway, by kind of gap
        self.rebirth_asked: dict[Session, float] = {}
        self.pending: dict[str, str] = {}  # command id → building
        self.ranges: dict[str, RangeRequest] = {}  # events command id → what it asked for

    @property
    def subscriptions(self) -> list[str]:
        base = f"{self.prefix}/{self.community}/+"
        return [f"{base}/availability", f"{base}/birth", f"{base}/status", f"{base}/event/#", f"{base}/reply",
                f"{base}/reply/{self.client_id}/#"]

    def emit(self, action: str, text: str, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps({"action": action, "text": text, **fields}), file=self.out, flush=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(body, dict):
            return
        if "/event/" in topic:
            self.event(body)
        elif topic.endswith("/availability"):
            reason = f" ({body.get('reason')})" if body.get("reason") else ""
            self.emit("availability", f"{body.get('community')}/{body.get('building')} is {body.get('state')}"
                      f"{reason}, session {body.get('session')}", state=body.get("state"),
                      building=body.get("building"), session=body.get("session"))
        elif topic.endswith("/birth"):
            self.emit("birth", f"{body.get('community')}/{body.get('building')}: full state, session "
                      f"{body.get('session')}, {len(body.get('devices', []))} devices",
                      building=body.get("building"), session=body.get("session"))
            self.session_ends(body)
        elif topic.endswith("/status"):
            self.session_ends(body)
        elif body.get("type") == "command_result":
            request = self.ranges.pop(str(body.get("id")), None)
            if request is not None:
                self.merge_range(request, body)
            self.emit("command_result", f"{body.get('building')}: command {body.get('command')} {body.get('id')}: "
                      f"{body.get('status')} ({body.get('code')}){': ' + body['reason'] if body.get('reason') else ''}",
                      id=body.get("id"), command=body.get("command"), status=body.get("status"),
                      code=body.get("code"))

    def event(self, e: dict[str, Any], *, recovered: bool = False) -> bool:
        """Take one event (live, or from a range the gateway sent back); False for a duplicate."""
        event_id = e.get("event_id")
        if not isinstance(event_id, str):
            return False
        if event_id in self.seen:
            if not recovered:
                self.emit("duplicate", f"duplicate {event_id} ignored", event_id=event_id)
            return False
        self.seen[event_id] = None
        if len(self.seen) > SEEN_IDS_KEPT:
            self.seen.popitem(last=False)
        key = Session(str(e.get("gateway")), e.get("install"), int(e.get("session", 0)))
        seq = int(e.get("seq", 0))
        self.first_session.setdefault((key.gateway, key.install), key.session)
        gap = self.missing.setdefault(key, {}).pop(seq, None)
        last = self.last_seq.get(key)
        if seq > (last or 0) + 1:  # a session first seen above seq 1 misses its head
            self.gap(e, key, (last or 0) + 1, seq - 1, "middle" if last is not None else "head")
        if last is None or seq > last:
            self.last_seq[key] = seq
        if recovered:
            if gap is not None:
                self.healed[gap] += 1
            self.emit("recovered", f"{event_id} recovered from the gateway's history", event_id=event_id, gap=gap)
        if self.all_events:
            self.emit("event", f"{event_id} {e.get('kind')} {e.get('action')}", event_id=event_id,
                      kind=e.get("kind"), seq=seq, session=key.session, install=key.install, recovered=recovered)
        if (e.get("kind"), e.get("action")) in NOTIFY:
            people = self.contacts.whom(e)
            text = describe(e)
            if recovered or e.get("historical"):
                text += f" (detected {e.get('time')}, {e.get('age_s', '?')} s before it was sent)"
            names = ", ".join(f"{p.name} ({p.role}, {p.phone})" for p in people) or "nobody on file: check the mapping"
            self.emit("notify", f"TELL {names}: {text}", event_id=event_id, kind=e["kind"], text_only=text,
                      whom=[{"name": p.name, "phone": p.phone, "role": p.role} for p in people])
        return True

    def gap(self, e: dict[str, Any], key: Session, first: int, last: int, kind: str) -> None:
        """Seqs ``first``..``last`` of a session exist and were not seen: note them and ask the gateway."""
        self.missing.setdefault(key, {}).update(dict.fromkeys(range(first, last + 1), kind))
        self.last_seq[key] = max(last, self.last_seq.get(key, 0))
        self.emit("gap", f"{key.gateway} session {key.session}: events {first}..{last} missing ({kind})",
                  gateway=key.gateway, install=key.install, session=key.session, missing=[first, last], gap=kind)
        self.ask_range(e, key, first, last)
        self.ask_rebirth(e, key)

    def session_ends(self, body: dict[str, Any]) -> None:
        """Note where a ``status`` or ``birth`` says the gateway's sessions ended, to compare after the grace."""
        if not isinstance(body.get("last_seq"), int) or not isinstance(body.get("session"), int):
            return  # a gateway from before session ends were announced
        gateway, install = str(body.get("gateway")), body.get("install")
        first = self.first_session.setdefault((gateway, install), body["session"])
        due = self.clock() + ANNOUNCED_GRACE_S
        ends = [(body["session"], body["last_seq"])]
        for earlier in body.get("sessions") or []:
            if isinstance(earlier, dict) and isinstance(earlier.get("session"), int) \
                    and isinstance(earlier.get("last_seq"), int) and (self.backfill or earlier["session"] >= first):
                ends.append((earlier["session"], earlier["last_seq"]))
        for session, last in ends:
            key = Session(gateway, install, session)
            if last > self.last_seq.get(key, 0):
                self.announced.append(AnnouncedEnd(key, last, str(body.get("community")), str(body.get("building")),
                                                   due))

    def tick(self) -> None:
        """Compare announced ends whose grace has passed; ask again for ranges left unanswered."""
        now = self.clock()
        due = [a for a in self.announced if a.due <= now]
        self.announced = [a for a in self.announced if a.due > now]
        for a in due:
            known = self.last_seq.get(a.key)
            if a.last > (known or 0):
                where = {"community": a.community, "building": a.building}
                self.gap(where, a.key, (known or 0) + 1, a.last, "tail" if known is not None else "session")
        for command_id, request in list(self.ranges.items()):
            if now - request.asked_at < ASK_AGAIN_S:
                continue
            del self.ranges[command_id]
            left = sorted(s for s in self.missing.get(request.key, {}) if request.first <= s <= request.last)
            if left:
                self.ask_range({"community": request.community, "building": request.building}, request.key,
                               left[0], left[-1])

    def ask_range(self, e: dict[str, Any], key: Session, first: int, last: int) -> None:
        """Ask the gateway for events ``first``..``last`` of a session (one page; the answer asks for the next)."""
        community, building = e["community"], e["building"]
        args: dict[str, Any] = {"session": key.session, "from_seq": first, "to_seq": last, "limit": RANGE_PAGE}
        if key.install is not None:
            args["install"] = key.install
        command = self.command("events", community, building, args)
        self.ranges[command["id"]] = RangeRequest(key, first, last, community, building, self.clock())
        self.emit("range_requested", f"asked {community}/{building} for events {first}..{last} of session "
                  f"{key.session}", id=command["id"], session=key.session, range=[first, last])

    def merge_range(self, request: RangeRequest, result: dict[str, Any]) -> None:
        """Take the events a range request brought back; ask for the next page, or say what cannot be had."""
        key = request.key
        if result.get("status") != "accepted" and result.get("code") in RETRY_CODES:
            self.ranges[str(result.get("id"))] = request  # asked again after ASK_AGAIN_S (see tick)
            return
        if result.get("status") != "accepted":
            self.emit("unrecoverable", f"{key.gateway} session {key.session}: events {request.first}..{request.last}"
                      f" not available: {result.get('reason')}", session=key.session,
                      range=[request.first, request.last], reason=result.get("reason"))
            return
        rows = [r for r in (result.get("data") or {}).get("events", []) if isinstance(r, dict)]
        for row in rows:
            self.event(row, recovered=True)
        got = [int(r.get("seq", 0)) for r in rows]
        if len(rows) >= RANGE_PAGE and got and max(got) < request.last:
            self.ask_range({"community": request.community, "building": request.building}, key, max(got) + 1,
                           request.last)
            return
        gone = sorted(s for s in self.missing.get(key, {}) if request.first <= s <= request.last)
        if gone:  # no longer in the gateway's history (evicted), or another installation's
            for s in gone:
                del self.missing[key][s]
            self.emit("unrecoverable", f"{key.gateway} session {key.session}: {len(gone)} events no longer on the "
                      "gateway", session=key.session, seqs=gone)

    def command(self, name: str, community: str, building: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish command ``name`` to one building; returns it (its id matches the result)."""
        base = f"{self.prefix}/{community}/{building}"
        issued = time.time()
        command: dict[str, Any] = {
            "version": 1, "id": uuid.uuid4().hex, "command": name,
            "issued_at": _iso(issued), "expires_at": _iso(issued + COMMAND_TTL_S),
            "target": {"community": community, "building": building},
        }
        if args is not None:
            command["args"] = args
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"{base}/reply/{self.client_id}"
            props.CorrelationData = command["id"].encode()
        self.pending[command["id"]] = building
        self.client.publish(f"{base}/command/{name}", json.dumps(command), qos=1, properties=props)
        return command

    def ask_rebirth(self, e: dict[str, Any], key: Session) -> None:
        now = time.monotonic()
        if now - self.rebirth_asked.get(key, -REBIRTH_EVERY_S) < REBIRTH_EVERY_S:
            return
        self.rebirth_asked[key] = now
        community, building = e["community"], e["building"]
        command = self.command("rebirth", community, building)
        self.emit("rebirth_requested", f"asked {community}/{building} for its full state (rebirth)",
                  id=command["id"], building=building)


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=None, help="default 1883, or 8883 with --cafile")
    p.add_argument("--prefix", default="safety", help="the gateways' mqtt.topic_prefix")
    p.add_argument("--community", required=True)
    p.add_argument("--contacts", required=True, help="mapping file (see examples/consumer-contacts.toml)")
    p.add_argument("--protocol", type=int, choices=(5, 311), default=5)
    p.add_argument("--client-id", default=f"consumer-{uuid.uuid4().hex[:8]}")
    p.add_argument("--username")
    p.add_argument("--password-file", help="a file holding the password (first line)")
    p.add_argument("--cafile")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--all-events", action="store_true", help="also print every event taken (not only notices)")
    p.add_argument("--backfill", action="store_true",
                   help="also ask for the sessions a gateway held before the first one this consumer heard of")
    args = p.parse_args(argv)

    contacts = Contacts.load(args.contacts)
    v5 = args.protocol == 5
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    if args.username:
        password = Path(args.password_file).read_text(encoding="utf-8").splitlines()[0] if args.password_file else None
        client.username_pw_set(args.username, password)
    if args.cafile or args.cert:
        client.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key, cert_reqs=ssl.CERT_REQUIRED)
    consumer = Consumer(client, prefix=args.prefix, community=args.community, contacts=contacts,
                        client_id=args.client_id, v5=v5, as_json=args.json, all_events=args.all_events,
                        backfill=args.backfill)
    lock = threading.Lock()  # paho's thread delivers messages; this one compares announced ends
    stopping = threading.Event()

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            print(f"connect refused: {rc}", file=sys.stderr)
            return
        c.subscribe([(t, 1) for t in consumer.subscriptions])

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, props: Any) -> None:
        with lock:
            consumer.emit("ready", f"subscribed to {args.prefix}/{args.community}/+ ...")

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            consumer.on_message(msg.topic, bytes(msg.payload))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    port = args.port or (8883 if args.cafile else 1883)
    client.connect_async(args.host, port, keepalive=30)
    client.loop_start()
    try:
        while not stopping.wait(0.5):
            with lock:
                consumer.tick()
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
