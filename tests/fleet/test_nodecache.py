"""The router's cache of live nodes outlives a malformed watch message: it logs it and reads etcd
again, rather than ending the task that runs beside the router's server (and so the router). The
etcd here is a small server on loopback that answers a range with one node and every watch with a
message whose `result` is not an object (a real etcd cannot be made to send one)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentkernel.fleet import nodecache, store
from agentkernel.fleet.etcd import Etcd
from agentkernel.fleet.nodecache import NodeCache
from tests.api.server import free_port

NODE = store.NodeInfo(id="n1", url="http://127.0.0.1:9", cores=1, memory_mb=512, capacity=1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_malformed_watch_message_is_logged_and_the_nodes_read_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodecache, "RETRY", 0.1)
    ranges = 0

    async def kv_range(request: Request) -> Response:
        nonlocal ranges
        ranges += 1
        kv = {"key": b64(store.node_key(NODE.id)), "value": b64(NODE.encode()), "mod_revision": "5"}
        return JSONResponse({"header": {"revision": "5"}, "kvs": [kv]})

    async def watch(request: Request) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            yield json.dumps({"result": {"created": True}}).encode() + b"\n"
            yield json.dumps({"result": ["not", "an", "object"]}).encode() + b"\n"

        return StreamingResponse(lines())

    app = Starlette(
        routes=[
            Route("/v3/kv/range", kv_range, methods=["POST"]),
            Route("/v3/watch", watch, methods=["POST"]),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    async def scenario() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        cache = NodeCache(Etcd([f"http://127.0.0.1:{port}"]))
        following = asyncio.create_task(cache.follow())
        try:
            for _ in range(500):
                if ranges >= 3 or following.done():
                    break
                await asyncio.sleep(0.01)
            assert not following.done(), following.exception()
            assert ranges >= 3  # read again after each broken watch
            assert await cache.node("n1") == NODE
        finally:
            following.cancel()
            await cache.etcd.close()
            server.should_exit = True
            await serving

    with caplog.at_level(logging.INFO, logger="agentkernel.fleet"):
        asyncio.run(scenario())
    assert "result is not an object" in caplog.text
