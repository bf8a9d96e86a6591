"""Run the duty desk, or manage its officers.

    python -m fleet.desk serve --dsn "host=/run/postgresql dbname=safety" --secret-file notifier.secret \\
        --listen 127.0.0.1:8080 [--nats nats://n1:4222,... --user central-server --password-file central.pw]
    python -m fleet.desk add-officer --dsn ... --login wang --community sunshine-garden --name "Wang Fang" \\
        --password-file wang.pw            # or the password on standard input

``serve`` prints one JSON line ``{"event": "desk", "url": ...}`` once it listens. With ``--nats`` it also keeps
``gateway_presence`` (which gateways are offline) from the gateways' availability messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

from fleet.desk import auth
from fleet.desk.app import DeskSettings, create_app
from fleet.desk.board import PRESENCE_SCHEMA
from fleet.desk.presence import watch_presence
from fleet.notifier import ensure_schema


def _password(path: str | None) -> str | None:
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8").splitlines()[0]


async def _prepare(dsn: str) -> None:
    """Wait for the inbox's tables, then create the notifier's (if no notifier has yet) and the desk's."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT to_regclass('notifications') IS NOT NULL")
            row = await cur.fetchone()
            if row and row[0]:
                break
            await asyncio.sleep(0.5)
        await ensure_schema(conn)
        await conn.execute(auth.SCHEMA)
        await conn.execute(PRESENCE_SCHEMA)


async def _serve(args: argparse.Namespace) -> int:
    secret = Path(args.secret_file).read_bytes().strip()
    await _prepare(args.dsn)
    host, _, port = args.listen.rpartition(":")
    config = uvicorn.Config(create_app(DeskSettings(dsn=args.dsn, secret=secret, secure_cookies=args.secure_cookies)),
                            host=host or "127.0.0.1", port=int(port), log_level="warning", access_log=False)
    server = uvicorn.Server(config)  # it owns SIGTERM and SIGINT: they end serve()
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve())
    presence = None
    if args.nats:
        presence = asyncio.create_task(watch_presence(
            args.dsn, [s.strip() for s in args.nats.split(",") if s.strip()], prefix=args.prefix, user=args.user,
            password=_password(args.password_file), stop=stop))
    while not server.started:
        if serving.done():
            await serving
            return 1
        await asyncio.sleep(0.05)
    print(json.dumps({"event": "desk", "time": time.time(), "url": f"http://{host}:{port}"}), flush=True)
    await serving
    stop.set()
    if presence is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(presence, 5)
    return 0


async def _add_officer(args: argparse.Namespace) -> int:
    password = _password(args.password_file) or sys.stdin.readline().rstrip("\n")
    async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
        await auth.add_officer(conn, login=args.login, community=args.community, name=args.name, password=password)
    print(json.dumps({"event": "officer", "login": args.login, "community": args.community}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fleet.desk", description="The community's duty desk.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the desk and the acknowledgement links")
    s.add_argument("--dsn", required=True)
    s.add_argument("--secret-file", required=True, help="the notifier's secret_file (checks the links)")
    s.add_argument("--listen", default="127.0.0.1:8080")
    s.add_argument("--secure-cookies", action="store_true", help="behind HTTPS: session cookie marked Secure")
    s.add_argument("--nats", help="the cluster's NATS URLs, comma-separated: keep which gateways are offline")
    s.add_argument("--user")
    s.add_argument("--password-file")
    s.add_argument("--prefix", default="safety")
    a = sub.add_parser("add-officer", help="create or replace a duty officer (a new password ends their sessions)")
    a.add_argument("--dsn", required=True)
    a.add_argument("--login", required=True)
    a.add_argument("--community", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--password-file", help="a file holding the password (else its first line on standard input)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Any = _serve if args.command == "serve" else _add_officer
    try:
        return int(asyncio.run(run(args)))
    except (OSError, ValueError) as exc:
        print(f"desk: {exc}", file=sys.stderr)
        return 78


if __name__ == "__main__":
    sys.exit(main())
