"""The audit log: one JSON object per line in `audit.jsonl` under the data dir.

Lifecycle events, every exec (argv, exit code, duration), file transfers and network policy decisions.
Each entry is written with one `write` on a file opened for appending, so entries from concurrent
processes (CLI invocations, the egress gateways) never interleave.
"""

from __future__ import annotations

import json
import os
import time

from agentkernel import paths

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

MAX_FIELD = 4096  # a guest can make argv or host names long; the log keeps a bounded prefix


def log_path() -> Path:
    return paths.data_dir() / "audit.jsonl"


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "..."
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value[:256]]
    return value


def timestamp(seconds: float) -> str:
    """UTC ISO 8601 to the millisecond, `Z`-suffixed (as datetime's isoformat, without its import)."""
    ms = int(seconds * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def record(event: str, sandbox: str | None, **fields: Any) -> None:
    entry = {
        "ts": timestamp(time.time()),
        "event": event,
        "sandbox": sandbox,
        **{k: _bounded(v) for k, v in fields.items()},
    }
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def entries(sandbox: str | None = None) -> Iterator[dict[str, Any]]:
    try:
        with log_path().open("rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue  # a torn last line after a crash
                if isinstance(entry, dict) and (sandbox is None or entry.get("sandbox") == sandbox):
                    yield entry
    except FileNotFoundError:
        return
