"""`agentkernel.toml`: the project's sandbox settings, and the security policy they resolve to
(docs/config.md: each key and what uses it).

    [sandbox]           name (`create`'s default), base_image, backend
    [agent]             preferred (`agent run`'s default)
    [resources]         vcpus, memory_mb, disk_mb, min_free_disk_mb
    [security]          profile, network, mount_cwd, mount_home, pass_env, read_only, ports
    [security.domains]  allow, block, allowlist_only
    [secrets.NAME]      from_env or from_file (else the secret store), hosts, in_url, in_body,
                        upstream_ca: a secret the egress gateway brokers (docs/secrets.md)
    [pool]              images, size, parallel; [pool.sizes] IMAGE = N: what the pool daemon keeps ready

Every key is optional; an unset one is left to the command-line flag or the default. Every key is
read by the commands it names, none is only checked: types are strict (TOML has them: `vcpus = "2"`
is an error, not 2), unknown keys are errors, so a typo is reported instead of silently ignored, and
a key that is no longer supported (REMOVED) is refused with the reason. Every problem becomes an
AgentkernelError of one line:

    agentkernel.toml: resources.memory_mb: must be at least 64 (got 1)
    agentkernel.toml: security.netwrk: unknown key
    agentkernel.toml: network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox
    agentkernel.toml: line 3, column 7: invalid TOML: expected '=' after a key in a key/value pair
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Le, Predicate

from agentkernel.errors import AgentkernelError
from agentkernel.images.store import check_name
from agentkernel.names import SANDBOX_NAME

if TYPE_CHECKING:
    from pydantic import TypeAdapter
    from pydantic_core import ErrorDetails

FILENAME = "agentkernel.toml"

ProfileName = Literal["permissive", "moderate", "restrictive"]
PortsSetting = Literal["off", "loopback", "any"]
"""Whether a sandbox's ports may be forwarded to the host: not at all, to the host's loopback only,
or to any address of the host (which must still be asked for explicitly)."""
AgentName = Literal["claude", "gemini", "codex", "opencode"]

RUNTIME_IMAGES = {"python": "python", "node": "node", "rust": "rust", "golang": "go", "go": "go"}
VCPUS_RANGE = (1, 32)
"""The virtual CPUs a sandbox may have, inclusive."""
MEMORY_MB_RANGE = (64, 65536)
"""The memory a sandbox may have, in MiB, inclusive."""
DISK_MB_RANGE = (64, 1024 * 1024)
"""The writable disk a sandbox may have, in MiB, inclusive."""
POOL_SIZE_RANGE = (0, 200)
"""Ready sandboxes the pool daemon may keep of one kind, inclusive."""

REMOVED = {
    ("network", "vsock_cid"): "vsock CIDs are allocated per sandbox",
}
"""Keys the file once had, and why they are gone: using one is an error that says so."""

DOMAIN_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def image_name(value: str) -> str:
    """The image a `base_image` value names.

    Our images are `base`, `python`, `node`, `rust`, `go` and pulled ones (`myimg:latest`). A
    Docker-style reference to a known runtime, with no registry part, is mapped to our image for
    that runtime, whatever its tag: `python:3.12-alpine` -> `python`, `node:20` -> `node`,
    `rust:1.80` -> `rust`, `golang:1.22` -> `go`. Anything else is used as it is, as an image name.
    """
    check_name(value)
    repository = value.split("@", 1)[0].split(":", 1)[0]
    return RUNTIME_IMAGES.get(repository, value)


def _is_sandbox_name(value: str) -> bool:
    return SANDBOX_NAME.fullmatch(value) is not None


def _is_image_name(value: str) -> bool:
    try:
        image_name(value)
    except AgentkernelError:
        return False
    return True


def _is_backend_name(value: str) -> bool:
    """Backends are known by the registry (backends/registry.py), which a fake can join."""
    from agentkernel.backends import registry

    return registry.is_registered(value)


def _backend_names() -> str:
    from agentkernel.backends import registry

    return "must be one of " + ", ".join(registry.names())


def _is_secret_name(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", value) is not None


def _is_domain_pattern(value: str) -> bool:
    """The gateway's own normalisation decides, so a pattern it would refuse is refused here."""
    from agentkernel.network.policy import normalise_pattern  # only when a file is checked

    if len(value) > 253 or DOMAIN_PATTERN.fullmatch(value.lower()) is None:
        return False
    try:
        normalise_pattern(value)
    except AgentkernelError:
        return False
    return True


