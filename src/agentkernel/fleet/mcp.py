"""MCP (streamable HTTP) across the fleet, at /mcp on nodes and routers.

A node serves the same tools as `agentkernel mcp-server` at /mcp, stateless and answering JSON: no
session lives on a node, so each call may go to a different one. The router reads each JSON-RPC
message and sends it where its work is: a tool that makes a sandbox (create_sandbox, fork_snapshot,
run_command) is placed first, as the HTTP API's creations are, and its placement given back if the tool
fails; a tool on a sandbox goes to that sandbox's node, one on a snapshot to a node that holds it;
listings are gathered from every node; anything else (initialize, tools/list, pings, notifications)
goes to any live node, since every node serves the same tools.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS
from agentkernel.errors import AgentkernelError, FleetFullError, SandboxLostError
from agentkernel.fleet import store

if TYPE_CHECKING:
    from agentkernel.fleet.router import Fleet

Json = dict[str, Any]
LISTINGS = {"list_sandboxes": "sandboxes", "list_snapshots": "snapshots"}
"""Tools whose results are gathered from every node: the tool and the list in its result."""


class NodeTools:
    """A node's MCP tools as an ASGI endpoint; `running()` must surround its use (the server's life)."""

    def __init__(self, project_dir: Path, default_lifetime: float | None) -> None:
        from mcp.server.transport_security import TransportSecuritySettings

        from agentkernel.mcp_server.server import build_server

        server = build_server(project_dir, default_lifetime=default_lifetime)
        # The node's own guard and key check come first; the SDK's Host check would refuse routers.
        server.streamable_http_app(
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.manager = server.session_manager

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)


class Endpoint:
    """The router's /mcp: each JSON-RPC message sent to the node its work is on."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method != "POST":  # stateless: no stream of the server's own, no session to end
            answer: Response = Response(status_code=405, headers={"Allow": "POST"})
        else:
            answer = await dispatch(request.app.state.fleet, request)
        await answer(scope, receive, send)


async def dispatch(fleet: Fleet, request: Request) -> Response:
    raw = await request.body()
    try:
        message = json.loads(raw)
    except ValueError:
        return rpc_error(None, -32700, "Parse error: the body is not JSON", 400)
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return rpc_error(None, -32600, "Invalid request: expected one JSON-RPC request or notification", 400)
    rid = message.get("id")
    try:
        if message["method"] != "tools/call":
            return await forward(fleet, request, await any_node(fleet), message)
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        args = params.get("arguments")
        return await call_tool(
            fleet, request, message, str(params.get("name", "")), args if isinstance(args, dict) else {}
        )
    except AgentkernelError as exc:
        if message["method"] == "tools/call":
            return JSONResponse(tool_error(request, rid, str(exc)))
        return rpc_error(rid, -32603, str(exc))


async def call_tool(fleet: Fleet, request: Request, message: Json, tool: str, args: Json) -> Response:
    if tool in ("create_sandbox", "fork_snapshot", "run_command"):
        return await create(fleet, request, message, tool, args)
    if tool in LISTINGS:
        return await gather(fleet, request, message, LISTINGS[tool])
    if tool == "get_output":  # kept in the memory of the node that ran the command: ask each
        answer: Json = {}
        for node in (await fleet.cache.nodes()).values():
            answer = await exchange(fleet, request, node, message)
            if not failed(answer):
                break
        return JSONResponse(answer or tool_error(request, message.get("id"), "no live node"))
    if isinstance(args.get("snapshot"), str) and not isinstance(args.get("name"), str):
        return await forward(fleet, request, await fleet.holder_of(args["snapshot"]), message)
    name = args.get("name")
    if not isinstance(name, str):
        return await forward(fleet, request, await any_node(fleet), message)
    if tool == "remove_sandbox":
        try:
            node = await fleet.node_of(name)
        except SandboxLostError:  # its node is gone: forgetting its placement is all there is to do
            await store.release(fleet.etcd, name)
            done = f"removed {name} (it was lost with its node)"
            return JSONResponse(text_result(request, message.get("id"), done))
        answer = await exchange(fleet, request, node, message)
        if not failed(answer):
            await store.release(fleet.etcd, name)
        return JSONResponse(answer)
    return await forward(fleet, request, await fleet.node_of(name), message)


