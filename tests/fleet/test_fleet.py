"""The fleet end to end: three real nodes, two routers, the three-member etcd cluster. The tests run in
order on one fleet (the last ones kill parts of it). Figures for docs/benchmarks.md are printed as
`fleet:` lines (run with -s to see them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import httpx2
import pytest
from mcp import Client as McpClient
from mcp.client.streamable_http import streamable_http_client

from agentkernel.client import ApiError, Client
from tests.conftest import cli
from tests.fleet.conftest import API_KEY, NODE_KEY, TTL, Fleet, Server, auth, live_nodes, start_node, wait_for

pytestmark = pytest.mark.timeout(300)


def sandboxes(router: Server) -> dict[str, dict[str, object]]:
    answer = httpx.get(f"{router.url}/sandboxes", headers=auth(), timeout=30)
    answer.raise_for_status()
    return {s["name"]: s for s in answer.json()}


def create(url: str, name: str, key: str = API_KEY, start: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/sandboxes", json={"name": name, "start": start}, headers=auth(key), timeout=120)


def test_placement_spreads_by_capacity(fleet: Fleet) -> None:
    """Six sandboxes through both routers over nodes of capacity 6, 3 and 3: the big node takes at least
    half, each other one some; both routers list all six with their node, as does `fleet status`."""
    r1, r2 = fleet.routers
    through_router = []
    for i in range(6):
        started = time.perf_counter()
        answer = create((r1, r2)[i % 2].url, f"spread-{i}")
        through_router.append(time.perf_counter() - started)
        assert answer.status_code == 201, answer.text
    for router in fleet.routers:
        listed = sandboxes(router)
        assert {f"spread-{i}" for i in range(6)} <= set(listed)
    per_node: dict[str, int] = {}
    for s in listed.values():
        per_node[str(s["node"])] = per_node.get(str(s["node"]), 0) + 1
    # By free share: the big node takes at least half (a tie between equal shares goes either way).
    assert sum(per_node.values()) == 6 and per_node["n1"] in (3, 4), per_node
    assert per_node["n2"] >= 1 and per_node["n3"] >= 1, per_node

    status = cli("fleet", "status", "--json", "--etcd", fleet.cluster.flag)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["per_node"] == per_node
    shown = cli("fleet", "nodes", "n1", "--json", "--etcd", fleet.cluster.flag)
    assert json.loads(shown.stdout)["placed"] == per_node["n1"] and json.loads(shown.stdout)["capacity"] == 6

    rate = placed_per_second(fleet, 6)
    direct = []
    node = fleet.nodes["n1"].url
    for i in range(3):
        started = time.perf_counter()
        assert create(node, f"direct-{i}", key=NODE_KEY).status_code == 201
        direct.append(time.perf_counter() - started)
        assert (
            httpx.delete(f"{node}/sandboxes/direct-{i}", headers=auth(NODE_KEY), timeout=60).status_code
            == 204
        )
    via, bare = sorted(through_router)[len(through_router) // 2], sorted(direct)[len(direct) // 2]
    print(
        f"\nfleet: create (no boot) median {via * 1000:.0f} ms via a router, "
        f"{bare * 1000:.0f} ms on a node directly: ratio {via / bare:.2f}; {rate:.1f} sandboxes/s "
        "created through two routers at once"
    )


def placed_per_second(fleet: Fleet, count: int) -> float:
    """Create `count` sandboxes (no boot) at once, half through each router; removed afterwards."""
    names = [f"rate-{i}" for i in range(count)]
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda i: create(fleet.routers[i % 2].url, names[i]), range(count)))
    elapsed = time.perf_counter() - started
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers]
    with ThreadPoolExecutor(count) as pool:
        gone = list(pool.map(lambda n: remove(fleet.routers[0], n), names))
    assert all(g.status_code == 204 for g in gone)
    return count / elapsed


def remove(router: Server, name: str) -> httpx.Response:
    return httpx.delete(f"{router.url}/sandboxes/{name}", headers=auth(), timeout=60)


def test_exec_attach_and_files_through_either_router(fleet: Fleet) -> None:
    r1, r2 = fleet.routers
    with Client(r1.url, api_key=API_KEY) as one, Client(r2.url, api_key=API_KEY) as two:
        box = one.create_sandbox("work")
        try:
            assert two.sandbox("work").exec(["echo", "hello"]).stdout == "hello\n"
            box.write_file("/tmp/note.txt", b"from router one")
            assert two.sandbox("work").read_file("/tmp/note.txt") == b"from router one"
            assert "note.txt" in {e.name for e in two.sandbox("work").list_files("/tmp")}
            chunks: list[str] = []
            result = two.sandbox("work").exec(["sh", "-c", "echo a; echo b >&2"], on_stdout=chunks.append)
            assert "".join(chunks) == "a\n" and result.stderr == "b\n"
            with two.sandbox("work").attach(["cat"], rows=10, cols=40) as term:
                term.send("typed\n")
                seen = b""
                for chunk in term:
                    seen += chunk
                    if b"typed" in seen:
                        break
                term.eof()
                assert term.wait() is not None
            assert b"typed" in seen
            assert one.run(["echo", "once"]).stdout == "once\n"
            handle = two.sandbox("work")
        finally:
            box.remove(force=True)
        with pytest.raises(ApiError) as gone:
            two.sandbox("work")
        assert gone.value.status == 404 and gone.value.code == "sandbox_not_found"
        with pytest.raises(ApiError) as refused:  # a WebSocket refused with the router's own problem
            handle.attach(["cat"])
        assert refused.value.status == 404 and refused.value.code == "sandbox_not_found"


def test_every_route_reaches_the_sandbox_through_either_router(fleet: Fleet) -> None:
    """Background commands, lifetime, pause and resume, snapshots and forks: routes the router has
    no line of its own for, forwarded by the name in the path. A fork lands on the snapshot's node."""
    r1, r2 = fleet.routers
    with Client(r1.url, api_key=API_KEY) as one, Client(r2.url, api_key=API_KEY) as two:
        origin = one.create_sandbox("origin")
        forks: list[str] = []
        try:
            holder = sandboxes(r1)["origin"]["node"]
            command = two.sandbox("origin").run(["sh", "-c", "read line; echo got $line"], background=True)
            command.send_stdin("ping\n")
            assert command.wait().exit_code == 0
            assert "got ping" in "".join(c.data for c in command.output())
            assert [c.id for c in one.sandbox("origin").list_commands()] == [command.id]
            assert two.sandbox("origin").set_timeout(600).status == "running"
            assert one.sandbox("origin").pause().status == "paused"
            assert two.sandbox("origin").resume().status == "running"

            snapshot = two.sandbox("origin").snapshot("origin-snap")
            assert snapshot.name == "origin-snap"
            # Forks go to the snapshot's node (only it has the files) until it is full, though the
            # others have room.
            with pytest.raises(ApiError) as full:
                for i in range(6):
                    forks.append((one, two)[i % 2].fork("origin-snap", f"fork-{i}").name)
                    assert sandboxes(r2)[forks[-1]]["node"] == holder
            assert forks and full.value.code == "fleet_full"
            assert "no node holding snapshot 'origin-snap' has room" in str(full.value)
            assert two.sandbox(forks[0]).exec(["echo", "forked"]).stdout == "forked\n"
            listed = {s.name for s in two.list_snapshots()}
            assert "origin-snap" in listed
            unknown = httpx.post(f"{r1.url}/snapshots/nowhere/fork", json={}, headers=auth(), timeout=30)
            assert unknown.status_code == 404 and unknown.json()["code"] == "snapshot_not_found"
        finally:
            for name in forks:
                one.sandbox(name).remove(force=True)
            origin.remove(force=True)
            with contextlib.suppress(ApiError):
                two.remove_snapshot("origin-snap")
        assert "origin-snap" not in {s.name for s in one.list_snapshots()}


