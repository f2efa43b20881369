"""The fleet with each node in a network namespace of its own, as on separate hosts: a bridge in the
host's namespace, a veth pair per node, the etcd cluster and the routers reached over the bridge.
Thirty sandboxes through two routers spread by capacity (created without booting: the point is
placement), then exec, attach and files on booted ones through either router. Needs root."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agentkernel.client import Client
from tests.api.server import free_port
from tests.fleet.conftest import (
    API_KEY,
    NODE_KEY,
    TTL,
    EtcdCluster,
    EtcdMember,
    Server,
    auth,
    clear,
    live_nodes,
    need_etcd,
    node_home,
    remove_all,
    spawn,
    wait_for,
    wait_up,
)
from tests.vm.conftest import Artifacts, artifacts  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
]

CAPACITIES = {"n1": 16, "n2": 8, "n3": 8}
COUNT = 30
SUBNET = "10.231.{}.{}"


def ip(*args: str, ns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


@dataclass
class Network:
    """A bridge on the host and a namespace per node, each with one address on the bridge."""

    tag: str
    octet: int
    bridge: str
    namespaces: dict[str, str]

    @property
    def host(self) -> str:
        return SUBNET.format(self.octet, 1)

    def address(self, node: str) -> str:
        return SUBNET.format(self.octet, 10 + sorted(self.namespaces).index(node))


@contextlib.contextmanager
def network(nodes: list[str]) -> Iterator[Network]:
    tag = secrets.token_hex(3)
    net = Network(tag, 100 + int(tag, 16) % 100, f"akf{tag}", {n: f"akf-{tag}-{n}" for n in nodes})
    try:
        ip("link", "add", net.bridge, "type", "bridge")
        ip("addr", "add", f"{net.host}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i, (node, ns) in enumerate(sorted(net.namespaces.items())):
            outside = f"akf{tag}{i}"
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", outside, "master", net.bridge, "up")
            ip("addr", "add", f"{net.address(node)}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
        yield net
    finally:
        for ns in net.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth end along
        subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)


def etcd_on(net: Network, root: Path) -> EtcdCluster:
    """Three etcd members on the bridge's host address, so nodes in other namespaces reach them."""
    members = [
        EtcdMember(
            f"m{i}",
            f"http://{net.host}:{free_port()}",
            f"http://{net.host}:{free_port()}",
            root / f"m{i}",
            root / f"m{i}.log",
        )
        for i in range(3)
    ]
    return EtcdCluster(members)


def start_node(net: Network, cluster: EtcdCluster, root: Path, name: str) -> Server:
    """`serve --node` inside the node's namespace, listening on its own address only."""
    home = node_home(root, name)
    port, address = free_port(), net.address(name)
    env = {"AGENTKERNEL_HOME": str(home), "AGENTKERNEL_NODE_KEY": NODE_KEY}
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGENTKERNEL_")} | env
    log = root / f"{name}.log"
    args = ["--node", "--etcd", cluster.flag, "--node-id", name, "--capacity", str(CAPACITIES[name])]
    args += ["--lease-ttl", str(TTL), "--host", address, "--port", str(port)]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", net.namespaces[name], sys.executable, "-m", "agentkernel", "serve", *args],
        cwd=root,
        env=full,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(name, f"http://{address}:{port}", proc, log, home=home, env=env)


@dataclass
class NsFleet:
    net: Network
    cluster: EtcdCluster
    nodes: dict[str, Server]
    routers: list[Server]


@pytest.fixture(scope="module")
def ns_fleet(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Iterator[NsFleet]:  # noqa: F811
    need_etcd()
    root = tmp_path_factory.mktemp("nsfleet")
    with network(sorted(CAPACITIES)) as net:
        cluster = etcd_on(net, root)
        nodes: dict[str, Server] = {}
        routers: list[Server] = []
        try:
            for member in cluster.members:
                cluster.start(member)
            cluster.wait_healthy()
            nodes = {name: start_node(net, cluster, root, name) for name in sorted(CAPACITIES)}
            env = {"AGENTKERNEL_NODE_KEY": NODE_KEY, "AGENTKERNEL_API_KEY": API_KEY}
            routers = [
                spawn(f"r{i}", ["--fleet", "--etcd", cluster.flag], env, root, wait=False) for i in (1, 2)
            ]
            for server in [*nodes.values(), *routers]:
                wait_up(server)
            wait_for(lambda: live_nodes(routers[0]) == set(CAPACITIES), 20, "the nodes to register")
            yield NsFleet(net, cluster, nodes, routers)
        finally:
            for server in nodes.values():
                clear(server)
            for server in [*routers, *nodes.values()]:
                server.stop()
            for server in nodes.values():
                if server.home is not None:
                    remove_all(server.home)
            for member in cluster.members:
                if member.proc is not None:
                    cluster.kill(member)


def test_nodes_are_apart(ns_fleet: NsFleet) -> None:
    """A node listens on its own namespace's address: reachable over the bridge, not on loopback."""
    node = ns_fleet.nodes["n1"]
    port = httpx.URL(node.url).port
    assert httpx.get(f"{node.url}/health", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_thirty_sandboxes_spread_by_capacity(ns_fleet: NsFleet) -> None:
    names = [f"many-{i}" for i in range(COUNT)]

    def create(i: int) -> httpx.Response:
        router = ns_fleet.routers[i % 2].url
        body = {"name": names[i], "start": False, "memory_mb": 256}
        return httpx.post(f"{router}/sandboxes", json=body, headers=auth(), timeout=300)

    started = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(create, range(COUNT)))
    elapsed = time.perf_counter() - started
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers if a.status_code != 201]
    placed = Counter(a.json()["node"] for a in answers)
    print(
        f"\nfleet: {COUNT} sandboxes (no boot) through two routers onto three namespaced nodes in "
        f"{elapsed:.1f} s ({COUNT / elapsed:.1f}/s), spread {dict(sorted(placed.items()))}"
    )
    for router in ns_fleet.routers:
        listed = httpx.get(f"{router.url}/sandboxes", headers=auth(), timeout=60).json()
        assert Counter(s["node"] for s in listed if s["name"] in names) == placed
    assert all(placed[n] <= CAPACITIES[n] for n in CAPACITIES), placed
    # By free share: the node of twice the capacity takes about twice as many.
    assert placed["n1"] >= 13 and placed["n2"] >= 6 and placed["n3"] >= 6, placed
    with ThreadPoolExecutor(6) as pool:
        gone = list(
            pool.map(
                lambda n: httpx.delete(
                    f"{ns_fleet.routers[1].url}/sandboxes/{n}", headers=auth(), timeout=120
                ),
                names,
            )
        )
    assert all(g.status_code == 204 for g in gone)


def test_exec_attach_and_files_through_either_router(ns_fleet: NsFleet) -> None:
    r1, r2 = ns_fleet.routers
    with Client(r1.url, api_key=API_KEY) as one, Client(r2.url, api_key=API_KEY) as two:
        box = one.create_sandbox("apart")
        try:
            assert two.sandbox("apart").exec(["echo", "hello"]).stdout == "hello\n"
            two.sandbox("apart").write_file("/tmp/note", b"written via r2")
            assert one.sandbox("apart").read_file("/tmp/note") == b"written via r2"
            with one.sandbox("apart").attach(["cat"], rows=10, cols=40) as term:
                term.send("typed\n")
                seen = b""
                for chunk in term:
                    seen += chunk
                    if b"typed" in seen:
                        break
                term.eof()
            assert b"typed" in seen
        finally:
            box.remove(force=True)