async def create(fleet: Fleet, request: Request, message: Json, tool: str, args: Json) -> Response:
    """Place the sandbox the tool makes, call the tool on that node with the name filled in, and give
    the placement back if the tool fails (or, for run_command, once its sandbox is gone)."""
    snapshot = args.get("snapshot") if tool == "fork_snapshot" else None
    vcpus, memory_mb = size(args, "vcpus", DEFAULT_VCPUS), size(args, "memory_mb", DEFAULT_MEMORY_MB)
    if isinstance(snapshot, str):
        from agentkernel.fleet.router import published

        holder = await published(fleet, snapshot)
        status, meta = await fleet.json(holder, "GET", f"/snapshots/{snapshot}")
        if status == 200 and isinstance(meta, dict):
            vcpus, memory_mb = size(meta, "vcpus", vcpus), size(meta, "memory_mb", memory_mb)
    if tool == "run_command":
        name = f"run-{secrets.token_hex(6)}"  # the node names its own sandbox: this only holds room
    else:
        given = args.get("name")
        name = given if isinstance(given, str) else f"sandbox-{secrets.token_hex(4)}"
        message = {**message, "params": {**message["params"], "arguments": {**args, "name": name}}}
    _, node = await store.place(
        fleet.etcd,
        name,
        vcpus=vcpus,
        memory_mb=memory_mb,
        snapshot=snapshot if isinstance(snapshot, str) else None,
    )
    answer: Json = {}
    try:
        answer = await exchange(fleet, request, node, message)
    finally:
        if tool == "run_command" or failed(answer):
            with anyio.CancelScope(shield=True):
                await store.release(fleet.etcd, name)
    return JSONResponse(answer)


async def gather(fleet: Fleet, request: Request, message: Json, field: str) -> Response:
    """The tool's list from every live node, in one result, each item with its `node`."""
    from agentkernel.fleet.router import each

    async def one(node: store.NodeInfo) -> list[Any]:
        answer = await exchange(fleet, request, node, message)
        result = answer.get("result")
        structured = result.get("structuredContent") if isinstance(result, dict) else None
        if failed(answer) or not isinstance(structured, dict):
            raise AgentkernelError(f"node {node.id} could not list its {field}: {describe(answer)}")
        return [{**item, "node": node.id} for item in structured.get(field, []) if isinstance(item, dict)]

    nodes = list((await fleet.cache.nodes()).values())
    found = [item for listed in await each(one, nodes) for item in listed]
    merged = {field: sorted(found, key=lambda item: (str(item.get("name")), str(item.get("node"))))}
    return JSONResponse(text_result(request, message.get("id"), json.dumps(merged), structured=merged))


async def any_node(fleet: Fleet) -> store.NodeInfo:
    live = list((await fleet.cache.nodes()).values())
    if not live:
        raise FleetFullError("no node is registered in etcd: start `agentkernel serve --node` on a host")
    return random.choice(live)


async def forward(fleet: Fleet, request: Request, node: store.NodeInfo, message: Json) -> Response:
    """The message to the node's /mcp, its answer relayed as it comes."""
    from agentkernel.fleet.router import relay

    answer = await fleet.send(node, "POST", "/mcp", request=request, body=json.dumps(message).encode())
    return relay(answer)


async def exchange(fleet: Fleet, request: Request, node: store.NodeInfo, message: Json) -> Json:
    """The node's JSON-RPC answer to a request (the node answers JSON, never a stream)."""
    status, data = await fleet.json(node, "POST", "/mcp", request=request, body=json.dumps(message).encode())
    if not isinstance(data, dict):
        raise AgentkernelError(f"node {node.id} answered HTTP {status} to an MCP call, not JSON-RPC")
    return data


def failed(answer: Json) -> bool:
    result = answer.get("result")
    return not answer or "error" in answer or not isinstance(result, dict) or bool(result.get("isError"))


def describe(answer: Json) -> str:
    error, result = answer.get("error"), answer.get("result")
    if isinstance(error, dict):
        return str(error.get("message", error))
    if isinstance(result, dict):
        texts: list[Any] = [c.get("text") for c in result.get("content", []) if isinstance(c, dict)]
        return " ".join(str(t) for t in texts if t) or "no text"
    return "no answer"


def size(args: Json, key: str, default: int) -> int:
    """A size from a tool's arguments for placement; anything odd is left for the node to refuse."""
    value = args.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def text_result(
    request: Request, rid: Any, text: str, *, error: bool = False, structured: Json | None = None
) -> Json:
    """A tool's result made by the router itself, in the shape of the protocol version the client
    speaks (newer versions tag each result with its `resultType`; older ones have no such field)."""
    from mcp_types.methods import serialize_server_result

    result: Json = {"resultType": "complete", "content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        result["structuredContent"] = structured
    with contextlib.suppress(ValueError, KeyError):  # a version the SDK does not know: as it is
        result = serialize_server_result(
            "tools/call", request.headers.get("mcp-protocol-version", ""), result
        )
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def tool_error(request: Request, rid: Any, text: str) -> Json:
    return text_result(request, rid, text, error=True)


def rpc_error(rid: Any, code: int, message: str, status: int = 200) -> JSONResponse:
    return JSONResponse(
        {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}, status_code=status
    )
