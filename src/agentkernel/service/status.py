"""What this host runs sandboxes with, and what is installed."""

from __future__ import annotations

import shutil
from typing import Any

from agentkernel import hostinfo, paths
from agentkernel.artifacts import agent, kernel
from agentkernel.backends.firecracker import version as firecracker_version
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.pool import control


def status() -> dict[str, Any]:
    acc = hostinfo.accel()
    kernel_path = kernel.current()
    agent_path = agent.current()
    return {
        "accel": acc.name,
        "kvm_note": acc.note,
        "backends": {
            name: {"available": b.available, "reason": b.reason} for name, b in hostinfo.backends().items()
        },
        "default_backend": _default_backend(),
        "firecracker": _firecracker(),
        "kernel": str(kernel_path) if kernel_path else None,
        "agent": str(agent_path) if agent_path else None,
        "images": [
            {"name": img.name, "path": str(img.path), "size_bytes": img.size_bytes, "digest": img.digest}
            for img in store.list_images()
        ],
        "data_dir": str(paths.data_dir()),
        "pool": _pool(),
    }


def _default_backend() -> dict[str, Any]:
    """What a sandbox without network gets when no backend is asked for (one with network gets the
    same, or is refused where only a container could run)."""
    try:
        name = hostinfo.choose_backend(needs_network=False)
    except AgentkernelError as exc:
        return {"name": None, "warning": str(exc)}
    return {"name": name, "warning": hostinfo.isolation_warning(name)}


def _firecracker() -> dict[str, Any] | None:
    """The firecracker binary on PATH, its release, and whether the backend takes it (None: none)."""
    binary = shutil.which("firecracker")
    if binary is None:
        return None
    try:
        found = firecracker_version.check_version(binary)
    except AgentkernelError as exc:
        return {"path": binary, "version": firecracker_version.installed_version(), "problem": str(exc)}
    return {"path": binary, "version": found, "problem": None}


def _pool() -> dict[str, Any]:
    """Whether the pool daemon runs, and how many sandboxes it has ready per image."""
    if control.running_pid() is None:
        return {"running": False}
    try:
        current = control.status()
    except AgentkernelError as exc:
        return {"running": True, "error": str(exc)}
    ready = {p["image"]: len(p["ready"]) for p in current["pools"]}
    return {"running": True, "pid": current["pid"], "ready": ready}
