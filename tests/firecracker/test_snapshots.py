"""Snapshots and forks on the Firecracker backend, with the fake firecracker (fake_firecracker.py) on
PATH: it keeps the rules of Firecracker's snapshot API as its snapshot doc states them (pause before
create, load only on a fresh process, a failed load ends the process, the drive reopened at the path
the snapshot recorded, vsock and tap overrides), since no firecracker binary and no hardware KVM
exist here. test_e2e.py runs the real thing where they do."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.api import FirecrackerAPI
from agentkernel.backends.firecracker.backend import FirecrackerBackend, Jailer
from agentkernel.errors import AgentConnectionError, AgentkernelError, FirecrackerAPIError
from agentkernel.images import store
from agentkernel.network.policy import EgressRules
from agentkernel.protocol import connection
from agentkernel.protocol.frames import FrameType, encode
from agentkernel.sandbox import state
from agentkernel.service import sandboxes, snapshots
from tests.firecracker.conftest import KVM, NO_NETWORK, Fake, MakeSpec, processes_naming
from tests.firecracker.test_network import WHY_NOT

T = TypeVar("T")
NOBODY = 65534
MEMORY_MB = 128
ORIGIN_WROTE = b"written by origin before the snapshot"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to the jail's uid needs root")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def fork_spec(make_spec: MakeSpec, name: str, snapshot: Path, **fields: Any) -> VMSpec:
    """What the service gives a fork: the snapshot's disk as its image, the snapshot to restore."""
    return make_spec(name, image=snapshot / FirecrackerBackend.snapshot_disk, restore=snapshot, **fields)


def started(backend: FirecrackerBackend, vm: VMSpec) -> int:
    """Prepare and start `vm`, and resume it when it is a fork (as the service's start does)."""
    backend.prepare(vm)
    pid = backend.start(vm)
    if vm.restore is not None:
        run(backend.resume(vm, pid))
    return pid


def agent_info(backend: FirecrackerBackend, vm: VMSpec, pid: int) -> str:
    async def hello() -> str:
        conn = await backend.connect(vm, pid, timeout=30)
        assert await conn.ping() < 5
        await conn.close()
        return conn.agent_info

    return run(hello())


def vm_state(vm: VMSpec) -> str:
    with FirecrackerAPI(fc.api_socket(vm)) as api:
        answer: str = api.request("GET", "/")["state"]
        return answer


def snapshot_into(backend: FirecrackerBackend, vm: VMSpec, pid: int, dest: Path) -> None:
    dest.mkdir()
    run(backend.snapshot(vm, pid, dest))


def changes(fake: Fake, vm: VMSpec) -> list[tuple[str, str, Any]]:
    return [call for call in fake.api_calls(vm) if call[0] != "GET"]


