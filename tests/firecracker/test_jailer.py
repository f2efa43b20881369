"""The jailer: its command line, the chroot the backend builds for it (hard links, ownership), and a
jailed life cycle with the fake jailer and firecracker (fake_jailer.py: neither can run here)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.backend import FirecrackerBackend, Jailer
from agentkernel.errors import AgentkernelError
from tests.firecracker.conftest import KVM, Fake, MakeSpec

NOBODY = 65534


def test_argv(make_spec: MakeSpec, tmp_path: Path) -> None:
    vm = make_spec("my_box.1", vcpus=2, memory_mb=512)
    jail = Jailer(NOBODY, NOBODY, tmp_path / "jails")
    argv = jail.argv(vm, jailer="/usr/bin/jailer", firecracker="/usr/bin/firecracker", netns=None)
    vm_id = fc.instance_id(vm)
    assert vm_id.startswith("ak-my-box-1-") and len(vm_id) <= 64
    assert argv == [
        "/usr/bin/jailer",
        "--id", vm_id,
        "--exec-file", "/usr/bin/firecracker",
        "--uid", "65534",
        "--gid", "65534",
        "--chroot-base-dir", str(tmp_path / "jails"),
        "--cgroup-version", "2",
        "--parent-cgroup", "agentkernel",
        "--cgroup", f"memory.max={(512 + 64) << 20}",
        "--cgroup", "cpu.max=200000 100000",
        "--new-pid-ns",
        "--", "--api-sock", str(vm.rundir / "fc.sock"),
    ]  # fmt: skip
    netns = Path("/run/netns") / vm_id
    with_net = jail.argv(vm, jailer="jailer", firecracker="firecracker", netns=netns)
    assert with_net[with_net.index("--netns") + 1] == str(netns)
    assert with_net.index("--netns") < with_net.index("--")


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AGENTKERNEL_JAILER", raising=False)
    assert Jailer.from_env() is None
    monkeypatch.setenv("AGENTKERNEL_JAILER", "1")
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    assert Jailer.from_env() == Jailer(NOBODY, NOBODY, tmp_path / "home" / "jailer")
    monkeypatch.setenv("AGENTKERNEL_JAILER_UID", "1234")
    monkeypatch.setenv("AGENTKERNEL_JAILER_GID", "4321")
    monkeypatch.setenv("AGENTKERNEL_JAILER_CHROOT_BASE", "/srv/jailer")
    assert Jailer.from_env() == Jailer(1234, 4321, Path("/srv/jailer"))
    monkeypatch.setenv("AGENTKERNEL_JAILER_UID", "nobody")
    with pytest.raises(AgentkernelError, match="must be numbers"):
        Jailer.from_env()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to the jail's uid needs root")
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_chroot_layout(
    backend: FirecrackerBackend,
    make_spec: MakeSpec,
    tmp_path: Path,
    files: tuple[Path, Path],
    read_only: bool,
) -> None:
    kernel, image = files
    vm = make_spec(read_only=read_only)
    backend.prepare(vm)
    fc.log_file(vm).touch()
    fc.metrics_file(vm).touch()
    jail = Jailer(NOBODY, NOBODY, tmp_path / "jails")
    root = jail.build(vm, "firecracker")
    assert root == tmp_path / "jails" / "firecracker" / fc.instance_id(vm) / "root"
    assert (root / "vmlinux").stat().st_ino == kernel.stat().st_ino  # hard links, not copies
    assert (root / "rootfs.ext4").stat().st_ino == fc.disk(vm).stat().st_ino
    assert fc.disk(vm) == (image if read_only else vm.workdir / "rootfs.ext4")
    for name, source in (("firecracker.log", fc.log_file(vm)), ("metrics.json", fc.metrics_file(vm))):
        assert (root / name).stat().st_ino == source.stat().st_ino
        assert (source.stat().st_uid, source.stat().st_gid) == (NOBODY, NOBODY)
    disk_owner = fc.disk(vm).stat().st_uid
    assert disk_owner == (0 if read_only else NOBODY)  # the shared image and kernel stay root's
    assert kernel.stat().st_uid == 0
    sockets = root / str(vm.rundir).lstrip("/")  # Firecracker's sockets at the run dir's own path
    info = sockets.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
    (root / "firecracker.pid").write_text("123")
    assert jail.build(vm, "firecracker") == root and not (root / "firecracker.pid").exists()  # fresh


def test_jail_on_another_filesystem(make_spec: MakeSpec, tmp_path: Path, files: tuple[Path, Path]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    copy = shm / f"akfc-test-{os.getpid()}"
    try:
        fc._link(files[0], copy, writable=False)  # a read-only file is copied
        assert copy.read_bytes() == files[0].read_bytes() and copy.stat().st_ino != files[0].stat().st_ino
        copy.unlink()
        with pytest.raises(AgentkernelError, match="the jail must be on the filesystem of the sandbox disks"):
            fc._link(files[1], copy, writable=True)  # a written one cannot be: the jail would write a copy
    finally:
        copy.unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to the jail's uid needs root")
def test_jailed_life_cycle(make_spec: MakeSpec, fake: Fake, tmp_path: Path) -> None:
    backend = FirecrackerBackend(KVM, jailer=Jailer(NOBODY, NOBODY, tmp_path / "jails"))
    vm = make_spec()
    backend.prepare(vm)
    pid = backend.start(vm)
    jail = tmp_path / "jails" / "firecracker" / fc.instance_id(vm)
    assert (jail / "root" / "firecracker.pid").read_text() == str(pid)
    assert backend.is_alive(vm, pid)
    puts = [(p, b) for m, p, b in fake.api_calls() if m == "PUT"]
    assert puts[:-1] == fc.config_requests(vm, fc.JAIL_LAYOUT)  # the fake found each file in the jail

    async def session() -> None:
        conn = await backend.connect(vm, pid, timeout=30)  # through the run dir's link into the jail
        assert conn.agent_info == "fake agent"
        await conn.close()

    asyncio.run(asyncio.wait_for(session(), 60))
    backend.kill(vm, pid)
    backend.cleanup(vm, keep_disk=True)
    assert not jail.exists() and not vm.rundir.exists() and fc.disk(vm).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to the jail's uid needs root")
def test_the_jail_works_whatever_the_umask(make_spec: MakeSpec, fake: Fake, tmp_path: Path) -> None:
    """The folders on the way to the jail's sockets are made with the modes the jailed uid needs:
    under umask 077 they would otherwise be root's alone, and the fake firecracker, which checks
    access as that uid (as the real one meets it), could not bind its API socket."""
    backend = FirecrackerBackend(KVM, jailer=Jailer(NOBODY, NOBODY, tmp_path / "jails"))
    vm = make_spec()
    backend.prepare(vm)
    umask = os.umask(0o077)
    try:
        pid = backend.start(vm)
    finally:
        os.umask(umask)
    root = fc.jail_root(vm)
    assert root is not None
    folders = [root.joinpath(*vm.rundir.parts[1:i]) for i in range(2, len(vm.rundir.parts) + 1)]
    for folder in folders[:-1]:
        info = folder.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o711, 0)  # traversed, not listed
    info = folders[-1].stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o700, NOBODY, NOBODY)

    async def session() -> None:
        conn = await backend.connect(vm, pid, timeout=30)
        await conn.close()

    asyncio.run(asyncio.wait_for(session(), 60))
    backend.kill(vm, pid)
    backend.cleanup(vm, keep_disk=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to the jail's uid needs root")
def test_the_stand_in_jailer_checks_the_socket_folders(
    make_spec: MakeSpec, fake: Fake, tmp_path: Path
) -> None:
    """A folder the jailed uid cannot search is refused as Firecracker would meet it: the API socket
    cannot be bound, and the start fails with that line."""
    backend = FirecrackerBackend(KVM, jailer=Jailer(NOBODY, NOBODY, tmp_path / "jails"))
    vm = make_spec()
    backend.prepare(vm)
    build = Jailer.build

    def closed_build(self: Jailer, spec: object, exec_name: str) -> Path:
        root = build(self, spec, exec_name)  # type: ignore[arg-type]
        (root / vm.rundir.parts[1]).chmod(0o700)
        return root

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Jailer, "build", closed_build)
        with pytest.raises(AgentkernelError, match=r"firecracker exited at start: .*Permission denied"):
            backend.start(vm)
    backend.cleanup(vm, keep_disk=False)
