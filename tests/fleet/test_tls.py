"""Mutual TLS between routers and nodes instead of the shared key: certificates made by
`agentkernel fleet certs`, a node that serves only HTTPS clients with a certificate from its CA, a
router that holds one; a router with a certificate from another CA is refused, with one clear error."""

from __future__ import annotations

import dataclasses
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli
from tests.fleet.conftest import (
    API_KEY,
    EtcdCluster,
    Server,
    auth,
    node_home,
    remove_all,
    spawn,
    wait_for,
    wipe,
)

pytestmark = pytest.mark.timeout(300)


def certs(directory: Path) -> Path:
    made = cli("fleet", "certs", str(directory), "--host", "127.0.0.1", "--host", "localhost")
    assert made.returncode == 0, made.stderr
    return directory


def context(directory: Path, side: str) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    tls.load_cert_chain(directory / f"{side}.pem", directory / f"{side}-key.pem")
    return tls


def tls_args(directory: Path, side: str) -> list[str]:
    return [
        "--tls-ca",
        str(directory / "ca.pem"),
        "--tls-cert",
        str(directory / f"{side}.pem"),
        "--tls-key",
        str(directory / f"{side}-key.pem"),
    ]


@pytest.fixture(scope="module")
def tls_fleet(
    etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path]]:
    """One node with mutual TLS and no node key (its sandboxes are made without booting)."""
    wipe(etcd_cluster)
    root = tmp_path_factory.mktemp("tls")
    fleet_ca = certs(root / "certs")
    home = node_home(root, "secure")
    env = {"AGENTKERNEL_HOME": str(home)}
    args = ["--node", "--etcd", etcd_cluster.flag, "--node-id", "secure", "--capacity", "4"]
    node = spawn("secure", [*args, *tls_args(fleet_ca, "node")], env, root, wait=False)
    node = dataclasses.replace(node, url=node.url.replace("http:", "https:"), home=home)

    def up() -> bool:
        assert node.proc.poll() is None, node.log.read_text()[-2000:]
        try:
            return httpx.get(f"{node.url}/health", verify=context(fleet_ca, "router"), timeout=2).is_success
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 60, "the TLS node to serve")
        yield node, root
    finally:
        node.stop()
        remove_all(home)
        wipe(etcd_cluster)


def router(etcd_cluster: EtcdCluster, root: Path, directory: Path, name: str) -> Server:
    env = {"AGENTKERNEL_API_KEY": API_KEY}
    return spawn(name, ["--fleet", "--etcd", etcd_cluster.flag, *tls_args(directory, "router")], env, root)


def test_a_router_with_the_fleets_certificate_places_and_proxies(
    tls_fleet: tuple[Server, Path], etcd_cluster: EtcdCluster
) -> None:
    _, root = tls_fleet
    good = router(etcd_cluster, root, root / "certs", "tls-router")
    try:
        wait_for(lambda: httpx.get(f"{good.url}/fleet/nodes", headers=auth()).json(), 20, "the node")
        made = httpx.post(
            f"{good.url}/sandboxes", json={"name": "sealed", "start": False}, headers=auth(), timeout=120
        )
        assert made.status_code == 201 and made.json()["node"] == "secure", made.text
        shown = httpx.get(f"{good.url}/sandboxes/sealed", headers=auth(), timeout=30)
        assert shown.status_code == 200 and shown.json()["status"] == "stopped"
        assert httpx.delete(f"{good.url}/sandboxes/sealed", headers=auth(), timeout=60).status_code == 204
    finally:
        good.stop()


def test_a_client_without_the_fleets_certificate_is_refused(
    tls_fleet: tuple[Server, Path], etcd_cluster: EtcdCluster
) -> None:
    node, root = tls_fleet
    trusting = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))  # no client certificate
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{node.url}/sandboxes", verify=trusting, timeout=5)
    stranger = certs(root / "other-ca")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{node.url}/sandboxes", verify=context(stranger, "router"), timeout=5)

    wrong = router(etcd_cluster, root, stranger, "wrong-router")
    try:
        answer = httpx.post(
            f"{wrong.url}/sandboxes", json={"name": "refused", "start": False}, headers=auth(), timeout=60
        )
        assert answer.status_code == 502, answer.text
        assert answer.json()["code"] == "node_auth_failed"
        assert "TLS handshake failed" in answer.json()["detail"] and "same CA" in answer.json()["detail"]
        listed = httpx.get(f"{wrong.url}/sandboxes", headers=auth(), timeout=30).json()
        assert "refused" not in {s["name"] for s in listed}  # its placement was given back
    finally:
        wrong.stop()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tls-ca", "/nonexistent"], "--tls-cert: --tls-ca, --tls-cert and --tls-key go together"),
        (
            ["--tls-ca", "/etc/hostname", "--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"],
            "not a PEM",
        ),
    ],
)
def test_bad_tls_options_are_one_line(args: list[str], says: str) -> None:
    result = cli("serve", "--fleet", "--etcd", "http://127.0.0.1:9", *args, env={"AGENTKERNEL_NODE_KEY": ""})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and says in lines[0], result.stderr


def test_a_nodes_certificate_is_refused_as_a_client(tls_fleet: tuple[Server, Path]) -> None:
    """Node certificates are for serving only: one node's cannot call another node as a router."""
    node, root = tls_fleet
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{node.url}/sandboxes", verify=context(root / "certs", "node"), timeout=5)
    assert httpx.get(f"{node.url}/health", verify=context(root / "certs", "router"), timeout=5).is_success


def test_certs_are_private_and_never_overwritten(tmp_path: Path) -> None:
    made = certs(tmp_path / "new" / "certs")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    for name in ("ca", "node", "router"):
        assert stat.S_IMODE((made / f"{name}-key.pem").stat().st_mode) == 0o600

    again = cli("fleet", "certs", str(made), "--host", "127.0.0.1")
    lines = again.stderr.decode().strip().splitlines()
    assert again.returncode == 1 and len(lines) == 1 and "already exists" in lines[0], again.stderr

    trap = tmp_path / "trap"
    trap.mkdir()
    target = tmp_path / "elsewhere"
    (trap / "router-key.pem").symlink_to(target)  # dangling: following it would make `target`
    followed = cli("fleet", "certs", str(trap), "--host", "127.0.0.1")
    assert followed.returncode == 1 and "router-key.pem already exists" in followed.stderr.decode()
    assert not target.exists() and not (trap / "ca-key.pem").exists()
