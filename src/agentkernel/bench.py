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
from dataclasses import replace
from pathlib import Path
from typing import Any

from agentkernel import hostinfo
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends import qemu
from agentkernel.backends.base import VMSpec
from agentkernel.config import PROFILES
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.pool import control
from agentkernel.service import sandboxes, snapshots

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


async def _exec_and_stop(name: str, rounds: int) -> tuple[list[float], float]:
    async with sandboxes.session(name) as conn:
        times = []
        for _ in range(rounds):
            start = time.monotonic()
            done = await conn.run(["true"])
            times.append(time.monotonic() - start)
            assert done.status.exit_code == 0
    start = time.monotonic()
    await sandboxes.stop(name)
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
    sandboxes.create(name, image=image, backend="qemu")
    try:
        asyncio.run(sandboxes.start(name))
        exec_times, stop_time = asyncio.run(_exec_and_stop(name, rounds=max(10, runs * 4)))
    finally:
        sandboxes.remove(name, force=True)
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
    no_network = replace(PROFILES["moderate"], network=False)  # like the bare boot: no gateway
    names = [f"bench-fork-{tag}-{i}" for i in range(forks)]
    made: list[str] = []
    try:
        sandboxes.create(source, image=image, backend="qemu", policy=no_network)
        made.append(source)
        cold = asyncio.run(_timed(sandboxes.start(source)))
        asyncio.run(snapshots.create(source, snapshot))
        restores = []
        for name in names:
            restores.append(asyncio.run(_timed(snapshots.fork(snapshot, name))))
            made.append(name)
        time.sleep(1)  # let the resumed guests settle before their memory is read
        cold_pss = pss_bytes(_pid(source))
        fork_pss = [pss_bytes(_pid(name)) for name in names]
    finally:
        for name in made:
            sandboxes.remove(name, force=True)
        with contextlib.suppress(AgentkernelError):
            snapshots.remove(snapshot)
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


def _pid(name: str) -> int:
    pid = sandboxes.get(name).pid
    if pid is None:
        raise AgentkernelError(f"sandbox {name} is not running")
    return pid


POOL_SIZE = 2


def pool_figures(*, runs: int = 5, image: str = "base") -> dict[str, Any]:
    """`run -- true` cold against through the warm pool, in process (the service calls `run` makes)
    and through the CLI, measured side by side with a pool daemon this benchmark starts."""
    if control.running_pid() is not None:
        raise AgentkernelError("the pool daemon is running: stop it first (the benchmark starts its own)")
    policy = replace(PROFILES["moderate"], network=False)
    options = {"image": image, "backend": "qemu", "policy": policy}
    cold, pooled, cli_cold, cli_pooled = [], [], [], []
    control.start(
        images=[image], size=POOL_SIZE, policy=policy, backend="qemu", max_age=3600, health_interval=60
    )
    try:
        control.wait_ready(lambda _status: None)
        for _ in range(runs):
            cold.append(asyncio.run(_run_true(pool=False, **options)))
            pooled.append(asyncio.run(_run_true(pool=True, **options)))
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


async def _run_true(*, pool: bool, **options: Any) -> float:
    """Seconds for what `run -- true` does: a sandbox (new or from the pool), the command, removal."""
    start = time.monotonic()
    async with sandboxes.ephemeral(pool=pool, **options) as (_name, conn):
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
