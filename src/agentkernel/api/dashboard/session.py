"""Dashboard sessions: the login that trades the API key for a cookie, and the CSRF tokens.

A browser cannot send `Authorization: Bearer` with a page load, a form or a WebSocket, so the dashboard
(/ui) has its own door: POST /ui/login with the API key sets a session cookie (random, HttpOnly,
SameSite=Strict, Path=/ui), held in this process's memory only, so a restart logs everyone out. Every
state-changing request (a form, a fetch, the terminal's WebSocket) also carries the session's CSRF
token, which the page got from the server; a cross-site page can make the browser send the cookie
but cannot read the token. The Host and Origin check (`api.guard`) runs before all of this.

Cookies are not scoped by port (RFC 6265): a server in a sandbox whose port is forwarded to the same
host name gets the cookie when the browser visits it. So a session is bound to the Host header
(host:port) and the client address it logged in with, and on any other it is as if logged out.

Without an API key the server listens on loopback only (`api.auth.check_listen_address`), where any
local user can call the API without a key anyway: the login then asks for no key, but still opens a
session, so the CSRF tokens protect the browser of the user who runs the server all the same.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkernel.api.guard import deny
from agentkernel.api.problems import problem

PREFIX = "/ui"
COOKIE = "agentkernel_session"
LOGIN_COOKIE = "agentkernel_login"
"""Holds the login form's CSRF token (double submit): there is no session yet to tie it to."""
CSRF_HEADER = "x-csrf-token"
LIFETIME = 12 * 3600
"""Seconds a session lasts from its login."""
MAX_SESSIONS = 1000
"""Sessions kept at once: logging in without a key (loopback) must not let memory grow without end."""
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        # no inline script anywhere; inline styles only because xterm.js's renderer makes <style> elements
        b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        b"font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    # not "no-referrer": with it a browser sends a form's Origin as "null", which the guard refuses
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
"""Sent with every dashboard response."""
OPEN = (f"{PREFIX}/login", f"{PREFIX}/static/")
"""The paths served without a session: the login page and the static files (no data in them)."""


def owns(path: str) -> bool:
    """Whether a request path is the dashboard's (checked here, not by the API's Bearer key)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    place: tuple[str, str] = ("", "")
    """The Host header and client address it logged in with (`place`): the only ones it is good for."""
    expires: float = field(default_factory=lambda: time.time() + LIFETIME)


class Sessions:
    """The open sessions of this server, by cookie value."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.open: dict[str, Session] = {}

    def key_matches(self, given: str) -> bool:
        """Whether `given` is the API key (in constant time); with no key set, anything is."""
        return self.api_key is None or hmac.compare_digest(given.encode(), self.api_key.encode())

    def login(self, place: tuple[str, str]) -> tuple[str, Session]:
        now = time.time()
        self.open = {k: s for k, s in self.open.items() if s.expires > now}
        while len(self.open) >= MAX_SESSIONS:  # the oldest go first (dicts keep insertion order)
            del self.open[next(iter(self.open))]
        token = secrets.token_urlsafe(32)
        self.open[token] = Session(place=place)
        return token, self.open[token]

    def find(self, token: str | None, place: tuple[str, str]) -> Session | None:
        session = self.open.get(token) if token else None
        if session is None or session.expires <= time.time() or session.place != place:
            return None
        return session

    def logout(self, token: str | None) -> None:
        if token:
            self.open.pop(token, None)


def csrf_matches(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def place(scope: Scope) -> tuple[str, str]:
    """Where a request comes from and goes to: its Host header (lower case) and the client's address."""
    host = next((v.decode("latin-1").lower() for k, v in scope["headers"] if k == b"host"), "")
    client = scope.get("client")
    return host, client[0] if client else ""


def cookies(scope: Scope) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for key, value in scope["headers"]:
        if key == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:
                return {}
    return {k: m.value for k, m in jar.items()}


def set_cookie(response: Response, name: str, value: str, *, secure: bool, max_age: int = LIFETIME) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict", secure=secure
    )


class SessionGuard:
    """ASGI middleware for the dashboard's paths: a valid session cookie, else a redirect to the login
    page (a page load) or a 401 problem (anything else). A WebSocket handshake must also carry the
    session's CSRF token in its `csrf` query parameter. The session is put in the scope's state."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not owns(path):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if path.startswith(OPEN):
            await self.app(scope, receive, send_with_headers)
            return
        session = self.sessions.find(cookies(scope).get(COOKIE), place(scope))
        if session is not None and scope["type"] == "websocket":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if not csrf_matches(session, next(iter(query.get("csrf", [])), None)):
                await deny(
                    scope, receive, send, problem(403, "csrf", "the request lacks the page's CSRF token")
                )
                return
        if session is not None:
            scope.setdefault("state", {})["session"] = session
            await self.app(scope, receive, send_with_headers)
            return
        if scope["type"] == "http" and scope["method"] == "GET" and _wants_html(scope):
            await RedirectResponse(f"{PREFIX}/login", status_code=303)(scope, receive, send_with_headers)
            return
        refusal = problem(401, "unauthorized", "log in to the dashboard first (/ui/login)")
        await deny(scope, receive, send_with_headers, refusal)


def _wants_html(scope: Scope) -> bool:
    accept = next((v for k, v in scope["headers"] if k == b"accept"), b"")
    return b"text/html" in accept
