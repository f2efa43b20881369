"""The dashboard's pages and form actions under /ui (server-rendered; the scripts are static files).

Every form posts the session's CSRF token in a `csrf` field (or sends an X-CSRF-Token header). A form
with a bad value answers with its page again, the reason shown on it, and the 4xx status the API gives
for the same mistake.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from starlette.datastructures import FormData, UploadFile
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from agentkernel.api import attach
from agentkernel.api.dashboard import data
from agentkernel.api.dashboard.session import (
    COOKIE,
    CSRF_HEADER,
    LOGIN_COOKIE,
    PREFIX,
    Session,
    Sessions,
    csrf_matches,
    place,
    set_cookie,
)
from agentkernel.api.problems import Problem, ProblemError, from_exception, problem
from agentkernel.api.routes import Name
from agentkernel.api.sse import ClosingStreamingResponse
from agentkernel.errors import AgentkernelError
from agentkernel.sandbox.state import STATUSES
from agentkernel.sandbox.view import SandboxView
from agentkernel.service.request import SandboxFlags

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
EVENTS_INTERVAL = 1.0
"""Seconds between the list page's looks at the sandboxes (an event goes out only on a change)."""

router = APIRouter(prefix=PREFIX, include_in_schema=False)
router.add_api_websocket_route("/sandboxes/{name}/attach", attach.attach)


def sessions(request: Request) -> Sessions:
    store: Sessions = request.app.state.dashboard_sessions
    return store


def session(request: Request) -> Session:
    """The request's session (the session guard let it through only with one)."""
    found: Session = request.state.session
    return found


async def checked(request: Request) -> Session:
    """The session, for a request that changes something: it must carry the session's CSRF token."""
    current = session(request)
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form: FormData = await request.form()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    if not csrf_matches(current, given):
        raise ProblemError(403, "csrf", "the form lacks this page's CSRF token: reload the page")
    return current


Checked = Annotated[Session, Depends(checked)]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def render(request: Request, template: str, code: int = 200, **context: Any) -> Response:
    current: Session | None = getattr(request.state, "session", None)
    context.update(request=request, csrf=current.csrf if current else "", prefix=PREFIX)
    return templates.TemplateResponse(request, template, context, status_code=code)


# -- login --------------------------------------------------------------------------------------


def _login_page(request: Request, *, error: Problem | None = None) -> Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        error.status if error else 200,
        login_csrf=token,
        needs_key=sessions(request).api_key is not None,
        error=error,
    )
    set_cookie(response, LOGIN_COOKIE, token, secure=_secure(request), max_age=3600)
    return response


@router.get("/login")
async def login_page(request: Request) -> Response:
    return _login_page(request)


@router.post("/login")
async def login(
    request: Request, csrf: Annotated[str, Form()] = "", key: Annotated[str, Form()] = ""
) -> Response:
    store = sessions(request)
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not csrf_matches(Session(csrf=expected), csrf):
        return _login_page(request, error=problem(403, "csrf", "the login form expired: try again"))
    if not store.key_matches(key):
        why = "wrong API key" if key else "enter the API key"
        return _login_page(request, error=problem(401, "unauthorized", why))
    token, _ = store.login(place(request.scope))
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    set_cookie(response, COOKIE, token, secure=_secure(request))
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def logout(request: Request, _: Checked) -> Response:
    sessions(request).logout(request.cookies.get(COOKIE))
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# -- the sandboxes --------------------------------------------------------------------------------


async def _filtered(request: Request) -> list[data.Row]:
    """The sandboxes with the `status` and all the `label`s (`key=value`, comma-separated) the query asks."""
    status = request.query_params.get("status") or ""
    wanted = data.labels(request.query_params.get("label") or "")
    return [r for r in await data.rows(request, wanted=wanted) if not status or r.status == status]


