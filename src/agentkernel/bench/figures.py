"""Benchmarks that print figures: our overhead on top of a bare QEMU boot, exec round trip, stop time,
snapshots, the warm pool, filling it, and many sandboxes at once.

Each figure is the median of several runs, measured side by side in one process so that the ratios
compare like with like on a shared, noisy machine. Every command runs in a new empty project
directory with the image named, so `run` and the pool agree on the image wherever `bench` is started
(inside a Python project `run` would otherwise choose `python`). `table` gives each figure of the
speed and density targets with its target and whether it holds.
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
from agentkernel.bench import DEFAULT_CONCURRENCY
from agentkernel.config import Config
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.pool import control
from agentkernel.pool.kinds import Kind
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


def cli_run_to_start(project: Path, image: str, *flags: str) -> float:
    """Seconds from launching `agentkernel run` (in `project`) to the command's first output."""
    start = time.monotonic()
    proc = subprocess.Popen(
        agentkernel_run("--image", image, "--no-pool", *flags, "--", "echo", "started"),
        cwd=project,
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


def _request(project: Path, image: str, *, network: bool | None = None) -> SandboxRequest:
    """A QEMU sandbox of `image` with the defaults (no project's agentkernel.toml: figures compare)."""
    flags = SandboxFlags(image=image, backend="qemu", network=network)
    return resolve(flags, Config(), project_dir=project)


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


def _timed_process(argv: list[str], project: Path) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, cwd=project)
    return time.monotonic() - start


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def lifecycle(project: Path, *, runs: int = 5, image: str = "base") -> dict[str, Any]:
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
                ours.append(cli_run_to_start(project, image, "--no-network"))  # the same VM as the bare one
                networked.append(cli_run_to_start(project, image))  # the default profile: network, gateway
        finally:
            backend.cleanup(spec, keep_disk=False)  # the bare VM's RAM file and disk
    name = f"bench-{secrets.token_hex(3)}"

    async def exec_and_stop(service: SandboxService) -> tuple[list[float], float]:
        await service.create(_request(project, image), name=name)
        try:
            return await _exec_and_stop(service, name, rounds=max(10, runs * 4))
        finally:
            await service.remove(name, force=True)

    exec_times, stop_time = call(exec_and_stop, project_dir=project)
    version = [sys.executable, "-m", "agentkernel", "--version"]
    cli_start = [_timed_process(version, project) for _ in range(runs)]
    python = [_timed_process([sys.executable, "-c", "pass"], project) for _ in range(runs)]
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
        "cli_start_s": round(_median(cli_start), 3),
        "python_pass_s": round(_median(python), 3),
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


def snapshot_figures(project: Path, *, forks: int = 10, image: str = "base") -> dict[str, Any]:
    """Cold boot-to-ready against restore-to-ready, and host memory (PSS) of a cold VMM against that of
    each of `forks` idle copies resumed from one snapshot, measured in one run."""
    tag = secrets.token_hex(3)
    source, snapshot = f"bench-cold-{tag}", f"bench-snap-{tag}"
    names = [f"bench-fork-{tag}-{i}" for i in range(forks)]

    async def measure(service: SandboxService) -> tuple[float, list[float], int, list[int]]:
        made: list[str] = []
        try:
            await service.create(_request(project, image, network=False), name=source, start=False)
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

    cold, restores, cold_pss, fork_pss = call(measure, project_dir=project)
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


def _no_daemon(what: str) -> None:
    if control.running_pid() is not None:
        raise AgentkernelError(f"the pool daemon is running: stop it first ({what} starts its own)")


