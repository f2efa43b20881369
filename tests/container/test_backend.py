"""The container backend with the real engine: life cycle, and the hardening seen from inside."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel.backends.base import Mount
from agentkernel.backends.container import rootfs
from agentkernel.backends.container.backend import GUEST_RUNDIR, SOCKET, container_name
from agentkernel.errors import AgentkernelError
from agentkernel.network.policy import EgressRules
from agentkernel.protocol.connection import Connection
from tests.container.conftest import Sandbox, run_async

MakeSandbox = Callable[..., Sandbox]

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_KILL, CAP_SETGID, CAP_SETUID = 0, 1, 3, 5, 6, 7
AGENT_CAPS = 1 << CAP_KILL | 1 << CAP_SETGID | 1 << CAP_SETUID
FILE_CAPS = 1 << CAP_CHOWN | 1 << CAP_DAC_OVERRIDE | 1 << CAP_FOWNER


async def status_fields(conn: Connection, uid: int | None = None) -> dict[str, str]:
    done = await conn.run(["cat", "/proc/self/status"], uid=uid, gid=uid)
    pairs = (line.split(":", 1) for line in done.stdout.decode().splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def test_life_cycle(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("life")

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            assert "agentkernel" in conn.agent_info
            done = await conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (done.stdout, done.stderr, done.status.exit_code) == (b"out\n", b"err\n", 3)
            assert (await conn.run(["cat", "/proc/1/cmdline"])).stdout == b"/sbin/agentkernel-agent\x00"
            assert (await conn.run(["hostname"])).stdout == b"life\n"
            await conn.run(["sh", "-c", "echo kept > /root/note"])
            await conn.shutdown()
        for _ in range(250):
            if not box.backend.is_alive(box.spec, box.pid):
                break
            await asyncio.sleep(0.02)
        assert not box.backend.is_alive(box.spec, box.pid)
        box.backend.cleanup(box.spec, keep_disk=True)  # what `stop` does
        # Started again, the sandbox still has what it wrote: its layer outlives a stop.
        box.start()
        async with box.connected() as conn:
            assert (await conn.run(["cat", "/root/note"])).stdout == b"kept\n"
        box.backend.kill(box.spec, box.pid)
        assert not box.backend.is_alive(box.spec, box.pid)

    run_async(body())
    box.backend.cleanup(box.spec, keep_disk=False)
    assert box.backend.engine.run("inspect", container_name(box.spec)).returncode != 0
    assert not box.spec.workdir.exists() and not box.spec.rundir.exists()


def test_several_clients_at_once(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("clients")

    async def body() -> None:
        box.start()
        conns = [await box.connect() for _ in range(4)]
        try:
            outs = await asyncio.gather(*(c.run(["echo", str(i)]) for i, c in enumerate(conns)))
            assert [o.stdout for o in outs] == [f"{i}\n".encode() for i in range(4)]
        finally:
            for conn in conns:
                await conn.close()

    run_async(body())


def test_is_alive_rejects_other_pids(make_sandbox: MakeSandbox) -> None:
    one, two = make_sandbox("one"), make_sandbox("two")
    pid_one, pid_two = one.start(), two.start()
    assert one.backend.is_alive(one.spec, pid_one)
    assert not one.backend.is_alive(one.spec, pid_two)  # another sandbox's agent
    assert not one.backend.is_alive(one.spec, 1)


@pytest.mark.parametrize(
    ("profile", "caps"),
    [
        ("moderate", AGENT_CAPS | FILE_CAPS),
        ("permissive", AGENT_CAPS | FILE_CAPS),
        ("restrictive", AGENT_CAPS),
    ],
)
def test_capabilities_no_new_privs_seccomp(make_sandbox: MakeSandbox, profile: str, caps: int) -> None:
    box = make_sandbox(f"caps-{profile}", profile=profile)

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            root = await status_fields(conn)
            assert int(root["CapEff"], 16) == caps
            assert int(root["CapBnd"], 16) == caps
            assert root["NoNewPrivs"] == "1"
            assert root["Seccomp"] == "2"
            user = await status_fields(conn, uid=1000)
            assert (user["Uid"].split()[0], int(user["CapEff"], 16)) == ("1000", 0)
            # Beyond the capabilities, the filter: namespaces only in permissive (nested sandboxes).
            nested = await conn.run(["busybox", "unshare", "-U", "true"])
            assert (nested.status.exit_code == 0) == (profile == "permissive"), nested

    run_async(body())


def test_read_only_root_and_writable_tmp(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("ro", profile="restrictive", read_only=True)

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            root = await conn.run(["sh", "-c", "echo x > /x"])
            assert root.status.exit_code != 0 and b"Read-only file system" in root.stderr
            tmp = await conn.run(["sh", "-c", "echo x > /tmp/x && echo x > /run/x && cat /tmp/x /run/x"])
            assert tmp.stdout == b"x\nx\n"

    run_async(body())


def test_writes_stay_in_the_sandboxes_own_layer(make_sandbox: MakeSandbox) -> None:
    one, two = make_sandbox("cow1"), make_sandbox("cow2")
    tree = rootfs.ensure_tree(one.spec.image, shift=one.backend.engine.userns or (0, 0))
    before = rootfs.tree_digest(tree)

    async def body() -> None:
        one.start()
        two.start()
        async with one.connected() as a, two.connected() as b:
            await a.run(["sh", "-c", "echo one > /etc/passwd && rm /bin/ls && mkdir /new"])
            assert (await a.run(["cat", "/etc/passwd"])).stdout == b"one\n"
            seen = await b.run(["sh", "-c", "cat /etc/passwd; ls -d /bin/ls /new"])
            assert b"one" not in seen.stdout and b"/bin/ls" in seen.stdout and b"/new" not in seen.stdout

    run_async(body())
    assert rootfs.tree_digest(tree) == before


def test_fork_bomb_meets_the_pids_limit(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("bomb", profile="restrictive")  # pids limit 256

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            bomb = await conn.run(["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 5"], timeout=8)
            assert b"Resource temporarily unavailable" in bomb.stderr, bomb.stderr[-300:]
            assert await conn.ping(timeout=30) < 30
            assert (await conn.run(["echo", "alive"])).stdout == b"alive\n"

    run_async(body())


def test_memory_limit_kills_the_hog_not_the_agent(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("hog", memory_mb=64)

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            hog = await conn.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=160M", "count=1"])
            assert hog.status.signal == signal.SIGKILL
            assert await conn.ping() < 10

    run_async(body())


def test_no_network_but_lo(make_sandbox: MakeSandbox) -> None:
    box = make_sandbox("nonet")

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            links = await conn.run(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"])
            assert links.stdout.split() == [b"lo"]
            out = await conn.run(["busybox", "wget", "-T", "3", "-q", "-O-", "http://1.1.1.1/"])
            assert out.status.exit_code != 0

    run_async(body())


def test_mounts_from_the_host(make_sandbox: MakeSandbox, tmp_path: Path) -> None:
    shared = tmp_path / "project"
    shared.mkdir()
    (shared / "README").write_text("hello\n")
    mounts = (Mount(shared, "/workspace", read_only=False), Mount(tmp_path, "/mnt", read_only=True))
    box = make_sandbox("mounts", mounts=mounts)
    if box.backend.engine.userns:  # the project of the user the container's root is on the host
        os.chown(shared, *box.backend.engine.userns)

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            assert (await conn.run(["cat", "/workspace/README"])).stdout == b"hello\n"
            await conn.run(["sh", "-c", "echo made > /workspace/out"])
            denied = await conn.run(["sh", "-c", "echo x > /mnt/x"])
            assert denied.status.exit_code != 0

    run_async(body())
    assert (shared / "out").read_text() == "made\n"


def test_network_is_refused_until_it_is_supported(make_sandbox: MakeSandbox) -> None:
    with pytest.raises(AgentkernelError, match="no network"):
        make_sandbox("net", egress=EgressRules())


def test_root_inside_is_not_root_outside(make_sandbox: MakeSandbox, tmp_path: Path) -> None:
    """The container's root is uid 0 only in its own user namespace: on the host its processes and
    the files it makes in a shared directory belong to an unprivileged uid."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # writable by whichever uid the container's root is
    os.chmod(tmp_path, 0o755)
    (tmp_path / "host-only").write_text("secret\n")
    os.chmod(tmp_path / "host-only", 0o600)
    box = make_sandbox("userns", mounts=(Mount(shared, "/workspace", read_only=False),
                                         Mount(tmp_path, "/mnt", read_only=True)))  # fmt: skip

    async def body() -> None:
        pid = box.start()
        async with box.connected() as conn:
            assert (await conn.run(["id", "-u"])).stdout == b"0\n"
            uid_map = (await conn.run(["cat", "/proc/self/uid_map"])).stdout.split()
            assert uid_map[:1] == [b"0"] and uid_map[1] != b"0"  # root maps to something else
            host = {k: v.split() for k, v in (line.split(":", 1) for line in Path(f"/proc/{pid}/status")
                    .read_text().splitlines())}  # fmt: skip
            assert all(int(uid) != 0 for uid in host["Uid"]), host["Uid"]
            assert all(int(gid) != 0 for gid in host["Gid"]), host["Gid"]
            made = await conn.run(["sh", "-c", "echo x > /workspace/made && chmod 4755 /workspace/made"])
            assert made.status.exit_code == 0, made.stderr
            if os.geteuid() == 0:  # host root's own file, 0600: not readable by root in the container
                denied = await conn.run(["cat", "/mnt/host-only"])
                assert denied.status.exit_code != 0 and b"secret" not in denied.stdout, denied
                assert b"host-only" in (await conn.run(["ls", "/mnt"])).stdout.split()  # it is there

    run_async(body())
    info = (shared / "made").stat()
    assert info.st_uid != 0 and info.st_gid != 0
    if box.backend.engine.userns:
        assert (info.st_uid, info.st_gid) == box.backend.engine.userns


def test_a_link_in_place_of_the_agent_socket_is_not_followed(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    """The container's root owns the directory of the agent's socket: a symlink it puts there, to a
    socket of the host, is refused rather than connected to."""
    bait = socket.socket(socket.AF_UNIX)
    bait.bind(str(tmp_path / "bait.sock"))
    bait.listen()
    bait.setblocking(False)
    box = make_sandbox("swap")

    async def body() -> None:
        box.start()
        async with box.connected() as conn:
            swap = f"ln -sf {tmp_path / 'bait.sock'} {GUEST_RUNDIR}/{SOCKET}"
            assert (await conn.run(["sh", "-c", swap])).status.exit_code == 0
        with pytest.raises(AgentkernelError, match="not a socket"):
            await box.connect(timeout=5)

    run_async(body())
    with pytest.raises(BlockingIOError):
        bait.accept()
    bait.close()
