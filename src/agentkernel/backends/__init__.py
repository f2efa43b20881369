"""Backends: how each kind of sandbox is started, reached and stopped. All share kernel, images, agent."""

from __future__ import annotations

from agentkernel.backends.base import Backend
from agentkernel.errors import AgentkernelError


def get_backend(name: str, *, profile: str = "moderate") -> Backend:
    """The backend `name`. `profile` is the sandbox's security profile: the container backend builds
    its capabilities and seccomp filter from it when it creates a container (prepare);
    VM backends enforce policy through the VMSpec and ignore it."""
    if name == "qemu":
        from agentkernel.backends.qemu import QemuBackend

        return QemuBackend()
    if name == "firecracker":
        from agentkernel.backends.firecracker import FirecrackerBackend, Jailer

        return FirecrackerBackend(jailer=Jailer.from_env())
    if name == "container":
        from agentkernel.backends.container import ContainerBackend

        return ContainerBackend(profile=profile)
    raise AgentkernelError(f"unknown or unavailable backend '{name}' (see `agentkernel status`)")
