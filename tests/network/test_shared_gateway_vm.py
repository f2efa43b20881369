"""The shared egress gateway in front of real sandboxes: one process for all, each sandbox with its
own policy and audit, and recovery after the process is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from agentkernel.network import launcher
from agentkernel.sandbox import state
from agentkernel.service import audit
from tests.conftest import HOST_PAGE, cli
from tests.network.test_shared_gateway import host_processes, wait_gone
from tests.vm.test_secrets import SECRET, UPSTREAM, Servers, write_config

pytestmark = pytest.mark.vm

ALLOW_HOST = '[security.domains]\nallow = ["127.0.0.1"]\n'


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def fetch(name: str, port: int) -> str:
    """What the sandbox's wget gets from the host server, through its gateway (or its error)."""
    script = f"timeout 20 wget -q -O - http://127.0.0.1:{port}/ 2>&1; echo"
    return cli("exec", name, "--", "sh", "-c", script).stdout.decode()


def create(name: str, config: str | None) -> None:
    """Create a sandbox with the policy of `config` (agentkernel.toml when it is created)."""
    toml = Path("agentkernel.toml")
    toml.unlink(missing_ok=True)
    if config is not None:
        toml.write_text(config)
    ok("create", name)
    toml.unlink(missing_ok=True)


def network_decisions(name: str) -> set[bool]:
    return {bool(e["allowed"]) for e in audit.entries(name) if e["event"] == "network"}


def kill_gateway() -> None:
    status = launcher.status()
    assert status is not None
    os.kill(status["pid"], signal.SIGKILL)
    assert wait_gone(status["pid"])


def test_sandboxes_with_different_policies_share_one_gateway(cli_home: Path, host_server: int) -> None:
    create("open", ALLOW_HOST)
    create("shut", None)
    ok("start", "open")
    ok("start", "shut")
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["open", "shut"]
    assert host_processes() == [status["pid"]]
    assert HOST_PAGE in fetch("open", host_server)
    assert "403 Forbidden" in fetch("shut", host_server)
    assert network_decisions("open") == {True}
    assert network_decisions("shut") == {False}
    ok("rm", "-f", "open")
    ok("rm", "-f", "shut")
    assert wait_gone(status["pid"])  # the last one withdrawn: the process is gone
    assert launcher.status() is None


def test_gateway_killed_is_restarted_by_the_next_start(cli_home: Path, host_server: int) -> None:
    """Running sandboxes are registered again from their records; one stopped meanwhile is not."""
    create("keep", ALLOW_HOST)
    create("gone", ALLOW_HOST)
    create("next", None)
    ok("start", "keep")
    ok("start", "gone")
    assert HOST_PAGE in fetch("keep", host_server)
    kill_gateway()
    assert HOST_PAGE not in fetch("keep", host_server)  # no way out while it is down
    ok("stop", "gone")
    ok("start", "next")
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["keep", "next"]
    assert host_processes() == [status["pid"]]
    assert HOST_PAGE in fetch("keep", host_server)
    recovered = [e for e in audit.entries() if e["event"] == "gateway_recovery"]
    assert [(e["sandbox"], e["ok"]) for e in recovered] == [("keep", True)]
    kill_vmm_until_only("keep", ["next"])  # a recovered sandbox is watched too


def test_recovered_sandbox_keeps_its_secret_and_ca(cli_home: Path, servers: Servers) -> None:
    """After a restart the gateway serves the sandbox with the CA its guest already trusts, and the
    secret's value read anew from its source."""
    write_config(servers)
    env = {"AK_TEST_SECRET": SECRET}
    ok("create", "sec", "--image", "python", "--secret", "API_KEY", env=env)
    Path("agentkernel.toml").unlink()
    create("other", None)
    ok("start", "sec", env=env)
    url = f"https://{UPSTREAM}:{servers.https_port}/v1"
    call = (
        "import os, urllib.request as u;"
        f"r = u.Request('{url}', headers={{'x-api-key': os.environ['API_KEY']}});"
        "print(u.urlopen(r, timeout=60).status)"
    )
    assert ok("exec", "sec", "--", "python3", "-c", call).strip() == "200"
    kill_gateway()
    servers.received.clear()
    ok("start", "other", env=env)
    assert ok("exec", "sec", "--", "python3", "-c", call).strip() == "200"
    assert len(servers.received) == 1 and SECRET.encode() in servers.received[0]
    ok("rm", "-f", "sec")
    ok("rm", "-f", "other")
    assert launcher.status() is None
    assert not any(json.dumps(e).count(SECRET) for e in audit.entries())


def kill_vmm_until_only(name: str, left: list[str]) -> None:
    """SIGKILL sandbox `name`'s VMM (no stop) and wait until the gateway serves only `left`."""
    pid = state.get(name).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (status := launcher.status()) is not None and status["sandboxes"] != left:
        assert time.monotonic() < deadline, f"still registered: {status}"
        time.sleep(0.2)


def test_a_sandbox_whose_vmm_is_killed_is_withdrawn(cli_home: Path, host_server: int) -> None:
    """Its VMM killed without a stop (its run directory left in place), the sandbox is withdrawn by
    the gateway itself: its secrets and CA leave memory with it."""
    create("dies", ALLOW_HOST)
    create("lives", ALLOW_HOST)
    ok("start", "dies")
    ok("start", "lives")
    kill_vmm_until_only("dies", ["lives"])
    assert HOST_PAGE in fetch("lives", host_server)
    ok("rm", "-f", "dies")
    ok("rm", "-f", "lives")