def test_snapshot_then_forks(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, tmp_path: Path
) -> None:
    """Snapshot a running sandbox, fork it twice: each fork loads the snapshot with its own vsock
    socket and runs its memory on its own copy of the disk; the source runs on."""
    origin = make_spec("origin", memory_mb=MEMORY_MB)
    pid = started(backend, origin)
    assert agent_info(backend, origin, pid) == "fake agent"
    with fc.disk(origin).open("r+b") as f:
        f.write(ORIGIN_WROTE)  # as the guest would
    snap = tmp_path / "snap"
    snapshot_into(backend, origin, pid, snap)
    calls = changes(fake, origin)
    assert calls[-3:] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", fc.snapshot_create_body(str(snap / "vmstate"), str(snap / "memory"))),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]
    assert vm_state(origin) == "Running" and agent_info(backend, origin, pid) == "fake agent"  # runs on
    assert sorted(p.name for p in snap.iterdir()) == ["memory", "rootfs.ext4", "vmstate"]
    for path in snap.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o440  # read by forks, written by none
    assert (snap / "memory").stat().st_size == MEMORY_MB << 20
    saved_disk = snap / "rootfs.ext4"
    assert saved_disk.read_bytes().startswith(ORIGIN_WROTE)
    assert saved_disk.stat().st_ino != fc.disk(origin).stat().st_ino
    assert saved_disk.stat().st_blocks < saved_disk.stat().st_size // 512 // 4  # holes stayed holes
    with fc.disk(origin).open("r+b") as f:
        f.write(b"origin after")

    one, two = (fork_spec(make_spec, name, snap, memory_mb=MEMORY_MB) for name in ("one", "two"))
    pids = {vm.name: started(backend, vm) for vm in (one, two)}
    for vm in (one, two):
        assert agent_info(backend, vm, pids[vm.name]) == f"fake agent (memory of {fc.instance_id(origin)})"
        load = fc.snapshot_load_body(vm, str(snap / "vmstate"), str(snap / "memory"))
        assert changes(fake, vm) == [
            ("PUT", "/logger", fc.logger_body(fc.host_layout(vm))),
            ("PUT", "/metrics", fc.metrics_body(fc.host_layout(vm))),
            ("PUT", "/snapshot/load", load),
        ]
        assert load["vsock_override"] == {"uds_path": str(vm.rundir / "v.sock")}  # its own socket
        assert fc.vsock_socket(vm).is_socket()
        assert [r["hello"] for r in fake.requests(vm) if "hello" in r] == [vm.name]
        assert fc.disk_link(vm).resolve() == fc.disk(vm) == vm.workdir / "rootfs.ext4"  # its own copy
        assert fc.disk(vm).read_bytes().startswith(ORIGIN_WROTE)
    inodes = {fc.disk(vm).stat().st_ino for vm in (origin, one, two)} | {saved_disk.stat().st_ino}
    assert len(inodes) == 4
    with fc.disk(one).open("r+b") as f:
        f.write(b"one wrote")
    assert fc.disk(two).read_bytes().startswith(ORIGIN_WROTE)
    assert saved_disk.read_bytes().startswith(ORIGIN_WROTE)
    assert agent_info(backend, origin, pid) == "fake agent"

    # A fork's own snapshot: the memory it runs is still origin's guest, the disk is one's.
    again = tmp_path / "again"
    snapshot_into(backend, one, pids["one"], again)
    three = fork_spec(make_spec, "three", again, memory_mb=MEMORY_MB)
    pids["three"] = started(backend, three)
    assert agent_info(backend, three, pids["three"]) == f"fake agent (memory of {fc.instance_id(origin)})"
    assert fc.disk(three).read_bytes().startswith(b"one wrote")

    # Stopped, a fork boots from its own disk (the service clears the restore after the first start).
    backend.kill(one, pids["one"])
    backend.cleanup(one, keep_disk=True)
    cold = dataclasses.replace(one, restore=None)
    pids["one"] = backend.start(cold)
    assert agent_info(backend, cold, pids["one"]) == "fake agent"
    booted = [*fc.config_requests(cold, fc.host_layout(cold)), ("/actions", {"action_type": "InstanceStart"})]
    assert [(path, body) for _, path, body in changes(fake, cold)][-len(booted) :] == booted
    assert fc.disk_link(cold).resolve() == fc.disk(one)
    for vm in (origin, cold, two, three):
        backend.kill(vm, pid if vm is origin else pids[vm.name])
        backend.cleanup(vm, keep_disk=False)
        assert processes_naming(str(vm.rundir)) == []