CHECK_REASONS: dict[str, str | Callable[[], str]] = {
    _is_sandbox_name.__name__: (
        "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    _is_image_name.__name__: "must be an image name (like python or myimg:latest)",
    _is_domain_pattern.__name__: "must be a domain pattern (like pypi.org or *.pypi.org)",
    _is_secret_name.__name__: "must be an environment variable name (letters, digits, '_')",
    _is_backend_name.__name__: _backend_names,
}

# The sections are plain frozen dataclasses, so reading the defaults costs nothing; a file is checked
# by pydantic (imported only then) against their types and the constraints in their annotations.


class _Section:
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}


@dataclass(frozen=True)
class Sandbox(_Section):
    name: Annotated[str, Predicate(_is_sandbox_name)] | None = None
    """The name `create` gives a sandbox when none is given (`run` names its own)."""
    base_image: Annotated[str, Predicate(_is_image_name)] | None = None
    """Mapped by image_name() once the file is checked."""
    backend: Annotated[str, Predicate(_is_backend_name)] | None = None
    """None: the host's best (a VM whenever a VMM can run); "container" trades the VM for a container."""


@dataclass(frozen=True)
class Agent(_Section):
    preferred: AgentName | None = None
    """The agent `agent run` starts when none is named."""


@dataclass(frozen=True)
class Resources(_Section):
    vcpus: Annotated[int, Ge(VCPUS_RANGE[0]), Le(VCPUS_RANGE[1])] | None = None
    memory_mb: Annotated[int, Ge(MEMORY_MB_RANGE[0]), Le(MEMORY_MB_RANGE[1])] | None = None
    disk_mb: Annotated[int, Ge(DISK_MB_RANGE[0]), Le(DISK_MB_RANGE[1])] | None = None
    """The writable root disk's size (its image's when unset, or when the root is read-only)."""
    min_free_disk_mb: Annotated[int, Ge(0), Le(1024 * 1024 * 1024)] | None = None
    """`start` refuses to boot with less free on the host under sandbox disks (service/diskspace)."""


@dataclass(frozen=True)
class Domains(_Section):
    """Domain patterns: `pypi.org` matches that name only, `*.pypi.org` its subdomains (lower case
    once the file is checked)."""

    allow: tuple[Annotated[str, Predicate(_is_domain_pattern)], ...] = ()
    block: tuple[Annotated[str, Predicate(_is_domain_pattern)], ...] = ()
    allowlist_only: bool = False


@dataclass(frozen=True)
class Security(_Section):
    """A profile, and overrides of its settings (None: the profile decides)."""

    profile: ProfileName = "moderate"
    network: bool | None = None
    mount_cwd: bool | None = None
    mount_home: bool | None = None
    pass_env: bool | None = None
    read_only: bool | None = None
    ports: PortsSetting | None = None
    domains: Domains = field(default_factory=Domains)


@dataclass(frozen=True)
class Secret(_Section):
    """A secret a sandbox can be given with `--secret NAME`: its value stays on the host, the
    sandbox sees a placeholder, and the egress gateway swaps it in for requests to `hosts` only."""

    from_env: str | None = None
    from_file: str | None = None
    """Relative to the directory of agentkernel.toml. Neither: the secret store's value."""
    hosts: tuple[Annotated[str, Predicate(_is_domain_pattern)], ...] = ()
    in_url: bool = False
    in_body: bool = False
    upstream_ca: str | None = None
    """A CA file to verify the hosts with instead of the host's trust store."""


@dataclass(frozen=True)
class PoolSettings(_Section):
    """What `agentkernel daemon start` keeps ready in this project (a flag wins; pool/kinds.py)."""

    images: tuple[Annotated[str, Predicate(_is_image_name)], ...] | None = None
    """None: every image `run` would choose here."""
    size: Annotated[int, Ge(1), Le(POOL_SIZE_RANGE[1])] | None = None
    sizes: dict[Annotated[str, Predicate(_is_image_name)], Annotated[int, Ge(0), Le(POOL_SIZE_RANGE[1])]] = (
        field(default_factory=dict)
    )
    """Ready sandboxes of one image, over `size`."""
    parallel: Annotated[int, Ge(1), Le(64)] | None = None
    """Sandboxes made at once; None: bounded by the host's cores and free memory."""


