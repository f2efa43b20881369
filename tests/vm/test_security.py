"""Attacks from inside real sandboxes, per profile: each fails as the profile says; allowed paths work."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from agentkernel.service import sandboxes
from tests.conftest import HOST_PAGE, cli

pytestmark = pytest.mark.vm


def sandbox_sh(script: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = cli("run", *args, "--", "sh", "-c", script, env=env)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def audit_entries() -> list[dict[str, object]]:
    return [json.loads(line) for line in cli("audit", "--json").stdout.splitlines()]


PROBE = (
    "timeout 10 wget -q -O - http://{target}/ 2>&1; echo; "  # through the gateway (proxy variables set)
    "http_proxy= timeout 5 wget -q -O - http://{direct}/ 2>&1; echo; "  # straight out, around it
    "ls /sys/class/net | tr '\\n' ' '"
)


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_host_loopback_and_metadata_are_unreachable(cli_home: Path, host_server: int, profile: str) -> None:
    for target, direct in (
        (f"127.0.0.1:{host_server}", f"10.0.2.2:{host_server}"),
        ("169.254.169.254", "169.254.169.254"),
    ):
        code, out, _ = sandbox_sh(PROBE.format(target=target, direct=direct), "--profile", profile)
        assert code == 0
        assert HOST_PAGE not in out
        links = out.strip().splitlines()[-1].split()
        if profile == "restrictive":
            assert links == ["lo"]  # no network device at all
        else:
            assert "403 Forbidden" in out  # the gateway refused, and logged it
    if profile != "restrictive":
        refused = [e for e in audit_entries() if e["event"] == "network" and not e["allowed"]]
        assert {str(e["reason"]).split(" ")[0] for e in refused} == {"host-local"}


def test_explicitly_allowed_server_is_reachable_and_blocked_domain_refused(
    cli_home: Path, host_server: int
) -> None:
    Path("agentkernel.toml").write_text(
        '[security.domains]\nallow = ["127.0.0.1"]\nblock = ["blocked.example"]\n'
    )
    code, out, _ = sandbox_sh(
        # 127.0.0.1 is the guest's own loopback unless asked of the gateway, which resolves on the host
        f"no_proxy= wget -q -O - http://127.0.0.1:{host_server}/; echo; "
        "wget -q -O - http://blocked.example/ 2>&1; echo done"
    )
    assert code == 0
    assert HOST_PAGE in out
    assert "403 Forbidden" in out
    decisions = {(e["host"], e["allowed"]) for e in audit_entries() if e["event"] == "network"}
    assert ("127.0.0.1", True) in decisions and ("blocked.example", False) in decisions


def test_root_filesystem_writes(cli_home: Path) -> None:
    code, out, _ = sandbox_sh(
        "echo x > /written && echo wrote; echo y > /tmp/t && echo tmp-ok", "--profile", "restrictive"
    )
    assert "wrote" not in out and "tmp-ok" in out
    code, out, _ = sandbox_sh("echo x > /written && echo wrote", "--profile", "moderate")
    assert code == 0 and "wrote" in out


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_host_environment_does_not_leak(cli_home: Path, profile: str) -> None:
    env = {"AK_HOST_SECRET": "s3cr3t-value", "LANG": "C.UTF-8"}
    code, out, _ = sandbox_sh("env", "--profile", profile, env=env)
    assert code == 0
    assert "s3cr3t-value" not in out
    assert ("LANG=C.UTF-8" in out) is (profile == "permissive")  # permissive passes the allowlist only


def test_mounted_directory_and_nothing_beyond_it(cli_home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "in.txt").write_text("from the host\n")
    (tmp_path / "outside.txt").write_text("not for the sandbox\n")
    script = (
        "cat /workspace/in.txt; echo from the guest > /workspace/out.txt; "
        "cat /workspace/../outside.txt 2>&1; ls -a /workspace; find / -name outside.txt 2>/dev/null | head -1"
    )
    code, out, _ = sandbox_sh(script, "--dir", str(project))
    assert code == 0
    assert "from the host" in out
    assert (project / "out.txt").read_text() == "from the guest\n"
    assert "not for the sandbox" not in out
    assert "/outside.txt" not in out.splitlines()[-1]


def test_memory_hog_is_killed_and_the_sandbox_survives(cli_home: Path) -> None:
    assert cli("create", "--memory", "256", "hog").returncode == 0
    assert cli("start", "hog").returncode == 0
    # One buffer of 230 MiB, filled at once: more than the guest's memory limit, less than its RAM (so
    # the allocation itself succeeds). A shell growing a string thrashed the page cache for minutes.
    hog = cli("exec", "hog", "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=230M", "count=1")
    assert hog.returncode == 128 + 9, hog.stderr  # SIGKILL, from the out-of-memory killer
    assert cli("exec", "hog", "--", "echo", "alive").stdout == b"alive\n"


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_after_a_fork_bomb_the_sandbox_answers(cli_home: Path, profile: str) -> None:
    """A fork bomb sent to the background outlives the command that started it (what a command
    leaves running lives on), yet the next command answers at once, under every profile: each
    command's cgroup gets an equal CPU share, and the bomb stays within the profile's process limit.
    A `kill -9 -1` from the next command ends it."""
    assert cli("create", "--profile", profile, "--no-network", "bomb").returncode == 0
    assert cli("start", "bomb").returncode == 0
    bomb = cli("exec", "bomb", "--", "sh", "-c", "f() { f | f & }; f", timeout=60)
    assert bomb.returncode == 0, bomb.stderr

    async def echo() -> float:
        started = time.monotonic()
        async with sandboxes.session("bomb") as conn:  # what `exec` does, less the CLI's start-up
            assert (await conn.run(["echo", "alive"])).stdout == b"alive\n"
        return time.monotonic() - started

    took = asyncio.run(asyncio.wait_for(echo(), 60))
    print(f"{profile}: `echo alive` answered {took:.2f} s after the fork bomb")
    assert took < 2.0
    current = "/sys/fs/cgroup/sandbox/pids.current"
    assert int(cli("exec", "bomb", "--", "cat", current).stdout) > 10  # the bomb is still there
    assert cli("exec", "bomb", "--", "kill", "-9", "-1").returncode == 0  # all but itself and the agent
    end = time.monotonic() + 20  # the killed processes exit and are reaped
    while (left := cli("exec", "bomb", "--", "cat", current).stdout) != b"1\n" and time.monotonic() < end:
        time.sleep(0.5)
    assert left == b"1\n"  # the cat


def test_lifetime_stops_the_sandbox(cli_home: Path) -> None:
    assert cli("create", "--lifetime", "3", "brief").returncode == 0
    assert cli("start", "brief").returncode == 0
    import time

    time.sleep(6)
    listed = {s["name"]: s for s in json.loads(cli("list", "--json").stdout)}
    assert listed["brief"]["status"] == "stopped"
    assert listed["brief"]["stop_reason"] == "lifetime exceeded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--profile", "paranoid"), "unknown security profile"),
        (("--dir", "/no/such/dir"), "no such directory"),
        (("--lifetime", "0"), "--lifetime"),
    ],
)
def test_bad_security_input(cli_home: Path, args: tuple[str, ...], message: str) -> None:
    result = cli("run", *args, "--", "true")
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert json.loads(cli("list", "--json").stdout) == []


def test_malformed_domain_pattern(cli_home: Path) -> None:
    Path("agentkernel.toml").write_text('[security.domains]\nallow = ["not a domain"]\n')
    result = cli("run", "--", "true")
    assert result.returncode != 0
    assert "security.domains.allow[0]" in result.stderr.decode()


def test_audit_records_lifecycle_exec_and_files(cli_home: Path, tmp_path: Path) -> None:
    assert cli("create", "aud").returncode == 0
    assert cli("start", "aud").returncode == 0
    assert cli("exec", "aud", "--", "sh", "-c", "exit 2").returncode == 2
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    assert cli("cp", str(src), "aud:/tmp/f.bin").returncode == 0
    assert cli("rm", "-f", "aud").returncode == 0
    events = [
        (e["event"], e.get("exit_code"), e.get("size")) for e in audit_entries() if e["sandbox"] == "aud"
    ]
    assert [e[0] for e in events] == ["create", "start", "exec", "file_write", "remove"]
    assert events[2][1] == 2 and events[3][2] == 1000
    text = cli("audit", "--sandbox", "aud").stdout.decode()
    assert "exit_code=2" in text


def test_dns_is_answered_by_the_gateway(cli_home: Path) -> None:
    Path("agentkernel.toml").write_text('[security.domains]\nblock = ["blocked.example"]\n')
    script = (
        "import socket\n"
        "try:\n    socket.getaddrinfo('blocked.example', 80)\n"
        "except OSError:\n    print('refused')"
    )
    result = cli("run", "--image", "python", "--", "python3", "-c", script)
    assert result.returncode == 0 and result.stdout == b"refused\n"
    dns = [e for e in audit_entries() if e["event"] == "network" and e["method"] == "DNS"]
    assert dns and all(e["host"] == "blocked.example" and not e["allowed"] for e in dns)
    assert "blocked by" in str(dns[0]["reason"])
