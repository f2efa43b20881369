"""Pulling from a real registry: docker-registry on a loopback port, fed by skopeo from a layout we make."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.images.pull import is_loopback, normalize, pull, registry_of
from tests.images.ext4_tools import cat, stat
from tests.images.oci_layouts import Layout, tagged, tree_layer

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="needs docker-registry and skopeo (apt-get install docker-registry skopeo)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry on 127.0.0.1 holding test/busybox:1, a busybox image made here."""
    work = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: {address}\n"
    )
    with (work / "registry.log").open("wb") as out:
        server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out, stderr=out)
    try:
        _wait_for(f"http://{address}/v2/")
        _push(_busybox_layout(work), f"{address}/test/busybox:1")
        yield address
    finally:
        server.terminate()
        server.wait(10)


def _wait_for(url: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _busybox_layout(work: Path) -> Path:
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    (tree / "bin/sh").symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("from the registry\n")
    layout = Layout(work / "layout")
    config = {"Env": ["PATH=/bin", "HELLO=1"], "WorkingDir": "/srv", "Cmd": ["/bin/sh"]}
    layout.save(tagged(layout.image(tree_layer(tree), config=config), "v1"))
    return layout.path


def _push(layout: Path, ref: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}"],
        check=True,
    )


def test_pull_builds_and_stores_the_image(registry: str, agent: Path, log: Path) -> None:
    image = pull(f"{registry}/test/busybox:1", agent, log=log)
    assert image.name == f"{registry}/test/busybox:1"
    assert image.source == f"oci:{registry}/test/busybox:1"
    assert image.config.env == ("PATH=/bin", "HELLO=1") and image.config.cmd == ("/bin/sh",)
    assert image.config.workdir == "/srv"
    assert cat(image.path, "/etc/motd") == b"from the registry\n"
    assert cat(image.path, "/sbin/agentkernel-agent") == agent.read_bytes()
    assert stat(image.path, "/bin/sh")["target"] == "busybox"
    assert store.verify(image.name) == image
    assert os.listdir(paths.tmp_dir()) == []


def test_pull_under_another_name(registry: str, agent: Path, log: Path) -> None:
    image = pull(f"{registry}/test/busybox:1", agent, log=log, name="bb")
    assert [i.name for i in store.list_images()] == ["bb"] and image.name == "bb"


def test_unknown_tag(registry: str, agent: Path, log: Path) -> None:
    with pytest.raises(AgentkernelError) as failure:
        pull(f"{registry}/test/busybox:nope", agent, log=log)
    assert str(failure.value) == (
        f"cannot pull {registry}/test/busybox:nope: "
        f"registry {registry} has no such image (unknown repository, tag or digest)"
    )
    assert os.listdir(paths.tmp_dir()) == [] and store.list_images() == []


def test_unreachable_registry(agent: Path, log: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(AgentkernelError) as failure:
        pull(f"{address}/test/busybox:1", agent, log=log)
    assert str(failure.value) == (
        f"cannot pull {address}/test/busybox:1: registry {address} is unreachable (connection refused)"
    )
    assert os.listdir(paths.tmp_dir()) == [] and store.list_images() == []


@pytest.mark.parametrize("ref", ["Upper/Case", "a::b", "", "x/-y", "a b", "--help"])
def test_bad_reference(ref: str, agent: Path) -> None:
    with pytest.raises(AgentkernelError, match="not a valid image reference"):
        pull(ref, agent)


def test_reference_parsing() -> None:
    assert normalize("python") == "python:latest"
    assert normalize("localhost:5000/a/b") == "localhost:5000/a/b:latest"
    assert normalize("a/b:1.2") == "a/b:1.2"
    assert normalize("a/b@sha256:" + "0" * 64) == "a/b@sha256:" + "0" * 64
    assert registry_of("team/app:1") == "docker.io"
    assert registry_of("registry.example.com/app") == "registry.example.com"
    assert [is_loopback(r) for r in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "127.9.9.9")] == [
        True,
        True,
        True,
        True,
    ]
    assert [is_loopback(r) for r in ("docker.io", "10.0.0.1:5000", "localhost.example.com")] == [
        False,
        False,
        False,
    ]
