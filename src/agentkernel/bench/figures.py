"""Benchmarks that print figures: our overhead on top of a bare QEMU boot, exec round trip, stop time.

Each figure is the median of several runs, measured side by side in one process so that the ratios
compare like with like on a shared, noisy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agentkernel import hostinfo
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu import backend as qemu
from agentkernel.config import Config
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.pool import control
from agentkernel.service.request import SandboxFlags, SandboxRequest, resolve
from agentkernel.service.service import SandboxService, call

READY = b"agentkernel-agent: ready"


def bare_boot(spec: VMSpec, accel: hostinfo.Accel) -> float:
    """Seconds from starting QEMU (same kernel, image, devices; not daemonized) to the agent's ready line."""
    cmd = qemu.command(spec, accel, daemonize=False)
    serial = cmd.index("-serial")
    cmd[serial + 1] = "stdio"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while READY not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AgentkernelError("bare QEMU exited before the agent was ready")
            seen = seen[-4096:] + chunk
        return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


def agentkernel_run(*args: str) -> list[str]:
    """The command line of `agentkernel run --backend qemu ARGS...` in this Python."""
    return [sys.executable, "-m", "agentkernel", "run", "--backend", "qemu", *args]


def cli_run_to_start(image: str, *flags: str) -> float:
    """Seconds from launching `agentkernel run` to the command's first output."""
    start = time.monotonic()
    proc = subprocess.Popen(
        agentkernel_run("--image", image, "--no-pool", *flags, "--", "echo", "started"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - start
    _, err = proc.communicate(timeout=120)
    if line != b"started\n" or proc.returncode != 0:
        raise AgentkernelError(f"`agentkernel run` failed: {err.decode(errors='replace').strip()}")
    return elapsed


def _request(image: str, *, network: bool | None = None) -> SandboxRequest:
    """A QEMU sandbox of `image` with the defaults (no project's agentkernel.toml: figures compare)."""
    flags = SandboxFlags(image=image, backend="qemu", network=network)
    return resolve(flags, Config(), project_dir=Path.cwd())


async def _exec_and_stop(service: SandboxService, name: str, rounds: int) -> tuple[list[float], float]:
    conn = await service.connection(name)
    times = []
    for _ in range(rounds):
        start = time.monotonic()
        done = await conn.run(["true"])
        times.append(time.monotonic() - start)
        assert done.status.exit_code == 0
    start = time.monotonic()
    await service.stop(name)
    return times, time.monotonic() - start


def _cli_version() -> float:
    """Seconds for `agentkernel --version`: the interpreter and the CLI's imports, nothing else."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "agentkernel", "--version"], check=True, capture_output=True)
    return time.monotonic() - start


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def lifecycle(*, runs: int = 5, image: str = "base") -> dict[str, Any]:
    accel = hostinfo.accel()
    vmlinux = kernel_artifact.current()
    if vmlinux is None:
        raise AgentkernelError("no guest kernel: run `agentkernel setup`")
    img = store.get(image)
    with tempfile.TemporaryDirectory(prefix="akbench-") as tmp:
        spec = VMSpec("bench", vmlinux, img.path, workdir=Path(tmp) / "vm", rundir=Path(tmp) / "run")
        spec.rundir.mkdir(parents=True)
        backend = qemu.QemuBackend(accel)
        backend.prepare(spec)
        bare, ours, networked = [], [], []
        try:
            for _ in range(runs):  # interleaved, so drift in machine load hits all alike
                bare.append(bare_boot(spec, accel))
                ours.append(cli_run_to_start(image, "--no-network"))  # the same VM as the bare one
                networked.append(cli_run_to_start(image))  # the default profile: network through a gateway
        finally:
            backend.cleanup(spec, keep_disk=False)  # the bare VM's RAM file and disk
    name = f"bench-{secrets.token_hex(3)}"

    async def exec_and_stop(service: SandboxService) -> tuple[list[float], float]:
        await service.create(_request(image), name=name)
        try:
            return await _exec_and_stop(service, name, rounds=max(10, runs * 4))
        finally:
            await service.remove(name, force=True)

    exec_times, stop_time = call(exec_and_stop)
    bare_s, ours_s = _median(bare), _median(ours)
    return {
        "accel": accel.name,
        "runs": runs,
        "image": image,
        "bare_qemu_boot_to_agent_s": round(bare_s, 3),
        "run_to_command_start_s": round(ours_s, 3),
        "overhead_ratio": round(ours_s / bare_s - 1, 3),
        "run_with_network_to_command_start_s": round(_median(networked), 3),
        "exec_round_trip_true_s": round(_median(exec_times[1:]), 4),
        "first_exec_in_new_vm_s": round(exec_times[0], 4),
        "cli_start_s": round(_median([_cli_version() for _ in range(runs)]), 3),
        "stop_s": round(stop_time, 3),
        "samples": {
            "bare": [round(x, 3) for x in bare],
            "run": [round(x, 3) for x in ours],
            "run_with_network": [round(x, 3) for x in networked],
        },
        "cpus": os.cpu_count(),
    }


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process: its fair share of pages it shares with others."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AgentkernelError(f"no Pss in /proc/{pid}/smaps_rollup")


async def _timed(coro: Coroutine[Any, Any, Any]) -> float:
    start = time.monotonic()
    await coro
    return time.monotonic() - start


def snapshot_figures(*, forks: int = 10, image: str = "base") -> dict[str, Any]:
    """Cold boot-to-ready against restore-to-ready, and host memory (PSS) of a cold VMM against that of
    each of `forks` idle copies resumed from one snapshot, measured in one run."""
    tag = secrets.token_hex(3)
    source, snapshot = f"bench-cold-{tag}", f"bench-snap-{tag}"
    names = [f"bench-fork-{tag}-{i}" for i in range(forks)]

    async def measure(service: SandboxService) -> tuple[float, list[float], int, list[int]]:
        made: list[str] = []
        try:
            await service.create(_request(image, network=False), name=source, start=False)  # no gateway
            made.append(source)
            cold = await _timed(service.start(source))
            await service.snapshot(source, snapshot)
            restores = []
            for name in names:
                restores.append(await _timed(service.fork(snapshot, name)))
                made.append(name)
            await asyncio.sleep(1)  # let the resumed guests settle before their memory is read
            cold_pss = pss_bytes(await _pid(service, source))
            return cold, restores, cold_pss, [pss_bytes(await _pid(service, name)) for name in names]
        finally:
            for name in made:
                await service.remove(name, force=True)
            with contextlib.suppress(AgentkernelError):
                await service.remove_snapshot(snapshot)

    cold, restores, cold_pss, fork_pss = call(measure)
    restore = _median(restores)
    return {
        "cold_boot_to_ready_s": round(cold, 3),
        "restore_to_ready_s": round(restore, 3),
        "restore_over_cold": round(restore / cold, 3),
        "cold_pss_bytes": cold_pss,
        "restored_pss_bytes_mean": int(statistics.mean(fork_pss)),
        "restored_over_cold_pss": round(statistics.mean(fork_pss) / cold_pss, 3),
        "forks": forks,
    }


async def _pid(service: SandboxService, name: str) -> int:
    pid = (await service.get(name)).pid
    if pid is None:
        raise AgentkernelError(f"sandbox {name} is not running")
    return pid


POOL_SIZE = 2


def pool_figures(*, runs: int = 5, image: str = "base") -> dict[str, Any]:
    """`run -- true` cold against through the warm pool, in process (the service calls `run` makes)
    and through the CLI, measured side by side with a pool daemon this benchmark starts."""
    if control.running_pid() is not None:
        raise AgentkernelError("the pool daemon is running: stop it first (the benchmark starts its own)")
    request = _request(image, network=False)
    cold, pooled, cli_cold, cli_pooled = [], [], [], []
    control.start(
        images=[image],
        size=POOL_SIZE,
        policy=request.policy,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        backend="qemu",
        max_age=3600,
        health_interval=60,
    )
    try:
        control.wait_ready(lambda _status: None)
        for _ in range(runs):
            cold.append(call(lambda service: _run_true(service, request, pool=False)))
            pooled.append(call(lambda service: _run_true(service, request, pool=True)))
            control.wait_ready(lambda _status: None)
            cli_cold.append(_cli_run_true("--no-pool"))
            cli_pooled.append(_cli_run_true())
            control.wait_ready(lambda _status: None)
        handed_out = control.status()["pools"][0]["handed_out"]
    finally:
        control.stop()
    if handed_out != 2 * runs:
        raise AgentkernelError(f"the pool handed out {handed_out} sandboxes for {2 * runs} pooled runs")
    cold_s, pooled_s = _median(cold), _median(pooled)
    cli_cold_s, cli_pooled_s = _median(cli_cold), _median(cli_pooled)
    return {
        "cold_run_true_s": round(cold_s, 3),
        "pool_run_true_s": round(pooled_s, 4),
        "pool_over_cold": round(pooled_s / cold_s, 3),
        "cli_cold_run_true_s": round(cli_cold_s, 3),
        "cli_pool_run_true_s": round(cli_pooled_s, 3),
        "cli_pool_over_cold": round(cli_pooled_s / cli_cold_s, 3),
        "pool_size": POOL_SIZE,
    }


async def _run_true(service: SandboxService, request: SandboxRequest, *, pool: bool) -> float:
    """Seconds for what `run -- true` does: a sandbox (new or from the pool), the command, removal."""
    start = time.monotonic()
    async with service.ephemeral(request, pool=pool) as (_name, conn):
        done = await conn.run(["true"])
    if done.status.exit_code != 0:
        raise AgentkernelError("`true` failed in the sandbox")
    return time.monotonic() - start


def _cli_run_true(*flags: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        agentkernel_run("--no-network", *flags, "--", "true"), stdin=subprocess.DEVNULL, capture_output=True
    )
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise AgentkernelError(f"`agentkernel run` failed: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed
