"""Duty officers: logins, argon2 password hashes, sessions; each officer acts on one community only.

A session is a random token (``secrets.token_urlsafe``) given to the browser as an HttpOnly, SameSite=Strict
cookie or to an API client as a bearer token; PostgreSQL keeps its SHA-256 only, with the officer and an expiry,
so a database read does not yield a usable session. Passwords are hashed with argon2-cffi's defaults (Argon2id).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["SCHEMA", "LoginThrottle", "Officer", "add_officer", "check_login", "end_session", "officer_for",
           "start_session"]

#: Eight hours: one duty shift.
SESSION_S = 8 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS officers (
    login         text PRIMARY KEY,
    community     text NOT NULL,
    name          text NOT NULL,
    password_hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS desk_sessions (
    token_sha256 text PRIMARY KEY,
    login        text NOT NULL REFERENCES officers (login) ON DELETE CASCADE,
    expires_at   timestamptz NOT NULL
);
"""

_hasher = PasswordHasher()
#: Verified against when the login does not exist, so a wrong login costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Officer:
    login: str
    community: str
    name: str


class LoginThrottle:
    """Per login: after :attr:`FREE` failures in a row, each further attempt waits a doubling delay (5 s, 10 s …
    5 min) before its password is even checked; a success forgets the failures."""

    FREE = 3
    FIRST_S = 5.0
    MAX_S = 300.0
    KEEP = 10_000

    def __init__(self) -> None:
        self._failures: dict[str, tuple[int, float]] = {}  # login → (failures in a row, when the last was)

    def wait_s(self, login: str) -> float:
        """Seconds before ``login`` may be tried again (0: now)."""
        failures, last = self._failures.get(login, (0, 0.0))
        if failures < self.FREE:
            return 0.0
        delay = min(self.MAX_S, self.FIRST_S * 2.0 ** (failures - self.FREE))
        return float(max(0.0, last + delay - time.monotonic()))

    def failed(self, login: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= self.KEEP:  # forget the logins whose delay is over
            self._failures = {k: v for k, v in self._failures.items() if now - v[1] < self.MAX_S}
        self._failures[login] = (self._failures.get(login, (0, 0.0))[0] + 1, now)

    def succeeded(self, login: str) -> None:
        self._failures.pop(login, None)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def add_officer(conn: psycopg.AsyncConnection[Any], *, login: str, community: str, name: str,
                      password: str) -> None:
    """Create or replace an officer (a new password ends their sessions)."""
    if len(password) < 10:
        raise ValueError("password: at least 10 characters")
    async with conn.transaction():
        await conn.execute(SCHEMA)
        await conn.execute("INSERT INTO officers (login, community, name, password_hash) VALUES (%s, %s, %s, %s) "
                           "ON CONFLICT (login) DO UPDATE SET community = excluded.community, name = excluded.name, "
                           "password_hash = excluded.password_hash", (login, community, name, _hasher.hash(password)))
        await conn.execute("DELETE FROM desk_sessions WHERE login = %s", (login,))


async def check_login(conn: psycopg.AsyncConnection[Any], login: str, password: str) -> Officer | None:
    """The officer whose login and password these are, or None."""
    cur = await conn.execute("SELECT login, community, name, password_hash FROM officers WHERE login = %s", (login,))
    row = await cur.fetchone()
    stored = row[3] if row is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    return Officer(row[0], row[1], row[2]) if row is not None else None


async def start_session(conn: psycopg.AsyncConnection[Any], officer: Officer) -> str:
    """A new session token for ``officer``."""
    token = secrets.token_urlsafe(32)
    await conn.execute("DELETE FROM desk_sessions WHERE expires_at <= clock_timestamp()")
    await conn.execute("INSERT INTO desk_sessions (token_sha256, login, expires_at) VALUES "
                       "(%s, %s, clock_timestamp() + make_interval(secs => %s))", (_sha(token), officer.login,
                                                                                   SESSION_S))
    return token


async def officer_for(conn: psycopg.AsyncConnection[Any], token: str | None) -> Officer | None:
    """The officer of a live session token, or None (no token, a forged one, or expired)."""
    if not token or len(token) > 200:
        return None
    cur = await conn.execute("SELECT o.login, o.community, o.name FROM desk_sessions s JOIN officers o USING (login) "
                             "WHERE s.token_sha256 = %s AND s.expires_at > clock_timestamp()", (_sha(token),))
    row = await cur.fetchone()
    return Officer(row[0], row[1], row[2]) if row is not None else None


async def end_session(conn: psycopg.AsyncConnection[Any], token: str | None) -> None:
    if token:
        await conn.execute("DELETE FROM desk_sessions WHERE token_sha256 = %s", (_sha(token),))