@dataclass(frozen=True)
class Config(_Section):
    sandbox: Sandbox = field(default_factory=Sandbox)
    agent: Agent = field(default_factory=Agent)
    resources: Resources = field(default_factory=Resources)
    security: Security = field(default_factory=Security)
    pool: PoolSettings = field(default_factory=PoolSettings)
    secrets: dict[Annotated[str, Predicate(_is_secret_name)], Secret] = field(default_factory=dict)


@functools.cache
def _validator() -> TypeAdapter[Config]:
    from pydantic import TypeAdapter

    return TypeAdapter(Config)


def _checked(data: dict[str, Any]) -> Config:
    """`data` (parsed TOML) as a Config, strictly typed: the TOML types must be the fields' own.
    Raises pydantic's ValidationError."""
    config = _validator().validate_json(json.dumps(data, default=str), strict=True)
    sandbox, domains = config.sandbox, config.security.domains
    if sandbox.base_image is not None:
        sandbox = replace(sandbox, base_image=image_name(sandbox.base_image))
    domains = replace(
        domains,
        allow=tuple(p.lower() for p in domains.allow),
        block=tuple(p.lower() for p in domains.block),
    )
    return replace(config, sandbox=sandbox, security=replace(config.security, domains=domains))


def find_config(start: Path) -> Path | None:
    """The nearest agentkernel.toml in `start` or its parents.

    The search stops at the repository root (the first directory holding `.git`, after looking in
    it) or at the filesystem root, so a project never picks up a file from outside its repository.
    """
    start = start.absolute()
    for directory in (start, *start.parents):
        candidate = directory / FILENAME
        if candidate.is_file():
            return candidate
        if (directory / ".git").exists():
            break
    return None


