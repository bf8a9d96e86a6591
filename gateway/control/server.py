"""The local control socket for ``gatewayctl``: JSON lines over a Unix stream socket.

Request (one line): ``{"id": 1, "command": "status", "args": {}}``. Response (one line):
``{"id": 1, "ok": true, "reason": null, "data": {...}}``. ``events`` with ``"follow": true`` and ``scan``
first send any number of ``{"id": 1, "stream": {...}}`` lines (an event; scan progress), then the final
response. A malformed line gets ``{"id": null, "ok": false, "reason": "..."}`` and the connection stays
usable; a line over :data:`MAX_LINE` bytes closes the connection after that answer. The caller's uid,
taken from the kernel (``SO_PEERCRED``), is recorded as the command's source: ``cli:uid=1000``.

Two roles, from the caller's credentials as the kernel gives them (uid, gid, supplementary groups): members
of ``[control] group`` may connect and read (:data:`READ_COMMANDS`); members of ``[control]
operator_group``, root and the daemon's own user may also act (every other command). A refusal names the
group to join. The protocol and the roles are documented in docs/cli.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import structlog

from gateway.config import ControlConfig
from gateway.control.commands import CommandHandler, CommandRejected, CommandResult
from gateway.validation import Problem, convert

__all__ = ["MAX_LINE", "READ_COMMANDS", "ControlServer", "ControlServerError", "Peer"]

log = structlog.get_logger()

#: Longest request line accepted.
MAX_LINE = 64 * 1024
SOCKET_MODE = 0o660
#: Commands of the read-only role; every other command needs the operator role.
READ_COMMANDS = frozenset({"status", "events", "read", "config_show"})
#: Linux ``SO_PEERGROUPS`` (socket(7)): the peer's supplementary groups as they were at connect().
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection, as the kernel says: uid, gid, supplementary groups."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def source(self) -> str:
        """How commands of this caller are recorded."""
        return f"cli:uid={self.uid}"


class ControlServerError(Exception):
    """The control socket could not be opened."""


class ControlServer:
    """Serves :class:`~gateway.control.commands.CommandHandler` on a Unix socket."""

    def __init__(self, cfg: ControlConfig, handler: CommandHandler) -> None:
        self.cfg = cfg
        self.path = cfg.socket
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._operator_gid: int | None = None

    @property
    def connections(self) -> int:
        """Clients connected now (a follower counts until it hangs up)."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind the socket (mode 0660, group from config). A live socket of another daemon is an error."""
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlServerError(f"cannot create {path.parent}: {exc.strerror}") from None
        await self._remove_stale(path)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_LINE)
        except OSError as exc:
            raise ControlServerError(f"cannot bind {path}: {exc.strerror}") from None
        os.chmod(path, SOCKET_MODE)
        if self.cfg.group:
            self._give_group(path, self.cfg.group)
        self._operator_gid = None
        if self.cfg.operator_group:
            try:
                self._operator_gid = grp.getgrnam(self.cfg.operator_group).gr_gid
            except KeyError:
                log.error("control operator group does not exist: only root and the daemon's user may act",
                          group=self.cfg.operator_group)
        log.info("control socket listening", socket=str(path), group=self.cfg.group,
                 operator_group=self.cfg.operator_group)

    @staticmethod
    def _give_group(path: Path, group: str) -> None:
        """The socket to ``group``. A socket is born with the daemon's own group, so for that group (the
        installed service's ``gateway``) nothing needs changing; the shipped unit's system-call filter refuses
        every chown (@privileged), even one that changes nothing."""
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            log.error("control socket group not set", socket=str(path), group=group, error="no such group")
            return
        if path.stat().st_gid == gid:
            return
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            log.error("control socket group not set", socket=str(path), group=group, error=exc.strerror,
                      fix="under the installed service the socket's group is the service's own, gateway: "
                          "set [control] group = \"gateway\"")

    def is_operator(self, peer: Peer | None) -> bool:

        """Root, the daemon's own user and members of ``[control] operator_group`` may act."""
        if peer is None:
            return False
        if peer.uid in (0, os.geteuid()):
            return True
        gid = self._operator_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    def refusal(self, peer: Peer | None, command: str) -> CommandResult | None:
        """Why ``peer`` may not run ``command`` (None: it may). Unknown commands are the handler's to answer."""
        if command in READ_COMMANDS or command not in self.handler.COMMANDS or self.is_operator(peer):
            return None
        who = f"uid {peer.uid}" if peer is not None else "a caller whose credentials are unknown"
        group = self.cfg.operator_group
        if group:
            how = (f"join group {group} ([control] operator_group): sudo usermod -aG {group} <user>, "
                   "then log in again")
        else:
            how = "no [control] operator_group is set, so only root and the daemon's user may act"
        return CommandResult(False, f"{command}: permission denied: it needs the operator role and {who} has "
                             f"only read access; {how}", {"needs": "operator", "operator_group": group})

    async def _remove_stale(self, path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlServerError(f"{path} exists and is not a socket")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
        except (OSError, TimeoutError):
            path.unlink(missing_ok=True)  # left over from a daemon that did not stop cleanly
            return
        writer.close()
        raise ControlServerError(f"{path} is in use by another running daemon")

    async def stop(self) -> None:
        """Stop listening, end open connections (followers get a final response), remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # ------------------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer(writer)
        conn = _Connection(reader, writer, peer.source if peer is not None else "cli:uid=unknown", peer)
        try:
            while True:
                try:
                    line = await conn.read_line()
                except asyncio.LimitOverrunError:
                    await conn.send(_response(None, CommandResult(False, f"request longer than {MAX_LINE} bytes")))
                    return
                if line is None:
                    return
                if line.strip():
                    await self._answer(conn, line)
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, conn: _Connection, line: bytes) -> None:
        try:
            rid, command, args = parse_request(line)
        except CommandRejected as exc:
            await conn.send(_response(_salvage_id(line), CommandResult(False, str(exc))))
            return
        refusal = self.refusal(conn.peer, command)
        if refusal is not None:
            log.warning("command refused: operator role needed", command=command, source=conn.source)
            await conn.send(_response(rid, refusal))
            return
        if command == "events" and "follow" in args:
            follow = args["follow"]
            args = {k: v for k, v in args.items() if k != "follow"}
            if not isinstance(follow, bool):
                await conn.send(_response(rid, CommandResult(False, "events: follow: must be true or false")))
                return
            if follow:
                await self._follow(conn, rid, args)
                return
        if command == "scan":
            result = await self._scan(conn, rid, args)
            if result is None:
                return
        else:
            result = await self.handler.handle(command, args, source=conn.source)
        await conn.send(_response(rid, result))

    async def _scan(self, conn: _Connection, rid: Any, args: dict[str, Any]) -> CommandResult | None:
        """A scan with progress lines; a client that hangs up cancels it (and so resumes polling at once)."""

        def progress(update: dict[str, Any]) -> None:
            if not conn.writer.is_closing():
                conn.writer.write(_line({"id": rid, "stream": update}))

        work = asyncio.ensure_future(self.handler.handle("scan", args, source=conn.source, progress=progress))
        hangup = conn.watch_hangup()
        try:
            waiters: set[asyncio.Future[Any]] = {work, hangup}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if hangup.done() and hangup.result():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                log.info("scan cancelled: the client hung up", source=conn.source)
                return None
            return await work
        finally:
            await _stop_watching(hangup)
            if not work.done():
                work.cancel()

    async def _follow(self, conn: _Connection, rid: Any, args: dict[str, Any]) -> None:
        """Stream events until the client hangs up (or sends anything) or the daemon stops."""
        hangup = conn.watch_hangup()
        stream = self.handler.follow(args)
        try:
            while True:
                item: asyncio.Future[Any] = asyncio.ensure_future(anext(stream))
                waiters: set[asyncio.Future[Any]] = {item, hangup}
                try:
                    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    item.cancel()
                    with contextlib.suppress(Exception):
                        await conn.send(_response(rid, CommandResult(True, "daemon stopping")))
                    raise
                if item not in done:
                    item.cancel()
                    return
                try:
                    row = item.result()
                except CommandRejected as exc:
                    await conn.send(_response(rid, CommandResult(False, str(exc))))
                    return
                await conn.send({"id": rid, "stream": row})
        finally:
            await _stop_watching(hangup)
            with contextlib.suppress(Exception):
                await stream.aclose()


class _Connection:
    """One client: its streams, its source, and a byte read ahead while watching for a hang-up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str,
                 peer: Peer | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.source = source
        self.peer = peer
        self._ahead = b""

    async def read_line(self) -> bytes | None:
        """The next request line (None at the end); raises LimitOverrunError on an overlong line."""
        if self._ahead == b"\n":
            self._ahead = b""
            return b"\n"
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial
            if not (self._ahead + line).strip():
                return None
        line, self._ahead = self._ahead + line, b""
        return line

    def watch_hangup(self) -> asyncio.Future[bool]:
        """Completes with True when the client closes its side, False when it sends something (kept)."""

        async def watch() -> bool:
            data = await self.reader.read(1)
            self._ahead += data
            return not data

        return asyncio.ensure_future(watch())

    async def send(self, message: dict[str, Any]) -> None:
        await _send(self.writer, message)


async def _stop_watching(hangup: asyncio.Future[bool]) -> None:
    """End a hang-up watcher and wait until it has let go of the stream: the next ``read_line`` may not read
    while the watcher's ``read(1)`` still waits (asyncio allows one reader at a time)."""
    hangup.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await hangup


_INT64 = msgspec.Meta(ge=-(2**63), le=2**63 - 1)


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    """One request line."""

    command: str
    id: Annotated[str, msgspec.Meta(max_length=100)] | Annotated[int, _INT64] | None = None
    args: dict[str, Any] = msgspec.field(default_factory=dict)


#: What a malformed request is told, by the field at fault.
_REQUEST_REASONS = {"id": "id must be a string or an integer", "command": "command is required and must be a string",
                    "args": "args must be an object"}


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, command, args) of one request line; raises :class:`CommandRejected` with the reason."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected("request is not valid UTF-8") from None
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise CommandRejected("request is not valid JSON") from None
    try:
        request = convert(data, _Request)
    except Problem as problem:
        if not problem.path:
            raise CommandRejected("request must be a JSON object") from None
        if problem.kind == "unknown":
            raise CommandRejected(f"unknown request field {problem.path[0]!r} (allowed: args, command, id)") from None
        raise CommandRejected(_REQUEST_REASONS[str(problem.path[0])]) from None
    return request.id, request.command, request.args


def _salvage_id(line: bytes) -> Any:
    with contextlib.suppress(Exception):
        request = json.loads(line)
        rid = request.get("id") if isinstance(request, dict) else None
        if isinstance(rid, str | int) and not isinstance(rid, bool) and len(str(rid)) <= 100:
            return rid
    return None


def _response(rid: Any, result: CommandResult) -> dict[str, Any]:
    return {"id": rid, "ok": result.ok, "reason": result.reason, "data": result.data}


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(_line(message))
    await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> Peer | None:
    """The peer's credentials (``SO_PEERCRED``) and supplementary groups, or None when unknown."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock, pid))


def _peer_groups(sock: Any, pid: int) -> frozenset[int]:
    """Supplementary groups at connect() (``SO_PEERGROUPS``), else the ``Groups:`` line of /proc/<pid>/status."""
    for size in (1024, 256 * 1024):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()
