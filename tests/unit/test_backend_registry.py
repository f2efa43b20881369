"""The backend registry: names, ranks, capabilities, selection, lazy loading; and the connect loop that
every backend shares, which must close a connection whose HELLO failed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agentkernel import hostinfo, procs
from agentkernel.backends import get_backend, registry
from agentkernel.backends.base import AGENT_PATH, Backend, VMSpec
from agentkernel.backends.container.backend import ContainerBackend
from agentkernel.backends.qemu.backend import QemuBackend, agent_socket, pidfile
from agentkernel.backends.registry import BackendInfo, BackendStatus, Capability
from agentkernel.config import load_config
from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.hostinfo import Accel
from agentkernel.protocol.frames import VERSION, FrameType, Tag, encode, encode_record
from tests.conftest import REPO

YES, NO = BackendStatus(True, "works"), BackendStatus(False, "missing")


def fake(
    name: str,
    rank: int,
    capabilities: set[Capability],
    *,
    made: list[str] | None = None,
    **extra: Any,
) -> BackendInfo:
    def factory(profile: str) -> Backend:
        if made is not None:
            made.append(profile)
        return cast(Backend, object())

    return BackendInfo(
        name=name,
        rank=rank,
        isolation="vm",
        capabilities=frozenset(capabilities),
        probe=lambda: YES,
        factory=factory,
        **extra,
    )


@pytest.fixture
def registered() -> Iterator[Callable[[BackendInfo], None]]:
    """Registers entries for one test; they are gone afterwards."""
    names: list[str] = []

    def add(info: BackendInfo) -> None:
        registry.register(info)
        names.append(info.name)

    yield add
    for name in names:
        registry.unregister(name)


def built_in(names: list[str]) -> list[str]:
    """`names` without those of backends other tests may have registered."""
    return [name for name in names if name in registry.BUILTIN]


def test_built_in_backends_by_rank() -> None:
    assert built_in(registry.names()) == ["firecracker", "qemu", "container"]
    assert registry.info("container").isolation == "container"
    assert "snapshot" not in registry.info("container").capabilities
    assert {"snapshot", "network", "shared_dirs"} <= registry.info("qemu").capabilities
    assert "shared_dirs" not in registry.info("firecracker").capabilities


def test_an_unknown_name_is_one_line_naming_the_registered_ones() -> None:
    with pytest.raises(AgentkernelError) as caught:
        get_backend("lxc")
    assert str(caught.value) == f"unknown backend 'lxc': use {', '.join(registry.names())}"
    assert "firecracker, qemu, container" in str(caught.value)


def test_register_and_unregister(registered: Callable[[BackendInfo], None], tmp_path: Path) -> None:
    made: list[str] = []
    registered(fake("fake", 5, {"network"}, made=made))
    assert registry.names().index("fake") < registry.names().index("firecracker")  # 5 before 10
    get_backend("fake", profile="restrictive")
    assert made == ["restrictive"]
    (tmp_path / "agentkernel.toml").write_text('[sandbox]\nbackend = "fake"\n')
    config, _ = load_config(tmp_path / "agentkernel.toml")
    assert config.sandbox.backend == "fake"  # a registered name is a valid config value
    registry.unregister("fake")
    assert "fake" not in registry.names()
    with pytest.raises(
        AgentkernelError, match=r"^unknown backend 'fake': use .*firecracker, qemu, container"
    ):
        get_backend("fake")
    with pytest.raises(AgentkernelError, match=r"sandbox\.backend: must be one of .*firecracker, qemu"):
        load_config(tmp_path / "agentkernel.toml")


def test_register_replaces_by_name(registered: Callable[[BackendInfo], None]) -> None:
    made: list[str] = []
    original = registry.info("qemu")
    try:
        registry.register(fake("qemu", 20, set(), made=made))
        get_backend("qemu")
        assert made == ["moderate"] and registry.names().count("qemu") == 1
    finally:
        registry.register(original)
    assert isinstance(get_backend("qemu"), QemuBackend)


def test_selection_follows_rank_and_capabilities() -> None:
    """A sandbox gets the best-ranked backend that has what it needs and runs here."""
    entries = [
        fake("fast", 1, set(), requires=frozenset({"kvm"})),
        fake("netroot", 2, {"network"}, requires_for=(("network", "root"),)),
        fake("net", 3, {"network"}),
        fake("plain", 4, set()),
    ]
    asked: list[str] = []

    def select(*, network: bool, kvm: bool, root: bool, down: frozenset[str] = frozenset()) -> str:
        def status(name: str) -> BackendStatus:
            asked.append(name)
            return NO if name in down else YES

        return hostinfo.select_backend(
            None, needs_network=network, kvm=kvm, root=root, status=status, candidates=entries
        )

    assert select(network=False, kvm=True, root=False) == "fast"
    assert select(network=False, kvm=False, root=False) == "netroot"  # "fast" needs KVM
    assert select(network=True, kvm=True, root=True) == "netroot"  # "fast" has no network
    assert select(network=True, kvm=True, root=False) == "net"  # netroot's network needs root
    assert select(network=False, kvm=True, root=True, down=frozenset({"fast", "netroot", "net"})) == "plain"
    asked.clear()
    assert select(network=True, kvm=False, root=False) == "net"
    assert asked == ["net"]  # only backends that could serve the sandbox are probed
    with pytest.raises(AgentkernelError) as caught:
        select(network=True, kvm=False, root=False, down=frozenset({"net", "netroot"}))
    assert "a sandbox with network cannot run on fast, plain (no network)" in str(caught.value)


def test_the_registry_and_its_help_import_no_backend_module() -> None:
    """The CLI reads the registry at startup: that must not import a backend's heavy modules."""
    code = (
        "import sys\n"
        "from agentkernel.backends import registry\n"
        "from agentkernel import hostinfo\n"
        "print(registry.names(), hostinfo.isolation_warning('qemu'))\n"
        "print(sorted(m for m in sys.modules if m.endswith(('.backend', '.qmp', '.api', '.rootfs'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.splitlines() == ["['firecracker', 'qemu', 'container'] None", "[]"]


# ---- the shared connect loop: a connection whose HELLO failed is closed --------------------------


class Guest:
    """A Unix socket server standing in for the agent: it reads whatever comes and, when `answer`
    is set, answers it with a HELLO that lacks the protocol magic (a failed HELLO); it records
    which connections the host closed."""

    def __init__(self, path: Path, *, answer: bool) -> None:
        self.path = path
        self.answer = answer
        self.opened = 0
        self.closed = 0

    async def __aenter__(self) -> Guest:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                if self.answer:
                    writer.write(encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, VERSION)])))
                    await writer.drain()
        self.closed += 1
        writer.close()

    async def all_closed(self) -> bool:
        for _ in range(100):
            if self.opened and self.closed == self.opened:
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture
def rundir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="akr-") as name:  # short: Unix socket paths are limited
        yield Path(name)


