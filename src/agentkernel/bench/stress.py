"""`agentkernel bench stress`: many sandboxes at once, each command's output checked, then a leak count.

All `count` sandboxes are started (see `stress` for how) and run a command, `concurrency` at a time,
so at the peak every one of them is up; then all are removed. What
is left afterwards (processes, open files, sockets, disk files, network devices) is counted: it must
be nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentkernel import paths
from agentkernel.backends.qemu import backend as qemu
from agentkernel.config import Config
from agentkernel.errors import AgentkernelError
from agentkernel.pool import control
from agentkernel.pool.kinds import Kind
from agentkernel.sandbox import state
from agentkernel.service.request import SandboxFlags, SandboxRequest, resolve
from agentkernel.service.service import SandboxService, call

STAGES = ("start", "exec", "remove")


@dataclass
class Outcome:
    name: str
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    files: tuple[Path, ...] = ()  # what the sandbox had on the host: all gone after removal


MODES = ("snapshot", "pool", "cold")


def stress(
    *,
    count: int,
    concurrency: int,
    mode: str = "snapshot",
    image: str = "base",
    network: bool = False,
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> dict[str, Any]:
    """`mode`: "snapshot" resumes each sandbox from one template snapshot; "pool" fills a pool daemon
    with `count` sandboxes first (not timed) and takes them from it; "cold" boots each one."""
    if mode not in MODES:
        raise AgentkernelError(f"unknown stress mode {mode!r}: use {', '.join(MODES)}")
    tag = secrets.token_hex(3)
    flags = SandboxFlags(image=image, backend="qemu", network=network)
    request = resolve(flags, Config(), project_dir=Path.cwd())  # the defaults: figures compare
    outcomes = [Outcome(f"stress-{tag}-{i}") for i in range(count)]
    before = _footprint()
    prepared = time.monotonic()
    template = _template(tag, request) if mode == "snapshot" else None
    if mode == "pool":
        _fill_pool(count, request)
    prepare_s = time.monotonic() - prepared
    try:
        with _MemorySampler() as memory:
            started = time.monotonic()
            start = functools.partial(_start_and_check, mode=mode, template=template, request=request)
            _each(outcomes, concurrency, start, "start", progress)
            _each(outcomes, concurrency, _remove, "remove", progress)
            total = time.monotonic() - started
    finally:
        for outcome in outcomes:  # whatever a failure left
            if state.exists(outcome.name):
                call(functools.partial(SandboxService.remove, name=outcome.name, force=True))
        if template is not None:
            call(lambda service: service.remove_snapshot(template))
        if mode == "pool":
            control.stop()
    failed = [o for o in outcomes if o.error]
    return {
        "count": count,
        "concurrency": concurrency,
        "mode": mode,
        "network": network,
        "succeeded": count - len(failed),
        "failed": len(failed),
        "errors": sorted({o.error for o in failed if o.error})[:10],
        "total_s": round(total, 3),
        "prepare_s": round(prepare_s, 3),
        "stages": {
            stage: _percentiles([o.seconds[stage] for o in outcomes if stage in o.seconds])
            for stage in STAGES
        },
        "peak_host_rss_bytes": memory.peak_rss,
        "peak_host_memory_used_bytes": memory.peak_used,
        "leaks": _leaks(before, _footprint(), outcomes),
        "cpus": os.cpu_count(),
    }


def _template(tag: str, request: SandboxRequest) -> str:
    """Boot one sandbox and snapshot it: every stressed sandbox resumes from it."""
    source = f"stress-{tag}-template"
    return call(lambda service: service.template(f"stress-{tag}", source=source, request=request)).name


def _fill_pool(count: int, request: SandboxRequest) -> None:
    if control.running_pid() is not None:
        raise AgentkernelError("the pool daemon is running: stop it first (the stress test starts its own)")
    control.start([Kind.of(request, count)], max_age=86400, health_interval=3600)
    try:
        control.wait_ready(lambda _status: None, timeout=max(600.0, 5.0 * count))
    except BaseException:
        control.stop()
        raise


def _each(
    outcomes: list[Outcome],
    concurrency: int,
    work: Callable[[Outcome], None],
    stage: str,
    progress: Callable[[str, int, int], None],
) -> None:
    done = 0
    lock = threading.Lock()

    def one(outcome: Outcome) -> None:
        nonlocal done
        if outcome.error is None:
            try:
                work(outcome)
            except Exception as exc:  # counted and reported, the run goes on
                outcome.error = f"{stage}: {exc}"[:300]
        with lock:
            done += 1
            progress(stage, done, len(outcomes))

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, outcomes))


def _start_and_check(outcome: Outcome, *, mode: str, template: str | None, request: SandboxRequest) -> None:
    call(lambda service: _start_and_run(service, outcome, mode=mode, template=template, request=request))


async def _start_and_run(
    service: SandboxService, outcome: Outcome, *, mode: str, template: str | None, request: SandboxRequest
) -> None:
    start = time.monotonic()
    if mode == "pool":
        name = await service.take_pooled(request)
        if name is None:
            raise AgentkernelError("the pool had no ready sandbox")
        outcome.name = name
    elif template is not None:
        await service.fork(template, outcome.name)
    else:
        await service.create(request, name=outcome.name)
    outcome.seconds["start"] = time.monotonic() - start
    spec = await service.vm_spec(outcome.name)
    lock = paths.data_dir() / "locks" / f"{outcome.name}.lock"
    outcome.files = (spec.rundir, spec.workdir, qemu.ram_file(spec), lock)
    token = secrets.token_hex(8)
    start = time.monotonic()
    done = await (await service.connection(outcome.name)).run(["echo", token], limit=4096)
    outcome.seconds["exec"] = time.monotonic() - start
    if done.status.exit_code != 0:
        raise AgentkernelError(f"exit status {done.status.exit_code}")
    if done.stdout != f"{token}\n".encode():
        raise AgentkernelError(f"wrong output from {outcome.name}: {done.stdout[:80]!r}")


def _remove(outcome: Outcome) -> None:
    start = time.monotonic()
    call(lambda service: service.remove(outcome.name, force=True))
    outcome.seconds["remove"] = time.monotonic() - start


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)

    return {"p50": round(statistics.median(ordered), 4), "p95": at(0.95), "p99": at(0.99)}


# -- memory and leaks -----------------------------------------------------------------------------


class _MemorySampler:
    """Peak RSS of this process and every VMM it started, and peak memory in use on the host."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_used = 0
        self._baseline = _host_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._every_interval, daemon=True)

    def __enter__(self) -> _MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # a run shorter than the interval still has its samples at both ends

    def _every_interval(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = _rss(os.getpid()) + sum(_rss(pid) for pid in _vmm_pids())
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_used = max(self.peak_used, _host_used() - self._baseline)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _host_used() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def _vmm_pids() -> Iterator[int]:
    marker = str(paths.data_dir() / "sandboxes").encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    yield int(proc.name)


@dataclass(frozen=True)
class Footprint:
    open_files: int
    sockets: int
    net_devices: frozenset[str]
    vmms: frozenset[int]


def _footprint() -> Footprint:
    fds = list(Path("/proc/self/fd").iterdir())
    sockets = sum(1 for fd in fds if _readlink(fd).startswith("socket:"))
    devices = frozenset(p.name for p in Path("/sys/class/net").iterdir())
    return Footprint(len(fds), sockets, devices, frozenset(_vmm_pids()))


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _leaks(before: Footprint, after: Footprint, outcomes: list[Outcome]) -> dict[str, int]:
    """What the stressed sandboxes left behind; every count should be zero."""
    tokens = [o.name.encode() for o in outcomes] + [str(o.files[0]).encode() for o in outcomes if o.files]
    processes = set(after.vmms - before.vmms)  # VMMs of this data dir, the pool's included
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(token in (proc / "cmdline").read_bytes() for token in tokens):
                    processes.add(int(proc.name))
    disk_files = sum(path.exists() for outcome in outcomes for path in outcome.files)
    return {
        "processes": len(processes),
        "open_files": max(0, after.open_files - before.open_files),
        "sockets": max(0, after.sockets - before.sockets),
        "disk_files": disk_files,
        "network_devices": len(after.net_devices - before.net_devices),
    }
