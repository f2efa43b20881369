"""Request body limits: small for JSON requests, large for file uploads; over it, a 413 problem."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkernel.api.problems import problem, response

MAX_JSON_BODY = 4 << 20
"""Room for a command's arguments and environment up to ARG_MAX (2 MiB) and its stdin (1 MiB)."""
MAX_UPLOAD = 4 << 30
UPLOAD = re.compile(r"/sandboxes/[^/]+/files/.*")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    """Refuses a declared Content-Length over the limit at once, and stops a body that grows past it
    (the route reading it gets BodyTooLarge, which becomes the 413 problem)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "PUT" and UPLOAD.fullmatch(scope["path"])
        limit = MAX_UPLOAD if upload else MAX_JSON_BODY
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            detail = f"the request body is larger than {limit} bytes"
            await response(problem(413, "payload_too_large", detail, field="body"))(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