def mcp_client(router: Server) -> McpClient:
    http = httpx2.AsyncClient(headers=auth(), timeout=httpx2.Timeout(30, read=300))
    return McpClient(streamable_http_client(f"{router.url}/mcp", http_client=http))


def test_mcp_through_either_router(fleet: Fleet) -> None:
    """The MCP tools at the router's /mcp (the official client): a sandbox an agent creates is placed
    like any other, its tools reach its node through either router, listings span every node."""
    r1, r2 = fleet.routers

    async def main() -> None:
        async with mcp_client(r1) as one, mcp_client(r2) as two:
            assert {"create_sandbox", "exec_in_sandbox"} <= {t.name for t in (await one.list_tools()).tools}
            made = await one.call_tool("create_sandbox", {"name": "agent-box"})
            assert not made.is_error, made.content
            node = sandboxes(r2)["agent-box"]["node"]
            ran = await two.call_tool("exec_in_sandbox", {"name": "agent-box", "command": "echo $((6 * 7))"})
            assert not ran.is_error and ran.structured_content["stdout"] == "42\n", ran.content
            listed = await two.call_tool("list_sandboxes")
            assert {s["name"]: s["node"] for s in listed.structured_content["sandboxes"]}["agent-box"] == node
            once = await one.call_tool("run_command", {"command": ["echo", "once"]})
            assert once.structured_content["stdout"] == "once\n", once.content
            gone = await two.call_tool("remove_sandbox", {"name": "agent-box", "force": True})
            assert not gone.is_error, gone.content
            missing = await one.call_tool("exec_in_sandbox", {"name": "agent-box", "command": "true"})
            assert missing.is_error and "no sandbox named 'agent-box'" in str(missing.content)

    asyncio.run(asyncio.wait_for(main(), 240))
    assert not [n for n in sandboxes(r1) if n == "agent-box" or n.startswith("run-")]  # all given back


