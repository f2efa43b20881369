"""A real microVM whose guest is hostile: a busybox script runs in place of the agent and writes to the
virtio-serial ports what no agent would. The host's side (QemuBackend.connect and Connection) must
fail cleanly, in bounded time and memory, while another connection goes on unaffected."""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu.backend import AGENT_PATH, QemuBackend
from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    FrameType,
    Tag,
    encode,
    encode_record,
)
from tests.hostile.conftest import Guests, steady_work
from tests.vm.conftest import Artifacts

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("traced")]

# PID 1 of the hostile guest. Port agentkernel.0 gets random bytes without end; agentkernel.1 a proper
# HELLO answer, then a frame header claiming 64 times the payload limit and zeros without end.
GUEST = r"""#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t devtmpfs dev /dev
$bb mount -t sysfs sys /sys
port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$($bb cat "$p/name")" = "$1" ] && echo "/dev/${p##*/}"
    done
}
$bb echo "hostile guest: ports $(port agentkernel.0) $(port agentkernel.1)"
$bb cat /dev/urandom > "$(port agentkernel.0)" &
{ $bb cat /hello.bin; $bb sleep 2; $bb cat /oversized.bin /dev/zero; } > "$(port agentkernel.1)" &
while :; do $bb sleep 3600; done
"""
HELLO = encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, VERSION), (Tag.MAGIC, MAGIC)]))
OVERSIZED = HEADER.pack(64 * MAX_PAYLOAD, 0, FrameType.PONG, 0)
GARBAGE_TIMEOUT = 20.0
BOUND = 8 * MAX_PAYLOAD  # as in test_hostile_guests.py


@pytest.fixture
def hostile_image(artifacts: Artifacts, tmp_path: Path) -> Path:
    """A small ext4 root: the base image's static busybox, the script above as the agent, its data."""
    root = tmp_path / "root"
    for directory in ("bin", "sbin", "dev", "proc", "sys"):
        (root / directory).mkdir(parents=True)
    busybox = root / "bin" / "busybox"
    subprocess.run(
        ["debugfs", "-R", f"dump /bin/busybox {busybox}", str(artifacts.base_image)],
        check=True,
        capture_output=True,
    )
    busybox.chmod(0o755)
    agent = root / AGENT_PATH.lstrip("/")
    agent.write_text(GUEST)
    agent.chmod(0o755)
    (root / "hello.bin").write_bytes(HELLO)
    (root / "oversized.bin").write_bytes(OVERSIZED)
    image = tmp_path / "hostile.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(root), str(image), "16M"], check=True, capture_output=True
    )
    return image


@pytest.fixture
def hostile_vm(
    artifacts: Artifacts, hostile_image: Path, tmp_path: Path
) -> Iterator[tuple[QemuBackend, VMSpec, int]]:
    rundir = Path(tempfile.mkdtemp(prefix="akvm-"))  # short: Unix socket paths are limited
    spec = VMSpec(
        "hostile", artifacts.kernel, hostile_image, workdir=tmp_path / "vm", rundir=rundir, memory_mb=128
    )
    backend = QemuBackend()
    backend.prepare(spec)
    pid = backend.start(spec)
    try:
        yield backend, spec, pid
    finally:
        backend.kill(spec, pid)
        backend.cleanup(spec, keep_disk=False)
        shutil.rmtree(rundir, ignore_errors=True)


def test_hostile_guest_in_a_real_vm(hostile_vm: tuple[QemuBackend, VMSpec, int], guests: Guests) -> None:
    backend, spec, pid = hostile_vm

    async def body() -> None:
        async with await Connection.open_unix(guests("good"), shared_stream=True) as good:
            await good.hello(timeout=10)
            stop = asyncio.Event()
            rounds = asyncio.create_task(steady_work(good, stop))
            gc.collect()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]

            # Port 0: random bytes. The host looks for a HELLO in them, holding at most a few bytes.
            start = time.monotonic()
            with pytest.raises(AgentkernelError) as garbage:
                await asyncio.wait_for(backend.connect(spec, pid, port=0, timeout=GARBAGE_TIMEOUT), 120)
            garbage_s = time.monotonic() - start
            garbage_peak = tracemalloc.get_traced_memory()[1] - base
            assert str(garbage.value).startswith("the agent did not answer within")
            assert "hostile guest: ports /dev/vport" in spec.console_log.read_text(errors="replace")

            # Port 1: a HELLO, then a frame header far over the limit.
            tracemalloc.reset_peak()
            start = time.monotonic()
            conn = await asyncio.wait_for(backend.connect(spec, pid, port=1, timeout=60), 120)
            with pytest.raises(AgentConnectionError) as oversized:
                while True:
                    await conn.ping()
                    await asyncio.sleep(0.1)
            oversized_s = time.monotonic() - start
            oversized_peak = tracemalloc.get_traced_memory()[1] - base
            await conn.close()
            assert str(oversized.value) == (
                f"the sandbox agent broke the protocol: frame of {64 * MAX_PAYLOAD} bytes exceeds "
                f"the {MAX_PAYLOAD}-byte limit"
            )

            stop.set()
            assert await asyncio.wait_for(rounds, 60) >= 1
            assert not good.broken
        print(
            f"garbage: {garbage.value} after {garbage_s:.1f}s, host peak +{garbage_peak / 1024:.0f} KiB; "
            f"oversized: error after {oversized_s:.1f}s, host peak +{oversized_peak / 1024:.0f} KiB"
        )
        assert garbage_peak < BOUND and oversized_peak < BOUND

    asyncio.run(asyncio.wait_for(body(), 300))
