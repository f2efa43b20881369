"""The backend's process life cycle (prepare, start, connect, stop, kill, cleanup) with the fake
firecracker on PATH, which serves the API and a vsock agent as Firecracker would (fake_firecracker.py):
no firecracker binary and no hardware KVM exist here. test_e2e.py runs the real thing where they do."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from agentkernel.backends.base import Mount
from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.backend import FirecrackerBackend
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import Accel
from agentkernel.service import sandboxes
from tests.firecracker.conftest import KVM, NO_NETWORK, Fake, MakeSpec, processes_naming

PVM = Accel("tcg", "/dev/kvm is present but the CPU has no vmx/svm: a PVM host")


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_missing_binary_and_kvm_is_one_line(
    make_spec: MakeSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Fake
) -> None:
    needs = (
        "firecracker backend needs the firecracker binary on PATH and hardware KVM (/dev/kvm with vmx/svm)"
    )
    with pytest.raises(AgentkernelError) as info:
        FirecrackerBackend(PVM).prepare(make_spec())
    assert str(info.value) == f"{needs}: {PVM.note}"  # the fake binary is on PATH here
    monkeypatch.setenv("PATH", str(tmp_path))
    for accel, missing in (
        (PVM, f"no firecracker binary on PATH; {PVM.note}"),
        (KVM, "no firecracker binary on PATH"),
    ):
        with pytest.raises(AgentkernelError) as info:
            FirecrackerBackend(accel).start(make_spec())
        assert str(info.value) == f"{needs}: {missing}"


def test_prepare_gives_each_sandbox_its_own_disk(
    backend: FirecrackerBackend, make_spec: MakeSpec, files: tuple[Path, Path]
) -> None:
    image = files[1]
    one, two = make_spec("one"), make_spec("two")
    backend.prepare(one)
    backend.prepare(two)
    for vm in (one, two):
        copy = fc.disk(vm)
        assert copy.read_bytes() == image.read_bytes()
        assert copy.stat().st_ino != image.stat().st_ino
        assert copy.stat().st_mode & 0o777 == 0o600
        assert copy.stat().st_blocks < image.stat().st_size // 512 // 4  # holes stayed holes
    with fc.disk(one).open("r+b") as f:
        f.write(b"written by one")
    assert fc.disk(two).read_bytes().startswith(b"head of the image")
    assert image.read_bytes().startswith(b"head of the image")
    read_only = make_spec("ro", read_only=True)
    backend.prepare(read_only)
    assert fc.disk(read_only) == image and not (read_only.workdir / "rootfs.ext4").exists()


def test_what_firecracker_cannot_do_is_refused(
    backend: FirecrackerBackend, make_spec: MakeSpec, tmp_path: Path
) -> None:
    with pytest.raises(AgentkernelError, match="cannot share host directories"):
        backend.prepare(make_spec(mounts=(Mount(tmp_path, "/workspace", False),)))
    with pytest.raises(AgentkernelError, match="raw images only"):
        backend.prepare(make_spec(image_format="qcow2"))


def test_life_cycle(backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake) -> None:
    vm = make_spec(vcpus=2, memory_mb=256, max_procs=100)
    backend.prepare(vm)
    fc.api_socket(vm).write_text("left by a killed run")  # Firecracker refuses an existing socket
    pid = backend.start(vm)
    assert backend.is_alive(vm, pid)
    assert os.getsid(pid) == pid  # its own session: it outlives the process that started it
    assert not backend.is_alive(vm, os.getpid()) and not backend.is_alive(make_spec("other"), pid)
    layout = fc.host_layout(vm)
    puts = [(p, b) for m, p, b in fake.api_calls() if m == "PUT"]
    assert puts == [*fc.config_requests(vm, layout), ("/actions", {"action_type": "InstanceStart"})]

    async def sessions() -> None:
        # Booting: the vsock socket refuses CONNECT until the guest's agent listens; connect waits.
        first = await backend.connect(vm, pid, timeout=30)
        second = await backend.connect(vm, pid, port=7, timeout=30)  # independent of the first
        assert first.agent_info == second.agent_info == "fake agent"
        assert await first.ping() < 5 and await second.ping() < 5
        await second.close()
        assert await first.ping() < 5
        await first.shutdown()  # the agent powers off: the guest reboots and Firecracker exits
        await first.close()

    run(sessions())
    hellos = [r for r in fake.requests() if "hello" in r]
    assert hellos[0] == {"hello": "fc1", "memory_mb": 256, "max_procs": 100, "id": fc.instance_id(vm)}
    for _ in range(500):
        if not backend.is_alive(vm, pid):
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not backend.is_alive(vm, pid)
    assert "reboot: Restarting system" in vm.console_log.read_text()
    backend.kill(vm, pid)
    backend.cleanup(vm, keep_disk=True)
    assert not vm.rundir.exists() and fc.disk(vm).exists() and fc.log_file(vm).exists()
    pid = backend.start(vm)  # again, on the kept disk
    assert backend.is_alive(vm, pid)
    backend.kill(vm, pid)
    assert not backend.is_alive(vm, pid)
    backend.cleanup(vm, keep_disk=False)
    assert not vm.workdir.exists() and not vm.rundir.exists()


def test_stop_goes_through_the_agent(service: Path, fake: Fake) -> None:
    """`stop` asks the agent to power off, as under QEMU: the guest reboots and Firecracker exits by
    itself. No Ctrl-Alt-Del: Linux makes it a SIGINT for init, the agent, which ignores it."""
    sandboxes.create("box", backend="firecracker", policy=NO_NETWORK, memory_mb=128)
    run(sandboxes.start("box"))
    run(sandboxes.stop("box"))
    assert sandboxes.get("box").status == "stopped"
    assert [call for call in fake.api_calls() if call[1] == "/actions"] == [
        ("PUT", "/actions", {"action_type": "InstanceStart"})
    ]
    assert "reboot: Restarting system" in (service / "sandboxes" / "box" / "console.log").read_text()


def test_the_console_log_is_bounded(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that floods its serial console fills no disk: the console log keeps its last lines,
    from a line start, within the cap."""
    cap = 64 << 10
    monkeypatch.setattr(fc, "CONSOLE_CAP", cap)
    monkeypatch.setenv("FAKE_FC_CONSOLE_FLOOD", str(4 << 20))
    vm = make_spec()
    backend.prepare(vm)
    pid = backend.start(vm)

    async def booted() -> None:
        conn = await backend.connect(vm, pid, timeout=60)  # the agent listens after the flood
        await conn.close()

    run(booted())
    for _ in range(500):
        if b"agent listening" in vm.console_log.read_bytes():
            break
        time.sleep(0.01)
    text = vm.console_log.read_text()
    assert vm.console_log.stat().st_size <= cap and stat.S_IMODE(vm.console_log.stat().st_mode) == 0o600
    assert text.startswith("fake guest: console line ") and "console line 000000000" not in text
    assert text.endswith("fake guest: booted, agent listening on vsock port 52000\n")
    backend.kill(vm, pid)
    backend.cleanup(vm, keep_disk=False)


