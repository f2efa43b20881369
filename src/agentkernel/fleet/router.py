"""The fleet's router (`agentkernel serve --fleet`): the single-host HTTP API in front of many nodes.

Stateless: everything it knows is in etcd (fleet/store.py), so any number of routers serve at once.
A new sandbox is placed on a node by a transaction, then created there; every other call on a sandbox
is passed to its node as it came (bodies and answers streamed, WebSockets relayed), with the node key
in place of the client's. The client's API key is checked here; nodes accept only the node key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import anyio
import httpx
import uvicorn
from fastapi import APIRouter, FastAPI, Path, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agentkernel import __version__
from agentkernel.api import problems
from agentkernel.api.auth import API_KEY_ENV, BearerAuth, check_listen_address
from agentkernel.api.guard import AllowedHosts, WebGuard, deny
from agentkernel.api.lifecycle import ForkRequest, SnapshotName
from agentkernel.api.limits import BodyLimit
from agentkernel.api.models import CreateRequest, Health, RunRequest
from agentkernel.api.problems import MEDIA_TYPE, from_exception, problem, response
from agentkernel.api.routes import Name
from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS
from agentkernel.errors import (
    AgentkernelError,
    FleetError,
    NodeUnreachableError,
    NoSuchNodeError,
    NoSuchSnapshotError,
    SandboxLostError,
)
from agentkernel.fleet import NODE_KEY_ENV, mcp, store
from agentkernel.fleet import node as fleet_node
from agentkernel.fleet.etcd import Etcd
from agentkernel.fleet.nodecache import NodeCache
from agentkernel.fleet.tls import TlsFiles, tls_failure

SHUTDOWN_GRACE = 5
T = TypeVar("T")
CONNECT_TIMEOUT = 10.0
"""Seconds a node has to accept a connection; answers may take as long as the command runs."""
PUBLISH_WAIT = 3.0
"""Seconds a fork waits for a snapshot just taken to show in its node's record."""
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"authorization",
        b"origin",  # checked here against the router; the node is not the page's origin
        b"sec-fetch-site",
    }
)


