"""The duty desk web application (Starlette, Jinja2 templates, a few lines of plain JavaScript; no build step).

Pages for the duty officer (login, the live board, one episode, one household's history), the same data as JSON
for other tools (``/api/...``, bearer token from ``/api/login``), and the acknowledgement links of the alarm
messages (``/ack/<token>``: GET shows what it is about, POST acknowledges, so a messenger's link preview does not
acknowledge an alarm by fetching it). Every page and API call of an officer is scoped to the officer's
community: another community's episode is "not found", the same answer as an id that does not exist.

The board refreshes itself every second (a fetch of ``/board``), well within the 2 s the desk promises.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fleet.desk import auth, board
from fleet.notifier import acknowledge_episode, acknowledge_link

__all__ = ["DeskSettings", "create_app"]

COOKIE = "desk_session"
#: How often the page asks for the board again (ms); the issue allows 2 s from an alarm to the page.
REFRESH_MS = 1000


@dataclass(frozen=True, slots=True)
class DeskSettings:
    dsn: str
    secret: bytes
    """The notifier's link secret (its ``secret_file``): the desk checks the acknowledgement links."""
    secure_cookies: bool = False
    """Mark the session cookie Secure (behind HTTPS; the reference deployment terminates TLS in front)."""


def _clock(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%H:%M:%S") if value is not None else ""


def _stamp(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ([_jsonable(d) for d in v] if k == "deliveries" else _iso(v)) for k, v in row.items()}


def cross_site(request: Request) -> bool:
    """A browser's request from another site: its Origin (or, without one, its Sec-Fetch-Site) is not the
    desk's own. The session cookie is SameSite=Strict too; this refuses what an older browser would send."""
    origin = request.headers.get("origin")
    if origin is not None:
        return urlsplit(origin).netloc != request.headers.get("host", "")
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


def _forbidden(api: bool) -> Response:
    if api:
        return JSONResponse({"error": "a request from another site"}, status_code=403)
    return HTMLResponse("A request from another site was refused.", status_code=403)


def create_app(settings: DeskSettings) -> Starlette:
    """The desk's ASGI application."""
    templates = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                            autoescape=select_autoescape(["html"]))
    templates.filters["clock"] = _clock
    templates.filters["stamp"] = _stamp

    @asynccontextmanager
    async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await psycopg.AsyncConnection.connect(settings.dsn, autocommit=True)
        try:
            yield conn
        finally:
            await conn.close()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(refresh_ms=REFRESH_MS, **context), status_code=status)

    async def officer_of(request: Request, conn: psycopg.AsyncConnection[Any]) -> auth.Officer | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return await auth.officer_for(conn, token)

    Handler = Callable[[Request, psycopg.AsyncConnection[Any], auth.Officer], Awaitable[Response]]

    def for_officer(handler: Handler, *, api: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """Runs ``handler`` with the request's officer; without one: 401 (API, board) or the login page."""

        async def endpoint(request: Request) -> Response:
            if request.method == "POST" and "authorization" not in request.headers and cross_site(request):
                return _forbidden(api)  # a cookie sent along by a page of another site
            async with connect() as conn:
                officer = await officer_of(request, conn)
                if officer is None:
                    if api or request.url.path == "/board":
                        return JSONResponse({"error": "not logged in"}, status_code=401)
                    return RedirectResponse("/login", status_code=303)
                return await handler(request, conn, officer)

        return endpoint

    # ------------------------------------------------------------------------------ login

    async def login_form(request: Request) -> Response:
        return page("login.html")

    throttle = auth.LoginThrottle()

    async def checked_login(conn: psycopg.AsyncConnection[Any], login: str, password: str) -> auth.Officer | float:
        """The officer, or the seconds to wait before this login may be tried again (0 after a wrong one)."""
        wait = throttle.wait_s(login)
        if wait > 0:
            return wait
        officer = await auth.check_login(conn, login, password)
        if officer is None:
            throttle.failed(login)
            return 0.0
        throttle.succeeded(login)
        return officer

    def too_soon(wait: float, api: bool) -> Response:
        retry = str(int(wait) + 1)
        if api:
            return JSONResponse({"error": "too many wrong passwords: try again later"}, 429,
                                headers={"Retry-After": retry})
        response = page("login.html", 429, error=f"Too many wrong passwords: try again in {retry} s.")
        response.headers["Retry-After"] = retry
        return response

    async def login(request: Request) -> Response:
        if cross_site(request):
            return _forbidden(False)
        form = await request.form()
        async with connect() as conn:
            officer = await checked_login(conn, str(form.get("login", "")), str(form.get("password", "")))
            if isinstance(officer, float):
                if officer > 0:
                    return too_soon(officer, False)
                return page("login.html", 401, error="Wrong login or password.")
            token = await auth.start_session(conn, officer)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=auth.SESSION_S, httponly=True, samesite="strict",
                            secure=settings.secure_cookies)
        return response

    async def logout(request: Request) -> Response:
        if cross_site(request):
            return _forbidden(False)
        async with connect() as conn:
            await auth.end_session(conn, request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def api_login(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "a JSON body {login, password} is expected"}, status_code=400)
        async with connect() as conn:
            officer = await checked_login(conn, str(body.get("login", "")), str(body.get("password", "")))
            if isinstance(officer, float):
                if officer > 0:
                    return too_soon(officer, True)
                return JSONResponse({"error": "wrong login or password"}, status_code=401)
            token = await auth.start_session(conn, officer)
        return JSONResponse({"token": token, "community": officer.community, "name": officer.name})

    # ------------------------------------------------------------------------------ pages

    async def desk(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        return page("desk.html", officer=officer, episodes=await board.board(conn, officer.community),
                    offline=await board.offline_gateways(conn, officer.community))

    async def board_fragment(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        return page("board.html", officer=officer, episodes=await board.board(conn, officer.community),
                    offline=await board.offline_gateways(conn, officer.community))

    async def episode_page(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        found = await board.episode(conn, officer.community, request.path_params["event_id"])
        if found is None:
            return page("message.html", 404, officer=officer, title="Not found", text="No such alarm.")
        return page("episode.html", officer=officer, e=found)

    async def household_page(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        building, household = request.path_params["building"], request.path_params["household"]
        rows = await board.household_history(conn, officer.community, building, household)
        return page("household.html", officer=officer, building=building, household=household, rows=rows)

    async def ack_from_desk(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        result = await acknowledge_episode(conn, request.path_params["event_id"], f"{officer.name} (duty desk)",
                                           community=officer.community)
        if result.status == "unknown":
            return page("message.html", 404, officer=officer, title="Not found", text="No such alarm.")
        return RedirectResponse("/", status_code=303)

    # ------------------------------------------------------------------------------ API

    async def api_episodes(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        rows = await board.board(conn, officer.community)
        return JSONResponse({"community": officer.community, "episodes": [_jsonable(r) for r in rows]})

    async def api_episode(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        found = await board.episode(conn, officer.community, request.path_params["event_id"])
        if found is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(_jsonable(found))

    async def api_ack(request: Request, conn: psycopg.AsyncConnection[Any], officer: auth.Officer) -> Response:
        result = await acknowledge_episode(conn, request.path_params["event_id"], f"{officer.name} (duty desk)",
                                           community=officer.community)
        if result.status == "unknown":
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse({"status": result.status, "event_id": result.event_id, "by": result.by})

    # ------------------------------------------------------------------------------ acknowledgement links

    async def ack_link_page(request: Request) -> Response:
        return page("ack.html", token=request.path_params["token"])

    async def ack_link(request: Request) -> Response:
        async with connect() as conn:
            result = await acknowledge_link(conn, settings.secret, request.path_params["token"])
        status = {"acknowledged": 200, "already": 200, "closed": 200, "expired": 410}.get(result.status, 404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"status": result.status, "event_id": result.event_id, "by": result.by},
                                status_code=status)
        text = {"acknowledged": f"Acknowledged. Everyone told is told it was {result.by}.",
                "already": f"Already acknowledged by {result.by}.",
                "closed": "This alarm has already ended.",
                "expired": "This link has expired."}.get(result.status, "This link is not valid.")
        return page("message.html", status, title="Acknowledgement", text=text)

    return Starlette(routes=[
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", for_officer(desk), methods=["GET"]),
        Route("/board", for_officer(board_fragment), methods=["GET"]),
        Route("/episodes/{event_id}", for_officer(episode_page), methods=["GET"]),
        Route("/episodes/{event_id}/ack", for_officer(ack_from_desk), methods=["POST"]),
        Route("/households/{building}/{household}", for_officer(household_page), methods=["GET"]),
        Route("/api/login", api_login, methods=["POST"]),
        Route("/api/episodes", for_officer(api_episodes, api=True), methods=["GET"]),
        Route("/api/episodes/{event_id}", for_officer(api_episode, api=True), methods=["GET"]),
        Route("/api/episodes/{event_id}/ack", for_officer(api_ack, api=True), methods=["POST"]),
        Route("/ack/{token}", ack_link_page, methods=["GET"]),
        Route("/ack/{token}", ack_link, methods=["POST"]),
    ])
