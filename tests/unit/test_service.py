"""The one sandbox service: its resolver (flags, then agentkernel.toml, then the defaults), its typed
record and that record's codec, and the one view every face shows.

The resolver and codec tests need no VM (the built images are shared, read-only); the faces are the
real ones: the CLI in a subprocess, the HTTP API on loopback, the MCP server over stdio.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS, PROFILES, load_config
from agentkernel.errors import InvalidRequestError, UnknownImageError
from agentkernel.sandbox import state
from agentkernel.sandbox.state import Mount, SandboxRecord
from agentkernel.sandbox.view import SandboxView
from agentkernel.service.request import SandboxFlags, SandboxRequest, resolve
from tests.api.server import api_server
from tests.conftest import cli
from tests.vm.conftest import artifacts, cli_home  # noqa: F401  (fixtures)

TOML = """\
[sandbox]
base_image = "python"
backend = "container"

[resources]
vcpus = 3
memory_mb = 768
disk_mb = 2048

[security]
profile = "restrictive"
network = true
read_only = false
mount_cwd = true
"""


def resolved(project: Path, flags: SandboxFlags, **kwargs: Any) -> SandboxRequest:
    config, path = load_config(search_from=project)
    return resolve(flags, config, project_dir=project, config_path=path, **kwargs)


@pytest.fixture
def project(cli_home: Path, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    directory = tmp_path / "project"
    directory.mkdir()
    yield directory


def test_defaults_when_neither_flags_nor_toml_say(project: Path) -> None:
    request = resolved(project, SandboxFlags())
    assert (request.image, request.backend) == ("base", None)
    assert (request.vcpus, request.memory_mb, request.disk_mb) == (DEFAULT_VCPUS, DEFAULT_MEMORY_MB, None)
    assert request.policy == PROFILES["moderate"]
    assert (request.mount_dir, request.lifetime, request.secrets) == (None, None, ())
    assert (dict(request.env), dict(request.labels)) == ({}, {})
    assert resolved(project, SandboxFlags(), defaults=(2, 2048)).vcpus == 2  # an agent's defaults


def test_the_toml_beats_the_defaults(project: Path) -> None:
    (project / "agentkernel.toml").write_text(TOML)
    request = resolved(project, SandboxFlags(), defaults=(2, 2048))
    assert (request.image, request.image_reason, request.backend) == (
        "python",
        "agentkernel.toml",
        "container",
    )
    assert (request.vcpus, request.memory_mb, request.disk_mb) == (3, 768, 2048)
    policy = request.policy
    assert (policy.profile, policy.network, policy.read_only, policy.mount_cwd) == (
        "restrictive", True, False, True
    )  # fmt: skip
    assert request.mount_dir == project  # the project is shared when the policy mounts it


def test_a_flag_beats_the_toml_for_every_field(project: Path, tmp_path: Path) -> None:
    (project / "agentkernel.toml").write_text(TOML)
    shared = tmp_path / "shared"
    shared.mkdir()
    flags = SandboxFlags(
        image="base",
        backend="qemu",
        vcpus=2,
        memory_mb=256,
        profile="permissive",
        network=False,
        read_only=True,
        mount_cwd=False,
        directory=shared,
        lifetime=60,
        env={"A": "1"},
        labels={"team": "x"},
    )
    request = resolved(project, flags)
    assert (request.image, request.image_reason, request.backend) == ("base", "--image", "qemu")
    assert (request.vcpus, request.memory_mb, request.lifetime) == (2, 256, 60)
    policy = request.policy
    assert (policy.profile, policy.network, policy.read_only, policy.mount_cwd) == (
        "permissive", False, True, False
    )  # fmt: skip
    assert request.mount_dir == shared
    assert (dict(request.env), dict(request.labels)) == ({"A": "1"}, {"team": "x"})
    assert not request.poolable


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (SandboxFlags(vcpus=0), "vcpus"),
        (SandboxFlags(vcpus=33), "vcpus"),
        (SandboxFlags(memory_mb=63), "memory_mb"),
        (SandboxFlags(lifetime=0.5), "lifetime"),
        (SandboxFlags(profile="lax"), "profile"),
        (SandboxFlags(directory=Path("/nonexistent/dir")), "directory"),
        (SandboxFlags(env={"A=B": "x"}), "env"),
        (SandboxFlags(labels={"bad key": "x"}), "labels"),
        (SandboxFlags(labels={"k": "line\nbreak"}), "labels"),
        (SandboxFlags(secrets=("API_KEY",), profile="restrictive"), "secrets"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    project: Path, flags: SandboxFlags, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if flags.secrets:
        monkeypatch.setenv("TEST_API_KEY", "sk-test-value")
        secret = '[secrets.API_KEY]\nhosts = ["api.example.com"]\nfrom_env = "TEST_API_KEY"\n'
        (project / "agentkernel.toml").write_text(secret)
    with pytest.raises(InvalidRequestError) as caught:
        resolved(project, flags)
    assert caught.value.field == field


def test_an_unknown_image_is_refused_naming_the_field(project: Path) -> None:
    with pytest.raises(UnknownImageError) as caught:
        resolved(project, SandboxFlags(image="no-such-image"))
    assert (caught.value.field, caught.value.code) == ("image", "unknown_image")


# -- the typed record and its codec ---------------------------------------------------------------


def full_record() -> SandboxRecord:
    return SandboxRecord(
        name="box", backend="qemu", image="base", image_digest="sha256:ab", vcpus=2, memory_mb=512,
        profile="moderate", status="running", pid=1234, rundir="/run/x", created_at="2026-01-01T00:00:00Z",
        kernel="/k/vmlinux", image_path="/i/base.ext4", image_format="qcow2",
        policy=replace(PROFILES["moderate"], network=False),
        mounts=(Mount("/home/u/p", "/workspace", False),),
        lifetime_s=60.0, deadline=1.8e9, stop_reason=None, pool="key", owner={"pid": 1, "start": 2},
        starter={"pid": 3, "start": 4}, secrets=({"name": "API_KEY", "hosts": ["a.example"]},),
        restore_from="/snap", snapshot="snap", env={"A": "1"}, labels={"team": "x"},
    )  # fmt: skip


def test_the_codec_round_trips_every_field() -> None:
    record = full_record()
    row = state.to_row(record)
    assert set(row) == {*state.COLUMNS, "extra"}
    assert state.from_row(row) == record
    mirrored = {**row, "extra": json.loads(row["extra"])}  # records/<name>.json keeps an object
    assert state.from_row(json.loads(json.dumps(mirrored))) == record


def test_an_old_row_loads_and_unknown_keys_are_ignored() -> None:
    old_policy = json.loads(json.dumps(asdict(PROFILES["restrictive"])))
    del old_policy["max_procs"]  # written before policies carried the process limit
    row = {
        "name": "old", "backend": "qemu", "image": "base", "image_digest": "", "vcpus": 1, "memory_mb": 256,
        "profile": "restrictive", "status": "stopped", "pid": None, "rundir": "/r", "created_at": "",
        "extra": json.dumps({
            "kernel": "/k", "image_path": "/i", "policy": old_policy, "owner": None,
            "mounts": [{"host": "/h", "guest": "/workspace", "read_only": True}],
            "some_future_key": {"x": 1},
        }),
    }  # fmt: skip
    record = state.from_row(row)
    assert record.policy == PROFILES["restrictive"]
    assert record.mounts == (Mount("/h", "/workspace", True),)
    assert (record.image_format, record.env, record.labels, record.owner) == ("raw", {}, {}, None)


def test_a_record_survives_the_database_and_an_update_keeps_the_rest(isolated_home: Path) -> None:
    record = full_record()
    state.insert(record)
    assert state.get("box") == record
    state.update("box", status="stopped", pid=None, stop_reason="stopped by hand", owner=None)
    changed = state.get("box")
    assert (changed.status, changed.pid, changed.stop_reason, changed.owner) == (
        "stopped", None, "stopped by hand", None
    )  # fmt: skip
    assert replace(changed, status="running", pid=1234, stop_reason=None, owner=record.owner) == record
    copies, problems = state.mirrored_records()
    assert (copies, problems) == ([changed], [])
    with pytest.raises(TypeError, match="nonsense"):
        state.update("box", nonsense=1)


def test_a_database_from_before_the_typed_record_still_loads(isolated_home: Path) -> None:
    """A row an older release wrote (its extra keys, one it no longer has) is read, not refused."""
    state.all_records()  # makes the database and its table
    with sqlite3.connect(state.db_path()) as db:
        db.execute(
            "INSERT INTO sandboxes VALUES "
            "('legacy', 'qemu', 'base', '', 1, 512, 'moderate', 'created', NULL, '/r', '', ?)",
            (json.dumps({"kernel": "/k", "image_path": "/i", "lifetime_s": None, "retired_key": 1}),),
        )
    (record,) = state.all_records()
    assert (record.name, record.status, record.kernel, record.policy) == ("legacy", "created", "/k", None)
    assert record.effective_policy == PROFILES["moderate"]


def test_the_view_shows_no_host_paths() -> None:
    shown = SandboxView.of(full_record()).to_json()
    text = json.dumps(shown)
    for host_only in ("/run/x", "/k/vmlinux", "/i/base.ext4", "/home/u/p", "/snap", '"start"'):
        assert host_only not in text
    assert shown["mounts"] == [{"guest": "/workspace", "read_only": False}]
    assert (shown["secrets"], shown["env"], shown["labels"]) == (["API_KEY"], ["A"], {"team": "x"})


# -- every face reaches the same resolver, and shows the same view ----------------------------------


def mcp_call(cwd: Path, tool: str, arguments: dict[str, Any]) -> Any:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentkernel", "mcp-server"],
        env={"AGENTKERNEL_HOME": os.environ["AGENTKERNEL_HOME"]},
        cwd=cwd,
    )

    async def main() -> Any:
        async with Client(server) as client:
            return await client.call_tool(tool, arguments)

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.vm
def test_every_face_refuses_zero_vcpus_naming_the_field(project: Path, tmp_path: Path) -> None:
    detail = "must be between 1 and 32 (got 0)"
    result = cli("create", "box", "--vcpus", "0")
    assert result.returncode == 1 and f"--vcpus: {detail}" in result.stderr.decode(), result.stderr
    with api_server(tmp_path) as url:
        answer = httpx.post(f"{url}/sandboxes", json={"vcpus": 0, "start": False})
    problem = answer.json()
    assert (answer.status_code, problem["field"], problem["code"]) == (422, "vcpus", "invalid_field")
    assert detail in problem["detail"]
    called = mcp_call(project, "create_sandbox", {"vcpus": 0, "start": False})
    assert called.is_error and detail in called.content[0].text
    assert cli("list", "--json").stdout.strip() == b"[]"  # nothing was made by any of them


@pytest.mark.vm
def test_the_cli_the_api_and_mcp_show_one_view(project: Path, tmp_path: Path) -> None:
    made = cli("create", "box", "--no-network", "-e", "A=1", "--label", "team=x", "--label", "tier=2")
    assert made.returncode == 0, made.stderr
    assert cli("create", "other", "--no-network").returncode == 0
    listed = json.loads(cli("list", "--json", "--filter", "label=team=x").stdout)
    with api_server(tmp_path) as url:
        served = httpx.get(f"{url}/sandboxes", params={"label": "team=x"}).json()
    called = mcp_call(project, "list_sandboxes", {"labels": {"team": "x"}})
    assert not called.is_error, called.content
    from_mcp = called.structured_content["sandboxes"]
    assert (
        [s["name"] for s in listed] == [s["name"] for s in served] == [s["name"] for s in from_mcp] == ["box"]
    )
    assert set(listed[0]) == set(served[0]) == set(from_mcp[0]) == set(SandboxView.model_fields)
    assert listed[0] == served[0] == from_mcp[0]
    assert (listed[0]["labels"], listed[0]["env"]) == ({"team": "x", "tier": "2"}, ["A"])
    bad = cli("list", "--filter", "team=x")
    assert bad.returncode == 1 and "--filter" in bad.stderr.decode()


@pytest.mark.vm
def test_the_sdk_creates_with_env_and_labels_and_filters_by_label(project: Path, tmp_path: Path) -> None:
    from agentkernel.client import AsyncClient
    from agentkernel.client import Client as ApiClient

    env, labels = {"GREETING": "hi", "A": "1"}, {"team": "x"}
    with (
        api_server(tmp_path) as url,
        ApiClient(url) as sdk,
        sdk.create_sandbox("envbox", env=env, labels=labels) as box,
    ):
        assert box.exec(["sh", "-c", 'echo "$GREETING $A"']).stdout == "hi 1\n"
        assert box.exec(["sh", "-c", "echo $A"], env={"A": "2"}).stdout == "2\n"  # the command's wins
        sdk.create_sandbox("plain", start=False)

        async def listed() -> list[str]:
            async with AsyncClient(url) as client:
                return [s.name for s in await client.list_sandboxes(labels={"team": "x"})]

        assert asyncio.run(listed()) == ["envbox"]
        (info,) = sdk.list_sandboxes(labels={"team": "x"})
        assert (info.labels, info.env) == ({"team": "x"}, ("A", "GREETING"))
        assert {s.name for s in sdk.list_sandboxes()} == {"envbox", "plain"}
        assert sdk.list_sandboxes(labels={"team": "y"}) == []


@pytest.mark.vm
def test_a_boot_cancelled_while_its_vmm_is_spawned_kills_the_vmm(project: Path) -> None:
    """The VMM is spawned in a worker thread, which a cancellation cannot stop: the cancellation is
    delivered once it has been spawned, and the VMM is killed, not left running unrecorded."""
    from agentkernel.service.service import SandboxService

    async def body() -> None:
        async with SandboxService(project) as service:
            request = await service.resolve(SandboxFlags(network=False))
            await service.create(request, name="cancelled", start=False)
            booting = asyncio.create_task(service.start("cancelled"))
            while state.get("cancelled").status != "starting":  # its thread is spawning the VMM now
                await asyncio.sleep(0.005)
            booting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await booting
            record = await service.get("cancelled")
            assert (record.status, record.pid) == ("failed", None)
            rundir = str((await service.vm_spec("cancelled")).rundir).encode()
            alive = [p for p in Path("/proc").glob("[0-9]*") if rundir in _cmdline(p)]
            assert alive == [], "a VMM of the cancelled boot is still running"
            await service.remove("cancelled")

    asyncio.run(body())


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
