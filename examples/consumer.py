#!/usr/bin/env python3
"""A small reference consumer of the building safety gateways of one community (docs/mqtt.md).

It subscribes to every building of a community, deduplicates events by ``event_id``, notices gaps in ``seq``
(per gateway session) and then asks that gateway for a ``rebirth``, and prints who must be told about each
alarm, supervisory signal and fault — from a mapping file of its own (the gateways never hold people's
contact details):

* an event in a household → that household's relatives and the head of its unit;
* an event in a unit without a household (an extinguisher cabinet) → the unit head;
* a fault, or anything without a unit → the building head.

Only paho-mqtt (2.x) and the standard library are needed::

    python examples/consumer.py --host broker.example --port 8883 --cafile ca.pem \\
        --community sunshine-garden --contacts examples/consumer-contacts.toml

``--json`` prints one JSON object per line (``notify``, ``duplicate``, ``gap``, ``rebirth_requested``,
``command_result``, ``availability``, ``birth``) instead of text.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import time
import tomllib
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SEEN_IDS_KEPT = 100_000
REBIRTH_EVERY_S = 30.0
COMMAND_TTL_S = 60.0
NOTIFY = {("alarm", "raised"), ("alarm", "escalated"), ("supervisory", "raised"), ("fault", "raised")}


# ------------------------------------------------------------------------------------------- contacts


@dataclass(frozen=True)
class Person:
    name: str
    phone: str
    role: str


@dataclass
class Contacts:
    """Who to tell, keyed by "<community>/<building>[/<unit or household>]" (see consumer-contacts.toml)."""

    building_heads: dict[str, list[Person]] = field(default_factory=dict)
    unit_heads: dict[str, list[Person]] = field(default_factory=dict)
    relatives: dict[str, list[Person]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Contacts:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))

        def people(section: str, key: str, role: str, many: bool) -> dict[str, list[Person]]:
            out: dict[str, list[Person]] = {}
            for place, entry in data.get(section, {}).items():
                raw = entry.get(key, [] if many else None)
                items = raw if many else [raw] if raw else []
                out[place] = [Person(p["name"], p["phone"], role) for p in items]
            return out

        return cls(building_heads=people("buildings", "head", "building head", many=False),
                   unit_heads=people("units", "head", "unit head", many=False),
                   relatives=people("households", "relatives", "relative", many=True))

    def whom(self, event: dict[str, Any]) -> list[Person]:
        """The people to tell about ``event``."""
        building = f"{event['community']}/{event['building']}"
        unit, household = event.get("unit"), event.get("household")
        if event["kind"] == "fault" or unit is None:
            return self.building_heads.get(building, [])
        unit_head = self.unit_heads.get(f"{building}/{unit}", [])
        if household is None:
            return unit_head
        return self.relatives.get(f"{building}/{household}", []) + unit_head


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


class Consumer:
    """The message handling, independent of the network (paho calls :meth:`on_message`)."""

    def __init__(self, client: mqtt.Client, *, prefix: str, community: str, contacts: Contacts,
                 client_id: str, v5: bool, as_json: bool, out: Any = sys.stdout) -> None:
        self.client = client
        self.prefix = prefix
        self.community = community
        self.contacts = contacts
        self.client_id = client_id
        self.v5 = v5
        self.as_json = as_json
        self.out = out
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.last_seq: dict[tuple[str, int], int] = {}
        self.rebirth_asked: dict[tuple[str, int], float] = {}
        self.pending: dict[str, str] = {}  # command id → building

    @property
    def subscriptions(self) -> list[str]:
        base = f"{self.prefix}/{self.community}/+"
        return [f"{base}/availability", f"{base}/birth", f"{base}/event/#", f"{base}/reply",
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
        elif body.get("type") == "command_result":
            self.emit("command_result", f"{body.get('building')}: command {body.get('command')} {body.get('id')}: "
                      f"{body.get('status')} ({body.get('code')}){': ' + body['reason'] if body.get('reason') else ''}",
                      id=body.get("id"), command=body.get("command"), status=body.get("status"),
                      code=body.get("code"))

    def event(self, e: dict[str, Any]) -> None:
        event_id = e.get("event_id")
        if not isinstance(event_id, str):
            return
        if event_id in self.seen:
            self.emit("duplicate", f"duplicate {event_id} ignored", event_id=event_id)
            return
        self.seen[event_id] = None
        if len(self.seen) > SEEN_IDS_KEPT:
            self.seen.popitem(last=False)
        key = (str(e.get("gateway")), int(e.get("session", 0)))
        seq = int(e.get("seq", 0))
        last = self.last_seq.get(key)
        if last is not None and seq > last + 1:
            self.emit("gap", f"{key[0]} session {key[1]}: events {last + 1}..{seq - 1} missing",
                      gateway=key[0], session=key[1], missing=[last + 1, seq - 1])
            self.ask_rebirth(e, key)
        if last is None or seq > last:
            self.last_seq[key] = seq
        if (e.get("kind"), e.get("action")) in NOTIFY:
            people = self.contacts.whom(e)
            text = describe(e)
            names = ", ".join(f"{p.name} ({p.role}, {p.phone})" for p in people) or "nobody on file: check the mapping"
            self.emit("notify", f"TELL {names}: {text}", event_id=event_id, kind=e["kind"], text_only=text,
                      whom=[{"name": p.name, "phone": p.phone, "role": p.role} for p in people])

    def ask_rebirth(self, e: dict[str, Any], key: tuple[str, int]) -> None:
        now = time.monotonic()
        if now - self.rebirth_asked.get(key, -REBIRTH_EVERY_S) < REBIRTH_EVERY_S:
            return
        self.rebirth_asked[key] = now
        community, building = e["community"], e["building"]
        base = f"{self.prefix}/{community}/{building}"
        issued = time.time()
        command = {
            "version": 1, "id": uuid.uuid4().hex, "command": "rebirth",
            "issued_at": _iso(issued), "expires_at": _iso(issued + COMMAND_TTL_S),
            "target": {"community": community, "building": building},
        }
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{base}/reply/{self.client_id}"
            props.CorrelationData = command["id"].encode()
        self.pending[command["id"]] = building
        self.client.publish(f"{base}/command/rebirth", json.dumps(command), qos=1, properties=props)
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
                        client_id=args.client_id, v5=v5, as_json=args.json)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            print(f"connect refused: {rc}", file=sys.stderr)
            return
        c.subscribe([(t, 1) for t in consumer.subscriptions])

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, props: Any) -> None:
        consumer.emit("ready", f"subscribed to {args.prefix}/{args.community}/+ ...")

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda c, u, msg: consumer.on_message(msg.topic, bytes(msg.payload))
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    port = args.port or (8883 if args.cafile else 1883)
    client.connect(args.host, port, keepalive=30)
    try:
        client.loop_forever(retry_first_connection=True)
    except KeyboardInterrupt:
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
