"""Secrets a sandbox may use but never hold: declarations, per-sandbox placeholders, and the broker.

A sandbox is given, for each secret it names, a placeholder (`akph_` and 48 random hex digits, new
for every sandbox) in the environment variable of the secret's name. The egress gateway swaps the
placeholder for the real value in requests to the secret's hosts only (see `gateway`), and refuses,
as an exfiltration attempt, any request that carries a placeholder or a real value to another host.

A sandbox's record keeps its bindings (name, placeholder, hosts, where the value comes from) but
never a value: the value is read where the gateway is started (`read_value`) and handed to the
gateway on its stdin, so it exists only in host processes (the gateway's memory).

Values come from `[secrets.NAME]` in agentkernel.toml (`from_env`, `from_file`) or from the secret
store (`agentkernel secret set NAME --host HOST`, see `secret_store`).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentkernel.errors import AgentkernelError
from agentkernel.network import secret_store
from agentkernel.network.policy import matches, normalise_pattern

PLACEHOLDER_PREFIX = "akph_"
PLACEHOLDER = re.compile(PLACEHOLDER_PREFIX + "[0-9a-f]{48}")
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")  # the guest's environment variable
MAX_VALUE = 64 * 1024
MIN_VALUE = 8  # shorter values would be found by chance in unrelated traffic


def new_placeholder() -> str:
    """A placeholder: recognisable, random, and made only of characters no encoding changes
    (percent-encoding, JSON and form encoding leave `[0-9a-z_]` as it is)."""
    return PLACEHOLDER_PREFIX + secrets.token_hex(24)


@dataclass(frozen=True)
class SecretBinding:
    """One secret of one sandbox, as its record keeps it (no value)."""

    name: str
    placeholder: str
    hosts: tuple[str, ...]  # normalised host patterns (`api.example.com`, `*.example.com`)
    source: str  # "env:VAR", "file:/absolute/path" or "store:NAME"
    in_url: bool = False  # also replace the placeholder in the request target (path and query)
    in_body: bool = False  # also replace it in the request body
    upstream_ca: str | None = None  # verify the hosts against this CA file, not the host's store

    def serves(self, host: str) -> bool:
        return any(matches(pattern, host) for pattern in self.hosts)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> SecretBinding:
        return cls(**{**data, "hosts": tuple(data["hosts"])})


def check_name(name: str) -> str:
    if not SECRET_NAME.fullmatch(name):
        raise AgentkernelError(
            f"invalid secret name {name[:70]!r}: use letters, digits and '_', not starting with a digit "
            "(it is the environment variable the sandbox sees)"
        )
    return name


def bind(
    names: Iterable[str], declared: Mapping[str, Any], *, base: Path | None = None
) -> list[SecretBinding]:
    """Bindings with new placeholders for the secrets `names`, from `declared` (the config's
    `[secrets]` tables) or else the secret store. Every value is read once here, so a secret that
    cannot be read is reported before anything boots. `base` is where relative `from_file` paths start.
    """
    bindings: dict[str, SecretBinding] = {}
    for name in names:
        check_name(name)
        if name in bindings:
            continue
        decl = declared.get(name)
        if decl is not None:
            binding = _from_declaration(name, decl, base or Path.cwd())
        elif (stored := secret_store.hosts(name)) is not None:
            binding = _binding(name, stored, f"store:{name}", False, False, None)
        else:
            raise AgentkernelError(
                f"unknown secret {name!r}: declare [secrets.{name}] in agentkernel.toml "
                f"or store it with `agentkernel secret set {name} --host HOST`"
            )
        read_value(binding)
        bindings[name] = binding
    return list(bindings.values())


def _from_declaration(name: str, decl: Any, base: Path) -> SecretBinding:
    if decl.from_env and decl.from_file:
        raise AgentkernelError(f"secret {name}: set from_env or from_file, not both")
    if decl.from_env:
        source = f"env:{decl.from_env}"
    elif decl.from_file:
        source = f"file:{(base / Path(decl.from_file).expanduser()).absolute()}"
    else:
        source = f"store:{name}"
    hosts = decl.hosts
    if not hosts and source.startswith("store:"):
        hosts = secret_store.hosts(name) or ()
    ca = str((base / Path(decl.upstream_ca).expanduser()).absolute()) if decl.upstream_ca else None
    return _binding(name, tuple(hosts), source, decl.in_url, decl.in_body, ca)


def _binding(
    name: str, hosts: Sequence[str], source: str, in_url: bool, in_body: bool, ca: str | None
) -> SecretBinding:
    if not hosts:
        raise AgentkernelError(
            f'secret {name} has no hosts: list the hosts it may be sent to (hosts = ["api.example.com"])'
        )
    patterns = []
    for pattern in hosts:
        try:
            patterns.append(normalise_pattern(pattern))
        except AgentkernelError as exc:
            raise AgentkernelError(f"secret {name}: {exc}") from None
    if ca is not None and not Path(ca).is_file():
        raise AgentkernelError(f"secret {name}: upstream_ca {ca}: no such file")
    return SecretBinding(name, new_placeholder(), tuple(patterns), source, in_url, in_body, ca)


def read_value(binding: SecretBinding, environ: Mapping[str, str] | None = None) -> str:
    """The secret's value, read from its source now; AgentkernelError if it cannot be."""
    kind, _, where = binding.source.partition(":")
    name = binding.name
    if kind == "env":
        value = (os.environ if environ is None else environ).get(where)
        if not value:
            raise AgentkernelError(f"secret {name}: environment variable {where} is not set")
    elif kind == "file":
        try:
            value = Path(where).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentkernelError(f"secret {name}: cannot read {where}: {exc}") from None
    elif kind == "store":
        stored = secret_store.value(where)
        if stored is None:
            raise AgentkernelError(
                f"secret {name}: not in the secret store (`agentkernel secret set {where}`)"
            )
        value = stored
    else:
        raise AgentkernelError(f"secret {name}: unknown source {binding.source!r}")
    if not MIN_VALUE <= len(value.encode()) <= MAX_VALUE or "\n" in value or "\r" in value:
        raise AgentkernelError(
            f"secret {name}: the value must be one line of {MIN_VALUE} to {MAX_VALUE} bytes"
        )
    return value


