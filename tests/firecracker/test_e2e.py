"""End to end with the real firecracker binary, the built guest kernel, the base image and the agent:
create, start, exec, stop and remove, snapshots and forks, through the backend. Runs wherever
firecracker is on PATH and hardware KVM is usable; skipped elsewhere (as here: no binary, and
/dev/kvm is PVM without vmx/svm)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.backend import FirecrackerBackend, Jailer
from agentkernel.backends.firecracker.version import check_version
from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.hostinfo import detect_accel
from agentkernel.network import launcher as gateway
from agentkernel.network.policy import EgressRules
from agentkernel.protocol import connection
from tests.firecracker.conftest import MakeSpec, kill_processes_naming

T = TypeVar("T")
RUNNABLE = bool(shutil.which("firecracker")) and detect_accel().name == "kvm"
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not RUNNABLE, reason="needs the firecracker binary and hardware KVM"),
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture
def new_spec(artifacts: tuple[Path, Path], tmp_path: Path) -> Iterator[MakeSpec]:
    rundirs: list[Path] = []

    def make(name: str, **fields: Any) -> VMSpec:
        rundirs.append(Path(tempfile.mkdtemp(prefix="akfc-")))
        kernel, image = artifacts
        return VMSpec(name, kernel, image, workdir=tmp_path / name, rundir=rundirs[-1], **fields)

    yield make
    for rundir in rundirs:
        kill_processes_naming(str(rundir))
        shutil.rmtree(rundir, ignore_errors=True)


def wait_exit(backend: FirecrackerBackend, vm: VMSpec, pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while backend.is_alive(vm, pid):
        assert time.monotonic() < deadline, "firecracker did not exit"
        time.sleep(0.05)


def test_create_start_exec_stop_remove(new_spec: MakeSpec) -> None:
    backend = FirecrackerBackend()
    vm = new_spec("fce2e", vcpus=2, memory_mb=256)
    backend.prepare(vm)
    pid = backend.start(vm)

    async def first_boot() -> None:
        start = time.monotonic()
        conn = await backend.connect(vm, pid, timeout=60)
        print(f"InstanceStart to agent answer: {time.monotonic() - start:.2f}s")
        other = await backend.connect(vm, pid, timeout=10)  # a second, independent connection
        assert "agentkernel" in conn.agent_info
        done = await conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (done.stdout, done.stderr, done.status.exit_code) == (b"out\n", b"err\n", 3)
        assert (await other.run(["hostname"])).stdout.strip() == b"fce2e"
        cmdline = (await conn.run(["cat", "/proc/cmdline"])).stdout.decode()
        assert "reboot=k" in cmdline and "init=/sbin/agentkernel-agent" in cmdline
        assert (await conn.run(["grep", "-c", "^processor", "/proc/cpuinfo"])).stdout.strip() == b"2"
        assert (await conn.run(["sh", "-c", "echo kept > /kept && sync"])).status.exit_code == 0
        await other.close()
        await conn.shutdown()
        await conn.close()

    run(first_boot())
    wait_exit(backend, vm, pid)
    assert "reboot: Restarting system" in vm.console_log.read_text()
    backend.cleanup(vm, keep_disk=True)

    pid = backend.start(vm)  # the kept disk boots again, with what was written

    async def second_boot() -> None:
        conn = await backend.connect(vm, pid, timeout=60)
        assert (await conn.run(["cat", "/kept"])).stdout == b"kept\n"
        await conn.close()

    run(second_boot())
    backend.kill(vm, pid)
    assert not backend.is_alive(vm, pid)
    backend.cleanup(vm, keep_disk=False)
    assert not vm.workdir.exists() and not vm.rundir.exists()


def test_sandboxes_do_not_share_a_disk_and_read_only_is_enforced(new_spec: MakeSpec) -> None:
    backend = FirecrackerBackend()
    one, two, ro = new_spec("fcone"), new_spec("fctwo"), new_spec("fcro", read_only=True)
    pids = {}
    for vm in (one, two, ro):
        backend.prepare(vm)
        pids[vm.name] = backend.start(vm)

    async def body() -> None:
        a = await backend.connect(one, pids["fcone"], timeout=60)
        b = await backend.connect(two, pids["fctwo"], timeout=60)
        r = await backend.connect(ro, pids["fcro"], timeout=60)
        assert (await a.run(["sh", "-c", "echo one > /mine"])).status.exit_code == 0
        assert (await b.run(["cat", "/mine"])).status.exit_code != 0
        assert (await r.run(["sh", "-c", "echo x > /written"])).status.exit_code != 0
        assert (await r.run(["sh", "-c", "echo x > /tmp/t"])).status.exit_code == 0
        for conn in (a, b, r):
            await conn.close()

    try:
        run(body())
    finally:
        for vm in (one, two, ro):
            backend.kill(vm, pids[vm.name])
            backend.cleanup(vm, keep_disk=False)


@pytest.mark.skipif(RUNNABLE and os.geteuid() != 0, reason="the tap device and nftables need root")
def test_network_goes_through_the_gateway(new_spec: MakeSpec, isolated_home: Path) -> None:
    backend = FirecrackerBackend()
    vm = new_spec("fcnet", egress=EgressRules(block=("blocked.example",)))
    backend.prepare(vm)
    pid = backend.start(vm)

    async def body() -> None:
        conn = await backend.connect(vm, pid, timeout=60)
        done = await conn.run(
            ["sh", "-c", "timeout 10 wget -q -O - http://blocked.example/ 2>&1; ip -o -4 addr show dev eth0"],
            env=gateway.proxy_env(),
        )
        out = done.stdout.decode()
        assert "403 Forbidden" in out and "10.0.2.15/24" in out
        await conn.close()

    try:
        run(body())
    finally:
        backend.kill(vm, pid)
        backend.cleanup(vm, keep_disk=False)
    assert not (fc.NETNS_DIR / fc.netns_name(vm)).exists()


@pytest.mark.skipif(
    RUNNABLE and (os.geteuid() != 0 or not shutil.which("jailer")),
    reason="the jailer needs root and its binary on PATH",
)
def test_jailed(new_spec: MakeSpec, tmp_path: Path) -> None:
    backend = FirecrackerBackend(jailer=Jailer(65534, 65534, tmp_path / "jails"))
    vm = new_spec("fcjail")
    backend.prepare(vm)
    pid = backend.start(vm)

    async def body() -> None:
        conn = await backend.connect(vm, pid, timeout=60)
        assert (await conn.run(["true"])).status.exit_code == 0
        await conn.close()

    try:
        run(body())
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:\t65534\t" in status  # Firecracker runs as the jail's uid
    finally:
        backend.kill(vm, pid)
        backend.cleanup(vm, keep_disk=False)
    assert not list((tmp_path / "jails").glob(f"*/{fc.instance_id(vm)}"))


def fork_of(new_spec: MakeSpec, name: str, snapshot: Path, **fields: Any) -> VMSpec:
    """A fork's spec as the service makes it: the snapshot's disk as image, the snapshot to restore."""
    return new_spec(name, image=snapshot / FirecrackerBackend.snapshot_disk, restore=snapshot, **fields)


def resumed(backend: FirecrackerBackend, vm: VMSpec) -> int:
    backend.prepare(vm)
    pid = backend.start(vm)
    run(backend.resume(vm, pid))
    return pid


async def output(backend: FirecrackerBackend, vm: VMSpec, pid: int, script: str) -> bytes:
    conn = await backend.connect(vm, pid, timeout=60)
    try:
        done = await conn.run(["sh", "-c", script], env=gateway.proxy_env() if vm.egress else None)
        assert done.status.exit_code == 0, done.stderr
        return done.stdout
    finally:
        await conn.close()


def test_release_is_supported() -> None:
    binary = shutil.which("firecracker")
    assert binary is not None
    print(f"Firecracker {check_version(binary)}")


def test_a_snapshot_resets_open_connections(new_spec: MakeSpec, tmp_path: Path) -> None:
    """A command running over a connection when a snapshot is taken: the guest drops the connection
    and the agent kills the command; the host side fails within the heartbeat's bound instead of
    waiting for good; a new connection works."""
    backend = FirecrackerBackend()
    vm = new_spec("fcreset", memory_mb=256)
    backend.prepare(vm)
    pid = backend.start(vm)
    snap = tmp_path / "snap"
    snap.mkdir()

    async def body() -> None:
        conn = await backend.connect(vm, pid, timeout=60)
        proc = await conn.exec(["sleep", "600"])
        await backend.snapshot(vm, pid, snap)
        start = time.monotonic()
        with pytest.raises(AgentConnectionError):
            await proc.wait()
        assert time.monotonic() - start < connection.HEARTBEAT_INTERVAL + connection.HEARTBEAT_TIMEOUT + 5
        await conn.close()

    try:
        run(body())
        assert run(output(backend, vm, pid, "pidof sleep || echo none")) == b"none\n"
    finally:
        backend.kill(vm, pid)
        backend.cleanup(vm, keep_disk=False)


def test_a_failed_snapshot_leaves_no_unreachable_source(new_spec: MakeSpec, tmp_path: Path) -> None:
    """Firecracker cannot write the snapshot (no such folder): the source either answers afterwards
    or was stopped, and the error says which."""
    backend = FirecrackerBackend()
    vm = new_spec("fcfailed", memory_mb=256)
    backend.prepare(vm)
    pid = backend.start(vm)
    try:
        run(output(backend, vm, pid, "true"))
        with pytest.raises(AgentkernelError) as info:
            run(backend.snapshot(vm, pid, tmp_path / "missing"))
        print(f"failed snapshot: {info.value}")
        if backend.is_alive(vm, pid):
            assert "stopped" not in str(info.value)
            assert run(output(backend, vm, pid, "echo ok")) == b"ok\n"
        else:
            assert "the sandbox was stopped" in str(info.value)
    finally:
        backend.kill(vm, pid)
        backend.cleanup(vm, keep_disk=False)


def test_snapshot_and_forks(new_spec: MakeSpec, tmp_path: Path) -> None:
    """A Full snapshot of a running microVM and two forks of it: each resumes the memory and disk as
    they were, with its own disk copy, vsock socket, hostname, clock and random numbers; the source
    runs on; a stopped fork boots from its own disk."""
    backend = FirecrackerBackend()
    origin = new_spec("fcorigin", memory_mb=256)
    backend.prepare(origin)
    pids = {origin.name: backend.start(origin)}
    snap = tmp_path / "snap"
    snap.mkdir()
    forks = [fork_of(new_spec, name, snap, memory_mb=256) for name in ("fcone", "fctwo")]
    random = "head -c 16 /dev/urandom | od -An -tx1"
    try:
        run(
            output(
                backend,
                origin,
                pids[origin.name],
                "echo on-disk > /root/f && sync && echo in-memory > /tmp/m",
            )
        )
        start = time.monotonic()
        run(backend.snapshot(origin, pids[origin.name], snap))
        print(f"snapshot of 256 MiB: {time.monotonic() - start:.2f}s")
        run(output(backend, origin, pids[origin.name], "echo after > /root/f"))  # the source runs on
        time.sleep(2)  # the forks' clocks must not resume at the snapshot's time
        for vm in forks:
            start = time.monotonic()
            pids[vm.name] = resumed(backend, vm)
            out = run(output(backend, vm, pids[vm.name], "cat /root/f /tmp/m; hostname; date +%s"))
            print(f"restore to agent answer: {time.monotonic() - start:.2f}s")
            f, m, hostname, clock = out.decode().split()
            assert (f, m, hostname) == ("on-disk", "in-memory", vm.name)
            assert abs(int(clock) - time.time()) < 2
        one, two = forks
        assert run(output(backend, one, pids[one.name], random)) != run(
            output(backend, two, pids[two.name], random)
        )
        run(output(backend, two, pids[two.name], "echo changed > /root/f && sync"))
        assert run(output(backend, one, pids[one.name], "cat /root/f")) == b"on-disk\n"
        assert run(output(backend, origin, pids[origin.name], "cat /root/f")) == b"after\n"

        async def power_off() -> None:
            conn = await backend.connect(one, pids[one.name], timeout=30)
            await conn.shutdown()
            await conn.close()

        run(power_off())
        wait_exit(backend, one, pids[one.name])
        backend.cleanup(one, keep_disk=True)
        cold = dataclasses.replace(one, restore=None)  # as the service starts it after the first time
        pids[one.name] = backend.start(cold)
        assert run(output(backend, cold, pids[one.name], "cat /root/f")) == b"on-disk\n"
    finally:
        for vm in (origin, *forks):
            if vm.name in pids:
                backend.kill(vm, pids[vm.name])
            backend.cleanup(vm, keep_disk=False)


@pytest.mark.skipif(RUNNABLE and os.geteuid() != 0, reason="the tap device and nftables need root")
def test_forks_with_network(new_spec: MakeSpec, isolated_home: Path, tmp_path: Path) -> None:
    """Each fork gets its own tap in its own namespace and reaches the network through its own gateway."""
    backend = FirecrackerBackend()
    rules = EgressRules(block=("blocked.example",))
    origin = new_spec("fcnetorigin", egress=rules)
    backend.prepare(origin)
    pids = {origin.name: backend.start(origin)}
    snap = tmp_path / "snap"
    snap.mkdir()
    forks = [fork_of(new_spec, name, snap, egress=rules) for name in ("fcnetone", "fcnettwo")]
    try:
        run(output(backend, origin, pids[origin.name], "true"))
        run(backend.snapshot(origin, pids[origin.name], snap))
        for vm in forks:
            pids[vm.name] = resumed(backend, vm)
            out = run(
                output(
                    backend, vm, pids[vm.name], "timeout 10 wget -q -O - http://blocked.example/ 2>&1; true"
                )
            )
            assert b"403 Forbidden" in out
    finally:
        for vm in (origin, *forks):
            if vm.name in pids:
                backend.kill(vm, pids[vm.name])
            backend.cleanup(vm, keep_disk=False)
    assert not [vm for vm in (origin, *forks) if (fc.NETNS_DIR / fc.netns_name(vm)).exists()]


@pytest.mark.skipif(
    RUNNABLE and (os.geteuid() != 0 or not shutil.which("jailer")),
    reason="the jailer needs root and its binary on PATH",
)
def test_jailed_snapshot_and_fork(new_spec: MakeSpec, tmp_path: Path) -> None:
    backend = FirecrackerBackend(jailer=Jailer(65534, 65534, tmp_path / "jails"))
    origin = new_spec("fcjailorigin")
    backend.prepare(origin)
    pids = {origin.name: backend.start(origin)}
    snap = tmp_path / "snap"
    snap.mkdir()
    fork = fork_of(new_spec, "fcjailfork", snap)
    try:
        run(output(backend, origin, pids[origin.name], "echo jailed > /root/f && sync"))
        run(backend.snapshot(origin, pids[origin.name], snap))
        pids[fork.name] = resumed(backend, fork)
        assert run(output(backend, fork, pids[fork.name], "cat /root/f")) == b"jailed\n"
        assert "\nUid:\t65534\t" in Path(f"/proc/{pids[fork.name]}/status").read_text()
    finally:
        for vm in (origin, fork):
            if vm.name in pids:
                backend.kill(vm, pids[vm.name])
            backend.cleanup(vm, keep_disk=False)
