"""The pool daemon keeps every image `run` would choose, one template and a target count per kind, and
refills several sandboxes at once within the host's bounds; a client that dies while it is handed a
sandbox leaks nothing. On the fake backend, with the daemon's request server and worker in threads of
this process (as `daemon.run` has them)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel import hostinfo
from agentkernel.client import Client
from agentkernel.pool import daemon, kinds, wire
from agentkernel.service import sandboxes, snapshots
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import SandboxService
from tests.conftest import cli
from tests.fast.conftest import serving


def kinds_in(project: Path, *images: str, size: int | None = None) -> list[kinds.Kind]:
    """What `daemon start --image IMAGE... --size N` in `project` keeps."""

    async def go() -> kinds.Plan:
        async with SandboxService(project) as service:
            return await kinds.plan(service, SandboxFlags(), images=images, size=size)

    return asyncio.run(go()).kinds


def plan(project: Path, *images: str, size: int | None = None) -> list[tuple[str, int]]:
    return [(kind.image, kind.size) for kind in kinds_in(project, *images, size=size)]


def pool_of(project: Path, *images: str, size: int | None = None, parallel: int | None = None) -> daemon.Pool:
    found = kinds_in(project, *images, size=size)
    return daemon.Pool(found, max_age=600, health_interval=60, parallel=parallel)


def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def full(pool: daemon.Pool) -> bool:
    return all(len(p["ready"]) >= p["size"] for p in pool.status()["pools"])


def test_the_pool_keeps_every_image_run_would_choose(tmp_path: Path) -> None:
    # The fake data dir has `base` and `python`: in a bare directory `run` chooses base (python for
    # `run -- python ...`); in a Python project python, whatever the command.
    assert plan(tmp_path) == [("base", 2), ("python", 2)]
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert plan(tmp_path) == [("python", 2)]
    assert plan(tmp_path, "base=3", "python", size=1) == [("base", 3), ("python", 1)]

    (tmp_path / "agentkernel.toml").write_text('[pool]\nimages = ["base", "python:3.12"]\nsize = 4\n')
    assert plan(tmp_path) == [("base", 4), ("python", 4)]
    (tmp_path / "agentkernel.toml").write_text("[pool]\nsize = 3\n[pool.sizes]\nbase = 0\npython = 5\n")
    assert plan(tmp_path) == [("python", 5)]  # base = 0: not kept
    assert plan(tmp_path, size=1) == [("python", 1)]  # the flag wins over the file
    (tmp_path / "agentkernel.toml").write_text('[sandbox]\nbase_image = "base"\n')
    assert plan(tmp_path) == [("base", 2)]  # `run` here always uses it


@pytest.mark.parametrize(
    ("args", "toml", "message"),
    [
        (["--image", "base=lots"], "", "the count after '=' must be 0 to 200"),
        (["--image", "base=0"], "", "the pool would keep nothing"),
        (["--image", "no-such-image"], "", "no-such-image"),
        ([], "[pool]\nsize = 0\n", "pool.size: must be at least 1"),
        ([], "[pool]\nimagez = []\n", "pool.imagez: unknown key"),
        ([], "[resources]\ndisk_mb = 4096\n", "cannot be pooled"),
    ],
)
def test_daemon_start_refuses_bad_kinds_in_one_line(
    tmp_path: Path, args: list[str], toml: str, message: str
) -> None:
    if toml:
        (tmp_path / "agentkernel.toml").write_text(toml)
    result = cli("daemon", "start", *args, timeout=60)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], lines
    assert not wire.pid_file().exists()


def test_run_in_a_python_project_takes_a_pooled_python_sandbox(tmp_path: Path, api: str) -> None:
    # The API server's project is tmp_path: a Python project, where `run` chooses `python`.
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    pool = pool_of(tmp_path)
    pool.slots += pool_of(tmp_path, "base").slots  # a second kind
    with serving(pool):
        until(lambda: full(pool), "both kinds to fill")
        python, base = pool.status()["pools"]
        assert (python["image"], base["image"]) == ("python", "base")
        templates = {s.name for s in snapshots.list_snapshots()}
        assert templates == {daemon.TEMPLATE_PREFIX + python["key"], daemon.TEMPLATE_PREFIX + base["key"]}

        with Client(api) as ak:
            assert ak.run(["true"]).exit_code == 0
            assert ak.run(["echo", "hi"], image="base").stdout == "hi\n"
        python, base = pool.status()["pools"]
        assert (python["handed_out"], base["handed_out"], pool.status()["misses"]) == (1, 1, 0)
        until(lambda: full(pool), "both kinds to refill")


def test_refills_run_side_by_side_within_the_bound(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, "base", size=8, parallel=3)
    with serving(pool):
        until(lambda: full(pool), "the pool to fill")
    assert pool.status()["peak_making"] == 3  # several at once, never more than the bound


def test_refills_wait_for_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_of(tmp_path, "base", parallel=4)
    kind = pool.slots[0].kind
    memory = {"free": daemon.MEMORY_RESERVE + (kind.memory_mb << 20) // 2}  # not enough for one
    monkeypatch.setattr(hostinfo, "available_memory", lambda: memory["free"])
    with serving(pool):
        until(lambda: "waiting for free memory" in (pool.status()["pools"][0]["last_error"] or ""), "a wait")
        assert pool.status()["pools"][0]["ready"] == [] and pool.status()["peak_making"] == 0
        memory["free"] = daemon.MEMORY_RESERVE + (kind.memory_mb << 20) * 3 // 2  # room for one at a time
        pool.wake.set()
        until(lambda: full(pool), "the pool to fill")
    assert pool.status()["peak_making"] == 1


def test_a_client_killed_while_it_is_handed_a_sandbox_leaks_nothing(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, "base")
    with serving(pool):
        until(lambda: full(pool), "the pool to fill")
        # A client asks for a sandbox and is killed before it reads the reply.
        key = pool.slots[0].key
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(wire.socket_path()), str(key)], stdout=subprocess.PIPE
        )
        assert client.stdout is not None and client.stdout.readline() == b"sent\n"
        until(lambda: pool.status()["pools"][0]["handed_out"] == 1, "the hand-out")
        taken = [r.name for r in sandboxes.list_sandboxes()]  # no longer pooled: the client's
        assert len(taken) == 1
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        until(lambda: sandboxes.list_sandboxes() == [], "the reaper to remove it", timeout=30)
        until(lambda: full(pool), "the pool to refill")
        assert taken[0] not in [r.name for r in sandboxes.list_sandboxes(pooled=True)]


CLIENT = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"op": "acquire", "key": "%s"}\\n' % sys.argv[2].encode())
print("sent", flush=True)
time.sleep(600)
"""
