"""Backends: how each kind of sandbox is started, reached and stopped. All share kernel, images, agent."""

from __future__ import annotations

from agentkernel.backends.base import Backend
from agentkernel.errors import AgentkernelError


def get_backend(name: str) -> Backend:
    from agentkernel.backends.qemu import QemuBackend

    known: dict[str, type[Backend]] = {"qemu": QemuBackend}
    if name not in known:
        raise AgentkernelError(f"unknown or unavailable backend '{name}' (see `agentkernel status`)")
    return known[name]()