async def _list_page(
    request: Request, *, error: Problem | None = None, form: dict[str, str] | None = None
) -> Response:
    try:
        rows = await _filtered(request)
    except AgentkernelError as exc:
        error, rows = error or from_exception(exc), await data.rows(request)
    return render(
        request,
        "index.html",
        error.status if error else 200,
        rows=rows,
        statuses=STATUSES,
        status=request.query_params.get("status") or "",
        label=request.query_params.get("label") or "",
        error=error,
        form=form or {},
    )


@router.get("")
@router.get("/")
async def index(request: Request) -> Response:
    return await _list_page(request)


@router.get("/events")
async def events(request: Request) -> Response:
    """The sandboxes (filtered as the list page's query) as Server-Sent Events: a `sandboxes` event
    with the whole list on every change."""
    await _filtered(request)  # a bad filter is a 422 problem now, not a broken stream

    async def stream() -> AsyncGenerator[bytes, None]:
        last = None
        while True:
            current = json.dumps([r.public() for r in await _filtered(request)], separators=(",", ":"))
            if current != last:
                yield f"event: sandboxes\ndata: {current}\n\n".encode()
                last = current
            await asyncio.sleep(EVENTS_INTERVAL)

    return ClosingStreamingResponse(
        b"retry: 2000\n\n", stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@router.get("/sandboxes/{name}/events")
async def sandbox_events(request: Request, name: Name) -> Response:
    """A sandbox's egress decisions and ended commands as they happen (Server-Sent Events): a
    `network` and a `commands` event, each with the whole table (newest first), on every change."""
    await data.record(request, name)  # an unknown sandbox is a 404 problem now, not a broken stream

    async def stream() -> AsyncGenerator[bytes, None]:
        last: dict[str, str] = {}
        while True:
            trail = await data.audit_trail(name)
            for event, kind in (("network", "network"), ("commands", "exec")):
                current = json.dumps(data.events(trail, kind), separators=(",", ":"), default=str)
                if current != last.get(event):
                    yield f"event: {event}\ndata: {current}\n\n".encode()
                    last[event] = current
            await asyncio.sleep(EVENTS_INTERVAL)

    return ClosingStreamingResponse(
        b"retry: 2000\n\n", stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


def _whole(field: str, text: str) -> int | None:
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ProblemError(
            422, "invalid_field", f"{field}: expected a whole number, got {text!r}", field=field
        ) from None


@router.post("/sandboxes")
async def create(
    request: Request,
    _: Checked,
    name: Annotated[str, Form()] = "",
    image: Annotated[str, Form()] = "",
    profile: Annotated[str, Form()] = "",
    vcpus: Annotated[str, Form()] = "",
    memory_mb: Annotated[str, Form()] = "",
    labels: Annotated[str, Form()] = "",
) -> Response:
    form = {
        "name": name,
        "image": image,
        "profile": profile,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "labels": labels,
    }
    try:
        flags = SandboxFlags(
            image=image.strip() or None,
            profile=profile.strip() or None,
            vcpus=_whole("vcpus", vcpus),
            memory_mb=_whole("memory_mb", memory_mb),
            labels=data.labels(labels),
        )
        record = await data.create(request, name.strip() or None, flags)
    except (AgentkernelError, ProblemError) as exc:
        return await _list_page(request, error=from_exception(exc), form=form)
    return RedirectResponse(f"{PREFIX}/sandboxes/{record.name}", status_code=303)


@router.post("/fork")
async def fork(
    request: Request,
    _: Checked,
    snapshot: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
) -> Response:
    """A new running sandbox resumed from a snapshot (`agentkernel snapshot` makes them)."""
    form = {"snapshot": snapshot, "fork_name": name}
    try:
        if not snapshot.strip():
            raise ProblemError(422, "invalid_field", "snapshot: name the snapshot to fork", field="snapshot")
        record = await data.fork(request, snapshot.strip(), name.strip() or f"{snapshot.strip()}-fork")
    except (AgentkernelError, ProblemError) as exc:
        return await _list_page(request, error=from_exception(exc), form=form)
    return RedirectResponse(f"{PREFIX}/sandboxes/{record.name}", status_code=303)


async def _act(request: Request, name: str, action: Callable[[Request, str], Awaitable[None]]) -> Response:
    try:
        await action(request, name)
    except AgentkernelError as exc:
        return await _list_page(request, error=from_exception(exc))
    where = f"{PREFIX}/" if action is data.remove else f"{PREFIX}/sandboxes/{name}"
    return RedirectResponse(where, status_code=303)


@router.post("/sandboxes/{name}/start")
async def start(request: Request, name: Name, _: Checked) -> Response:
    return await _act(request, name, data.start)


@router.post("/sandboxes/{name}/stop")
async def stop(request: Request, name: Name, _: Checked) -> Response:
    return await _act(request, name, data.stop)


@router.post("/sandboxes/{name}/remove")
async def remove(request: Request, name: Name, _: Checked) -> Response:
    """Remove the sandbox, running or not (the page asks first)."""
    return await _act(request, name, data.remove)


@router.get("/sandboxes/{name}")
async def sandbox(request: Request, name: Name, path: str = "/") -> Response:
    return await sandbox_page(request, name, path)


async def sandbox_page(request: Request, name: str, path: str, *, error: Problem | None = None) -> Response:
    try:
        record = await data.record(request, name)
    except AgentkernelError as exc:
        return await _list_page(request, error=from_exception(exc))
    files, files_error, background = None, None, []
    if record.status == "running":
        try:
            files = await data.list_dir(request, name, path)
            background = await data.background(request, name)
        except AgentkernelError as exc:
            files_error = from_exception(exc)
    trail = await data.audit_trail(name)
    return render(
        request,
        "sandbox.html",
        error.status if error else 200,
        record=record,
        details=SandboxView.of(record).to_json(),
        policy=data.policy(record),
        console=await data.console_tail(request, name),
        trail=trail,
        network=data.events(trail, "network"),
        commands=data.events(trail, "exec"),
        background=background,
        path=path,
        parent=posixpath.dirname(path.rstrip("/")) or "/",
        files=files,
        files_error=files_error,
        error=error,
    )


@router.get("/sandboxes/{name}/download")
async def download(request: Request, name: Name, path: str) -> Response:
    try:
        info, chunks = await data.open_file(request, name, path)
    except AgentkernelError as exc:
        return await sandbox_page(request, name, posixpath.dirname(path) or "/", error=from_exception(exc))
    filename = posixpath.basename(info.name or path) or "download"
    disposition = f"attachment; filename*=UTF-8''{quote(filename, safe='')}"
    return ClosingStreamingResponse(
        b"", chunks, media_type="application/octet-stream", headers={"Content-Disposition": disposition}
    )


@router.post("/sandboxes/{name}/upload")
async def upload(request: Request, name: Name, _: Checked) -> Response:
    """Write the form's `file` into its `directory` in the sandbox (replacing a file of that name)."""
    form = await request.form()  # read already by the CSRF check
    directory = str(form.get("directory") or "/")
    file = form.get("file")
    try:
        if not isinstance(file, UploadFile) or not file.filename:
            raise ProblemError(422, "invalid_field", "choose a file to upload", field="file")
        target = posixpath.join(directory, posixpath.basename(file.filename))
        await data.write_file(request, name, target, _chunks(file))
    except (AgentkernelError, ProblemError) as exc:
        return await sandbox_page(request, name, directory, error=from_exception(exc))
    return RedirectResponse(f"{PREFIX}/sandboxes/{name}?path={quote(directory)}", status_code=303)


async def _chunks(file: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(1 << 16):
        yield chunk


@router.get("/host")
async def host_page(request: Request) -> Response:
    return render(request, "host.html", host=await data.host())
