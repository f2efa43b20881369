"""A fleet on loopback from real parts: a three-member etcd cluster (Debian's etcd-server), nodes and
routers as `agentkernel serve --node` / `serve --fleet` subprocesses, each node with a data dir of its
own (sharing the built kernel and images)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from agentkernel import paths
from agentkernel.fleet.etcd import prefix_end
from tests.api.server import free_port
from tests.conftest import cli
from tests.vm.conftest import Artifacts, artifacts  # noqa: F401  (fixture)

ETCD = shutil.which("etcd")
NODE_KEY = "fleet-test-node-key"
API_KEY = "fleet-test-api-key"
TTL = 3
T = TypeVar("T")


def need_etcd() -> str:
    if ETCD is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server, or scripts/install-system-deps.sh)")
    return ETCD


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class EtcdMember:
    name: str
    client: str
    peer: str
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class EtcdCluster:
    members: list[EtcdMember]

    @property
    def urls(self) -> list[str]:
        return [m.client for m in self.members]

    @property
    def flag(self) -> str:
        return ",".join(self.urls)

    def start(self, member: EtcdMember) -> None:
        flags = {
            "name": member.name,
            "data-dir": str(member.data),
            "listen-client-urls": member.client,
            "advertise-client-urls": member.client,
            "listen-peer-urls": member.peer,
            "initial-advertise-peer-urls": member.peer,
            "initial-cluster": ",".join(f"{m.name}={m.peer}" for m in self.members),
            "initial-cluster-state": "new",
            "initial-cluster-token": "agentkernel-fleet-test",
            "heartbeat-interval": "100",
            "election-timeout": "1000",
        }
        args = [a for k, v in flags.items() for a in (f"--{k}", v)]
        member.proc = subprocess.Popen(
            [need_etcd(), *args], stdout=member.log.open("ab"), stderr=subprocess.STDOUT
        )

    def kill(self, member: EtcdMember) -> None:
        assert member.proc is not None
        member.proc.kill()
        member.proc.wait()
        member.proc = None

    def healthy(self, member: EtcdMember) -> bool:
        try:
            return httpx.get(f"{member.client}/health", timeout=1).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def wait_healthy(self) -> None:
        for m in self.members:
            if m.proc is not None:
                wait_for(
                    lambda m=m: self.healthy(m), 30, f"etcd member {m.name} ({m.log.read_text()[-500:]})"
                )


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    need_etcd()
    root = tmp_path_factory.mktemp("etcd")
    members = [
        EtcdMember(
            f"m{i}",
            f"http://127.0.0.1:{free_port()}",
            f"http://127.0.0.1:{free_port()}",
            root / f"m{i}",
            root / f"m{i}.log",
        )
        for i in range(3)
    ]
    cluster = EtcdCluster(members)
    for m in members:
        cluster.start(m)
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        for m in members:
            if m.proc is not None:
                cluster.kill(m)


@dataclass
class Server:
    """An `agentkernel serve` subprocess in a session of its own."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    home: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def sigkill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.sigkill()


def node_home(root: Path, name: str) -> Path:
    """A data dir of its own that shares the built kernel, agent and images."""
    real = paths.data_dir()
    home = root / name
    home.mkdir()
    for shared in ("cache", "images"):
        (home / shared).symlink_to(real / shared)
    return home


def spawn(name: str, args: list[str], env: dict[str, str], cwd: Path, *, wait: bool = True) -> Server:
    port = free_port()
    log = cwd / f"{name}.log"
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGENTKERNEL_")} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "serve", "--port", str(port), *args],
        cwd=cwd,
        env=full,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(name, f"http://127.0.0.1:{port}", proc, log, env=env)
    if wait:
        wait_up(server)
    return server


def wait_up(server: Server) -> None:
    def up() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"{server.name} exited: {server.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{server.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, f"{server.name} to serve")


def start_node(
    root: Path,
    cluster: EtcdCluster,
    name: str,
    capacity: int,
    *,
    key: str = NODE_KEY,
    home: Path | None = None,
    wait: bool = True,
) -> Server:
    home = home or node_home(root, name)
    env = {"AGENTKERNEL_HOME": str(home), "AGENTKERNEL_NODE_KEY": key}
    args = ["--node", "--etcd", cluster.flag, "--node-id", name, "--capacity", str(capacity)]
    server = spawn(name, [*args, "--lease-ttl", str(TTL)], env, root, wait=wait)
    server.home = home
    return server


def start_router(root: Path, cluster: EtcdCluster, name: str, *, wait: bool = True) -> Server:
    env = {"AGENTKERNEL_NODE_KEY": NODE_KEY, "AGENTKERNEL_API_KEY": API_KEY}
    return spawn(name, ["--fleet", "--etcd", cluster.flag], env, root, wait=wait)


def remove_all(home: Path) -> None:
    """Whatever a node left (after it stopped): its sandboxes are removed with the real CLI."""
    env = {"AGENTKERNEL_HOME": str(home)}
    listed = cli("list", "--json", env=env)
    if listed.returncode == 0:
        for sandbox in json.loads(listed.stdout):
            cli("rm", "-f", sandbox["name"], env=env)


def clear(node: Server) -> None:
    with contextlib.suppress(httpx.HTTPError):
        for sandbox in httpx.get(f"{node.url}/sandboxes", headers=auth(NODE_KEY), timeout=30).json():
            httpx.delete(
                f"{node.url}/sandboxes/{sandbox['name']}?force=true", headers=auth(NODE_KEY), timeout=60
            )


def live_nodes(router: Server) -> set[str]:
    answer = httpx.get(f"{router.url}/fleet/nodes", headers=auth(), timeout=10)
    answer.raise_for_status()
    return {n["id"] for n in answer.json()}


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Fleet:
    cluster: EtcdCluster
    nodes: dict[str, Server]
    routers: list[Server]
    root: Path


def wipe(cluster: EtcdCluster) -> None:
    """Forget every fleet key, so one test module's fleet does not see another's."""
    prefix = b"/agentkernel/fleet/"
    body = {
        "key": base64.b64encode(prefix).decode(),
        "range_end": base64.b64encode(prefix_end(prefix)).decode(),
    }
    httpx.post(f"{cluster.urls[0]}/v3/kv/deleterange", json=body, timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def fleet(
    etcd_cluster: EtcdCluster,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Artifacts,  # noqa: F811
) -> Iterator[Fleet]:
    """Three nodes (capacities 6, 3 and 3 sandboxes) and two routers."""
    wipe(etcd_cluster)
    root = tmp_path_factory.mktemp("fleet")
    nodes: dict[str, Server] = {}
    routers: list[Server] = []
    try:
        for name, capacity in (("n1", 6), ("n2", 3), ("n3", 3)):  # started together: each takes seconds
            nodes[name] = start_node(root, etcd_cluster, name, capacity, wait=False)
        routers = [start_router(root, etcd_cluster, f"r{i}", wait=False) for i in (1, 2)]
        for server in [*nodes.values(), *routers]:
            wait_up(server)
        wait_for(lambda: live_nodes(routers[0]) >= set(nodes), 15, "the nodes to register")
        yield Fleet(etcd_cluster, nodes, routers, root)
    finally:
        for server in nodes.values():  # through the API while the nodes run: quicker than the CLI
            clear(server)
        for server in [*routers, *nodes.values()]:
            server.stop()
        for server in nodes.values():
            if server.home is not None:
                remove_all(server.home)
