"""deploy/kubernetes/: every object valid against the Kubernetes schema (kubernetes-validate, strict:
no unknown fields), the privileges nodes get, and probes that hit endpoints the servers really serve."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from tests.conftest import REPO
from tests.fleet.conftest import EtcdCluster

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (dev)"
)

MANIFESTS = REPO / "deploy" / "kubernetes"
VERSIONS = ("1.30.0", "1.34.0")
"""The oldest Kubernetes the manifests support, and a recent one."""


def objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def workload(kind: str, component: str) -> dict[str, Any]:
    for obj in objects():
        if obj["kind"] == kind and obj["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            return obj
    raise AssertionError(f"no {kind} for {component} in {MANIFESTS}")


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from obj["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid(version: str) -> None:
    found = objects()
    kinds = {o["kind"] for o in found}
    assert {"Namespace", "StatefulSet", "DaemonSet", "Deployment", "Service"} <= kinds
    for obj in found:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validation_can_fail() -> None:
    """A misspelt field or a wrong type in the node DaemonSet is refused: the check above is real."""
    node = workload("DaemonSet", "node")
    misspelt = copy.deepcopy(node)
    misspelt["spec"]["template"]["spec"]["nodeSelectr"] = {"agentkernel.dev/kvm": "true"}
    wrong_type = copy.deepcopy(node)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_nodes_run_on_kvm_hosts_with_kvm_and_no_more_privileges() -> None:
    node = workload("DaemonSet", "node")
    spec = node["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"agentkernel.dev/kvm": "true"}
    assert spec["automountServiceAccountToken"] is False
    (container,) = containers(node)
    assert container["args"][:2] == ["serve", "--node"]
    assert container["resources"]["limits"] == {"squat.ai/kvm": "1"}  # /dev/kvm, and no memory limit
    for c in [container, *spec["initContainers"]]:
        security = c["securityContext"]
        assert security.get("privileged") is not True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data["hostPath"]["path"] == "/var/lib/agentkernel"
    env = {e["name"]: e for e in container["env"]}
    assert env["AGENTKERNEL_NODE_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "agentkernel-keys"
    assert "value" not in env["AGENTKERNEL_NODE_KEY"]  # no secret in a manifest


def probes(obj: dict[str, Any]) -> dict[str, str]:
    (container,) = containers(obj)
    return {kind: container[kind]["httpGet"]["path"] for kind in ("readinessProbe", "livenessProbe")}


def test_probes_hit_real_health_endpoints(
    etcd_cluster: EtcdCluster, tmp_path: Path, isolated_home: Path
) -> None:
    """The paths the probes use answer 200 without the API key on the real apps (a probe has no key)."""
    from agentkernel.api.app import create_app
    from agentkernel.fleet.router import create_app as create_router

    assert probes(workload("StatefulSet", "etcd")) == {
        "readinessProbe": "/health",
        "livenessProbe": "/health",
    }

    node = create_app(project_dir=tmp_path, api_key="node-key")
    with TestClient(node, base_url="http://127.0.0.1") as client:
        for path in probes(workload("DaemonSet", "node")).values():
            assert client.get(path).status_code == 200, path
        assert client.get("/sandboxes").status_code == 401

    router = create_router(etcd=etcd_cluster.urls, node_key="node-key", api_key="api-key")
    with TestClient(router, base_url="http://127.0.0.1") as client:
        for path in probes(workload("Deployment", "router")).values():
            assert client.get(path).status_code == 200, path
        assert client.get("/sandboxes").status_code == 401

    cut_off = create_router(etcd=["http://127.0.0.1:9"], node_key="node-key", api_key="api-key")
    with TestClient(cut_off, base_url="http://127.0.0.1") as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["code"] == "etcd_unavailable"
        assert client.get("/health").status_code == 200  # alive: not restarted for etcd's outage


def test_every_image_is_pinned() -> None:
    """Every image by an exact version (x.y.z), never a moving tag such as latest or a bare major."""
    for obj in objects():
        if "template" not in obj.get("spec", {}):
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            image: str = container["image"]
            tag = image.split("@")[0].rpartition(":")[2]
            assert re.fullmatch(r"\d+\.\d+\.\d+(-\d+)?", tag), f"{image} is not pinned to an exact version"