def test_a_snapshot_resets_open_connections(
    backend: FirecrackerBackend,
    make_spec: MakeSpec,
    fake: Fake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Firecracker does, the stand-in keeps the host end of a connection open across the vsock
    reset of a snapshot but carries nothing on it any more; the heartbeat gives such a connection up
    in bounded time, where a read on it would otherwise wait for good. New connections work."""
    monkeypatch.setattr(connection, "HEARTBEAT_INTERVAL", 0.2)
    monkeypatch.setattr(connection, "HEARTBEAT_TIMEOUT", 0.5)
    origin = make_spec("origin", memory_mb=MEMORY_MB)
    pid = started(backend, origin)
    snap = tmp_path / "snap"
    snap.mkdir()
    ping = encode(0, FrameType.PING, b"12345678")

    async def scenario() -> None:
        conn = await backend.connect(origin, pid, timeout=30)
        reader, writer = await asyncio.open_unix_connection(str(fc.vsock_socket(origin)))
        writer.write(b"CONNECT 52000\n" + ping)
        assert (await reader.readline()).startswith(b"OK ")
        assert await reader.readexactly(len(ping)) == encode(0, FrameType.PONG, b"12345678")
        await asyncio.sleep(0.5)
        assert await conn.ping() < 5  # idle, the heartbeat kept it
        await backend.snapshot(origin, pid, snap)
        start = time.monotonic()
        with pytest.raises(AgentConnectionError, match=r"has not answered for .* the connection was reset"):
            await conn.ping(timeout=60)  # without the heartbeat: a minute; a read: for good
        assert time.monotonic() - start < 3 and conn.broken
        await conn.close()
        writer.write(ping)  # the raw connection: still open (no EOF), but nothing comes back
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 1.0)
        writer.close()
        fresh = await backend.connect(origin, pid, timeout=30)
        assert await fresh.ping() < 5
        await fresh.close()

    run(scenario())
    backend.kill(origin, pid)


def no_space(source: Path, dest: Path) -> None:
    raise AgentkernelError(f"cannot copy {source} to {dest}: No space left on device")


@pytest.mark.parametrize("failure", ["refused", "refused, no gate", "disk copy", "crash"])
def test_a_failed_snapshot_resumes_or_stops_the_source(
    backend: FirecrackerBackend,
    make_spec: MakeSpec,
    fake: Fake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """Paused without a snapshot, Firecracker 1.16 resumes a vsock device that refuses the host:
    the source is stopped, and the error says so. Where it comes back (a release without that gate,
    or a failure after Firecracker wrote the snapshot, which resets vsock) the source runs on."""
    if failure.startswith("refused"):
        monkeypatch.setenv("FAKE_FC_FAIL", "/snapshot/create")
    if failure == "refused, no gate":
        monkeypatch.setenv("FAKE_FC_NO_RESUME_GATE", "1")
    if failure == "crash":
        monkeypatch.setenv("FAKE_FC_CRASH", "snapshot")
    origin = make_spec("origin", memory_mb=MEMORY_MB)
    pid = started(backend, origin)
    monkeypatch.setattr(fc, "_copy", no_space)  # (prepare has made the disk)
    with pytest.raises(AgentkernelError) as info:
        snapshot_into(backend, origin, pid, tmp_path / "snap")
    message = str(info.value)
    assert "\n" not in message
    if failure == "crash":  # nothing left to resume: the error says why, with Firecracker's log
        assert message.startswith("firecracker API PUT /snapshot/create: no answer on ")
        assert "firecracker exited: firecracker log: " in message and "fake failure while writing" in message
        assert not backend.is_alive(origin, pid)
        return
    refused = "firecracker refused PUT /snapshot/create (HTTP 400): Fake failure requested"
    assert message.startswith(refused if failure.startswith("refused") else "cannot copy ")
    assert changes(fake, origin)[-1] == ("PATCH", "/vm", {"state": "Resumed"})
    if failure == "refused":
        assert (
            "; the sandbox was stopped, since its agent no longer answered after the failed snapshot ("
            in message
        )
        assert message.endswith("start it again, its disk is kept")
        assert not backend.is_alive(origin, pid)
        return
    assert "stopped" not in message
    assert vm_state(origin) == "Running" and agent_info(backend, origin, pid) == "fake agent"


def test_the_stand_in_keeps_the_snapshot_rules(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, tmp_path: Path
) -> None:
    """What the fake refuses, as Firecracker's snapshot doc says Firecracker does: the backend's
    requests in the tests above pass these checks."""
    origin = make_spec("origin", memory_mb=MEMORY_MB)
    pid = started(backend, origin)
    snap = tmp_path / "snap"
    snap.mkdir()
    create = fc.snapshot_create_body(str(snap / "vmstate"), str(snap / "memory"))
    with FirecrackerAPI(fc.api_socket(origin)) as api:
        with pytest.raises(FirecrackerAPIError, match="not paused"):
            api.put("/snapshot/create", create)
        assert list(snap.iterdir()) == []  # no side effects
        with pytest.raises(FirecrackerAPIError, match="not supported after starting"):
            api.put("/snapshot/load", {"snapshot_path": create["snapshot_path"], "mem_file_path": "/m"})
    run(backend.snapshot(origin, pid, snap))

    # A fresh process, as start() leaves one for a restore: post-boot requests are refused, a load
    # must name one memory source, and a load that fails ends the process.
    fork = fork_spec(make_spec, "fork", snap, memory_mb=MEMORY_MB)
    backend.prepare(fork)
    fork_pid = backend.start(fork)
    load = fc.snapshot_load_body(fork, *fc.restore_files(fork, jailed=False))
    with FirecrackerAPI(fc.api_socket(fork)) as api:
        for method, path, body in (
            ("PATCH", "/vm", fc.vm_state_body("Paused")),
            ("PUT", "/snapshot/create", create),
        ):
            with pytest.raises(FirecrackerAPIError, match="not supported before starting"):
                api.request(method, path, body)
        with pytest.raises(FirecrackerAPIError, match="Exactly one of mem_backend and mem_file_path"):
            api.put("/snapshot/load", {**load, "mem_file_path": str(snap / "memory")})
        # Without the override, the vsock socket is the source's, which is in use: why forks need it.
        without = {key: value for key, value in load.items() if key != "vsock_override"}
        with pytest.raises(
            FirecrackerAPIError, match=r"cannot bind the vsock socket .*Address already in use"
        ):
            api.put("/snapshot/load", without)
    for _ in range(500):
        if not backend.is_alive(fork, fork_pid):
            break
        run(asyncio.sleep(0.01))
    assert not backend.is_alive(fork, fork_pid)

    # Once a boot resource is configured, a load is refused (the process lives on).
    fresh = fork_spec(make_spec, "fresh", snap, memory_mb=MEMORY_MB)
    backend.prepare(fresh)
    fresh_pid = backend.start(fresh)
    with FirecrackerAPI(fc.api_socket(fresh)) as api:
        api.put("/machine-config", fc.machine_config_body(fresh))
        with pytest.raises(
            FirecrackerAPIError, match="not allowed after configuring boot-specific resources"
        ):
            api.put("/snapshot/load", fc.snapshot_load_body(fresh, *fc.restore_files(fresh, jailed=False)))
    assert backend.is_alive(fresh, fresh_pid)

    # A loaded microVM has started: InstanceStart and pre-boot requests are refused.
    third = fork_spec(make_spec, "third", snap, memory_mb=MEMORY_MB)
    started(backend, third)
    with FirecrackerAPI(fc.api_socket(third)) as api:
        with pytest.raises(FirecrackerAPIError, match="already running"):
            api.put("/actions", fc.action_body("InstanceStart"))
        with pytest.raises(FirecrackerAPIError, match="not supported after starting"):
            api.put("/machine-config", fc.machine_config_body(third))
        assert api.request("GET", "/")["state"] == "Running"


@as_root
def test_jailed_snapshot_and_forks(
    make_spec: MakeSpec, fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jails = tmp_path / "jails"
    jailed = FirecrackerBackend(KVM, jailer=Jailer(NOBODY, NOBODY, jails))
    origin = make_spec("origin", memory_mb=MEMORY_MB)
    pid = started(jailed, origin)
    assert agent_info(jailed, origin, pid) == "fake agent"
    root = fc.jail_root(origin)
    assert root == jails / "firecracker" / fc.instance_id(origin) / "root"
    snap = tmp_path / "snap"
    snapshot_into(jailed, origin, pid, snap)
    in_jail = fc.snapshot_create_body("/snapshot.vmstate", "/snapshot.memory")
    assert changes(fake, origin)[-2] == ("PUT", "/snapshot/create", in_jail)
    assert list(root.glob("snapshot.*")) == []  # moved out of the jail
    for path in snap.iterdir():
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o440)  # no jail can write it
    # A process without the jailer's environment (another CLI run) still snapshots it as jailed.
    snapshot_into(FirecrackerBackend(KVM), origin, pid, tmp_path / "again")
    assert changes(fake, origin)[-2] == ("PUT", "/snapshot/create", in_jail)

    fork = fork_spec(make_spec, "fork", snap, memory_mb=MEMORY_MB)
    fork_pid = started(jailed, fork)
    fork_root = fc.jail_root(fork)
    assert fork_root is not None
    for link, saved in (("restore.vmstate", "vmstate"), ("restore.memory", "memory")):
        assert (fork_root / link).stat().st_ino == (snap / saved).stat().st_ino  # hard links, not copies
        assert (snap / saved).stat().st_gid == NOBODY  # the jail reads it as its group
    assert (fork_root / "rootfs.ext4").stat().st_ino == fc.disk(fork).stat().st_ino  # its own copy
    load = fc.snapshot_load_body(fork, "/restore.vmstate", "/restore.memory")
    assert changes(fake, fork)[-1] == ("PUT", "/snapshot/load", load)
    assert agent_info(jailed, fork, fork_pid) == f"fake agent (memory of {fc.instance_id(origin)})"
    restored_from = (snap / "memory").stat().st_mtime_ns
    snapshot_into(jailed, fork, fork_pid, tmp_path / "of-the-fork")
    assert (snap / "memory").stat().st_mtime_ns == restored_from  # its own snapshot went elsewhere

    # The drive's path is relative in a jail and out of one: a jailed snapshot forks unjailed.
    plain = fork_spec(make_spec, "plain", snap, memory_mb=MEMORY_MB)
    plain_pid = started(FirecrackerBackend(KVM), plain)
    assert agent_info(jailed, plain, plain_pid) == f"fake agent (memory of {fc.instance_id(origin)})"

    monkeypatch.setattr(fc, "_copy", no_space)
    with pytest.raises(AgentkernelError, match="No space left on device"):
        snapshot_into(jailed, origin, pid, tmp_path / "failed")
    assert list(root.glob("snapshot.*")) == [] and vm_state(origin) == "Running"
    for vm, vm_pid in ((origin, pid), (fork, fork_pid), (plain, plain_pid)):
        jailed.kill(vm, vm_pid)
        jailed.cleanup(vm, keep_disk=False)
    assert list(jails.glob("firecracker/*")) == []


@pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)
@pytest.mark.parametrize("jail", [False, True], ids=["direct", "jailed"])
def test_each_fork_gets_its_own_tap(
    make_spec: MakeSpec, fake: Fake, tmp_path: Path, isolated_home: Path, jail: bool
) -> None:
    """The fake opens no tap, but refuses one its network namespace lacks (as an unprivileged
    Firecracker would): each fork's load names tap0, found in the fork's own namespace."""
    backend = FirecrackerBackend(KVM, jailer=Jailer(NOBODY, NOBODY, tmp_path / "jails") if jail else None)
    rules = EgressRules(allow=("127.0.0.1",))
    origin = make_spec("origin", memory_mb=MEMORY_MB, egress=rules)
    vms = {origin.name: (origin, started(backend, origin))}
    try:
        snap = tmp_path / "snap"
        snapshot_into(backend, origin, vms["origin"][1], snap)
        for name in ("one", "two"):
            vm = fork_spec(make_spec, name, snap, memory_mb=MEMORY_MB, egress=rules)
            vms[name] = (vm, started(backend, vm))
            assert changes(fake, vm)[-1][2]["network_overrides"] == [
                {"iface_id": "eth0", "host_dev_name": "tap0"}
            ]
            assert agent_info(backend, vm, vms[name][1]).endswith(f"(memory of {fc.instance_id(origin)})")
        namespaces = set()
        for vm, vm_pid in vms.values():
            netns = (fc.NETNS_DIR / fc.netns_name(vm)).stat().st_ino
            assert Path(f"/proc/{vm_pid}/ns/net").stat().st_ino == netns  # firecracker runs in it
            namespaces.add(netns)
        assert len(namespaces) == 3
    finally:
        for vm, vm_pid in vms.values():
            backend.kill(vm, vm_pid)
            backend.cleanup(vm, keep_disk=False)
    assert not [vm for vm, _ in vms.values() if (fc.NETNS_DIR / fc.netns_name(vm)).exists()]


def test_service_snapshot_and_forks(service: Path) -> None:
    """The service's snapshot and fork on Firecracker: the fork's image is the backend's disk file."""
    sandboxes.create("origin", backend="firecracker", policy=NO_NETWORK, memory_mb=MEMORY_MB)
    run(sandboxes.start("origin"))
    snap = run(snapshots.create("origin", "snap"))
    assert sorted(p.name for p in snap.path.iterdir()) == [
        "memory",
        "rootfs.ext4",
        "snapshot.json",
        "vmstate",
    ]
    assert snap.meta["backend"] == "firecracker"
    for name in ("one", "two"):
        record = run(snapshots.fork("snap", name))
        assert record.status == "running" and record.backend == "firecracker"
        assert record.image_path == str(snap.path / "rootfs.ext4")
        assert record.image_format == "raw"
        assert state.get(name).restore_from is None  # resumed once: a later start boots
    disks = [service / "sandboxes" / name / "rootfs.ext4" for name in ("origin", "one", "two")]
    assert len({disk.stat().st_ino for disk in disks}) == 3
    assert list(snapshots.snapshots_dir().iterdir()) == [snap.path]  # no scratch left behind
    with pytest.raises(AgentkernelError, match="in use by sandboxes one, two"):
        snapshots.remove("snap")
    run(sandboxes.stop("one"))
    assert run(sandboxes.start("one")).status == "running"  # from its own disk
    for name in ("one", "two", "origin"):
        sandboxes.remove(name, force=True)
    snapshots.remove("snap")
    assert list(snapshots.snapshots_dir().iterdir()) == []


@pytest.mark.parametrize("failure", ["refused", "disk copy"])
def test_service_failed_snapshot_leaves_nothing(
    service: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Nothing is left of a failed snapshot; the source runs on, or, stopped by the backend (see
    test_a_failed_snapshot_resumes_or_stops_the_source), is failed with the snapshot's error."""
    if failure == "refused":
        monkeypatch.setenv("FAKE_FC_FAIL", "/snapshot/create")
    sandboxes.create("origin", backend="firecracker", policy=NO_NETWORK, memory_mb=MEMORY_MB)
    run(sandboxes.start("origin"))
    monkeypatch.setattr(fc, "_copy", no_space)  # after Firecracker wrote its files into the scratch
    with pytest.raises(AgentkernelError):
        run(snapshots.create("origin", "snap"))
    assert list(snapshots.snapshots_dir().iterdir()) == []
    assert not [name for name in store.names() if "snapshot.snap" in name]

    async def ping() -> float:
        async with sandboxes.session("origin") as conn:
            return await conn.ping()

    if failure == "refused":
        record = sandboxes.get("origin")
        assert record.status == "failed" and record.pid is None
        assert str(record.stop_reason).startswith(
            "a snapshot failed: firecracker refused PUT /snapshot/create"
        )
        assert "the sandbox was stopped" in str(record.stop_reason)
    else:
        assert sandboxes.get("origin").status == "running" and run(ping()) < 5
    sandboxes.remove("origin", force=True)