def guest_env(bindings: Iterable[SecretBinding]) -> dict[str, str]:
    """What the sandbox's commands see: each secret's placeholder under the secret's name."""
    return {b.name: b.placeholder for b in bindings}


@dataclass(frozen=True)
class Armed:
    """A binding with its value, in the gateway only."""

    binding: SecretBinding
    value: bytes

    @property
    def placeholder(self) -> bytes:
        return self.binding.placeholder.encode()


@dataclass(frozen=True)
class Leak:
    secret: str
    what: str  # "placeholder" or "value"


class Broker:
    """The gateway's view of a sandbox's secrets: which hosts get which, and what must not leave."""

    def __init__(self, armed: Sequence[Armed]) -> None:
        self.armed = tuple(armed)
        needles = [a.placeholder for a in armed] + [a.value for a in armed]
        self.longest = max((len(n) for n in needles), default=0)

    def __bool__(self) -> bool:
        return bool(self.armed)

    def for_host(self, host: str) -> list[Armed]:
        return [a for a in self.armed if a.binding.serves(host)]

    def leak(self, data: bytes, host: str) -> Leak | None:
        """A secret's placeholder (in any letter case) or value in `data`, bound for `host` that is
        not one of that secret's hosts."""
        if not self.armed:
            return None
        lowered = data.lower()
        for armed in self.armed:
            if armed.binding.serves(host):
                continue
            if armed.placeholder in lowered:
                return Leak(armed.binding.name, "placeholder")
            if armed.value in data:
                return Leak(armed.binding.name, "value")
        return None

    def any_secret(self, data: bytes) -> Armed | None:
        """The first secret whose placeholder or value is in `data`, wherever it may go."""
        lowered = data.lower()
        return next((a for a in self.armed if a.placeholder in lowered or a.value in data), None)


def substitute(data: bytes, armed: Iterable[Armed]) -> tuple[bytes, list[str]]:
    """`data` with each placeholder replaced by its value, and the names of the secrets replaced."""
    used = []
    for a in armed:
        if a.placeholder in data:
            data = data.replace(a.placeholder, a.value)
            used.append(a.binding.name)
    return data, used
