"""The backends agentkernel can run sandboxes with: what each is, can do and needs, and how to make one.

Each backend declares one `BackendInfo`: its name, its rank (lower is preferred when no backend is
asked for), whether it isolates with a VM or a container, its capabilities, the host features it
cannot run without, a status probe and a factory. Selection (`hostinfo.select_backend`), `status`,
the CLI's help and the service's capability checks all read this registry; nothing else lists
backend names.

The built-in backends (the subpackages named in BUILTIN, whose `__init__` holds only their
`INFO`) are loaded on first use; their heavy modules are imported only by their factory and probe,
so reading the registry costs the CLI nothing at startup. Another backend, such as a test's fake,
joins with `register(info)` and leaves with `unregister(name)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agentkernel.errors import AgentkernelError

if TYPE_CHECKING:
    from agentkernel.backends.base import Backend

Capability = Literal["snapshot", "pause", "network", "shared_dirs", "read_only_root"]
"""What a backend can give a sandbox: snapshots and forks of a running sandbox, pausing a running
sandbox (its memory kept on the host) and resuming it, network (through the egress gateway), host
directories shared into it, and a read-only root filesystem."""

HostFeature = Literal["kvm", "root"]
"""What a backend (or one of its capabilities) needs of the host: hardware KVM, or running as root."""

Isolation = Literal["vm", "container"]

BUILTIN = ("firecracker", "qemu", "container")
"""Subpackages of agentkernel.backends that declare a backend in their `INFO`."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run sandboxes on this host, and how (or why not), on one line."""

    available: bool
    reason: str


@dataclass(frozen=True)
class BackendInfo:
    name: str
    rank: int
    """Lower is preferred when the host's best backend is chosen."""
    isolation: Isolation
    """"container" shares the host's kernel: chosen only when asked for or when no VM can run."""
    capabilities: frozenset[Capability]
    probe: Callable[[], BackendStatus]
    factory: Callable[[str], Backend]
    """Makes the backend for a sandbox of the given security profile."""
    requires: frozenset[HostFeature] = frozenset()
    """Host features without which the backend cannot run at all."""
    requires_for: tuple[tuple[Capability, HostFeature], ...] = ()
    """Capabilities that work only with a host feature: Firecracker's network needs root."""

    def supports(self, needs: frozenset[Capability], *, host: frozenset[HostFeature]) -> bool:
        """Whether a sandbox that needs `needs` can run on this backend on a host with `host`."""
        if not needs <= self.capabilities or not self.requires <= host:
            return False
        return all(feature in host for capability, feature in self.requires_for if capability in needs)


_entries: dict[str, BackendInfo] = {}
_builtins_loaded = False


def _registry() -> dict[str, BackendInfo]:
    """Every registered backend; the built-in ones are added on first use, without replacing a
    backend registered earlier under the same name."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for package in BUILTIN:
            entry: BackendInfo = importlib.import_module(f"agentkernel.backends.{package}").INFO
            _entries.setdefault(entry.name, entry)
    return _entries


def register(info: BackendInfo) -> None:
    """Add a backend, or replace the one registered under the same name."""
    _registry()[info.name] = info


def unregister(name: str) -> None:
    """Remove a backend (a built-in one too, until the process ends); an unknown name is ignored."""
    _registry().pop(name, None)


def registered() -> list[BackendInfo]:
    """Every registered backend, preferred first (by rank, then name)."""
    return sorted(_registry().values(), key=lambda entry: (entry.rank, entry.name))


def names() -> list[str]:
    """The registered backends' names, preferred first."""
    return [entry.name for entry in registered()]


def is_registered(name: str) -> bool:
    return name in _registry()


def info(name: str) -> BackendInfo:
    """The backend registered as `name`; one line naming the registered ones if there is none."""
    try:
        return _registry()[name]
    except KeyError:
        raise AgentkernelError(f"unknown backend {name!r}: use {', '.join(names())}") from None


def get_backend(name: str, *, profile: str = "moderate") -> Backend:
    """The backend `name`, for a sandbox of security profile `profile` (the container backend builds
    its capabilities and seccomp filter from it; VM backends enforce policy through the VMSpec)."""
    return info(name).factory(profile)