def pool_figures(project: Path, *, runs: int = 5, image: str = "base") -> dict[str, Any]:
    """`run -- true` cold against through the warm pool, in process (the service calls `run` makes)
    and through the CLI, measured side by side with a pool daemon this benchmark starts."""
    _no_daemon("the benchmark")
    request = _request(project, image, network=False)
    cold, pooled, cli_cold, cli_pooled = [], [], [], []
    control.start([Kind.of(request, POOL_SIZE)], max_age=3600, health_interval=60)
    try:
        control.wait_ready(lambda _status: None)
        for _ in range(runs):
            cold.append(call(lambda service: _run_true(service, request, pool=False), project_dir=project))
            pooled.append(call(lambda service: _run_true(service, request, pool=True), project_dir=project))
            control.wait_ready(lambda _status: None)
            cli_cold.append(_cli_run_true(project, image, "--no-pool"))
            cli_pooled.append(_cli_run_true(project, image))
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


def fill_figures(project: Path, *, count: int = 100, image: str = "base") -> dict[str, Any]:
    """Seconds for a new pool daemon to have `count` sandboxes ready, its template's boot included,
    and how many it made at once."""
    _no_daemon("the benchmark")
    request = _request(project, image, network=False)
    start = time.monotonic()
    control.start([Kind.of(request, count)], max_age=3600, health_interval=3600)
    first: float | None = None

    def progress(status: dict[str, Any]) -> None:
        nonlocal first
        if first is None and status["pools"][0]["ready"]:
            first = time.monotonic() - start

    try:
        status = control.wait_ready(progress, timeout=max(600.0, 10.0 * count))
        total = time.monotonic() - start
    finally:
        control.stop(timeout=max(60.0, count))
    return {
        "count": count,
        "fill_s": round(total, 3),
        "first_ready_s": round(first or total, 3),  # the template's boot and snapshot, one fork
        "parallel": status["parallel"],
        "peak_making": status["peak_making"],
    }


async def _run_true(service: SandboxService, request: SandboxRequest, *, pool: bool) -> float:
    """Seconds for what `run -- true` does: a sandbox (new or from the pool), the command, removal."""
    start = time.monotonic()
    async with service.ephemeral(request, pool=pool) as (_name, conn):
        done = await conn.run(["true"])
    if done.status.exit_code != 0:
        raise AgentkernelError("`true` failed in the sandbox")
    return time.monotonic() - start


