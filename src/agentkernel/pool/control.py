"""Starting, stopping and asking the pool daemon, for the CLI and the benchmarks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentkernel import paths
from agentkernel.backends.base import file_tail, tail_line
from agentkernel.errors import AgentkernelError, DaemonUnavailable
from agentkernel.pool import wire

if TYPE_CHECKING:
    from agentkernel.pool.kinds import Kind

MAX_LOG_BYTES = 4 << 20


def log_file() -> Path:
    return paths.logs_dir() / "daemon.log"


def _rotate_log() -> None:
    """Keep the previous daemon's log as daemon.log.1 once it is large (each start appends)."""
    log = log_file()
    if log.exists() and log.stat().st_size > MAX_LOG_BYTES:
        log.replace(log.with_name(log.name + ".1"))


def running_pid() -> int | None:
    """The daemon's pid, or None. It holds a lock on its pid file for life, so a stale file is told
    apart from a live daemon without trusting the pid in it."""
    try:
        f = wire.pid_file().open()
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        return None


def start(
    kinds: Sequence[Kind],
    *,
    max_age: float = 600.0,
    health_interval: float = 15.0,
    parallel: int | None = None,
    timeout: float = 30.0,
) -> int:
    """Start the daemon detached, keeping each kind's `size` sandboxes ready (at most `parallel`
    made at once; None: as the host's cores and free memory allow); return its pid once it answers
    on its socket."""
    for kind in kinds:
        if kind.policy.mount_cwd or kind.policy.mount_home:
            raise AgentkernelError(
                f"the {kind.policy.profile} profile shares host directories: its sandboxes cannot be pooled"
            )
    spec = {
        "kinds": [kind.record() for kind in kinds],
        "max_age": max_age,
        "health_interval": health_interval,
        "parallel": parallel,
    }
    if (pid := running_pid()) is not None:
        raise AgentkernelError(
            f"the pool daemon is already running (pid {pid}): `agentkernel daemon stop` first"
        )
    _rotate_log()
    with paths.open_private(log_file(), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentkernel.pool.daemon", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            detail = tail_line(file_tail(log_file()).decode(errors="replace"), lines=2)
            raise AgentkernelError(f"the pool daemon exited at once: {detail}")
        try:
            wire.request({"op": "status"}, timeout=1.0)
            return proc.pid
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                proc.kill()
                raise AgentkernelError(f"the pool daemon did not answer within {timeout:g}s") from None
            time.sleep(0.05)
        except BaseException:  # this caller gives up (interrupted, a refused reply): so does the daemon
            proc.terminate()  # it removes what it made on its way out
            raise


def status() -> dict[str, Any]:
    return wire.request({"op": "status"})


def wait_ready(progress: Callable[[dict[str, Any]], None], *, timeout: float = 600.0) -> dict[str, Any]:
    """Wait until every pool is full; `progress` sees each status on the way."""
    deadline = time.monotonic() + timeout
    while True:
        current = status()
        progress(current)
        if all(len(pool["ready"]) >= pool["size"] for pool in current["pools"]):
            return current
        if time.monotonic() > deadline:
            errors = "; ".join(p["last_error"] for p in current["pools"] if p["last_error"])
            raise AgentkernelError(
                f"the pool did not fill within {timeout:g}s{': ' + errors if errors else ''}"
            )
        time.sleep(0.2)


def stop(*, timeout: float = 60.0) -> int:
    """Ask the daemon to remove its ready sandboxes and exit; kill it if it does not in time."""
    pid = running_pid()
    if pid is None:
        raise AgentkernelError("the pool daemon is not running")
    with contextlib.suppress(DaemonUnavailable):  # alive but not answering: killed below
        wire.request({"op": "stop"})
    deadline = time.monotonic() + timeout
    while running_pid() is not None:
        if time.monotonic() > deadline:
            if pid > 0:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return pid
