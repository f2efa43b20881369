"""Errors as RFC 9457 problem details (`application/problem+json`) with a stable `code`.

Every failure a request can cause becomes one of these: bad input is a 4xx naming the field, and an
unexpected exception is a 500 whose body says nothing about the server's internals (the traceback
goes to the server's log only).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Route

from agentkernel.errors import AgentkernelError

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("agentkernel.api")


class Problem(BaseModel):
    """The body of every error response."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    field: str | None = None


class ProblemError(Exception):
    """Raised by routes for failures that are not service errors (say, a bad Range)."""

    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field


HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def problem(status: int, code: str, detail: str, *, field: str | None = None) -> Problem:
    return Problem(
        type=f"urn:agentkernel:problem:{code}",
        title=HTTPStatus(status).phrase,
        status=status,
        code=code,
        detail=detail,
        field=field,
    )


def response(p: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        p.model_dump(exclude_none=True), status_code=p.status, media_type=MEDIA_TYPE, headers=headers
    )


def from_exception(exc: BaseException) -> Problem:
    """The problem an exception stands for; unknown exceptions are logged and become a bare 500."""
    if isinstance(exc, ProblemError):
        return problem(exc.status, exc.code, exc.detail, field=exc.field)
    if isinstance(exc, AgentkernelError):  # each error class carries its status and code (errors.py)
        return problem(exc.status, exc.code, str(exc), field=exc.field)
    if isinstance(exc, HTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        field = "body" if exc.status_code == 413 else None
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem(exc.status_code, code, detail, field=field)
    log.error("unexpected error", exc_info=exc)
    return problem(500, "internal_error", "internal error: see the server's log")


def _validation_problem(exc: RequestValidationError) -> Problem:
    """The first validation error, naming its field as a dotted path (`env.PATH`, `command[0]`)."""
    error: dict[str, Any] = exc.errors()[0]
    where, kind = list(error.get("loc", ())), error.get("type", "")
    if where and where[0] in ("body", "query", "path", "header"):
        where = where[1:]
    if kind == "json_invalid":
        return problem(
            400, "malformed_json", f"malformed JSON: {error.get('ctx', {}).get('error')}", field="body"
        )
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".") or "body"
    if kind == "extra_forbidden":
        return problem(422, "unknown_field", f"{field}: unknown field", field=field)
    if kind == "missing":
        return problem(422, "missing_field", f"{field}: required", field=field)
    return problem(422, "invalid_field", f"{field}: {error.get('msg', 'invalid')}", field=field)


def _allowed(request: Request) -> str:
    """The methods of every route at the request's path (Starlette names those of one route only)."""
    path = request.scope["path"]
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, Route) and route.methods and route.path_regex.fullmatch(path)
        for method in route.methods
    }
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Route every error of `app` through problem details."""

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return response(_validation_problem(exc))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        headers = None
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            headers = {"Allow": _allowed(request)}
        return response(from_exception(exc), headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_error)
    app.add_exception_handler(AgentkernelError, on_error)
    app.add_exception_handler(ProblemError, on_error)
    app.add_exception_handler(Exception, on_error)