class Fleet:
    """What the routes share: etcd, the nodes as its watch shows them, the connection pool to the
    nodes and the credentials the router shows them (the node key, or a client certificate)."""

    def __init__(self, etcd: Etcd, node_key: str | None, tls: TlsFiles | None = None) -> None:
        self.etcd = etcd
        self.cache = NodeCache(etcd)
        self.auth = f"Bearer {node_key}" if node_key else None
        self.tls = tls.client_context() if tls is not None else None
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None, write=None, pool=None),
            trust_env=False,
            verify=self.tls if self.tls is not None else True,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.etcd.close()

    async def node_of(self, name: str) -> store.NodeInfo:
        """The live node that holds `name`: a 404 if the fleet has no such sandbox, a 410 if its node
        is gone."""
        placed = await store.placement(self.etcd, name)
        node = await self.cache.node(placed.node)
        if node is None:
            raise SandboxLostError(lost_reason(name, placed.node))
        return node

    async def holder_of(self, snapshot: str) -> store.NodeInfo:
        """A live node that holds `snapshot` (snapshots are named per node: the first one listed)."""
        for node in sorted((await self.cache.nodes()).values(), key=lambda n: n.id):
            if snapshot in node.snapshots:
                return node
        raise NoSuchSnapshotError(snapshot)

    def credentials(self) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", self.auth.encode())] if self.auth else []

    async def send(
        self,
        node: store.NodeInfo,
        method: str,
        path: str,
        *,
        request: Request | None = None,
        body: Any = None,
    ) -> httpx.Response:
        """Send a request to `node` with the node key; the answer is streamed (close it)."""
        headers: list[tuple[bytes, bytes]] = []
        content: Any = body
        query = ""
        if request is not None:
            query = request.url.query
            headers = [(k, v) for k, v in request.headers.raw if k not in HOP_BY_HOP]
            if body is None:
                content = request.stream()
            else:
                headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers.extend(self.credentials())
        url = f"{node.url}{path}" + (f"?{query}" if query else "")
        outgoing = self.http.build_request(method, url, headers=headers, content=content)
        try:
            answer = await self.http.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            raise unreachable(node, exc) from None
        if answer.status_code == 401:
            await answer.aclose()
            raise wrong_key(node)
        return answer

    async def json(self, node: store.NodeInfo, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        answer = await self.send(node, method, path, **kwargs)
        try:
            data = await answer.aread()
        finally:
            await answer.aclose()
        return answer.status_code, json.loads(data) if data else None


def wrong_key(node: store.NodeInfo) -> NodeUnreachableError:
    return NodeUnreachableError(
        f"node {node.id} refused this router's key: {NODE_KEY_ENV} must be the same on routers and nodes",
        code="node_auth_failed",
    )


def unreachable(node: store.NodeInfo, exc: BaseException) -> NodeUnreachableError:
    """A node that did not answer; one whose TLS handshake failed says so (a certificate not from
    the fleet's CA on either side, or a plain-HTTP node)."""
    if tls_failure(exc):
        return NodeUnreachableError(
            f"node {node.id} at {node.url}: the TLS handshake failed ({tls_failure(exc)}): routers and "
            "nodes need certificates from the same CA (docs/deploy.md, mTLS)",
            code="node_auth_failed",
        )
    return NodeUnreachableError(f"node {node.id} at {node.url} did not answer: {exc}")


def lost_reason(name: str, node: str) -> str:
    return (
        f"sandbox '{name}' was on node {node}, whose lease in etcd expired: the node died or lost etcd "
        "(remove it with `agentkernel rm -f`)"
    )


def relay(answer: httpx.Response, *, then: Callable[[], Awaitable[None]] | None = None) -> StreamingResponse:
    """The node's answer, streamed as it comes; `then()` runs once it is over or abandoned."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        finally:
            await answer.aclose()
            if then is not None:
                with anyio.CancelScope(shield=True):
                    await then()

    headers = {k: v for k, v in answer.headers.items() if k.encode() not in HOP_BY_HOP}
    return StreamingResponse(body(), status_code=answer.status_code, headers=headers)


def relayed_problem(status: int, data: Any) -> JSONResponse:
    return JSONResponse(data, status_code=status, media_type=MEDIA_TYPE)


def fleet_of(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


NodeId = Annotated[str, Path(pattern=f"^{fleet_node.NODE_ID.pattern}$", description="Node id.")]
router = APIRouter()


@router.get("/health", tags=["server"])
async def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/fleet/nodes", tags=["fleet"])
async def list_nodes(request: Request) -> list[dict[str, Any]]:
    return [store.node_view(n) for n in await store.live_nodes(fleet_of(request).etcd)]


@router.get("/fleet/nodes/{node}", tags=["fleet"])
async def get_node(node: NodeId, request: Request) -> dict[str, Any]:
    for live in await store.live_nodes(fleet_of(request).etcd):
        if live.info.id == node:
            return store.node_view(live)
    raise NoSuchNodeError(node)


@router.get("/sandboxes", tags=["sandboxes"])
async def list_sandboxes(request: Request) -> list[dict[str, Any]]:
    """Every sandbox of every live node with its `node`, and the placed sandboxes of nodes that are
    gone as `lost`, with the `reason`."""
    fleet = fleet_of(request)
    live, placed = await fleet.cache.nodes(), await store.placements(fleet.etcd)
    found: list[dict[str, Any]] = []

    async def gather(node: store.NodeInfo) -> None:
        try:
            status, data = await fleet.json(node, "GET", "/sandboxes")
        except NodeUnreachableError as exc:
            found.extend(missing(p, "unreachable", str(exc)) for p in placed if p.node == node.id)
            return
        if status != 200 or not isinstance(data, list):
            reason = f"node {node.id} answered HTTP {status} to a listing"
            found.extend(missing(p, "unreachable", reason) for p in placed if p.node == node.id)
            return
        found.extend({**item, "node": node.id} for item in data if isinstance(item, dict))

    async with anyio.create_task_group() as group:
        for node in live.values():
            group.start_soon(gather, node)
    found.extend(missing(p, "lost", lost_reason(p.name, p.node)) for p in placed if p.node not in live)
    return sorted(found, key=lambda s: (str(s.get("name")), str(s.get("node"))))


async def each(call: Callable[[store.NodeInfo], Awaitable[T]], nodes: Sequence[store.NodeInfo]) -> list[T]:
    """`call` on every node at once; the first failure (as itself, not in a group) if any fails."""
    results: list[T] = []
    failures: list[BaseException] = []

    async def one(node: store.NodeInfo) -> None:
        try:
            results.append(await call(node))
        except AgentkernelError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as group:
        for node in nodes:
            group.start_soon(one, node)
    if failures:
        raise failures[0]
    return results


def missing(placed: store.Placement, status: str, reason: str) -> dict[str, Any]:
    """A placed sandbox whose node cannot say how it is."""
    created = datetime.fromtimestamp(placed.created_at, UTC).isoformat(timespec="seconds")
    return {
        "name": placed.name,
        "status": status,
        "reason": reason,
        "node": placed.node,
        "backend": "",
        "image": "",
        "image_digest": "",
        "vcpus": placed.vcpus,
        "memory_mb": placed.memory_mb,
        "profile": "",
        "created_at": created,
    }


def _parsed(model: type[CreateRequest] | type[RunRequest] | type[ForkRequest], raw: bytes) -> Any:
    """The body checked as the node would: bad input is refused here, before anything is placed."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


@router.post("/sandboxes", tags=["sandboxes"], status_code=201)
async def create_sandbox(request: Request) -> Response:
    """Place the sandbox on a node with room (a transaction in etcd), then create it there."""
    fleet = fleet_of(request)
    body: CreateRequest = _parsed(CreateRequest, await request.body())
    name = body.name or f"sandbox-{secrets.token_hex(4)}"
    _, node = await store.place(
        fleet.etcd,
        name,
        vcpus=body.vcpus or DEFAULT_VCPUS,
        memory_mb=body.memory_mb or DEFAULT_MEMORY_MB,
    )
    payload = json.dumps(body.model_dump(exclude_unset=True) | {"name": name})
    return await _create_on(fleet, node, name, "/sandboxes", request, payload)


async def _create_on(
    fleet: Fleet, node: store.NodeInfo, name: str, path: str, request: Request, payload: str
) -> Response:
    """POST the creation of placed sandbox `name` to its node; its placement is given back if the
    node refuses or the call fails."""
    try:
        status, data = await fleet.json(node, "POST", path, request=request, body=payload)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await store.release(fleet.etcd, name)
        raise
    if status != 201:
        await store.release(fleet.etcd, name)
        return relayed_problem(status, data)
    return JSONResponse({**data, "node": node.id}, status_code=201)


@router.get("/sandboxes/{name}", tags=["sandboxes"])
async def get_sandbox(name: Name, request: Request) -> Response:
    fleet = fleet_of(request)
    node = await fleet.node_of(name)
    status, data = await fleet.json(node, "GET", f"/sandboxes/{name}", request=request, body=b"")
    if status == 200 and isinstance(data, dict):
        return JSONResponse({**data, "node": node.id})
    return relayed_problem(status, data)


@router.delete("/sandboxes/{name}", tags=["sandboxes"], status_code=204)
async def remove_sandbox(name: Name, request: Request) -> Response:
    """Remove it on its node and forget its placement; a lost sandbox's record is just forgotten."""
    fleet = fleet_of(request)
    try:
        node = await fleet.node_of(name)
    except SandboxLostError:
        await store.release(fleet.etcd, name)
        return Response(status_code=204)
    status, data = await fleet.json(node, "DELETE", f"/sandboxes/{name}", request=request, body=b"")
    if status in (204, 404):  # 404: the node no longer has it, so neither does the fleet
        await store.release(fleet.etcd, name)
    if status == 204:
        return Response(status_code=204)
    return relayed_problem(status, data)


METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


@router.api_route("/sandboxes/{name}/{rest:path}", methods=METHODS, include_in_schema=False)
async def on_node(name: Name, rest: str, request: Request) -> Response:
    """Every other route on a sandbox (start, stop, exec, streams, files, commands, snapshots of it,
    and routes added later) goes to its node as it came: routed by the name in the path alone."""
    fleet = fleet_of(request)
    node = await fleet.node_of(name)
    return relay(await fleet.send(node, request.method, outgoing("sandboxes", name, rest), request=request))


@router.get("/snapshots", tags=["snapshots"])
async def list_snapshots(request: Request) -> list[dict[str, Any]]:
    """Every live node's snapshots, each with its `node`."""
    fleet = fleet_of(request)
    found: list[dict[str, Any]] = []

    async def gather(node: store.NodeInfo) -> list[dict[str, Any]]:
        status, data = await fleet.json(node, "GET", "/snapshots")
        if status != 200 or not isinstance(data, list):
            raise NodeUnreachableError(f"node {node.id} answered HTTP {status} to a listing of snapshots")
        return [{**item, "node": node.id} for item in data if isinstance(item, dict)]

    holders = [n for n in (await fleet.cache.nodes()).values() if n.snapshots]
    for listed in await each(gather, holders):
        found.extend(listed)
    return sorted(found, key=lambda s: (str(s.get("name")), str(s.get("node"))))


@router.post("/snapshots/{snapshot}/fork", tags=["snapshots"], status_code=201)
async def fork_snapshot(snapshot: SnapshotName, request: Request) -> Response:
    """Place the new sandbox on a node that holds the snapshot (only there are its files), then fork
    it there."""
    fleet = fleet_of(request)
    body: ForkRequest = _parsed(ForkRequest, await request.body())
    name = body.name or f"sandbox-{secrets.token_hex(4)}"
    source = await published(fleet, snapshot)
    status, meta = await fleet.json(source, "GET", f"/snapshots/{snapshot}")
    if status != 200 or not isinstance(meta, dict):
        return relayed_problem(status, meta)
    _, node = await store.place(
        fleet.etcd,
        name,
        vcpus=int(meta.get("vcpus") or DEFAULT_VCPUS),
        memory_mb=int(meta.get("memory_mb") or DEFAULT_MEMORY_MB),
        snapshot=snapshot,
    )
    payload = json.dumps(body.model_dump(exclude_unset=True) | {"name": name})
    return await _create_on(fleet, node, name, f"/snapshots/{snapshot}/fork", request, payload)


async def published(fleet: Fleet, snapshot: str) -> store.NodeInfo:
    """The holder of `snapshot`, waiting a moment for one just taken (a node publishes what it holds
    within a second)."""
    deadline = anyio.current_time() + PUBLISH_WAIT
    while True:
        try:
            return await fleet.holder_of(snapshot)
        except NoSuchSnapshotError:
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.2)


