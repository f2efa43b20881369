"""What a new sandbox is to be: the flags a face passes, resolved once into a checked request.

Every face (the CLI's `run`/`create`, `agent run`, the pool daemon, the HTTP API, MCP, bench and
stress) fills in `SandboxFlags` with what its user gave and calls `resolve`: each setting is the
flag's, else agentkernel.toml's, else the default. Every check of a new sandbox's settings happens
here, and its error names the field (`InvalidRequestError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentkernel.config import (
    DEFAULT_MEMORY_MB,
    DEFAULT_VCPUS,
    MEMORY_MB_RANGE,
    PROFILES,
    VCPUS_RANGE,
    Config,
    Policy,
    load_config,
    resolve_policy,
    resolve_resources,
)
from agentkernel.errors import AgentkernelError, CorruptImageError, InvalidRequestError, UnknownImageError
from agentkernel.images import store
from agentkernel.network import brokering
from agentkernel.network.brokering import SecretBinding
from agentkernel.service import checks
from agentkernel.service.sandboxes import choose_image


@dataclass(frozen=True)
class SandboxFlags:
    """What a face may ask of a new sandbox; None (or empty) means agentkernel.toml's, else the default."""

    image: str | None = None
    backend: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    profile: str | None = None
    network: bool | None = None
    mount_cwd: bool | None = None
    read_only: bool | None = None
    directory: Path | None = None
    """Shared at /workspace (else the project directory, when the policy mounts it)."""
    lifetime: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    """Names of secrets (agentkernel.toml [secrets], the secret store)."""


DEFAULTS = (DEFAULT_VCPUS, DEFAULT_MEMORY_MB)
"""vCPUs and memory in MB when neither a flag nor agentkernel.toml sets them (a coding agent's
sandbox is given larger ones)."""


@dataclass(frozen=True)
class SandboxRequest:
    """A new sandbox's settings, resolved and checked: what `SandboxService.create` makes."""

    image: str
    backend: str | None
    """None: the host's best (a VM whenever a VMM can run here)."""
    vcpus: int
    memory_mb: int
    policy: Policy
    mount_dir: Path | None
    lifetime: float | None
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[SecretBinding, ...] = ()
    disk_mb: int | None = None
    """The writable disk's size in MiB (agentkernel.toml's [resources] disk_mb); None: the image's."""
    image_reason: str = field(default="", compare=False)
    """Where the image came from (the flag, agentkernel.toml, the command, project files)."""

    @property
    def poolable(self) -> bool:
        """Whether a ready sandbox of the pool daemon can stand in for this one: not when it shares
        host directories, has a lifetime, secrets, its own environment, labels or disk size."""
        policy = self.policy
        shares = self.mount_dir is not None or policy.mount_cwd or policy.mount_home
        return not (shares or self.lifetime or self.secrets or self.env or self.labels or self.disk_mb)


def resolve(
    flags: SandboxFlags,
    config: Config,
    *,
    project_dir: Path,
    config_path: Path | None = None,
    command: Sequence[str] = (),
    defaults: tuple[int, int] = DEFAULTS,
) -> SandboxRequest:
    """The request from `flags`, then `config` (the project's agentkernel.toml, found at
    `config_path`), then `defaults`. The image is chosen as `run` chooses it (`choose_image`: the
    flag, the config, the command, the project's files, base) and must exist."""
    image, why = choose_image(list(command), flags.image, config, project_dir)
    try:
        store.get(image)
    except CorruptImageError:
        raise
    except AgentkernelError as exc:
        raise UnknownImageError("image", str(exc)) from None
    if flags.profile is not None and flags.profile not in PROFILES:
        raise InvalidRequestError(
            "profile", f"unknown security profile {flags.profile!r}: use {', '.join(PROFILES)}"
        )
    policy = resolve_policy(
        config,
        profile=flags.profile,
        network=flags.network,
        mount_cwd=flags.mount_cwd,
        read_only=flags.read_only,
    )
    resources = config.resources
    vcpus, memory_mb = resolve_resources(
        config, vcpus=flags.vcpus, memory_mb=flags.memory_mb, defaults=defaults
    )
    checks.check_range(vcpus, VCPUS_RANGE, field="vcpus")
    checks.check_range(memory_mb, MEMORY_MB_RANGE, field="memory_mb", unit=" MB")
    if flags.directory is not None and not flags.directory.is_dir():
        raise InvalidRequestError("directory", f"{flags.directory}: no such directory")
    mount_dir = flags.directory or (project_dir if policy.mount_cwd else None)
    bindings = tuple(
        brokering.bind(flags.secrets, config.secrets, base=config_path.parent if config_path else project_dir)
    )
    if bindings and not policy.network:
        raise InvalidRequestError(
            "secrets", "secrets are used through the network: they need a profile with network"
        )
    return SandboxRequest(
        image=image,
        backend=flags.backend or config.sandbox.backend,
        vcpus=vcpus,
        memory_mb=memory_mb,
        policy=policy,
        mount_dir=mount_dir,
        lifetime=checks.check_lifetime(flags.lifetime),
        env=checks.check_env(flags.env),
        labels=checks.check_labels(flags.labels),
        secrets=bindings,
        disk_mb=resources.disk_mb,
        image_reason=why,
    )


def resolve_in(
    flags: SandboxFlags,
    project_dir: Path,
    *,
    command: Sequence[str] = (),
    defaults: tuple[int, int] = DEFAULTS,
) -> SandboxRequest:
    """`resolve` with the agentkernel.toml found from `project_dir` up (none: the defaults)."""
    config, config_path = load_config(search_from=project_dir)
    return resolve(
        flags, config, project_dir=project_dir, config_path=config_path, command=command, defaults=defaults
    )
