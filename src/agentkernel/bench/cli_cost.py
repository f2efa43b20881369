"""The command line's own cost: each hot command's wall time over a bare `python -c pass`, measured
side by side (interleaved, median of `runs`) in one process.

Commands that would act on a sandbox are timed on one that does not exist (`stop`, `rm`, `cp`, and
`exec` unless a running sandbox is named): they then do everything but the VM's own work (start-up,
parsing, checks, the state database) and end with the one-line error, so the figure is the command
line's cost and not the guest's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ABSENT = "cli-cost-absent"
"""A sandbox name no one has: what `stop`, `rm` and `cp` are timed on."""


def agentkernel_command() -> list[str]:
    """How a user starts the command line: the installed script beside this Python, else `-m`."""
    script = Path(sys.executable).with_name("agentkernel")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agentkernel"]


def hot_commands(sandbox: str | None = None) -> dict[str, list[str]]:
    """The commands measured, by label; `exec` runs `true` in `sandbox` when one is named."""
    return {
        "ls": ["ls"],
        "exec": ["exec", sandbox or ABSENT, "--", "true"],
        "stop": ["stop", ABSENT],
        "rm": ["rm", ABSENT],
        "cp": ["cp", f"{ABSENT}:/etc/hostname", "hostname"],  # into the working directory
    }


def _timed(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=dict(env), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cli_costs(
    *, runs: int = 5, sandbox: str | None = None, cwd: Path | None = None, full: bool = False
) -> dict[str, Any]:
    """Median seconds of `python -c pass` and of each hot command, and each command's ratio over it.
    With `full` every command takes the full (Typer) command line, for a side-by-side comparison."""
    env = dict(os.environ)
    if full:
        env["AGENTKERNEL_FULL_CLI"] = "1"
    where = cwd or Path.cwd()
    base = agentkernel_command()
    commands = hot_commands(sandbox)
    bare: list[float] = []
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):  # interleaved, so that a busy moment of the machine hits every figure alike
        bare.append(_timed([sys.executable, "-c", "pass"], env, where))
        for label, args in commands.items():
            samples[label].append(_timed([*base, *args], env, where))
    python_s = statistics.median(bare)
    result = {
        label: {
            "seconds": round(statistics.median(times), 4),
            "ratio": round(statistics.median(times) / python_s, 2),
        }
        for label, times in samples.items()
    }
    return {
        "python_pass_s": round(python_s, 4),
        "commands": result,
        "largest_ratio": max(entry["ratio"] for entry in result.values()),
        "runs": runs,
        "path": "full" if full else "thin",
    }
