"""The control socket: protocol, malformed input, permissions, peer credentials, lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ControlConfig
from gateway.control.server import MAX_LINE, READ_COMMANDS, ControlServer, ControlServerError
from gateway.ops.cli import EXIT_OK, EXIT_REJECTED
from tests.support.broker import MosquittoBroker
from tests.support.other_user import SYSTEM_PYTHON, readable_copy, system_python_ok
from tests.test_commands import Site, running_site, stored_at_least, wait_for


@pytest.fixture
async def site(tmp_path: Path, broker: MosquittoBroker, mock_pins: Any) -> AsyncIterator[Site]:
    async with running_site(tmp_path, broker) as s:
        yield s


class Conn:
    """A raw JSON-lines connection to the control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> Conn:
        reader, writer = await asyncio.open_unix_connection(path, limit=4 * MAX_LINE)
        return cls(reader, writer)

    async def send(self, line: bytes) -> None:
        self.writer.write(line)
        await self.writer.drain()

    async def receive(self, timeout: float = 20.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line, "connection closed"
        message: dict[str, Any] = json.loads(line)
        return message

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(json.dumps(message).encode() + b"\n")
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def socket_path(site: Site) -> str:
    return site.gateway.cfg.control.socket


MALFORMED: list[tuple[bytes, str]] = [
    (b"not json\n", "not valid JSON"),
    (b"\xff\xfe\x00garbage\n", "not valid UTF-8"),
    (b"[1, 2, 3]\n", "must be a JSON object"),
    (b'"status"\n', "must be a JSON object"),
    (b'{"id": 1}\n', "command is required"),
    (b'{"id": 2, "command": 42}\n', "command is required and must be a string"),
    (b'{"id": 3, "command": "status", "args": [1]}\n', "args must be an object"),
    (b'{"id": 4, "command": "status", "extra": true}\n', "unknown request field 'extra'"),
    (b'{"id": [1], "command": "status"}\n', "id must be a string or an integer"),
    (b'{"id": true, "command": "status"}\n', "id must be a string or an integer"),
    (b'{"id": 5, "command": "format_disk"}\n', "unknown command 'format_disk'"),
    (b'{"id": 6, "command": "read", "args": {"device": "gas-nowhere"}}\n', "unknown device"),
    (b'{"id": 7, "command": "events", "args": {"follow": "yes"}}\n', "follow: must be true or false"),
    (b"[" * 50_000 + b"\n", "not valid JSON"),  # deeper than the JSON parser recurses
]


async def test_malformed_lines_are_rejected_and_the_connection_stays_usable(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    try:
        for line, fragment in MALFORMED:
            await conn.send(line)
            answer = await conn.receive()
            assert answer["ok"] is False and fragment in answer["reason"], (line[:60], answer)
            assert set(answer) == {"id", "ok", "reason", "data"}
        salvaged = await conn.request({"id": "abc", "command": "nope"})
        assert salvaged["id"] == "abc"
        status = await conn.request({"id": 99, "command": "status"})
        assert status["id"] == 99 and status["ok"] is True and status["reason"] is None
        assert status["data"]["gateway"]["id"] == "test-community-b01"
        no_args = await conn.request({"command": "status"})  # id and args are optional
        assert no_args["id"] is None and no_args["ok"] is True
    finally:
        await conn.close()
    assert site.gateway.panel.snapshot()["devices"][0]["state"] == "normal"


async def test_an_overlong_line_is_refused_and_the_daemon_keeps_serving(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(b'{"id": 1, "command": "status", "args": {"x": "' + b"a" * (2 * MAX_LINE) + b'"}}\n')
    answer = await conn.receive()
    assert answer["ok"] is False and f"longer than {MAX_LINE}" in answer["reason"]
    assert await conn.reader.read() == b""  # closed after the answer
    await conn.close()
    again = await Conn.open(socket_path(site))
    assert (await again.request({"id": 2, "command": "status"}))["ok"] is True
    await again.close()


async def test_peer_uid_is_the_source_of_the_command(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    answer = await conn.request({"id": 1, "command": "test", "args": {"device": site.device_ids[0]}})
    await conn.close()
    assert answer["ok"] is True
    rows = await wait_for(lambda: stored_at_least(site, 1, kind="test"), "test event stored")
    assert rows[0]["source"] == f"cli:uid={os.getuid()}"


async def test_socket_is_mode_0660_and_removed_at_stop(site: Site) -> None:
    path = socket_path(site)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert site.gateway.control is not None
    await site.gateway.control.stop()
    assert not os.path.exists(path)
    site.gateway.control = None


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group to another group needs root")
async def test_socket_group_comes_from_the_config(tmp_path: Path, site: Site) -> None:
    group = grp.getgrnam("daemon")
    server = ControlServer(ControlConfig(socket=str(tmp_path / "grouped.sock"), group="daemon"), site.handler)
    await server.start()
    try:
        assert os.stat(tmp_path / "grouped.sock").st_gid == group.gr_gid
    finally:
        await server.stop()


async def test_a_live_socket_is_not_taken_over_but_a_stale_one_is(tmp_path: Path, site: Site) -> None:
    with pytest.raises(ControlServerError, match="in use by another running daemon"):
        await ControlServer(site.gateway.cfg.control, site.handler).start()
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()  # a socket file nobody listens on, as after a crash
    server = ControlServer(dataclasses.replace(site.gateway.cfg.control, socket=str(stale)), site.handler)
    await server.start()
    try:
        conn = await Conn.open(str(stale))
        assert (await conn.request({"id": 1, "command": "status"}))["ok"] is True
        await conn.close()
    finally:
        await server.stop()
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    with pytest.raises(ControlServerError, match="not a socket"):
        await ControlServer(ControlConfig(socket=str(plain)), site.handler).start()


async def test_scan_streams_progress_lines_then_the_result(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(json.dumps({"id": "s1", "command": "scan",
                                "args": {"bus": "bus1", "from": 1, "to": 3, "pause_polling": True}}).encode() + b"\n")
    lines = []
    while True:
        message = await conn.receive()
        lines.append(message)
        if "stream" not in message:
            break
    await conn.close()
    assert [m["stream"]["done"] for m in lines[:-1]] == [1, 2, 3]
    assert all(m["id"] == "s1" for m in lines)
    final = lines[-1]
    assert final["ok"] is True and [r["address"] for r in final["data"]["responders"]] == [1, 2]


async def test_follow_streams_new_events_and_ends_with_a_response_when_the_daemon_stops(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(b'{"id": 7, "command": "events", "args": {"kind": "alarm", "follow": true}}\n')
    site.detectors[0].set_concentration(30.0)
    message = await conn.receive()
    assert message["id"] == 7 and message["stream"]["kind"] == "alarm"
    assert message["stream"]["device"] == site.device_ids[0] and message["stream"]["level"] == "high"
    assert site.gateway.control is not None
    await site.gateway.control.stop()
    site.gateway.control = None
    final = await conn.receive()
    assert final == {"id": 7, "ok": True, "reason": "daemon stopping", "data": {}}
    await conn.close()


async def test_a_follower_that_hangs_up_is_forgotten(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(b'{"id": 1, "command": "events", "args": {"follow": true, "limit": 1}}\n')
    first = await conn.receive()
    assert "stream" in first
    control = site.gateway.control
    assert control is not None and control.connections == 1
    await conn.close()
    await wait_for(lambda: not control.connections, "follower gone")


async def test_a_client_hanging_up_cancels_its_scan_and_polling_resumes(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(b'{"id": 1, "command": "scan", "args": {"bus": "bus1", "pause_polling": true}}\n')
    first = await conn.receive()
    assert first["stream"]["done"] == 1 and first["stream"]["total"] == 247
    assert site.gateway.buses["bus1"].paused
    await conn.close()
    await wait_for(lambda: not site.gateway.buses["bus1"].paused, "polling resumed")
    rows = await wait_for(lambda: stored_at_least(site, 2, kind="system"), "pause and resume stored")
    assert [r["action"] for r in rows] == ["paused", "resumed"]
    again = await site.handler.handle("scan", {"bus": "bus1", "from": 1, "to": 1, "pause_polling": True},
                                      source="test")
    assert again.ok  # the cancelled scan no longer holds the bus


async def test_a_request_sent_during_a_follow_ends_it_and_is_answered(site: Site) -> None:
    conn = await Conn.open(socket_path(site))
    await conn.send(b'{"id": 1, "command": "events", "args": {"follow": true, "limit": 1}}\n')
    assert "stream" in await conn.receive()
    answer = await conn.request({"id": 2, "command": "status"})
    while "stream" in answer:  # events stored meanwhile may still be in flight
        answer = await conn.receive()
    assert answer["id"] == 2 and answer["ok"] is True
    await conn.close()


# ------------------------------------------------------------------------------------------- roles

#: A uid with no passwd entry: gatewayctl runs as it (the test runs as root).
OTHER_UID = 61_234


def gatewayctl_as_other(readable: Path) -> list[str]:
    """gatewayctl for another user: the checkout and its venv may sit where only root can enter (a home
    directory, a ``mktemp -d`` clone), so gatewayctl's own ``main`` runs in the system Python 3.11 from a copy
    of the package that user can read (it needs only the standard library)."""
    return [SYSTEM_PYTHON, "-c", f"import sys; sys.path.insert(0, {str(readable)!r}); "
            "from gateway.ops.cli import main; sys.argv[0] = 'gatewayctl'; sys.exit(main())"]


@pytest.fixture
def role_groups() -> Iterator[tuple[grp.struct_group, grp.struct_group]]:
    """A throwaway read-only group and operator group (removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("creating groups and running gatewayctl as another user needs root")
    if not system_python_ok():
        pytest.skip(f"no {SYSTEM_PYTHON} (3.11 or later) to run gatewayctl as another user")
    suffix = secrets.token_hex(4)
    names = (f"gwread-{suffix}", f"gwoper-{suffix}")
    for name in names:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        yield grp.getgrnam(names[0]), grp.getgrnam(names[1])
    finally:
        for name in names:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture
def readable_gateway() -> Iterator[Path]:
    """A copy of the ``gateway`` and ``drivers`` packages that another user can read."""
    with readable_copy("gateway", "drivers") as base:
        yield base


@pytest.mark.timeout(120)
async def test_read_only_members_read_operators_act_root_always(
    site: Site, role_groups: tuple[grp.struct_group, grp.struct_group], readable_gateway: Path
) -> None:
    readers, operators = role_groups
    shared = Path(tempfile.mkdtemp(prefix="gw-roles-"))  # pytest's tmp_path is root's alone
    shared.chmod(0o755)
    sock = shared / "control.sock"
    config = shared / "site.toml"
    config.write_text(f'[control]\nsocket = "{sock}"\ngroup = "{readers.gr_name}"\n'
                      f'operator_group = "{operators.gr_name}"\n')
    config.chmod(0o644)
    server = ControlServer(ControlConfig(socket=str(sock), group=readers.gr_name,
                                         operator_group=operators.gr_name), site.handler)
    await server.start()

    async def ctl(*args: str, gid: int, groups: list[int]) -> subprocess.CompletedProcess[str]:
        argv = [*gatewayctl_as_other(readable_gateway), "--config", str(config), *args]
        return await asyncio.to_thread(subprocess.run, argv, user=OTHER_UID, group=gid, extra_groups=groups,
                                       cwd=readable_gateway, capture_output=True, text=True, timeout=60,
                                       env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"})

    try:
        assert os.stat(sock).st_gid == readers.gr_gid
        async def as_reader(*args: str) -> subprocess.CompletedProcess[str]:
            return await ctl(*args, gid=OTHER_UID, groups=[readers.gr_gid])

        status = await as_reader("status", "--json")
        assert status.returncode == EXIT_OK, status.stderr
        assert (await as_reader("events", "--limit", "3")).returncode == EXIT_OK
        assert (await as_reader("read", site.device_ids[0])).returncode == EXIT_OK
        for command in (["silence"], ["reset", "--all"], ["test", site.device_ids[0]], ["relay-test", "u1-gas-valve"],
                        ["scan", "bus1", "--pause-polling"], ["buzzer-test"]):
            refused = await as_reader(*command)
            assert refused.returncode == EXIT_REJECTED, (command, refused.stdout, refused.stderr)
            assert f"join group {operators.gr_name}" in refused.stderr, refused.stderr
            assert f"uid {OTHER_UID} has only read access" in refused.stderr
        assert not site.gateway.buses["bus1"].paused and site.gateway.annunciator.relay_states.get(
            "u1-gas-valve") is not True

        # an operator: in the operator group (and the socket's group, to reach the socket at all)
        silenced = await ctl("silence", gid=OTHER_UID, groups=[readers.gr_gid, operators.gr_gid])
        assert silenced.returncode == EXIT_OK, silenced.stderr
        # the operator group as the primary group counts too
        walk = await ctl("test", site.device_ids[0], gid=operators.gr_gid, groups=[readers.gr_gid])
        assert walk.returncode == EXIT_OK, walk.stderr
        # outside the socket's group: the kernel refuses the connection, gatewayctl names the group
        outsider = await ctl("status", gid=OTHER_UID, groups=[])
        assert outsider.returncode != EXIT_OK and f"add yourself to group {readers.gr_name}" in outsider.stderr
        rows = await wait_for(lambda: stored_at_least(site, 1, kind="silence"), "silence stored")
        assert rows[-1]["source"] == f"cli:uid={OTHER_UID}"
    finally:
        await server.stop()
        shutil.rmtree(shared, ignore_errors=True)


async def test_root_is_an_operator_and_a_refusal_without_an_operator_group_says_who_may_act(site: Site) -> None:
    server = ControlServer(ControlConfig(socket="unused", group="gateway"), site.handler)
    assert server.is_operator(None) is False
    from gateway.control.server import Peer

    root = Peer(pid=1, uid=0, gid=0, groups=frozenset())
    stranger = Peer(pid=1, uid=OTHER_UID, gid=OTHER_UID, groups=frozenset({12345}))
    assert server.is_operator(root) and not server.is_operator(stranger)
    assert all(server.refusal(stranger, c) is None for c in READ_COMMANDS)
    assert server.refusal(stranger, "no_such_command") is None  # the handler answers "unknown command"
    refused = server.refusal(stranger, "relay_test")
    assert refused is not None and not refused.ok
    assert "only root and the daemon's user may act" in (refused.reason or "")
    operators = set(site.handler.COMMANDS) - READ_COMMANDS
    assert operators == {"silence", "reset", "test", "buzzer_test", "relay_test", "scan", "rebirth", "sms_test"}