def test_bad_input_is_one_clear_error(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    r1 = fleet.routers[0]
    unknown = httpx.get(f"{r1.url}/fleet/nodes/nowhere", headers=auth(), timeout=10)
    assert unknown.status_code == 404 and unknown.json()["code"] == "node_not_found"
    shown = cli("fleet", "nodes", "nowhere", "--etcd", fleet.cluster.flag)
    assert shown.returncode == 1
    assert shown.stderr.decode().strip() == (
        "agentkernel: error: no node named 'nowhere' is registered (see `agentkernel fleet nodes`)"
    )
    assert httpx.get(f"{r1.url}/sandboxes", timeout=10).status_code == 401  # the API key at the router
    missing = httpx.post(f"{r1.url}/sandboxes/nobody/exec", json={"command": ["true"]}, headers=auth())
    assert missing.status_code == 404 and missing.json()["code"] == "sandbox_not_found"

    # A node whose key differs from the routers': it registers, but refuses them, and says why.
    root = tmp_path_factory.mktemp("wrongkey")
    stray = start_node(root, fleet.cluster, "stray", 1, key="not-the-fleet-key")
    try:
        wait_for(lambda: "stray" in live_nodes(r1), 15, "the stray node to register")
        # Sandboxes until one is placed on the stray node (at the latest when the others are full).
        for i in range(20):
            answer = create(r1.url, f"fill-{i}")
            if answer.status_code != 201:
                break
        assert answer.status_code == 502, answer.text
        assert answer.json()["code"] == "node_auth_failed"
        assert "AGENTKERNEL_NODE_KEY must be the same" in answer.json()["detail"]
        assert f"fill-{i}" not in sandboxes(r1)  # its placement was given back
    finally:
        stray.stop()
        for name in [n for n in sandboxes(r1) if n.startswith("fill-")]:
            httpx.delete(f"{r1.url}/sandboxes/{name}", headers=auth(), timeout=60)


def test_a_killed_node_shows_lost_and_new_sandboxes_go_elsewhere(fleet: Fleet) -> None:
    r1, r2 = fleet.routers
    victim = fleet.nodes["n3"]
    before = {n: s["status"] for n, s in sandboxes(r1).items() if s["node"] == "n3"}
    mine = set(before)
    assert mine
    victim.sigkill()
    killed = time.monotonic()

    def all_lost() -> bool:
        listed = sandboxes(r2)
        return all(listed[n]["status"] == "lost" for n in mine)

    wait_for(all_lost, TTL + 5, "the killed node's sandboxes to show lost")
    elapsed = time.monotonic() - killed
    print(f"\nfleet: a SIGKILLed node's sandboxes showed lost after {elapsed:.1f} s (lease TTL {TTL} s)")
    listed = sandboxes(r1)
    one = listed[sorted(mine)[0]]
    assert one["node"] == "n3" and "lease in etcd expired" in str(one["reason"])
    assert all(s["status"] != "lost" for n, s in listed.items() if n not in mine)  # nothing else lost
    gone = httpx.post(f"{r1.url}/sandboxes/{sorted(mine)[0]}/start", headers=auth(), timeout=30)
    assert gone.status_code == 410 and gone.json()["code"] == "sandbox_lost"

    for i in range(2):
        answer = create((r1, r2)[i].url, f"after-{i}")
        assert answer.status_code == 201 and answer.json()["node"] in ("n1", "n2"), answer.text

    forgotten = sorted(mine)[-1]  # removing a lost sandbox forgets it
    assert httpx.delete(f"{r2.url}/sandboxes/{forgotten}", headers=auth(), timeout=30).status_code == 204
    assert forgotten not in sandboxes(r1)

    # The node comes back with its data dir: the sandboxes it still has return, the forgotten one too.
    fleet.nodes["n3"] = start_node(fleet.root, fleet.cluster, "n3", 3, home=victim.home)
    wait_for(lambda: {n: sandboxes(r1)[n]["status"] for n in mine} == before, 30, "n3's sandboxes back")


def test_a_killed_router_or_etcd_member_changes_nothing(fleet: Fleet) -> None:
    r1, r2 = fleet.routers
    r1.sigkill()
    assert create(r2.url, "after-router").status_code == 201
    member = fleet.cluster.members[0]  # the first URL every client tries
    fleet.cluster.kill(member)
    try:
        time.sleep(TTL + 1)  # the nodes renew their leases through the other members meanwhile
        assert live_nodes(r2) == {"n1", "n2", "n3"}
        answer = create(r2.url, "after-etcd")
        assert answer.status_code == 201, answer.text
        assert sandboxes(r2)["after-etcd"]["node"] == answer.json()["node"]
        assert httpx.delete(f"{r2.url}/sandboxes/after-etcd", headers=auth(), timeout=60).status_code == 204
        assert "after-etcd" not in sandboxes(r2)
    finally:
        fleet.cluster.start(member)
        fleet.cluster.wait_healthy()
