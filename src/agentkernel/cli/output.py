"""Shared output helpers for CLI commands: JSON for scripts, human text on a rich console."""

from __future__ import annotations

import json
import sys
from typing import Any

from agentkernel.terminal import lazy_console

console = lazy_console()
err_console = lazy_console(stderr=True)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
