"""A running sandbox's exec file: what a client needs to run a command in it exactly as the service's
own connection would (`sandboxes.session`), written by the service, read by the thin command line.

The service writes it whenever it opens a session to a running QEMU sandbox: the agent's sockets, the
HELLO it sends, and the environment every command starts from (`sandboxes.exec_env`) split into what
comes from the caller's environment and what the sandbox sets. It lives in the sandbox's private run
directory (gone when the sandbox stops) and names the VMM it was written for, so a file for an
earlier run is never taken for this one. On the standard library alone.
"""

from __future__ import annotations

import json
import os

from agentkernel import paths

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence
    from pathlib import Path
    from typing import Any

NAME = "exec.json"
COMMAND_MARK = "{command}"
"""Where a command's id goes in the per-command variables (`sandboxes._command_proxy_env`)."""
MAX_BYTES = 1 << 20


def write(
    rundir: Path,
    *,
    pid: int,
    sockets: Sequence[Path],
    hello: Mapping[str, Any],
    passed: Collection[str] | None,
    env: Mapping[str, str],
    command_env: Mapping[str, str],
) -> None:
    """Write the file for VMM `pid` (replacing it whole: a reader sees the old one or the new one).
    `passed`: the variables taken from the caller's environment (with every LC_*), None for none."""
    data = {
        "pid": pid,
        "sockets": [str(s) for s in sockets],
        "hello": dict(hello),
        "passed": None if passed is None else sorted(passed),
        "env": dict(env),
        "command_env": dict(command_env),
    }
    target = rundir / NAME
    tmp = rundir / f".{NAME}.{os.urandom(6).hex()}"  # threads of one process write it too
    paths.write_private(tmp, json.dumps(data))
    os.replace(tmp, target)


def read(rundir: Path, pid: int) -> dict[str, Any] | None:
    """The file written for VMM `pid`, if there is one and it is whole; else None."""
    try:
        with open(rundir / NAME, "rb") as f:
            data = json.loads(f.read(MAX_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pid") != pid:
        return None
    sockets, hello = data.get("sockets"), data.get("hello")
    if not isinstance(sockets, list) or not sockets or not all(isinstance(s, str) for s in sockets):
        return None
    if not isinstance(hello, dict) or not _strings(data.get("env")) or not _strings(data.get("command_env")):
        return None
    if not isinstance(hello.get("hostname"), str) or not all(
        isinstance(hello.get(k), int | None) and not isinstance(hello.get(k), bool)
        for k in ("max_procs", "memory_mb")
    ):
        return None
    passed = data.get("passed")
    if passed is not None and not (isinstance(passed, list) and all(isinstance(p, str) for p in passed)):
        return None
    return data


def command_env(data: Mapping[str, Any], command: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment command `command` (its id) starts from, for a caller whose environment is
    `environ`: as `sandboxes.exec_env` and the per-command variables make it."""
    env: dict[str, str] = {}
    passed = data["passed"]
    if passed is not None:
        env.update({k: v for k, v in environ.items() if k in passed or k.startswith("LC_")})
    env.update(data["env"])
    env.update({k: v.replace(COMMAND_MARK, command) for k, v in data["command_env"].items()})
    return env


def _int_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _strings(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