def test_refused_request_is_one_line_and_leaves_nothing_running(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_spec()
    backend.prepare(vm)
    monkeypatch.setenv("FAKE_FC_FAIL", "/drives/rootfs")
    with pytest.raises(AgentkernelError) as info:
        backend.start(vm)
    assert str(info.value) == (
        "firecracker refused PUT /drives/rootfs (HTTP 400): "
        "Fake failure requested for /drives/rootfs: second line of the fault."
    )
    assert processes_naming(str(vm.rundir)) == []


def test_crash_at_start_names_firecrackers_log(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_spec()
    backend.prepare(vm)
    monkeypatch.setenv("FAKE_FC_CRASH", "start")
    with pytest.raises(AgentkernelError) as info:
        backend.start(vm)
    message = str(info.value)
    assert message.startswith("firecracker API PUT /actions: no answer on")
    assert "firecracker exited: firecracker log: " in message and "fake start failure" in message
    assert "\n" not in message


def test_connect_fails_fast_when_the_guest_dies(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_spec()
    backend.prepare(vm)
    monkeypatch.setenv("FAKE_FC_CRASH", "boot")
    pid = backend.start(vm)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(AgentkernelError) as info:
            await backend.connect(vm, pid, timeout=60)
        assert loop.time() - start < 10  # not the whole timeout
        message = str(info.value)
        assert message.startswith("the microVM is not running: firecracker log: ")
        assert "the guest panicked" in message and "Kernel panic - not syncing" in message

    run(body())
    backend.cleanup(vm, keep_disk=False)


def test_connect_times_out_with_the_logs(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_spec()
    backend.prepare(vm)
    monkeypatch.setenv("FAKE_FC_BOOT_TIME", "3600")  # a guest that never gets to its agent
    pid = backend.start(vm)

    async def body() -> None:
        with pytest.raises(
            AgentkernelError,
            match=r"did not answer within 0.5s \(vsock CONNECT 52000 .* refused .*\): firecracker log: ",
        ):
            await backend.connect(vm, pid, timeout=0.5)

    run(body())
    backend.kill(vm, pid)
