"""The control socket: protocol, malformed input, permissions, peer credentials, lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ControlConfig
from gateway.ops.control import MAX_LINE, ControlServer, ControlServerError
from tests.support.broker import MosquittoBroker
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