def _cli_run_true(project: Path, image: str, *flags: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        agentkernel_run("--image", image, "--no-network", *flags, "--", "true"),
        cwd=project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise AgentkernelError(f"`agentkernel run` failed: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed


TABLE_COUNT = 100
"""The issue's table measures the pool fill, stress and idle figures with this many sandboxes."""


def cli_costs(project: Path, *, runs: int, image: str) -> dict[str, Any]:
    """The command line's own cost (`bench.cli_cost`), `exec` timed running `true` in a running
    sandbox (so its figure holds the guest's round trip too): without a pool daemon, then with one
    (`stop`, `rm` and `cp` are then the daemon's, `cli/thin_served.py`)."""
    from agentkernel.bench import cli_cost

    _no_daemon("the benchmark")
    name = f"bench-cli-{secrets.token_hex(3)}"
    request = _request(project, image, network=False)
    call(lambda service: service.create(request, name=name), project_dir=project)
    try:
        without = cli_cost.cli_costs(runs=runs, sandbox=name, cwd=project)
        control.start([Kind.of(request, 1)], max_age=3600, health_interval=3600)
        try:
            control.wait_ready(lambda _status: None)
            return {**cli_cost.cli_costs(runs=runs, sandbox=name, cwd=project), "without_daemon": without}
        finally:
            control.stop()
    finally:
        call(lambda service: service.remove(name, force=True), project_dir=project)


def _ratios(costs: dict[str, Any]) -> dict[str, float]:
    return {label: entry["ratio"] for label, entry in costs["commands"].items()}


def _row(
    what: str, value: float | None, target: float, unit: str, *, count: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One figure of the table: its value against its target (an upper bound). `holds` is None when
    the figure was not measured, or measured with fewer sandboxes than the table's."""
    measured = value is not None and (count is None or count >= TABLE_COUNT)
    row = {"what": what, "value": value, "unit": unit, "target": target}
    if count is not None:
        row["count"] = count
    return {**row, **extra, "holds": value <= target if measured and value is not None else None}


def table(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure of the speed and density targets, from one `bench` run's `result`."""
    pool, snap, fill = result["pool"], result["snapshots"], result["fill"]
    memory, idle, cli = result["density"], result["idle"], result["cli_cost"]
    pss = memory["sandboxes"][max(memory["sandboxes"], key=int)]
    rows = {
        "run_over_bare_boot": _row(
            "`run` to the command's first output over a bare QEMU boot to the agent's ready line, - 1",
            result["overhead_ratio"], 0.15, "ratio",
        ),
        "pool_over_cold_cli": _row(
            "`agentkernel run -- true` through the pool over a cold `--no-pool` run",
            pool["cli_pool_over_cold"], 0.1, "ratio",
            stretch=0.05, stretch_holds=pool["cli_pool_over_cold"] <= 0.05,
        ),
        "cli_start_over_python": _row(
            "`agentkernel --version` over `python3 -c pass`",
            round(result["cli_start_s"] / result["python_pass_s"], 2), 3.0, "ratio",
        ),
        "cli_cost_over_python": _row(
            "the CLI's own cost on exec (`true` in a running sandbox), ls, stop, rm, cp over "
            "`python3 -c pass` with a pool daemon running (the largest; stop, rm and cp timed on an "
            "absent sandbox)",
            cli["largest_ratio"], 3.0, "ratio",
            each=_ratios(cli), without_daemon=_ratios(cli["without_daemon"]),
        ),
        "restored_pss_mib": _row(
            "PSS of each sandbox restored from one snapshot, at the most sandboxes measured",
            pss["pss_mib"], 10.0, "MiB", count=max(map(int, memory["sandboxes"])),
            at={count: row["pss_mib"] for count, row in memory["sandboxes"].items()},
            forks_of_snapshot_figures=round(snap["restored_pss_bytes_mean"] / 2**20, 1),
        ),
        "pool_fill_s": _row(
            "filling the pool (its template's boot included)", fill["fill_s"], 25.0, "s", count=fill["count"],
        ),
        "idle_cpu_percent": _row(
            f"host CPU of idle sandboxes over {idle['seconds']:g} s, in all",
            idle["cpu_percent_of_one_core"], 10.0, "% of one core", count=idle["sandboxes"],
        ),
    }  # fmt: skip
    for key, network in (("stress", False), ("stress_network", True)):
        if (stress := result.get(key)) is not None:
            complete = stress["succeeded"] == stress["count"]
            rows[f"{key}_s"] = _row(
                f"`bench stress` (snapshot mode{', --network' if network else ''}), every sandbox succeeding",
                stress["total_s"] if complete else None, 20.0, "s", count=stress["count"],
                succeeded=stress["succeeded"],
            )  # fmt: skip
            if not complete and stress["count"] >= TABLE_COUNT:
                rows[f"{key}_s"]["holds"] = False
    return rows


def everything(
    *, runs: int = 5, image: str = "base", count: int = TABLE_COUNT, idle_seconds: float = 60.0
) -> dict[str, Any]:
    """Every figure, measured in a new empty project directory, and the table of them; `count`
    sandboxes for the pool fill, stress, memory and idle figures."""
    from agentkernel.bench import density, stress

    with tempfile.TemporaryDirectory(prefix="akbench-project-") as tmp:
        project = Path(tmp)
        result = lifecycle(project, runs=runs, image=image)
        result["cli_cost"] = cli_costs(project, runs=runs, image=image)
        result["snapshots"] = snapshot_figures(project, image=image)
        result["density"] = density.restored_memory(tuple(sorted({1, min(10, count), count})), image=image)
        result["idle"] = density.idle_cpu(count, seconds=idle_seconds, image=image)
        result["pool"] = pool_figures(project, runs=runs, image=image)
        result["fill"] = fill_figures(project, count=count, image=image)
        for key, network in (("stress", False), ("stress_network", True)):
            result[key] = stress.stress(
                count=count, concurrency=DEFAULT_CONCURRENCY, image=image, network=network
            )
    result["table"] = table(result)
    return result
