"""A Firecracker sandbox's network: the tap device in a namespace of its own, nftables, and the
forwarder to the egress gateway. The wiring is real where this runs as root; the guest behind the tap
is the real kernel and agent, run by QEMU on that tap (Firecracker cannot run here), so that every
part but the VMM is what a Firecracker sandbox uses."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.qemu import backend as qemu
from agentkernel.backends.qemu.backend import QemuBackend
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import accel
from agentkernel.network import launcher as gateway
from agentkernel.network.policy import EgressRules
from tests.conftest import HOST_PAGE
from tests.firecracker.conftest import MakeSpec, processes_naming

RULES = EgressRules(allow=("127.0.0.1",))  # the host's loopback, opened on purpose for the test server


def can_wire() -> str:
    """Why the real wiring cannot be tested here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root"
    if missing := [p for p in ("ip", "nft", "socat") if not shutil.which(p)]:
        return f"needs {', '.join(missing)}"
    probe = f"akfc-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


WHY_NOT = can_wire()
wiring = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


def test_commands(make_spec: MakeSpec) -> None:
    vm = make_spec("net")
    ns = fc.netns_name(vm)
    commands = fc.network_commands(vm, owner=(65534, 65534))
    assert commands[:-1] == [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "user", "65534", "group", "65534"],
        ["ip", "-n", ns, "addr", "add", "10.0.2.100/24", "dev", "tap0"],
        ["ip", "-n", ns, "link", "set", "tap0", "up"],
    ]
    assert commands[-1] == ["ip", "netns", "exec", ns, "nft", fc.nft_ruleset()]
    rules = fc.nft_ruleset()
    assert rules.count("policy drop") == 3
    assert 'iifname "tap0" ip daddr 10.0.2.100 tcp dport 3128 accept' in rules
    assert fc.network_commands(vm)[2] == ["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]
    assert fc.forwarder_command(vm) == [
        "ip", "netns", "exec", ns, "socat", "TCP-LISTEN:3128,bind=10.0.2.100,reuseaddr,fork",
        f"UNIX-CONNECT:{vm.rundir / 'gateway.sock'}",
    ]  # fmt: skip


def test_without_root_one_line(make_spec: MakeSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(AgentkernelError) as info:
        fc.setup_network(make_spec(egress=RULES))
    assert str(info.value) == fc.NETWORK_NEEDS_ROOT


@pytest.fixture
def wired(isolated_home: Path, tmp_path: Path) -> Iterator[VMSpec]:
    """A sandbox's gateway and network namespace (torn down afterwards, whatever happened)."""
    rundir = Path(tempfile.mkdtemp(prefix="akfc-"))
    vm = VMSpec("nettest", Path("/nonexistent"), Path("/nonexistent"), tmp_path / "vm", rundir, egress=RULES)
    try:
        gateway.start(vm.name, RULES, rundir)
        fc.setup_network(vm)
        yield vm
    finally:
        fc.teardown_network(vm)
        gateway.stop(vm.name, rundir)
        shutil.rmtree(rundir, ignore_errors=True)


def in_netns(vm: VMSpec, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", fc.netns_name(vm), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


CLIENT = """
import socket, sys
s = socket.create_connection(("10.0.2.100", int(sys.argv[1])), timeout=10)
s.sendall(sys.argv[2].encode())
print(s.recv(4096).decode(errors="replace"))
"""


@wiring
def test_wiring_reaches_the_gateway_and_comes_apart(wired: VMSpec, host_server: int) -> None:
    vm = wired
    assert "10.0.2.100/24" in in_netns(vm, "ip", "-o", "addr", "show", "dev", "tap0")
    ruleset = in_netns(vm, "nft", "list", "ruleset")
    assert "table inet agentkernel" in ruleset and "policy drop" in ruleset
    request = f"GET http://127.0.0.1:{host_server}/ HTTP/1.1\r\nHost: 127.0.0.1:{host_server}\r\n\r\n"
    answer = ""
    for _ in range(100):  # the gateway and the forwarder may still be starting
        answer = subprocess.run(
            ["ip", "netns", "exec", fc.netns_name(vm), "python3", "-c", CLIENT, "3128", request],
            capture_output=True,
            text=True,
        ).stdout
        if HOST_PAGE in answer:
            break
        time.sleep(0.05)
    assert HOST_PAGE in answer
    forwarder = int(fc.forwarder_pidfile(vm).read_text())
    fc.teardown_network(vm)
    assert not (fc.NETNS_DIR / fc.netns_name(vm)).exists()
    assert forwarder not in processes_naming(str(gateway.socket_path(vm.rundir)))
    assert not fc.forwarder_pidfile(vm).exists()
    fc.teardown_network(vm)  # again: nothing left to do, no error


@wiring
@pytest.mark.vm
def test_guest_on_the_tap(
    wired: VMSpec, host_server: int, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real guest on the tap: its only way out is the gateway; nothing else answers."""
    kernel, image = artifacts
    rundir = Path(tempfile.mkdtemp(prefix="akfc-"))
    vm = VMSpec("tapguest", kernel, image, workdir=tmp_path / "guest", rundir=rundir, egress=RULES)
    vmm = QemuBackend()
    vmm.prepare(vm)
    cmd = qemu.command(vm, accel())
    cmd[cmd.index("-netdev") + 1] = f"tap,id=net0,ifname={fc.TAP},script=no,downscript=no"
    subprocess.run(["ip", "netns", "exec", fc.netns_name(wired), *cmd], check=True, capture_output=True)
    pid = int(qemu.pidfile(vm).read_text())
    # A server on the host side of the tap, but not on the proxy port: the firewall must hide it.
    hidden = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            fc.netns_name(wired),
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "10.0.2.100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def body() -> None:
        conn = await vmm.connect(vm, pid, timeout=120)
        try:
            script = (
                # (busybox 1.35's wget -T crashes: `timeout` bounds each attempt instead)
                f"timeout 10 wget -q -O - http://127.0.0.1:{host_server}/; echo; "
                "http_proxy= timeout 3 wget -q -O - http://10.0.2.100:8080/ || echo other-port-hidden; "
                f"http_proxy= timeout 3 wget -q -O - http://10.0.2.2:{host_server}/ || echo gateway-ip-dead; "
                "ip -o -4 addr show dev eth0"
            )
            done = await conn.run(["sh", "-c", script], env=gateway.proxy_env())
            out = done.stdout.decode()
            assert HOST_PAGE in out
            assert "other-port-hidden" in out and "gateway-ip-dead" in out
            assert "10.0.2.15/24" in out
        finally:
            await conn.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 300))
    finally:
        hidden.kill()
        hidden.wait()
        vmm.kill(vm, pid)
        vmm.cleanup(vm, keep_disk=False)
