"""The kinds of sandbox the pool daemon keeps ready, and how many of each.

A kind is what the pool key holds (`service.service.pool_key`: image and kernel, backend, vCPUs,
memory, policy): sandboxes of one kind are interchangeable, and each kind has one template snapshot
and a target count. By default the daemon keeps every image `run` would choose in the directory it is
started from, so that `run` there finds a ready sandbox whatever it runs:

- `base_image` of agentkernel.toml, when set (`run` then always uses it);
- else the image the project's files choose (`pyproject.toml`: python; none: base), then every other
  installed image a command's program chooses (`run -- node ...`: node), in detect.PROGRAMS' order.

`--image` flags, else `[pool] images`, name the images instead. Each kind gets `--size`, else
`[pool] size`, else DEFAULT_SIZE ready sandboxes; `IMAGE=N` (a flag) or `[pool.sizes] IMAGE = N`
sets one image's count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkernel.config import POOL_SIZE_RANGE, Config, Policy, image_name, load_config
from agentkernel.detect import PROGRAMS, detect_image
from agentkernel.errors import AgentkernelError, InvalidRequestError
from agentkernel.images import store
from agentkernel.service.request import SandboxFlags, SandboxRequest
from agentkernel.service.service import SandboxService, pool_key

DEFAULT_SIZE = 2


@dataclass(frozen=True)
class Kind:
    """One kind of sandbox the pool keeps ready, `size` of them."""

    image: str
    size: int
    policy: Policy
    vcpus: int
    memory_mb: int
    backend: str | None  # None: what `run` would choose on this host

    @classmethod
    def of(cls, request: SandboxRequest, size: int) -> Kind:
        """The kind of `request`'s sandboxes (which must be poolable: see `plan`)."""
        return cls(request.image, size, request.policy, request.vcpus, request.memory_mb, request.backend)

    def request(self) -> SandboxRequest:
        return SandboxRequest(
            image=self.image, backend=self.backend, vcpus=self.vcpus, memory_mb=self.memory_mb,
            policy=self.policy, mount_dir=None, lifetime=None,
        )  # fmt: skip

    def key(self) -> str | None:
        return pool_key(self.request())

    def record(self) -> dict[str, Any]:
        """The kind as JSON keeps it (the daemon's command line carries its kinds)."""
        return {**dataclasses.asdict(self), "policy": dataclasses.asdict(self.policy)}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Kind:
        return cls(**{**data, "policy": Policy.from_record(data["policy"])})


def parse_image(value: str) -> tuple[str, int | None]:
    """`IMAGE` or `IMAGE=N` (N ready sandboxes of it) as given to `daemon start --image`."""
    name, sep, count = value.rpartition("=")
    if not sep:
        return value, None
    if not count.isdigit() or not POOL_SIZE_RANGE[0] <= int(count) <= POOL_SIZE_RANGE[1]:
        raise InvalidRequestError(
            "image", f"{value!r}: the count after '=' must be {POOL_SIZE_RANGE[0]} to {POOL_SIZE_RANGE[1]}"
        )
    return name, int(count)


def targets(config: Config, project_dir: Path, images: Sequence[str], size: int | None) -> dict[str, int]:
    """Image -> ready sandboxes of it: from the flags (`images`, `size`), else agentkernel.toml's
    [pool], else every image `run` would choose in the project (see the module's docstring)."""
    counts: dict[str, int | None] = {}
    for value in images:
        name, count = parse_image(value)
        counts[image_name(name)] = count
    if not counts:
        chosen = [image_name(i) for i in config.pool.images or ()] or _run_images(config, project_dir)
        counts = dict.fromkeys(chosen)
    if size is not None:  # the flag wins over the whole file
        default, sizes = size, {}
    else:
        default = config.pool.size or DEFAULT_SIZE
        sizes = {image_name(name): count for name, count in config.pool.sizes.items()}
    found = {name: count if count is not None else sizes.get(name, default) for name, count in counts.items()}
    return {name: count for name, count in found.items() if count > 0}


def _run_images(config: Config, project_dir: Path) -> list[str]:
    """Every installed image `run` would choose in the project, the one for most commands first."""
    if config.sandbox.base_image:
        return [config.sandbox.base_image]
    first, _why = detect_image([], project_dir)
    installed = set(store.names())
    by_program = [image for image in dict.fromkeys(PROGRAMS.values()) if image in installed]
    return list(dict.fromkeys([first, *by_program]))


@dataclass(frozen=True)
class Plan:
    """What a daemon keeps, and how many sandboxes it makes at once (None: as the host allows)."""

    kinds: list[Kind]
    parallel: int | None


async def plan(
    service: SandboxService,
    flags: SandboxFlags,
    *,
    images: Sequence[str] = (),
    size: int | None = None,
    parallel: int | None = None,
) -> Plan:
    """What a daemon started in the service's project keeps: each image as `run` there would make it
    (flags, then agentkernel.toml, then the defaults). Every image is checked now: a missing one is
    an error, not a pool that never fills."""
    config, _path = load_config(search_from=service.project_dir)
    kinds = []
    for image, count in targets(config, service.project_dir, images, size).items():
        request = await service.resolve(dataclasses.replace(flags, image=image))
        if not request.poolable:
            raise AgentkernelError(f"{_unpoolable(request)}: its sandboxes cannot be pooled")
        kinds.append(Kind.of(request, count))
    if not kinds:
        raise InvalidRequestError("size", "every image has a count of 0: the pool would keep nothing")
    return Plan(kinds, parallel or config.pool.parallel)


def _unpoolable(request: SandboxRequest) -> str:
    policy = request.policy
    if policy.mount_cwd or policy.mount_home or request.mount_dir is not None:
        return f"the {policy.profile} profile shares host directories"
    if request.disk_mb:
        return "agentkernel.toml sets resources.disk_mb (pooled sandboxes have their image's disk)"
    return "agentkernel.toml gives sandboxes secrets, an environment, labels or a lifetime"
