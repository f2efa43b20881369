"""Fault injection: real sandboxes driven by the real CLI, then broken from outside or inside.

Every CLI call has a timeout, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.vm.conftest import artifacts, cli_home

__all__ = ["artifacts", "cli_home"]
TIMEOUT = 300  # seconds: generous under emulation on a busy machine; only there to turn hangs into failures


def ok(*args: str) -> bytes:
    result = cli(*args, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    out: bytes = result.stdout
    return out


def sandbox(name: str) -> dict[str, object]:
    """The sandbox as `list --json` shows it."""
    records: dict[str, dict[str, object]] = {s["name"]: s for s in json.loads(ok("list", "--json"))}
    return records[name]


def error_line(stderr: bytes) -> str:
    """The one line a failed command prints: no traceback, nothing else."""
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentkernel: error: "), lines
    return lines[0].removeprefix("agentkernel: error: ")


def processes_with(text: str) -> list[int]:
    """Pids of the processes whose command line holds `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@dataclass(frozen=True)
class Running:
    """A started sandbox and what it has on the host, read from its VMM's command line."""

    name: str
    pid: int
    rundir: Path
    ram: Path
    workdir: Path
    lock: Path

    def leftovers(self) -> list[str]:
        """Whatever of the sandbox is still on the host."""
        left = [f"process {pid}" for pid in processes_with(str(self.rundir))]
        left += [str(p) for p in (self.rundir, self.ram, self.workdir, self.lock) if p.exists()]
        return left


@pytest.fixture
def boot(cli_home: Path) -> Callable[..., Running]:
    """Create and start a sandbox (extra `create` options as arguments)."""

    def start(name: str, *options: str) -> Running:
        ok("create", *options, name)
        ok("start", name)
        pid = sandbox(name)["pid"]
        assert isinstance(pid, int)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        ram = next(a for a in argv if "mem-path=" in a).split("mem-path=")[1].split(",")[0]
        box = Running(
            name,
            pid,
            rundir=Path(argv[argv.index("-pidfile") + 1]).parent,
            ram=Path(ram),
            workdir=cli_home / "sandboxes" / name,
            lock=cli_home / "locks" / f"{name}.lock",
        )
        assert box.leftovers(), "found none of the sandbox's files and processes"
        return box

    return start


def spawn(*args: str) -> subprocess.Popen[bytes]:
    """The CLI in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "agentkernel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def read_line(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> bytes:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, f"no output within {timeout}s"
    return proc.stdout.readline()


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mounts a tmpfs of a given size (a small filesystem to fill); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30
        )
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=True, timeout=30)
