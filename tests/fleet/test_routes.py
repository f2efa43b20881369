"""The router serves every route a single host serves: each path and method of the node's OpenAPI
document, and each of its WebSockets, reaches a handler of the router's (here one that fails for want
of etcd) rather than the router's own 404 or 405. A route added to the single-host API that the router
does not carry fails this test."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from agentkernel.api.app import create_app as node_app
from agentkernel.fleet.router import create_app as router_app
from tests.api.server import free_port

NODE_ONLY = {
    "/metrics": "each node exports its own figures: scrape the nodes",
}
"""Single-host paths the router does not serve, and why."""
SAMPLES = {"name": "box", "path": "etc/hosts", "command_id": "c1", "snapshot": "snap"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: SAMPLES.get(m.group(1), "x"), path)


def routes(found: list[BaseRoute]) -> Iterator[BaseRoute]:
    for route in found:
        inner = getattr(route, "original_router", None)
        yield from routes(inner.routes) if inner is not None else [route]


@pytest.fixture
def router() -> Iterator[TestClient]:
    dead = f"http://127.0.0.1:{free_port()}"
    with TestClient(router_app(etcd=[dead], node_key="k", api_key=None)) as client:
        yield client


def node_paths(tmp_path: Path) -> dict[str, list[str]]:
    schema = node_app(project_dir=tmp_path, api_key=None).openapi()
    return {path: [m.upper() for m in ops] for path, ops in schema["paths"].items()}


def test_every_http_route_of_a_node_is_served(router: TestClient, tmp_path: Path) -> None:
    paths = node_paths(tmp_path)
    assert "/sandboxes/{name}/commands/{command_id}/wait" in paths and "/snapshots/{snapshot}/fork" in paths
    missing = []
    for path, methods in paths.items():
        if path in NODE_ONLY:
            continue
        for method in methods:
            answer = router.request(method, concrete(path), json={"name": "new", "command": ["true"]})
            is_json = answer.headers.get("content-type", "").endswith("json")
            code = answer.json().get("code") if is_json else ""
            if answer.status_code in (404, 405) and code in ("not_found", "method_not_allowed"):
                missing.append(f"{method} {path}")
            elif path != "/health":
                # reached a handler: it needed etcd, which is down (or refused the body first)
                assert answer.status_code in (422, 503), (method, path, answer.text)
    assert not missing, f"the router does not serve {missing}"


def test_the_comparison_can_fail(router: TestClient) -> None:
    """A path the router does not serve is told apart from one it serves but that failed."""
    answer = router.get("/no/such/route")
    assert answer.status_code == 404 and answer.json()["code"] == "not_found"
    served = router.get("/snapshots/snap")
    assert served.status_code == 503 and served.json()["code"] == "etcd_unavailable"


def test_every_websocket_of_a_node_is_served(router: TestClient, tmp_path: Path) -> None:
    app = node_app(project_dir=tmp_path, api_key=None)
    sockets = [r.path for r in routes(app.router.routes) if isinstance(r, WebSocketRoute)]
    sockets = [p for p in sockets if not p.startswith("/ui/")]  # the dashboard is each host's own
    assert "/sandboxes/{name}/attach" in sockets
    for path in sockets:
        with pytest.raises(WebSocketDisconnect), router.websocket_connect(concrete(path)):
            pass
        answer = router.get(concrete(path))  # the same path as HTTP: forwarded, not unknown
        assert answer.json()["code"] == "etcd_unavailable", path
