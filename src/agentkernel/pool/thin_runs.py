"""The pool daemon's side of `run` on the thin command line (`cli/thin_run.py`).

A `lease` resolves the client's request in the client's directory as `run` would there (flags, then
agentkernel.toml, then the command and the project's files) and hands it a ready sandbox of that kind,
a QEMU one, whose agent socket the client then speaks to itself. From the hand-out on the sandbox is
the client's (its process, from the socket's peer credentials): a `release` from it removes the
sandbox once its command is done, and should it die first, the reaper removes it as any dead owner's.
A lease that finds nothing (another kind, an empty pool, anything the full `run` would refuse, a
client that sees other files than the daemon does, from another mount namespace or root) hands out
nothing: the client then runs the full command line, which says what is wrong.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from agentkernel import hostinfo, procs
from agentkernel.errors import AgentkernelError, NoSuchSandboxError
from agentkernel.service import audit, sandboxes
from agentkernel.service.checks import validate_name
from agentkernel.service.request import SandboxFlags, resolve_in
from agentkernel.service.service import pool_key

if TYPE_CHECKING:
    from agentkernel.pool.daemon import Pool
    from agentkernel.service.owners import Owner

OPS = ("lease", "release")
FLAGS: dict[str, type] = {
    "image": str,
    "backend": str,
    "profile": str,
    "vcpus": int,
    "memory_mb": int,
    "network": bool,
}
"""The `run` flags a lease may carry, and their types."""
BACKEND = "qemu"
"""The backend whose sandboxes a thin client can run commands in (its agent sockets are plain Unix
sockets, `service/exec_file`)."""
NOTHING = {"ok": True, "sandbox": None}


def answer(pool: Pool, message: dict[str, Any], peer: Owner | None) -> dict[str, Any]:
    """The reply to a lease or release from process `peer` (run in a worker thread)."""
    if message["op"] == "lease":
        return lease(pool, message, peer)
    return release(message, peer)


def lease(pool: Pool, message: dict[str, Any], peer: Owner | None) -> dict[str, Any]:
    cwd, command, flags = message.get("cwd"), message.get("command"), message.get("flags")
    if peer is None:  # it has already gone: nobody would release what it is given
        return NOTHING
    if not procs.sees_files_as_we_do(peer["pid"]):  # its directory is not the one of that name here
        return NOTHING
    if not (isinstance(cwd, str) and os.path.isabs(cwd) and _strings(command) and isinstance(flags, dict)):
        return {"ok": False, "error": "a lease needs cwd (absolute), command and flags"}
    if not all(_typed(flags.get(k), kind) for k, kind in FLAGS.items()) or not set(flags) <= set(FLAGS):
        return {"ok": False, "error": f"a lease's flags are {', '.join(FLAGS)}, each of its type"}
    try:
        wanted = resolve_in(SandboxFlags(**flags), Path(cwd), command=command)
        key = pool_key(wanted) if wanted.poolable else None
    except (AgentkernelError, OSError, ValueError):  # the full `run` says what is wrong
        return NOTHING
    name = pool.acquire(key, peer, backend=BACKEND, counted=False) if key is not None else None
    if name is None:
        return NOTHING
    try:
        audit.record("pool_acquire", name)
        accel = hostinfo.accel()
    except Exception:  # the lease is not answered: the sandbox is no one's to use
        with contextlib.suppress(AgentkernelError):
            sandboxes.remove(name, force=True)
        raise
    return {
        "ok": True,
        "sandbox": name,
        "note": f"image {wanted.image} ({wanted.image_reason}), profile {wanted.policy.profile}",
        "accel": accel.name,
        "accel_note": accel.note,
    }


def release(message: dict[str, Any], peer: Owner | None) -> dict[str, Any]:
    """Remove a sandbox the asking process leased, as `run` removes its sandbox."""
    name = message.get("sandbox")
    if not isinstance(name, str):
        return {"ok": False, "error": "a release names its sandbox"}
    if peer is None:
        return {"ok": False, "error": "the asking process has gone"}
    try:
        sandboxes.remove_owned(validate_name(name, field="sandbox"), peer)
    except NoSuchSandboxError:
        pass  # removed already (a reaper)
    except AgentkernelError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True}


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _typed(value: object, kind: type) -> bool:
    """None, or a value of `kind` (a bool is not an int here)."""
    return value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
