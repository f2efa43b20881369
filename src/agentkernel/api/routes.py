"""Health, one-off runs, the sandbox life cycle and commands in a sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from agentkernel import __version__
from agentkernel.api.models import (
    CreateRequest,
    ExecInSandboxRequest,
    ExecRequest,
    Health,
    RunRequest,
    RunResult,
    Started,
)
from agentkernel.api.problems import MEDIA_TYPE, Problem
from agentkernel.api.sse import EventStreamResponse, stream_process
from agentkernel.protocol.connection import Process
from agentkernel.sandbox.view import SandboxView
from agentkernel.service.checks import NAME_RE, parse_labels
from agentkernel.service.lifetimes import lifetime_for
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import CommandSpec, SandboxService, collect, exec_on

OUTPUT_LIMIT = 8 << 20
"""Bytes of each stream a non-streaming run returns; the rest is cut (and says so)."""
CLIENT_GONE = 499
"""The status logged for a request whose client went away before the answer (nobody receives it)."""
T = TypeVar("T")


def service(request: Request) -> SandboxService:
    found: SandboxService = request.app.state.service
    return found


Service = Annotated[SandboxService, Depends(service)]
Name = Annotated[str, Path(pattern=f"^{NAME_RE.pattern}$", description="Sandbox name.")]


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": Problem, "content": {MEDIA_TYPE: {}}} for s in statuses}


SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}
}
BODY = problems(400, 413)
"""What a JSON body can get: 400 when it is no JSON, 413 when it is over the limit (limits.py)."""
router = APIRouter(responses=problems(401, 422))


def _command(body: ExecRequest) -> CommandSpec:
    return CommandSpec.checked(body.command, env=body.env, cwd=body.cwd, timeout=body.timeout)


def _flags(body: RunRequest | CreateRequest) -> SandboxFlags:
    return SandboxFlags(
        image=body.image,
        vcpus=body.vcpus,
        memory_mb=body.memory_mb,
        profile=body.profile,
        secrets=body.secrets,
        env=body.env or {} if isinstance(body, CreateRequest) else {},
        labels=body.labels or {} if isinstance(body, CreateRequest) else {},
    )


def _stdin(body: ExecRequest) -> bytes:
    return body.stdin.encode() if body.stdin else b""


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone. The body has been read, so the next ASGI message is the
    disconnect (or, from a client that pipelines, more requests' bytes, which are not ours to take)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    await _until_disconnected(request)
    scope.cancel()


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """`work()`'s result; None if the client went away first, in which case `work` is cancelled (its
    cleanup still runs: the service's ephemeral removes its sandbox shielded from the cancellation)."""
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, scope))
        try:
            return await work()
        finally:
            watcher.cancel()
    return None


@router.get("/health", tags=["server"])
async def health() -> Health:
    return Health(status="ok", version=__version__)


@router.post("/run", tags=["run"], response_model=RunResult, responses={**BODY, **problems(502)})
async def run(body: RunRequest, sandboxes: Service, request: Request) -> RunResult | Response:
    """Run a command in a new sandbox that is removed afterwards; answers when it has exited. A client
    that disconnects first ends the command, and its sandbox is removed."""
    command = _command(body)

    async def work() -> RunResult:
        request = await sandboxes.resolve(_flags(body), command=command.argv)
        async with sandboxes.ephemeral(request) as (_name, conn):
            proc = await exec_on(conn, command)
            return RunResult.of(await collect(proc, stdin=_stdin(body), limit=OUTPUT_LIMIT))

    result = await unless_disconnected(request, work)
    return Response(status_code=CLIENT_GONE) if result is None else result


