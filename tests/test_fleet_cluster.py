"""The reference cluster (fleet/cluster.py): three real nats-server nodes on free loopback ports, MQTT 3.1.1.

Every node takes a gateway's QoS 1 publish with a PUBACK; a message crosses the cluster; a gateway cannot write
under another building or read another building's commands (the node refuses and says so in its log); a PUBACK
is withheld while the JetStream quorum is lost; a node killed with SIGKILL comes back; and a real gateway with
``mqtt.hosts`` listing the three nodes delivers its alarms through the cluster and moves to another node
when its node is killed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.cluster import Cluster, ClusterError, Community, find_nats_server, permissions, to_subject
from tests.support.wait import wait_until

try:
    find_nats_server()
except ClusterError as exc:  # pragma: no cover - the fleet extra is part of the test environment
    pytest.skip(str(exc), allow_module_level=True)

# solo: three NATS nodes and their elections are timed against a loaded machine's other tests otherwise
pytestmark = [
    pytest.mark.timeout(300), pytest.mark.solo,
]

COMMUNITY = Community.from_dict({
    "community": {"id": "sunshine-garden", "password_seed": "a-seed-for-the-tests-only"},
    "buildings": [{"id": "b1"}, {"id": "b2"}, {"id": "b3", "password": "b3-password"}],
})
BASE = "safety/sunshine-garden"
_ids = itertools.count(1)


class Peer:
    """One MQTT 3.1.1 client that records what the node answers: CONNACK, SUBACK codes, PUBACKs, messages, and
    the connection closing."""

    def __init__(self, port: int, user: str, password: str, *, client_id: str | None = None,
                 clean: bool = True, connect_timeout: float = 30.0) -> None:
        self.cond = threading.Condition()
        self.connack: str | None = None
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: set[int] = set()
        self.messages: list[mqtt.MQTTMessage] = []
        self.closed = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{next(_ids)}",
                                  protocol=mqtt.MQTTv311, clean_session=clean, reconnect_on_failure=False)
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        try:
            self.wait(lambda: self.connack is not None or self.closed > 0, connect_timeout, "no CONNACK")
            assert self.connack == "Success", f"CONNACK: {self.connack}"
        except AssertionError:
            self.client.loop_stop()
            self.client.disconnect()
            raise

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.connack = str(rc)
            self.cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: Any, props: Any) -> None:
        with self.cond:
            self.subacks[mid] = [int(r.value) for r in rcs]
            self.cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.cond:
            self.pubacks.add(mid)
            self.cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.closed += 1
            self.cond.notify_all()

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(ready, timeout=timeout), what

    def subscribe(self, topic: str) -> list[int]:
        """SUBSCRIBE at QoS 1; the SUBACK's return codes (1 granted, 128 refused)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        self.wait(lambda: mid in self.subacks, 30, f"no SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, body: dict[str, Any] | bytes) -> int:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        return info.mid

    def wait_acked(self, mid: int, what: str, timeout: float = 30.0) -> None:
        self.wait(lambda: mid in self.pubacks, timeout, what)

    def settle(self, mid: int, timeout: float) -> bool:
        """Wait for the PUBACK of ``mid`` or the connection closing; True if it was acknowledged."""
        with self.cond:
            self.cond.wait_for(lambda: mid in self.pubacks or self.closed > 0, timeout=timeout)
            return mid in self.pubacks

    def acked(self, mid: int) -> bool:
        with self.cond:
            return mid in self.pubacks

    def received(self, topic_filter: str = "#") -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(m.payload) for m in self.messages if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def wait_message(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        self.wait(lambda: any(match(b) for b in self.received()), timeout, "message never arrived")
        return next(b for b in self.received() if match(b))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connected(port: int, user: str, password: str, timeout: float = 60.0, **kwargs: Any) -> Peer:
    """A peer connected to ``port``, trying again while the node answers CONNECT with an error or not at all
    (after a node is lost, its streams elect new leaders before sessions can be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Peer(port, user, password, connect_timeout=min(30.0, max(1.0, deadline - time.monotonic())),
                        **kwargs)
        except (AssertionError, OSError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def gateway(cluster: Cluster, node: int, building: str = "b1", **kwargs: Any) -> Peer:
    user, password = COMMUNITY.credentials()[building]
    return connected(cluster.mqtt_ports[node], user, password, **kwargs)


def publish_acked(cluster: Cluster, node: int, topic: str, body: dict[str, Any], timeout: float = 90.0) -> None:
    """Publish as b1 on ``node`` until a PUBACK comes, connecting again when the node closes the connection, as
    a gateway does: after a node is killed, the streams it led have no leader until the others elect one."""
    deadline = time.monotonic() + timeout
    while True:
        gw = gateway(cluster, node, timeout=max(1.0, deadline - time.monotonic()))
        try:
            if gw.settle(gw.publish(topic, body), timeout=max(0.1, min(15.0, deadline - time.monotonic()))):
                return
        finally:
            gw.close()
        assert time.monotonic() < deadline, f"no PUBACK from node {node + 1} within {timeout:.0f} s"


def server(cluster: Cluster, node: int, **kwargs: Any) -> Peer:
    return connected(cluster.mqtt_ports[node], COMMUNITY.server_user, COMMUNITY.server_password, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the tests that do not stop nodes."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), COMMUNITY)
    c.start()
    try:
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------------ the community file


def test_community_files_are_checked_and_name_the_key(tmp_path: Path) -> None:
    example = Community.load(Path(__file__).parents[1] / "fleet" / "community.example.toml")
    assert [b.id for b in example.buildings] == ["b1", "b2", "b3"]
    assert example.building("b3").password == "an-explicit-password-for-b3"
    assert example.building("b1").password != example.building("b2").password, "derived per building"
    many = Community.from_dict({"community": {"id": "c", "password_seed": "x" * 16},
                                "buildings": {"count": 1000, "name": "b{:04d}"}})
    assert len(many.buildings) == 1000 and many.buildings[-1].id == "b1000"
    bad = {
        "community.id": {"community": {"id": "a.b", "password_seed": "x" * 16}, "buildings": [{"id": "b"}]},
        "buildings[1].id": {"community": {"id": "c", "password_seed": "x" * 16},
                            "buildings": [{"id": "b"}, {"id": "b"}]},
        "buildings[0].password": {"community": {"id": "c"}, "server": {"password": "p"}, "buildings": [{"id": "b"}]},
        "server.password": {"community": {"id": "c"}, "buildings": [{"id": "b", "password": "p"}]},
        "buildings[0].id": {"community": {"id": "c", "password_seed": "x" * 16}, "buildings": [{"id": "b.1"}]},
    }
    for key, data in bad.items():
        with pytest.raises(ClusterError, match=re.escape(key)):
            Community.from_dict(data)


def test_the_permissions_are_the_mosquitto_acl_on_subjects() -> None:
    """Each gateway: write its own messages, read its own commands; the server: read all, write commands."""
    perms = permissions(COMMUNITY)
    b1 = perms["sunshine-garden/b1"]
    base = to_subject(f"{BASE}/b1")
    assert b1["publish"]["allow"] == [f"{base}.availability", f"{base}.birth", f"{base}.status", f"{base}.event.>",
                                      f"{base}.reply", f"{base}.reply.>"]
    assert b1["subscribe"]["allow"] == [f"{base}.command", f"{base}.command.>"]
    central = perms["central-server"]
    assert "safety.>" in central["subscribe"]["allow"]
    assert "safety.sunshine-garden.*.command.>" in central["publish"]["allow"]
    assert not any(s.startswith("$MQTT") for p in perms.values() for d in p.values() for s in d["allow"])


# ------------------------------------------------------------------------------------ the running cluster


def test_every_node_acknowledges_a_gateways_qos1_publish(cluster: Cluster) -> None:
    assert all(n.is_running for n in cluster.nodes) and len(set(cluster.mqtt_ports)) == 3
    for node in range(3):
        gw = gateway(cluster, node)
        try:
            mid = gw.publish(f"{BASE}/b1/event/alarm", {"event_id": f"n{node}"})
            gw.wait_acked(mid, f"no PUBACK from node {node + 1}")
        finally:
            gw.close()


def test_the_mqtt_streams_are_replicated_on_the_three_nodes(cluster: Cluster) -> None:
    """Sessions, QoS 1 messages and retained messages live in JetStream streams of 3 replicas (the node's own
    monitoring endpoint says so); ``$MQTT_msgs`` keeps a message only while a QoS 1 subscription wants it."""
    import urllib.request

    url = f"http://127.0.0.1:{cluster.node(0).ports.http}/jsz?accounts=true&streams=true&config=true&acc=$G"
    with urllib.request.urlopen(url, timeout=10) as answer:
        jsz = json.load(answer)
    streams = {s["name"]: s for a in jsz["account_details"] for s in a["stream_detail"]}
    # one consumer of $MQTT_msgs per gateway's command subscription: 2.15's default stops a stream at 1000
    assert jsz["limits"].get("default_max_consumers") == -1, jsz["limits"]
    for name in ("$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs"):
        assert streams[name]["config"]["num_replicas"] == 3, streams[name]["config"]
        assert streams[name]["cluster"]["leader"] in {n.name for n in cluster.nodes}
    assert streams["$MQTT_msgs"]["config"]["retention"] == "interest"


def test_a_node_hands_its_leaderships_over_before_a_planned_stop(cluster: Cluster) -> None:
    """``hand_over`` steps the node down from each stream it leads; the others lead them, and it goes on
    serving (what ``Node.stop(hand_over=True)`` does before SIGTERM)."""
    leader = next(n for n in cluster.nodes
                  if any(s.endswith(".$MQTT_msgs") for s in n.leaderships()))
    asked = leader.hand_over()
    assert "$JS.API.STREAM.LEADER.STEPDOWN.$MQTT_msgs" in asked
    wait_until(lambda: not any(".STREAM." in s for s in leader.leaderships()), timeout=30,
               message="the node still leads a stream")
    wait_until(lambda: any(any(s.endswith(".$MQTT_msgs") for s in n.leaderships()) for n in cluster.nodes),
               timeout=30, message="no node took $MQTT_msgs over")
    gw = gateway(cluster, leader.index)
    try:
        gw.wait_acked(gw.publish(f"{BASE}/b1/event/test", {"event_id": "after-hand-over"}), "no PUBACK")
    finally:
        gw.close()


def test_a_message_published_on_node_1_reaches_the_server_on_node_2(cluster: Cluster) -> None:
    srv = server(cluster, 1)
    gw = gateway(cluster, 0)
    try:
        assert srv.subscribe(f"{BASE}/+/event/#") == [1]
        gw.publish(f"{BASE}/b1/event/alarm", {"event_id": "cross-1"})
        srv.wait_message(lambda b: b.get("event_id") == "cross-1")
        # and the server's command reaches that gateway, across the cluster the other way
        assert gw.subscribe(f"{BASE}/b1/command/#") == [1]
        srv.publish(f"{BASE}/b1/command/status", {"id": "cmd-1"})
        gw.wait_message(lambda b: b.get("id") == "cmd-1")
    finally:
        gw.close()
        srv.close()


def test_a_gateway_cannot_write_under_another_building_nor_read_its_commands(cluster: Cluster) -> None:
    """The node drops the foreign publish (nobody gets it; its log names the violation) and refuses the
    foreign subscriptions in the SUBACK. MQTT 3.1.1 has no negative PUBACK: NATS acknowledges the dropped
    message and keeps the connection (docs/fleet.md)."""
    srv = server(cluster, 1)
    gw = gateway(cluster, 0)
    log = cluster.node(0).log_file
    try:
        assert srv.subscribe(f"{BASE}/#") == [1]
        assert gw.subscribe(f"{BASE}/b2/command/#") == [128], "another building's commands"
        assert gw.subscribe(f"{BASE}/+/event/#") == [128], "other buildings' events"
        foreign = gw.publish(f"{BASE}/b2/event/alarm", {"event_id": "forged"})
        gw.publish(f"{BASE}/b2/command/reset", {"id": "forged-command"})
        gw.publish(f"{BASE}/b1/command/reset", {"id": "own-command"})  # its own commands are read-only too
        marker = gw.publish(f"{BASE}/b1/event/test", {"event_id": "after"})
        srv.wait_message(lambda b: b.get("event_id") == "after")  # sent after the forged ones, on one connection
        wait_until(lambda: "Publish Violation" in log.read_text(errors="replace"), timeout=30,
                   message="the node did not log the refusal")
        text = log.read_text(errors="replace")
        assert 'Subject "safety.sunshine-garden.b2.event.alarm"' in text
        assert 'Subject "safety.sunshine-garden.b1.command.reset"' in text
        got = srv.received()
        assert [b.get("event_id") for b in got if "event_id" in b] == ["after"]
        assert not [b for b in got if "id" in b], got
        # the server may get the marker before the gateway gets its PUBACK: wait for that, then look
        gw.wait_acked(marker, "no PUBACK for the marker")
        assert gw.acked(foreign) and gw.closed == 0
    finally:
        gw.close()
        srv.close()


def test_a_wrong_password_is_refused(cluster: Cluster) -> None:
    with pytest.raises(AssertionError, match=r"Not authorized|Bad user name or password"):
        Peer(cluster.mqtt_ports[0], "sunshine-garden/b1", "wrong")
    with pytest.raises(AssertionError, match=r"Not authorized|Bad user name or password"):
        Peer(cluster.mqtt_ports[0], "sunshine-garden/b2", COMMUNITY.building("b1").password)


@pytest.mark.slow
def test_a_killed_node_comes_back_and_a_puback_waits_for_a_quorum(tmp_path: Path) -> None:
    """SIGKILL one node: the others go on. Kill a second: the remaining node does not acknowledge (no quorum
    for the replicated stream) and closes the connection. Restart them: the node left with the message takes
    it again and acknowledges it, and the restarted nodes serve MQTT again."""
    c = Cluster(tmp_path / "cluster", COMMUNITY).start()
    srv = gw = None
    try:
        c.node(0).kill()
        assert not c.node(0).is_running
        publish_acked(c, 1, f"{BASE}/b1/event/alarm", {"event_id": "one-down"})  # two of three: a quorum
        gw = gateway(c, 1)
        gw.wait_acked(gw.publish(f"{BASE}/b1/event/alarm", {"event_id": "still-one-down"}), "no PUBACK")
        c.node(2).kill()
        lost = gw.publish(f"{BASE}/b1/event/alarm", {"event_id": "no-quorum"})
        gw.wait(lambda: gw.closed > 0, 30, "the node kept the connection without storing")  # type: ignore[union-attr]
        assert not gw.acked(lost), "a PUBACK without a quorum"
        assert "unable to store QoS1 message in JetStream" in c.node(1).log_file.read_text(errors="replace")
        gw.close()
        c.node(0).start()
        c.node(2).start()
        srv = server(c, 0)
        assert srv.subscribe(f"{BASE}/+/event/#") == [1]
        gw = None
        for node in (0, 2):
            publish_acked(c, node, f"{BASE}/b1/event/alarm", {"event_id": f"back-{node}"})
            srv.wait_message(lambda b, n=node: b.get("event_id") == f"back-{n}", timeout=60)  # type: ignore[misc]
    finally:
        for peer in (gw, srv):
            if peer is not None:
                peer.close()
        c.stop()
    assert not any(n.is_running for n in c.nodes)


@pytest.mark.slow
def test_the_command_line_starts_and_stops_the_cluster(tmp_path: Path) -> None:
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "fleet" / "community.example.toml"
    run = [sys.executable, "-m", "fleet.cluster"]
    args = ["--dir", str(tmp_path / "c"), "--community", str(example)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    started = subprocess.run([*run, "start", *args], capture_output=True, text=True, timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        assert info["running"] == [True, True, True] and len(info["mqtt"]) == 3
        creds = json.loads((tmp_path / "c" / "credentials.json").read_text())
        assert creds["b1"]["username"] == "sunshine-garden/b1"
        assert (tmp_path / "c" / "credentials.json").stat().st_mode & 0o077 == 0
        for i in range(3):
            conf = (tmp_path / "c" / f"n{i + 1}" / "nats.conf").read_text()
            assert "stream_replicas: 3" in conf and f"server_name: sunshine-garden-n{i + 1}" in conf
        # a building added to the community file: reload, and its gateway may connect without a restart
        grown = tmp_path / "community.toml"
        grown.write_text(example.read_text() + '\n[[buildings]]\nid = "b4"\npassword = "b4-password"\n')
        before = [n.pid for n in Cluster(tmp_path / "c", Community.load(grown)).nodes]
        with pytest.raises(AssertionError, match=r"Not authorized|Bad user name or password"):
            Peer(int(info["mqtt"][0].rsplit(":", 1)[1]), "sunshine-garden/b4", "b4-password")
        reloaded = subprocess.run([*run, "reload", "--dir", str(tmp_path / "c"), "--community", str(grown)],
                                  capture_output=True, text=True, timeout=60, env=env)
        assert reloaded.returncode == 0, reloaded.stderr
        b4 = connected(int(info["mqtt"][2].rsplit(":", 1)[1]), "sunshine-garden/b4", "b4-password", timeout=30)
        b4.close()
        assert [n.pid for n in Cluster(tmp_path / "c", Community.load(grown)).nodes] == before, "not restarted"
    finally:
        stopped = subprocess.run([*run, "stop", *args], capture_output=True, text=True, timeout=120, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["running"] == [False, False, False]


@pytest.mark.slow
def test_a_planned_stop_in_lame_duck_mode_moves_the_leaderships_first(tmp_path: Path) -> None:
    """``Node.stop(lame_duck=True)`` on the node leading ``$MQTT_msgs``: nats-server hands its leaderships over
    before it closes anything; a gateway on another node publishing every 0.1 s meanwhile (and 3 s after) gets a
    PUBACK for each (connecting again if its node closes the connection, as the uplink does); the node's log says
    lame duck, it exits, and another node leads the stream. The longest wait is printed."""
    c = Cluster(tmp_path / "cluster", COMMUNITY).start()
    gw = None
    try:
        leader = next(n for n in c.nodes if any(s.endswith(".$MQTT_msgs") for s in n.leaderships()))
        other = next(n for n in c.nodes if n is not leader)
        gw = gateway(c, other.index)
        stopping = threading.Thread(target=leader.stop, kwargs={"lame_duck": True})
        started = time.monotonic()
        stopping.start()
        waits: list[float] = []
        reconnects = 0
        stopped_at: float | None = None
        while True:
            if stopped_at is None and not stopping.is_alive():
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() >= stopped_at + 3.0:  # and 3 s after it is gone
                break
            t0 = time.monotonic()
            body = {"event_id": f"ldm-{len(waits)}"}
            while not gw.settle(gw.publish(f"{BASE}/b1/event/test", body), timeout=30):
                assert gw.closed, "no PUBACK within 30 s on an open connection"
                gw.close()  # as the gateway does: connect again and send it again
                reconnects += 1
                gw = gateway(c, other.index)
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        stopping.join()
        took = (stopped_at or time.monotonic()) - started
        assert not leader.is_running
        assert "lame duck" in leader.log_file.read_text(errors="replace").lower()
        assert any(any(s.endswith(".$MQTT_msgs") for s in n.leaderships()) for n in c.nodes if n is not leader)
        print(f"\nlame-duck stop of the $MQTT_msgs leader: {took:.1f} s, {len(waits)} publishes on another node, "
              f"longest PUBACK wait {max(waits):.2f} s, {reconnects} connections closed by the node")
        assert len(waits) >= 10
    finally:
        if gw is not None:
            gw.close()
        c.stop()


# ------------------------------------------------------------------------------------ a real gateway on the cluster


def _command_consumers(cluster: Cluster, building: str) -> list[dict[str, Any]]:
    """JetStream consumers on any node whose filter takes ``building``'s commands."""
    import urllib.request

    found = []
    for i in range(len(cluster.nodes)):
        url = (f"http://127.0.0.1:{cluster.node(i).ports.http}/jsz?accounts=true&streams=true&consumers=true"
               "&config=true&acc=$G")
        with urllib.request.urlopen(url, timeout=10) as answer:
            jsz = json.load(answer)
        found += [c for a in jsz.get("account_details", []) for st in a.get("stream_detail", []) or []
                  for c in st.get("consumer_detail", []) or []
                  if f".{building}.command" in str(c.get("config", {}).get("filter_subject", ""))
                  + str(c.get("config", {}).get("filter_subjects", ""))]
    return found


def gateway_site(tmp_path: Path, cluster: Cluster, bus_port: str) -> tuple[Any, Path]:
    """A site file for building b1 with ``mqtt.hosts`` listing the three nodes, MQTT 3.1.1 and its credentials."""
    from tests.support.site import build_site

    spec = build_site(bus_port=bus_port, db_path=tmp_path / "events.db", broker_port=1,
                      socket_path=tmp_path / "control.sock", households=2, community=COMMUNITY.id, building="b1",
                      mqtt_protocol=311)
    user, password = COMMUNITY.credentials()["b1"]
    creds = tmp_path / "mqtt.toml"
    creds.write_text(f"username = {json.dumps(user)}\npassword = {json.dumps(password)}\n", encoding="utf-8")
    creds.chmod(0o600)
    one_node = 'host = "127.0.0.1"\nport = 1\n'
    assert one_node in spec.toml
    toml = spec.toml.replace(one_node, f"hosts = {json.dumps(cluster.mqtt_hosts)}\n"
                                       f"credentials_file = {json.dumps(str(creds))}\n")
    path = tmp_path / "site.toml"
    path.write_text(toml, encoding="utf-8")
    return spec, path


@pytest.mark.slow
async def test_a_gateway_delivers_through_the_cluster_and_moves_on_when_its_node_is_killed(
    tmp_path: Path, mock_pins: Any
) -> None:
    """The in-process panel and its real storage/uplink child, ``mqtt.hosts`` = the three nodes: an alarm
    arrives at the server; the gateway's node is killed (SIGKILL) and a second alarm is raised; it arrives
    through another node, and every wait the uplink chose meanwhile was at most 5 s (its own log records)."""
    from gateway.config import load_config
    from gateway_sim.nullmodem import VirtualNullModem
    from tests.support.building import eventually, running_gateway, simulated_detectors, uplink_records

    c = Cluster(tmp_path / "cluster", COMMUNITY).start()
    srv: Peer | None = None
    try:
        with VirtualNullModem(tmp_path / "dev") as modem:
            spec, site = gateway_site(tmp_path, c, modem.gateway_port)
            cfg = load_config(site)
            assert [f"{h}:{p}" for h, p in cfg.mqtt.endpoints] == c.mqtt_hosts and cfg.mqtt.protocol == 311
            srv = server(c, 2)
            assert srv.subscribe(f"{BASE}/b1/event/#") == [1]
            first, second = spec.detectors
            with simulated_detectors(modem.device_port, spec.detectors) as (_bus, sims):
                async with running_gateway(cfg):
                    await eventually(lambda: any(r.get("event") == "uplink connected" for r in uplink_records(cfg)),
                                     timeout=60, message="the gateway never connected to the cluster")
                    # its command subscription (QoS 0) is a plain subscription: no JetStream consumer to elect
                    assert not _command_consumers(c, "b1"), _command_consumers(c, "b1")
                    sims[first.id].set_concentration(35.0)
                    await eventually(lambda: [b for b in srv.received() if b.get("kind") == "alarm"
                                              and b.get("device") == first.id], timeout=60)
                    connected = [r for r in uplink_records(cfg) if r.get("event") == "uplink connected"]
                    assert connected[-1]["broker"] == c.mqtt_hosts[0], "the first node of mqtt.hosts"
                    before = len(uplink_records(cfg))
                    c.node(0).kill()
                    # raised once the uplink knows its node is gone, so that it is never in flight to the dead node
                    noticed = ("uplink reconnecting", "uplink down; events buffered")
                    await eventually(lambda: any(r.get("event") in noticed for r in uplink_records(cfg)[before:]),
                                     timeout=60, message="the uplink never noticed its node was killed")
                    raised = len(uplink_records(cfg)) - before
                    sims[second.id].set_concentration(35.0)
                    [alarm] = await eventually(lambda: [b for b in srv.received() if b.get("kind") == "alarm"
                                                        and b.get("device") == second.id], timeout=90,
                                               message="the second alarm never arrived through another node")
                    # the uplink logs "event forwarded" on the PUBACK, which may come after the server has it
                    def once_acked() -> list[dict[str, Any]]:
                        rs = uplink_records(cfg)[before:]
                        return rs if any(r.get("event") == "event forwarded"
                                         and r.get("event_id") == alarm["event_id"] for r in rs) else []

                    records = await eventually(once_acked, timeout=60,
                                               message="the uplink never logged the PUBACK of the second alarm")
    finally:
        if srv is not None:
            srv.close()
        c.stop()
    waits = [r for r in records if "retry_in_s" in r]
    moved = [r for r in records if r.get("event") == "uplink connected"]
    forwarded = next(i for i, r in enumerate(records)
                     if r.get("event") == "event forwarded" and r.get("event_id") == alarm["event_id"])
    assert waits and all(r["retry_in_s"] <= 5.0 for r in waits), waits
    assert waits[0]["next_broker"] == c.mqtt_hosts[1], "the first attempt after the loss goes to the next node"
    assert waits[0]["retry_in_s"] == 0.0, "and at once"
    assert moved and moved[0]["broker"] != c.mqtt_hosts[0], moved
    last_connection = max(i for i, r in enumerate(records[:forwarded]) if r.get("event") == "uplink connected")
    assert records[last_connection]["broker"] in c.mqtt_hosts[1:], "delivered through a node still running"
    assert alarm["event_id"].count(":") == 3
    # raised in this session after the loss, it goes out for the first time: live, not historical, unless the
    # uplink logged a later loss with events in flight (then it may come again, and each copy after the first is)
    resent = any(r.get("event") == "uplink lost with events in flight: outcome unknown, they will be sent again"
                 for r in records[raised:])
    assert alarm["historical"] is False or resent, (alarm, records[raised:])
    copies = [b for b in srv.received() if b.get("event_id") == alarm["event_id"]]
    assert copies[0] == alarm and all(copy["historical"] is True for copy in copies[1:]), copies


# ------------------------------------------------------------------------------------ the inbox on the cluster


@pytest.mark.slow
async def test_the_inbox_closes_every_kind_of_gap_and_hears_alarms_at_once_through_a_node_loss(
    tmp_path: Path,
) -> None:
    """Two inbox instances (each on its own first node) and PostgreSQL; a simulated gateway (its real outbox,
    uplink and command door) runs three sessions. Rows lost at the centre — the tail of session 1, all of
    session 2, the head of session 3 — come back from the gateway: only the births say where sessions 1 and 2
    ended. Then the node leading ``$MQTT_msgs`` is SIGKILLed and the gateway raises alarms at once: each is in
    the table within 5 s (first notice, core NATS) and its durable record within 60 s, every event once."""
    import asyncio
    import random
    import shutil
    import signal
    import sys

    import psycopg

    from fleet.simulator import SimulatedGateway
    from gateway.config import MqttConfig
    from tests.support.fleet import _Lines
    from tests.support.postgres import PostgresServer, find_pg_bin

    if find_pg_bin() is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are required")
    c = Cluster(tmp_path / "cluster", COMMUNITY).start()
    pg = PostgresServer().start()
    (tmp_path / "central.pw").write_text(COMMUNITY.server_password + "\n", encoding="utf-8")
    inboxes: list[_Lines] = []
    gw: SimulatedGateway | None = None
    user, password = COMMUNITY.credentials()["b1"]
    host, port = c.mqtt_hosts[0].rsplit(":", 1)
    mqtt_cfg = MqttConfig(host=host, port=int(port), hosts=tuple(c.mqtt_hosts), client_id="sunshine-garden-b1",
                          protocol=311, username=user, password=password, allow_plaintext=True)

    def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            cur = conn.execute(sql, args)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    async def session(alarms: int) -> SimulatedGateway:
        g = SimulatedGateway(community=COMMUNITY.id, building="b1", prefix="safety", mqtt_cfg=mqtt_cfg,
                             db_path=str(tmp_path / "b1.db"), rng=random.Random(len(inboxes)))
        await g.open()
        g.start_uplink()
        await _until(lambda: g.uplink.connected, timeout=60, message="the gateway did not connect")
        for _ in range(alarms):
            g.alarm()
            g.telemetry()
        await _until(g.drained, timeout=60, message="not acknowledged")
        return g

    try:
        for i, name in enumerate(("inbox-1", "inbox-2")):
            urls = c.nats_urls[i:] + c.nats_urls[:i]
            inboxes.append(_Lines(name, [sys.executable, "-m", "fleet.inbox", "--nats", ",".join(urls), "--user",
                                         COMMUNITY.server_user, "--password-file", str(tmp_path / "central.pw"),
                                         "--dsn", pg.dsn, "--community", COMMUNITY.id, "--name", name,
                                         "--ack-wait", "3"], tmp_path / f"{name}.log"))
            await asyncio.to_thread(inboxes[-1].wait_for, lambda m: m.get("event") == "consuming", 60)
        for alarms in (4, 4):
            gw = await session(alarms)
            await gw.close()
            gw = None
        gw = await session(4)
        stored = await _until(lambda: _outbox_ids(tmp_path / "b1.db"), timeout=10)
        await _until(lambda: len(query("SELECT event_id FROM events")) == len(stored), timeout=60,
                         message="the inbox did not store every event")
        await _until(lambda: query("SELECT session, last_seq FROM session_ends WHERE session < 3 ORDER BY 1")
                         == [(1, 8), (2, 8)], timeout=30, message="session ends not recorded from the birth")
        lost = [r[0] for r in query(
            "SELECT event_id FROM events WHERE (session = 1 AND seq > 5) OR session = 2 OR (session = 3 AND seq <= 2)")]
        assert len(lost) == 3 + 8 + 2
        query("DELETE FROM notifications WHERE event_id = ANY(%s)", lost)
        query("DELETE FROM events WHERE event_id = ANY(%s)", lost)
        await _until(lambda: query("SELECT count(*) FROM events WHERE event_id = ANY(%s) AND recovered", lost)
                         == [(len(lost),)], timeout=60, message="the lost rows did not come back from the gateway")

        # the gateway's own node is lost, with whatever it led; alarms at once. Its main connection can come back
        # only once the session stream has a leader; its standby connection, on another node, is already up.
        assert gw.uplink.standby is not None
        await _until(lambda: gw.uplink.standby.connected, timeout=60, message="the standby never connected")
        victim = c.nodes[gw.uplink.policy.node]
        # the worst case: it leads the stream every session is stored in and the one every QoS 1 message is
        victim.lead("$MQTT_sess", "$MQTT_msgs")
        led = victim.leaderships()
        before = set(_outbox_ids(tmp_path / "b1.db"))
        victim.kill()
        for _ in range(5):
            gw.alarm()
        await _until(gw.drained, timeout=120, message="the alarms were not acknowledged after the node loss")
        copies = gw.uplink.standby.copies if gw.uplink.standby is not None else 0
        stored = _outbox_ids(tmp_path / "b1.db")
        await _until(lambda: len(query("SELECT event_id FROM events WHERE durable_at IS NOT NULL"))
                         == len(stored), timeout=90, message="not every durable record arrived")
        rows = query("SELECT event_id, extract(epoch FROM committed_at), extract(epoch FROM durable_at), fast"
                     " FROM events")
    finally:
        if gw is not None:
            await gw.close()
        for p in inboxes:
            p.stop(signal.SIGTERM)
        c.stop()
        pg.stop()
    walls = _outbox_walls(tmp_path / "b1.db")
    assert sorted(r[0] for r in rows) == sorted(stored), "every event, exactly once"
    after = [(float(r[1]) - walls[r[0]], float(r[2]) - walls[r[0]], r[3]) for r in rows if r[0] not in before]
    print(f"\nafter the loss of {victim.name} (the gateway's node; it led {led}): first notice "
          f"{[round(a[0], 2) for a in after]} s, durable record {[round(a[1], 2) for a in after]} s, fast path "
          f"{[a[2] for a in after]}, standby copies {copies}")
    assert len(after) == 5
    assert all(first <= 5.0 for first, _, _ in after), after
    assert all(durable <= 60.0 for _, durable, _ in after), after


def _outbox_ids(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT event_id FROM events")]


def _outbox_walls(db: Path) -> dict[str, float]:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {r[0]: float(r[1]) for r in conn.execute("SELECT event_id, wall FROM events")}


async def _until(predicate: Callable[[], Any], timeout: float, message: str = "condition not met") -> Any:
    """Await until ``predicate()`` (or what it returns, when awaitable) is truthy; AssertionError after
    ``timeout`` s."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"{message} (after {timeout:g} s)"
        await asyncio.sleep(0.2)


@pytest.mark.slow
def test_the_inbox_has_every_event_once_through_gateway_kills_and_a_node_loss(tmp_path: Path) -> None:
    """Three simulated gateways in one process (fleet/simulator.py: their real outboxes and uplinks), killed with
    SIGKILL at random in 8 rounds while raising and clearing alarms; the node leading ``$MQTT_msgs`` killed in
    round 3 and started again in round 6; two inbox instances on different first nodes. At the end every event
    the gateways stored, of every session, is in PostgreSQL exactly once."""
    import contextlib
    import random
    import shutil
    import signal
    import sqlite3
    import sys

    import psycopg

    from tests.support.fleet import _Lines
    from tests.support.postgres import PostgresServer, find_pg_bin

    if find_pg_bin() is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are required")
    community = Community.from_dict({"community": {"id": "chaos", "password_seed": "a-seed-for-the-tests-only"},
                                     "buildings": {"count": 3, "name": "b{:04d}"}})
    rng = random.Random(28)
    c = Cluster(tmp_path / "cluster", community).start()
    pg = PostgresServer().start()
    (tmp_path / "central.pw").write_text(community.server_password + "\n", encoding="utf-8")
    credentials = community.write_credentials(tmp_path / "credentials.json")
    gateways_dir = tmp_path / "gateways"
    inboxes: list[_Lines] = []
    killed = None

    def simulator(go: Path, *, burst_s: float, after_s: float) -> _Lines:
        go.write_text(f"{time.time()}\n", encoding="utf-8")
        return _Lines("simulator", [
            sys.executable, "-m", "fleet.simulator", "--worker", "0", "--gateways", "3", "--brokers",
            ",".join(c.mqtt_hosts), "--community", "chaos", "--credentials", str(credentials), "--workdir",
            str(gateways_dir), "--go-file", str(go), "--connect-spread-s", "0.3", "--steady-s", "0",
            "--telemetry-every", "1", "--burst-rate", "6", "--burst-s", str(burst_s), "--after-s", str(after_s),
            "--drain-timeout", "120", "--seed", str(rng.randrange(10**6))], tmp_path / f"{go.name}.log")

    def stored() -> set[str]:
        ids: set[str] = set()
        for db in gateways_dir.glob("*.db"):
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                ids |= {r[0] for r in conn.execute("SELECT event_id FROM events")}
        return ids

    def rows() -> list[str]:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM events").fetchall()]

    try:
        for i, name in enumerate(("inbox-1", "inbox-2")):
            urls = c.nats_urls[i:] + c.nats_urls[:i]
            inboxes.append(_Lines(name, [sys.executable, "-m", "fleet.inbox", "--nats", ",".join(urls), "--user",
                                         community.server_user, "--password-file", str(tmp_path / "central.pw"),
                                         "--dsn", pg.dsn, "--community", "chaos", "--name", name,
                                         "--ack-wait", "3"], tmp_path / f"{name}.log"))
            inboxes[-1].wait_for(lambda m: m.get("event") == "consuming", 60)
        for round_no in range(8):
            sim = simulator(tmp_path / f"go-{round_no}", burst_s=600, after_s=0)
            sim.wait_for(lambda m: m.get("event") == "ready", 90)
            if round_no == 3:
                killed = next(n for n in c.nodes if any(s.endswith(".$MQTT_msgs") for s in n.leaderships()))
                killed.kill()
            if round_no == 6 and killed is not None:
                killed.start(timeout=120)
            time.sleep(rng.uniform(0.5, 3.0))
            sim.stop(signal.SIGKILL)  # the whole gateway process, at once
        last = simulator(tmp_path / "go-last", burst_s=2, after_s=1)
        last.wait_for(lambda m: m.get("event") == "drained" and m.get("ok"), 180)
        wait_until(lambda: set(rows()) >= stored(), timeout=120, message="not every stored event is in the inbox")
        final, got = stored(), rows()
        last.stop(signal.SIGTERM)
    finally:
        for p in inboxes:
            p.stop(signal.SIGTERM)
        c.stop()
        pg.stop()
    recovered = sum(m.get("new", 0) for p in inboxes for m in p.lines if m.get("event") == "recovered")
    sessions = {e.rsplit(":", 2)[1] for e in final}
    print(f"\n{len(final)} events in {len(sessions)} sessions of 3 gateways through 8 SIGKILLs of the gateways "
          f"and the loss of {killed.name if killed else None}; {recovered} healed from the gateways")
    assert killed is not None and len(sessions) == 9
    assert sorted(got) == sorted(set(got)), "exactly once"
    assert set(got) == final, "every stored event, nothing else"
