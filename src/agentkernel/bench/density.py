"""Density: host memory per sandbox restored from one template, and host CPU of idle sandboxes.

`restored_memory` forks 1, 10, 100 (`counts`) sandboxes from one template snapshot (made as the pool
makes its own) and reads each VMM's proportional set size (PSS: its fair share of every page it
shares, so the template's pages are counted once over all the sandboxes that map them), its private
memory (what one more sandbox costs) and where that goes (`breakdown`). `idle_cpu` leaves `count`
restored sandboxes idle and sums the CPU time their VMMs use over `seconds`, in percent of one host
core. Both return their figures (for `bench`'s JSON, with the targets) and assert nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agentkernel.config import Config
from agentkernel.errors import AgentkernelError
from agentkernel.service.request import SandboxFlags, resolve
from agentkernel.service.service import SandboxService, call

COUNTS = (1, 10, 100)
SETTLE_S = 2.0  # resumed guests finish what the restore woke before memory or CPU is read
FORKS_AT_ONCE = 2
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$")
TARGETS = {"restored_pss_mib": 10.0, "idle_cpu_percent_of_one_core_100": 10.0}


def breakdown(pid: int) -> dict[str, dict[str, int]]:
    """The VMM's memory by kind, from /proc/PID/smaps: `pss` and `private` bytes of the guest's RAM
    (`guest_ram`: private is what the guest wrote since its restore), QEMU's heap, the TCG translation
    cache (`tcg_cache`), its own binary and libraries (private: their relocated data), and other
    anonymous memory (thread stacks, large allocations)."""
    pss: Counter[str] = Counter()
    private: Counter[str] = Counter()
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        mapping = _MAPPING.match(line)
        if mapping is not None:
            kind = _kind(mapping.group(1), mapping.group(2))
            continue
        field, _, rest = line.partition(":")
        value = rest.split()
        if not value or not value[0].isdigit():
            continue
        if field == "Pss":
            pss[kind] += int(value[0]) * 1024
        elif field in (("Anonymous",) if kind == "guest_ram" else ("Private_Clean", "Private_Dirty")):
            private[kind] += int(value[0]) * 1024  # of the guest's RAM: the pages it wrote since
    return {"pss": dict(pss), "private": dict(private)}


def _kind(perms: str, name: str) -> str:
    if name.endswith("/ram") or name.endswith(".ram"):
        return "guest_ram"
    if name == "[heap]":
        return "heap"
    if "x" in perms and not name:
        return "tcg_cache"
    if "qemu-system" in name:
        return "qemu_binary"
    if name.startswith("/") and ".so" in name:
        return "libraries"
    return "anonymous" if not name or name.startswith("[") else "other"


def page_cache_bytes(path: Path) -> int:
    """Bytes of `path` in the host's page cache (util-linux `fincore`; 0 where it is missing): the
    template's RAM pages that its forks share, counted once."""
    tool = shutil.which("fincore")
    if tool is None:
        return 0
    out = subprocess.run(
        [tool, "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True
    ).stdout
    return int(out.split()[0]) if out.strip().isdigit() else 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Fleet:
    """Sandboxes forked from one template, made and removed by one benchmark."""

    def __init__(self, service: SandboxService, image: str, project: Path) -> None:
        self.service = service
        self.tag = secrets.token_hex(3)
        self.snapshot = f"density-{self.tag}"
        self.request = resolve(
            SandboxFlags(image=image, backend="qemu", network=False), Config(), project_dir=project
        )
        self.names: list[str] = []
        self.pids: dict[str, int] = {}
        self.ram_file = Path()

    async def __aenter__(self) -> _Fleet:
        source = f"{self.snapshot}-source"
        template = await self.service.template(self.snapshot, source=source, request=self.request)
        self.ram_file = template.path / "ram"
        return self

    async def grow(self, count: int) -> None:
        """Fork until `count` sandboxes run, FORKS_AT_ONCE at a time."""
        gate = asyncio.Semaphore(FORKS_AT_ONCE)

        async def one(name: str) -> None:
            async with gate:
                record = await self.service.fork(self.snapshot, name, lifetime=None)
                self.names.append(name)
                if record.pid is None:
                    raise AgentkernelError(f"sandbox {name} is not running")
                self.pids[name] = record.pid

        wanted = [f"{self.snapshot}-{i}" for i in range(len(self.names), count)]
        await asyncio.gather(*(one(name) for name in wanted))

    async def __aexit__(self, *_exc: object) -> None:
        for name in list(self.names):
            await self.service.remove(name, force=True)
        await self.service.remove_snapshot(self.snapshot)


def restored_memory(
    counts: tuple[int, ...] = COUNTS, *, image: str = "base", settle_s: float = SETTLE_S
) -> dict[str, Any]:
    """Per restored sandbox at each of `counts` idle forks of one template: mean PSS, mean private
    memory and its breakdown (of the first), and the template's RAM in the page cache (once)."""

    async def measure(service: SandboxService) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="akdensity-") as project:
            async with _Fleet(service, image, Path(project)) as fleet:
                for count in sorted(counts):
                    await fleet.grow(count)
                    await asyncio.sleep(settle_s)
                    parts = [breakdown(fleet.pids[name]) for name in fleet.names]
                    pss = [sum(p["pss"].values()) for p in parts]
                    private = [sum(p["private"].values()) for p in parts]
                    rows[str(count)] = {
                        "pss_mib": _mib(statistics.mean(pss)),
                        "private_mib": _mib(statistics.mean(private)),
                        "template_cached_mib": _mib(page_cache_bytes(fleet.ram_file)),
                        "private_by_kind_mib": {k: _mib(v) for k, v in sorted(parts[0]["private"].items())},
                    }
        return rows

    rows = call(measure)
    return {
        "image": image,
        "sandboxes": rows,
        "target_pss_mib": TARGETS["restored_pss_mib"],
        "holds": all(row["pss_mib"] <= TARGETS["restored_pss_mib"] for row in rows.values()),
    }


def idle_cpu(
    count: int = 10, *, seconds: float = 60.0, image: str = "base", settle_s: float = SETTLE_S
) -> dict[str, Any]:
    """CPU time `count` idle restored sandboxes use over `seconds`, in percent of one host core: in
    all and per sandbox (the VMMs' user and system time; the guest runs inside them)."""

    async def measure(service: SandboxService) -> tuple[float, float]:
        with tempfile.TemporaryDirectory(prefix="akdensity-") as project:
            async with _Fleet(service, image, Path(project)) as fleet:
                await fleet.grow(count)
                await asyncio.sleep(settle_s)
                pids = list(fleet.pids.values())
                before, start = sum(cpu_seconds(p) for p in pids), time.monotonic()
                await asyncio.sleep(seconds)
                used, elapsed = sum(cpu_seconds(p) for p in pids) - before, time.monotonic() - start
                return used, elapsed

    used, elapsed = call(measure)
    percent = 100 * used / elapsed
    return {
        "image": image,
        "sandboxes": count,
        "seconds": round(elapsed, 1),
        "cpu_percent_of_one_core": round(percent, 2),
        "per_sandbox_percent": round(percent / count, 3),
        "target_percent_for_100": TARGETS["idle_cpu_percent_of_one_core_100"],
        "holds_scaled_to_100": percent / count * 100 <= TARGETS["idle_cpu_percent_of_one_core_100"],
    }


def _mib(n: float) -> float:
    return round(n / (1 << 20), 2)