@router.api_route("/snapshots/{snapshot}", methods=METHODS, include_in_schema=False)
@router.api_route("/snapshots/{snapshot}/{rest:path}", methods=METHODS, include_in_schema=False)
async def on_holder(snapshot: SnapshotName, request: Request) -> Response:
    """Every other route on a snapshot goes to the node that holds it."""
    fleet = fleet_of(request)
    node = await fleet.holder_of(snapshot)
    path = outgoing("snapshots", snapshot, request.path_params.get("rest"))
    return relay(await fleet.send(node, request.method, path, request=request))


def outgoing(kind: str, name: str, rest: str | None) -> str:
    """The path sent to a node, built from the checked name and the rest of the path (PlainPaths
    refused `.`, `..` and empty segments), each segment quoted again: the node routes the same path."""
    path = f"/{kind}/{name}"
    if rest is not None:
        path += "/" + "/".join(quote(segment, safe="!$&'()*+,;=:@~") for segment in rest.split("/"))
    return path


class PlainPaths:
    """ASGI middleware refusing (400) a request or WebSocket whose path, decoded, has a `.`, `..` or
    empty segment (a trailing slash aside): a router forwards paths to nodes with its own credentials,
    and `/sandboxes/<placed>/../../x` must not reach `/x` there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            segments = scope["path"].split("/")[1:]
            if "" in segments[:-1] or any(s in (".", "..") for s in segments):
                detail = f"the path {scope['path']!r} has an empty, '.' or '..' segment"
                await deny(scope, receive, send, problem(400, "invalid_path", detail, field="path"))
                return
        await self.app(scope, receive, send)


async def _ephemeral(request: Request, path: str) -> Response:
    """/run and /run/stream: placed for as long as the command runs, under a name of its own."""
    fleet = fleet_of(request)
    raw = await request.body()
    body: RunRequest = _parsed(RunRequest, raw)
    name = f"run-{secrets.token_hex(6)}"
    _, node = await store.place(
        fleet.etcd, name, vcpus=body.vcpus or DEFAULT_VCPUS, memory_mb=body.memory_mb or DEFAULT_MEMORY_MB
    )

    async def release() -> None:
        await store.release(fleet.etcd, name)

    try:
        answer = await fleet.send(node, "POST", path, request=request, body=raw)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await release()
        raise
    return relay(answer, then=release)


@router.post("/run", tags=["run"])
async def run(request: Request) -> Response:
    return await _ephemeral(request, "/run")


@router.post("/run/stream", tags=["run"])
async def run_stream(request: Request) -> Response:
    return await _ephemeral(request, "/run/stream")


@router.websocket("/sandboxes/{name}/{rest:path}")
async def websocket_on_node(websocket: WebSocket, name: Name, rest: str) -> None:
    """A WebSocket on a sandbox (the terminal of `attach`) opened on its node, relayed message by
    message both ways."""
    fleet: Fleet = websocket.app.state.fleet
    try:
        node = await fleet.node_of(name)
        url = node.url.replace("http", "ws", 1) + outgoing("sandboxes", name, rest)
        if websocket.url.query:
            url += f"?{websocket.url.query}"
        upstream = await _open(url, fleet, node)
    except (AgentkernelError, _Refused) as exc:
        denial = exc.answer if isinstance(exc, _Refused) else response(from_exception(exc))
        await websocket.send_denial_response(denial)
        return
    async with upstream:
        await websocket.accept()
        async with anyio.create_task_group() as group:
            group.start_soon(_client_to_node, websocket, upstream, group.cancel_scope)
            code = 1000
            try:
                async for message in upstream:
                    if isinstance(message, bytes):
                        await websocket.send_bytes(message)
                    else:
                        await websocket.send_text(message)
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            group.cancel_scope.cancel()
        with contextlib.suppress(RuntimeError):
            await websocket.close(code if code != 1005 else 1000)


class _Refused(Exception):
    def __init__(self, answer: Response) -> None:
        super().__init__("refused")
        self.answer = answer


async def _open(url: str, fleet: Fleet, node: store.NodeInfo) -> ClientConnection:
    headers = {k.decode(): v.decode() for k, v in fleet.credentials()}
    try:
        return await connect(
            url,
            additional_headers=headers,
            open_timeout=CONNECT_TIMEOUT,
            max_size=None,
            ssl=fleet.tls if url.startswith("wss:") else None,
        )
    except InvalidStatus as exc:
        if exc.response.status_code == 401:
            raise wrong_key(node) from None
        raw = exc.response.body or b""
        kind = exc.response.headers.get("Content-Type", MEDIA_TYPE)
        raise _Refused(Response(raw, status_code=exc.response.status_code, media_type=kind)) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise unreachable(node, exc) from None


async def _client_to_node(websocket: WebSocket, upstream: ClientConnection, scope: anyio.CancelScope) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send(message["text"])
    except ConnectionClosed:
        pass
    finally:
        scope.cancel()


class ReadyProbe:
    """GET /ready, without the API key (a probe has none): 200 while etcd answers, else 503."""

    def __init__(self, app: ASGIApp, etcd: Sequence[str]) -> None:
        self.app = app
        self.etcd = etcd

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/ready":
            await self.app(scope, receive, send)
            return
        try:
            async with Etcd(self.etcd) as etcd:
                live = await store.nodes(etcd)
            answer: Response = JSONResponse({"status": "ok", "nodes": len(live)})
        except FleetError as exc:
            answer = response(problem(503, exc.code, str(exc)))
        await answer(scope, receive, send)


def create_app(
    *,
    etcd: Sequence[str],
    node_key: str | None,
    api_key: str | None,
    hosts: AllowedHosts | None = None,
    tls: TlsFiles | None = None,
) -> FastAPI:
    """The router's API; nodes are called with `node_key`, or with the client certificate of `tls`
    (or both)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet = app.state.fleet = Fleet(Etcd(etcd), node_key, tls)
        async with anyio.create_task_group() as group:
            group.start_soon(fleet.cache.follow)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
                await fleet.close()

    app = FastAPI(
        title="agentkernel fleet",
        version=__version__,
        summary="One API in front of many agentkernel hosts.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    problems.install(app)
    app.include_router(router)
    app.router.routes.append(Route("/mcp", mcp.Endpoint(), methods=["GET", "POST", "DELETE"]))
    app.add_middleware(BodyLimit)
    app.add_middleware(PlainPaths)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(ReadyProbe, etcd=etcd)
    app.add_middleware(WebGuard, hosts=hosts or AllowedHosts())  # added last: it runs first
    return app


def serve(
    host: str,
    port: int,
    *,
    etcd: Sequence[str],
    allow_hosts: Sequence[str] = (),
    tls: TlsFiles | None = None,
) -> None:
    """Serve the fleet's API until interrupted; etcd must answer at start (a clear error if not).
    With `tls`, nodes are called over HTTPS with its client certificate; the node key is then
    optional."""
    key = os.environ.get(API_KEY_ENV) or None
    check_listen_address(host, key)
    node_key = fleet_node.node_key(required=tls is None)
    hosts = AllowedHosts.configured(host, allow_hosts)

    async def check() -> None:
        async with Etcd(etcd) as client:
            await store.nodes(client)

    asyncio.run(check())
    app = create_app(etcd=etcd, node_key=node_key, api_key=key, hosts=hosts, tls=tls)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE)
