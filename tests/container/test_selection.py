"""Which backend the real CLI and the service give a sandbox on this host (no KVM, QEMU installed):
a VM whenever one can run, and a container only when asked for, said on one line of stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import hostinfo, paths
from agentkernel.artifacts import kernel
from agentkernel.backends import registry
from agentkernel.backends.container import backend as container
from agentkernel.errors import EngineUnavailable
from agentkernel.service import sandboxes
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import SandboxService
from tests.conftest import cli

WARNING = f"agentkernel: {hostinfo.isolation_warning('container')}"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir of its own that shares the built kernel and images; the current directory is a
    project of its own (no agentkernel.toml above it: .git stops the search)."""
    if kernel.current() is None:
        pytest.fail("no guest kernel: run `agentkernel setup` first (install.sh does)")
    if not registry.info("qemu").probe().available:
        pytest.skip("qemu-system-x86_64 is not installed")
    real = paths.data_dir()
    home = tmp_path / "home"
    home.mkdir()
    for shared in ("cache", "images"):
        (home / shared).symlink_to(real / shared)
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
    monkeypatch.chdir(project)
    yield project
    result = cli("list", "--json")
    if result.returncode == 0:
        for sandbox in json.loads(result.stdout):
            cli("rm", "-f", sandbox["name"])


@pytest.fixture
def engine() -> container.Engine:
    try:
        return container.find_engine()
    except EngineUnavailable as exc:
        pytest.skip(f"no container engine works here: {exc}")


def run(*args: str) -> tuple[str, str]:
    result = cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode(), result.stderr.decode()


def backend_of(name: str) -> str:
    listed = {s["name"]: s for s in json.loads(run("list", "--json")[0])}
    return str(listed[name]["backend"])


@pytest.mark.vm
@pytest.mark.parametrize(
    "flags", [("--no-network",), ("--profile", "restrictive")], ids=["no-network", "restrictive"]
)
def test_without_network_it_is_still_a_vm(
    home: Path, engine: container.Engine, flags: tuple[str, ...]
) -> None:
    """With a working container engine here, a sandbox without network still boots QEMU (under TCG)."""
    out, err = run("run", "--no-pool", "--keep", "--name", "novm", *flags, "--", "uname", "-r")
    assert out.strip() and out.strip() != os.uname().release  # the guest's kernel, not the host's
    assert "container" not in err
    assert backend_of("novm") == "qemu"


@pytest.mark.vm
def test_asked_for_a_container_it_says_so_once(home: Path, engine: container.Engine) -> None:
    out, err = run(
        "run", "--no-pool", "--backend", "container", "--profile", "restrictive", "--", "uname", "-r"
    )
    assert out.strip() == os.uname().release  # the host's kernel: that is what a container is
    assert err.splitlines() == [WARNING]


@pytest.mark.vm
def test_the_project_file_can_ask_for_a_container(home: Path, engine: container.Engine) -> None:
    (home / "agentkernel.toml").write_text('[sandbox]\nbackend = "container"\n')
    out, err = run("run", "--no-pool", "--profile", "restrictive", "--", "echo", "hi")
    assert (out, err.splitlines()) == ("hi\n", [WARNING])
    out, err = run("create", "box", "--profile", "restrictive")
    assert (out, err.splitlines()) == ("box\n", [WARNING])
    out, err = run("start", "box")
    assert (out, err.splitlines()) == ("box\n", [WARNING])
    assert backend_of("box") == "container"
    # A flag still wins over the file, and a VM says nothing.
    out, err = run("create", "vm", "--backend", "qemu", "--profile", "restrictive")
    assert (out, err, backend_of("vm")) == ("vm\n", "", "qemu")


def test_a_bad_backend_is_one_line(home: Path) -> None:
    result = cli("run", "--backend", "lxc", "--", "true")
    assert result.returncode != 0
    assert result.stderr.decode().splitlines() == [
        "agentkernel: error: unknown backend 'lxc': use firecracker, qemu, container"
    ]
    (home / "agentkernel.toml").write_text('[sandbox]\nbackend = "lxc"\n')
    result = cli("run", "--", "true")
    assert result.returncode != 0
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("agentkernel: error: agentkernel.toml: sandbox.backend: ")


@pytest.mark.vm
def test_the_service_logs_a_container(
    home: Path, engine: container.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The API and the MCP server go through the service: a container is logged, a VM is not."""
    (home / "agentkernel.toml").write_text('[sandbox]\nbackend = "container"\n')
    flags = SandboxFlags(image="base", profile="restrictive")

    async def body() -> None:
        async with SandboxService(home) as service:
            request = await service.resolve(flags)
            with caplog.at_level(logging.WARNING, logger="agentkernel.service"):
                record = await service.create(request, name="svcbox", start=False)
        assert record.backend == "container"
        assert [r.getMessage() for r in caplog.records] == [
            f"sandbox svcbox: {hostinfo.isolation_warning('container')}"
        ]

    asyncio.run(body())
    sandboxes.remove("svcbox", force=True)