def spec_in(rundir: Path) -> VMSpec:
    workdir = rundir / "work"
    workdir.mkdir()
    spec = VMSpec(name="box", kernel=rundir / "k", image=rundir / "i", workdir=workdir, rundir=rundir)
    spec.console_log.write_text("booting\n")
    return spec


@contextlib.contextmanager
def standing_in(argv: list[str], executable: str = sys.executable) -> Iterator[int]:
    """A real process with the command line a sandbox's VMM or agent has, so is_alive finds it."""
    proc = subprocess.Popen(argv, executable=executable)
    try:
        while procs.argv(proc.pid)[:1] != [argv[0].encode()]:  # not yet exec'd: still our command line
            time.sleep(0.005)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def qemu_case(rundir: Path) -> tuple[Backend, VMSpec, Path, list[str]]:
    spec = spec_in(rundir)
    argv = ["qemu-stand-in", "-c", "import time; time.sleep(60)", "-pidfile", str(pidfile(spec))]
    return QemuBackend(Accel("tcg", "")), spec, agent_socket(spec, 0), argv


def container_case(rundir: Path) -> tuple[Backend, VMSpec, Path, list[str]]:
    spec = spec_in(rundir)
    own = Path("/proc/self/cgroup").read_text().strip().rsplit(":", 1)[-1]
    (spec.workdir / "container.id").write_text(own + "\n")  # the stand-in runs in this cgroup
    argv = [AGENT_PATH, "-c", "import time; time.sleep(60)"]
    return ContainerBackend(), spec, rundir / "agent.sock", argv


CASES = {"qemu": qemu_case, "container": container_case}


@pytest.mark.parametrize("backend_name", sorted(CASES))
def test_a_failed_hello_leaves_no_connection_open(backend_name: str, rundir: Path) -> None:
    backend, spec, sock, argv = CASES[backend_name](rundir)

    async def scenario() -> Guest:
        async with Guest(sock, answer=True) as guest:
            with standing_in(argv) as pid, pytest.raises(AgentConnectionError):
                await backend.connect(spec, pid, port=0, timeout=1.5)
            assert await guest.all_closed(), f"{guest.opened - guest.closed} of {guest.opened} left open"
            return guest

    assert asyncio.run(scenario()).opened >= 1


@pytest.mark.parametrize("backend_name", sorted(CASES))
def test_a_connect_cancelled_during_hello_closes_its_connection(backend_name: str, rundir: Path) -> None:
    """The caller gives up (a timeout of its own, Ctrl-C) while the agent has not answered yet."""
    backend, spec, sock, argv = CASES[backend_name](rundir)

    async def scenario() -> None:
        async with Guest(sock, answer=False) as guest:
            with standing_in(argv) as pid, pytest.raises(TimeoutError):
                await asyncio.wait_for(backend.connect(spec, pid, port=0, timeout=30), 2.0)
            assert guest.opened == 1
            assert await guest.all_closed(), "the connection was left open"

    asyncio.run(scenario())