@router.post(
    "/run/stream",
    tags=["run"],
    status_code=200,
    response_class=EventStreamResponse,
    responses={**SSE, **BODY, **problems(502)},
)
async def run_stream(body: RunRequest, sandboxes: Service) -> EventStreamResponse:
    """Like /run, with the output sent as Server-Sent Events while the command runs."""
    command = _command(body)
    request = await sandboxes.resolve(_flags(body), command=command.argv)

    @contextlib.asynccontextmanager
    async def opening() -> AsyncIterator[Process]:
        async with sandboxes.ephemeral(request) as (_name, conn):
            yield await exec_on(conn, command)

    return await stream_process(opening(), stdin=_stdin(body))


@router.get("/sandboxes", tags=["sandboxes"])
async def list_sandboxes(
    sandboxes: Service,
    label: Annotated[
        list[str] | None,
        Query(description="Only sandboxes with this label, as key=value (repeatable: all of them)."),
    ] = None,
) -> list[SandboxView]:
    return [SandboxView.of(r) for r in await sandboxes.list_sandboxes(labels=parse_labels(label or []))]


@router.post("/sandboxes", tags=["sandboxes"], status_code=201, responses={**BODY, **problems(409)})
async def create_sandbox(body: CreateRequest, sandboxes: Service, http: Request) -> SandboxView:
    """Create a sandbox and (unless `start` is false) boot it."""
    lifetime = lifetime_for(body.timeout, http.app.state.default_lifetime)
    request = await sandboxes.resolve(dataclasses.replace(_flags(body), lifetime=lifetime))
    return SandboxView.of(await sandboxes.create(request, name=body.name, start=body.start))


@router.get("/sandboxes/{name}", tags=["sandboxes"], responses=problems(404))
async def get_sandbox(name: Name, sandboxes: Service) -> SandboxView:
    return SandboxView.of(await sandboxes.get(name))


@router.delete("/sandboxes/{name}", tags=["sandboxes"], status_code=204, responses=problems(404, 409))
async def remove_sandbox(
    name: Name,
    sandboxes: Service,
    force: Annotated[bool, Query(description="Remove even if running.")] = False,
) -> Response:
    await sandboxes.remove(name, force=force)
    return Response(status_code=204)


@router.post("/sandboxes/{name}/start", tags=["sandboxes"], responses=problems(404, 409))
async def start_sandbox(name: Name, sandboxes: Service) -> SandboxView:
    return SandboxView.of(await sandboxes.start(name))


@router.post("/sandboxes/{name}/stop", tags=["sandboxes"], responses=problems(404))
async def stop_sandbox(name: Name, sandboxes: Service) -> SandboxView:
    return SandboxView.of(await sandboxes.stop(name))


@router.post(
    "/sandboxes/{name}/exec",
    tags=["commands"],
    responses={
        201: {"model": Started, "description": "Started in the background (`background: true`)."},
        **BODY,
        **problems(404, 409, 502),
    },
)
async def exec_in_sandbox(
    name: Name, body: ExecInSandboxRequest, sandboxes: Service, response: Response
) -> RunResult | Started:
    """Run a command in a running sandbox; answers when it has exited, or at once with the command's
    id when `background` is true."""
    if body.background:
        started = await sandboxes.start_command(name, _command(body))
        await sandboxes.command_stdin(name, started.id, _stdin(body), eof=True)
        response.status_code = 201
        return Started(id=started.id, pid=started.pid)
    proc = await sandboxes.exec(name, _command(body))
    return RunResult.of(await collect(proc, stdin=_stdin(body), limit=OUTPUT_LIMIT))


@router.post(
    "/sandboxes/{name}/exec/stream",
    tags=["commands"],
    status_code=200,
    response_class=EventStreamResponse,
    responses={**SSE, **BODY, **problems(404, 409, 502)},
)
async def exec_stream(name: Name, body: ExecRequest, sandboxes: Service) -> EventStreamResponse:
    """Like exec, with the output sent as Server-Sent Events while the command runs."""
    command = _command(body)

    @contextlib.asynccontextmanager
    async def opening() -> AsyncIterator[Process]:
        yield await sandboxes.exec(name, command)

    return await stream_process(opening(), stdin=_stdin(body))