def load_config(path: Path | None = None, *, search_from: Path | None = None) -> tuple[Config, Path | None]:
    """The validated config and the file it came from.

    With `path`, that file must exist. Without, it is found by find_config() from `search_from`
    (default: the current directory); if there is none, the defaults and None are returned.
    """
    if path is None:
        path = find_config(search_from if search_from is not None else Path.cwd())
        if path is None:
            return Config(), None
    shown = _shown(path)
    try:
        text = path.read_bytes().decode()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise AgentkernelError(f"{shown}: file not found") from None
    except OSError as exc:
        raise AgentkernelError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AgentkernelError(f"{shown}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentkernelError(f"{shown}: {_syntax_error(str(exc), text)}") from None
    from pydantic import ValidationError

    problems = _removed_keys(data)
    try:
        config = _checked(data)
    except ValidationError as exc:
        problems += [_problem(error) for error in exc.errors()]
    if problems:
        raise AgentkernelError(f"{shown}: {'; '.join(problems)}") from None
    return config, path


def _removed_keys(data: dict[str, Any]) -> list[str]:
    """A problem for each REMOVED key in `data` (parsed TOML), taken out of it so that the rest is
    checked as usual; a table left empty goes too, or it would be reported as an unknown key."""
    problems = []
    for (section, key), reason in REMOVED.items():
        table = data.get(section)
        if isinstance(table, dict) and key in table:
            del table[key]
            problems.append(f"{section}.{key}: no longer supported: {reason}")
            if not table:
                del data[section]
    return problems


@dataclass(frozen=True)
class Policy:
    """The security settings one sandbox runs with."""

    profile: str
    network: bool
    mount_cwd: bool
    mount_home: bool
    pass_env: bool
    read_only: bool
    domains: Domains = field(default_factory=Domains)
    max_procs: int = 0
    """Processes and threads the sandbox's commands may have at once; 0 (or less): the profile's.
    Part of the policy so that it is stored with every sandbox, snapshot and pool kind, and no path
    that makes a VM from a record can leave it out."""
    ports: str = ""
    """A PortsSetting; "" (a record written before policies carried it): the profile's."""

    def __post_init__(self) -> None:
        if self.profile not in MAX_PROCS:
            raise AgentkernelError(f"unknown security profile {self.profile!r}")
        if self.max_procs <= 0:
            object.__setattr__(self, "max_procs", MAX_PROCS[self.profile])
        if not self.ports:
            object.__setattr__(self, "ports", PORTS[self.profile])

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Policy:
        """A policy from its record (`dataclasses.asdict` of one, as JSON keeps it). A record written
        before policies carried `max_procs` gets its profile's."""
        domains = data["domains"]
        rules = Domains(tuple(domains["allow"]), tuple(domains["block"]), domains["allowlist_only"])
        return cls(**{**data, "domains": rules})


MAX_PROCS = {"permissive": 4096, "moderate": 1024, "restrictive": 256}  # processes per sandbox
PORTS: dict[str, PortsSetting] = {"permissive": "any", "moderate": "loopback", "restrictive": "off"}
DEFAULT_MAX_PROCS = MAX_PROCS["moderate"]  # the default profile's

PROFILES: dict[str, Policy] = {
    "permissive": Policy(
        "permissive", network=True, mount_cwd=True, mount_home=True, pass_env=True, read_only=False
    ),
    "moderate": Policy(
        "moderate", network=True, mount_cwd=False, mount_home=False, pass_env=False, read_only=False
    ),
    "restrictive": Policy(
        "restrictive", network=False, mount_cwd=False, mount_home=False, pass_env=False, read_only=True
    ),
}


def resolve_policy(
    config: Config,
    *,
    profile: str | None = None,
    network: bool | None = None,
    mount_cwd: bool | None = None,
    mount_home: bool | None = None,
    pass_env: bool | None = None,
    read_only: bool | None = None,
) -> Policy:
    """The policy from command-line flags (None: not given), `config`, and the profile's defaults.

    The profile is the flag's, else the config's. Each setting is then the flag's, else the
    config's [security] override, else the profile's: a config override still applies when a flag
    picks another profile.
    """
    name = profile if profile is not None else config.security.profile
    if name not in PROFILES:
        raise AgentkernelError(f"unknown security profile {name!r}: use {_either(list(PROFILES))}")
    base, security = PROFILES[name], config.security
    return Policy(
        profile=name,
        network=_first(network, security.network, base.network),
        mount_cwd=_first(mount_cwd, security.mount_cwd, base.mount_cwd),
        mount_home=_first(mount_home, security.mount_home, base.mount_home),
        pass_env=_first(pass_env, security.pass_env, base.pass_env),
        read_only=_first(read_only, security.read_only, base.read_only),
        domains=security.domains,
        ports=security.ports or base.ports,
    )


DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MB = 512


def resolve_resources(
    config: Config,
    *,
    vcpus: int | None,
    memory_mb: int | None,
    defaults: tuple[int, int] = (DEFAULT_VCPUS, DEFAULT_MEMORY_MB),
) -> tuple[int, int]:
    """vCPUs and memory in MB from the flags (None: not given), else `config`, else `defaults`."""
    resources = config.resources
    return (
        vcpus if vcpus is not None else resources.vcpus or defaults[0],
        memory_mb if memory_mb is not None else resources.memory_mb or defaults[1],
    )


def _first(*values: bool | None) -> bool:
    return next(value for value in values if value is not None)


def _either(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def _shown(path: Path) -> str:
    """`path` for messages: relative to the current directory when inside it, on one line."""
    try:
        text = str(path.absolute().relative_to(Path.cwd()))
    except (ValueError, OSError):
        text = str(path)
    return text if text.isprintable() else json.dumps(text)


def _syntax_error(message: str, text: str) -> str:
    """tomllib's "Reason (at line 3, column 7)" as "line 3, column 7: invalid TOML: reason"."""
    match = re.fullmatch(r"(.*?)\s*\((?:at (line \d+, column \d+)|at end of document)\)", message)
    if not match:
        return f"invalid TOML: {message}"
    where = match[2] or f"line {len(text.splitlines()) or 1}"  # the end: its last line
    return f"{where}: invalid TOML: {match[1][:1].lower()}{match[1][1:]}"


TYPE_REASONS = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "dataclass_type": "must be a table",
}


def _problem(error: ErrorDetails) -> str:
    """One validation error as "key.path: reason (got value)"."""
    where = "".join(f"[{part}]" if isinstance(part, int) else "." + _key(part) for part in error["loc"])
    where = where.removeprefix(".") or "(top level)"
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "unexpected_keyword_argument":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required"
    if kind == "greater_than_equal":
        reason = f"must be at least {ctx['ge']}"
    elif kind == "less_than_equal":
        reason = f"must be at most {ctx['le']}"
    elif kind == "literal_error":
        reason = "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    elif kind == "predicate_failed":
        check = re.search(r"Predicate '?([\w.]+)'? failed", error["msg"])
        found = CHECK_REASONS.get(check[1] if check else "", "is not valid")
        reason = found() if callable(found) else found
    else:
        reason = TYPE_REASONS.get(kind) or error["msg"][:1].lower() + error["msg"][1:]
    return f"{where}: {reason} (got {_value(error['input'])})"


def _key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)


def _value(value: Any) -> str:
    """`value` as TOML would spell it, on one line and cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
