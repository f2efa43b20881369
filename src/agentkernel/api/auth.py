"""Bearer-token authentication for every route but /health, WebSockets included (after the Host and
Origin check of `agentkernel.api.guard`, which runs first)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from agentkernel.api.dashboard.session import owns as dashboard_owns
from agentkernel.api.guard import deny
from agentkernel.api.problems import problem
from agentkernel.errors import AgentkernelError
from agentkernel.network.policy import is_loopback_name

OPEN_PATHS = frozenset({"/health"})
API_KEY_ENV = "AGENTKERNEL_API_KEY"


class BearerAuth:
    """Requires `Authorization: Bearer <key>`; the comparison takes the same time for any wrong key."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or path in OPEN_PATHS or dashboard_owns(path):
            # /ui checks its own login, which takes this same key (api/dashboard/session.py)
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        detail = (
            "wrong API key"
            if given
            else f"this server needs an API key: send Authorization: Bearer <{API_KEY_ENV}>"
        )
        refusal = problem(401, "unauthorized", detail)
        await deny(scope, receive, send, refusal, headers={"WWW-Authenticate": "Bearer"})


def check_listen_address(host: str, key: str | None) -> None:
    """Refuse to serve beyond this machine without a key: the API runs commands as a user of it."""
    if not key and not is_loopback_name(host):
        raise AgentkernelError(
            f"refusing to listen on {host} without an API key: set {API_KEY_ENV} "
            "(or listen on 127.0.0.1, the default)"
        )
