"""A router sends calls on a sandbox to its node with the router's own credentials, so the path it
forwards must stay under that sandbox: a path with `..` (spelled plainly or as %2e%2e, which the
server decodes before routing), `.` or an empty segment is refused with one problem, and nothing
reaches the node. Real parts: etcd, a node and a router as `agentkernel serve` subprocesses; the
requests go out over a raw HTTP connection, since HTTP clients resolve `..` before sending."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from agentkernel.fleet.router import create_app as router_app
from tests.api.server import free_port
from tests.fleet.conftest import (
    API_KEY,
    NODE_KEY,
    EtcdCluster,
    Server,
    auth,
    clear,
    live_nodes,
    remove_all,
    start_node,
    start_router,
    wait_for,
    wipe,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair(
    etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """One node (its sandboxes are made without booting) and a router, with a sandbox placed."""
    wipe(etcd_cluster)
    root: Path = tmp_path_factory.mktemp("paths")
    node = start_node(root, etcd_cluster, "pn", 4)
    router = start_router(root, etcd_cluster, "pr")
    try:
        wait_for(lambda: live_nodes(router) == {"pn"}, 20, "the node to register")
        made = httpx.post(
            f"{router.url}/sandboxes", json={"name": "placed", "start": False}, headers=auth(), timeout=120
        )
        assert made.status_code == 201, made.text
        yield node, router
    finally:
        clear(node)
        router.stop()
        node.stop()
        if node.home is not None:
            remove_all(node.home)
        wipe(etcd_cluster)


def raw(
    server: Server, method: str, path: str, body: dict[str, object] | None = None
) -> tuple[int, dict[str, str]]:
    """`method path` sent exactly as written."""
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        connection.request(method, path, body=data, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    [
        "/sandboxes/placed/../../sandboxes",
        "/sandboxes/placed/%2e%2e/%2E%2E/sandboxes",
        "/sandboxes/placed/./../../sandboxes",
        "/sandboxes/placed//../sandboxes",
    ],
)
def test_dot_segments_are_refused_and_nothing_reaches_the_node(
    pair: tuple[Server, Server], path: str
) -> None:
    node, router = pair
    status, problem = raw(router, "POST", path, {"name": "sneaked", "start": False})
    assert status == 400 and problem["code"] == "invalid_path", problem
    assert "'..'" in problem["detail"] and "\n" not in problem["detail"]
    on_node = httpx.get(f"{node.url}/sandboxes", headers=auth(NODE_KEY), timeout=30).json()
    assert [s["name"] for s in on_node] == ["placed"]


def test_a_snapshot_path_with_dot_segments_is_refused(pair: tuple[Server, Server]) -> None:
    _, router = pair
    status, problem = raw(router, "GET", "/snapshots/snap/%2e%2e/%2e%2e/metrics")
    assert status == 400 and problem["code"] == "invalid_path", problem


def test_plain_paths_still_reach_the_node(pair: tuple[Server, Server]) -> None:
    """The check refuses nothing else: a call forwarded on a placed sandbox gets the node's answer."""
    _, router = pair
    status, problem = raw(router, "POST", "/sandboxes/placed/exec", {"command": ["true"]})
    assert status == 409 and problem["code"] == "sandbox_not_running", problem


def test_a_websocket_with_dot_segments_is_refused_before_etcd_is_asked() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with TestClient(router_app(etcd=[dead], node_key="k", api_key=None)) as client:
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect("/sandboxes/box/%2e%2e/%2e%2e/mcp"),
        ):
            pass
        assert denied.value.status_code == 400 and denied.value.json()["code"] == "invalid_path"
        with (
            pytest.raises(WebSocketDenialResponse) as failed,
            client.websocket_connect("/sandboxes/box/attach"),
        ):
            pass
        assert failed.value.json()["code"] == "etcd_unavailable"  # the plain path got as far as etcd
